"""The rounding bands every check derives its tolerances from: a few replays perturbed by each
dtype's unit roundoff (`reference.replay` with a rounding stream) show how far rounding alone can
move the training; the band at the end (`rounding_band`) and at every epoch (`trajectory_bands`)
is a fixed multiple of that spread, at least a few units of the compute dtype (docs/tolerances.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from conformance.formulas import NONE, Switches
from conformance.problem import Problem, Trajectory
from conformance.reference import UNIT_ROUNDOFF, replay

AUTO_RUNS = 4  # perturbed replays per case
AUTO_FACTOR = 10.0  # the band is this many times the largest spread they show
AUTO_SCALE_FRACTION = 1e-3  # parameters near 0 are judged against this fraction of the largest one
AUTO_LIMIT = 1e-2  # a derived rtol above this: rounding alone moves the training too far to compare
LIMIT_UNITS = 64  # mixed precision: "too sensitive" is a derived rtol above 64 u of the compute dtype
MIXED_SCALE_FRACTION = 0.1  # mixed precision: values below this fraction of the largest are judged by atol
TRAJECTORY_WINDOW = 2  # the per-epoch band is the widest of this many epochs either side


@dataclass
class RoundingSpread:
    """How far rounding alone moves one training: for each value, the largest distance of
    AUTO_RUNS perturbed float64 replays from the unperturbed one (see `rounding_spread`)."""

    params: np.ndarray  # (epochs, P): every epoch's parameters, on the case's own features
    loss: np.ndarray  # (epochs,): every epoch's training loss
    predictions: np.ndarray  # (K,): the final `predict` outputs (empty without `predict`)
    unit: float  # the training dtype's unit roundoff
    compute_unit: float = 0.0  # the compute dtype's (the training dtype's without mixed precision)
    decisions_vary_from: int | None = None  # the first epoch (from 0) where a perturbed replay's
    # loss-scale decisions differ: from there on, rounding alone can flip a skip

    @property
    def limit(self) -> float:
        return auto_limit(self.compute_unit)

    @property
    def scale_fraction(self) -> float:
        """Values below this fraction of the largest are judged by atol: AUTO_SCALE_FRACTION, or
        under mixed precision MIXED_SCALE_FRACTION: rounding to the compute dtype moves every
        parameter by about u times the largest value it meets (measured: 0.4 u x the largest
        parameter for a float16 tanh layer, the small ones included), so a small parameter's
        relative spread says nothing about the framework."""
        return AUTO_SCALE_FRACTION if self.compute_unit <= self.unit else MIXED_SCALE_FRACTION


def auto_limit(compute_unit: float) -> float:
    """The widest derived rtol still compared: AUTO_LIMIT, or under mixed precision LIMIT_UNITS
    of the compute dtype's u (bfloat16: 0.0625), whose outputs carry only two or three digits:
    a band of a few bfloat16 units is what an honest port shows there, not a chaotic run."""
    return max(AUTO_LIMIT, LIMIT_UNITS * compute_unit)


def rounding_spread(problem: Problem, unperturbed: Trajectory,
                    to_original: Callable[[np.ndarray], np.ndarray], switches: Switches = NONE) -> RoundingSpread:
    """The Monte Carlo arithmetic experiment behind `auto` bands, run once per case.

    AUTO_RUNS replays of the same training in float64, each with every step perturbed by
    random relative errors the size of the training dtype's unit roundoff
    (`replay(problem, rounding=...)`), kept at every epoch: the parity band reads the last
    epoch, the trajectory band every epoch.
    """
    params = np.zeros_like(unperturbed.params)
    loss = np.zeros_like(unperturbed.loss)
    predictions = np.zeros_like(_predictions(unperturbed))
    decisions_vary_from = None
    with np.errstate(invalid="ignore"):
        for seed in range(AUTO_RUNS):
            perturbed = replay(problem, rounding=np.random.default_rng(seed), switches=switches)
            perturbed.params = to_original(perturbed.params)
            params = np.maximum(params, np.abs(perturbed.params - unperturbed.params))
            loss = np.maximum(loss, np.abs(perturbed.loss - unperturbed.loss))
            predictions = np.maximum(predictions, np.abs(_predictions(perturbed) - _predictions(unperturbed)))
            varied = _first_decision_apart(perturbed, unperturbed)
            if varied is not None:
                decisions_vary_from = varied if decisions_vary_from is None else min(decisions_vary_from, varied)
    return RoundingSpread(params, loss, predictions, UNIT_ROUNDOFF[problem.dtype],
                          UNIT_ROUNDOFF[problem.compute_dtype], decisions_vary_from)


def _first_decision_apart(one: Trajectory, other: Trajectory) -> int | None:
    """The first epoch (from 0) whose loss scale or skipped steps differ between two replays."""
    if one.loss_scale is None or other.loss_scale is None:
        return None
    apart = (one.loss_scale != other.loss_scale) | (one.skipped != other.skipped)
    return int(np.argmax(apart)) if apart.any() else None


def band_from_spread(values: np.ndarray, spread: np.ndarray, unit: float, factor: float = AUTO_FACTOR,
                     floor: float = AUTO_SCALE_FRACTION) -> tuple[float, float, float] | None:
    """(rtol, atol, relative spread) of the band around `values` that holds `factor` times the
    spread everywhere, or None when no value is finite.

    With F = factor, scale = the largest |value| and floor = AUTO_SCALE_FRACTION * scale:
    rtol = F * max s_j / |v_j| over the values above the floor (at least 4 u), and
    atol = F * max over all values of (s_j - rtol / F * |v_j|), or 0, so that
    atol + rtol |v_j| >= F * s_j for every value. Values near 0 (a prediction that cancels, a
    parameter through zero) set atol and leave rtol to the others.
    """
    finite = np.isfinite(values) & np.isfinite(spread)
    if not finite.any():
        return None
    values, spread = np.abs(values[finite]), spread[finite]
    large = values > floor * (float(np.max(values)) or 1.0)
    relative = float(np.max(spread[large] / values[large])) if large.any() else 0.0
    rtol = max(factor * relative, 4 * unit)
    atol = factor * max(0.0, float(np.max(spread - rtol / factor * values)))
    return rtol, atol, relative


def rounding_band(problem: Problem, unperturbed: Trajectory,
                  to_original: Callable[[np.ndarray], np.ndarray],
                  spread: RoundingSpread | None = None) -> dict[str, Any]:
    """`tolerance.parity: auto`: the parity band this case's training allows from rounding alone.

    The spread s_j of the final parameters and predictions over the perturbed replays
    (`rounding_spread`), made a band by `band_from_spread`: ten times what rounding was seen to
    do, everywhere. Assumptions: a framework rounds each operation about as the model does (a
    few units in the last place; sums within sqrt(m) u), and the four runs see the sensitivity
    that matters. A real difference smaller than ten rounding spreads is not separated from
    rounding.
    """
    spread = spread or rounding_spread(problem, unperturbed, to_original)
    final_spread = np.concatenate([spread.params[-1], spread.predictions])
    band = band_from_spread(_final_values(unperturbed), final_spread, spread.unit, floor=spread.scale_fraction)
    if band is None:
        return {"rtol": None, "atol": None, "method": "no finite replay to measure rounding on"}
    rtol, atol, relative = band
    finite = final_spread[np.isfinite(final_spread)]
    return {"rtol": rtol, "atol": atol, "spread_relative": relative,
            "spread_max": float(np.max(finite)) if finite.size else 0.0, "runs": AUTO_RUNS, "factor": AUTO_FACTOR,
            "unit_roundoff": spread.unit, "limit": spread.limit,
            "method": f"{AUTO_FACTOR:g} x the largest spread of {AUTO_RUNS} float64 replays with every step "
                      f"perturbed by the {problem.dtype} unit roundoff" +
                      (f" ({problem.compute_dtype}'s in the forward and backward pass)" if problem.precision else "")}


@dataclass
class EpochBands:
    """A band per epoch, for parameters and for the training loss; `comparable` epochs (from
    the first) are those before rounding alone moves the training by more than AUTO_LIMIT."""

    rtol: np.ndarray
    atol: np.ndarray
    loss_rtol: np.ndarray
    loss_atol: np.ndarray
    comparable: int
    method: str
    limit: float = AUTO_LIMIT

    def at(self, epoch: int) -> tuple[float, float]:
        """(rtol, atol) of the parameters' band at this 0-based epoch."""
        return float(self.rtol[epoch]), float(self.atol[epoch])


def trajectory_bands(unperturbed: Trajectory, spread: RoundingSpread, window: int = TRAJECTORY_WINDOW) -> EpochBands:
    """`tolerance.trajectory: auto`: the band at every epoch, from the rounding spread there.

    Each epoch's parameters get the parity construction (`band_from_spread`) on that epoch's
    values and spread, and so does its loss (with an atol floor of F u times the first epoch's
    loss: a loss that falls to rounding level has no relative digits left). The band at epoch e
    holds what rounding did up to that epoch: the widest of epochs 1 .. e + window. The spread
    of one epoch over AUTO_RUNS runs is a small sample, and a band that dips where the runs
    happened to agree would fail honest frameworks (measured: 0.8 of a per-epoch band).
    """
    epochs = len(unperturbed.params)
    rtol, atol, loss_rtol, loss_atol = (np.full(epochs, np.inf) for _ in range(4))
    loss_floor = AUTO_FACTOR * max(spread.unit, spread.compute_unit) * abs(float(unperturbed.loss[0])) \
        if epochs else 0.0
    for epoch in range(epochs):
        band = band_from_spread(unperturbed.params[epoch], spread.params[epoch], spread.unit,
                                floor=spread.scale_fraction)
        if band is not None:
            rtol[epoch], atol[epoch], _ = band
        band = band_from_spread(unperturbed.loss[epoch:epoch + 1], spread.loss[epoch:epoch + 1], spread.unit)
        if band is not None:
            loss_rtol[epoch], loss_atol[epoch] = band[0], max(band[1], loss_floor)
    widest = [np.maximum.accumulate(_window_max(values, window)) if epochs else values
              for values in (rtol, atol, loss_rtol, loss_atol)]
    # beyond the limit: a relative band past it, or an absolute one past it times the parameters'
    # scale over the same epochs as the band (a parameter at 0 that rounding alone moves as far
    # as the others are large; the window's later epochs too, or parameters still at their zero
    # init, every step so far skipped, would have no scale for the band those epochs lend them)
    scale = np.maximum.accumulate(_window_max(np.nan_to_num(np.max(np.abs(unperturbed.params), axis=1,
                                                                   initial=0.0)), window)) \
        if epochs else np.zeros(0)
    beyond = np.flatnonzero(~(widest[0] <= spread.limit) | ~(widest[1] <= spread.limit * scale))
    comparable = int(beyond[0]) if beyond.size else epochs
    return EpochBands(*widest, comparable=comparable, limit=spread.limit,
                      method=f"per epoch: {AUTO_FACTOR:g} x the largest spread of {AUTO_RUNS} perturbed float64 "
                             f"replays, the widest up to that epoch (+{window})")


def _window_max(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 0 or values.size == 0:
        return values
    padded = np.pad(values, window, mode="edge")
    return np.lib.stride_tricks.sliding_window_view(padded, 2 * window + 1).max(axis=1)


def _predictions(trajectory: Trajectory) -> np.ndarray:
    return np.asarray([] if trajectory.predictions is None else trajectory.predictions, dtype=np.float64)


def _final_values(trajectory: Trajectory) -> np.ndarray:
    """The values the parity check compares: final parameters, then `predict` outputs."""
    return np.concatenate([trajectory.params[-1], _predictions(trajectory)])
