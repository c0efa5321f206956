"""The `torch` loop with its training step (forward, loss, backward, optimizer step) under
`torch.compile` (inductor, default mode): what users switch on for speed.

Dynamo's caches are reset before each case, so every case compiles its own graphs (a new
model and optimizer would fail the old guards anyway, and after eight such recompiles Dynamo
silently falls back to eager). Inductor's FX graph cache still serves a graph it has compiled
before, in this process or an earlier one, so cases of the same shape compile once. Each
result records the backend and mode, the graphs compiled, graph breaks, cache hits and the
compile time apart from the training; a run in which no graph was compiled is an error, never
a silent eager result.

Mixed precision compiles the same step with autocast and the loss scale inside it: GradScaler's
calls break the graph and run eagerly (measured: three to five graphs per case, all compiled by
the first applied optimizer step, none per step).

Replicas > 1: the same compiled step in one process per replica, the model wrapped in
`DistributedDataParallel` (Dynamo's DDPOptimizer splits the graph at DDP's buckets), each rank
compiling its own (conformance/backends/_torch_ddp.py).
"""

from __future__ import annotations

import importlib
import os
import shutil
from typing import Any

from conformance.backends import Unavailable, _compiled, _frameworks, _torch_ddp, _torch_precision
from conformance.backends import torch as torch_backend
from conformance.problem import Problem, Trajectory

NAME = "torch_compile"
LOOKED_FOR = torch_backend.LOOKED_FOR
devices = torch_backend.devices
device_name = torch_backend.device_name
COMPILE_OPTIONS = {"backend": "inductor", "mode": "default"}
# Compiling costs 0.3-3 s per case on a 2-core machine, which makes the default run of the shipped
# cases more than twice as slow (benchmarks/run.py measures it): run it with --backend torch_compile.
SELECTED_BY_DEFAULT = False
DATA_PARALLEL = True  # DistributedDataParallel, one process per replica (conformance/backends/_torch_ddp.py)
ACCUMULATES = True  # the torch loop's idiom, each batch's (loss / N).backward() compiled


def available() -> str | None:
    """None, or why torch.compile cannot run here (torch missing, no C++ compiler for inductor)."""
    reason = torch_backend.available()
    compiler = os.environ.get("CXX") or "g++"
    if reason is None and shutil.which(compiler) is None:
        reason = f"torch.compile's inductor needs a C++ compiler: {compiler!r} was not found (set CXX)"
    return reason


def train(problem: Problem, device: str) -> Trajectory:
    if problem.replicas > 1:
        return _torch_ddp.train(NAME, problem, device)
    with _torch_precision.float16_probabilities_refused(problem):
        return train_compiled(problem, device)


def train_replica(problem: Problem, device: str, replica: Any) -> Trajectory:
    """One rank's part of a data-parallel case (called in its process by _torch_ddp)."""
    return train_compiled(problem, device, replica)


def train_compiled(problem: Problem, device: str, replica: Any = None) -> Trajectory:
    """The torch loop with its step compiled, in this process (`replica`: as one rank of a
    process group, see torch.train_steps)."""
    torch = _frameworks.torch()
    dynamo = importlib.import_module("torch._dynamo")
    from torch._dynamo.utils import counters

    dynamo.reset()
    counters.clear()
    try:
        trajectory = torch_backend.train_steps(problem, device, lambda step: torch.compile(step, **COMPILE_OPTIONS),
                                               replica)
    except dynamo.exc.BackendCompilerFailed as error:
        raise Unavailable(f"torch.compile's {COMPILE_OPTIONS['backend']} backend failed to compile: "
                          f"{str(error).splitlines()[0]}") from error
    report = _compile_report(counters)
    if report["graphs_compiled"] == 0:
        raise RuntimeError(f"torch.compile compiled no graph for this case; the step ran eagerly: {report}")
    trajectory.info["torch_compile"] = report
    if "precision" in trajectory.info:
        _describe_precision(trajectory.info["precision"])
    trajectory.info["compile_seconds"] = _compiled.first_call_overhead(trajectory.info.pop("epoch_seconds"))
    return trajectory


def _compile_report(counters: Any) -> dict[str, Any]:
    """What Dynamo and inductor counted for this case."""
    return {**COMPILE_OPTIONS,
            "graphs_compiled": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "fx_graph_cache_hits": int(counters["inductor"]["fxgraph_cache_hit"]),
            "fx_graph_cache_misses": int(counters["inductor"]["fxgraph_cache_miss"])}


def _describe_precision(precision: dict[str, Any]) -> None:
    """The compiled step's part of info["precision"]: the same calls as eager inside the compiled
    step (GradScaler's are on Dynamo's skip list: they break the graph and run eagerly, so the
    scale and the skips are eager's), and inductor's lowering: with emulate_precision_casts off
    (its default), fused kernels keep the intermediates they fuse in float32, not rounded as
    eager rounds them (docs/design/mixed-precision.md, section 4)."""
    emulate = bool(importlib.import_module("torch._inductor.config").emulate_precision_casts)
    precision["lowering"] = (f"inductor, emulate_precision_casts={emulate}: "
                             + ("eager's roundings kept" if emulate else "fused intermediates not rounded"))
    breaks = "; GradScaler's calls break the graph and run eagerly" if "GradScaler" in precision["api"] else ""
    precision["api"] += f"; the step under torch.compile{breaks}"
