"""Known deviations that apply to every case in a run, generated cases included.

A case's own `expect` entries are about that case: strict (an expected deviation that does not
happen fails the item), with the deviation's measured size. The expectations file generalises
them for cases nobody wrote by hand, in the spirit of array-api-tests' xfails file: each entry
is an `expect` entry plus `when`, the conditions under which the deviation can appear (dtype,
optimizer and its settings, loss and its settings, schedule and its settings, clip, hidden
layers' activations, precision, loss scale, replicas and whether their shards are even;
`versions` as in `expect`). A file entry is not strict: where the
condition holds, the deviation may show (the item is then xfailed with the entry's reason) or
may not (the item passes, and the report says which entry applied).

    - check: parity
      backend: [keras, gradient_tape, keras_xla, gradient_tape_xla]
      when: {dtype: float64, optimizer: sgd, settings: {momentum: "> 0"}}
      reason: Keras rounds momentum to float32 in float64 training (cases/features/float64-momentum.yaml)

A setting's condition is a value (equality) or a comparison: "> 0", ">= 0.5", "< 1e-3", "!= 0".

A run reads the shipped file, then every file given with `--expectations FILE` on top of it
(`--expectations none` drops the files before it, the shipped one included); an item takes
the first entry that applies, in that order, and its message names the file.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationError, field_validator

from conformance.case import CaseError, format_errors
from conformance.environment import versions_hold
from conformance.problem import Problem
from conformance.schema import Expect, Strict
from conformance.yamlio import YamlError, read_yaml

COMPARISON = re.compile(r"^\s*(>=|<=|!=|==|>|<)\s*([-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)\s*$")
OPERATORS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "!=": operator.ne,
             "==": operator.eq}
Condition = bool | float | str
OneOrMany = str | Annotated[list[str], Field(min_length=1)]


class When(Strict):
    dtype: Literal["float32", "float64"] | None = None
    optimizer: OneOrMany | None = None
    settings: dict[str, Condition] = {}  # the optimizer's settings
    loss: OneOrMany | None = None
    loss_settings: dict[str, Condition] = {}  # delta, from_logits, reduction
    schedule: OneOrMany | None = None  # v1.2: exponential, piecewise, cosine
    schedule_settings: dict[str, Condition] = {}  # the schedule's settings, and every (step, epoch)
    clip: OneOrMany | None = None  # v1.2: global_norm, norm, value
    activation: OneOrMany | None = None  # v1.2: some hidden layer has one of these activations
    precision: OneOrMany | None = None  # v1.2: mixed_bfloat16, mixed_float16
    loss_scale: OneOrMany | None = None  # v1.2: fixed, dynamic
    replicas: Condition | None = None  # v1.2: a number of replicas, or a comparison such as "> 1"
    shards: Literal["even", "uneven"] | None = None  # v1.2: whether some batch splits into unequal shards
    sample_weights: bool | None = None  # whether the data set has sample weights
    accumulate: Condition | None = None  # v1.3: batches per optimizer step, or a comparison such as "> 1"
    groups: Literal["equal", "unequal"] | None = None  # v1.3: whether some optimizer step's batches
    # differ in size or number (a short last batch, a partial last group)

    @field_validator("settings", "loss_settings", "schedule_settings")
    @classmethod
    def _comparisons(cls, conditions: dict[str, Condition]) -> dict[str, Condition]:
        for name, condition in conditions.items():
            if isinstance(condition, str) and not isinstance(condition, bool) and not COMPARISON.match(condition) \
                    and condition not in ("mean", "sum", "step", "epoch"):
                raise ValueError(f"{name}: {condition!r}; expected a value or a comparison such as '> 0'")
        return conditions


class KnownDeviation(Expect):
    when: When = When()


ENTRIES = TypeAdapter(list[KnownDeviation])


@dataclass(frozen=True)
class Expectations:
    """The entries of one or more files (or none), each with the file it came from."""

    entries: tuple[KnownDeviation, ...] = ()
    sources: tuple[str, ...] = ()  # per entry: the file it came from, for messages

    @property
    def source(self) -> str:
        """Every file that gave entries, in order (for the report)."""
        return ", ".join(dict.fromkeys(self.sources))

    def source_of(self, entry: KnownDeviation) -> str:
        return next(source for candidate, source in zip(self.entries, self.sources) if candidate is entry)

    def applicable(self, problem: Problem, check: str, backend: str | None, device: str | None,
                   versions: dict[str, str | None]) -> KnownDeviation | None:
        matching = [entry for entry in self.entries if holds(entry.when, problem)]
        return applicable(matching, check, backend, device, versions)  # type: ignore[arg-type]

    def __add__(self, other: Expectations) -> Expectations:
        return Expectations(self.entries + other.entries, self.sources + other.sources)


def load(path: Path | None) -> Expectations:
    """The file's entries; CaseError (file and field) when it is not valid; none without a file."""
    if path is None:
        return Expectations()
    display = str(path)
    try:
        data = read_yaml(path)
    except (YamlError, OSError, UnicodeDecodeError) as error:
        raise CaseError(f"{display}: {error}") from None
    try:
        entries = tuple(ENTRIES.validate_python(data or []))
    except ValidationError as error:
        raise CaseError(format_errors(display, error)) from None
    return Expectations(entries, (display,) * len(entries))


def load_all(paths: list[Path]) -> Expectations:
    """Every file's entries, in order: the first file's entries are looked at first."""
    combined = Expectations()
    for path in paths:
        combined += load(path)
    return combined


def holds(when: When, problem: Problem) -> bool:
    """Whether every condition of `when` holds for this training problem."""
    if when.dtype is not None and when.dtype != problem.dtype:
        return False
    if when.optimizer is not None and problem.optimizer.name not in _names(when.optimizer):
        return False
    if when.loss is not None and problem.loss not in _names(when.loss):
        return False
    if not _kind_holds(when.schedule, problem.schedule) or not _kind_holds(when.clip, problem.clip):
        return False
    if when.precision is not None and problem.precision not in _names(when.precision):
        return False
    if not _kind_holds(when.loss_scale, problem.loss_scale):
        return False
    if when.replicas is not None and not _all_hold({"replicas": when.replicas}, {"replicas": problem.replicas}):
        return False
    if when.shards is not None and when.shards != ("uneven" if uneven_shards(problem) else "even"):
        return False
    if when.sample_weights is not None and when.sample_weights != (problem.sample_weight is not None):
        return False
    if when.accumulate is not None and not _all_hold({"accumulate": when.accumulate},
                                                     {"accumulate": problem.accumulate}):
        return False
    if when.groups is not None and when.groups != ("unequal" if unequal_groups(problem) else "equal"):
        return False
    activations = {layer["activation"] for layer in problem.hidden or []}
    if when.activation is not None and not activations & set(_names(when.activation)):
        return False
    loss_settings = {"delta": problem.delta, "from_logits": problem.from_logits, "reduction": problem.reduction}
    schedule_settings = {} if problem.schedule is None else problem.schedule["settings"] | {
        "every": problem.schedule["every"]}
    return (_all_hold(when.settings, problem.optimizer.settings) and _all_hold(when.loss_settings, loss_settings)
            and _all_hold(when.schedule_settings, schedule_settings))


def uneven_shards(problem: Problem) -> bool:
    """Whether some step's batch (a full one, or the shorter last one) splits into shards of
    different sizes over the case's replicas (never with one replica)."""
    return any(size % problem.replicas for size in problem.batch_sizes)


def unequal_groups(problem: Problem) -> bool:
    """Whether some optimizer step's batches differ from a full group of full batches: a short
    last batch or a partial last group (never without accumulation)."""
    return problem.accumulate > 1 and (problem.n % problem.batch_size != 0
                                       or problem.steps_per_epoch % problem.accumulate != 0)


def _kind_holds(kinds: str | list[str] | None, given: dict[str, Any] | None) -> bool:
    """No condition, or the problem has a schedule (clip) of one of these kinds."""
    return kinds is None or (given is not None and given["kind"] in _names(kinds))


def _names(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _all_hold(conditions: dict[str, Condition], values: dict[str, Any]) -> bool:
    for name, condition in conditions.items():
        if name not in values:
            return False
        value = values[name]
        match = COMPARISON.match(condition) if isinstance(condition, str) else None
        if match:
            if not OPERATORS[match.group(1)](float(value), float(match.group(2))):
                return False
        elif value != condition:
            return False
    return True


def applicable(expect: list[Expect], check: str, backend: str | None, device: str | None,
               versions: dict[str, str | None]) -> Expect | None:
    """The first `expect` entry that covers this check, backend, device and installed versions."""
    for entry in expect:
        if entry.check != check or (entry.backend_names and backend not in entry.backend_names):
            continue
        if entry.device and entry.device != device:
            continue
        if versions_hold(entry.versions, versions):
            return entry
    return None
