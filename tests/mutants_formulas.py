"""Mutants of optimizer formulas and constants: small rates, betas and thresholds off by a little,
a float64-only slip, epsilon moved out of a square root. Appended to tests/mutants.py's CATALOGUE.

Each one patches the framework's own class or function, as in tests/mutants.py. The two controls
(keras-sgd-lr-1e-3, torch-sgd-lr-1e-3) are bugs of a size that any SGD case should catch.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from tests.mutants import TF_KERAS, Mutant, _one_minus_scaled, _optax, _patch_init, _scaled, _tf_keras, _torch


def _is_float64(keras: Any, variables: Any) -> bool:
    """Whether any of `variables` (Keras variables or tf.Variables) is float64."""
    return any(keras.backend.standardize_dtype(variable.dtype) == "float64" for variable in variables)


def _keras_rate_scaled(keras: Any, factor: float) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A Keras optimizer's learning_rate `factor` times the given one: a float scaled, a
    LearningRateSchedule wrapped in one that scales its every value."""
    schedules = keras.optimizers.schedules

    class Scaled(schedules.LearningRateSchedule):
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __call__(self, step: Any) -> Any:
            return self.inner(step) * factor

        def get_config(self) -> dict[str, Any]:
            return {"inner": self.inner, "factor": factor}

    def change(kwargs: dict[str, Any]) -> dict[str, Any]:
        rate = kwargs["learning_rate"]
        return kwargs | {"learning_rate": Scaled(rate) if isinstance(rate, schedules.LearningRateSchedule)
                         else rate * factor}

    return change


def _keras_rate_off(name: str, factor: float) -> Callable[[], None]:
    def apply() -> None:
        keras = _tf_keras()
        cls = getattr(keras.optimizers, name)
        _patch_init(cls, _keras_rate_scaled(keras, factor))

    return apply


def _keras_sgd_momentum_float64_off() -> None:
    """Keras SGD's momentum 1e-3 too large when its variables are float64 (a constant slip on the
    float64 path): set in `build`, where the variables' dtype is first known, before any update
    step reads `self.momentum`."""
    keras = _tf_keras()
    cls = keras.optimizers.SGD
    original = cls.build

    @functools.wraps(original)
    def build(self: Any, variables: Any) -> Any:
        already = self.built
        result = original(self, variables)
        if not already and self.momentum != 0 and _is_float64(keras, variables):
            self.momentum = self.momentum + 1e-3
        return result

    cls.build = build


def _keras_adam_betas_float64_off() -> None:
    """Keras Adam's 1 - beta_1 and 1 - beta_2 1% too large when its variables are float64 (set in
    `build`, before any update step reads the betas)."""
    keras = _tf_keras()
    cls = keras.optimizers.Adam
    original = cls.build

    @functools.wraps(original)
    def build(self: Any, var_list: Any) -> Any:
        already = self.built
        result = original(self, var_list)
        if not already and _is_float64(keras, var_list):
            self.beta_1 = 1 - (1 - self.beta_1) * 1.01
            self.beta_2 = 1 - (1 - self.beta_2) * 1.01
        return result

    cls.build = build


def _keras_rmsprop_epsilon_outside_root() -> None:
    """Keras RMSprop's update as lr g / (sqrt(v) + epsilon) (PyTorch's form) instead of Keras's own
    lr g / sqrt(v + epsilon): keras/src/optimizers/rmsprop.py's update_step with that one line
    changed (centered: sqrt(v - mean(g)^2) + epsilon)."""
    keras = _tf_keras()
    ops = keras.ops
    cls = keras.optimizers.RMSprop

    def update_step(self: Any, gradient: Any, variable: Any, learning_rate: Any) -> None:
        lr = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        velocity = self._velocities[self._get_variable_index(variable)]
        momentum = self._momentums[self._get_variable_index(variable)] if self.momentum > 0 else None
        average_grad = self._average_gradients[self._get_variable_index(variable)] if self.centered else None
        rho = self.rho
        self.assign(velocity, ops.add(ops.multiply(rho, velocity), ops.multiply(1 - rho, ops.square(gradient))))
        if self.centered:
            self.assign(average_grad, ops.add(ops.multiply(rho, average_grad), ops.multiply(1 - rho, gradient)))
            root = ops.sqrt(velocity - ops.square(average_grad))
        else:
            root = ops.sqrt(velocity)
        increment = ops.divide(ops.multiply(lr, gradient), ops.add(root, self.epsilon))
        if self.momentum > 0:
            self.assign(momentum, ops.add(ops.multiply(self.momentum, momentum), increment))
            self.assign_sub(variable, momentum)
        else:
            self.assign_sub(variable, increment)

    cls.update_step = update_step


def _torch_clip_grad_norm_off() -> None:
    """torch.nn.utils.clip_grad_norm_ clipping at max_norm 1% too large (both names it has:
    torch.nn.utils.clip_grad_norm_, which the torch backend calls, and clip_grad's own)."""
    torch = _torch()
    import torch.nn.utils.clip_grad as clip_grad

    original = torch.nn.utils.clip_grad_norm_
    signature = inspect.signature(original)

    @functools.wraps(original)
    def clip_grad_norm_(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.arguments["max_norm"] = bound.arguments["max_norm"] * 1.01
        return original(*bound.args, **bound.kwargs)

    torch.nn.utils.clip_grad_norm_ = clip_grad_norm_
    if clip_grad.clip_grad_norm_ is original:
        clip_grad.clip_grad_norm_ = clip_grad_norm_


def _optax_adagrad_lr_off() -> None:
    """optax.adagrad's learning_rate 1e-3 (relative) too large: a float scaled, a schedule (a
    callable of the step count) wrapped. The rate may come positionally (the jax backend's
    constant rate) or by name (optax.inject_hyperparams, under a schedule)."""
    optax = _optax()
    original = optax.adagrad
    signature = inspect.signature(original)

    @functools.wraps(original)
    def adagrad(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        rate = bound.arguments["learning_rate"]
        bound.arguments["learning_rate"] = (
            (lambda count: rate(count) * 1.001) if callable(rate) else rate * 1.001)
        return original(*bound.args, **bound.kwargs)

    optax.adagrad = adagrad


TORCH = ("torch", "torch_compile")

FORMULA_MUTANTS = [Mutant(*fields) for fields in [
    ("keras-rmsprop-rho-off", TF_KERAS, "main",
     "Keras's RMSprop with 1 - rho 1% too large",
     lambda: _patch_init(_tf_keras().optimizers.RMSprop, _one_minus_scaled("rho", 1.01))),
    ("keras-adagrad-lr-1e-3", TF_KERAS, "main",
     "Keras's Adagrad's learning rate 1e-3 (relative) too large",
     _keras_rate_off("Adagrad", 1.001)),
    ("keras-sgd-momentum-float64-off", TF_KERAS, "main",
     "Keras's SGD with momentum 1e-3 too large when training in float64",
     _keras_sgd_momentum_float64_off),
    ("keras-adam-betas-float64-off", TF_KERAS, "main",
     "Keras's Adam with 1 - beta_1 and 1 - beta_2 1% too large when training in float64",
     _keras_adam_betas_float64_off),
    ("keras-exponential-decay-rate-off", TF_KERAS, "main",
     "Keras's ExponentialDecay with 1 - decay_rate 1% too large",
     lambda: _patch_init(_tf_keras().optimizers.schedules.ExponentialDecay, _one_minus_scaled("decay_rate", 1.01))),
    ("torch-clip-grad-norm-off", TORCH, "main",
     "torch.nn.utils.clip_grad_norm_ clips at a max_norm 1% too large",
     _torch_clip_grad_norm_off),
    ("optax-adagrad-lr-1e-3", ("jax",), "main",
     "optax.adagrad's learning rate 1e-3 (relative) too large",
     _optax_adagrad_lr_off),
    ("keras-sgd-lr-1e-3", TF_KERAS, "main",
     "Keras's SGD's learning rate 1e-3 (relative) too large (a control: any SGD case should catch it)",
     _keras_rate_off("SGD", 1.001)),
    ("torch-sgd-lr-1e-3", TORCH, "main",
     "torch.optim.SGD's learning rate 1e-3 (relative) too large (a control: any SGD case should catch it)",
     lambda: _patch_init(_torch().optim.SGD, _scaled("lr", 1.001))),
    ("keras-rmsprop-epsilon-outside-root", TF_KERAS, "main",
     "Keras's RMSprop divides by sqrt(v) + epsilon (PyTorch's form) instead of its own sqrt(v + epsilon)",
     _keras_rmsprop_epsilon_outside_root),
]]
