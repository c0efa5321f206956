"""Per step with hidden layers: the harness against each framework's bare loop of the same network.

Section "Hidden layers" of `benchmarks/run.py` (also `python benchmarks/hidden.py [BACKEND ...]`).
For keras, gradient_tape, torch and jax, the sizes of the "Per step" section (small, medium,
large) are trained twice through the backend's `train`: the v1 linear model, and a network with
one hidden layer of 16 tanh units (`HIDDEN`); each next to the bare loop of the same model
(`floors.FLOORS` for the linear one, `NETWORK_FLOORS` here for the network), alternating, best of 3
(1 for "large"). The question is whether the harness's ratio to the bare loop stays what it is
for the linear model when the model has hidden layers. Measured in this process, one backend at
a time (imports paid once).
"""

from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np
from _runner import BACKENDS, OTHERS, SIZES, make_problem, steps, timed

from conformance import backends
from conformance.problem import Problem

UNITS = 16
HIDDEN = [{"units": UNITS, "activation": "tanh", "settings": None}]


def with_hidden(problem: Problem) -> Problem:
    """The same data and optimizer, with HIDDEN (small uniform initial parameters, as drawn once)."""
    rng = np.random.default_rng(1)
    kernel = rng.uniform(-0.3, 0.3, (problem.features, UNITS)).astype(np.float32)
    return dataclasses.replace(problem, hidden=HIDDEN, init_hidden=[{"kernel": kernel, "bias": np.zeros(UNITS,
                                                                                                        np.float32)}],
                               init_weights=rng.uniform(-0.3, 0.3, UNITS).astype(np.float32))


# ---- floors: the bare loops of the network, nothing recorded ---------------------------------

def network_torch(problem: Problem) -> None:
    from floors import torch_sgd_loop

    from conformance.backends._frameworks import torch as load_torch

    nn = load_torch().nn
    torch_sgd_loop(problem, nn.Sequential(nn.Linear(problem.features, UNITS), nn.Tanh(), nn.Linear(UNITS, 1)))


def network_keras(problem: Problem) -> None:
    from floors import keras_fit_loop

    from conformance.backends import _tensorflow

    layers = _tensorflow.keras().layers
    keras_fit_loop(problem, [layers.Dense(UNITS, activation="tanh"), layers.Dense(1)])


def network_gradient_tape(problem: Problem) -> None:
    from floors import tape_sgd_loop

    from conformance.backends import _frameworks

    tf = _frameworks.tensorflow()
    variables = [tf.Variable(tf.random.uniform((problem.features, UNITS), -0.3, 0.3)), tf.Variable(tf.zeros(UNITS)),
                 tf.Variable(tf.random.uniform((UNITS, 1), -0.3, 0.3)), tf.Variable(tf.zeros(1))]
    tape_sgd_loop(problem, lambda x_batch: tf.math.tanh(x_batch @ variables[0] + variables[1]) @ variables[2]
                  + variables[3], variables)


def network_jax(problem: Problem) -> None:
    from floors import jax_sgd_loop

    from conformance.backends import _frameworks

    _frameworks.jax()
    import jax.numpy as jnp

    def loss_of(params, x_batch, y_batch):
        hidden = jnp.tanh(x_batch @ params["w1"] + params["b1"])
        return jnp.mean(jnp.square(hidden @ params["w2"] + params["b2"] - y_batch))

    rng = np.random.default_rng(1)
    params = {"w1": jnp.asarray(rng.uniform(-0.3, 0.3, (problem.features, UNITS)), jnp.float32),
              "b1": jnp.zeros(UNITS, jnp.float32), "w2": jnp.asarray(rng.uniform(-0.3, 0.3, (UNITS, 1)), jnp.float32),
              "b2": jnp.zeros(1, jnp.float32)}
    jax_sgd_loop(problem, loss_of, params)


NETWORK_FLOORS = {"torch": network_torch, "keras": network_keras, "gradient_tape": network_gradient_tape,
                  "jax": network_jax}


def measure(backend: str) -> dict[str, dict[str, float]]:
    """Per size: the harness/floor ratio for the linear model and for the network, and the
    network's harness ms per step."""
    from floors import FLOORS as LINEAR_FLOORS

    train = backends.load(backend).train
    warm = make_problem(6, 1, 6, 3)
    for model, floor in ((warm, LINEAR_FLOORS[backend]), (with_hidden(warm), NETWORK_FLOORS[backend])):
        train(model, "cpu"), floor(model)  # first-use costs
    found = {}
    for size, shape in SIZES.items():
        linear = make_problem(*shape)
        network = with_hidden(linear)
        pairs = {"linear": (linear, LINEAR_FLOORS[backend]), "hidden": (network, NETWORK_FLOORS[backend])}
        best = {name: [float("inf"), float("inf")] for name in pairs}
        for _ in range(1 if size == "large" else 3):
            for name, (problem, floor) in pairs.items():
                times = (timed(train, problem, "cpu"), timed(floor, problem))
                best[name] = [min(old, new) for old, new in zip(best[name], times)]
        found[size] = {"linear_ratio": best["linear"][0] / best["linear"][1],
                       "hidden_ratio": best["hidden"][0] / best["hidden"][1],
                       "hidden_ms_per_step": 1e3 * best["hidden"][0] / steps(network),
                       "linear_ms_per_step": 1e3 * best["linear"][0] / steps(linear)}
    return found


def print_section(chosen: list[str] | None = None) -> None:
    print(f"\n## Hidden layers: harness / bare loop, linear model and one hidden layer of {UNITS} tanh units\n")
    print("| backend | size | linear ms/step | ratio | hidden ms/step | ratio |")
    print("|---|---|---|---|---|---|")
    for backend in chosen or BACKENDS + OTHERS:
        if backends.load(backend).available():
            continue
        started = time.perf_counter()
        for size, row in measure(backend).items():
            print(f"| {backend} | {size} | {row['linear_ms_per_step']:.3f} | {row['linear_ratio']:.2f} | "
                  f"{row['hidden_ms_per_step']:.3f} | {row['hidden_ratio']:.2f} |", flush=True)
        print(f"<!-- {backend}: {time.perf_counter() - started:.0f} s -->", flush=True)


if __name__ == "__main__":
    print_section(sys.argv[1:] or None)
