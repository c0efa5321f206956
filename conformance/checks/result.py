"""The checks of one result against the case's references: `parity` (the end point against the
float64 replay) and `lstsq` (against the objective's fit), and what every check of a result
needs first: whether the result is usable at all (finite, deterministic where asked)."""

from __future__ import annotations

from typing import Any

import numpy as np

from conformance import compare, fits
from conformance.checks.decisions import decision_within_rounding, scaling_apart
from conformance.checks.outcome import Compared, OfRun, Outcome, derived, explanation, own_replay_name, tol_text
from conformance.problem import Trajectory
from conformance.records import curve, downsample, finite, floats, plain
from conformance.results import Trained


class ResultChecks(OfRun):
    """parity and lstsq of one (backend, device) result of a case run."""


    def parity(self, backend: str, device: str) -> Outcome:
        """The end point against the replay of the backend's own formulas (formulas.py), at the
        case's tolerance or its derived band; explained (Outcome.explained) when it is also
        beyond that of the case format's replay."""
        result = self.trained.trained_or_raise(backend, device)
        switches = self.refs.switches_of(backend)
        trajectory, replay = result.trajectory, self.refs.replay_of(switches)
        own = own_replay_name(backend, switches)
        record = self._result_record(result, replay)
        failed = self.unusable(result, record)
        if failed:
            return failed
        tol, described = self.refs.parity_band_of(switches)
        if self.refs.too_sensitive:
            return Outcome(False, self.refs.too_sensitive, record | {"tolerance": described}, skipped=True)
        scaling = self.decided_otherwise(result)
        if scaling is not None:
            record |= {"tolerance": described, "loss_scale_first_differs": scaling | {"within_rounding": True}}
            return Outcome(False, f"a loss-scale decision that rounding can flip went otherwise at epoch "
                                  f"{scaling['epoch']}: the end point follows other decisions; too sensitive to "
                                  f"compare [case {self.case.name}]", record, skipped=True)
        if self.refs.data_picture is not None:
            record["data"] = self.refs.data_picture
        record |= {
            "replay_settled": compare.settled_epoch(replay.params), "epochs": len(replay.params),
            "max_rel_diff": compare.max_relative_difference(trajectory.final, replay.final),
            "first_epoch_outside": compare.first_epoch_outside(trajectory.params, replay.params, tol),
            "tolerance": described, "formulas": sorted(switches),
        }
        if switches:
            record["switches"] = self.refs.switch_sizes(backend)
            record["max_rel_diff_case_format"] = finite(compare.max_relative_difference(trajectory.final,
                                                                                        self.refs.replay.final))
        compared = self._final_compared(result, replay, own)
        mismatch = self.worst_mismatch(trajectory, replay, tol, along=replay if derived(described) else None)
        if mismatch is not None:
            message = mismatch.describe(result.label, own, self.where)
            if record["first_epoch_outside"]:
                message += f"; first outside the tolerance at epoch {record['first_epoch_outside']}"
            return Outcome(False, message, record, compared=compared)
        within = f"within {tol_text(tol)}"
        passed = Outcome(True, f"{within} of the {own}", record, compared=compared)
        if not switches:
            return passed
        base_tol, _ = self.refs.parity_band
        apart = self.worst_mismatch(trajectory, self.refs.replay, base_tol)
        if apart is not None:
            passed.explained = explanation(result.label, record["switches"], own,
                                           apart.describe(result.label, "case format's float64 replay", self.where),
                                           within)
        return passed

    def decided_otherwise(self, result: Trained) -> dict[str, Any] | None:
        """Where the result's loss-scale decisions first differ from its replay's, when rounding
        can flip that decision (decisions.decision_within_rounding); else None. Its end point then
        follows other decisions, as the trajectory check finds (fuzz-55001-81: Keras on JAX,
        float16, perturbed replays deciding otherwise by epoch 1, 60% from the replay's end
        point): not comparable, neither with the replay nor with other results."""
        switches = self.refs.switches_of(result.backend)
        replay = self.refs.replay_of(switches)
        scaling = scaling_apart(result.trajectory, replay)
        if scaling is None or not decision_within_rounding(scaling, replay, self.refs.rounding_of(switches),
                                                            self.refs.trajectory_bands_of(switches).comparable):
            return None
        return scaling

    def lstsq(self, backend: str, device: str) -> Outcome:
        result = self.trained.trained_or_raise(backend, device)
        refs, tol = self.refs, self.case.spec.tolerance.lstsq
        record = {"kind": "lstsq", "backend": backend, "device": device, "tolerance": tol.model_dump(),
                  "params": floats(result.trajectory.final), "reference": refs.least_squares_name}
        if refs.least_squares is None:
            return Outcome(False, f"{refs.least_squares_name}: {refs.objective_fit[1]} [case {self.case.name}]",
                           record)
        record["lstsq"] = floats(refs.least_squares)
        diverged = self.divergence(result)
        if diverged:
            return Outcome(False, diverged, record)
        record["max_rel_diff"] = compare.max_relative_difference(result.trajectory.final, refs.least_squares)
        if self.case.spec.certified is not None:
            record["lre_certified"] = float(fits.lre(result.trajectory.final, refs.certified_params).min())
        names = self.prepared.parameter_names
        compared = Compared(result.trajectory.final, refs.least_squares, names.__getitem__, result.label,
                            refs.least_squares_name, self.where)
        mismatch = compare.worst_mismatch(result.trajectory.final, refs.least_squares, tol, names)
        if mismatch is None:
            return Outcome(True, f"within {tol_text(tol)} of the {refs.least_squares_name}", record, compared=compared)
        return Outcome(False, mismatch.describe(result.label, refs.least_squares_name, self.where), record,
                       compared=compared)

    def unusable(self, result: Trained, record: dict[str, Any]) -> Outcome | None:
        """A failed Outcome when the result cannot be compared: it diverged, or it is not
        deterministic under --determinism."""
        diverged = self.divergence(result)
        if diverged and result.trajectory.first_nonfinite_epoch() == self.refs.replay.first_nonfinite_epoch():
            # the case's own training diverges (a fixed loss scale that overflows float16, a rate
            # past stability): the framework does what the format says, and nothing is left to compare
            return Outcome(False, f"{diverged}; the case format's float64 replay becomes non-finite at the "
                                  "same epoch: the case does not train, so there is nothing to compare", record,
                           skipped=True)
        if diverged:
            return Outcome(False, diverged, record)
        if result.repeat is not None and not result.repeat["identical"]:
            return Outcome(False, f"not deterministic ({result.label}): a second training on the same device "
                                  f"differs by up to {result.repeat['max_abs_diff']:.3g}, first at epoch "
                                  f"{result.repeat['first_epoch']} [case {self.case.name}]", record)
        return None

    def divergence(self, result: Trained) -> str | None:
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

    def worst_mismatch(self, got: Trajectory, reference_side: Trajectory, tol: Any,
                       along: Trajectory | None = None) -> compare.Mismatch | None:
        """Final parameters first, then `predict` outputs, against the reference side; with
        `along` (a derived band), each parameter's relative band is of the largest magnitude it
        had along that replay's path (compare.path_magnitude)."""
        magnitude = None if along is None else \
            compare.path_magnitude(along.params, self.prepared.initial_original)[-1]
        mismatch = compare.worst_mismatch(got.final, reference_side.final, tol, self.prepared.parameter_names,
                                          magnitude)
        if mismatch is None and got.predictions is not None:
            labels = [f"predict[{index}]" for index in range(len(reference_side.predictions))]
            mismatch = compare.worst_mismatch(got.predictions, reference_side.predictions, tol, labels)
        return mismatch

    def _result_record(self, result: Trained, replay: Trajectory) -> dict[str, Any]:
        trajectory = result.trajectory
        return {"kind": "parity", "backend": result.backend, "device": result.device,
                "seconds": result.seconds, "params": floats(trajectory.final),
                "replay": floats(replay.final),
                "predictions": None if trajectory.predictions is None else floats(trajectory.predictions),
                "replay_predictions": None if replay.predictions is None else floats(replay.predictions),
                "curve": curve(trajectory),
                "distance": downsample(compare.distance_per_epoch(trajectory.params, replay.params)),
                "info": {key: plain(value) for key, value in trajectory.info.items()
                         if key not in ("precision", "replicas")},
                "precision": _plain_mapping(trajectory.info.get("precision")),
                "replicas": _plain_mapping(trajectory.info.get("replicas")),
                "deterministic": None if result.repeat is None else result.repeat["identical"]}


def _plain_mapping(value: Any) -> dict[str, Any] | None:
    """A backend's record of what ran in which dtype, kept as a mapping of plain values."""
    if not isinstance(value, dict):
        return None
    return {str(key): (_plain_mapping(item) if isinstance(item, dict) else
                       [plain(part) for part in item] if isinstance(item, (list, tuple)) else plain(item))
            for key, item in value.items()}
