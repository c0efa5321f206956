"""Update rules of the float64 replay: one documented formula per optimizer, PyTorch's.

Each rule is the "Algorithm" box of the `torch.optim` documentation (torch 2.x), with the
case's hyperparameters; `t` counts steps from 1, all state starts at zero unless stated.

SGD (`torch.optim.SGD`, dampening 0):
    g = grad + weight_decay * p
    b = g on the first step, else momentum * b + g
    g = g + momentum * b if nesterov else b          (when momentum > 0)
    p = p - learning_rate * g
  Keras keeps v = momentum * v - lr * g instead; for a constant learning rate the two give the
  same parameters (v = -lr * b). Weight decay applies to every parameter, bias included.

Adam (`torch.optim.Adam`):
    m = beta_1 * m + (1 - beta_1) * g;   v = beta_2 * v + (1 - beta_2) * g^2
    v_max = max(v_max, v) when amsgrad, and v_max stands for v below
    p = p - (learning_rate / (1 - beta_1^t)) * m / (sqrt(v) / sqrt(1 - beta_2^t) + epsilon)
  Keras adds epsilon after folding sqrt(1 - beta_2^t) into the step ("epsilon hat"): its
  update equals this one with epsilon * sqrt(1 - beta_2^t), a different constant every step.

RMSprop (`torch.optim.RMSprop`, alpha = rho):
    v = rho * v + (1 - rho) * g^2
    centered: a = rho * a + (1 - rho) * g, and v - a^2 stands for v below
    d = g / (sqrt(v) + epsilon)
    momentum > 0: b = momentum * b + d,  p = p - learning_rate * b;  else p = p - learning_rate * d
  Keras divides by sqrt(v + epsilon) (epsilon inside the root) and accumulates
  learning_rate * d in its momentum buffer (the same for a constant learning rate).

Adagrad (`torch.optim.Adagrad`, lr_decay 0):
    s = initial_accumulator_value at the start;  s = s + g^2
    p = p - learning_rate * g / (sqrt(s) + epsilon)
  Keras divides by sqrt(s + epsilon).

With epsilon = 0 the Keras and PyTorch formulas above are the same; `cases/optimizers/` proves
it in float64, and measures what epsilon changes where gradients are small.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from conformance.problem import Optimizer

Update = Callable[[np.ndarray, np.ndarray, float], np.ndarray]
Rounding = Callable[[np.ndarray], np.ndarray]


def _exact(values: np.ndarray) -> np.ndarray:
    return values


def make_update(optimizer: Optimizer, rounding: Rounding | None = None) -> Update:
    """A stateful function (params, grad, learning_rate) -> new params for one optimizer's
    settings. The rate is the step's own (a schedule's, or the constant one): every state above
    is kept without it, and it multiplies the whole step, as in PyTorch and optax.

    `rounding`, when given, perturbs every state value the optimizer stores (and centered
    RMSprop's a^2 before it is subtracted) as a framework's rounding in the training dtype
    would: the perturbed replays of `parity: auto` then see what rounding does inside the
    optimizer, such as the cancellation in v - a^2 (reference.replay)."""
    builders = {"sgd": _sgd, "adam": _adam, "rmsprop": _rmsprop, "adagrad": _adagrad}
    settings = {name: value for name, value in optimizer.settings.items() if name != "learning_rate"}
    return builders[optimizer.name](rounding or _exact, **settings)


def _sgd(r: Rounding, momentum: float, nesterov: bool, weight_decay: float) -> Update:
    buffer: list[np.ndarray] = []

    def update(params: np.ndarray, grad: np.ndarray, learning_rate: float) -> np.ndarray:
        grad = grad + weight_decay * params
        if momentum:
            if buffer:
                buffer[0] = r(momentum * buffer[0] + grad)
            else:
                buffer.append(grad.copy())
            grad = grad + momentum * buffer[0] if nesterov else buffer[0]
        return params - learning_rate * grad

    return update


def _adam(r: Rounding, beta_1: float, beta_2: float, epsilon: float, amsgrad: bool) -> Update:
    state = {"t": 0, "m": 0.0, "v": 0.0, "v_max": 0.0}

    def update(params: np.ndarray, grad: np.ndarray, learning_rate: float) -> np.ndarray:
        state["t"] += 1
        t = state["t"]
        state["m"] = r(beta_1 * state["m"] + (1 - beta_1) * grad)
        state["v"] = r(beta_2 * state["v"] + (1 - beta_2) * grad * grad)
        second = state["v"]
        if amsgrad:
            state["v_max"] = second = np.maximum(state["v_max"], state["v"])
        step_size = learning_rate / (1 - beta_1**t)
        return params - step_size * state["m"] / (np.sqrt(second) / np.sqrt(1 - beta_2**t) + epsilon)

    return update


def _rmsprop(r: Rounding, rho: float, epsilon: float, momentum: float, centered: bool) -> Update:
    state = {"v": 0.0, "a": 0.0, "b": 0.0}

    def update(params: np.ndarray, grad: np.ndarray, learning_rate: float) -> np.ndarray:
        state["v"] = r(rho * state["v"] + (1 - rho) * grad * grad)
        second = state["v"]
        if centered:
            state["a"] = r(rho * state["a"] + (1 - rho) * grad)
            second = second - r(state["a"] * state["a"])
        direction = grad / (np.sqrt(second) + epsilon)
        if momentum > 0:
            state["b"] = r(momentum * state["b"] + direction)
            direction = state["b"]
        return params - learning_rate * direction

    return update


def _adagrad(r: Rounding, initial_accumulator_value: float, epsilon: float) -> Update:
    state = {"s": initial_accumulator_value}

    def update(params: np.ndarray, grad: np.ndarray, learning_rate: float) -> np.ndarray:
        state["s"] = r(state["s"] + grad * grad)
        return params - learning_rate * grad / (np.sqrt(state["s"]) + epsilon)

    return update
