"""Each framework's own formulas: the switches of the float64 replay (conformance/formulas.yaml).

A switch names one known, documented way a framework computes differently from the case
format (Keras's epsilon placements, float64 hyperparameters rounded to float32, the rate kept in
a momentum buffer, ...). `reference.replay` runs any set of them; the case format's replay is the
one with none. A backend's switches on a case are those whose backends, versions and `when`
conditions all hold there (`switches_for`). What each switch changes in the replay:

    epsilon_hat                 Adam: p -= lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
    epsilon_inside_root         RMSprop, Adagrad: g / sqrt(v + eps) (centered: sqrt(v - a^2 + eps))
    hyperparameters_in_float32  SGD's momentum and Adam's betas (in beta^t) rounded to float32
    bias_correction_in_float32  Adam's 1 - beta^t a float32 power of the float32 beta
    rate_in_momentum            SGD: v = mu v - lr_t g, p += v; RMSprop: b = mu b + lr_t d, p -= b
    schedule_in_float32         every scheduled rate rounded to float32 (its float32 arithmetic is
                                covered by the band: perturbed replays move it by float32's u)
    amsgrad_on_corrected_moment v_max = max(v_max, v / (1 - b2^t)), p -= lr m_hat / (sqrt(v_max) + eps)
    clip_norm_plus_epsilon      norm clipping multiplies by min(1, c / (norm + 1e-6))
    clip_after_l2               coupled weight decay added before clipping, not after
    skipped_steps_counted       a skipped step (dynamic loss scale) advances Adam's t and the schedule
    schedule_counts_skipped_steps  a skipped step advances the schedule (not Adam's t)
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from pydantic import Field, TypeAdapter

from conformance.environment import versions_hold
from conformance.expectations import When, holds
from conformance.problem import Problem
from conformance.schema import Strict
from conformance.yamlio import read_yaml

FILE = Path(__file__).with_name("formulas.yaml")

NAMES = frozenset({
    "epsilon_hat", "epsilon_inside_root", "hyperparameters_in_float32", "bias_correction_in_float32",
    "rate_in_momentum", "schedule_in_float32", "amsgrad_on_corrected_moment", "clip_norm_plus_epsilon",
    "clip_after_l2", "skipped_steps_counted", "schedule_counts_skipped_steps",
})

Switches = frozenset[str]
NONE: Switches = frozenset()


class Switch(Strict):
    """One framework difference, as formulas.yaml states it."""

    name: str
    backends: list[str] = Field(min_length=1)
    versions: dict[str, str] = {}
    when: When = When()
    reason: str
    source: str
    shows: str

    def model_post_init(self, _: Any) -> None:
        if self.name not in NAMES:
            raise ValueError(f"name: {self.name!r} is not a formula of the replay ({', '.join(sorted(NAMES))})")


@cache
def catalogue() -> tuple[Switch, ...]:
    """Every switch of formulas.yaml, in file order."""
    return tuple(TypeAdapter(list[Switch]).validate_python(read_yaml(FILE)))


def applying(problem: Problem, backend: str, versions: dict[str, str | None]) -> tuple[Switch, ...]:
    """The switches of `backend` that hold for this problem and these installed versions."""
    return tuple(switch for switch in catalogue()
                 if backend in switch.backends and versions_hold(switch.versions, versions)
                 and holds(switch.when, problem))


def switches_for(problem: Problem, backend: str, versions: dict[str, str | None]) -> Switches:
    """The names of the switches the replay of `backend`'s own formulas runs on this problem."""
    return frozenset(switch.name for switch in applying(problem, backend, versions))


def describe(switches: Switches) -> str:
    return ", ".join(sorted(switches)) or "none"
