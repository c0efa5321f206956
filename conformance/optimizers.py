"""Update rules of the float64 replay, one documented formula per optimizer.

SGD follows `torch.optim.SGD` (PyTorch docs, "Algorithm" box), with dampening 0:
    g = grad + weight_decay * p
    b = g on the first step, else momentum * b + g
    g = g + momentum * b if nesterov else b          (when momentum > 0)
    p = p - learning_rate * g
Keras's SGD keeps v = momentum * v - lr * g instead; for a constant learning rate the two give
the same parameters (v = -lr * b). Weight decay applies to every parameter, bias included, as
`torch.optim.SGD(model.parameters(), weight_decay=...)` does.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from conformance.problem import Optimizer

Update = Callable[[np.ndarray, np.ndarray], np.ndarray]


def make_update(optimizer: Optimizer) -> Update:
    """A stateful function (params, grad) -> new params for one optimizer's settings."""
    builders = {"sgd": _sgd}
    return builders[optimizer.name](**optimizer.settings)


def _sgd(learning_rate: float, momentum: float, nesterov: bool, weight_decay: float) -> Update:
    buffer: list[np.ndarray] = []

    def update(params: np.ndarray, grad: np.ndarray) -> np.ndarray:
        grad = grad + weight_decay * params
        if momentum:
            if buffer:
                buffer[0] = momentum * buffer[0] + grad
            else:
                buffer.append(grad.copy())
            grad = grad + momentum * buffer[0] if nesterov else buffer[0]
        return params - learning_rate * grad

    return update
