"""Per step, the harness against each framework's bare loop; the references' share; import and memory.

Sections "Per step", "References" and "Import and memory per process" of `benchmarks/run.py`,
for the v1 backends (keras, gradient_tape, torch) and jax. The training arithmetic here is tiny,
so nearly all time is framework overhead, and the question is whether the suite adds its own:
each backend's `train` is timed next to the fastest bare loop its framework offers (nothing
recorded), in the same process, alternating, best of 5 (2 for "large"). The same child process
also times the float64 references and reads its peak memory on the large case, so all three
tables come from one process per backend (`run.py --one BACKEND`).
"""

from __future__ import annotations

import resource
import time

import numpy as np
from _runner import BACKENDS, OTHERS, SIZES, in_child, make_problem, steps, timed
from floors import FLOORS


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_backend(backend: str) -> dict:
    """In this process: import cost, per-size harness and floor times, references, peak memory."""
    from conformance import backends
    from conformance.backends import _frameworks
    from conformance.fits import least_squares
    from conformance.reference import replay

    started = time.perf_counter()
    {"torch": _frameworks.torch, "jax": _frameworks.jax}.get(backend, _frameworks.tensorflow)()
    module = backends.load(backend)
    result = {"backend": backend, "import_s": time.perf_counter() - started, "sizes": {}}
    warm = make_problem(6, 1, 6, 3)
    module.train(warm, "cpu"), FLOORS[backend](warm)  # first-use costs (tracing caches, thread pools)
    before_large = rss_mb()
    for size, shape in SIZES.items():
        problem = make_problem(*shape)
        # Best of 5, harness and floor alternating, so that a noisy spell on this shared machine
        # hits both sides alike.
        times = [(timed(module.train, problem, "cpu"), timed(FLOORS[backend], problem))
                 for _ in range(2 if size == "large" else 5)]
        harness, floor = (min(column) for column in zip(*times))
        references = timed(replay, problem) + timed(least_squares, problem.x.astype(np.float64),
                                                    problem.y.astype(np.float64), True)
        result["sizes"][size] = {"steps": steps(problem), "harness_s": harness, "floor_s": floor,
                                 "references_s": references}
        if size == "large":
            result["peak_rss_above_frameworks_mb"] = rss_mb() - before_large
            result["data_mb"] = (problem.x.nbytes + problem.y.nbytes) / 2**20
    return result


def print_section() -> None:
    """Measure each backend in its own child process, then print the three tables."""
    results = [in_child("--one", backend) for backend in BACKENDS + OTHERS]
    print("Per step: harness (conformance backend, recording every epoch) vs the bare framework loop, same process")
    print(f"{'backend':14} {'size':7} {'steps':>6} {'harness ms/step':>16} {'floor ms/step':>14} {'ratio':>6}")
    for result in results:
        for size, row in result["sizes"].items():
            print(f"{result['backend']:14} {size:7} {row['steps']:6d} {1e3 * row['harness_s'] / row['steps']:16.3f} "
                  f"{1e3 * row['floor_s'] / row['steps']:14.3f} {row['harness_s'] / row['floor_s']:6.2f}")
    print("\nReferences (float64 replay + least squares) against the case's time (every measured backend's "
          "training + references)")
    for size in SIZES:
        training = sum(result["sizes"][size]["harness_s"] for result in results)
        references = min(result["sizes"][size]["references_s"] for result in results)  # same work in each process
        print(f"  {size:7}: references {references:7.3f} s, training {training:7.3f} s, "
              f"share {references / (training + references):6.1%}")
    print("\nImport and memory per process (large case: 10^6 x 10 float32, data "
          f"{results[0]['data_mb']:.0f} MB)")
    for result in results:
        print(f"{result['backend']:14} import {result['import_s']:5.1f} s   peak RSS above frameworks "
              f"{result['peak_rss_above_frameworks_mb']:7.0f} MB")
