"""Gradient accumulation (v1.3 `training.accumulate`): the case format's step in the replay,
the idiom's formula (switch accumulate_divides_by_n), the conditions and the fuzzer's draws."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conformance import fuzz_draws, shrink
from conformance.expectations import When, holds
from conformance.reference import group_factors, replay
from tests.test_reference import problem


def data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2))
    return x, x @ [1.5, -0.5] + 0.3 + rng.normal(0, 0.1, n)


@pytest.mark.parametrize("shuffled", [False, True])
def test_a_group_of_batches_steps_as_one_batch_of_their_union(shuffled):
    """N batches of b accumulated are one batch of N b: the union's mean gradient, one step."""
    x, y = data(36)
    orders = np.array([np.random.default_rng(epoch).permutation(36) for epoch in range(5)]) if shuffled else None
    union = replay(problem(x, y, epochs=5, batch_size=12, orders=orders, momentum=0.9))
    accumulated = replay(dataclasses.replace(problem(x, y, epochs=5, batch_size=4, orders=orders, momentum=0.9),
                                             accumulate=3))
    np.testing.assert_allclose(accumulated.params, union.params, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(accumulated.loss, union.loss, rtol=1e-13)


def test_a_partial_last_group_and_a_short_batch_are_means_over_their_own_samples():
    """10 samples, batches of 3 (the fourth has 1), a step every 3: steps over 9 and over 1
    sample, each its own mean: the same as batches of 9 (the last has 1)."""
    x, y = data(10)
    steps = problem(x, y, epochs=4, batch_size=9)
    accumulated = dataclasses.replace(problem(x, y, epochs=4, batch_size=3), accumulate=3)
    assert accumulated.optimizer_steps_per_epoch == 2 and [len(g) for g in accumulated.groups(0)] == [3, 1]
    np.testing.assert_allclose(replay(accumulated).params, replay(steps).params, rtol=1e-13, atol=1e-15)


def test_the_idiom_divides_every_batch_by_n():
    """accumulate_divides_by_n: each batch's mean gradient over N, a partial group and a short
    batch included; without it, each batch's share of the step's samples."""
    accumulated = dataclasses.replace(problem(*data(10), batch_size=3), accumulate=3)
    groups = list(accumulated.groups(0))
    assert group_factors(accumulated, groups[0], frozenset()) == pytest.approx([1 / 3] * 3)
    assert group_factors(accumulated, groups[1], frozenset()) == [1.0]
    assert group_factors(accumulated, groups[1], frozenset({"accumulate_divides_by_n"})) == [1 / 3]
    short = dataclasses.replace(problem(*data(8), batch_size=3), accumulate=3)  # batches 3, 3, 2
    assert group_factors(short, next(short.groups(0)), frozenset()) == pytest.approx([3 / 8, 3 / 8, 2 / 8])
    summed = dataclasses.replace(problem(*data(8), batch_size=3, reduction="sum"), accumulate=3)
    assert group_factors(summed, next(summed.groups(0)), frozenset()) == [1.0, 1.0, 1.0]
    idiom = replay(accumulated, switches=frozenset({"accumulate_divides_by_n"}))
    assert not np.allclose(idiom.params, replay(accumulated).params, rtol=1e-6)


def test_a_per_step_schedule_counts_optimizer_steps():
    x, y = data(12)
    base = problem(x, y, epochs=3, batch_size=2)
    schedule = {"kind": "exponential", "settings": {"decay_steps": 1, "decay_rate": 0.5, "staircase": False},
                "every": "step"}
    accumulated = dataclasses.replace(base, accumulate=3, schedule=schedule)
    rates = replay(accumulated).rates
    assert rates is not None
    np.testing.assert_allclose(rates, 0.1 * 0.5 ** np.array([1, 3, 5]))  # 2 steps an epoch: the last is 2k + 1


def test_conditions_on_accumulation():
    x, y = data(10)
    equal = dataclasses.replace(problem(x, y, batch_size=5), accumulate=2)
    partial = dataclasses.replace(problem(x, y, batch_size=2), accumulate=2)  # 5 batches: groups 2, 2, 1
    assert holds(When(accumulate="> 1"), equal) and not holds(When(accumulate="> 1"), problem(x, y, batch_size=5))
    assert holds(When(groups="equal"), equal) and holds(When(groups="unequal"), partial)
    assert holds(When(groups="equal"), problem(x, y, batch_size=3))  # no accumulation: never unequal


def test_the_fuzzer_draws_accumulation_and_the_shrinker_can_remove_it():
    drawn = [fuzz_draws.draw(7, index) for index in range(200)]
    accumulating = [case for case in drawn if "accumulate" in case["training"]]
    assert 3 <= len(accumulating) <= 50  # one mini-batch case in eight
    assert all(2 <= case["training"]["accumulate"] <= 4 and case["training"]["batch_size"] for case in accumulating)
    case = accumulating[0]
    assert "accumulate" in shrink.reduction_space(case)
    assert "accumulate" not in shrink.reduced(case, {"accumulate": 1})["training"]
    assert shrink.reduced(case, {})["training"]["accumulate"] == case["training"]["accumulate"]


def test_across_epochs_a_partial_group_completes_with_the_next_epochs_batches():
    """accumulate_across_epochs (Keras 3): 5 batches an epoch, a step every 3: steps end at
    batches 3, 6, 9 of the 10; the 10th never steps. Epoch 1 ends after one step, epoch 2 after two."""
    x, y = data(10)
    accumulated = dataclasses.replace(problem(x, y, epochs=2, batch_size=2), accumulate=3)
    groups = list(accumulated.step_groups(across_epochs=True))
    assert [[epoch for epoch, _ in group] for group in groups] == [[0, 0, 0], [0, 0, 1], [1, 1, 1], [1]]
    carried = replay(accumulated, switches=frozenset({"accumulate_across_epochs", "accumulate_divides_by_n"}))
    # the same three steps by hand: one epoch of the 18 samples those groups cover, in batches of 6
    by_hand = replay(problem(np.vstack([x, x[:8]]), np.concatenate([y, y[:8]]), epochs=1, batch_size=6))
    np.testing.assert_allclose(carried.params[1], by_hand.params[0], rtol=1e-13, atol=1e-15)
    assert not np.allclose(carried.params, replay(accumulated).params)


def test_keras_schedule_counts_batches_at_each_update():
    """schedule_counts_batches: update k (from 1) takes the rate at t = k N - 1."""
    x, y = data(12)
    schedule = {"kind": "exponential", "settings": {"decay_steps": 1, "decay_rate": 0.5, "staircase": False},
                "every": "step"}
    accumulated = dataclasses.replace(problem(x, y, epochs=2, batch_size=2), accumulate=3, schedule=schedule)
    rates = replay(accumulated, switches=frozenset({"schedule_counts_batches"})).rates
    np.testing.assert_allclose(rates, 0.1 * 0.5 ** np.array([5, 11]))  # the last update of each epoch


def test_a_float16_backward_carries_the_groups_weight_unless_the_optimizer_accumulates():
    """(loss / N).backward() under a loss scale S: the cotangents carry S / N, so a batch whose
    S-scaled float16 gradient overflows does not overflow in a group of 4; optimizer-level
    accumulation (Keras 3, optax.MultiSteps) backpropagates S and divides afterwards."""
    x = np.ones((16, 1))
    y = np.full(16, 100.0)  # at zero, S = 512: each sample's cotangent 2 * 100 / 4 * S, the kernel's sum of 4
    scaled = dataclasses.replace(problem(x, y, batch_size=4), dtype="float32", precision="mixed_float16",
                                 loss_scale={"kind": "dynamic", "initial": 512.0, "growth_interval": 1000})
    assert replay(scaled).skipped[0] == 1  # 102,400 > 65,504: the first step skipped, then S = 256 passes
    accumulated = dataclasses.replace(scaled, accumulate=4)
    idiom = replay(accumulated, switches=frozenset({"accumulate_divides_by_n"}))
    assert idiom.skipped[0] == 0 and idiom.loss_scale[0] == 512.0
    assert replay(accumulated).skipped[0] == 0  # the union's loss: each batch weighs 1/4 inside too
    optimizer_level = replay(accumulated, switches=frozenset({"accumulate_divides_by_n", "accumulate_across_epochs"}))
    assert optimizer_level.skipped[0] == 1


def test_optax_multisteps_keeps_a_non_finite_group_in_its_accumulator():
    """Why jax skips accumulation under a dynamic loss scale (the backend's Unavailable): with
    `apply_if_finite` inside `MultiSteps`, a group whose gradient overflowed is skipped, but its
    accumulator is reset as (1 - emit) * acc, NaN for an infinite acc, so every later group is
    skipped too. When an optax release fails this test, the skip can be lifted."""
    jnp = pytest.importorskip("jax.numpy")
    optax = pytest.importorskip("optax")
    optimizer = optax.MultiSteps(optax.apply_if_finite(optax.sgd(0.1), 2**31 - 1), every_k_schedule=2,
                                 use_grad_mean=True)
    params = {"w": jnp.zeros(2)}
    state = optimizer.init(params)
    finite_after = []
    for gradient in ([1.0, 1.0], [np.inf, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]):
        updates, state = optimizer.update({"w": jnp.asarray(gradient)}, state, params)
        params = optax.apply_updates(params, updates)
        if int(state.mini_step) == 0:  # a group ended
            finite_after.append(bool(state.inner_opt_state.last_finite))
    assert finite_after == [False, False, False]  # the second and third groups were finite
    assert np.all(np.asarray(params["w"]) == 0.0)


def test_keras_skipped_steps_count_updates_when_it_accumulates():
    """Keras 3's `iterations` count updates (`_iterations // N`) under gradient_accumulation_steps,
    across epochs: 5 batches an epoch, N = 3, updates end batches 3, 6, 9, 12 and 15 (1, 2 and 2
    an epoch: 1, 3, 5 so far). A skipped step is an update that did not happen, not a batch."""
    from conformance.backends._keras_common import EpochRecords

    records = EpochRecords()
    records.problem = dataclasses.replace(problem(*data(10), epochs=3, batch_size=2), accumulate=3,
                                          loss_scale={"kind": "fixed", "scale": 128.0})
    records.reset_records()
    for applied in (1, 3, 5):
        records.record_scaling(128.0, applied)
    assert records.history_skipped.tolist() == [0, 0, 0]
    records.reset_records()
    for applied in (1, 2, 4):  # the second epoch's second update did not happen
        records.record_scaling(128.0, applied)
    assert records.history_skipped.tolist() == [0, 1, 0]
