"""What one case's results are checked against, computed once per process and kept.

The float64 replay, the bands derived from rounding (`auto`: parity at the end, trajectory at
every epoch, both read off one set of perturbed replays), the minimiser of the case's objective
(the `lstsq` reference) and its name, the certified values, and the data picture of the report.
The numerics live in `reference.py` (the replay), `rounding_bands.py` and `fits.py`; this
class decides which of them a case needs.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import numpy as np

from conformance import compare, environment, fits, formulas, reference, rounding_bands, timing
from conformance.case import LoadedCase
from conformance.formulas import FLOAT32_ARITHMETIC, NONE, Switches
from conformance.prepare import Prepared
from conformance.problem import Trajectory
from conformance.records import finite, floats
from conformance.schema import DEFAULT_PARITY, Tol

PICTURE_POINTS = 400  # data points drawn in the report's picture of a one-feature case


class CaseReferences:
    """The references of one case."""

    def __init__(self, case: LoadedCase, prepared: Prepared, parity_auto: bool = False) -> None:
        self.case = case
        self.prepared = prepared
        self.parity_auto = parity_auto  # --parity auto: derive every case's parity band
        self._replays: dict[Switches, Trajectory] = {}
        self._spreads: dict[Switches, rounding_bands.RoundingSpread] = {}
        self._parity_bands: dict[Switches, tuple[Tol, dict[str, Any]]] = {}

    @property
    def replay(self) -> Trajectory:
        """The case format's float64 replay."""
        return self.replay_of(NONE)

    def replay_of(self, switches: Switches) -> Trajectory:
        """The float64 replay with a framework's switches (formulas.py); NONE: the case format's."""
        if switches not in self._replays:
            with timing.phase("references"):
                trajectory = reference.replay(self.prepared.problem, switches=switches)
                trajectory.params = self.prepared.to_original(trajectory.params)
            self._replays[switches] = trajectory
        return self._replays[switches]

    @property
    def rounding(self) -> rounding_bands.RoundingSpread:
        return self.rounding_of(NONE)

    def rounding_of(self, switches: Switches) -> rounding_bands.RoundingSpread:
        """How far rounding alone moves this training, at every epoch (perturbed replays)."""
        if switches not in self._spreads:
            with timing.phase("references"):
                self._spreads[switches] = rounding_bands.rounding_spread(
                    self.prepared.problem, self.replay_of(switches), self.prepared.to_original, switches)
        return self._spreads[switches]

    def switches_of(self, backend: str) -> Switches:
        """The switches of `backend`'s own formulas on this case, with the installed versions."""
        return formulas.switches_for(self.prepared.problem, backend, environment.versions())

    def switch_sizes(self, backend: str) -> list[dict[str, Any]]:
        """Each switch of `backend` on this case with its size, computed from replays alone: the
        largest relative difference of the final parameters it makes alone, and the switched
        replay's (all of the backend's switches together) at the end."""
        base = self.replay.final
        sizes = []
        for switch in formulas.applying(self.prepared.problem, backend, environment.versions()):
            alone = self.replay_of(frozenset({switch.name})).final
            sizes.append({"name": switch.name, "reason": switch.reason.strip(), "source": switch.source,
                          "shows": switch.shows, "size": finite(compare.max_relative_difference(alone, base))})
        return sizes

    @property
    def parity_band(self) -> tuple[Tol, dict[str, Any]]:
        return self.parity_band_of(NONE)

    def parity_band_of(self, switches: Switches) -> tuple[Tol, dict[str, Any]]:
        """The parity tolerance around the replay of these switches, and how it was set for the
        report: the case's own, or derived from the case (`parity: auto`, or every case with
        --parity auto; then the hand-set one is shown beside it)."""
        own = self.case.spec.tolerance.parity
        if own != "auto" and not self.parity_auto:
            if not switches & FLOAT32_ARITHMETIC:
                return own, own.model_dump()
            derived = rounding_bands.rounding_band(self.prepared.problem, self.replay_of(switches),
                                              self.prepared.to_original, self.rounding_of(switches))
            if derived["rtol"] is None:
                return own, own.model_dump()
            widened = Tol(rtol=own.rtol + derived["rtol"], atol=own.atol + derived["atol"])
            return widened, widened.model_dump() | {"hand_set": own.model_dump(), "plus_float32_arithmetic": derived}
        if switches not in self._parity_bands:
            derived = rounding_bands.rounding_band(self.prepared.problem, self.replay_of(switches),
                                              self.prepared.to_original, self.rounding_of(switches))
            tol = DEFAULT_PARITY if derived["rtol"] is None else Tol(rtol=derived["rtol"], atol=derived["atol"])
            self._parity_bands[switches] = (tol, tol.model_dump() | {
                "auto": derived, "hand_set": None if own == "auto" else own.model_dump()})
        return self._parity_bands[switches]

    @property
    def trajectory_tolerance(self) -> Tol | str | None:
        """The case's trajectory tolerance in force (`Tolerance.along_path`); under --parity auto a
        hand-set parity tolerance that it would stand for is set aside for auto too."""
        tolerance = self.case.spec.tolerance
        if self.parity_auto and "trajectory" not in tolerance.model_fields_set:
            return "auto"
        return tolerance.along_path

    @property
    def trajectory_bands(self) -> rounding_bands.EpochBands:
        return self.trajectory_bands_of(NONE)

    def trajectory_bands_of(self, switches: Switches) -> rounding_bands.EpochBands:
        """The trajectory band at every epoch: derived (`auto`, the default) or the case's own."""
        own = self.trajectory_tolerance
        replay = self.replay_of(switches)
        epochs = len(replay.params)
        if isinstance(own, Tol):
            rtol, atol = np.full(epochs, own.rtol), np.full(epochs, own.atol)
            if not switches & FLOAT32_ARITHMETIC:
                return rounding_bands.EpochBands(rtol, atol, rtol, atol, epochs,
                                                 "the case's own tolerance at every epoch")
            # the switches' float32 arithmetic
            derived = rounding_bands.trajectory_bands(replay, self.rounding_of(switches))
            return rounding_bands.EpochBands(rtol + derived.rtol, atol + derived.atol, rtol + derived.loss_rtol,
                                             atol + derived.loss_atol, epochs,
                                             "the case's own tolerance plus the derived band of the formulas' "
                                             "float32 arithmetic at every epoch")
        return rounding_bands.trajectory_bands(replay, self.rounding_of(switches))

    @property
    def too_sensitive(self) -> str | None:
        """Why parity cannot be judged, when a derived band is wider than rounding_bands.AUTO_LIMIT:
        rounding alone then moves the training that far (a chaotic run), and no band separates
        a framework difference from it."""
        _, described = self.parity_band
        derived = described.get("auto") or {}
        limit = derived.get("limit", rounding_bands.AUTO_LIMIT)
        if derived.get("rtol") is not None and derived["rtol"] > limit:
            return (f"rounding alone moves this training by {derived['spread_relative']:.1e} relative "
                    f"(derived parity rtol {derived['rtol']:.1e} > {limit:g}): too sensitive to "
                    f"compare frameworks [case {self.case.name}]")
        if derived.get("rtol") is not None and self.trajectory_tolerance == "auto":
            # rounding alone moved the path that far at some epoch: where it ends depends on
            # which way rounding went there, even if the perturbed runs happened to meet again
            # (Adagrad normalising a bias gradient that cancels to rounding level)
            bands = self.trajectory_bands
            if bands.comparable < len(bands.rtol):
                return (f"rounding alone moves this training beyond {bands.limit:g} relative at epoch "
                        f"{bands.comparable + 1} (derived trajectory band there: rtol "
                        f"{bands.rtol[bands.comparable]:.1e}, atol {bands.atol[bands.comparable]:.1e}): "
                        f"where it ends depends on rounding there; too sensitive to compare frameworks "
                        f"[case {self.case.name}]")
        return None

    @cached_property
    def objective_fit(self) -> tuple[np.ndarray | None, str | None]:
        """The `lstsq` reference, the minimiser of the case's objective, or why there is none:
        least squares (weighted with sample weights); the ridge solution when SGD has weight
        decay; scipy's Huber fit; the logistic maximum-likelihood fit for `bce`."""
        prepared, problem = self.prepared, self.prepared.problem
        if problem.hidden:
            return None, "a model with hidden layers has no closed-form optimum"
        with timing.phase("references"):
            try:
                if self.has_weight_decay:  # on the trained features, with the decay's penalty
                    weights, penalty = fits.decay_objective(problem)
                    x, y = problem.x.astype(np.float64), problem.y.astype(np.float64)
                    if problem.loss == "huber":
                        fit = fits.huber_fit(x, y, problem.has_bias, problem.delta, weights, penalty)
                    elif problem.loss == "bce":
                        fit = fits.logistic_fit(x, y, problem.has_bias, weights, penalty)
                    else:
                        fit = fits.ridge(problem)
                    return prepared.to_original(fit), None
                x, y, weights = prepared.x_design, prepared.y, prepared.sample_weight
                if problem.loss == "huber":
                    return fits.huber_fit(x, y, problem.has_bias, problem.delta, weights), None
                if problem.loss == "bce":
                    return fits.logistic_fit(x, y, problem.has_bias, weights), None
                if weights is not None:
                    return fits.weighted_least_squares(x, y, problem.has_bias, weights), None
            except fits.NoFiniteFit as reason:
                return None, str(reason)
        return self.ordinary_least_squares, None

    @property
    def least_squares(self) -> np.ndarray | None:
        return self.objective_fit[0]

    @cached_property
    def ordinary_least_squares(self) -> np.ndarray:
        """Least squares of the case's data: what certified values are checked against."""
        with timing.phase("references"):
            return fits.least_squares(self.prepared.x_design, self.prepared.y, self.prepared.problem.has_bias)

    @property
    def has_weight_decay(self) -> bool:
        return bool(self.prepared.problem.optimizer.settings.get("weight_decay"))

    @property
    def least_squares_name(self) -> str:
        """How the `lstsq` reference was computed, as messages and the report name it."""
        problem = self.prepared.problem
        if problem.hidden:
            return "no objective fit (hidden layers)"
        decay = " (weight decay)" if self.has_weight_decay else ""
        if problem.loss == "huber":
            return "scipy Huber" + decay
        if problem.loss == "bce":
            return "scipy logistic maximum likelihood" + decay
        method = fits.least_squares_method(len(self.prepared.y), problem.features + problem.has_bias)
        if self.has_weight_decay:
            return method.replace("least squares", "ridge (weight decay)")
        return method.replace("least squares", "weighted least squares") if self.prepared.sample_weight is not None \
            else method

    @cached_property
    def certified_params(self) -> np.ndarray:
        certified = self.case.spec.certified
        return np.asarray(certified.weights + ([certified.bias] if certified.bias is not None else []))

    @cached_property
    def data_picture(self) -> dict[str, Any] | None:
        """For a case with one feature (before any polynomial expansion): the data (at most
        PICTURE_POINTS samples, evenly spaced in file order), how to draw a fitted model over
        it, and the reference fit, for the report's picture of the data and every fit."""
        prepared, problem = self.prepared, self.prepared.problem
        degree = self.case.spec.preprocess.polynomial or 1
        if degree == 1 and prepared.x_design.shape[1] != 1:
            return None
        rows = np.unique(np.linspace(0, len(prepared.y) - 1, min(len(prepared.y), PICTURE_POINTS)).astype(int))
        weights = prepared.sample_weight
        reference_fit = self.least_squares
        picture = {"x": floats(prepared.x_design[rows, 0]), "y": floats(prepared.y[rows]),
                   "weights": None if weights is None else floats(weights[rows]), "degree": degree,
                   "has_bias": problem.has_bias, "sigmoid": problem.loss == "bce",
                   "reference": None if reference_fit is None else {"name": self.least_squares_name,
                                                                    "params": floats(reference_fit)}}
        if problem.hidden:  # the report evaluates the network on the features as trained
            standardizer = prepared.standardizer
            picture["network"] = {"hidden": problem.hidden, "features": problem.features,
                                  "mean": None if standardizer is None else floats(standardizer.mean),
                                  "scale": None if standardizer is None else floats(standardizer.scale)}
        return picture
