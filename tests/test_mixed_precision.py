"""Mixed precision (v1.2 `training.precision`, `training.loss_scale`): the replay's rounding to
the compute dtype, its loss scaling and skipped steps, the exact comparison of scale and skips,
and that the derived bands still separate the bugs the spec names from rounding."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conformance import network, optimizers, reference, rounding_bands
from conformance.case import CaseFile, load
from conformance.checks.decisions import scaling_apart
from conformance.prepare import prepare
from conformance.problem import Trajectory
from tests.conftest import ROOT
from tests.test_schema import load_text

CASES = ROOT / "cases" / "precision"
LINEAR = """
dataset:
  generate: {n: 64, features: 2, x: {normal: {mean: 0, std: 1}}, weights: [1.5, -0.5], bias: 2,
             noise: {normal: {std: 0.1}}, seed: 7}
model: {init: {uniform: {low: -0.1, high: 0.1, seed: 3}}}
training: {epochs: 10, batch_size: 16, optimizer: {sgd: {learning_rate: 0.05}}, %s}
"""


def problem_of(write_case, training: str):
    return prepare(load_text(write_case, LINEAR % training)).problem


def shipped(name: str):
    path = CASES / f"{name}.yaml"
    return prepare(load(CaseFile(path, CASES)))


def test_rounding_to_the_compute_dtype():
    bf16, f16 = reference.rounder("bfloat16"), reference.rounder("float16")
    assert bf16(np.array([1 + 2**-9, 1 + 3 * 2**-9]))[0] == 1.0  # half a spacing: to even
    assert bf16(np.array([1 + 3 * 2**-9]))[0] == 1 + 2**-7
    assert f16(np.array([65504.0, 65520.0]))[0] == 65504.0 and np.isinf(f16(np.array([65520.0]))[0])
    assert reference.rounder("float32") is None and reference.rounder("float64") is None


def test_the_forward_pass_lands_on_the_compute_grid():
    rd = reference.rounder("bfloat16")
    model = network.layers(3, [{"units": 4, "activation": "tanh", "settings": None}], True)
    params = np.random.default_rng(0).normal(size=sum(layer.size for layer in model))
    output, tape = network.forward(params, np.random.default_rng(1).normal(size=(5, 3)), model, rd=rd)
    assert np.array_equal(rd(output), output) and np.array_equal(rd(tape[1][0]), tape[1][0])
    exact, _ = network.forward(params, np.random.default_rng(1).normal(size=(5, 3)), model)
    assert 0 < np.max(np.abs(output - exact) / np.abs(exact)) < 0.05


def test_mixed_precision_moves_the_replay_by_rounding_not_more(write_case):
    mixed = problem_of(write_case, "precision: mixed_bfloat16")
    plain = dataclasses.replace(mixed, precision=None)
    apart = np.abs(reference.replay(mixed).final - reference.replay(plain).final)
    assert 1e-5 < apart.max() < 0.05


def test_a_power_of_two_fixed_scale_changes_no_number_when_nothing_underflows(write_case):
    scaled = problem_of(write_case, "precision: mixed_float16, loss_scale: {fixed: 1024}")
    unscaled = dataclasses.replace(scaled, loss_scale=None)
    assert np.array_equal(reference.replay(scaled).params, reference.replay(unscaled).params)
    assert reference.replay(scaled).loss_scale.tolist() == [1024.0] * 10
    assert reference.replay(unscaled).loss_scale is None


def test_the_dynamic_rule_doubles_after_the_interval_and_halves_on_overflow():
    scaler = reference.LossScaler({"kind": "dynamic", "initial": 8.0, "growth_interval": 2})
    decisions = [scaler.skips(finite) for finite in (True, True, False, True)]
    assert decisions == [False, False, True, False] and scaler.scale == 8.0 and scaler.good == 1
    fixed = reference.LossScaler({"kind": "fixed", "scale": 4.0})
    assert not fixed.skips(False) and fixed.scale == 4.0


def test_an_overflowing_start_skips_steps_and_leaves_everything_as_it_was():
    problem = shipped("float16-adam-dynamic-overflow").problem
    replay = reference.replay(problem)
    steps = problem.steps_per_epoch
    assert replay.skipped[:2].tolist() == [steps, steps]  # 2^20 overflows for two whole epochs
    assert np.array_equal(replay.params[0], problem.initial_params())
    # started where those skips end (and two epochs shorter: no shuffling, so the same batches), the
    # training is the same number for number: a skipped step changes no parameter, no Adam t
    settled = dataclasses.replace(problem, epochs=problem.epochs - 2, loss_scale=problem.loss_scale | {
        "initial": problem.loss_scale["initial"] / 2 ** (2 * steps)})
    again = reference.replay(settled)
    assert np.array_equal(again.params, replay.params[2:]) and np.array_equal(again.skipped, replay.skipped[2:])


def test_scale_and_skips_are_compared_exactly():
    replay = Trajectory(np.zeros((3, 1)), np.zeros(3), loss_scale=np.array([4.0, 8.0, 8.0]),
                        skipped=np.array([2, 0, 1]))
    same = dataclasses.replace(replay)
    assert scaling_apart(same, replay) is None
    other = dataclasses.replace(replay, loss_scale=np.array([4.0, 8.0, 4.0]))
    assert scaling_apart(other, replay)["epoch"] == 3
    assert "recorded no loss scale" in scaling_apart(dataclasses.replace(replay, loss_scale=None), replay)["message"]
    assert scaling_apart(replay, dataclasses.replace(replay, loss_scale=None)) is None


def _share_of_band(prepared, trained: Trajectory) -> float:
    problem = prepared.problem
    replay = reference.replay(problem)
    band = rounding_bands.rounding_band(problem, replay, prepared.to_original)
    assert band["rtol"] <= band["limit"], "the case must stay comparable"
    return float(np.max(np.abs(trained.final - replay.final) / (band["atol"] + band["rtol"] * np.abs(replay.final))))


def test_the_band_catches_master_weights_kept_in_bfloat16(monkeypatch):
    prepared = shipped("bfloat16-master-weights-and-loss")
    rd = reference.rounder("bfloat16")
    original = optimizers.make_update

    def kept_in_bfloat16_update(*args, **kwargs):
        update = original(*args, **kwargs)
        step = update.step
        update.step = lambda p, g, rate: rd(step(p, g, rate))
        return update

    monkeypatch.setattr(reference, "make_update", kept_in_bfloat16_update)
    kept_in_bfloat16 = reference.replay(prepared.problem)
    monkeypatch.setattr(reference, "make_update", original)
    assert _share_of_band(prepared, kept_in_bfloat16) > 1.5


def test_a_float16_loss_overflows_where_the_float32_one_does_not():
    problem = shipped("float16-large-targets-loss-in-float32").problem
    residual = problem.y.astype(np.float64)  # from the zero init, the first residuals are the targets
    assert np.isinf(reference.rounder("float16")(residual**2)).any()
    assert np.isfinite(reference.replay(problem).loss).all()


@pytest.mark.parametrize("path", sorted(CASES.glob("*.yaml")), ids=lambda path: path.stem)
def test_every_shipped_precision_case_is_comparable(path):
    prepared = prepare(load(CaseFile(path, CASES)))
    replay = reference.replay(prepared.problem)
    spread = rounding_bands.rounding_spread(prepared.problem, replay, prepared.to_original)
    bands = rounding_bands.trajectory_bands(replay, spread)
    assert bands.comparable == len(replay.params), f"{path.stem}: only {bands.comparable} epochs comparable"


class _Value:
    def __init__(self, value: float) -> None:
        self.value = value

    def numpy(self) -> float:
        return self.value


class _Keras2Scaler:
    """The two things Keras2Skips reads of Keras 2's LossScaleOptimizer, set by hand."""

    def __init__(self, scale: float) -> None:
        self.loss_scale, self.dynamic_counter = _Value(scale), _Value(0)

    def after(self, scale: float, counter: int) -> None:
        self.loss_scale, self.dynamic_counter = _Value(scale), _Value(counter)


def test_keras2_skips_are_read_from_the_scaler_state():
    """Keras 2 advances `iterations` on a skipped step, so a skip is read from the scaler: its
    counter back at 0 without growth. Growth (counter 0, scale doubled) and a good step (counter
    up) are not skips; a skip at the floor of 1 (scale stays 1, counter 0) is."""
    from conformance.backends._keras_precision import Keras2Skips

    scaler = _Keras2Scaler(1024.0)
    skips = Keras2Skips(scaler)
    for scale, counter in [(512.0, 0), (512.0, 1), (512.0, 2), (1024.0, 0), (1024.0, 1), (512.0, 0)]:
        scaler.after(scale, counter)
        skips.after_step()
    assert skips.skipped == 2
    floor = _Keras2Scaler(1.0)
    at_floor = Keras2Skips(floor)
    floor.after(1.0, 0)
    at_floor.after_step()
    assert at_floor.skipped == 1


SATURATING_PROBABILITIES = """
dataset: {inline: {x: [-3, -2, -1, 1, 2, 3], y: [0, 0, 1, 0, 1, 0]}}
model: {init: {constant: {weights: [4.0], bias: 0.0}}}
training: {epochs: 3, batch_size: 6, loss: {bce: {from_logits: false}}, optimizer: {sgd: {learning_rate: 0.1}},
           precision: mixed_float16}
"""


@pytest.mark.parametrize("backend", ["torch", "lightning"])
def test_torch_bce_on_float16_probabilities_says_why_it_cannot_train(write_case, backend):
    """A logit of 12 is a probability of 1 in float16: BCELoss's backward gives NaN for the label 0
    there (its 1e-12 is 0 in float16), the weights go NaN, and the next forward's BCELoss refuses
    them. The item skips with torch's documented reason instead of failing (fuzz-40961-148)."""
    pytest.importorskip("torch")
    if backend == "lightning":
        pytest.importorskip("pytorch_lightning")
    from conformance import backends
    from conformance.backends import Unavailable

    problem = prepare(load_text(write_case, SATURATING_PROBABILITIES)).problem
    with pytest.raises(Unavailable, match="unsafe to autocast"):
        backends.load(backend).train(problem, "cpu")
