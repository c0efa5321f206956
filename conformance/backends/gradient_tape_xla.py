"""The `gradient_tape` loop under `tf.function(jit_compile=True)`: the same ops, compiled by XLA.

`jit_compile=True` makes XLA compilation mandatory (TensorFlow raises instead of falling back
to the graph executor), and each result records the traced function's must-compile attribute
as TensorFlow reports it, with the compile time measured apart from the training. Mixed
precision runs here too: XLA rounds a bfloat16 layer's matmul and bias add apart (the graph
executor fuses them), and its bfloat16 kernel gradient can differ from the graph's in the last
bit (measured on one full-batch step of cases/precision/bfloat16-master-weights-and-loss.yaml).
"""

from __future__ import annotations

from conformance.backends import _tensorflow, gradient_tape
from conformance.problem import Problem, Trajectory

NAME = "gradient_tape_xla"
LOOKED_FOR = _tensorflow.LOOKED_FOR
available = _tensorflow.xla_available
devices = _tensorflow.devices
device_name = _tensorflow.device_name
DATA_PARALLEL = True
ACCUMULATES = True  # gradient_tape's accumulation, compiled


def train(problem: Problem, device: str) -> Trajectory:
    return gradient_tape.train_loop(problem, device, jit_compile=True)
