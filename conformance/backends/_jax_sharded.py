"""The `jax` backend's data-parallel training: every step's batch sharded over `replicas` devices.

Written as JAX users write data parallelism by hand: a `jax.sharding.Mesh` of R devices with one
axis, "replica", and `jax.shard_map` over it under `jax.jit`. Every device holds a full copy of
the parameters and the optax state (in_specs `P()`), takes shard r of every step's batch
(`P("replica")`), computes `value_and_grad` of its shard's loss, and combines loss and gradients
across the replicas with one collective: `lax.pmean` for a mean loss (the mean of the replicas'
shard means: the pmap/Flax data-parallel idiom) and `lax.psum` for `reduction: sum` (the batch's
sum is the sum of its shards' sums). Each device then applies the same optax update (clipping,
loss scaling, schedules as in the one-replica path, all after the all-reduce) to its own copy;
whether the copies stayed equal is checked after training.

The harness's shards (Problem.shards: contiguous, the first ones one sample larger) are fed as
they are: shard_map splits an axis evenly, so each step is an (R, m) array of row indices, m
the largest shard, a shorter shard padded with its own first row and masked out (a 0/1 weight),
each replica's mean over its own real samples (`sum(mask * loss) / sum(mask)`). With equal
shards the pmean of shard means is the batch mean; with unequal ones (a batch not divisible by
R, such as a short last batch) it weights the smaller shard's samples more than the one-replica
replay does: a real difference of this idiom, kept and reported, not corrected.

JAX makes several CPU devices only when XLA_FLAGS holds `--xla_force_host_platform_device_count`
before JAX starts, so on a CPU the replicated training runs in a worker process
(conformance.workers) started with that flag, once per test process and reused. On GPUs it runs
in this process on R GPUs from the named one on, or skips when there are fewer.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from conformance import backends, workers
from conformance.backends import Unavailable, _frameworks
from conformance.backends import _jax_training as _jax
from conformance.problem import Problem, Trajectory

AXIS = "replica"
WORKER_DEVICES = 4  # CPU devices of the worker (more when a case asks for more replicas)


def worker_kind(replicas: int) -> workers.WorkerKind:
    """The worker whose JAX has max(4, replicas) CPU devices (and no GPU backend)."""
    count = max(WORKER_DEVICES, replicas)
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}".strip()
    environment = {"XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    return workers.WorkerKind(f"jax_{count}_cpu_devices", environment, setup="conformance.backends._jax_sharded:setup")


def train(problem: Problem, device: str) -> Trajectory:
    """Train `problem` data-parallel: on CPU devices of the worker, or on this process's GPUs."""
    if device == "cpu":
        return backends.train_in_worker(worker_kind(problem.replicas), "conformance.backends._jax_sharded:train_here",
                                        problem.to_data())
    first = int(device.split(":")[1])
    gpus = _jax.jax_devices()
    chosen = [gpus[f"cuda:{index}"] for index in range(first, first + problem.replicas) if f"cuda:{index}" in gpus]
    if len(chosen) < problem.replicas:
        raise Unavailable(f"{problem.replicas} replicas from {device} need {problem.replicas} GPUs; "
                          f"JAX sees {len(gpus) - 1} GPU(s) here")
    return train_on(problem, chosen, "in process")


# --- in the worker process -------------------------------------------------------------------

def setup() -> dict[str, Any]:
    """Import JAX (float64 on, as in the test process) and say how many CPU devices it made."""
    jax = _frameworks.jax()
    return {"jax": jax.__version__, "cpu_devices": len(jax.devices("cpu")), "extra_setup": workers.extra_setup()}


def train_here(problem_data: dict[str, Any]) -> dict[str, Any]:
    """Train on the worker's first `replicas` CPU devices; the trajectory as plain data."""
    problem = Problem.from_data(problem_data)
    devices = _frameworks.jax().devices("cpu")
    if len(devices) < problem.replicas:
        raise Unavailable(f"the worker's JAX has {len(devices)} CPU devices, {problem.replicas} replicas asked "
                          f"(XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})")
    return train_on(problem, devices[:problem.replicas], os.getpid()).to_data()


# --- the training, wherever it runs ------------------------------------------------------------

def train_on(problem: Problem, devices: list[Any], process: int | str) -> Trajectory:
    """Train `problem` with replica r on `devices[r]`; `process` names where (a pid)."""
    jax = _frameworks.jax()
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(devices), (AXIS,))
    everywhere, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(None, None, AXIS))
    dtype = np.dtype(problem.dtype)
    params = jax.device_put(_jax.initial_parameters(problem, dtype), everywhere)
    weighted = problem.sample_weight is not None
    data = tuple(jax.device_put(array.astype(dtype), everywhere) for array in (
        problem.x, problem.y.reshape(-1, 1), problem.sample_weight.reshape(-1, 1) if weighted else problem.y[:1]))
    rows, keep = shard_rows(problem)
    optimizer, scaling = _jax.training_optimizer(problem, params, dtype)
    outputs_of, per_sample = _jax.model_functions(problem, dtype)
    loss_of = shard_loss(problem, outputs_of, per_sample)
    per_replica = replica_training(problem, optimizer, scaling, loss_of)
    specs = (P(), P(), P(), P(None, None, AXIS), P(None, None, AXIS), P())
    run = jax.jit(jax.shard_map(per_replica, mesh=mesh, in_specs=specs, out_specs=(P(), P())))
    arguments = (params, optimizer.init(params), scaling.init(), jax.device_put(rows, split),
                 jax.device_put(keep.astype(dtype), split), data)
    compiled = run.lower(*arguments).compile()
    params, results = compiled(*arguments)
    info = _jax.environment(params) | {"replicas": replica_info(problem, devices, process, params, compiled)}
    x, y, w = data
    return _jax.trajectory(problem, params, (outputs_of, loss_of, scaling), (x, y, w if weighted else None),
                           results, info)


def shard_rows(problem: Problem) -> tuple[np.ndarray, np.ndarray]:
    """Every step's shards as (epochs, steps, replicas, m) row indices and a 0/1 mask of the
    real ones: shard r of step s is Problem.shards(batch)[r], padded to the largest shard m
    with its own first row. Built from the shards of each batch size's positions (the shards
    are contiguous), and checked against Problem.shards on every epoch's first and last step."""
    width = -(-problem.batch_size // problem.replicas)
    full, last = divmod(problem.n, problem.batch_size)
    sizes = [problem.batch_size] * full + ([last] if last else [])
    orders = problem.orders if problem.orders is not None else np.broadcast_to(np.arange(problem.n),
                                                                               (problem.epochs, problem.n))
    rows, keep = [], []
    for size in sorted(set(sizes), reverse=True):
        positions, mask = _padded(problem.shards(np.arange(size)), width)
        starts = np.flatnonzero(np.asarray(sizes) == size) * problem.batch_size
        rows.append(orders[:, starts[:, None, None] + positions])
        keep.append(np.broadcast_to(mask, (problem.epochs, len(starts), *mask.shape)))
    rows_array, keep_array = np.concatenate(rows, axis=1).astype(np.int32), np.concatenate(keep, axis=1)
    for epoch in range(problem.epochs):
        for step in {0, len(sizes) - 1}:
            for replica, shard in enumerate(problem.shards(problem.batch(epoch, step))):
                if not np.array_equal(rows_array[epoch, step, replica][keep_array[epoch, step, replica] > 0], shard):
                    raise AssertionError(f"shard {replica} of epoch {epoch} step {step} is not Problem.shards'")
    return rows_array, keep_array


def _padded(shards: list[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray]:
    """(replicas, width) positions, each shard padded with its own first, and the 0/1 mask."""
    positions = np.stack([np.concatenate([shard, np.full(width - len(shard), shard[0])]) for shard in shards])
    mask = np.stack([np.arange(width) < len(shard) for shard in shards]).astype(np.float64)
    return positions, mask


def shard_loss(problem: Problem, outputs_of: Any, per_sample: Any) -> Any:
    """loss_of(parameters, x, y, w, keep): one replica's loss on its shard, the case's
    reduction over its real (kept) samples; `keep` None counts every row."""
    import jax.numpy as jnp

    weighted = problem.sample_weight is not None

    def loss_of(parameters: Any, x_shard: Any, y_shard: Any, w_shard: Any, keep: Any = None) -> Any:
        values = per_sample(outputs_of(parameters, x_shard), y_shard)
        if weighted:
            values = values * w_shard
        if keep is None:
            return jnp.mean(values) if problem.reduction == "mean" else jnp.sum(values)
        total = jnp.sum(values * keep.astype(values.dtype))
        return total / jnp.sum(keep).astype(values.dtype) if problem.reduction == "mean" else total

    return loss_of


def replica_training(problem: Problem, optimizer: Any, scaling: Any, loss_of: Any) -> Any:
    """What every replica runs inside shard_map: all epochs as `lax.scan`s of steps, each its
    shard's loss and gradients combined over the replicas (pmean of means, psum of sums), then
    the optax update of its own copy. Returns the parameters and, per epoch, (flat parameters,
    the loss summed over the epoch's steps weighted by batch size, rate, scaler record)."""
    jax = _frameworks.jax()
    import jax.numpy as jnp
    import optax

    combine = jax.lax.pmean if problem.reduction == "mean" else jax.lax.psum
    full, last = divmod(problem.n, problem.batch_size)
    model = problem.layers

    def replica_loss(*arguments: Any) -> Any:
        """The replicas' combined loss: its gradient with respect to the replicated parameters
        is the combined gradient (shard_map transposes the parameters' broadcast into a psum)."""
        return combine(loss_of(*arguments), AXIS)

    def step(carry: Any, shard: Any, data: Any) -> Any:
        parameters, state, scaler = carry
        rows, keep = shard[0][0], shard[1][0][:, None]  # this replica's (1, m) slice of the step
        x, y, w = data
        loss, gradients = scaling.value_and_grad(jax, replica_loss, scaler)(
            parameters, x[rows], y[rows], w[rows] if problem.sample_weight is not None else None, keep)
        updates, state = optimizer.update(gradients, state, parameters)
        return (optax.apply_updates(parameters, updates), state, scaling.next(scaler, gradients)), loss

    def per_replica(parameters: Any, state: Any, scaler: Any, rows: Any, keep: Any, data: Any) -> Any:
        sizes = jnp.asarray([problem.batch_size] * full + ([last] if last else []), dtype=data[0].dtype)

        def one_epoch(carry: Any, shards: Any) -> Any:
            carry, losses = jax.lax.scan(lambda c, s: step(c, s, data), carry, shards)
            flat = _jax.flat_parameters(carry[0], model)
            return carry, (flat, losses.astype(sizes.dtype) @ sizes, _jax.last_rate(carry[1]),
                           scaling.record(carry[2]))

        (parameters, _, _), records = jax.lax.scan(one_epoch, (parameters, state, scaler), (rows, keep))
        return parameters, records

    return per_replica


def replica_info(problem: Problem, devices: list[Any], process: int | str, params: Any,
                 compiled: Any) -> dict[str, Any]:
    """Trajectory.info["replicas"]: where each replica ran, the collective the compiled XLA
    program really holds, and whether the replicas' parameter copies are equal after training."""
    jax = _frameworks.jax()
    leaves = jax.tree.leaves(params)
    copies = [[np.asarray(shard.data) for shard in leaf.addressable_shards] for leaf in leaves]
    equal = all(np.array_equal(copy, parts[0]) for parts in copies for copy in parts)
    text = compiled.as_text()
    collective = "lax.pmean" if problem.reduction == "mean" else "lax.psum"
    full, last = divmod(problem.n, problem.batch_size)
    shard_sizes = {f"batch of {size}": [len(shard) for shard in problem.shards(np.arange(size))]
                   for size in ([problem.batch_size] if full else []) + ([last] if last else [])}
    return {"replicas": problem.replicas, "devices": [str(device) for device in devices],
            "processes": [process] * problem.replicas, "ranks": None,
            "collective": f"{collective} over mesh axis {AXIS!r}: {text.count('all-reduce(')} XLA all-reduce "
                          "op(s) in the compiled program",
            "placement": "a full copy of the parameters and optax state on every device (shard_map in_specs P())",
            "api": "jax.jit(jax.shard_map(..., mesh=Mesh(devices, ('replica',)), in_specs=P() for parameters, "
                   "P('replica') for the shards' rows)); value_and_grad per shard, "
                   f"{collective}(loss and gradients), optax update per replica",
            "combined_loss": "mean of the replicas' shard means" if problem.reduction == "mean"
                             else "sum of the replicas' shard sums",
            "shard_sizes": shard_sizes, "parameters_equal_across_replicas": bool(equal)}
