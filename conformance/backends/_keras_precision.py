"""Mixed precision in the Keras backends (Keras 2's and Keras 3's APIs alike): the loss-scale
optimizers, the layers' dtype policy, the scale and the skipped steps read back per epoch, and
the precision record of a run.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from conformance.problem import Problem


def keras2_loss_scale_optimizer(keras: ModuleType, inner: Any, scale: dict[str, Any]) -> Any:
    """Keras 2's `mixed_precision.LossScaleOptimizer` around `inner`, every setting explicit:
    `dynamic=False, initial_scale=S` (fixed: never skips) or `dynamic=True, initial_scale=S0,
    dynamic_growth_steps=G`. Unlike Keras 3 it advances `iterations` on a skipped step (so
    Adam's bias correction and a schedule count it; docs/mixed-precision.md)."""
    if scale["kind"] == "fixed":
        return keras.mixed_precision.LossScaleOptimizer(inner, dynamic=False, initial_scale=float(scale["scale"]))
    return keras.mixed_precision.LossScaleOptimizer(inner, dynamic=True, initial_scale=float(scale["initial"]),
                                                    dynamic_growth_steps=int(scale["growth_interval"]))


def is_keras3(keras: ModuleType) -> bool:
    """Keras 3 has `keras.ops`; Keras 2 (`tf.keras` of TF <= 2.15) has not."""
    return getattr(keras, "ops", None) is not None


def layer_dtype(keras: ModuleType, problem: Problem) -> Any:
    """The dtype each `Dense` gets: the case's dtype, or under mixed precision a per-layer
    policy ("mixed_bfloat16" | "mixed_float16": `keras.DTypePolicy` in Keras 3,
    `keras.mixed_precision.Policy` in Keras 2): float32 variables, the layer's inputs, matmul,
    bias add and activation in the compute dtype. The model's own policy stays float32 (no
    global state), so `compile` does not wrap the optimizer by itself."""
    if problem.precision is None:
        return problem.dtype
    if not is_keras3(keras):
        return keras.mixed_precision.Policy(problem.precision)
    return keras.DTypePolicy(problem.precision)


def scaling_state(keras: ModuleType, optimizer: Any) -> tuple[float, int]:
    """The optimizer's loss scale now and its `iterations`: Keras 3's `dynamic_scale` or fixed
    `loss_scale_factor` (its iterations count applied steps only), Keras 2's `loss_scale`
    (its iterations count skipped steps too: Keras2Skips reads those)."""
    if not is_keras3(keras):
        return as_float(keras, optimizer.loss_scale), int(as_float(keras, optimizer.iterations))
    scale = getattr(optimizer, "dynamic_scale", None)
    value = as_float(keras, scale) if scale is not None else float(optimizer.loss_scale_factor)
    return value, int(as_float(keras, optimizer.iterations))


class Keras2Skips:
    """Skipped steps of Keras 2's dynamic `LossScaleOptimizer`, read from its state after every
    step. Keras 2 advances `iterations` on a skipped step, so the count of applied steps is not
    there; a step was skipped when its good-step counter went back to 0 without the scale
    growing (growth also zeroes the counter, but doubles the scale; a skip halves it, with a
    floor of 1 where it stays)."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer
        self.scale = float(optimizer.loss_scale.numpy())
        self.skipped = 0

    def after_step(self) -> None:
        scale = float(self.optimizer.loss_scale.numpy())
        self.skipped += int(keras2_step_skipped(int(self.optimizer.dynamic_counter.numpy()), self.scale, scale))
        self.scale = scale


def keras2_step_skipped(counter: Any, scale_before: Any, scale_after: Any) -> Any:
    """Keras2Skips's rule, for Python numbers or (in a tf.function) tensors alike: the good-step
    counter back at 0 without the scale growing."""
    return (counter == 0) & (scale_after <= scale_before)


def loss_scale_settings(optimizer: Any) -> dict[str, Any] | None:
    """The loss scale settings as the optimizer holds them (what was really passed)."""
    if hasattr(optimizer, "inner_optimizer"):
        settings = {"class": type(optimizer).__name__, "inner": type(optimizer.inner_optimizer).__name__}
        if getattr(optimizer, "dynamic", True) is False:  # Keras 2's fixed scale
            return settings | {"dynamic": False, "initial_scale": float(optimizer.initial_scale)}
        return settings | {"initial_scale": float(optimizer.initial_scale),
                           "dynamic_growth_steps": int(optimizer.dynamic_growth_steps),
                           "growth_factor": 2.0, "backoff_factor": 0.5,
                           "note": "growth x2 and backoff x0.5 are fixed in Keras (no argument)"}
    factor = getattr(optimizer, "loss_scale_factor", None)
    return None if factor is None else {"class": type(optimizer).__name__, "loss_scale_factor": float(factor)}


def precision_info(keras: ModuleType, problem: Problem, model: Any, dtypes: dict[str, str]) -> dict[str, Any]:
    """`info["precision"]`: the precision, the compute dtype of the layers' policy, the dtypes
    read from a probe's real tensors (`dtypes`: output, loss, gradient, variable), the loss
    scale settings as the optimizer holds them, and the calls used."""
    optimizer = model.optimizer
    settings = loss_scale_settings(optimizer)
    keras3 = is_keras3(keras)
    policy = "keras.DTypePolicy" if keras3 else "tf.keras.mixed_precision.Policy"
    api = f"Dense(dtype={policy}({problem.precision!r})) per layer"
    if not keras3:
        api += "; Activation('linear', dtype='float32') last (the loss in float32)"
    prefix = "keras.optimizers" if keras3 else "tf.keras.mixed_precision"
    if settings is not None and "dynamic_growth_steps" in settings:
        dynamic = "" if keras3 else "dynamic=True, "
        api += (f"; {prefix}.LossScaleOptimizer({settings['inner']}, {dynamic}initial_scale="
                f"{settings['initial_scale']:g}, dynamic_growth_steps={settings['dynamic_growth_steps']})")
    elif settings is not None and "inner" in settings:
        api += f"; {prefix}.LossScaleOptimizer({settings['inner']}, dynamic=False, " \
               f"initial_scale={settings['initial_scale']:g})"
    elif settings is not None:
        api += f"; {settings['class']}(loss_scale_factor={settings['loss_scale_factor']:g})"
    if keras3:
        api += "; compile(auto_scale_loss=False)"
    return {"precision": problem.precision, "compute_dtype": str(model.layers[0].compute_dtype)} | dtypes | \
        {"loss_scale": settings, "api": api}


def dtype_name(dtype: Any) -> str:
    """A framework dtype as a short name ("bfloat16", "float32"): TF's `<dtype: 'x'>`, torch's
    `torch.x` and NumPy/JAX dtypes alike."""
    name = getattr(dtype, "name", None)
    return str(name) if isinstance(name, str) else str(dtype).removeprefix("torch.")


def as_float(keras: ModuleType, value: Any) -> float:
    """A scalar tensor or variable as a float: keras.ops in Keras 3, .numpy() in Keras 2."""
    ops = getattr(keras, "ops", None)
    return float(ops.convert_to_numpy(value) if ops is not None else value.numpy())
