"""Data parallelism on TensorFlow (conformance/backends/_tf_distributed.py): replica r receives
shard r of every step (Problem.shards, the short last batch included), the GradientTape loop
under MirroredStrategy trains a short-last-batch case to the one-replica replay, Keras's fit
weights that batch per replica (the finding, with its size), and one replica never leaves the
test process."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conformance import backends, reference, workers
from conformance.backends import _tf_distributed
from conformance.case import CaseFile, load
from conformance.prepare import prepare

pytest.importorskip("tensorflow")

CASE = """\
description: Mini-batches of 8 over 20 samples (the last has 4), shuffled, float64, replicas 3.
dataset:
  generate: {n: 20, features: 2, x: {normal: {mean: 0, std: 1}}, weights: [1.5, -0.5], bias: 2,
             noise: {normal: {std: 0.1}}, seed: 7}
model: {init: {uniform: {low: -0.1, high: 0.1, seed: 3}}}
training:
  epochs: 4
  batch_size: 8
  shuffle: {seed: 11}
  dtype: float64
  optimizer: {sgd: {learning_rate: 0.05}}
  replicas: 3
"""


def _prepare(folder, text):
    path = folder / "case.yaml"
    path.write_text(text, encoding="utf-8")
    return prepare(load(CaseFile(path, path.parent))).problem


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    return _prepare(tmp_path_factory.mktemp("dp"), CASE)


@pytest.fixture(scope="module")
def pool():
    pool = workers.Pool()
    yield pool
    pool.stop_all()


def test_replica_r_receives_shard_r_of_every_step(problem, pool):
    seen = pool.call(_tf_distributed.worker_kind(3), "conformance.backends._tf_distributed:replica_rows",
                     problem.to_data())
    expected = [[shard.tolist() for shard in problem.shards(batch)]
                for epoch in range(problem.epochs) for batch in problem.batches(epoch)]
    assert seen == expected
    assert [len(shard) for shard in expected[2]] == [2, 1, 1]  # the short last batch, split as the format says


def test_one_replica_trains_in_the_test_process(problem, monkeypatch):
    def refuse(*args):
        raise AssertionError("replicas == 1 must not start a worker")

    monkeypatch.setattr(_tf_distributed, "train_in_worker", refuse)
    trajectory = backends.load("gradient_tape").train(dataclasses.replace(problem, replicas=1), "cpu")
    assert "replicas" not in trajectory.info


@pytest.mark.slow  # trains in MirroredStrategy's worker
def test_the_tape_loop_matches_the_one_replica_replay_and_keras_cannot_build_uneven_first_shards(problem):
    replay = reference.replay(problem)
    tape = backends.load("gradient_tape").train(problem, "cpu")
    assert np.max(np.abs(tape.params - replay.params)) < 1e-12  # compute_average_loss(global_batch_size)
    info = tape.info["replicas"]
    assert info["replicas"] == 3 and len(info["devices"]) == 3 and info["parameters_equal_across_replicas"]
    # Keras scales each replica's mean by 1/R: the first batch (3, 3, 2) cannot build (keras#19246)
    with pytest.raises(backends.Unavailable, match="19246"):
        backends.load("keras").train(problem, "cpu")


@pytest.mark.slow  # trains in MirroredStrategy's worker
def test_keras_weights_a_short_last_batch_per_replica(tmp_path):
    """19 samples in batches of 8 over 2 replicas: the last batch's shards have 2 and 1 samples;
    Keras averages the two shard means (1/R each), where the replay weighs samples equally."""
    problem = _prepare(tmp_path, CASE.replace("n: 20", "n: 19").replace("replicas: 3", "replicas: 2"))
    replay = reference.replay(problem)
    keras = backends.load("keras").train(problem, "cpu")
    difference = np.max(np.abs(keras.params - replay.params))
    assert 1e-5 < difference < 1e-1
    assert keras.info["replicas"]["parameters_equal_across_replicas"]


@pytest.mark.slow  # trains in MirroredStrategy's worker
def test_the_tape_loop_accumulates_per_replica_and_steps_once_a_group(problem):
    """Three replicas, two batches a step (20 samples in batches of 8: groups of 8 + 8 and the
    short 4 alone): each replica sums its shards' gradients of loss / N in its own (SyncOnRead)
    accumulators; the group's step all-reduces them once. Float64: the replay of the loop's own
    formula (accumulate_divides_by_n) to 1e-12, and not the case format's step."""
    accumulated = dataclasses.replace(problem, accumulate=2)
    tape = backends.load("gradient_tape").train(accumulated, "cpu")
    own = reference.replay(accumulated, switches=frozenset({"accumulate_divides_by_n"}))
    assert np.max(np.abs(tape.params - own.params)) < 1e-12
    assert np.max(np.abs(tape.params - reference.replay(accumulated).params)) > 1e-6  # the short batch over N
    assert tape.info["replicas"]["parameters_equal_across_replicas"]
