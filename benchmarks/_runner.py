"""What every benchmark section shares: the problems, the timer, and the child processes.

Each section measures a backend in a process of its own (imports paid once there, peak memory
its own): it runs `benchmarks/run.py` again with an internal option (`--one BACKEND`,
`--growth`), and the child prints its numbers as one JSON line, the last it writes. Importing
this module puts the repository root on `sys.path`, so that `from conformance ...` works in the
sections, in those children and in the Keras worker processes (which inherit `sys.path`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conformance.problem import Optimizer, Problem  # noqa: E402

RUN = Path(__file__).resolve().with_name("run.py")  # the entry point every child process runs
# Taken once, before anything measured here imports a framework (which sets variables of its own).
CHILD_ENVIRONMENT = os.environ | {"TF_CPP_MIN_LOG_LEVEL": "3"}

SIZES = {  # name: (n, features, batch_size, epochs)
    "small": (6, 1, 6, 500),
    "medium": (100, 1, 8, 40),
    "large": (1_000_000, 10, 1024, 1),
}
BACKENDS = ("keras", "gradient_tape", "torch")
OTHERS = ("jax",)  # measured like the v1 backends, against their own bare loop
COMPILED = ("keras_xla", "gradient_tape_xla", "torch_compile")  # each against its own bare compiled loop


def make_problem(n: int, features: int, batch_size: int, epochs: int, seed: int = 0) -> Problem:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    y = (x @ np.linspace(1, 2, features) + 0.5 + 0.01 * rng.normal(size=n)).astype(np.float32)
    sgd = Optimizer("sgd", {"learning_rate": 0.01, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0})
    return Problem("bench", x, y, np.zeros(features, np.float32), np.zeros((), np.float32), epochs, batch_size,
                   None, "mean", sgd, "float32")


def steps(problem: Problem) -> int:
    return problem.epochs * problem.steps_per_epoch


def timed(function, *args) -> float:
    started = time.perf_counter()
    function(*args)
    return time.perf_counter() - started


def in_child(*arguments: str) -> Any:
    """Run `run.py ARGUMENTS` in a fresh interpreter; what it printed last, as JSON."""
    completed = subprocess.run([sys.executable, str(RUN), *arguments], capture_output=True, text=True,
                               env=CHILD_ENVIRONMENT, check=True)
    return json.loads(completed.stdout.splitlines()[-1])
