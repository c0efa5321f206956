"""What every Keras backend shares, written against the API that Keras 2 (`tf.keras`) and
Keras 3 on any of its backends have in common: the dtype, the optimizer with every setting
explicit, and the one-unit model with the case's initial parameters and loss.

Each function takes the Keras module to use, so that `keras` and `keras_xla` (tf.keras in the
test process) and `keras_jax` and `keras_torch` (standalone Keras 3 in a worker process) build
the same model the same way.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import numpy as np

from conformance.backends import Unavailable, _compiled, _keras_precision
from conformance.problem import Optimizer, Problem


@contextlib.contextmanager
def floatx(keras: ModuleType, dtype: str) -> Iterator[None]:
    """Keras keeps the learning rate in a floatx variable: float64 training needs floatx float64,
    or the rate is rounded to float32 (0.01 -> 0.009999999776) before it reaches the update."""
    previous = keras.backend.floatx()
    keras.backend.set_floatx(dtype)
    try:
        yield
    finally:
        keras.backend.set_floatx(previous)


def optimizer(keras: ModuleType, optimizer: Optimizer, learning_rate: Any = None,
              clip: dict[str, Any] | None = None, loss_scale_factor: float | None = None,
              accumulate: int = 1) -> Any:
    """A Keras optimizer with every hyperparameter passed explicitly (Keras 2 and 3 alike).

    Weight decay is left out here: the case format's weight decay is added to the gradient
    (coupled), while Keras's `weight_decay` is decoupled; each backend adds it its own way.
    Keras's own defaults (Adam epsilon 1e-7, Adagrad initial accumulator 0.1) never apply.
    `learning_rate`: a schedule object instead of the constant rate. `clip`: the case's
    clipping as the optimizer's own `global_clipnorm`, `clipnorm` (each variable on its own)
    or `clipvalue`. `loss_scale_factor` (Keras 3 only): a fixed loss scale, the optimizer's own
    (the loss is multiplied by it, the gradients divided by it, nothing is skipped).
    `accumulate` > 1 (Keras 3 only): the optimizer's own `gradient_accumulation_steps`.
    """
    settings = optimizer.settings
    optimizers = keras.optimizers
    clipping = {"global_clipnorm": None, "clipnorm": None, "clipvalue": None}
    if clip is not None:
        clipping[KERAS_CLIP_ARGUMENT[clip["kind"]]] = clip["threshold"]
    common = {"learning_rate": settings["learning_rate"] if learning_rate is None else learning_rate,
              "weight_decay": None, "use_ema": False} | clipping
    if loss_scale_factor is not None:
        common["loss_scale_factor"] = loss_scale_factor
    if accumulate > 1:
        common["gradient_accumulation_steps"] = accumulate
    if optimizer.name == "sgd":
        return optimizers.SGD(momentum=settings["momentum"], nesterov=settings["nesterov"], **common)
    if optimizer.name == "adam":
        return optimizers.Adam(beta_1=settings["beta_1"], beta_2=settings["beta_2"], epsilon=settings["epsilon"],
                               amsgrad=settings["amsgrad"], **common)
    if optimizer.name == "rmsprop":
        return optimizers.RMSprop(rho=settings["rho"], momentum=settings["momentum"], epsilon=settings["epsilon"],
                                  centered=settings["centered"], **common)
    if optimizer.name == "adagrad":
        return optimizers.Adagrad(initial_accumulator_value=settings["initial_accumulator_value"],
                                  epsilon=settings["epsilon"], **common)
    raise NotImplementedError(f"optimizer {optimizer.name} is not supported by the Keras backends")


KERAS_CLIP_ARGUMENT = {"global_norm": "global_clipnorm", "norm": "clipnorm", "value": "clipvalue"}


def scaled_optimizer(keras: ModuleType, problem: Problem, learning_rate: Any = None,
                     clip: dict[str, Any] | None = None) -> Any:
    """The case's optimizer (`optimizer`) with the case's loss scale, as Keras users set it.

    No loss scale: the optimizer itself. Keras 3: a fixed S is the optimizer's own
    `loss_scale_factor=S` (Keras 3's LossScaleOptimizer has no fixed mode); dynamic is
    `LossScaleOptimizer(inner, initial_scale=S0, dynamic_growth_steps=G)`. Keras 2:
    `tf.keras.mixed_precision.LossScaleOptimizer(inner, dynamic=..., initial_scale=...,
    dynamic_growth_steps=...)`, fixed or dynamic. Growth (x2) and backoff (x0.5) are fixed in
    both, with no argument to pass. Clipping stays on the inner optimizer, which clips the
    unscaled gradients (Keras 3's wrapper refuses clipping arguments).
    """
    scale = problem.loss_scale
    accumulate = problem.accumulate
    if accumulate > 1 and not _keras_precision.is_keras3(keras):
        raise Unavailable("Keras 2 (TensorFlow <= 2.15) has no gradient accumulation: its optimizers take no "
                          "gradient_accumulation_steps and fit has no accumulation option")
    if accumulate > 1 and problem.replicas > 1 and keras.backend.backend() == "tensorflow":
        raise Unavailable("Keras 3 on TensorFlow cannot accumulate gradients under MirroredStrategy: "
                          "gradient_accumulation_steps puts the update, whose all-reduce is a merge_call, inside "
                          "ops.cond (keras/src/optimizers/base_optimizer.py _backend_apply_gradients; "
                          "keras/src/backend/tensorflow/optimizer.py _backend_update_step), and TensorFlow raises "
                          "'merge_call called while defining a new graph or a tf.function' (measured with Keras "
                          "3.15.1, TF 2.21; keras-team/keras#17429, tensorflow/tensorflow#59487)")
    if accumulate > 1 and scale is not None and scale["kind"] == "dynamic":
        raise Unavailable("Keras 3's LossScaleOptimizer refuses gradient_accumulation_steps; set on the inner "
                          "optimizer, each micro-batch's overflow check skips and shifts the groups: not modelled")
    if scale is None:
        return optimizer(keras, problem.optimizer, learning_rate, clip, accumulate=accumulate)
    if not _keras_precision.is_keras3(keras):
        inner = optimizer(keras, problem.optimizer, learning_rate, clip)
        return _keras_precision.keras2_loss_scale_optimizer(keras, inner, scale)
    if scale["kind"] == "fixed":
        return optimizer(keras, problem.optimizer, learning_rate, clip, loss_scale_factor=scale["scale"],
                         accumulate=accumulate)
    inner = optimizer(keras, problem.optimizer, learning_rate, clip)
    return keras.optimizers.LossScaleOptimizer(inner, initial_scale=scale["initial"],
                                               dynamic_growth_steps=scale["growth_interval"])


def schedule(keras: ModuleType, problem: Problem) -> Any:
    """The case's schedule as a `keras.optimizers.schedules` object of t, or None.

    Translations (docs/schedules.md): `ExponentialDecay` as it is; `PiecewiseConstantDecay`
    with every boundary one less (Keras switches after a boundary, the case format at it);
    `CosineDecay(lr, decay_steps, alpha)`, or with a warm-up `CosineDecay(0, decay_steps,
    alpha, warmup_target=lr, warmup_steps)` (Keras's decay_steps excludes the warm-up, as the
    case format's does).
    """
    if problem.schedule is None:
        return None
    schedules, rate = keras.optimizers.schedules, problem.learning_rate
    kind, settings = problem.schedule["kind"], problem.schedule["settings"]
    if kind == "exponential":
        return schedules.ExponentialDecay(rate, decay_steps=settings["decay_steps"],
                                          decay_rate=settings["decay_rate"], staircase=settings["staircase"])
    if kind == "piecewise":
        return schedules.PiecewiseConstantDecay(boundaries=[boundary - 1 for boundary in settings["boundaries"]],
                                                values=list(settings["values"]))
    if settings["warmup_steps"]:
        return schedules.CosineDecay(0.0, decay_steps=settings["decay_steps"], alpha=settings["alpha"],
                                     warmup_target=rate, warmup_steps=settings["warmup_steps"])
    return schedules.CosineDecay(rate, decay_steps=settings["decay_steps"], alpha=settings["alpha"])


def per_step_schedule(keras: ModuleType, problem: Problem) -> Any:
    """The schedule the optimizer takes as its learning rate: per step only (per epoch, the
    rate is a constant that a callback sets at each epoch's start)."""
    return None if problem.schedule_every_epoch else schedule(keras, problem)


def epoch_scheduler(keras: ModuleType, problem: Problem) -> Any:
    """For `every: epoch`: Keras's `LearningRateScheduler` callback, which sets the optimizer's
    rate at each epoch's start to the Keras schedule's value at the epoch's index; or None."""
    if not problem.schedule_every_epoch:
        return None
    of_epoch = schedule(keras, problem)
    return keras.callbacks.LearningRateScheduler(lambda epoch, rate: float(of_epoch(epoch)), verbose=0)


def current_rate(keras: ModuleType, optimizer: Any, schedule_object: Any) -> float:
    """The learning rate of the optimizer's last step, read back from Keras: its schedule at
    the optimizer's own iteration count less one, or its rate variable (per-epoch callback).
    With gradient accumulation, the schedule at the batch count of the last update, less one
    (keras/src/optimizers/base_optimizer.py: `self._learning_rate(self._iterations)`)."""
    as_float = _keras_precision.as_float
    if schedule_object is not None:
        steps = getattr(optimizer, "gradient_accumulation_steps", None)
        if steps:  # the schedule is called with the batches so far (`_iterations`) at each update
            updates = int(as_float(keras, optimizer._iterations)) // steps
            return as_float(keras, schedule_object(updates * steps - 1))
        return as_float(keras, schedule_object(int(as_float(keras, optimizer.iterations)) - 1))
    return as_float(keras, optimizer.learning_rate)


def model(keras: ModuleType, problem: Problem, steps_per_execution: int, jit_compile: bool) -> Any:
    """`Sequential([Input, Dense(units, activation=...), ..., Dense(1)])` with the case's initial
    parameters (a sigmoid activation on the output for `bce` on probabilities), compiled with the
    case's optimizer and loss. Weight decay is an L2 regularizer on every kernel and bias:
    coupled decay (added to the gradient) is exactly an L2 penalty of decay / 2, and Keras's
    history loss then includes it."""
    decay = problem.optimizer.settings.get("weight_decay", 0.0)
    regularizer = keras.regularizers.L2(decay / 2) if decay else None
    # dtype is explicit: Keras caches its global dtype policy from floatx on first use, so a
    # later set_floatx alone would leave float64 cases with float32 layers (or the reverse).
    layers, initial = [], []
    for layer, kernel, bias in problem.initial_layers():
        if layer.name == "output":
            chosen = "sigmoid" if problem.loss == "bce" and not problem.from_logits else "linear"
        else:
            chosen = activation(keras, layer.activation, layer.settings)
        layers.append(keras.layers.Dense(layer.units, activation=chosen, use_bias=layer.bias,
                                         kernel_regularizer=regularizer,
                                         bias_regularizer=regularizer if layer.bias else None,
                                         dtype=_keras_precision.layer_dtype(keras, problem), name=layer.name))
        initial.append([kernel] + ([] if bias is None else [bias]))
    # Keras 2 computes the loss in its input's dtype: the mixed-precision guide's float32 last layer
    last = [keras.layers.Activation("linear", dtype="float32", name="output_float32")] \
        if problem.precision is not None and not _keras_precision.is_keras3(keras) else []
    built = keras.Sequential([keras.Input(shape=(problem.features,), dtype=problem.dtype), *layers, *last])
    for dense, weights in zip(layers, initial):
        dense.set_weights(weights)
    # mixed precision: the loss scale is the one built here, never compile's default wrapper
    # (Keras 2 wraps only when the model's own policy is mixed_float16; here it is float32)
    wrapper = {"auto_scale_loss": False} if problem.precision is not None and _keras_precision.is_keras3(keras) else {}
    built.compile(optimizer=scaled_optimizer(keras, problem, per_step_schedule(keras, problem), problem.clip),
                  loss=loss(keras, problem),
                  steps_per_execution=steps_per_execution, jit_compile=jit_compile, **wrapper)
    return built


def activation(keras: ModuleType, name: str, settings: dict[str, Any] | None) -> Any:
    """The `keras.activations` function of an activation, every setting explicit. Keras 2 has
    no `silu` or `leaky_relu` by those names: `swish` and `relu(alpha=...)` are the same
    functions there."""
    import functools

    found = keras.activations
    keras2 = not hasattr(found, "leaky_relu")
    if name == "gelu":
        return functools.partial(found.gelu, approximate=settings["approximate"])
    if name == "leaky_relu":
        slope = settings["negative_slope"]
        return functools.partial(found.relu, alpha=slope) if keras2 else \
            functools.partial(found.leaky_relu, negative_slope=slope)
    if name == "elu":
        return functools.partial(found.elu, alpha=settings["alpha"])
    if name == "silu" and keras2:
        return found.swish
    return getattr(found, name)


def parameters(built: Any) -> list[Any]:
    """Every layer's variables in the harness's layout: kernel (inputs, units), then bias."""
    return [variable for layer in built.layers for variable in layer.weights]


def output_kernel(built: Any) -> Any:
    """The output `Dense`'s kernel (Keras 2 under mixed precision ends in a float32 Activation)."""
    return next(layer for layer in reversed(built.layers) if layer.weights).kernel


class EpochRecords:
    """What a recorder callback keeps per case epoch: the parameters, Keras's own loss, and the
    time at its end. A mixin for the callback classes, which are made at runtime because Keras is
    imported lazily (and, in a worker, on another backend)."""

    def record_rate(self, keras: ModuleType) -> None:
        """With a schedule (`self.problem`'s), the rate of the last step, read back from Keras."""
        if self.problem.schedule is None:
            return
        if not hasattr(self, "_schedule"):
            self._schedule = per_step_schedule(keras, self.problem)
        self.rates.append(current_rate(keras, self.model.optimizer, self._schedule))

    def reset_records(self) -> None:
        self.rows: list[np.ndarray] = []
        self.losses: list[float] = []
        self.rates: list[float] = []  # with a schedule: the rate of each epoch's last step
        self.ends: list[float] = []  # perf_counter at the end of each case epoch
        self.started = 0.0
        self.scales: list[float] = []  # with a loss scale: the optimizer's scale after each epoch
        self.iterations: list[int] = []  # ... and its iterations (applied steps) then
        self.skips: _keras_precision.Keras2Skips | None = None  # Keras 2's dynamic scaling: skips read per step

    def record_scaling(self, scale: float, iterations: int) -> None:
        """With a loss scale: the optimizer's scale and iterations at an epoch's end (less the
        skipped steps under Keras 2, whose iterations count them)."""
        self.scales.append(scale)
        self.iterations.append(iterations - (0 if self.skips is None else self.skips.skipped))

    @property
    def history_loss_scale(self) -> np.ndarray | None:
        return np.asarray(self.scales, dtype=np.float64) if self.problem.loss_scale is not None else None

    @property
    def history_skipped(self) -> np.ndarray | None:
        """Skipped steps per epoch: the epoch's steps less the optimizer's applied ones (the
        increase of Keras 3's `iterations`, which a skipped step leaves alone)."""
        if self.problem.loss_scale is None:
            return None
        applied = np.diff(np.asarray([0, *self.iterations], dtype=np.int64))
        if self.problem.accumulate > 1:  # Keras 3's iterations count updates, _iterations // N, across epochs
            batches = np.arange(1, len(self.iterations) + 1, dtype=np.int64) * self.problem.steps_per_epoch
            return np.diff(np.asarray([0, *(batches // self.problem.accumulate)])) - applied
        return self.problem.steps_per_epoch - applied

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.started = time.perf_counter()

    def record(self, parameters: np.ndarray, logs: dict | None) -> None:
        self.ends.append(time.perf_counter())
        self.losses.append(float((logs or {}).get("loss", np.nan)))
        self.rows.append(parameters)

    @property
    def compile_seconds(self) -> float | None:
        """The first epoch's time beyond a typical epoch's: tracing and compiling the step."""
        return _compiled.first_call_overhead(np.diff([self.started, *self.ends]))

    @property
    def history_params(self) -> np.ndarray:
        return np.asarray(self.rows, dtype=np.float64)

    @property
    def history_loss(self) -> np.ndarray:
        return np.asarray(self.losses, dtype=np.float64)

    @property
    def history_rates(self) -> np.ndarray | None:
        return np.asarray(self.rates, dtype=np.float64) if self.rates else None


def loss(keras: ModuleType, problem: Problem) -> Any:
    """The case's loss as the Keras loss object users pass to `compile`, every setting explicit
    (`sum_over_batch_size` is Keras's name for the case format's `mean`)."""
    reduction = "sum" if problem.reduction == "sum" else "sum_over_batch_size"
    if problem.loss == "huber":
        return keras.losses.Huber(delta=problem.delta, reduction=reduction)
    if problem.loss == "bce":
        return keras.losses.BinaryCrossentropy(from_logits=problem.from_logits, label_smoothing=0.0,
                                               reduction=reduction)
    return keras.losses.MeanSquaredError(reduction=reduction)


def outputs_as_predictions(problem: Problem, outputs: Any, sigmoid: Any) -> np.ndarray:
    """The model's outputs for `predict` as float64: probabilities for `bce` (a logits model's
    outputs through the framework's own `sigmoid`)."""
    if problem.loss == "bce" and problem.from_logits:
        outputs = sigmoid(outputs)
    return np.asarray(outputs, dtype=np.float64)[:, 0]
