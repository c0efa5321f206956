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

Each framework's own variant of a formula is a switch (conformance/formulas.py): the update
built with a set of switches is that framework's formula, and the one with none the case format's.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from conformance.formulas import NONE, Switches
from conformance.problem import Optimizer

Rounding = Callable[[np.ndarray], np.ndarray]


def _exact(values: np.ndarray) -> np.ndarray:
    return values


def float32(value: float) -> float:
    """A float64 value rounded to float32, as a framework's float32 hyperparameter holds it."""
    return float(np.float32(value))


class Update:
    """A stateful update (params, grad, learning_rate) -> new params for one optimizer's settings
    and one framework's switches; `skipped()` records a step a dynamic loss scale skipped in an
    optimizer that counts it (Keras 2's: Adam's t advances)."""

    def __init__(self, step: Callable[[np.ndarray, np.ndarray, float], np.ndarray], state: dict) -> None:
        self.step, self.state = step, state

    def __call__(self, params: np.ndarray, grad: np.ndarray, learning_rate: float) -> np.ndarray:
        return self.step(params, grad, learning_rate)

    def skipped(self) -> None:
        if "t" in self.state:
            self.state["t"] += 1


def make_update(optimizer: Optimizer, rounding: Rounding | None = None, switches: Switches = NONE,
                float32_rounding: Rounding | None = None) -> Update:
    """The update of one optimizer's settings under a framework's switches. The rate is the
    step's own (a schedule's, or the constant one): every state above is kept without it, and
    it multiplies the whole step, as in PyTorch and optax (`rate_in_momentum`: Keras's buffers
    keep it).

    `rounding`, when given, perturbs every state value the optimizer stores (and centered
    RMSprop's a^2 before it is subtracted) as a framework's rounding in the training dtype
    would: the perturbed replays of `parity: auto` then see what rounding does inside the
    optimizer, such as the cancellation in v - a^2 (reference.replay). `float32_rounding`
    perturbs what a switch computes in float32 (a float32 power) by float32's rounding."""
    builders = {"sgd": _sgd, "adam": _adam, "rmsprop": _rmsprop, "adagrad": _adagrad}
    settings = {name: value for name, value in optimizer.settings.items() if name != "learning_rate"}
    return builders[optimizer.name](rounding or _exact, switches, float32_rounding or _exact, **settings)


def _sgd(r: Rounding, switches: Switches, _: Rounding, momentum: float, nesterov: bool,
         weight_decay: float) -> Update:
    state: dict = {}
    if "hyperparameters_in_float32" in switches:
        momentum = float32(momentum)
    keras = "rate_in_momentum" in switches  # v = mu v - lr g; p += v (nesterov: p += mu v - lr g)

    def update(params: np.ndarray, grad: np.ndarray, learning_rate: float) -> np.ndarray:
        grad = grad + weight_decay * params
        if not momentum:
            return params - learning_rate * grad
        if keras:
            state["v"] = r(momentum * state.get("v", 0.0) - learning_rate * grad)
            return params + (momentum * state["v"] - learning_rate * grad if nesterov else state["v"])
        state["b"] = r(momentum * state["b"] + grad) if "b" in state else grad.copy()
        return params - learning_rate * (grad + momentum * state["b"] if nesterov else state["b"])

    return Update(update, state)


def _adam(r: Rounding, switches: Switches, r32: Rounding, beta_1: float, beta_2: float, epsilon: float,
          amsgrad: bool) -> Update:
    state = {"t": 0, "m": 0.0, "v": 0.0, "v_max": 0.0}
    powers_of = (float32(beta_1), float32(beta_2)) if "hyperparameters_in_float32" in switches else (beta_1, beta_2)

    def corrections(t: int) -> tuple[float, float]:
        """1 - beta_1^t and sqrt(1 - beta_2^t)."""
        if "bias_correction_in_float32" in switches:
            one, step = np.float32(1.0), np.float32(t)
            first = one - np.float32(beta_1) ** step
            second = np.sqrt(one - np.float32(beta_2) ** step)
            return float(r32(np.float64(first))), float(r32(np.float64(second)))
        return 1 - powers_of[0] ** t, np.sqrt(1 - powers_of[1] ** t)

    def update(params: np.ndarray, grad: np.ndarray, learning_rate: float) -> np.ndarray:
        state["t"] += 1
        first, second = corrections(state["t"])
        state["m"] = r(beta_1 * state["m"] + (1 - beta_1) * grad)
        state["v"] = r(beta_2 * state["v"] + (1 - beta_2) * grad * grad)
        moment = state["v"]
        if "amsgrad_on_corrected_moment" in switches and amsgrad:  # optax: the maximum of v / (1 - b2^t)
            state["v_max"] = np.maximum(state["v_max"], moment / second**2)
            return params - learning_rate / first * state["m"] / (np.sqrt(state["v_max"]) + epsilon)
        if amsgrad:
            state["v_max"] = moment = np.maximum(state["v_max"], state["v"])
        if "epsilon_hat" in switches:
            return params - learning_rate * second / first * state["m"] / (np.sqrt(moment) + epsilon)
        step_size = learning_rate / first
        if "step_size_in_float32" in switches:  # torch's lr / bias_correction1, a float32 tensor
            step_size = float(r32(np.float64(np.float32(step_size))))
        return params - step_size * state["m"] / (np.sqrt(moment) / second + epsilon)

    return Update(update, state)


def _rmsprop(r: Rounding, switches: Switches, _: Rounding, rho: float, epsilon: float, momentum: float,
             centered: bool) -> Update:
    state = {"v": 0.0, "a": 0.0, "b": 0.0}
    inside = "epsilon_inside_root" in switches
    keras = "rate_in_momentum" in switches

    def update(params: np.ndarray, grad: np.ndarray, learning_rate: float) -> np.ndarray:
        state["v"] = r(rho * state["v"] + (1 - rho) * grad * grad)
        second = state["v"]
        if centered:
            state["a"] = r(rho * state["a"] + (1 - rho) * grad)
            second = second - r(state["a"] * state["a"])
        direction = grad / np.sqrt(second + epsilon) if inside else grad / (np.sqrt(second) + epsilon)
        if momentum > 0 and keras:  # the rate of each step stays in the buffer
            state["b"] = r(momentum * state["b"] + learning_rate * direction)
            return params - state["b"]
        if momentum > 0:
            state["b"] = r(momentum * state["b"] + direction)
            direction = state["b"]
        return params - learning_rate * direction

    return Update(update, state)


def _adagrad(r: Rounding, switches: Switches, _: Rounding, initial_accumulator_value: float,
             epsilon: float) -> Update:
    if "hyperparameters_in_float32" in switches:  # Keras: initializers.Constant(value) makes a float32 first
        initial_accumulator_value = float32(initial_accumulator_value)
    state = {"s": initial_accumulator_value}
    inside = "epsilon_inside_root" in switches

    def update(params: np.ndarray, grad: np.ndarray, learning_rate: float) -> np.ndarray:
        state["s"] = r(state["s"] + grad * grad)
        if inside:
            with np.errstate(divide="ignore", invalid="ignore"):
                scaled = np.where(state["s"] > 0, grad / np.sqrt(state["s"] + epsilon), 0.0)
            return params - learning_rate * scaled
        return params - learning_rate * grad / (np.sqrt(state["s"]) + epsilon)

    return Update(update, state)
