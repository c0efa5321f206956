"""Importing the frameworks once per process, with the numerics settings the suite relies on.

Environment hygiene follows Keras's own test setup: torch is imported before TensorFlow,
TensorFlow grows GPU memory instead of taking all of it (PyTorch shares the GPU in the same
process), Keras runs on the TensorFlow backend, and TF32 is off in both frameworks.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from conformance import timing

_DETERMINISM = {"requested": False}


def request_determinism() -> None:
    """Turn on the frameworks' own determinism switches (call before they are imported):
    torch.use_deterministic_algorithms, tf.config.experimental.enable_op_determinism, and the
    cuBLAS workspace setting that deterministic CUDA matmuls need."""
    _DETERMINISM["requested"] = True
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ.setdefault("TF_DETERMINISTIC_OPS", "1")


def determinism_requested() -> bool:
    return _DETERMINISM["requested"]


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def distribution_version(distribution: str) -> str | None:
    """The installed version of a distribution (`keras`), None when it is not installed; read
    without importing it, and in one place, so that the tests' fakes of a machine cover it."""
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def torch() -> ModuleType:
    with timing.phase("imports"):
        import torch as torch_module

    torch_module.backends.cuda.matmul.allow_tf32 = False
    torch_module.backends.cudnn.allow_tf32 = False
    if _DETERMINISM["requested"]:
        torch_module.use_deterministic_algorithms(True)
    return torch_module


@functools.cache
def tensorflow() -> ModuleType:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if installed("torch"):
        torch()
    with timing.phase("imports"), _repeated_stderr_lines_once():
        import tensorflow as tf

    tf.config.experimental.enable_tensor_float_32_execution(False)
    if _DETERMINISM["requested"]:
        tf.config.experimental.enable_op_determinism()
    tf.get_logger().setLevel("ERROR")
    return tf


_GLOG_PREFIX = re.compile(rb"^[IWEF]\d{4} [\d:.]+\s+\d+ ")


@contextlib.contextmanager
def _repeated_stderr_lines_once() -> Iterator[None]:
    """Pass on what the native code writes to stderr meanwhile, each distinct line once.

    TensorFlow >= 2.19 logs its oneDNN notice from two of its libraries at import, before its
    logging reads TF_CPP_MIN_LOG_LEVEL (no variable silences it): the same line twice in every
    process that imports it. The notice matters (oneDNN changes rounding), so it is kept, once.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            seen: set[bytes] = set()
            for line in captured.read().splitlines(keepends=True):
                key = _GLOG_PREFIX.sub(b"", line)  # the same message, logged at another time
                if key not in seen:
                    seen.add(key)
                    os.write(2, line)


@functools.cache
def jax() -> ModuleType:
    """JAX with float64 available (`jax_enable_x64`: every array the suite makes has an explicit
    dtype, so float32 cases stay float32) and without grabbing most of a GPU's memory at start,
    which TensorFlow and torch in the same process would then miss."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    with timing.phase("imports"):
        import jax as jax_module
        import optax  # noqa: F401 - imported here so that its cost counts as an import

    jax_module.config.update("jax_enable_x64", True)
    return jax_module


def tensorflow_determinism() -> bool | str:
    """Whether TensorFlow's op determinism is on, as TensorFlow reports it."""
    probe = getattr(tensorflow().config.experimental, "is_op_determinism_enabled", None)
    return probe() if probe is not None else ("requested" if _DETERMINISM["requested"] else "off")


@functools.cache
def cpu_name() -> str:
    """The CPU model (Linux: /proc/cpuinfo's model name), for the report's device names."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def torch_settings() -> dict[str, Any]:
    """The torch switches that change numerics, as they are in this process."""
    module = torch()
    return {
        "torch.backends.cuda.matmul.allow_tf32": module.backends.cuda.matmul.allow_tf32,
        "torch.backends.cudnn.allow_tf32": module.backends.cudnn.allow_tf32,
        "torch.num_threads": module.get_num_threads(),
        "torch.deterministic_algorithms": module.are_deterministic_algorithms_enabled(),
    }
