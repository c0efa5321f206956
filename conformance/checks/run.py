"""`CaseRun`: everything one process knows about one case, and the entry to its checks.

It brings together `CaseReferences` (what results are checked against: the float64 replay, the
derived bands, the objective's fit, certified values), `TrainedResults` (what each backend
trained, once per process) and the checks, each in a module of its own: `result` (parity, lstsq),
`trajectory`, `case` (pairwise, certified).
"""

from __future__ import annotations

from typing import Any

from conformance.case import LoadedCase
from conformance.checks.case import CaseChecks
from conformance.checks.outcome import Outcome, RunContext
from conformance.checks.result import ResultChecks
from conformance.checks.trajectory import TrajectoryCheck
from conformance.prepare import Prepared, prepare
from conformance.references import CaseReferences
from conformance.results import Trained, TrainedResults


class CaseRun:
    """One case in this process: its references, its trained results and its checks."""

    def __init__(self, case: LoadedCase, prepared: Prepared, pairs: list[tuple[str, str]],
                 repeat: bool = False, parity_auto: bool = False, known: Any = None) -> None:
        self.case = case
        self.prepared = prepared
        self.pairs = pairs  # every (backend, device) of this case in this run
        self.refs = CaseReferences(case, prepared, parity_auto)
        self.trained = TrainedResults(case.name, prepared.problem, prepared.to_original, repeat)
        self.known = known  # the run's expectations files (conformance.expectations), if any
        self.context = RunContext(case, prepared, pairs, self.refs, self.trained)
        self.result_checks = ResultChecks(self.context)
        self.trajectory_check = TrajectoryCheck(self.context, self.result_checks)
        self.case_checks = CaseChecks(self.context, self.result_checks)

    @property
    def results(self) -> dict[tuple[str, str], Trained]:
        return self.trained.results

    @property
    def where(self) -> str:
        return self.context.where

    def check_parity(self, backend: str, device: str) -> Outcome:
        return self.result_checks.parity(backend, device)

    def check_trajectory(self, backend: str, device: str) -> Outcome:
        return self.trajectory_check.check(backend, device)

    def check_lstsq(self, backend: str, device: str) -> Outcome:
        return self.result_checks.lstsq(backend, device)

    def check_pairwise(self, deviant: dict[tuple[str, str], Any]) -> Outcome:
        return self.case_checks.pairwise(deviant)

    def check_certified(self) -> Outcome:
        return self.case_checks.certified()


def make_run(case: LoadedCase, pairs: list[tuple[str, str]], repeat: bool = False,
             parity_auto: bool = False, known: Any = None) -> CaseRun:
    return CaseRun(case, prepare(case), pairs, repeat, parity_auto, known)
