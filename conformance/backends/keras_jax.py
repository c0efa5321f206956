"""Keras 3 on its JAX backend (`KERAS_BACKEND=jax`): the `keras` backend's model and
`fit`, trained in a worker process of its own (see _keras3). Devices are JAX's devices (cpu, cuda:N),
named as the `jax` backend names them. Replicas > 1: `fit` under `keras.distribution.DataParallel`.
"""

from __future__ import annotations

from conformance.backends import _keras3
from conformance.backends import jax as _devices_of
from conformance.problem import Problem, Trajectory

NAME = "keras_jax"
LOOKED_FOR = _devices_of.LOOKED_FOR
devices = _devices_of.devices
device_name = _devices_of.device_name
DATA_PARALLEL = True  # keras.distribution.DataParallel (see _keras3)
ACCUMULATES = True  # the optimizer argument gradient_accumulation_steps


def available() -> str | None:
    return _keras3.available("jax")


def train(problem: Problem, device: str) -> Trajectory:
    return _keras3.train("jax", problem, device)
