"""Per step under mixed precision: each backend's cost in bfloat16 and float16 against float32.

Section "Mixed precision" of `benchmarks/run.py` (also `python benchmarks/precision.py [BACKEND ...]`).
The "medium" and "large" problems of the "Per step" section, with one hidden layer of 16 tanh
units (`hidden.with_hidden`), are trained through each backend's `train` three ways: float32,
`mixed_bfloat16`, and `mixed_float16` with a dynamic loss scale (2^15, growth every 2000 steps, as
users leave it), alternating, best of 3 (1 for "large"). The backends are the frameworks' own
mechanisms (a Keras policy, autocast and GradScaler, cast parameters in JAX), so the ratio is what
a user of that framework pays for mixed precision on this machine; on a CPU without bfloat16
matrix units it is expected to be above 1.
"""

from __future__ import annotations

import dataclasses
import sys
import time

from _runner import BACKENDS, OTHERS, SIZES, make_problem, steps, timed
from hidden import with_hidden

from conformance import backends
from conformance.problem import Problem

PRECISIONS = {
    "float32": {},
    "mixed_bfloat16": {"precision": "mixed_bfloat16"},
    "mixed_float16": {"precision": "mixed_float16",
                      "loss_scale": {"kind": "dynamic", "initial": 2.0**15, "growth_interval": 2000}},
}
MEASURED_SIZES = ("medium", "large")


def variants(problem: Problem) -> dict[str, Problem]:
    return {name: dataclasses.replace(problem, **fields) for name, fields in PRECISIONS.items()}


def measure(backend: str) -> dict[str, dict[str, float]]:
    """Per size: ms per step under each precision (best of the repeats)."""
    train = backends.load(backend).train
    for problem in variants(with_hidden(make_problem(6, 1, 6, 3))).values():
        train(problem, "cpu")  # first-use costs
    found = {}
    for size in MEASURED_SIZES:
        problems = variants(with_hidden(make_problem(*SIZES[size])))
        best = dict.fromkeys(problems, float("inf"))
        for _ in range(1 if size == "large" else 3):
            for name, problem in problems.items():
                best[name] = min(best[name], timed(train, problem, "cpu"))
        count = steps(problems["float32"])
        found[size] = {name: 1e3 * seconds / count for name, seconds in best.items()}
    return found


def print_section(chosen: list[str] | None = None) -> None:
    print("\n## Mixed precision: ms per step, one hidden layer of 16 tanh units, against float32\n")
    print("| backend | size | float32 | mixed_bfloat16 | ratio | mixed_float16 (dynamic scale) | ratio |")
    print("|---|---|---|---|---|---|---|")
    for backend in chosen or BACKENDS + OTHERS + ("keras_jax", "keras_torch"):
        if backends.load(backend).available():
            continue
        started = time.perf_counter()
        for size, row in measure(backend).items():
            base = row["float32"]
            print(f"| {backend} | {size} | {base:.3f} | {row['mixed_bfloat16']:.3f} | "
                  f"{row['mixed_bfloat16'] / base:.2f} | {row['mixed_float16']:.3f} | "
                  f"{row['mixed_float16'] / base:.2f} |", flush=True)
        print(f"<!-- {backend}: {time.perf_counter() - started:.0f} s -->", flush=True)


if __name__ == "__main__":
    print_section(sys.argv[1:] or None)
