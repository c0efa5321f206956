"""The registry of backends. Each module exposes the same names:

    NAME: str
    LOOKED_FOR: tuple[str, ...]          device kinds it asks its framework for: "cpu", "cuda", "mps"
    available() -> str | None            None, or why it cannot run (framework not installed)
    devices() -> list[str]               devices it can train on: "cpu", "cuda:0", "mps"
    device_name(device) -> str           what the device is (CPU or GPU model), for the report
    train(problem, device) -> Trajectory numpy in, numpy out; raises Unavailable when the
                                         backend turns out not to work here (a broken compiler)
    SELECTED_BY_DEFAULT: bool            optional (default True): False leaves it out of a run unless
                                         --backend or a case's `backends:` names it
    DATA_PARALLEL: bool                  optional (default False): trains `problem.replicas` > 1 as
                                         its framework's data-parallel API does; else such a case
                                         skips, with WHY_NOT_DATA_PARALLEL (optional) as the reason
    ACCUMULATES: bool                    optional (default False): trains `problem.accumulate` > 1 (one
                                         optimizer step per `Problem.groups` group); else such a case
                                         skips, with WHY_NOT_ACCUMULATING (optional) as the reason

Modules are imported on first use, and frameworks only inside them, so that the harness (and
its own tests) work without TensorFlow or PyTorch installed.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any

from conformance.schema import BACKEND_NAMES

if TYPE_CHECKING:
    from conformance.problem import Trajectory
    from conformance.workers import WorkerKind

MODULES = {name: f"conformance.backends.{name}" for name in BACKEND_NAMES}


class Unavailable(Exception):
    """Raised by `train` when the backend cannot run here after all (its compiler is missing or
    broken): the item is skipped with this reason, never passed or failed."""


def selected_by_default(name: str) -> bool:
    return getattr(load(name), "SELECTED_BY_DEFAULT", True)


def load(name: str) -> ModuleType:
    """The backend module called `name`; KeyError names the known ones."""
    if name not in MODULES:
        raise KeyError(f"unknown backend {name!r}; expected one of: {', '.join(MODULES)}")
    return importlib.import_module(MODULES[name])


def train_in_worker(kind: WorkerKind, function: str, *arguments: Any) -> Trajectory:
    """`function(*arguments)` in this process's worker of `kind`, its trajectory data back as a
    Trajectory; the worker's Unavailable raised here as Unavailable (a skip with its reason),
    any other error as the worker reported it."""
    from conformance import workers
    from conformance.problem import Trajectory

    try:
        data = workers.POOL.call(kind, function, *arguments)
    except workers.WorkerError as error:
        if error.kind == Unavailable.__name__:
            raise Unavailable(error.message) from None
        raise
    return Trajectory.from_data(data)
