"""Plain data for the report: numbers as JSON-safe floats, long curves downsampled."""

from __future__ import annotations

from typing import Any

import numpy as np

from conformance.problem import Trajectory

CURVE_POINTS = 400


def curve(trajectory: Trajectory) -> dict[str, Any]:
    """The loss and every parameter over the epochs; with a schedule, the rate of each epoch's
    last step as the framework reports it (the replay's: the case format's); with a loss scale,
    log2 of the scale after each epoch and its skipped steps."""
    drawn = {"loss": downsample(trajectory.loss), "params": [downsample(column) for column in trajectory.params.T]}
    if trajectory.rates is not None:
        drawn["rate"] = downsample(trajectory.rates)
    if trajectory.loss_scale is not None:
        drawn["loss_scale"] = downsample(np.log2(np.maximum(np.asarray(trajectory.loss_scale, dtype=np.float64),
                                                            np.finfo(np.float64).tiny)))
        drawn["skipped"] = downsample(np.asarray(trajectory.skipped, dtype=np.float64))
    return drawn


def downsample(values: np.ndarray) -> dict[str, list]:
    """At most CURVE_POINTS (epoch, value) points, always keeping the first and last epoch."""
    epochs = np.unique(np.linspace(0, len(values) - 1, min(len(values), CURVE_POINTS)).round().astype(int))
    return {"epoch": [int(e) + 1 for e in epochs], "value": floats(np.asarray(values)[epochs])}


def floats(values: Any) -> list[float | None]:
    """Every value as a float, non-finite ones as None (JSON has no NaN)."""
    return [float(value) if np.isfinite(value) else None for value in np.asarray(values, dtype=np.float64).ravel()]


def finite(value: float) -> float | None:
    """A float, or None where it is not finite (a replay that diverged: JSON has no NaN)."""
    return float(value) if np.isfinite(value) else None


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float inside it replaced by None."""
    if isinstance(value, float):
        return finite(value)
    if isinstance(value, dict):
        return {key: json_safe(inner) for key, inner in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(inner) for inner in value]
    return value


def plain(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
