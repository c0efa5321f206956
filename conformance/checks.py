"""The checks of one case, run inside a test item; results are cached once per process.

A `CaseRun` holds a case's prepared problem, its references (replay, least squares) and the
training results of its backends. Items of one case are scheduled onto one worker (see
plugin.py), so each result is trained once; an item that needs a result its process has not
trained (another item ran elsewhere, or was deselected) trains it itself, so pairwise
comparisons are complete under any scheduling.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from conformance import backends, compare, reference, timing, workers
from conformance.case import LoadedCase
from conformance.problem import Prepared, Trajectory, prepare
from conformance.schema import DEFAULT_PARITY, Expect, Tol

CURVE_POINTS = 400
PICTURE_POINTS = 400  # data points drawn in the report's picture of a one-feature case


@dataclass
class Outcome:
    """What a check found: passed or not, the message, and plain data for the report."""

    passed: bool
    message: str
    record: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False  # the check had nothing to compare: neither a pass nor a failure


@dataclass
class Trained:
    """One backend's result on one device, parameters on the case's own features."""

    backend: str
    device: str
    trajectory: Trajectory | None
    seconds: float
    error: str | None = None
    repeat: dict[str, Any] | None = None  # with --determinism: how a second training compared
    unavailable: str | None = None  # the backend could not run here after all (backends.Unavailable)
    process_died: bool = False  # the error is the death of the worker process that trained it

    @property
    def label(self) -> str:
        return f"{self.backend}, {self.device}"


class TrainingCrashed(RuntimeError):
    """A backend raised while training: an error with its traceback, not a mismatch.
    process_died: the backend's worker process died (the item is reported as crashed)."""

    def __init__(self, message: str, process_died: bool = False) -> None:
        super().__init__(message)
        self.process_died = process_died


class CaseRun:
    """Everything one process knows about one case."""

    def __init__(self, case: LoadedCase, prepared: Prepared, pairs: list[tuple[str, str]],
                 repeat: bool = False, parity_auto: bool = False, known: Any = None) -> None:
        self.case = case
        self.prepared = prepared
        self.pairs = pairs  # every (backend, device) of this case in this run
        self.repeat = repeat  # train every result twice and demand bit-identical results
        self.results: dict[tuple[str, str], Trained] = {}
        self.parity_auto = parity_auto  # --parity auto: derive every case's parity band
        self.known = known  # the run's expectations file (conformance.expectations), if any

    @property
    def where(self) -> str:
        return f"case {self.case.name}, epoch {self.prepared.problem.epochs}"

    @cached_property
    def replay(self) -> Trajectory:
        with timing.phase("references"):
            trajectory = reference.replay(self.prepared.problem)
            trajectory.params = self.prepared.to_original(trajectory.params)
        return trajectory

    @cached_property
    def parity_band(self) -> tuple[Tol, dict[str, Any]]:
        """The parity tolerance, and how it was set for the report: the case's own, or derived
        from the case (`parity: auto`, or every case with --parity auto; then the hand-set one is
        shown beside it)."""
        own = self.case.spec.tolerance.parity
        if own != "auto" and not self.parity_auto:
            return own, own.model_dump()
        with timing.phase("references"):
            derived = reference.rounding_band(self.prepared.problem, self.replay, self.prepared.to_original)
        tol = DEFAULT_PARITY if derived["rtol"] is None else Tol(rtol=derived["rtol"], atol=derived["atol"])
        return tol, tol.model_dump() | {"auto": derived, "hand_set": None if own == "auto" else own.model_dump()}

    @property
    def too_sensitive(self) -> str | None:
        """Why parity cannot be judged, when a derived band is wider than reference.AUTO_LIMIT:
        rounding alone then moves the training that far (a chaotic run), and no band separates
        a framework difference from it."""
        _, described = self.parity_band
        derived = described.get("auto") or {}
        if derived.get("rtol") is not None and derived["rtol"] > reference.AUTO_LIMIT:
            return (f"rounding alone moves this training by {derived['spread_relative']:.1e} relative "
                    f"(derived parity rtol {derived['rtol']:.1e} > {reference.AUTO_LIMIT:g}): too sensitive to "
                    f"compare frameworks [case {self.case.name}]")
        return None

    @cached_property
    def objective_fit(self) -> tuple[np.ndarray | None, str | None]:
        """The `lstsq` reference, the minimiser of the case's objective, or why there is none:
        least squares (weighted with sample weights); the ridge solution when SGD has weight
        decay; scipy's Huber fit; the logistic maximum-likelihood fit for `bce`."""
        prepared, problem = self.prepared, self.prepared.problem
        with timing.phase("references"):
            try:
                if self.has_weight_decay:  # on the trained features, with the decay's penalty
                    weights, penalty = reference.decay_objective(problem)
                    x, y = problem.x.astype(np.float64), problem.y.astype(np.float64)
                    if problem.loss == "huber":
                        fit = reference.huber_fit(x, y, problem.has_bias, problem.delta, weights, penalty)
                    elif problem.loss == "bce":
                        fit = reference.logistic_fit(x, y, problem.has_bias, weights, penalty)
                    else:
                        fit = reference.ridge(problem)
                    return prepared.to_original(fit), None
                x, y, weights = prepared.x_design, prepared.y, prepared.sample_weight
                if problem.loss == "huber":
                    return reference.huber_fit(x, y, problem.has_bias, problem.delta, weights), None
                if problem.loss == "bce":
                    return reference.logistic_fit(x, y, problem.has_bias, weights), None
                if weights is not None:
                    return reference.weighted_least_squares(x, y, problem.has_bias, weights), None
            except reference.NoFiniteFit as reason:
                return None, str(reason)
        return self.ordinary_least_squares, None

    @property
    def least_squares(self) -> np.ndarray | None:
        return self.objective_fit[0]

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
        return {"x": _floats(prepared.x_design[rows, 0]), "y": _floats(prepared.y[rows]),
                "weights": None if weights is None else _floats(weights[rows]), "degree": degree,
                "has_bias": problem.has_bias, "sigmoid": problem.loss == "bce",
                "reference": None if reference_fit is None else {"name": self.least_squares_name,
                                                                 "params": _floats(reference_fit)}}

    @cached_property
    def ordinary_least_squares(self) -> np.ndarray:
        """Least squares of the case's data: what certified values are checked against."""
        with timing.phase("references"):
            return reference.least_squares(self.prepared.x_design, self.prepared.y, self.prepared.problem.has_bias)

    @property
    def has_weight_decay(self) -> bool:
        return bool(self.prepared.problem.optimizer.settings.get("weight_decay"))

    @property
    def least_squares_name(self) -> str:
        """How the `lstsq` reference was computed, as messages and the report name it."""
        problem = self.prepared.problem
        decay = " (weight decay)" if self.has_weight_decay else ""
        if problem.loss == "huber":
            return "scipy Huber" + decay
        if problem.loss == "bce":
            return "scipy logistic maximum likelihood" + decay
        method = reference.least_squares_method(len(self.prepared.y), problem.features + problem.has_bias)
        if self.has_weight_decay:
            return method.replace("least squares", "ridge (weight decay)")
        return method.replace("least squares", "weighted least squares") if self.prepared.sample_weight is not None \
            else method

    def train(self, backend: str, device: str) -> Trained:
        key = (backend, device)
        if key not in self.results:
            started = time.perf_counter()
            try:
                with timing.phase("training"):
                    trajectory = backends.load(backend).train(self.prepared.problem, device)
            except backends.Unavailable as reason:
                self.results[key] = Trained(backend, device, None, time.perf_counter() - started,
                                            unavailable=str(reason))
            except workers.WorkerDied as death:
                self.results[key] = Trained(backend, device, None, time.perf_counter() - started, str(death),
                                            process_died=True)
            except Exception:  # any backend error is kept with its traceback and reported as a crash
                self.results[key] = Trained(backend, device, None, time.perf_counter() - started,
                                            traceback.format_exc())
            else:
                seconds = time.perf_counter() - started
                with timing.phase("training"):
                    repeat = (_second_training(backend, device, self.prepared.problem, trajectory)
                              if self.repeat else None)
                trajectory.params = self.prepared.to_original(trajectory.params)
                self.results[key] = Trained(backend, device, trajectory, seconds, repeat=repeat)
        return self.results[key]

    def trained_or_raise(self, backend: str, device: str) -> Trained:
        """The result; backends.Unavailable (a skip) or TrainingCrashed (an error) when there is none."""
        result = self.train(backend, device)
        if result.unavailable is not None:
            raise backends.Unavailable(result.unavailable)
        if result.error is not None:
            what = "lost its worker process" if result.process_died else "raised"
            raise TrainingCrashed(f"{backend} on {device} {what} while training [case {self.case.name}]:\n"
                                  f"{result.error}", result.process_died)
        return result

    # ---- checks --------------------------------------------------------------------------

    def check_parity(self, backend: str, device: str) -> Outcome:
        result = self.trained_or_raise(backend, device)
        trajectory = result.trajectory
        record = self._result_record(result)
        diverged = self._divergence(result)
        if diverged:
            return Outcome(False, diverged, record)
        if result.repeat is not None and not result.repeat["identical"]:
            return Outcome(False, f"not deterministic ({result.label}): a second training on the same device "
                                  f"differs by up to {result.repeat['max_abs_diff']:.3g}, first at epoch "
                                  f"{result.repeat['first_epoch']} [case {self.case.name}]", record)
        tol, described = self.parity_band
        replay = self.replay
        if self.too_sensitive:
            return Outcome(False, self.too_sensitive, record | {"tolerance": described}, skipped=True)
        if self.data_picture is not None:
            record["data"] = self.data_picture
        record |= {
            "replay_settled": compare.settled_epoch(replay.params), "epochs": len(replay.params),
            "max_rel_diff": compare.max_relative_difference(trajectory.final, replay.final),
            "first_epoch_outside": compare.first_epoch_outside(trajectory.params, replay.params, tol),
            "tolerance": described,
        }
        mismatch = self._worst_mismatch(trajectory, replay, tol)
        if mismatch is None:
            return Outcome(True, f"within {_tol(tol)} of the float64 replay", record)
        message = mismatch.describe(result.label, "float64 replay", self.where)
        if record["first_epoch_outside"]:
            message += f"; first outside the tolerance at epoch {record['first_epoch_outside']}"
        return Outcome(False, message, record)

    def check_lstsq(self, backend: str, device: str) -> Outcome:
        result = self.trained_or_raise(backend, device)
        tol = self.case.spec.tolerance.lstsq
        record = {"kind": "lstsq", "backend": backend, "device": device, "tolerance": tol.model_dump(),
                  "params": _floats(result.trajectory.final), "reference": self.least_squares_name}
        if self.least_squares is None:
            return Outcome(False, f"{self.least_squares_name}: {self.objective_fit[1]} [case {self.case.name}]",
                           record)
        record["lstsq"] = _floats(self.least_squares)
        diverged = self._divergence(result)
        if diverged:
            return Outcome(False, diverged, record)
        record["max_rel_diff"] = compare.max_relative_difference(result.trajectory.final, self.least_squares)
        if self.case.spec.certified is not None:
            record["lre_certified"] = float(reference.lre(result.trajectory.final, self.certified_params).min())
        mismatch = compare.worst_mismatch(result.trajectory.final, self.least_squares, tol,
                                          self.prepared.parameter_names)
        if mismatch is None:
            return Outcome(True, f"within {_tol(tol)} of the {self.least_squares_name}", record)
        return Outcome(False, mismatch.describe(result.label, self.least_squares_name, self.where), record)

    def check_pairwise(self, deviant: dict[tuple[str, str], Any]) -> Outcome:
        """Every two results agree within the parity tolerance, in both directions.

        `deviant` maps the results expected to deviate to their `expect` parity entry. A pair
        of one such result with any other is shown in the report but does not fail the item;
        two results under the same entry share one known deviation, so they must still agree
        with each other (Keras's optimizer in `keras` and `keras_xla`, say).
        """
        tol, described = self.parity_band
        if self.too_sensitive:
            return Outcome(False, self.too_sensitive, {"kind": "pairwise", "tolerance": described}, skipped=True)
        results = [self.trained_or_raise(backend, device) for backend, device in self.pairs
                   if self.train(backend, device).unavailable is None]
        usable = [result for result in results if not self._divergence(result)]
        rows, failures = [], []
        for index, first in enumerate(usable):
            for second in usable[index + 1:]:
                a, b = (first.backend, first.device), (second.backend, second.device)
                enforced = deviant.get(a) == deviant.get(b)
                row, problem = self._compare_pair(first, second, tol)
                rows.append(row | {"enforced": enforced})
                if problem and enforced:
                    failures.append(problem)
        record = {"kind": "pairwise", "pairs": rows, "tolerance": described,
                  "replay": _curve_record(self.replay),
                  "lstsq": None if self.least_squares is None else _floats(self.least_squares),
                  "reference": self.least_squares_name,
                  "parameter_names": self.prepared.parameter_names,
                  "diverged": [result.label for result in results if self._divergence(result)]}
        if failures:
            return Outcome(False, "\n".join(failures), record)
        checked = sum(row["enforced"] for row in rows)
        skipped = len(rows) - checked
        note = f"; {skipped} pair(s) with an expected deviation shown, not enforced" if skipped else ""
        if not checked:  # a check that compared nothing must not pass
            why = [f"{len(results) - len(usable)} of {len(results)} result(s) diverged"] if len(usable) < len(results) \
                else []
            why += [f"{skipped} pair(s) involve an expected deviation"] if skipped else []
            why += [f"{len(results)} result(s) could run here"] if len(results) < 2 else []
            return Outcome(False, f"nothing to compare: {'; '.join(why)}; 0 pairs checked [case {self.case.name}]",
                           record, skipped=True)
        return Outcome(True, f"{checked} pair(s) within {_tol(tol)} of each other{note}", record)

    def check_certified(self) -> Outcome:
        certified = self.case.spec.certified
        digits = reference.lre(self.ordinary_least_squares, self.certified_params)
        ordinary = self.ordinary_least_squares
        method = reference.least_squares_method(len(self.prepared.y), ordinary.size)
        record = {"kind": "certified", "certified": _floats(self.certified_params),
                  "lstsq": _floats(ordinary), "reference": method, "lre": _floats(digits),
                  "min_digits": certified.min_digits}
        worst = int(np.argmin(digits))
        name = self.prepared.parameter_names[worst]
        if digits[worst] >= certified.min_digits:
            return Outcome(True, f"least squares agrees with the certified values to {digits.min():.1f} digits", record)
        return Outcome(False, f"{name}={ordinary[worst]:.15g} ({method}), but should be "
                              f"{self.certified_params[worst]:.15g} to {certified.min_digits:g} significant digits "
                              f"(certified); agrees to {digits[worst]:.1f} [case {self.case.name}]", record)

    @cached_property
    def certified_params(self) -> np.ndarray:
        certified = self.case.spec.certified
        return np.asarray(certified.weights + ([certified.bias] if certified.bias is not None else []))

    # ---- helpers -------------------------------------------------------------------------

    def _worst_mismatch(self, got: Trajectory, reference_side: Trajectory, tol: Any) -> compare.Mismatch | None:
        """Final parameters first, then `predict` outputs, against the reference side."""
        mismatch = compare.worst_mismatch(got.final, reference_side.final, tol, self.prepared.parameter_names)
        if mismatch is None and got.predictions is not None:
            labels = [f"predict[{index}]" for index in range(len(reference_side.predictions))]
            mismatch = compare.worst_mismatch(got.predictions, reference_side.predictions, tol, labels)
        return mismatch

    def _compare_pair(self, first: Trained, second: Trained, tol: Any) -> tuple[dict[str, Any], str | None]:
        a, b = first.trajectory, second.trajectory
        row = {"a": [first.backend, first.device], "b": [second.backend, second.device],
               "max_rel_diff": compare.max_relative_difference(a.final, b.final)}
        for got, ref, who, against in ((a, b, first, second), (b, a, second, first)):
            mismatch = self._worst_mismatch(got, ref, tol)
            if mismatch is not None:
                return row | {"passed": False}, mismatch.describe(who.label, against.label, self.where)
        return row | {"passed": True}, None

    def _divergence(self, result: Trained) -> str | None:
        epoch = result.trajectory.first_nonfinite_epoch()
        if epoch is None:
            return None
        trajectory = result.trajectory
        finite = np.flatnonzero(np.isfinite(trajectory.loss[: epoch - 1]))
        last = f"last finite loss {trajectory.loss[finite[-1]]:.6g} at epoch {finite[-1] + 1}" if finite.size \
            else "no finite loss"
        params = ", ".join(f"{value:.6g}" for value in trajectory.params[epoch - 1])
        return (f"training diverged ({result.label}): loss or parameters became non-finite at epoch {epoch}; "
                f"{last}; parameters then [{params}] [case {self.case.name}]")

    def _result_record(self, result: Trained) -> dict[str, Any]:
        trajectory = result.trajectory
        return {"kind": "parity", "backend": result.backend, "device": result.device,
                "seconds": result.seconds, "params": _floats(trajectory.final),
                "replay": _floats(self.replay.final),
                "predictions": None if trajectory.predictions is None else _floats(trajectory.predictions),
                "replay_predictions": None if self.replay.predictions is None else _floats(self.replay.predictions),
                "curve": _curve_record(trajectory),
                "distance": _downsample(compare.distance_per_epoch(trajectory.params, self.replay.params)),
                "info": {key: _plain(value) for key, value in trajectory.info.items()},
                "deterministic": None if result.repeat is None else result.repeat["identical"]}


def make_run(case: LoadedCase, pairs: list[tuple[str, str]], repeat: bool = False,
             parity_auto: bool = False, known: Any = None) -> CaseRun:
    return CaseRun(case, prepare(case), pairs, repeat, parity_auto, known)


def _second_training(backend: str, device: str, problem: Any, first: Trajectory) -> dict[str, Any]:
    """Train again on the same device and compare bit for bit (parameters, losses, predictions)."""
    second = backends.load(backend).train(problem, device)
    same_rows = [np.array_equal(a, b, equal_nan=True) for a, b in zip(first.params, second.params)]
    identical = all(same_rows) and np.array_equal(first.loss, second.loss, equal_nan=True) and (
        first.predictions is None or np.array_equal(first.predictions, second.predictions, equal_nan=True))
    with np.errstate(invalid="ignore"):
        difference = float(np.nanmax(np.abs(first.params - second.params), initial=0.0))
    first_epoch = next((epoch + 1 for epoch, same in enumerate(same_rows) if not same), None)
    return {"identical": bool(identical), "max_abs_diff": difference, "first_epoch": first_epoch}


def applicable(expect: list[Expect], check: str, backend: str | None, device: str | None,
               versions: dict[str, str | None]) -> Expect | None:
    """The first `expect` entry that covers this check, backend, device and installed versions."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    for entry in expect:
        if entry.check != check or (entry.backend_names and backend not in entry.backend_names):
            continue
        if entry.device and entry.device != device:
            continue
        try:
            if all(versions.get(package) is not None and SpecifierSet(spec).contains(Version(versions[package]),
                                                                                     prereleases=True)
                   for package, spec in entry.versions.items()):
                return entry
        except InvalidVersion:
            continue
    return None


def _curve_record(trajectory: Trajectory) -> dict[str, Any]:
    return {"loss": _downsample(trajectory.loss), "params": [_downsample(column) for column in trajectory.params.T]}


def _downsample(values: np.ndarray) -> dict[str, list]:
    """At most CURVE_POINTS (epoch, value) points, always keeping the first and last epoch."""
    epochs = np.unique(np.linspace(0, len(values) - 1, min(len(values), CURVE_POINTS)).round().astype(int))
    return {"epoch": [int(e) + 1 for e in epochs], "value": _floats(np.asarray(values)[epochs])}


def _floats(values: Any) -> list[float | None]:
    return [float(value) if np.isfinite(value) else None for value in np.asarray(values, dtype=np.float64).ravel()]


def _plain(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def _tol(tol: Any) -> str:
    return f"rtol {tol.rtol:.1e}, atol {tol.atol:.1e}"
