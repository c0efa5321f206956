"""Each framework's own formulas: the switches of the float64 replay (conformance/formulas.yaml).

A switch names one known, documented way a framework computes differently from the case
format (Keras's epsilon placements, float64 hyperparameters rounded to float32, the rate kept in
a momentum buffer, ...). `reference.replay` runs any set of them; the case format's replay is the
one with none. A backend's switches on a case are those whose backends, versions and `when`
conditions all hold there (`switches_for`). What each switch changes in the replay:

    epsilon_hat                 Adam: p -= lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
    epsilon_inside_root         RMSprop, Adagrad: g / sqrt(v + eps) (centered: sqrt(v - a^2 + eps))
    hyperparameters_in_float32  SGD's momentum, Adam's betas (in beta^t), Adagrad's initial accumulator as float32
    bias_correction_in_float32  Adam's 1 - beta^t a float32 power of the float32 beta
    rate_in_momentum            SGD: v = mu v - lr_t g, p += v; RMSprop: b = mu b + lr_t d, p -= b
    schedule_in_float32         every scheduled rate rounded to float32 (its float32 arithmetic is
                                covered by the band: perturbed replays move it by float32's u)
    amsgrad_on_corrected_moment v_max = max(v_max, v / (1 - b2^t)), p -= lr m_hat / (sqrt(v_max) + eps)
    clip_norm_plus_epsilon      norm clipping multiplies by min(1, c / (norm + 1e-6))
    clip_after_l2               coupled weight decay added before clipping, not after
    skipped_steps_counted       a skipped step (dynamic loss scale) advances Adam's t and the schedule
    schedule_counts_skipped_steps  a skipped step advances the schedule (not Adam's t)
    l2_factor_in_float32        coupled weight decay 2 * float32(decay / 2) (Keras's L2 regularizer)
    activation_constants_in_float32  GELU's 1/sqrt(2) and 0.044715, LeakyReLU's slope as float32
    gelu_divides_by_float32_root_2  with the above, exact GELU's z / float32(sqrt(2)) (TensorFlow < 2.19)
    softplus_threshold          softplus(z) = z, softplus'(z) = 1 above z = 20
    epoch_from_applied_steps    a per-epoch schedule's epoch is the applied steps // steps per epoch
    replica_losses_averaged     a step's gradient is the mean of the replicas' own losses' gradients
    clip_per_replica            each replica's gradient clipped before the all-reduce sums them
    replica_scale_in_float32    each replica's loss scaled by float32(1 / R), the reported loss by R float32(1 / R)
    reported_loss_averaged      the step's reported loss is the mean of the replicas' own losses
    replica_share_after_backward  a replica's weight applied after its backward pass (DDP's averaging),
                                not inside it: its compute-dtype cotangents carry the whole loss scale
    step_size_in_float32        Adam's lr / (1 - beta_1^t) rounded to float32 every step
    staircase_by_float32_reciprocal  a staircase's exponent floor(float32(t) * float32(1 / decay_steps))
    weighted_losses_in_float32  each sample's weighted loss float32(loss_i) float32(w_i) in float32,
                                its gradient's weight float32(float32(1 / n) w_i)
    gelu_terms_in_compute_dtype  no formula changes: the band's GELU rounding is the compute dtype's u
                                times 0.5 |z| (1 + |t|), as 1 + t is rounded there (both forms)
    gelu_tanh_terms_in_compute_dtype  the same for the tanh form only
    accumulate_divides_by_n     gradient accumulation: each batch's gradient over N (`accumulate`), not
                                over its share of the step's samples (a partial group, a short batch, `sum`)
    accumulate_across_epochs    gradient accumulation over the whole training's batches: a partial group
                                completes with the next epoch's first batches; the last one never steps
    accumulated_mean_in_float32  with accumulation, the running mean acc + (g - acc) / (k + 1) of a
                                group's gradients stored in float32 between its batches
    schedule_counts_batches     with accumulation, a per-step schedule's t is the batches trained before
                                the update's last one (update k: t = k N - 1), not the updates so far
    gradient_sum_in_compute_dtype  no formula changes: the band's gradient sums are two roundings of
                                the compute dtype off, and a decision is open where a partial sum could overflow
    replica_sum_in_compute_dtype  the replicas' scaled gradients all-reduced in the compute dtype: a step
                                whose sum overflows there is skipped (jax's shard_map psum of float16)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import Field, TypeAdapter

from conformance.environment import versions_hold
from conformance.expectations import COMPARISON, When, holds
from conformance.problem import Problem
from conformance.schema import Strict
from conformance.yamlio import read_yaml

FILE = Path(__file__).with_name("formulas.yaml")
START = "<!-- switches: generated by python -m conformance.formulas; do not edit -->"
END = "<!-- end switches -->"

NAMES = frozenset({
    "epsilon_hat", "epsilon_inside_root", "hyperparameters_in_float32", "bias_correction_in_float32",
    "rate_in_momentum", "schedule_in_float32", "amsgrad_on_corrected_moment", "clip_norm_plus_epsilon",
    "clip_after_l2", "skipped_steps_counted", "schedule_counts_skipped_steps", "l2_factor_in_float32",
    "activation_constants_in_float32", "softplus_threshold", "epoch_from_applied_steps",
    "replica_losses_averaged", "clip_per_replica", "step_size_in_float32",
    "gradient_sum_in_compute_dtype", "reported_loss_averaged",
    "replica_scale_in_float32", "gelu_divides_by_float32_root_2", "weighted_losses_in_float32",
    "staircase_by_float32_reciprocal", "gelu_terms_in_compute_dtype", "gelu_tanh_terms_in_compute_dtype",
    "accumulate_divides_by_n", "accumulate_across_epochs", "schedule_counts_batches",
    "accumulated_mean_in_float32", "replica_share_after_backward", "replica_sum_in_compute_dtype",
})

Switches = frozenset[str]
NONE: Switches = frozenset()
# the switches whose formula computes in float32 (a power, a quotient, a schedule): the replay
# takes the exact result of that float32 arithmetic, which a framework may round a unit or two
# otherwise, so a hand-set tolerance is widened by that arithmetic's derived band
FLOAT32_ARITHMETIC: Switches = frozenset({"bias_correction_in_float32", "step_size_in_float32",
                                          "schedule_in_float32"})


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
    return tuple(switch for switch in catalogue() + declared_outside(backend)
                 if backend in switch.backends and versions_hold(switch.versions, versions)
                 and holds(switch.when, problem))


@cache
def declared_outside(backend: str) -> tuple[Switch, ...]:
    """The switches a backend from outside the project declares in its module's SWITCHES (the
    entries of formulas.yaml, `backends` being itself); none for a shipped backend."""
    from conformance import backends
    from conformance.schema import BACKEND_NAMES

    if backend in BACKEND_NAMES or backend not in backends.MODULES:
        return ()
    declared = getattr(backends.load(backend), "SWITCHES", [])
    return tuple(TypeAdapter(list[Switch]).validate_python([{"backends": [backend]} | dict(entry)
                                                            for entry in declared]))


def switches_for(problem: Problem, backend: str, versions: dict[str, str | None]) -> Switches:
    """The names of the switches the replay of `backend`'s own formulas runs on this problem."""
    return frozenset(switch.name for switch in applying(problem, backend, versions))


def describe(switches: Switches) -> str:
    return ", ".join(sorted(switches)) or "none"


def markdown_table(switches: Iterable[Switch] | None = None) -> str:
    """The switches (default: the whole catalogue) as a Markdown table, one row per entry, for a
    page in docs/ (the cases are linked as ../cases/...)."""
    rows = ["| switch | backends | versions | when | what differs | framework source | shown by |",
            "|---|---|---|---|---|---|---|"]
    for switch in catalogue() if switches is None else switches:
        versions = ", ".join(f"{package} {specifier}" for package, specifier in switch.versions.items()) or "all"
        source = f"`{switch.source}`" if "`" not in switch.source else switch.source
        shown = f"[{switch.shows.removeprefix('cases/').removesuffix('.yaml')}](../{switch.shows})"
        cells = [f"`{switch.name}`", ", ".join(switch.backends), versions, when_text(switch.when),
                 switch.reason, source, shown]
        rows.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(rows) + "\n"


def when_text(when: When) -> str:
    """The conditions of `when` in one line: "optimizer: rmsprop or adagrad; epsilon > 0"."""
    parts = []
    for field, value in when.model_dump(exclude_defaults=True).items():
        conditions = value.items() if isinstance(value, dict) else [(field, value)]
        parts += [_condition(name, condition) for name, condition in conditions]
    return "; ".join(parts) or "always"


def _condition(name: str, value: Any) -> str:
    if isinstance(value, list):
        return f"{name}: {' or '.join(map(str, value))}"
    if isinstance(value, str) and COMPARISON.match(value):
        return f"{name} {value.strip()}"
    return f"{name}: {str(value).lower() if isinstance(value, bool) else value}"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def with_table(text: str, table: str) -> str:
    """`text` with its generated section (between START and END) replaced by `table` (blank lines
    around it, so that Markdown ends the table before END)."""
    before, start, rest = text.partition(START)
    _, end, after = rest.partition(END)
    if not start or not end:
        raise ValueError(f"no generated section: expected a line {START} and, after it, {END}")
    return f"{before}{START}\n\n{table}\n{END}{after}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.formulas",
                                     description="Print the switches of formulas.yaml as a Markdown table.")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--write", type=Path, metavar="PATH", help="replace the generated section of PATH")
    where.add_argument("--check", type=Path, metavar="PATH", help="exit 1 when PATH's generated section is stale")
    options = parser.parse_args(argv)
    table = markdown_table()
    if options.write is None and options.check is None:
        print(table, end="")
        return 0
    path = options.write or options.check
    current = path.read_text(encoding="utf-8")
    try:
        updated = with_table(current, table)
    except ValueError as error:
        print(f"{path}: {error}", file=sys.stderr)
        return 1
    if options.check is not None:
        if updated != current:
            print(f"{path} is stale: regenerate with python -m conformance.formulas --write {path}", file=sys.stderr)
            return 1
        return 0
    path.write_text(updated, encoding="utf-8")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
