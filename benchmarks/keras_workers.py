"""Keras 3 worker processes: start-up, a call's round trip, per-step cost, and what the pipe adds.

Section "Keras 3 worker processes" of `benchmarks/run.py`, for keras_jax and keras_torch. Keras
on JAX or PyTorch trains in a worker process of its own (`conformance/workers.py`), which the
in-process backends do not pay for: a worker's start-up (process, imports, Keras on its backend,
once per test process), a call's round trip, and per case the time of carrying the problem and
the trajectory across the pipe. Per step, the harness (timed inside the worker) is set against a
bare `fit(x, y)` on the same model in the same worker; best of 3. Measured in this process (the
workers are the separate processes); the bare `fit` runs in the worker as
`keras_workers:keras_fit_floor`, which the worker imports from this folder (on `sys.path` when
run as `python benchmarks/run.py`, and passed on to the worker).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from _runner import SIZES, make_problem, steps, timed

from conformance.problem import Problem

# What the worker calls for the bare fit: it imports this module by name, from this folder.
FIT_FLOOR = "keras_workers:keras_fit_floor"

def keras_fit_floor(problem_data: dict) -> float:
    """In a Keras worker process: seconds of a bare `fit(x, y)` on the same model, no callbacks."""
    import keras

    from conformance.backends import _keras3, _keras_common

    problem = Problem.from_data(problem_data)
    with _keras_common.floatx(keras, problem.dtype):
        model = _keras_common.model(keras, problem, steps_per_execution=1,
                                    jit_compile=_keras3.JIT_COMPILE[keras.backend.backend()])
        started = time.perf_counter()
        model.fit(problem.x, problem.y.reshape(-1, 1), batch_size=problem.batch_size, epochs=problem.epochs,
                  verbose=0, shuffle=False)
        return time.perf_counter() - started


def measure_workers() -> list[dict]:
    """keras_jax and keras_torch: a worker's start-up (process, imports, setup), a call's round
    trip, and per step the harness (time inside the worker) against a bare `fit` there, with what
    carrying the problem and trajectory across the pipe adds."""
    from conformance import workers
    from conformance.backends import _keras3

    rows = []
    for framework in ("jax", "torch"):
        kind = _keras3.worker_kind(framework)
        started = time.perf_counter()
        workers.POOL.worker(kind)
        start_s = time.perf_counter() - started
        round_trips = [timed(workers.POOL.call, kind, "os:getpid") for _ in range(50)]
        here = str(Path(__file__).resolve().parent)
        row = {"backend": f"keras_{framework}", "start_s": start_s, "round_trip_ms": 1e3 * min(round_trips),
               "sizes": {}}
        _keras3.train(framework, make_problem(6, 1, 6, 3), "cpu")  # first compile of the step functions
        for size in ("small", "medium"):
            problem = make_problem(*SIZES[size])
            runs = []
            for _ in range(3):
                started = time.perf_counter()
                info = _keras3.train(framework, problem, "cpu").info
                wall = time.perf_counter() - started
                floor = workers.POOL.call(kind, FIT_FLOOR, problem.to_data()) if here in sys.path \
                    else float("nan")
                runs.append((info["seconds_in_worker"], wall - info["seconds_in_worker"], floor))
            harness, carried, floor = min(runs)
            row["sizes"][size] = {"steps": steps(problem), "harness_ms": 1e3 * harness / steps(problem),
                                  "floor_ms": 1e3 * floor / steps(problem), "carried_ms": 1e3 * carried}
        rows.append(row)
    workers.POOL.stop_all()
    return rows


def print_section() -> None:
    """Measure both workers, then print the table."""
    print("\nKeras 3 worker processes: start-up (process, imports, Keras on its backend), a call's round trip; "
          "per step the harness (inside the worker) vs a bare fit(x, y) there, and what carrying the problem "
          "and trajectory across the pipe adds per case")
    print(f"{'backend':12} {'start s':>8} {'call ms':>8} {'size':7} {'steps':>6} {'harness ms/step':>16} "
          f"{'floor ms/step':>14} {'ratio':>6} {'carried ms':>11}")
    for row in measure_workers():
        for size, numbers in row["sizes"].items():
            print(f"{row['backend']:12} {row['start_s']:8.2f} {row['round_trip_ms']:8.3f} {size:7} "
                  f"{numbers['steps']:6d} {numbers['harness_ms']:16.3f} {numbers['floor_ms']:14.3f} "
                  f"{numbers['harness_ms'] / numbers['floor_ms']:6.2f} {numbers['carried_ms']:11.2f}")
