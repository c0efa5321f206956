"""What the two TensorFlow backends share: devices, the Keras module, optimizers, dtype policy.

The Keras 2 / Keras 3 difference is kept to `keras_version` and `keras_major`: TF <= 2.15
ships Keras 2 as `tf.keras`, TF >= 2.16 routes `tf.keras` to Keras 3. Everything else here is
written against the API the two share.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from conformance import timing
from conformance.backends import _frameworks
from conformance.problem import Optimizer

LOOKED_FOR = ("cpu", "cuda")  # TensorFlow's GPU:N is named cuda:N in the suite's vocabulary


def available() -> str | None:
    return None if _frameworks.installed("tensorflow") else "tensorflow is not installed"


def devices() -> list[str]:
    tf = _frameworks.tensorflow()
    return ["cpu"] + [f"cuda:{index}" for index, _ in enumerate(tf.config.list_physical_devices("GPU"))]


def device_name(device: str) -> str:
    """What the device is, as TensorFlow names it (the GPU model for GPUs)."""
    if device == "cpu":
        return _frameworks.cpu_name()
    tf = _frameworks.tensorflow()
    gpu = tf.config.list_physical_devices("GPU")[int(device.split(":")[1])]
    return str(tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name))


def tf_device(device: str) -> str:
    """The suite's device name ('cpu', 'cuda:0') as a TensorFlow device string."""
    return "/CPU:0" if device == "cpu" else f"/GPU:{device.split(':')[1]}"


@functools.cache
def keras() -> ModuleType:
    tf = _frameworks.tensorflow()
    with timing.phase("imports"):
        module = tf.keras
        _ = module.optimizers  # tf.keras loads lazily: touch it, so that Keras's import counts as one
    return module


def keras_version() -> str:
    """Keras 3 has keras.version(); Keras 2's tf.keras (TF <= 2.15) has neither that nor
    __version__, so the installed distribution answers."""
    module = keras()
    version = getattr(module, "__version__", None) or (module.version() if hasattr(module, "version") else None)
    if version:
        return str(version)
    import importlib.metadata

    for distribution in ("keras", "tf-keras"):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def keras_major() -> int:
    return int(keras_version().split(".")[0])


@contextlib.contextmanager
def floatx(dtype: str) -> Iterator[None]:
    """Keras keeps the learning rate in a floatx variable: float64 training needs floatx float64,
    or the rate is rounded to float32 (0.01 -> 0.009999999776) before it reaches the update."""
    backend = keras().backend
    previous = backend.floatx()
    backend.set_floatx(dtype)
    try:
        yield
    finally:
        backend.set_floatx(previous)


def keras_optimizer(optimizer: Optimizer) -> Any:
    """A Keras optimizer with every hyperparameter passed explicitly (Keras 2 and 3 alike).

    Weight decay is left out here: the case format's weight decay is added to the gradient
    (coupled), while Keras's `weight_decay` is decoupled; each backend adds it its own way.
    Keras's own defaults (Adam epsilon 1e-7, Adagrad initial accumulator 0.1) never apply.
    """
    settings = optimizer.settings
    optimizers = keras().optimizers
    common = {"learning_rate": settings["learning_rate"], "weight_decay": None, "clipnorm": None,
              "clipvalue": None, "global_clipnorm": None, "use_ema": False}
    if optimizer.name == "sgd":
        return optimizers.SGD(momentum=settings["momentum"], nesterov=settings["nesterov"], **common)
    if optimizer.name == "adam":
        return optimizers.Adam(beta_1=settings["beta_1"], beta_2=settings["beta_2"], epsilon=settings["epsilon"],
                               amsgrad=settings["amsgrad"], **common)
    if optimizer.name == "rmsprop":
        return optimizers.RMSprop(rho=settings["rho"], momentum=settings["momentum"], epsilon=settings["epsilon"],
                                  centered=settings["centered"], **common)
    if optimizer.name == "adagrad":
        return optimizers.Adagrad(initial_accumulator_value=settings["initial_accumulator_value"],
                                  epsilon=settings["epsilon"], **common)
    raise NotImplementedError(f"optimizer {optimizer.name} is not supported by the TensorFlow backends")


def environment(device: str, variable: Any) -> dict[str, Any]:
    """Versions, and TensorFlow's own view of where the trained `variable` lives, recorded with
    every result."""
    import os

    tf = _frameworks.tensorflow()
    # Keras 3 wraps the tf.Variable (its .value); Keras 2 and plain TensorFlow hand it out.
    placed_on = getattr(variable, "device", None) or getattr(getattr(variable, "value", None), "device", None)
    details: dict[str, Any] = {"tensorflow": tf.__version__, "keras": keras_version(), "placed_on": placed_on,
                               "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset (TF default)"),
                               "tensor_float_32": tf.config.experimental.tensor_float_32_execution_enabled(),
                               "op_determinism": _frameworks.tensorflow_determinism()}
    if device != "cpu":
        gpus = tf.config.list_physical_devices("GPU")
        index = int(device.split(":")[1])
        details["device_name"] = tf.config.experimental.get_device_details(gpus[index]).get("device_name", "GPU")
    return details
