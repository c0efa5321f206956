"""The parts of a JAX training that the one-device loop (`jax`) and the sharded one
(`_jax_sharded`) both build from: the devices, the model's functions and parameters, the optax
optimizer with its schedule and clipping, the loss scaling, and the trajectory of a finished run.
Each training loop is its own module; neither imports the other's loop.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from conformance.backends import Unavailable, _frameworks
from conformance.problem import Optimizer, Problem, Trajectory


def jax_devices() -> dict[str, Any]:
    jax = _frameworks.jax()
    found = {"cpu": jax.devices("cpu")[0]}
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:  # no GPU backend in this jaxlib, or no GPU
        gpus = []
    return found | {f"cuda:{index}": device for index, device in enumerate(gpus)}


def environment(params: dict[str, Any]) -> dict[str, Any]:
    """Versions and settings, and the dtype of the trained weights."""
    jax = _frameworks.jax()
    import optax

    weight = params["output"]["kernel"]
    return {"jax": jax.__version__, "optax": optax.__version__,
            "jax_enable_x64": bool(jax.config.jax_enable_x64), "weights_dtype": str(weight.dtype)}


def trajectory(problem: Problem, params: dict[str, Any], functions: tuple[Any, Any, LossScaling],
               data: tuple[Any, Any, Any], results: tuple[Any, ...], info: dict[str, Any]) -> Trajectory:
    """The Trajectory of a finished run: predictions from the trained `params`, the schedule and
    precision notes added to `info`. `functions` is (outputs_of, loss_of, scaling), `data` the
    training (x, y, w) as arrays, `results` what the training loop recorded per epoch
    (parameters, loss totals, rates, scaler records)."""
    jax = _frameworks.jax()
    outputs_of, loss_of, scaling = functions
    x, y, w = data
    history, totals, rates, scales = results
    predictions = None
    if problem.predict_x is not None:
        outputs = outputs_of(params, problem.predict_x.astype(problem.dtype))
        if problem.loss == "bce":  # `predict` compares probabilities
            outputs = jax.nn.sigmoid(outputs)
        predictions = np.asarray(outputs, dtype=np.float64)[:, 0]
    if problem.schedule is not None:
        info["schedule"] = "optax.inject_hyperparams(learning_rate=schedule)"
    if problem.precision is not None:
        compute, model = jax.numpy.dtype(problem.compute_dtype), problem.layers
        first = model[0].name
        shapes = jax.eval_shape(lambda p: (x[:1].astype(compute) @ cast(p[first]["kernel"], compute),
                                           forward(cast(p, compute), x[:1].astype(compute), model),
                                           scaling.value_and_grad(jax, loss_of, scaling.init())(
                                               p, x[:1], y[:1], None if w is None else w[:1])), params)
        info["precision"] = precision_info(problem, shapes, params, scaling)
    loss_scale, skipped = scaling.per_epoch(scales, problem.epochs)
    return Trajectory(np.asarray(history, dtype=np.float64), np.asarray(totals, dtype=np.float64) / problem.n,
                      predictions, info,
                      rates=np.asarray(rates, dtype=np.float64) if problem.schedule is not None else None,
                      loss_scale=loss_scale, skipped=skipped)


def training_optimizer(problem: Problem, params: dict[str, Any], dtype: Any) -> tuple[Any, LossScaling]:
    """The case's optax optimizer (schedule, clipping, and under a dynamic loss scale
    `apply_if_finite`) and its loss scaling."""
    import jax.numpy as jnp
    import optax

    optimizer = make_optimizer(optax, problem.optimizer, schedule(optax, problem), dtype)
    optimizer = with_clipping(optax, problem.clip, params, optimizer)
    if problem.accumulate > 1:  # the running mean of N batches' gradients, then one inner update
        if problem.dynamic_scaling:
            raise Unavailable("optax.MultiSteps cannot skip a group under a dynamic loss scale: with "
                              "apply_if_finite inside it, a non-finite group stays in its accumulator for good "
                              "((1 - emit) * inf is NaN: optax/transforms/_accumulation.py, measured with optax "
                              "0.2.8: every later group skipped; tests/test_accumulation.py), and its "
                              "should_skip_update_fn (optax.skip_not_finite) drops the micro-batch alone, which "
                              "shifts the groups")
        optimizer = optax.MultiSteps(optimizer, every_k_schedule=problem.accumulate, use_grad_mean=True)
    scaling = LossScaling(jnp, problem.loss_scale)
    return scaling.wrap(optax, optimizer), scaling


def model_functions(problem: Problem, dtype: Any) -> tuple[Any, Any]:
    """(outputs_of(parameters, x), per_sample(outputs, y)): the model's forward pass and the
    case's loss per sample, as the training step uses them."""
    jax = _frameworks.jax()
    import jax.numpy as jnp
    import optax

    model = problem.layers
    compute = None if problem.precision is None else jnp.dtype(problem.compute_dtype)
    losses = getattr(optax, "losses", optax)  # optax >= 0.2.2 keeps its losses in optax.losses

    def outputs_of(parameters: Any, x_batch: Any) -> Any:
        """The model's outputs; under mixed precision computed in the compute dtype from cast
        parameters and inputs, and cast back to float32 for the loss."""
        if compute is None:
            return forward(parameters, x_batch, model)
        return forward(cast(parameters, compute), x_batch.astype(compute), model).astype(dtype)

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

    return outputs_of, per_sample


def cast(tree: Any, dtype: Any) -> Any:
    """Every array of a pytree `.astype(dtype)`: mixed precision's cast of the parameters."""
    return _frameworks.jax().tree.map(lambda array: array.astype(dtype), tree)


def precision_info(problem: Problem, shapes: Any, params: Any, scaling: LossScaling) -> dict[str, Any]:
    """What this run computed in which dtype, read from `jax.eval_shape` of the first layer's
    matmul, of the forward pass and of the (scaled) loss and gradient function, and from the
    trained parameters."""
    matmul, output, (loss, gradients) = shapes
    leaves = _frameworks.jax().tree.leaves
    compute = problem.compute_dtype
    api = (f"parameters and inputs .astype({compute}), output .astype(float32) before the loss"
           + scaling.api)
    return {"precision": problem.precision, "compute_dtype": str(matmul.dtype), "output_dtype": str(output.dtype),
            "loss_dtype": str(loss.dtype), "gradient_dtype": str(leaves(gradients)[0].dtype),
            "variable_dtype": str(leaves(params)[0].dtype), "loss_scale": scaling.settings, "api": api}


class LossScaling:
    """Loss scaling as JAX users write it (optax has no loss scaler, only `apply_if_finite`).

    None: plain `value_and_grad`. Fixed S: the gradient of `loss * S`, divided by S. Dynamic:
    the scaler state `(scale, good)` rides in the scan carry; after `growth_interval`
    consecutive finite steps the scale doubles, a non-finite gradient halves it and resets
    `good` (Keras 3's and torch's rule, every factor explicit), and the optimizer is wrapped in
    `optax.apply_if_finite`, which skips the step: zero updates, the inner state unchanged.
    The carry also counts the non-finite steps so far (what each epoch records).
    """

    GROWTH, BACKOFF = 2.0, 0.5
    NEVER_GIVE_UP = 2**31 - 1  # apply_if_finite's max_consecutive_errors: skip every non-finite step

    def __init__(self, jnp: Any, loss_scale: dict[str, Any] | None) -> None:
        self.jnp = jnp
        self.kind = None if loss_scale is None else loss_scale["kind"]
        self.loss_scale = loss_scale
        self.settings: dict[str, Any] | None = None
        self.api = ""
        if self.kind == "fixed":
            self.settings = {"kind": "fixed", "scale": loss_scale["scale"]}
            self.api = "; jax.value_and_grad of loss * scale, gradients / scale"
        elif self.kind == "dynamic":
            self.settings = {"kind": "dynamic", "initial": loss_scale["initial"],
                             "growth_interval": loss_scale["growth_interval"], "growth_factor": self.GROWTH,
                             "backoff_factor": self.BACKOFF, "max_consecutive_errors": self.NEVER_GIVE_UP}
            self.api = ("; jax.value_and_grad of loss * scale, gradients / scale, (scale, good) in the lax.scan"
                        " carry; optax.apply_if_finite(optimizer, max_consecutive_errors=2**31 - 1)")

    def wrap(self, optax: Any, optimizer: Any) -> Any:
        """The optimizer (clipping included: it clips the unscaled gradient), wrapped to skip
        non-finite steps under a dynamic scale."""
        if self.kind != "dynamic":
            return optimizer
        return optax.apply_if_finite(optimizer, max_consecutive_errors=self.NEVER_GIVE_UP)

    def init(self) -> Any:
        """The scaler's part of the carry: (scale, good, non-finite steps so far) under a dynamic
        scale, else empty."""
        if self.kind != "dynamic":
            return ()
        jnp = self.jnp
        zero = jnp.asarray(0, jnp.int32)
        return jnp.asarray(self.loss_scale["initial"], jnp.float32), zero, zero

    def value_and_grad(self, jax: Any, loss_of: Any, scaler: Any) -> Any:
        """`jax.value_and_grad(loss_of)`, of the scaled loss when there is a scale, returning the
        unscaled loss and the unscaled gradients."""
        if self.kind is None:
            return jax.value_and_grad(loss_of)
        scale = scaler[0] if self.kind == "dynamic" else self.loss_scale["scale"]

        def scaled(*arguments: Any) -> Any:
            loss = loss_of(*arguments)
            return loss * scale, loss

        def unscaled(*arguments: Any) -> Any:
            (_, loss), gradients = jax.value_and_grad(scaled, has_aux=True)(*arguments)
            return loss, jax.tree.map(lambda gradient: gradient / scale, gradients)

        return unscaled

    def next(self, scaler: Any, gradients: Any) -> Any:
        """The scaler after a step: whether every (unscaled) gradient is finite, the test
        `apply_if_finite` makes to skip the step, decides the new scale."""
        if self.kind != "dynamic":
            return scaler
        jnp = self.jnp
        scale, good, nonfinite = scaler
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(gradient))
                                    for gradient in _frameworks.jax().tree.leaves(gradients)]))
        good = jnp.where(finite, good + 1, 0)
        grow = good == self.loss_scale["growth_interval"]
        scale = jnp.where(finite, jnp.where(grow, scale * self.GROWTH, scale), scale * self.BACKOFF)
        return scale, jnp.where(grow, 0, good), nonfinite + jnp.where(finite, 0, 1)

    def record(self, scaler: Any) -> Any:
        """What an epoch records: the scale after its last step and the count of non-finite
        (skipped) steps so far."""
        if self.kind != "dynamic":
            return ()
        return scaler[0], scaler[2]

    def per_epoch(self, recorded: Any, epochs: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Trajectory.loss_scale and .skipped: None without a scale; constant and zeros for a
        fixed one; the recorded scales and the per-epoch differences of the skip count."""
        if self.kind is None:
            return None, None
        if self.kind == "fixed":
            return np.full(epochs, self.loss_scale["scale"], dtype=np.float64), np.zeros(epochs, dtype=np.int64)
        scales, totals = recorded
        return np.asarray(scales, dtype=np.float64), np.diff(np.asarray(totals, dtype=np.int64), prepend=0)


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
    includes the warm-up). Per epoch: the same schedule of the epoch the update falls in, from
    the optimizer's update count (count // steps per epoch; under optax.MultiSteps, whose groups
    run on across epochs, the epoch of the group's last batch).
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
    if problem.accumulate > 1:  # optax.MultiSteps: update k ends batch (k + 1) N - 1, in whichever epoch that is
        return lambda count: of_t(((count + 1) * problem.accumulate - 1) // problem.steps_per_epoch)
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
