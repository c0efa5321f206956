"""JAX: a `jax.value_and_grad` training step under `jax.jit`, with the matching `optax` optimizer.

The step is the one JAX users write: parameters as a dict of arrays, `value_and_grad` of the
loss, `optimizer.update`, `optax.apply_updates`. The epochs and batches around it run as
`lax.scan`s inside one `jax.jit` (the idiomatic fast loop; a Python loop of jitted steps costs
about 2 ms of dispatch per step here), recording each epoch's parameters and loss. Batches have
static sizes (the full ones, then the smaller last one). Every optax setting is explicit; where
optax can place epsilon either way (`rmsprop`'s `eps_in_sqrt`), the case format's (PyTorch's)
placement is passed. The formulas are compared in docs/optimizers.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from conformance.backends import _frameworks
from conformance.problem import Optimizer, Problem, Trajectory

NAME = "jax"
LOOKED_FOR = ("cpu", "cuda")  # JAX's gpu devices are named cuda:N in the suite's vocabulary


def available() -> str | None:
    missing = [module for module in ("jax", "optax") if not _frameworks.installed(module)]
    return f"{' and '.join(missing)} not installed (pip install '.[jax]')" if missing else None


def _devices() -> dict[str, Any]:
    jax = _frameworks.jax()
    found = {"cpu": jax.devices("cpu")[0]}
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:  # no GPU backend in this jaxlib, or no GPU
        gpus = []
    return found | {f"cuda:{index}": device for index, device in enumerate(gpus)}


def devices() -> list[str]:
    return list(_devices())


def device_name(device: str) -> str:
    if device == "cpu":
        return _frameworks.cpu_name()
    return str(_devices()[device].device_kind)


def train(problem: Problem, device: str) -> Trajectory:
    jax = _frameworks.jax()
    import jax.numpy as jnp
    import optax

    place = _devices()[device]
    dtype = np.dtype(problem.dtype)
    params = jax.device_put(initial_parameters(problem, dtype), place)
    model = problem.layers
    x = jax.device_put(problem.x.astype(dtype), place)
    y = jax.device_put(problem.y.astype(dtype).reshape(-1, 1), place)
    reduce = jnp.mean if problem.reduction == "mean" else jnp.sum
    optimizer = make_optimizer(optax, problem.optimizer, schedule(optax, problem), dtype)
    optimizer = with_clipping(optax, problem.clip, params, optimizer)

    losses = getattr(optax, "losses", optax)  # optax >= 0.2.2 keeps its losses in optax.losses
    weighted = problem.sample_weight is not None
    w = jax.device_put(problem.sample_weight.astype(dtype).reshape(-1, 1), place) if weighted else None

    def per_sample(outputs: Any, y_batch: Any) -> Any:
        """The case's loss per sample, as JAX users write it: optax's Huber and logits losses;
        the formula for mse and for probabilities (JAX has no probability loss to call)."""
        if problem.loss == "huber":
            return losses.huber_loss(outputs, y_batch, delta=problem.delta)
        if problem.loss == "bce":
            if problem.from_logits:
                return losses.sigmoid_binary_cross_entropy(outputs, y_batch)
            p = jax.nn.sigmoid(outputs)
            return -(y_batch * jnp.log(p) + (1 - y_batch) * jnp.log(1 - p))
        return jnp.square(outputs - y_batch)

    def loss_of(parameters: Any, x_batch: Any, y_batch: Any, w_batch: Any) -> Any:
        values = per_sample(forward(parameters, x_batch, model), y_batch)
        return reduce(values * w_batch if weighted else values)

    def step(parameters: Any, state: Any, order: Any, start: Any, size: int) -> Any:
        """One optimizer step on `size` rows from `start`: of `order` when the case shuffles,
        else a slice of the data itself (the same rows, without a gather)."""
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
        loss, gradients = jax.value_and_grad(loss_of)(parameters, x_batch, y_batch, w_batch)
        updates, state = optimizer.update(gradients, state, parameters)
        return optax.apply_updates(parameters, updates), state, loss

    full_batches, last_batch = divmod(problem.n, problem.batch_size)
    shuffled = problem.orders is not None
    orders = jax.device_put(problem.orders if shuffled else np.arange(problem.n)[None], place)

    @jax.jit
    def run_training(parameters: Any, state: Any, orders: Any) -> Any:
        def one_epoch(carry: Any, epoch: Any) -> Any:
            order = orders[epoch] if shuffled else orders[0]

            def one_batch(carry: Any, index: Any) -> Any:
                parameters, state, loss = step(*carry, order, index * problem.batch_size, problem.batch_size)
                return (parameters, state), loss

            carry, losses = jax.lax.scan(one_batch, carry, jnp.arange(full_batches))
            total = jnp.sum(losses) * problem.batch_size
            if last_batch:
                parameters, state, loss = step(*carry, order, full_batches * problem.batch_size, last_batch)
                carry, total = (parameters, state), total + loss * last_batch
            flat = flat_parameters(carry[0], model)
            return carry, (flat, total, last_rate(carry[1]))

        (parameters, state), (history, totals, rates) = jax.lax.scan(one_epoch, (parameters, state),
                                                                     jnp.arange(problem.epochs))
        return parameters, history, totals, rates

    params, history, totals, rates = run_training(params, optimizer.init(params), orders)
    history = np.asarray(history, dtype=np.float64)
    predictions = None
    if problem.predict_x is not None:
        predict_x = jax.device_put(problem.predict_x.astype(dtype), place)
        outputs = forward(params, predict_x, model)
        if problem.loss == "bce":  # `predict` compares probabilities
            outputs = jax.nn.sigmoid(outputs)
        predictions = np.asarray(outputs, dtype=np.float64)[:, 0]
    weight = params["output"]["kernel"]
    info = {"jax": jax.__version__, "optax": optax.__version__, "placed_on": str(next(iter(weight.devices()))),
            "jax_enable_x64": bool(jax.config.jax_enable_x64), "weights_dtype": str(weight.dtype),
            "jit_compilations": int(run_training._cache_size())}
    if problem.schedule is not None:
        info["schedule"] = "optax.inject_hyperparams(learning_rate=schedule)"
    return Trajectory(history, np.asarray(totals, dtype=np.float64) / problem.n, predictions, info,
                      rates=np.asarray(rates, dtype=np.float64) if problem.schedule is not None else None)


def last_rate(state: Any) -> Any:
    """The learning rate of the last step, as `optax.inject_hyperparams` keeps it in the state
    (NaN without a schedule)."""
    found = _injected_rate(state)
    return np.float64(np.nan) if found is None else found.astype(np.float64)


def _injected_rate(state: Any) -> Any:
    """The injected learning rate in a (possibly chained) optax state, or None; decided by the
    state's structure alone, so that it runs under jit."""
    hyperparams = getattr(state, "hyperparams", None)
    if isinstance(hyperparams, dict) and "learning_rate" in hyperparams:
        return hyperparams["learning_rate"]
    if isinstance(state, tuple):  # a chain's states (clipping, weight decay, the optimizer)
        for part in state:
            found = _injected_rate(part)
            if found is not None:
                return found
    return None


def initial_parameters(problem: Problem, dtype: Any) -> dict[str, Any]:
    """The parameter pytree JAX users write: {layer name: {"kernel": (inputs, units), "bias":
    (units,)}}, in the harness's own layout (no transposes in JAX)."""
    params = {}
    for layer, kernel, bias in problem.initial_layers():
        params[layer.name] = {"kernel": np.asarray(kernel, dtype)}
        if bias is not None:
            params[layer.name]["bias"] = np.asarray(bias, dtype)
    return params


def flat_parameters(params: dict[str, Any], model: list[Any]) -> Any:
    """Every parameter in the harness's layout (a dict's leaves are ordered by key, so by name)."""
    import jax.numpy as jnp

    return jnp.concatenate([params[layer.name][part].reshape(-1) for layer in model
                            for part in ("kernel", "bias") if part in params[layer.name]])


def forward(parameters: Any, x: Any, model: list[Any]) -> Any:
    """x through every layer: `x @ kernel + bias`, then the hidden layers' `jax.nn` activation."""
    output = x
    for layer in model:
        output = output @ parameters[layer.name]["kernel"]
        if "bias" in parameters[layer.name]:
            output = output + parameters[layer.name]["bias"]
        if layer.name != "output":
            output = activation(layer.activation, layer.settings)(output)
    return output


def activation(name: str, settings: dict[str, Any] | None) -> Any:
    """The `jax.nn` function of an activation, every setting explicit (`jax.nn.gelu` defaults to
    the tanh form, the case format's `approximate: false` is passed as such)."""
    import functools

    nn = _frameworks.jax().nn
    if name == "gelu":
        return functools.partial(nn.gelu, approximate=settings["approximate"])
    if name == "leaky_relu":
        return functools.partial(nn.leaky_relu, negative_slope=settings["negative_slope"])
    if name == "elu":
        return functools.partial(nn.elu, alpha=settings["alpha"])
    return {"linear": lambda z: z, "relu": nn.relu, "tanh": _frameworks.jax().numpy.tanh, "sigmoid": nn.sigmoid,
            "softplus": nn.softplus, "silu": nn.silu}[name]


def make_optimizer(optax: Any, optimizer: Optimizer, rate_schedule: Any = None, dtype: Any = None) -> Any:
    """The optax transformation for the case, every hyperparameter explicit.

    Coupled weight decay is `add_decayed_weights` before the optimizer (added to the gradient,
    as torch.optim.SGD does). optax's own defaults never apply (adagrad: initial accumulator
    0.1 and eps 1e-7; rmsprop: eps inside the root). With a schedule, the optimizer is made by
    `optax.inject_hyperparams` with the schedule as its learning rate (kept in the state in
    the training dtype, so that each step's rate can be read back); every other setting static.
    """
    settings = optimizer.settings

    def made(factory: Any, **arguments: Any) -> Any:
        if rate_schedule is None:
            return factory(settings["learning_rate"], **arguments)
        injected = optax.inject_hyperparams(factory, static_args=tuple(arguments), hyperparam_dtype=dtype)
        return injected(rate_schedule, **arguments)

    if optimizer.name == "sgd":
        sgd = made(optax.sgd, momentum=settings["momentum"] or None, nesterov=settings["nesterov"])
        return optax.chain(optax.add_decayed_weights(settings["weight_decay"]), sgd) if settings["weight_decay"] \
            else sgd
    if optimizer.name == "adam":
        common = {"b1": settings["beta_1"], "b2": settings["beta_2"], "eps": settings["epsilon"], "eps_root": 0.0}
        return made(optax.amsgrad, **common) if settings["amsgrad"] else made(optax.adam, nesterov=False, **common)
    if optimizer.name == "rmsprop":
        return made(optax.rmsprop, decay=settings["rho"], eps=settings["epsilon"], initial_scale=0.0,
                    eps_in_sqrt=False, centered=settings["centered"], momentum=settings["momentum"] or None,
                    nesterov=False, bias_correction=False)
    if optimizer.name == "adagrad":
        return made(optax.adagrad, initial_accumulator_value=settings["initial_accumulator_value"],
                    eps=settings["epsilon"])
    raise NotImplementedError(f"optimizer {optimizer.name} is not supported by the jax backend")


def schedule(optax: Any, problem: Problem) -> Any:
    """The case's schedule as the optax schedule of the optimizer's step count, or None.

    Translations (docs/schedules.md): `exponential_decay(lr, transition_steps=decay_steps,
    decay_rate, staircase)`; `piecewise_constant_schedule(lr, {boundary: values[i+1] /
    values[i]})` (optax takes scales, not values); `cosine_decay_schedule(lr, decay_steps,
    alpha)`, or with a warm-up `warmup_cosine_decay_schedule(0, lr, warmup_steps,
    decay_steps=warmup_steps + decay_steps, end_value=alpha * lr)` (optax's decay_steps
    includes the warm-up). Per epoch: the same schedule of the count // steps per epoch.
    """
    if problem.schedule is None:
        return None
    kind, settings, rate = problem.schedule["kind"], problem.schedule["settings"], problem.learning_rate
    if kind == "exponential":
        of_t = optax.exponential_decay(rate, transition_steps=settings["decay_steps"],
                                       decay_rate=settings["decay_rate"], transition_begin=0,
                                       staircase=settings["staircase"])
    elif kind == "piecewise":
        values = settings["values"]
        of_t = optax.piecewise_constant_schedule(rate, {boundary: later / earlier for boundary, earlier, later
                                                        in zip(settings["boundaries"], values, values[1:])})
    elif settings["warmup_steps"]:
        warmup = settings["warmup_steps"]
        of_t = optax.warmup_cosine_decay_schedule(0.0, rate, warmup_steps=warmup,
                                                  decay_steps=warmup + settings["decay_steps"],
                                                  end_value=settings["alpha"] * rate)
    else:
        of_t = optax.cosine_decay_schedule(rate, decay_steps=settings["decay_steps"], alpha=settings["alpha"])
    if not problem.schedule_every_epoch:
        return of_t
    return lambda count: of_t(count // problem.steps_per_epoch)


def with_clipping(optax: Any, clip: dict[str, Any] | None, params: dict[str, Any], optimizer: Any) -> Any:
    """The case's clipping chained before the optimizer (and its weight decay): optax's
    `clip_by_global_norm`, the same per parameter array through `multi_transform` (norm, one
    label per array of the pytree `params`), or `clip` (value)."""
    if clip is None:
        return optimizer
    threshold = clip["threshold"]
    if clip["kind"] == "global_norm":
        clipping = optax.clip_by_global_norm(max_norm=threshold)
    elif clip["kind"] == "norm":
        labels = {layer: {part: f"{layer}.{part}" for part in parts} for layer, parts in params.items()}
        names = [label for parts in labels.values() for label in parts.values()]
        clipping = optax.multi_transform({name: optax.clip_by_global_norm(max_norm=threshold) for name in names},
                                         labels)
    else:
        clipping = optax.clip(threshold)
    return optax.chain(clipping, optimizer)
