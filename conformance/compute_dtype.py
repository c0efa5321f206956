"""The compute dtype's arithmetic as the replay models it under mixed precision: rounding to
float16 or bfloat16 (`rounder`), the loss scale's rule (`LossScaler`), and the replicas' gradients
all-reduced in the compute dtype (`replica_sum_finite`, the switch replica_sum_in_compute_dtype)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def rounder(dtype: str) -> Callable[[np.ndarray], np.ndarray] | None:
    """Rounding of float64 values to a compute dtype (nearest even, through float32 as the
    frameworks' float32 accumulators are rounded), back as float64; None for float32/float64.
    float16 overflows to infinity past 65504, as the frameworks' casts do."""
    if dtype not in ("bfloat16", "float16"):
        return None
    import ml_dtypes  # ships with JAX and TensorFlow

    target = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16

    def rd(values: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):
            return np.asarray(values, dtype=np.float64).astype(np.float32).astype(target).astype(np.float64)

    return rd


class LossScaler:
    """The loss scale of a step and its dynamic rule, as Keras 3's LossScaleOptimizer and torch's
    GradScaler run it: after `growth_interval` consecutive finite steps the scale doubles; a
    non-finite gradient halves it and the step is skipped (no update, no optimizer count, no
    schedule count). A fixed scale never changes and never skips."""

    def __init__(self, loss_scale: dict[str, Any] | None) -> None:
        self.kind = None if loss_scale is None else loss_scale["kind"]
        self.scale = 1.0 if loss_scale is None else float(loss_scale.get("scale", loss_scale.get("initial")))
        self.interval = 0 if loss_scale is None else int(loss_scale.get("growth_interval", 0))
        self.good = 0

    def skips(self, finite: bool) -> bool:
        """Record one step's gradient; whether the step is skipped."""
        if self.kind != "dynamic":
            return False
        if not finite:
            self.scale, self.good = self.scale * 0.5, 0
            return True
        self.good += 1
        if self.good == self.interval:
            self.scale, self.good = self.scale * 2.0, 0
        return False


def replica_sum_finite(rd: Callable[[np.ndarray], np.ndarray], scale: float, shares: list[float],
                        parts: list[tuple], inside: bool) -> bool:
    """Whether the replicas' scaled gradients, all-reduced in the compute dtype (switch
    replica_sum_in_compute_dtype), stay finite: each replica's is rounded to it first (its own
    backward's result), then their sum (two replicas: one rounding, in no order but one)."""
    scaled = [rd(scale * (share if inside else 1.0) * part[1]) for share, part in zip(shares, parts)]
    return bool(np.isfinite(rd(sum(scaled))).all())
