"""The `trajectory` check: every epoch's parameters and training loss of a result against the
float64 replay's, each epoch in its own band (`auto`: the spread of the perturbed replays up to
that epoch) or the case's tolerance. A run that ends where the replay ends through another path
fails here."""

from __future__ import annotations

from typing import Any

import numpy as np

from conformance import compare, rounding_bands
from conformance.checks.decisions import scaling_apart
from conformance.checks.outcome import Compared, OfRun, Outcome, RunContext, explanation, own_replay_name
from conformance.checks.result import ResultChecks
from conformance.prepare import Prepared
from conformance.problem import Trajectory
from conformance.records import downsample
from conformance.schema import Tol


class TrajectoryCheck(OfRun):
    """The trajectory item of each result of one case run."""

    def __init__(self, run: RunContext, results: ResultChecks) -> None:
        super().__init__(run)
        self.results = results

    def check(self, backend: str, device: str) -> Outcome:
        """Every epoch's parameters and training loss against the replay of the backend's own
        formulas (formulas.py), each epoch in its own band (`auto`) or the case's tolerance; the
        first epoch outside is named. Explained when also outside the case format's replay."""
        result = self.trained.trained_or_raise(backend, device)
        record = {"kind": "trajectory", "backend": backend, "device": device}
        failed = self.results.unusable(result, record)
        if failed:
            return failed
        switches = self.refs.switches_of(backend)
        own = own_replay_name(backend, switches)
        bands, replay = self.refs.trajectory_bands_of(switches), self.refs.replay_of(switches)
        epochs = bands.comparable
        record |= {"tolerance": self.tolerance(), "epochs": len(replay.params), "comparable": epochs,
                   "formulas": sorted(switches)}
        within_rounding = self.results.decided_otherwise(result)
        scaling = None if within_rounding else scaling_apart(result.trajectory, replay)
        flipped = None
        if within_rounding:
            # a decision rounding can flip went otherwise: from that epoch on the path follows other
            # decisions, and only the epochs before it are compared (fuzz-27193-266: Keras skipped
            # a step at epoch 16 that the replay took at 17, then 1.3e-2 apart)
            record["loss_scale_first_differs"] = within_rounding | {"within_rounding": True}
            flipped = within_rounding["epoch"]
            epochs = min(epochs, flipped - 1)
            record["comparable"] = epochs
        if scaling is not None:
            record["loss_scale_first_differs"] = scaling
            earlier = scaling["epoch"] - 1  # the epochs whose parameters the differing decision was made from
            before = _Path(result.trajectory, replay, bands, earlier, self.prepared) \
                if earlier else None
            return Outcome(False, f"{result.label}: {scaling['message']} ({own}, compared exactly: the "
                                  f"scale and skipped steps are decisions, not rounding) [case {self.case.name}]",
                           record, decision=True,
                           compared=None if before is None else Compared(
                               before.got, before.expected, before.label, result.label, own,
                               f"case {self.case.name}"))
        if epochs == 0:
            why = (f"rounding alone moves this training by more than {bands.limit:g} relative from epoch 1 on"
                   if flipped is None else "a loss-scale decision that rounding can flip went otherwise at epoch 1")
            return Outcome(False, f"{why}: too sensitive to compare paths [case {self.case.name}]",
                           record, skipped=True)
        path = _Path(result.trajectory, replay, bands, epochs, self.prepared)
        if result.trajectory.info.get("loss_includes_l2_penalty"):
            record["loss_compared"] = "the case's loss plus weight decay's L2 penalty, as the framework reports it"
        record |= path.record()
        compared = Compared(path.got, path.expected, path.label, result.label, own, f"case {self.case.name}")
        later = "" if epochs == len(replay.params) else \
            f"later ones: a loss-scale decision that rounding can flip went otherwise at epoch {flipped}" \
            if flipped is not None and epochs == flipped - 1 else \
            f"later ones: rounding alone moves the training by more than {bands.limit:g}"
        checked = f"epochs 1-{epochs}" + (f" of {len(replay.params)} ({later})" if later else "")
        rates = rates_apart(result.trajectory, replay)
        if rates:
            record["rate_first_differs"] = rates
        first = path.first_outside()
        if first is not None:
            note = (f"; the learning rate it reported first differs from the {own}'s at epoch {rates['epoch']}: "
                    f"{rates['got']:.10g}, not {rates['expected']:.10g}") if rates else ""
            return Outcome(False, path.describe(first, result.label, self.case.name, own) + f"; checked {checked}"
                           + note, record, compared=compared)
        passed = Outcome(True, f"every epoch within its band of the {own} ({checked})", record, compared=compared)
        if switches:
            apart = self._apart_from_case_format(result.trajectory)
            if apart is not None:
                passed.explained = explanation(result.label, self.refs.switch_sizes(backend), own, apart,
                                               f"every epoch within its band ({checked})")
        return passed

    def _apart_from_case_format(self, got: Trajectory) -> str | None:
        """Where the path leaves the case format's replay's bands, described; None if it never does."""
        bands, replay = self.refs.trajectory_bands, self.refs.replay
        epochs = bands.comparable
        if epochs == 0 or scaling_apart(got, replay) is not None:
            return None if epochs == 0 else "its loss scaling differs from the case format's replay"
        path = _Path(got, replay, bands, epochs, self.prepared)
        first = path.first_outside()
        return None if first is None else path.describe(first, "it", self.case.name, "case format's float64 replay")

    def tolerance(self) -> dict[str, Any]:
        own = self.refs.trajectory_tolerance
        bands = self.refs.trajectory_bands
        if isinstance(own, Tol):
            return own.model_dump()
        return {"auto": {"method": bands.method, "runs": rounding_bands.AUTO_RUNS, "factor": rounding_bands.AUTO_FACTOR,
                         "final": {"rtol": float(bands.rtol[-1]), "atol": float(bands.atol[-1])},
                         "widest_rtol": float(np.max(bands.rtol[:bands.comparable], initial=0.0))}}


RATE_RTOL = 1e-6  # above float32's rounding of a rate (6e-8): a framework's float32 schedule is not named


def rates_apart(got: Trajectory, replay: Trajectory) -> dict[str, Any] | None:
    """Under a schedule: the first epoch whose last step's rate, as the framework reported it,
    differs from the case format's by more than RATE_RTOL, with both rates; None when none does.
    A diagnosis for the message (a schedule stepped at the wrong time shows here by name), not
    a check of its own: the parameters decide."""
    if got.rates is None or replay.rates is None or len(got.rates) != len(replay.rates):
        return None
    with np.errstate(invalid="ignore"):
        apart = ~(np.abs(got.rates - replay.rates) <= RATE_RTOL * np.abs(replay.rates))
    if not apart.any():
        return None
    epoch = int(np.argmax(apart))
    return {"epoch": epoch + 1, "got": float(got.rates[epoch]), "expected": float(replay.rates[epoch])}


class _Path:
    """One result's trajectory against the replay's, epoch by epoch, in the per-epoch bands:
    the parameters of every epoch, then the loss of every epoch, as one flat comparison."""

    def __init__(self, got: Trajectory, replay: Trajectory, bands: rounding_bands.EpochBands, epochs: int,
                 prepared: Prepared) -> None:
        names = prepared.parameter_names
        self.names, self.epochs = names + ["loss"], epochs
        width = len(names)
        self.params = (got.params[:epochs], replay.params[:epochs])
        expected_loss = replay.loss
        if got.info.get("loss_includes_l2_penalty") and replay.penalty is not None:
            expected_loss = replay.loss + replay.penalty  # what the framework reports as its loss
        self.loss = (got.loss[:epochs], expected_loss[:epochs])
        # a value's relative band is of the largest magnitude it has had so far: an error of
        # rtol |p| is carried on as an absolute one, so a value that shrinks (a path through
        # zero) keeps the error it had, from its initial value on (compare.path_magnitude)
        magnitude = compare.path_magnitude(self.params[1], prepared.initial_original)
        self.allowed = np.column_stack([
            bands.atol[:epochs, None] + bands.rtol[:epochs, None] * magnitude,
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

    def describe(self, epoch: int, who: str, case: str, against: str = "float64 replay") -> str:
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
                f"{expected:.10g} ± {self.allowed[epoch, column]:.1e} ({against}; band there rtol {rtol:.1e}, "
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
