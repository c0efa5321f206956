"""What a learning-rate schedule or gradient clipping costs per step, per backend.

Section "Schedules and clipping" of `benchmarks/run.py` (also `python benchmarks/schedules.py`
alone). For each default backend, the same problem ("medium": 100 samples, batches of 8, 40
epochs, 520 SGD steps) is trained through the backend's `train` four ways, alternating, best of
3: plain, with a per-step exponential schedule, with clipping by the global norm, and with both.
The ratios to plain are what the framework's schedule and clipping calls cost (and, for Keras,
reading the rate back each epoch); Keras 3 on JAX and PyTorch are timed through their worker,
round trip included, which the ratio cancels. Measured in this process (imports paid once).
"""

from __future__ import annotations

import dataclasses
import time

from _runner import SIZES, make_problem, steps

from conformance import backends

SCHEDULE = {"kind": "exponential", "settings": {"decay_rate": 0.5, "decay_steps": 100, "staircase": False},
            "every": "step"}
CLIP = {"kind": "global_norm", "threshold": 0.5}
VARIANTS = {"plain": {}, "schedule": {"schedule": SCHEDULE}, "clip": {"clip": CLIP},
            "both": {"schedule": SCHEDULE, "clip": CLIP}}


def measure(backend: str, repeats: int = 3) -> dict[str, float]:
    """Seconds per step of each variant, best of `repeats` (after one untimed run of each)."""
    base = make_problem(*SIZES["medium"])
    problems = {name: dataclasses.replace(base, **change) for name, change in VARIANTS.items()}
    train = backends.load(backend).train
    best = {name: float("inf") for name in problems}
    for round_ in range(repeats + 1):
        for name, problem in problems.items():
            started = time.perf_counter()
            train(problem, "cpu")
            if round_:  # the first round compiles and warms up
                best[name] = min(best[name], (time.perf_counter() - started) / steps(problem))
    return best


def print_section() -> None:
    print("\n## Schedules and clipping: cost per step (medium problem, best of 3)\n")
    print("| backend | plain ms/step | schedule | clip | both |")
    print("|---|---|---|---|---|")
    for backend in backends.MODULES:
        if not backends.selected_by_default(backend) or backends.load(backend).available():
            continue
        times = measure(backend)
        ratios = " | ".join(f"{times[name] / times['plain']:.2f}x" for name in ("schedule", "clip", "both"))
        print(f"| {backend} | {1e3 * times['plain']:.3f} | {ratios} |", flush=True)


if __name__ == "__main__":
    print_section()
