"""Keras `compile(jit_compile=True)` + `fit`: the `keras` backend with its train step compiled by XLA.

Each result records what really ran: Keras's resolved `jit_compile` (Keras may switch it off),
the must-compile attribute of the jitted step (no silent fallback once it is set), its traces,
and the first epoch's extra time (tracing and compiling) apart from the training.
"""

from __future__ import annotations

from conformance.backends import _tensorflow, keras
from conformance.problem import Problem, Trajectory

NAME = "keras_xla"
LOOKED_FOR = _tensorflow.LOOKED_FOR
available = _tensorflow.xla_available
devices = _tensorflow.devices
device_name = _tensorflow.device_name
DATA_PARALLEL = True
ACCUMULATES = True  # Keras 3's optimizer argument gradient_accumulation_steps (Keras 2: a skip with the reason)


def train(problem: Problem, device: str) -> Trajectory:
    return keras.train_fit(problem, device, jit_compile=True)
