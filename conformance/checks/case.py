"""The checks of a whole case: `pairwise` (every two results agree) and `certified` (the
least-squares reference against published certified values)."""

from __future__ import annotations

from typing import Any

import numpy as np

from conformance import compare, fits, formulas
from conformance.checks.outcome import Compared, OfRun, Outcome, RunContext, derived, tol_text
from conformance.checks.result import ResultChecks
from conformance.problem import Trajectory
from conformance.records import curve, floats
from conformance.results import Trained
from conformance.schema import Tol


class CaseChecks(OfRun):
    """pairwise and certified of one case run."""

    def __init__(self, run: RunContext, results: ResultChecks) -> None:
        super().__init__(run)
        self.results = results

    def pairwise(self, deviant: dict[tuple[str, str], Any]) -> Outcome:
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
        results = [self.trained.trained_or_raise(backend, device) for backend, device in self.run.pairs
                   if self.trained.train(backend, device).unavailable is None]
        # a diverged result, or one whose loss-scale decisions rounding flipped, has no end point to compare
        usable = [result for result in results
                  if not self.results.divergence(result) and self.results.decided_otherwise(result) is None]
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
                  "diverged": [result.label for result in results if self.results.divergence(result)]}
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
        return Outcome(True, f"{checked} pair(s) within {tol_text(tol)} of each other{note}", record)

    def certified(self) -> Outcome:
        refs, certified = self.refs, self.case.spec.certified
        ordinary = refs.ordinary_least_squares
        digits = fits.lre(ordinary, refs.certified_params)
        method = fits.least_squares_method(len(self.prepared.y), ordinary.size)
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

    def _compare_pair(self, first: Trained, second: Trained, tol: Any) -> tuple[dict[str, Any], str | None]:
        """The two results agree once each is moved onto the other's formulas: a against b plus
        the difference of their own replays (formulas.py), in a's band, and the other way round."""
        a, b = first.trajectory, second.trajectory
        switches = {who.backend: self.refs.switches_of(who.backend) for who in (first, second)}
        row = {"a": [first.backend, first.device], "b": [second.backend, second.device],
               "max_rel_diff": compare.max_relative_difference(a.final, b.final),
               "formulas": {name: sorted(named) for name, named in switches.items()}}
        for got, ref, who, against in ((a, b, first, second), (b, a, second, first)):
            own, other = switches[who.backend], switches[against.backend]
            own_band = self.refs.parity_band_of(own)
            band = _both(own_band, self.refs.parity_band_of(other))
            moved = ref
            if own != other:  # the other result, carried onto this one's formulas
                moved = _Moved(ref, self.refs.replay_of(own), self.refs.replay_of(other))
            along = self.refs.replay_of(own) if derived(own_band[1]) else None
            mismatch = self.results.worst_mismatch(got, moved, band, along)
            if mismatch is not None:
                shifted = "" if own == other else (f" moved by the difference of their own replays "
                                                   f"({formulas.describe(own)} against {formulas.describe(other)})")
                return row | {"passed": False}, mismatch.describe(who.label, against.label + shifted, self.where)
        return row | {"passed": True}, None


def _both(own: tuple[Tol, dict[str, Any]], other: tuple[Tol, dict[str, Any]]) -> Tol:
    """The band of a result against another moved onto its formulas: each is within its own
    band of its own replay, so their difference is within the sum of the two where either band is
    derived (a hand-set tolerance alone is the user's for every pair, and stays as it is)."""
    if not (derived(own[1]) or derived(other[1])):
        return own[0]
    return Tol(rtol=own[0].rtol + other[0].rtol, atol=own[0].atol + other[0].atol)


class _Moved:
    """A result's end point plus the difference of two replays' end points (and predictions)."""

    def __init__(self, result: Trajectory, to: Trajectory, since: Trajectory) -> None:
        self.final = result.final + (to.final - since.final)
        self.predictions = None if result.predictions is None or to.predictions is None else \
            np.asarray(result.predictions, dtype=np.float64) + (to.predictions - since.predictions)
