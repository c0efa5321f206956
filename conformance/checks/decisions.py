"""Loss-scale decisions: where a result's scale or skipped steps first differ from its replay's,
and whether rounding in the compute dtype can flip that decision (then what follows it is not
comparable: the parity and trajectory checks both read this).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from conformance import rounding_bands
from conformance.problem import Trajectory


def decision_within_rounding(scaling: dict[str, Any], replay: Trajectory, spread: rounding_bands.RoundingSpread,
                              comparable: int) -> bool:
    """Whether the first loss-scale decision that differs from the replay's (`scaling_apart`) is
    one rounding in the compute dtype can flip: a perturbed replay decided otherwise by then, a
    gradient sum of the epoch could overflow in another order of summation (`overflow_possible`),
    or it is an overflow (a skipped step) made from parameters rounding alone has already moved
    beyond comparison (past the `comparable` epochs: fuzz-27193-59, keras_torch skipping a step
    at epoch 252 of a float16 run comparable for 17). A scale that grew at another time with the
    same steps skipped is a counting decision, not an overflow, and stays a failure anywhere."""
    epoch = scaling["epoch"] - 1
    varied = spread.decisions_vary_from is not None and epoch >= spread.decisions_vary_from
    overflow_apart = "got" in scaling and scaling["got"]["skipped"] != scaling["expected"]["skipped"]
    return varied or (overflow_apart and epoch >= comparable) or (
        replay.overflow_possible is not None and bool(replay.overflow_possible[epoch]))


def scaling_apart(got: Trajectory, replay: Trajectory) -> dict[str, Any] | None:
    """Under a loss scale: the first epoch whose scale after its last step, or whose number of
    skipped steps, differs from the replay's; None when every epoch agrees. A result that
    recorded neither differs at epoch 1 (it cannot show that it scaled at all)."""
    if replay.loss_scale is None:
        return None
    if got.loss_scale is None or got.skipped is None:
        return {"epoch": 1, "message": "recorded no loss scale or skipped steps, though the case scales the loss"}
    scales, skipped = np.asarray(got.loss_scale, dtype=np.float64), np.asarray(got.skipped)
    if scales.shape != replay.loss_scale.shape or skipped.shape != replay.skipped.shape:
        return {"epoch": 1,
                "message": f"recorded {scales.size} epochs of loss scale, expected {replay.loss_scale.size}"}
    apart = (scales != replay.loss_scale) | (skipped != replay.skipped)
    if not apart.any():
        return None
    epoch = int(np.argmax(apart))
    return {"epoch": epoch + 1, "got": {"scale": float(scales[epoch]), "skipped": int(skipped[epoch])},
            "expected": {"scale": float(replay.loss_scale[epoch]), "skipped": int(replay.skipped[epoch])},
            "message": f"loss scaling first differs at epoch {epoch + 1}: scale {scales[epoch]:g} after "
                       f"{int(skipped[epoch])} skipped step(s), but should be {replay.loss_scale[epoch]:g} after "
                       f"{int(replay.skipped[epoch])} ({int(apart.sum())} epoch(s) differ)"}
