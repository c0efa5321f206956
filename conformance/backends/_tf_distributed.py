"""TensorFlow data parallelism (`training.replicas` > 1) for `keras`, `keras_xla`,
`gradient_tape` and `gradient_tape_xla`: `tf.distribute.MirroredStrategy` over R devices.

On a CPU the R devices are logical CPU devices (`tf.config.set_logical_device_configuration`),
which must exist before TensorFlow's runtime initialises. The test process cannot promise that
(any TensorFlow op, in any earlier case or test, initialises it, and a fixed number made at
import would cap R), so a replicated case trains in a worker process of its own kind per R
(conformance.workers), whose setup makes exactly R logical CPUs before anything else runs;
replicas == 1 never comes here and keeps the test process's old path. On GPUs each replica gets
one physical GPU (R of them must exist).

Feeding: `strategy.distribute_datasets_from_function` with one dataset whose elements are the
shards of every step in order (step 0 shard 0, step 0 shard 1, ...): MirroredStrategy has one
input pipeline on one machine and hands its consecutive elements to replicas 0..R-1, so replica r
gets `Problem.shards(batch)[r]` (tests/test_data_parallel_tf.py checks the split).
`experimental_distribute_dataset` of the global batches would re-split them its own way: a short
last batch of 4 over 3 replicas becomes 2, 2 and 0 samples (measured, TF 2.21), not 2, 1, 1.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from conformance import backends, workers
from conformance.backends import Unavailable, _frameworks
from conformance.problem import Problem, Trajectory

REPLICAS_VARIABLE = "CONFORMANCE_TF_REPLICAS"  # set in a replicated worker: its number of logical CPUs


def in_replicated_worker() -> bool:
    """Whether this process is a replicated worker (its logical devices are made)."""
    return REPLICAS_VARIABLE in os.environ


def worker_kind(replicas: int) -> workers.WorkerKind:
    """One worker kind per number of replicas; determinism, when requested, is part of it."""
    environment = {REPLICAS_VARIABLE: str(replicas)}
    if _frameworks.determinism_requested():
        environment["CONFORMANCE_DETERMINISM"] = "1"
    return workers.WorkerKind(f"tensorflow_{replicas}_replicas", environment,
                              setup="conformance.backends._tf_distributed:setup")


def train_in_worker(backend: str, problem: Problem, device: str) -> Trajectory:
    """Train `problem` with `backend` in this process's replicated worker for its R."""
    return backends.train_in_worker(worker_kind(problem.replicas), "conformance.backends._tf_distributed:train_here",
                                    backend, problem.to_data(), device)


# --- in the worker process -------------------------------------------------------------------

def setup() -> dict[str, Any]:
    """Import TensorFlow and split the CPU into R logical devices before its runtime starts."""
    if os.environ.get("CONFORMANCE_DETERMINISM") == "1":
        _frameworks.request_determinism()
    tf = _frameworks.tensorflow()
    replicas = int(os.environ[REPLICAS_VARIABLE])
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    return {"tensorflow": tf.__version__, "logical_cpus": [d.name for d in tf.config.list_logical_devices("CPU")],
            "extra_setup": workers.extra_setup()}


def train_here(backend: str, problem_data: dict[str, Any], device: str) -> dict[str, Any]:
    """`backend`'s train in this worker; the trajectory as plain data."""
    from conformance import backends

    problem = Problem.from_data(problem_data)
    return backends.load(backend).train(problem, device).to_data()


def replica_devices(problem: Problem, device: str) -> list[str]:
    """The R devices of the strategy: this worker's logical CPUs, or R physical GPUs."""
    tf = _frameworks.tensorflow()
    if device == "cpu":
        found = [d.name for d in tf.config.list_logical_devices("CPU")]
    else:
        found = [d.name for d in tf.config.list_logical_devices("GPU")]
    if len(found) < problem.replicas:
        kind = "logical CPUs" if device == "cpu" else "GPUs"
        raise Unavailable(f"{problem.replicas} replicas need {problem.replicas} {kind}; this process has "
                          f"{len(found)} ({', '.join(found) or 'none'})")
    return found[:problem.replicas]


def strategy(problem: Problem, device: str) -> Any:
    """`tf.distribute.MirroredStrategy` over the case's R devices (TensorFlow picks the
    all-reduce: collective ops on CPU, NCCL on GPUs)."""
    if not in_replicated_worker():
        raise RuntimeError("a replicated case trains in a replicated worker (train_in_worker)")
    return _mirrored(tuple(replica_devices(problem, device)))


@functools.cache
def _mirrored(devices: tuple[str, ...]) -> Any:
    """One MirroredStrategy per device set for the worker's life: a second strategy in the same
    process restarts the collective keys, and its all-reduce then collides with the first's
    ("Collective instance 100 expected ... data_type 1 but got ... data_type 2", measured with a
    float32 case and then a float64 case), which aborts every later collective in the process."""
    return _frameworks.tensorflow().distribute.MirroredStrategy(list(devices))


def shard_indices(problem: Problem) -> list[np.ndarray]:
    """Every step's shards in training order: epoch, step, then replica (Problem.shards)."""
    return [shard for epoch in range(problem.epochs) for batch in problem.batches(epoch)
            for shard in problem.shards(batch)]


def shard_dataset(problem: Problem, with_weights: bool) -> Any:
    """A dataset of (x, y[, sample_weight]) elements, one per shard, in `shard_indices` order."""
    tf = _frameworks.tensorflow()
    arrays = [problem.x, problem.y.reshape(-1, 1)]
    if with_weights:
        arrays.append(problem.sample_weight.reshape(-1, 1))
    tensors = tuple(tf.constant(array) for array in arrays)
    indices = tf.ragged.constant([shard.tolist() for shard in shard_indices(problem)], dtype=tf.int64)
    return tf.data.Dataset.from_tensor_slices(indices).map(
        lambda rows: tuple(tf.gather(tensor, rows) for tensor in tensors))


def distributed_shards(strategy_object: Any, problem: Problem, with_weights: bool) -> Any:
    """The shard dataset through `distribute_datasets_from_function` (one input pipeline, whose
    consecutive elements go to replicas 0..R-1)."""

    def dataset(context: Any) -> Any:
        if context.num_input_pipelines != 1:
            raise Unavailable(f"{context.num_input_pipelines} input pipelines: the shard order assumes one")
        return shard_dataset(problem, with_weights)

    return strategy_object.distribute_datasets_from_function(dataset)


def replica_copies(strategy_object: Any, variables: list[Any]) -> list[np.ndarray]:
    """Each replica's copy of `variables`, flat (Keras 3 variables hold a tf.Variable in .value)."""
    per_variable = [strategy_object.experimental_local_results(_tf_variable(v)) for v in variables]
    return [np.concatenate([np.ravel(np.asarray(copies[r])) for copies in per_variable])
            for r in range(strategy_object.num_replicas_in_sync)]


def _tf_variable(variable: Any) -> Any:
    """The TensorFlow variable: a Keras 3 variable's `.value`, or the tf.Variable itself (whose
    `value` is a method)."""
    inner = getattr(variable, "value", None)
    return variable if inner is None or callable(inner) else inner


def info(strategy_object: Any, variables: list[Any], api: str) -> dict[str, Any]:
    """`Trajectory.info["replicas"]`: devices, process, all-reduce, placement, the calls, and
    whether the replicas' copies of the parameters are bit-identical after training."""
    copies = replica_copies(strategy_object, variables)
    placement = sorted({str(copy.device) for v in variables
                        for copy in strategy_object.experimental_local_results(_tf_variable(v))})
    cross = type(strategy_object.extended._cross_device_ops or object()).__name__  # TF keeps it private
    return {"replicas": strategy_object.num_replicas_in_sync,
            "devices": list(strategy_object.extended.worker_devices),
            "processes": [os.getpid()] * strategy_object.num_replicas_in_sync,
            "ranks": None,
            "collective": f"tf.distribute {cross} (in-process all-reduce, SUM of the replicas' gradients)",
            "placement": f"a mirrored copy of every variable on each replica's device: {', '.join(placement)}",
            "api": api,
            "parameters_equal_across_replicas": all(np.array_equal(copies[0], c, equal_nan=True) for c in copies[1:]),
            "largest_difference_across_replicas": max(_finite_difference(copies[0], c) for c in copies[1:])}


def _finite_difference(first: np.ndarray, other: np.ndarray) -> float:
    """The largest |first - other| over the entries where it is finite (0 where none is)."""
    difference = np.abs(first.astype(np.float64) - other.astype(np.float64))
    return float(np.max(difference, initial=0.0, where=np.isfinite(difference)))


def replica_rows(problem_data: dict[str, Any]) -> list[list[list[int]]]:
    """What each replica receives at every step from `distributed_shards`, as sample indices
    (the x column replaced by the row numbers): the check that replica r gets shard r."""
    import dataclasses

    problem = Problem.from_data(problem_data)
    numbered = dataclasses.replace(problem, x=np.arange(problem.n, dtype=np.float64).reshape(-1, 1))
    found = strategy(numbered, "cpu")
    steps = []
    for element in distributed_shards(found, numbered, with_weights=False):
        steps.append([np.asarray(x).astype(np.int64).ravel().tolist()
                      for x in found.experimental_local_results(element[0])])
    return steps
