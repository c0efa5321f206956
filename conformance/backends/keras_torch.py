"""Keras 3 on its PyTorch backend (`KERAS_BACKEND=torch`): the `keras` backend's model and
`fit`, trained in a worker process of its own (see _keras3). Devices are torch's devices (cpu, cuda:N, mps),
named as the `torch` backend names them.
"""

from __future__ import annotations

from conformance.backends import _keras3
from conformance.backends import torch as _devices_of
from conformance.problem import Problem, Trajectory

NAME = "keras_torch"
LOOKED_FOR = _devices_of.LOOKED_FOR
devices = _devices_of.devices
device_name = _devices_of.device_name
WHY_NOT_DATA_PARALLEL = _keras3.WHY_NOT_DATA_PARALLEL["torch"]
ACCUMULATES = True  # the optimizer argument gradient_accumulation_steps


def available() -> str | None:
    return _keras3.available("torch")


def train(problem: Problem, device: str) -> Trajectory:
    return _keras3.train("torch", problem, device)
