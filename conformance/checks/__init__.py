"""The checks of one case, run inside a test item, against its references and its results.

`CaseRun` (run.py) brings a case's references, its trained results and its checks together;
the checks live one job a module: `result` (parity, lstsq), `trajectory`, `case` (pairwise,
certified), each returning an `Outcome` (outcome.py) with what it compared, so that an expected
deviation can be held to its `bound`.
"""

from conformance.checks.outcome import Compared, Outcome
from conformance.checks.run import CaseRun, make_run
from conformance.results import Trained, TrainingCrashed

__all__ = ["CaseRun", "Compared", "Outcome", "Trained", "TrainingCrashed", "make_run"]
