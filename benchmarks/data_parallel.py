"""Per step with data-parallel replicas: each backend's cost with 2 and 3 replicas against one.

Section "Data parallelism" of `benchmarks/run.py` (also `python benchmarks/data_parallel.py [BACKEND ...]`).
One problem (96 samples, one feature, batches of 12: even shards for 2 and 3 replicas, so that
every backend can run it) is trained through each backend's `train` with 1, 2 and 3 replicas,
alternating, best of 3, after a first run of each that starts the backend's process groups or
workers (paid once per run, reported apart). On a machine with 2 cores, R replicas share the same
cores: the ratio is what the framework's coordination costs per step (all-reduce, per-replica
dispatch), not a speed-up.
"""

from __future__ import annotations

import dataclasses
import sys
import time

from _runner import make_problem, steps, timed

from conformance import backends

REPLICAS = (1, 2, 3)
DATA_PARALLEL_BACKENDS = ("torch", "keras", "gradient_tape", "jax", "keras_jax")


def measure(backend: str) -> dict[str, float]:
    """ms per step for each replica count, and the seconds of the first (start-up) runs."""
    train = backends.load(backend).train
    problem = make_problem(96, 1, 12, 20)
    variants = {replicas: dataclasses.replace(problem, replicas=replicas) for replicas in REPLICAS}
    started = time.perf_counter()
    for variant in variants.values():
        train(variant, "cpu")  # start-up: process groups, workers, compilation
    found = {"startup_s": time.perf_counter() - started}
    best = dict.fromkeys(REPLICAS, float("inf"))
    for _ in range(3):
        for replicas, variant in variants.items():
            best[replicas] = min(best[replicas], timed(train, variant, "cpu"))
    for replicas in REPLICAS:
        found[f"r{replicas}"] = 1e3 * best[replicas] / steps(problem)
    return found


def print_section(chosen: list[str] | None = None) -> None:
    print("\n## Data parallelism: ms per step with R replicas, against one (2 cores)\n")
    print("| backend | 1 replica | 2 replicas | ratio | 3 replicas | ratio | start-up, s |")
    print("|---|---|---|---|---|---|---|")
    for backend in chosen or DATA_PARALLEL_BACKENDS:
        if backends.load(backend).available():
            continue
        row = measure(backend)
        print(f"| {backend} | {row['r1']:.3f} | {row['r2']:.3f} | {row['r2'] / row['r1']:.1f} | {row['r3']:.3f} | "
              f"{row['r3'] / row['r1']:.1f} | {row['startup_s']:.1f} |", flush=True)


if __name__ == "__main__":
    print_section(sys.argv[1:] or None)
