"""What a check returns: `Outcome` (passed or not, the message, plain data for the report) and
`Compared` (the values it compared, to hold an expected deviation to its `bound`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from conformance import compare
from conformance.schema import Tol

if TYPE_CHECKING:
    from conformance.case import LoadedCase
    from conformance.prepare import Prepared
    from conformance.references import CaseReferences
    from conformance.results import TrainedResults


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
    # a different loss-scale decision (`compared`: the path of the epochs before it, None when it
    # differs in the first): excused by an entry about loss scaling, or by one whose bound holds
    # that path (a decision downstream of the deviation it describes, which must have come first)
    decision: bool = False
    # passed against the replay of the backend's own formulas (conformance/formulas.py) and not
    # against the case format's: why, with both distances and each switch's size (xfailed)
    explained: str | None = None


def tol_text(tol: Any) -> str:
    return f"rtol {tol.rtol:.1e}, atol {tol.atol:.1e}"


def own_replay_name(backend: str, switches: frozenset[str]) -> str:
    """What a result is compared with: the case format's replay, or its backend's own formulas'."""
    if not switches:
        return "float64 replay"
    return f"float64 replay of {backend}'s formulas ({', '.join(sorted(switches))})"


def explanation(label: str, switches: list[dict[str, Any]], own: str, apart: str, within: str) -> str:
    """The message of an item its framework's formulas explain: both distances, each switch's size."""
    named = "; ".join(f"{switch['name']} ({_size(switch['size'])} alone on this case: {switch['reason']} "
                      f"[{switch['source']}])" for switch in switches)
    return (f"explained by {label}'s own formulas: {within} of the {own}, while {apart}; switches: {named}")


@dataclass
class RunContext:
    """What every group of checks of one case run reads: the case, its prepared problem, every
    (backend, device) of the case in this run, its references and its trained results."""

    case: LoadedCase
    prepared: Prepared
    pairs: list[tuple[str, str]]
    refs: CaseReferences
    trained: TrainedResults

    @property
    def where(self) -> str:
        return f"case {self.case.name}, epoch {self.prepared.problem.epochs}"


class OfRun:
    """A group of checks of one case run (RunContext), its fields at hand."""

    def __init__(self, run: RunContext) -> None:
        self.run = run
        self.case, self.prepared, self.refs, self.trained = run.case, run.prepared, run.refs, run.trained

    @property
    def where(self) -> str:
        return self.run.where


def derived(described: dict[str, Any]) -> bool:
    """Whether a parity band (as references.parity_band_of describes it) was derived, wholly or
    in part: only a derived band is of the path's magnitudes; a hand-set one is the case
    format's |a - b| <= atol + rtol |b|."""
    return any(key in described for key in ("auto", "plus_float32_arithmetic"))


def _size(size: float | None) -> str:
    """A switch's size as the message shows it (None: its replay alone diverged)."""
    return "non-finite" if size is None else f"{size:.1e}"
