"""Tolerance checks and the one shape every mismatch is reported in.

    weights[0]=0.6098 (keras, cpu), but should be 0.6818 ± 1.0e-05 (float64 replay) [case x, epoch 500]

`|a - b| <= atol + rtol * |b|` elementwise, b being the reference side; a derived band may
name a larger magnitude per value (`magnitude`: the largest |b| along the path, see
`path_magnitude`), which then stands for |b|.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from conformance.schema import Tol


@dataclass(frozen=True)
class Mismatch:
    """The worst element of a comparison that exceeded its tolerance."""

    label: str
    got: float
    expected: float
    allowed: float
    count: int

    def describe(self, who: str, against: str, where: str) -> str:
        others = f"; {self.count - 1} more value(s) out of tolerance" if self.count > 1 else ""
        return (f"{self.label}={self.got:.10g} ({who}), but should be {self.expected:.10g} "
                f"± {self.allowed:.1e} ({against}) [{where}]{others}")


def allowed(reference: np.ndarray, tol: Tol, magnitude: np.ndarray | None = None) -> np.ndarray:
    scale = np.abs(reference) if magnitude is None else np.maximum(np.abs(reference), magnitude)
    return tol.atol + tol.rtol * scale


def path_magnitude(params: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
    """Per epoch and parameter, the largest |value| so far, from the initial value `start` on:
    what a derived band's relative part is of. A parameter is a running sum of its updates,
    p' = p + s, whose rounding is of its terms, |p| and |s| <= |p| + |p'|, not of its result;
    a parameter that shrinks toward 0 keeps that absolute error (fuzz-90417-42: a kernel entry
    from 0.106 to 9.8e-5 carried 2.2e-7 from its way down), its first step included
    (fuzz-73517-127: RMSprop's first step of 0.0508 from 0.0527 to 0.0019, 1e-17 off in float64)."""
    magnitude = np.abs(np.asarray(params, dtype=np.float64))
    if start is not None:
        magnitude = np.maximum(magnitude, np.abs(np.asarray(start, dtype=np.float64)))
    return np.maximum.accumulate(magnitude, axis=0)


def worst_mismatch(got: np.ndarray, reference: np.ndarray, tol: Tol, labels: list[str],
                   magnitude: np.ndarray | None = None) -> Mismatch | None:
    """None when every element is within tolerance; else the element furthest outside it."""
    got, reference = np.asarray(got, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    limit = allowed(reference, tol, magnitude)
    with np.errstate(invalid="ignore", divide="ignore"):
        excess = np.abs(got - reference) / np.where(limit > 0, limit, np.finfo(float).tiny)
    bad = ~(np.abs(got - reference) <= limit)
    if not bad.any():
        return None
    index = int(np.nanargmax(np.where(bad, np.nan_to_num(excess, nan=np.inf), -1.0)))
    return Mismatch(labels[index], float(got[index]), float(reference[index]), float(limit[index]), int(bad.sum()))


def first_epoch_outside(trajectory: np.ndarray, reference: np.ndarray, tol: Tol) -> int | None:
    """1-based epoch at which a trajectory first left the tolerance band around the reference's."""
    outside = ~(np.abs(trajectory - reference) <= allowed(reference, tol)).all(axis=1)
    return int(np.argmax(outside)) + 1 if outside.any() else None


def max_relative_difference(got: np.ndarray, reference: np.ndarray) -> float:
    """max |a - b| / max(|b|, tiny): one number per comparison, for the report's matrix."""
    got, reference = np.asarray(got, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    scale = np.maximum(np.abs(reference), np.finfo(float).tiny)
    with np.errstate(invalid="ignore"):
        return float(np.max(np.abs(got - reference) / scale))


def distance_per_epoch(trajectory: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """max over parameters of |a - b| at each epoch: how far a backend drifts from the replay."""
    with np.errstate(invalid="ignore"):
        return np.max(np.abs(trajectory - reference), axis=1)


def settled_epoch(trajectory: np.ndarray, rtol: float = 1e-9) -> int | None:
    """1-based epoch from which every later epoch's parameters are within rtol of the final
    ones (a run that had converged before its end); None when they never are."""
    final = trajectory[-1]
    with np.errstate(invalid="ignore"):
        inside = (np.abs(trajectory - final) <= rtol * np.maximum(np.abs(final), 1e-300)).all(axis=1)
    if not np.isfinite(final).all() or not inside[-1]:
        return None
    outside = np.flatnonzero(~inside)
    return int(outside[-1]) + 2 if outside.size else 1
