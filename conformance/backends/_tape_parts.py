"""The parts of a GradientTape loop that the one-replica loop (`gradient_tape`) and the
data-parallel one (`_tape_distributed`) both build from: the variables, the forward pass, the
loss, the clipping, the optimizer with its loss scaling and the precision record.
"""

from __future__ import annotations

from typing import Any

from conformance.backends import _keras_common, _keras_precision, _tensorflow
from conformance.problem import Problem


def compute_dtype_of(keras: Any, problem: Problem) -> str | None:
    """The compute dtype of the case's mixed-precision policy (`keras.mixed_precision.Policy`,
    whose variable dtype, float32, is the variables'), or None without mixed precision."""
    if problem.precision is None:
        return None
    policy = keras.mixed_precision.Policy(problem.precision)
    if policy.variable_dtype != problem.dtype:
        raise ValueError(f"{problem.precision} keeps variables in {policy.variable_dtype}, not {problem.dtype}")
    return str(policy.compute_dtype)


def loop_optimizer(keras: Any, problem: Problem, learning_rate: Any) -> tuple[Any, dict[str, Any] | None]:
    """The case's Keras optimizer, and under a loss scale the scaling settings as passed.

    With a loss scale the loop scales the loss with the optimizer's `scale_loss` and hands the
    scaled gradients to `apply`, which unscales them (and, dynamic, skips a non-finite step)
    before it updates: Keras 3's own mechanism, so the clipping moves onto the (inner) optimizer
    (`global_clipnorm` / `clipnorm` / `clipvalue`), which clips the unscaled gradients. A fixed
    scale is the optimizer's `loss_scale_factor` (Keras 3's `LossScaleOptimizer` has no fixed
    mode and tells users to set that instead); a dynamic one is
    `LossScaleOptimizer(inner, initial_scale, dynamic_growth_steps)`, whose growth x2 and backoff
    x0.5 are Keras's fixed rule (not arguments). Keras 2: its
    `mixed_precision.LossScaleOptimizer(inner, dynamic, initial_scale, dynamic_growth_steps)`
    around an optimizer without clipping (the loop clips the unscaled gradients itself).
    """
    if problem.loss_scale is None:
        return _keras_common.optimizer(keras, problem.optimizer, learning_rate), None
    if _tensorflow.keras_major() < 3:
        inner = _keras_common.optimizer(keras, problem.optimizer, learning_rate)
        optimizer = _keras_precision.keras2_loss_scale_optimizer(keras, inner, problem.loss_scale)
        return optimizer, {"optimizer": f"mixed_precision.LossScaleOptimizer({type(inner).__name__})",
                           "dynamic": bool(optimizer.dynamic), "initial_scale": float(optimizer.initial_scale),
                           "dynamic_growth_steps": optimizer.dynamic_growth_steps} | \
            ({"growth_factor": 2.0, "backoff_factor": 0.5} if optimizer.dynamic else {})
    inner = _keras_common.optimizer(keras, problem.optimizer, learning_rate, problem.clip)
    if problem.loss_scale["kind"] == "fixed":
        inner.loss_scale_factor = float(problem.loss_scale["scale"])
        return inner, {"optimizer": type(inner).__name__, "loss_scale_factor": inner.loss_scale_factor}
    optimizer = keras.optimizers.LossScaleOptimizer(inner, initial_scale=float(problem.loss_scale["initial"]),
                                                    dynamic_growth_steps=int(problem.loss_scale["growth_interval"]))
    return optimizer, {"optimizer": f"LossScaleOptimizer({type(inner).__name__})",
                       "initial_scale": optimizer.initial_scale,
                       "dynamic_growth_steps": optimizer.dynamic_growth_steps,
                       "growth_factor": 2.0, "backoff_factor": 0.5}  # Keras 3's fixed rule


def precision_info(problem: Problem, seen: dict[str, str], scaling: dict[str, Any] | None) -> dict[str, Any]:
    """info["precision"]: the dtypes of the traced tensors of this run, and the calls used."""
    api = f"tf.cast to keras.mixed_precision.Policy({problem.precision!r}).compute_dtype in the forward pass, " \
          "tf.cast(output, float32) before the loss"
    if scaling is not None and _tensorflow.keras_major() < 3:
        api += f"; {scaling['optimizer']}: optimizer.get_scaled_loss(loss) in the tape, " \
               "optimizer.get_unscaled_gradients(grads), the loop's clipping, optimizer.apply_gradients"
    elif scaling is not None:
        api += f"; {scaling['optimizer']}: optimizer.scale_loss(loss) in the tape, optimizer.apply(grads, vars)"
    return {"precision": problem.precision, **seen, "loss_scale": scaling, "api": api}


def variables(tf: Any, problem: Problem) -> list[tuple[Any, Any, Any]]:
    """(layer, kernel variable (inputs, units), bias variable or None) per layer, in the
    harness's layout (TensorFlow's own: no transposes)."""
    found = []
    for layer, kernel, bias in problem.initial_layers():
        name = "weights" if len(problem.layers) == 1 else f"{layer.name}_kernel"
        found.append((layer, tf.Variable(kernel, name=name),
                      None if bias is None else tf.Variable(bias, name="bias" if len(problem.layers) == 1
                                                            else f"{layer.name}_bias")))
    return found


def forward(tf: Any, x: Any, layers: list[tuple[Any, Any, Any]], compute_dtype: str | None = None,
             seen: dict[str, str] | None = None) -> Any:
    """x through every layer: `tf.matmul` and the bias, then the hidden layers' activation.

    Mixed precision (`compute_dtype`): the input, each kernel and each bias `tf.cast` to the
    compute dtype, so that the matmul, the bias add and the activation run in it, and the
    output cast back to the variables' dtype (float32) before the loss; `seen` gets the dtypes
    of the traced tensors (the first matmul's, and the model's output before that cast).
    Without it no cast is traced: the graph is the float32/float64 loop's.
    """
    cast = (lambda value: value) if compute_dtype is None else (lambda value: tf.cast(value, compute_dtype))
    output = cast(x)
    for layer, kernel, bias in layers:
        output = tf.matmul(output, cast(kernel))
        if seen is not None:
            seen.setdefault("compute_dtype", output.dtype.name)
        if bias is not None:
            output = output + cast(bias)
        if layer.name != "output":
            output = activation(tf, layer.activation, layer.settings)(output)
    if compute_dtype is None:
        return output
    if seen is not None:
        seen["output_dtype"] = output.dtype.name
    return tf.cast(output, layers[-1][1].dtype)


def activation(tf: Any, name: str, settings: dict[str, Any] | None) -> Any:
    """The TensorFlow op of an activation as a GradientTape loop's author calls it, every setting
    explicit: `tf.nn` and `tf.math`, and Keras's `elu` for an alpha (`tf.nn.elu` has none)."""
    if name == "gelu":
        return lambda z: tf.nn.gelu(z, approximate=settings["approximate"])
    if name == "leaky_relu":
        return lambda z: tf.nn.leaky_relu(z, alpha=settings["negative_slope"])
    if name == "elu":
        return lambda z: _tensorflow.keras().activations.elu(z, alpha=settings["alpha"])
    return {"linear": tf.identity, "relu": tf.nn.relu, "tanh": tf.math.tanh, "sigmoid": tf.math.sigmoid,
            "softplus": tf.math.softplus, "silu": tf.nn.silu}[name]


def clipped(tf: Any, gradients: list[Any], clip: dict[str, Any] | None) -> list[Any]:
    """The case's clipping as a GradientTape loop's author writes it, before weight decay:
    `tf.clip_by_global_norm`, `tf.clip_by_norm` per variable, or `tf.clip_by_value`."""
    if clip is None:
        return gradients
    threshold = clip["threshold"]
    if clip["kind"] == "global_norm":
        return tf.clip_by_global_norm(gradients, threshold)[0]
    if clip["kind"] == "norm":
        return [tf.clip_by_norm(gradient, threshold) for gradient in gradients]
    return [tf.clip_by_value(gradient, -threshold, threshold) for gradient in gradients]


def per_sample_loss(tf: Any, problem: Problem, output: Any, y_batch: Any, delta: Any) -> Any:
    """The case's loss per sample, (m, 1), as a GradientTape loop's author writes it: the
    formula for mse and huber, TensorFlow's logits loss, Keras's probability loss (with its
    clipping) for a model that ends in a sigmoid."""
    if problem.loss == "bce":
        if problem.from_logits:
            return tf.nn.sigmoid_cross_entropy_with_logits(labels=y_batch, logits=output)
        probabilities = tf.math.sigmoid(output)
        return tf.reshape(_tensorflow.keras().losses.binary_crossentropy(y_batch, probabilities), [-1, 1])
    residual = output - y_batch
    if problem.loss == "huber":
        size = tf.abs(residual)
        return tf.where(size <= delta, 0.5 * tf.square(residual), delta * (size - 0.5 * delta))
    return tf.square(residual)


