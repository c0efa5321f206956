"""JAX: a `jax.value_and_grad` training step under `jax.jit`, with the matching `optax` optimizer.

The step is the one JAX users write: parameters as a dict of arrays, `value_and_grad` of the
loss, `optimizer.update`, `optax.apply_updates`. The epochs and batches around it run as
`lax.scan`s inside one `jax.jit` (the idiomatic fast loop; a Python loop of jitted steps costs
about 2 ms of dispatch per step here), recording each epoch's parameters and loss. Batches have
static sizes (the full ones, then the smaller last one). Every optax setting is explicit; where
optax can place epsilon either way (`rmsprop`'s `eps_in_sqrt`), the case format's (PyTorch's)
placement is passed. The formulas are compared in docs/optimizers.md.

Mixed precision is written by hand, as JAX users write it (JAX lowers nothing by itself): the
forward pass casts parameters and inputs `.astype(compute dtype)` and the output
`.astype(float32)` before the loss; parameters and optax state stay float32. A fixed loss scale
S is `grad(loss * S) / S`; a dynamic one is `(scale, good)` in the scan carry with the
Keras/torch rule, and the optimizer wrapped in `optax.apply_if_finite`, which leaves the
parameters and the whole inner state (Adam's count, a schedule's count) as they were on a
non-finite gradient (docs/design/mixed-precision.md, section 2.3).

Data parallelism (`replicas` > 1) is _jax_sharded's: the same model, loss and optax optimizer
under `jax.shard_map` over R devices (R host devices of a worker process on a CPU), each
replica's loss combined with `lax.pmean` (mean) or `lax.psum` (sum). One replica runs the loop
here, in this process; both loops build from _jax_training's parts.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from conformance.backends import _frameworks
from conformance.backends._jax_training import (
    environment,
    flat_parameters,
    initial_parameters,
    jax_devices,
    last_rate,
    model_functions,
    training_optimizer,
    trajectory,
)
from conformance.problem import Problem, Trajectory

NAME = "jax"
LOOKED_FOR = ("cpu", "cuda")  # JAX's gpu devices are named cuda:N in the suite's vocabulary
DATA_PARALLEL = True  # replicas > 1: the batch sharded over devices (_jax_sharded)
ACCUMULATES = True  # optax.MultiSteps(every_k_schedule=N) around the case's optimizer


def available() -> str | None:
    missing = [module for module in ("jax", "optax") if not _frameworks.installed(module)]
    return f"{' and '.join(missing)} not installed (pip install '.[jax]')" if missing else None


def devices() -> list[str]:
    return list(jax_devices())


def device_name(device: str) -> str:
    if device == "cpu":
        return _frameworks.cpu_name()
    return str(jax_devices()[device].device_kind)


def train(problem: Problem, device: str) -> Trajectory:
    """Train `problem` on `device`: in this process for one replica, the batch sharded over
    `problem.replicas` devices otherwise (_jax_sharded)."""
    if problem.replicas > 1:
        from conformance.backends import _jax_sharded

        return _jax_sharded.train(problem, device)
    jax = _frameworks.jax()
    import jax.numpy as jnp
    import optax

    place = jax_devices()[device]
    dtype = np.dtype(problem.dtype)
    params = jax.device_put(initial_parameters(problem, dtype), place)
    model = problem.layers
    x = jax.device_put(problem.x.astype(dtype), place)
    y = jax.device_put(problem.y.astype(dtype).reshape(-1, 1), place)
    reduce = jnp.mean if problem.reduction == "mean" else jnp.sum
    optimizer, scaling = training_optimizer(problem, params, dtype)
    weighted = problem.sample_weight is not None
    w = jax.device_put(problem.sample_weight.astype(dtype).reshape(-1, 1), place) if weighted else None
    outputs_of, per_sample = model_functions(problem, dtype)

    def loss_of(parameters: Any, x_batch: Any, y_batch: Any, w_batch: Any) -> Any:
        values = per_sample(outputs_of(parameters, x_batch), y_batch)
        return reduce(values * w_batch if weighted else values)

    def step(carry: Any, order: Any, start: Any, size: int) -> Any:
        """One optimizer step on `size` rows from `start`: of `order` when the case shuffles,
        else a slice of the data itself (the same rows, without a gather). The carry is
        (parameters, optimizer state, loss scaler state)."""
        parameters, state, scaler = carry
        w_batch = None
        if shuffled:
            rows = jax.lax.dynamic_slice_in_dim(order, start, size)
            x_batch, y_batch = x[rows], y[rows]
            if weighted:
                w_batch = w[rows]
        else:
            x_batch = jax.lax.dynamic_slice_in_dim(x, start, size)
            y_batch = jax.lax.dynamic_slice_in_dim(y, start, size)
            if weighted:
                w_batch = jax.lax.dynamic_slice_in_dim(w, start, size)
        loss, gradients = scaling.value_and_grad(jax, loss_of, scaler)(parameters, x_batch, y_batch, w_batch)
        updates, state = optimizer.update(gradients, state, parameters)
        return (optax.apply_updates(parameters, updates), state, scaling.next(scaler, gradients)), loss

    full_batches, last_batch = divmod(problem.n, problem.batch_size)
    shuffled = problem.orders is not None
    orders = jax.device_put(problem.orders if shuffled else np.arange(problem.n)[None], place)

    @jax.jit
    def run_training(parameters: Any, state: Any, scaler: Any, orders: Any) -> Any:
        def one_epoch(carry: Any, epoch: Any) -> Any:
            order = orders[epoch] if shuffled else orders[0]

            def one_batch(carry: Any, index: Any) -> Any:
                return step(carry, order, index * problem.batch_size, problem.batch_size)

            carry, losses = jax.lax.scan(one_batch, carry, jnp.arange(full_batches))
            total = jnp.sum(losses) * problem.batch_size
            if last_batch:
                carry, loss = step(carry, order, full_batches * problem.batch_size, last_batch)
                total = total + loss * last_batch
            flat = flat_parameters(carry[0], model)
            return carry, (flat, total, last_rate(carry[1]), scaling.record(carry[2]))

        (parameters, _, _), (history, totals, rates, scales) = jax.lax.scan(
            one_epoch, (parameters, state, scaler), jnp.arange(problem.epochs))
        return parameters, history, totals, rates, scales

    params, history, totals, rates, scales = run_training(params, optimizer.init(params), scaling.init(), orders)
    weight = params["output"]["kernel"]
    info = environment(params) | {"placed_on": str(next(iter(weight.devices()))),
                                  "jit_compilations": int(run_training._cache_size())}
    return trajectory(problem, params, (outputs_of, loss_of, scaling), (x, y, w),
                      (history, totals, rates, scales), info)
