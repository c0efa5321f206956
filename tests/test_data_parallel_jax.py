"""Data parallelism on JAX: the `jax` backend's shard_map over host devices in a worker
(conformance/backends/_jax_sharded.py), Keras's DataParallel on JAX (`keras_jax`), and why
`keras_torch` has none. Even shards give the one-replica result; unequal shards give the mean of
the replicas' shard means (pmean), which weights a short shard's samples more, measured against
a float64 replay of that rule; `reduction: sum` combines with psum and gives the batch's sum."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from conformance import reference
from conformance.backends import Unavailable, _jax_sharded, keras_torch
from conformance.case import CaseFile, load
from conformance.prepare import prepare
from conformance.problem import Problem

CASE = """\
dataset: {inline: {x: [-1, 0, 1, 2, 3, 4, 5, 6], y: [-3, -1, 1, 3, 5, 7, 9, 11]}}
training: {epochs: 30, batch_size: 4, replicas: 2, optimizer: {sgd: {learning_rate: 0.01}}}
tolerance: {lstsq: null, trajectory: null}
"""
UNEVEN_CASE = CASE.replace(", 6]", "]").replace(", 11]", "]")  # a last batch of 3: shards of 2 and 1
SUM_CASE = UNEVEN_CASE.replace("optimizer:", "loss: {mse: {reduction: sum}}, optimizer:")


def problem_of(write_case, name: str, text: str) -> Problem:
    path = write_case(name, text)
    return prepare(load(CaseFile(path, path.parent))).problem


def pmean_replay(problem: Problem) -> np.ndarray:
    """float64 SGD on the linear mse model where each step's gradient is the mean over the
    replicas of their shard-mean gradients (sum of shard sums for reduction: sum)."""
    x, y, params, history = problem.x.astype(np.float64), problem.y.astype(np.float64), problem.initial_params(), []
    for epoch in range(problem.epochs):
        for step in range(problem.steps_per_epoch):
            parts = []
            for shard in problem.shards(problem.batch(epoch, step)):
                residual = x[shard] @ params[:-1] + params[-1] - y[shard]
                gradient = np.append(2 * x[shard].T @ residual, 2 * residual.sum())
                parts.append(gradient / len(shard) if problem.reduction == "mean" else gradient)
            combined = np.mean(parts, axis=0) if problem.reduction == "mean" else np.sum(parts, axis=0)
            params = params - problem.learning_rate * combined
        history.append(params.copy())
    return np.array(history)


@pytest.mark.parametrize(("n", "batch", "replicas", "shuffle"),
                         [(8, 4, 2, False), (7, 4, 2, True), (100, 8, 3, True), (10, 10, 4, False), (9, 3, 3, True)])
def test_every_replica_is_fed_problem_shards(write_case, n, batch, replicas, shuffle):
    xs, ys = list(range(n)), [2 * value + 1 for value in range(n)]
    order = "shuffle: {seed: 5}, " if shuffle else ""
    text = (f"dataset: {{inline: {{x: {xs}, y: {ys}}}}}\n"
            f"training: {{epochs: 3, batch_size: {batch}, replicas: {replicas}, {order}"
            "optimizer: {sgd: {learning_rate: 0.01}}}\n")
    problem = problem_of(write_case, "shards", text)
    rows, keep = _jax_sharded.shard_rows(problem)
    assert rows.shape == (3, problem.steps_per_epoch, replicas, -(-batch // replicas))
    for epoch in range(3):
        for step in range(problem.steps_per_epoch):
            for replica, shard in enumerate(problem.shards(problem.batch(epoch, step))):
                assert np.array_equal(rows[epoch, step, replica][keep[epoch, step, replica] > 0], shard)
                assert np.all(rows[epoch, step, replica][keep[epoch, step, replica] == 0] == shard[0])


@pytest.fixture
def jax_backend():
    pytest.importorskip("jax")
    from conformance.backends import jax as backend

    if backend.available():
        pytest.skip(backend.available())
    return backend


def test_even_shards_give_the_one_replica_result_on_two_devices_of_a_worker(jax_backend, write_case):
    problem = problem_of(write_case, "even", CASE)
    two = jax_backend.train(problem, "cpu")
    one = jax_backend.train(dataclasses.replace(problem, replicas=1), "cpu")
    np.testing.assert_allclose(two.params, one.params, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(two.final, reference.replay(problem).final, rtol=1e-5)
    info = two.info["replicas"]
    assert info["devices"] == ["cpu:0", "cpu:1"] and info["parameters_equal_across_replicas"] is True
    assert info["processes"][0] != os.getpid() and "lax.pmean" in info["collective"]  # in the worker
    assert ": 0 XLA all-reduce" not in info["collective"]  # the compiled program holds the collective
    assert "replicas" not in one.info


def test_unequal_shards_average_the_replicas_means(jax_backend, write_case):
    """A last batch of 3 split 2 + 1: pmean of the shard means weights the single sample by 1/2,
    the one-replica mean by 1/3; the run follows the pmean replay, not the one-replica one."""
    problem = problem_of(write_case, "uneven", UNEVEN_CASE)
    trained = jax_backend.train(problem, "cpu")
    np.testing.assert_allclose(trained.params, pmean_replay(problem), rtol=1e-5, atol=1e-6)
    apart = np.max(np.abs(trained.final - reference.replay(problem).final))
    assert apart > 1e-3, apart
    assert trained.info["replicas"]["shard_sizes"] == {"batch of 4": [2, 2], "batch of 3": [2, 1]}


def test_a_summed_loss_is_the_sum_of_the_shards_sums(jax_backend, write_case):
    problem = problem_of(write_case, "summed", SUM_CASE)
    trained = jax_backend.train(problem, "cpu")
    np.testing.assert_allclose(trained.params, reference.replay(problem).params, rtol=1e-5, atol=1e-6)
    assert "lax.psum" in trained.info["replicas"]["collective"]


@pytest.fixture
def keras_jax_backend():
    pytest.importorskip("jax")
    from conformance.backends import keras_jax

    if keras_jax.available():
        pytest.skip(keras_jax.available())
    return keras_jax


def test_keras_data_parallel_splits_as_problem_shards_and_matches_one_replica(keras_jax_backend, write_case):
    problem = problem_of(write_case, "keras-even", CASE)
    two = keras_jax_backend.train(problem, "cpu")
    np.testing.assert_allclose(two.final, reference.replay(problem).final, rtol=1e-5)
    info = two.info["replicas"]
    assert info["parameters_equal_across_replicas"] is True and len(info["devices"]) == 2
    assert "checked equal to Problem.shards for batches of 4" in info["split"]


def test_keras_data_parallel_cannot_split_an_odd_batch(keras_jax_backend, write_case):
    with pytest.raises(Unavailable, match="cannot split a batch of 3 over 2 devices"):
        keras_jax_backend.train(problem_of(write_case, "keras-uneven", UNEVEN_CASE), "cpu")


def test_keras_on_torch_says_why_it_has_no_data_parallelism(write_case):
    assert not getattr(keras_torch, "DATA_PARALLEL", False)
    assert "keras.distribution" in keras_torch.WHY_NOT_DATA_PARALLEL
    if keras_torch.available() is None:
        with pytest.raises(Unavailable, match="JAX only"):
            keras_torch.train(problem_of(write_case, "torch", CASE), "cpu")


def test_shard_map_all_reduces_a_cast_parameters_gradient_in_float16():
    """The formula behind the switch replica_sum_in_compute_dtype, held on the installed JAX: the
    gradient of a replicated float32 parameter cast to float16 inside shard_map is a psum of
    float16 values, converted to float32 after (a JAX that sums in float32 fails here)."""
    jax = pytest.importorskip("jax")
    from jax.sharding import Mesh, PartitionSpec

    jnp = jax.numpy
    mesh = Mesh(np.array(jax.devices()[:1]), ("r",))

    def loss(w, x):
        def replica(w, x):
            out = (x.astype(jnp.float16) @ w.astype(jnp.float16)).astype(jnp.float32)
            return jax.lax.pmean(jnp.mean(out), "r")

        return shard_map(replica, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec("r")),
                         out_specs=PartitionSpec())(w, x)

    if hasattr(jax, "shard_map"):
        shard_map = jax.shard_map
    else:  # JAX 0.4 (the jax04 env), where the same jaxpr shows psum2 on f16
        from jax.experimental.shard_map import shard_map

    text = str(jax.make_jaxpr(jax.grad(loss))(jnp.ones(3, jnp.float32), jnp.ones((4, 3), jnp.float32)))
    gradient_sums = [line.split("=")[0] for line in text.splitlines() if "psum" in line and "[3]" in line.split("=")[0]]
    assert gradient_sums and all("f16[3]" in line for line in gradient_sums), text  # w's gradient, (3,)


def test_the_replay_skips_where_the_replicas_float16_sum_overflows():
    """fuzz-91733-21: at the scale 65536 each replica's kernel gradient fits in float16 and their
    sum does not: with the all-reduce in float16 the fourth step is skipped, in float32 it is not."""
    from conformance.case import discover
    from tests.conftest import ROOT

    path = ROOT / "cases/data-parallel/two-replicas-float16-replica-sum-overflow.yaml"
    problem = prepare(load(discover([path])[0])).problem
    jax_switches = frozenset({"gradient_sum_in_compute_dtype", "replica_losses_averaged", "reported_loss_averaged"})
    in_float32 = reference.replay(problem, switches=jax_switches)
    in_float16 = reference.replay(problem, switches=jax_switches | {"replica_sum_in_compute_dtype"})
    assert list(in_float32.skipped[:4]) == [1, 1, 1, 0] and in_float32.loss_scale[3] == 65536
    assert list(in_float16.skipped[:4]) == [1, 1, 1, 1] and in_float16.loss_scale[3] == 32768
