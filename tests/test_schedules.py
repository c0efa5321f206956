"""The case format's schedules and clipping (conformance/schedules.py), checked against values
worked out by hand from the spec's formulas, and the replay following them step by step."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conformance import schedules


def plain(kind: str, every: str = "step", **settings) -> dict:
    defaults = {"exponential": {"staircase": False}, "piecewise": {}, "cosine": {"alpha": 0.0, "warmup_steps": 0}}
    return {"kind": kind, "settings": defaults[kind] | settings, "every": every}


@pytest.mark.parametrize(("schedule", "t", "expected"), [
    (plain("exponential", decay_rate=0.5, decay_steps=10), 5, 0.1 * 0.5 ** 0.5),
    (plain("exponential", decay_rate=0.5, decay_steps=10, staircase=True), 19, 0.05),
    (plain("exponential", decay_rate=0.5, decay_steps=10, staircase=True), 20, 0.025),
    (plain("piecewise", boundaries=[3, 7], values=[0.1, 0.01, 0.001]), 2, 0.1),
    (plain("piecewise", boundaries=[3, 7], values=[0.1, 0.01, 0.001]), 3, 0.01),  # AT the boundary
    (plain("piecewise", boundaries=[3, 7], values=[0.1, 0.01, 0.001]), 7, 0.001),
    (plain("cosine", decay_steps=10, warmup_steps=4), 0, 0.0),  # the warm-up starts at 0
    (plain("cosine", decay_steps=10, warmup_steps=4), 2, 0.05),
    (plain("cosine", decay_steps=10, warmup_steps=4), 4, 0.1),  # decay_steps excludes the warm-up
    (plain("cosine", decay_steps=10, warmup_steps=4), 9, 0.1 * (1 + math.cos(math.pi / 2)) / 2),
    (plain("cosine", decay_steps=10, alpha=0.2), 10, 0.02),
    (plain("cosine", decay_steps=10, alpha=0.2), 25, 0.02),  # held after decay_steps, never rising again
])
def test_rates_follow_the_case_format(schedule, t, expected):
    assert schedules.rate(schedule, 0.1, t) == pytest.approx(expected, rel=1e-15, abs=1e-18)


def test_per_epoch_rates_are_constant_within_an_epoch_and_count_epochs():
    rates = schedules.step_rates(plain("exponential", "epoch", decay_rate=0.5, decay_steps=1), 1.0, 3, 4)
    assert rates.tolist() == [[1.0] * 4, [0.5] * 4, [0.25] * 4]
    per_step = schedules.step_rates(plain("exponential", decay_rate=0.5, decay_steps=1), 1.0, 2, 2)
    assert per_step.tolist() == [[1.0, 0.5], [0.25, 0.125]]


TENSORS = [slice(0, 2), slice(2, 3)]  # a kernel of two weights, then the bias


def test_clipping_by_global_norm_per_tensor_and_value():
    gradient = np.array([3.0, 4.0, 12.0])  # kernel [3, 4] (norm 5), bias [12]; norm 13 in all
    assert schedules.clip(gradient, {"kind": "global_norm", "threshold": 1.3}, TENSORS) == pytest.approx(gradient / 10)
    assert schedules.clip(gradient, {"kind": "norm", "threshold": 2.5}, TENSORS) == pytest.approx([1.5, 2.0, 2.5])
    assert schedules.clip(gradient, {"kind": "value", "threshold": 3.5}, TENSORS).tolist() == [3.0, 3.5, 3.5]
    assert schedules.clip(gradient, {"kind": "global_norm", "threshold": 13.0}, TENSORS) is not gradient  # a copy
    assert schedules.clip(gradient, None, TENSORS) is gradient


def test_the_replay_applies_each_steps_rate_and_clips_before_weight_decay():
    from conformance.problem import Optimizer, Problem
    from conformance.reference import replay

    x, y = np.array([[1.0], [2.0]]), np.array([2.0, 4.0])
    problem = Problem("p", x, y, np.zeros(1), None, epochs=2, batch_size=1, orders=None, reduction="mean",
                      optimizer=Optimizer("sgd", {"learning_rate": 0.1, "momentum": 0.0, "nesterov": False,
                                                  "weight_decay": 0.5}),
                      dtype="float64", schedule=plain("piecewise", boundaries=[1], values=[0.1, 0.01]),
                      clip={"kind": "value", "threshold": 1.0})
    w, expected = 0.0, []
    for step in range(4):
        row = step % 2
        gradient = 2 * (w * x[row, 0] - y[row]) * x[row, 0]
        w -= (0.1 if step == 0 else 0.01) * (np.clip(gradient, -1.0, 1.0) + 0.5 * w)
        if row == 1:
            expected.append(w)
    trajectory = replay(problem)
    assert trajectory.params[:, 0].tolist() == pytest.approx(expected, rel=1e-15)
    assert trajectory.rates.tolist() == [0.01, 0.01]  # the rate of each epoch's last step


def test_a_rate_that_differs_from_the_case_formats_is_named_with_its_epoch():
    from conformance.checks.trajectory import rates_apart
    from conformance.problem import Trajectory

    def run(rates):
        return Trajectory(np.zeros((3, 1)), np.zeros(3), rates=None if rates is None else np.array(rates))

    replay = run([0.1, 0.05, 0.025])
    assert rates_apart(run([0.1, 0.05 * (1 + 3e-8), 0.025]), replay) is None  # a float32 rate: not named
    assert rates_apart(run([0.1, 0.1, 0.025]), replay) == {"epoch": 2, "got": 0.1, "expected": 0.05}
    assert rates_apart(run(None), replay) is None and rates_apart(replay, run(None)) is None


def test_a_staircase_by_float32_reciprocal_steps_down_late_where_the_product_rounds_below_the_count():
    """staircase_by_float32_reciprocal: floor(float32(t) * float32(1 / decay_steps)), as
    tf.function and jax.jit compute t / decay_steps: 107 * float32(1 / 107) is 0.99999994."""
    schedule = plain("exponential", decay_rate=0.25, decay_steps=107, staircase=True)
    assert schedules.rate(schedule, 0.1, 107) == pytest.approx(0.025)
    assert schedules.rate(schedule, 0.1, 107, reciprocal=True) == 0.1  # one step late
    assert schedules.rate(schedule, 0.1, 108, reciprocal=True) == pytest.approx(0.025)
    exact = plain("exponential", decay_rate=0.25, decay_steps=10, staircase=True)  # 10 * float32(0.1) is 1
    assert schedules.rate(exact, 0.1, 10, reciprocal=True) == schedules.rate(exact, 0.1, 10)
    rates = schedules.step_rates(schedule, 0.1, 110, 1, reciprocal=True)
    assert rates[106, 0] == rates[107, 0] == 0.1 and rates[108, 0] == pytest.approx(0.025)
