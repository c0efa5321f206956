"""The checks of one case, run inside a test item, against its references and its results.

`CaseRun` brings the three together: `CaseReferences` (what results are checked against),
`TrainedResults` (what each backend trained, once per process) and the checks, each returning
an `Outcome`: passed or not, the message, plain data for the report, and what was compared, so
that an expected deviation can be held to its `bound`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from conformance import compare, reference
from conformance.case import LoadedCase
from conformance.problem import Prepared, Trajectory, prepare
from conformance.records import curve, downsample, floats, plain
from conformance.references import CaseReferences
from conformance.results import Trained, TrainedResults, TrainingCrashed
from conformance.schema import Expect, Tol

__all__ = ["CaseRun", "Compared", "Outcome", "Trained", "TrainingCrashed", "applicable", "make_run"]


@dataclass
class Compared:
    """The values a check compared with its reference side, to measure a deviation's size."""

    got: np.ndarray
    expected: np.ndarray
    label: Callable[[int], str]  # the name of value i in messages
    who: str
    against: str
    where: str

    def beyond(self, bound: Tol) -> str | None:
        """None when every value is within `bound`; else the worst one, described."""
        mismatch = compare.worst_mismatch(self.got, self.expected, bound, _Labels(self.label, self.got.size))
        return None if mismatch is None else mismatch.describe(self.who, self.against, self.where)

    def size(self, bound: Tol | None) -> dict[str, Any]:
        """How large the deviation is: the largest |a - b| and relative difference, and the
        largest share of the bound any value uses (above 1: larger than expected)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            difference = np.abs(self.got - self.expected)
            sized = {"max_abs_diff": float(np.nanmax(difference, initial=0.0)),
                     "max_rel_diff": compare.max_relative_difference(self.got, self.expected)}
            if bound is not None:
                limit = compare.allowed(self.expected, bound)
                share = np.where(limit > 0, difference / np.where(limit > 0, limit, 1.0),
                                 np.where(difference > 0, np.inf, 0.0))
                sized |= {"bound": bound.model_dump(), "share_of_bound": float(np.nanmax(share, initial=0.0))}
        return sized


class _Labels:
    """A list-like of value names, made on demand (a trajectory has epochs x parameters)."""

    def __init__(self, label: Callable[[int], str], length: int) -> None:
        self.label, self.length = label, length

    def __getitem__(self, index: int) -> str:
        return self.label(index)

    def __len__(self) -> int:
        return self.length


@dataclass
class Outcome:
    """What a check found: passed or not, the message, and plain data for the report."""

    passed: bool
    message: str
    record: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False  # the check had nothing to compare: neither a pass nor a failure
    compared: Compared | None = None  # for a bound on an expected deviation


class CaseRun:
    """Everything one process knows about one case: its references, results and checks."""

    def __init__(self, case: LoadedCase, prepared: Prepared, pairs: list[tuple[str, str]],
                 repeat: bool = False, parity_auto: bool = False, known: Any = None) -> None:
        self.case = case
        self.prepared = prepared
        self.pairs = pairs  # every (backend, device) of this case in this run
        self.refs = CaseReferences(case, prepared, parity_auto)
        self.trained = TrainedResults(case.name, prepared.problem, prepared.to_original, repeat)
        self.known = known  # the run's expectations file (conformance.expectations), if any

    @property
    def results(self) -> dict[tuple[str, str], Trained]:
        return self.trained.results

    @property
    def where(self) -> str:
        return f"case {self.case.name}, epoch {self.prepared.problem.epochs}"

    def check_parity(self, backend: str, device: str) -> Outcome:
        result = self.trained.trained_or_raise(backend, device)
        trajectory, replay = result.trajectory, self.refs.replay
        record = self._result_record(result)
        failed = self._unusable(result, record)
        if failed:
            return failed
        tol, described = self.refs.parity_band
        if self.refs.too_sensitive:
            return Outcome(False, self.refs.too_sensitive, record | {"tolerance": described}, skipped=True)
        if self.refs.data_picture is not None:
            record["data"] = self.refs.data_picture
        record |= {
            "replay_settled": compare.settled_epoch(replay.params), "epochs": len(replay.params),
            "max_rel_diff": compare.max_relative_difference(trajectory.final, replay.final),
            "first_epoch_outside": compare.first_epoch_outside(trajectory.params, replay.params, tol),
            "tolerance": described,
        }
        compared = self._final_compared(result, replay, "float64 replay")
        mismatch = self._worst_mismatch(trajectory, replay, tol)
        if mismatch is None:
            return Outcome(True, f"within {_tol(tol)} of the float64 replay", record, compared=compared)
        message = mismatch.describe(result.label, "float64 replay", self.where)
        if record["first_epoch_outside"]:
            message += f"; first outside the tolerance at epoch {record['first_epoch_outside']}"
        return Outcome(False, message, record, compared=compared)

    def check_trajectory(self, backend: str, device: str) -> Outcome:
        """Every epoch's parameters and training loss against the replay's, each epoch in its
        own band (`auto`) or the case's tolerance; the first epoch outside is named."""
        result = self.trained.trained_or_raise(backend, device)
        record = {"kind": "trajectory", "backend": backend, "device": device}
        failed = self._unusable(result, record)
        if failed:
            return failed
        bands, replay = self.refs.trajectory_bands, self.refs.replay
        epochs = bands.comparable
        record |= {"tolerance": self._trajectory_tolerance(), "epochs": len(replay.params), "comparable": epochs}
        if epochs == 0:
            return Outcome(False, f"rounding alone moves this training by more than {reference.AUTO_LIMIT:g} "
                                  f"relative from epoch 1 on: too sensitive to compare paths [case {self.case.name}]",
                           record, skipped=True)
        path = _Path(result.trajectory, replay, bands, epochs, self.prepared.parameter_names)
        if result.trajectory.info.get("loss_includes_l2_penalty"):
            record["loss_compared"] = "the case's loss plus weight decay's L2 penalty, as the framework reports it"
        record |= path.record()
        compared = Compared(path.got, path.expected, path.label, result.label, "float64 replay",
                            f"case {self.case.name}")
        checked = f"epochs 1-{epochs}" + (f" of {len(replay.params)} (later ones: rounding alone moves the "
                                          f"training by more than {reference.AUTO_LIMIT:g})"
                                          if epochs < len(replay.params) else "")
        first = path.first_outside()
        if first is None:
            return Outcome(True, f"every epoch within its band of the float64 replay ({checked})", record,
                           compared=compared)
        return Outcome(False, path.describe(first, result.label, self.case.name) + f"; checked {checked}", record,
                       compared=compared)

    def check_lstsq(self, backend: str, device: str) -> Outcome:
        result = self.trained.trained_or_raise(backend, device)
        refs, tol = self.refs, self.case.spec.tolerance.lstsq
        record = {"kind": "lstsq", "backend": backend, "device": device, "tolerance": tol.model_dump(),
                  "params": floats(result.trajectory.final), "reference": refs.least_squares_name}
        if refs.least_squares is None:
            return Outcome(False, f"{refs.least_squares_name}: {refs.objective_fit[1]} [case {self.case.name}]",
                           record)
        record["lstsq"] = floats(refs.least_squares)
        diverged = self._divergence(result)
        if diverged:
            return Outcome(False, diverged, record)
        record["max_rel_diff"] = compare.max_relative_difference(result.trajectory.final, refs.least_squares)
        if self.case.spec.certified is not None:
            record["lre_certified"] = float(reference.lre(result.trajectory.final, refs.certified_params).min())
        names = self.prepared.parameter_names
        compared = Compared(result.trajectory.final, refs.least_squares, names.__getitem__, result.label,
                            refs.least_squares_name, self.where)
        mismatch = compare.worst_mismatch(result.trajectory.final, refs.least_squares, tol, names)
        if mismatch is None:
            return Outcome(True, f"within {_tol(tol)} of the {refs.least_squares_name}", record, compared=compared)
        return Outcome(False, mismatch.describe(result.label, refs.least_squares_name, self.where), record,
                       compared=compared)

    def check_pairwise(self, deviant: dict[tuple[str, str], Any]) -> Outcome:
        """Every two results agree within the parity tolerance, in both directions.

        `deviant` maps the results expected to deviate to their `expect` parity entry. A pair
        of one such result with any other is shown in the report but does not fail the item;
        two results under the same entry share one known deviation, so they must still agree
        with each other (Keras's optimizer in `keras` and `keras_xla`, say).
        """
        tol, described = self.refs.parity_band
        if self.refs.too_sensitive:
            return Outcome(False, self.refs.too_sensitive, {"kind": "pairwise", "tolerance": described},
                           skipped=True)
        results = [self.trained.trained_or_raise(backend, device) for backend, device in self.pairs
                   if self.trained.train(backend, device).unavailable is None]
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
                  "replay": curve(self.refs.replay),
                  "lstsq": None if self.refs.least_squares is None else floats(self.refs.least_squares),
                  "reference": self.refs.least_squares_name,
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
        refs, certified = self.refs, self.case.spec.certified
        ordinary = refs.ordinary_least_squares
        digits = reference.lre(ordinary, refs.certified_params)
        method = reference.least_squares_method(len(self.prepared.y), ordinary.size)
        record = {"kind": "certified", "certified": floats(refs.certified_params),
                  "lstsq": floats(ordinary), "reference": method, "lre": floats(digits),
                  "min_digits": certified.min_digits}
        compared = Compared(ordinary, refs.certified_params, self.prepared.parameter_names.__getitem__, method,
                            "certified", f"case {self.case.name}")
        worst = int(np.argmin(digits))
        name = self.prepared.parameter_names[worst]
        if digits[worst] >= certified.min_digits:
            return Outcome(True, f"least squares agrees with the certified values to {digits.min():.1f} digits",
                           record, compared=compared)
        return Outcome(False, f"{name}={ordinary[worst]:.15g} ({method}), but should be "
                              f"{refs.certified_params[worst]:.15g} to {certified.min_digits:g} significant digits "
                              f"(certified); agrees to {digits[worst]:.1f} [case {self.case.name}]", record,
                       compared=compared)

    # ---- helpers -------------------------------------------------------------------------

    def _trajectory_tolerance(self) -> dict[str, Any]:
        own = self.case.spec.tolerance.trajectory
        bands = self.refs.trajectory_bands
        if isinstance(own, Tol):
            return own.model_dump()
        return {"auto": {"method": bands.method, "runs": reference.AUTO_RUNS, "factor": reference.AUTO_FACTOR,
                         "final": {"rtol": float(bands.rtol[-1]), "atol": float(bands.atol[-1])},
                         "widest_rtol": float(np.max(bands.rtol[:bands.comparable], initial=0.0))}}

    def _unusable(self, result: Trained, record: dict[str, Any]) -> Outcome | None:
        """A failed Outcome when the result cannot be compared: it diverged, or it is not
        deterministic under --determinism."""
        diverged = self._divergence(result)
        if diverged:
            return Outcome(False, diverged, record)
        if result.repeat is not None and not result.repeat["identical"]:
            return Outcome(False, f"not deterministic ({result.label}): a second training on the same device "
                                  f"differs by up to {result.repeat['max_abs_diff']:.3g}, first at epoch "
                                  f"{result.repeat['first_epoch']} [case {self.case.name}]", record)
        return None

    def _final_compared(self, result: Trained, replay: Trajectory, against: str) -> Compared:
        """Final parameters, then `predict` outputs, as one comparison."""
        names = list(self.prepared.parameter_names)
        got, expected = [result.trajectory.final], [replay.final]
        if result.trajectory.predictions is not None and replay.predictions is not None:
            got.append(np.asarray(result.trajectory.predictions, dtype=np.float64))
            expected.append(np.asarray(replay.predictions, dtype=np.float64))
            names += [f"predict[{index}]" for index in range(len(replay.predictions))]
        return Compared(np.concatenate(got), np.concatenate(expected), names.__getitem__, result.label, against,
                        self.where)

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
        trajectory, replay = result.trajectory, self.refs.replay
        return {"kind": "parity", "backend": result.backend, "device": result.device,
                "seconds": result.seconds, "params": floats(trajectory.final),
                "replay": floats(replay.final),
                "predictions": None if trajectory.predictions is None else floats(trajectory.predictions),
                "replay_predictions": None if replay.predictions is None else floats(replay.predictions),
                "curve": curve(trajectory),
                "distance": downsample(compare.distance_per_epoch(trajectory.params, replay.params)),
                "info": {key: plain(value) for key, value in trajectory.info.items()},
                "deterministic": None if result.repeat is None else result.repeat["identical"]}


class _Path:
    """One result's trajectory against the replay's, epoch by epoch, in the per-epoch bands:
    the parameters of every epoch, then the loss of every epoch, as one flat comparison."""

    def __init__(self, got: Trajectory, replay: Trajectory, bands: reference.EpochBands, epochs: int,
                 names: list[str]) -> None:
        self.names, self.epochs = names + ["loss"], epochs
        width = len(names)
        self.params = (got.params[:epochs], replay.params[:epochs])
        expected_loss = replay.loss
        if got.info.get("loss_includes_l2_penalty") and replay.penalty is not None:
            expected_loss = replay.loss + replay.penalty  # what the framework reports as its loss
        self.loss = (got.loss[:epochs], expected_loss[:epochs])
        self.allowed = np.column_stack([
            bands.atol[:epochs, None] + bands.rtol[:epochs, None] * np.abs(self.params[1]),
            bands.loss_atol[:epochs] + bands.loss_rtol[:epochs] * np.abs(self.loss[1])])
        self.difference = np.abs(np.column_stack([self.params[0] - self.params[1], self.loss[0] - self.loss[1]]))
        self.bands, self.width = bands, width
        self.got = np.column_stack([self.params[0], self.loss[0]]).ravel()
        self.expected = np.column_stack([self.params[1], self.loss[1]]).ravel()

    def label(self, index: int) -> str:
        epoch, column = divmod(index, self.width + 1)
        return f"epoch {epoch + 1}: {self.names[column]}"

    def outside(self) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return ~(self.difference <= self.allowed)

    def first_outside(self) -> int | None:
        """0-based first epoch with a value outside its band."""
        rows = np.flatnonzero(self.outside().any(axis=1))
        return int(rows[0]) if rows.size else None

    def describe(self, epoch: int, who: str, case: str) -> str:
        outside = self.outside()
        with np.errstate(invalid="ignore", divide="ignore"):
            excess = np.where(outside[epoch], np.nan_to_num(self.difference[epoch] / self.allowed[epoch],
                                                            nan=np.inf), -1.0)
        column = int(np.argmax(excess))
        is_loss = column == self.width
        got, expected = (self.loss if is_loss else self.params)
        got, expected = (got[epoch], expected[epoch]) if is_loss else (got[epoch, column], expected[epoch, column])
        rtol, atol = ((self.bands.loss_rtol[epoch], self.bands.loss_atol[epoch]) if is_loss
                      else self.bands.at(epoch))
        epochs_out = np.flatnonzero(outside.any(axis=1))
        return (f"first outside its band at epoch {epoch + 1}: {self.names[column]}={got:.10g} ({who}), but should be "
                f"{expected:.10g} ± {self.allowed[epoch, column]:.1e} (float64 replay; band there rtol {rtol:.1e}, "
                f"atol {atol:.1e}) [case {case}]; {epochs_out.size} epoch(s) outside, the last at epoch "
                f"{epochs_out[-1] + 1}")

    def record(self) -> dict[str, Any]:
        """For the report: per epoch, the distance of the parameter (or loss) nearest to
        leaving its band, and that band: the curve crosses the band where the check fails."""
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.nan_to_num(np.where(self.allowed > 0, self.difference / self.allowed,
                                           np.where(self.difference > 0, np.inf, 0.0)), nan=np.inf)
        worst = np.argmax(share, axis=1)
        rows = np.arange(self.epochs)
        first = self.first_outside()
        return {"first_epoch_outside": None if first is None else first + 1,
                "epochs_outside": int(self.outside().any(axis=1).sum()),
                "worst_share": float(np.max(share, initial=0.0)),
                "band_distance": downsample(self.difference[rows, worst]),
                "band": downsample(self.allowed[rows, worst])}


def make_run(case: LoadedCase, pairs: list[tuple[str, str]], repeat: bool = False,
             parity_auto: bool = False, known: Any = None) -> CaseRun:
    return CaseRun(case, prepare(case), pairs, repeat, parity_auto, known)


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


def _tol(tol: Any) -> str:
    return f"rtol {tol.rtol:.1e}, atol {tol.atol:.1e}"
