"""What the two TensorFlow backends share: devices, the Keras module, optimizers, dtype policy.

The Keras 2 / Keras 3 difference is kept to `keras_version` and `keras_major`: TF <= 2.15
ships Keras 2 as `tf.keras`, TF >= 2.16 routes `tf.keras` to Keras 3. Everything else here is
written against the API the two share.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

from conformance import timing
from conformance.backends import _frameworks, _keras_common

LOOKED_FOR = ("cpu", "cuda")  # TensorFlow's GPU:N is named cuda:N in the suite's vocabulary


def available() -> str | None:
    return None if _frameworks.installed("tensorflow") else "tensorflow is not installed"


def xla_available() -> str | None:
    """None, or why XLA cannot compile here (TensorFlow missing, or built without XLA)."""
    reason = available()
    if reason is None and not _frameworks.tensorflow().test.is_built_with_xla():
        reason = "this TensorFlow build has no XLA (tf.test.is_built_with_xla() is False)"
    return reason


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


def floatx(dtype: str) -> Any:
    """tf.keras's floatx set to `dtype` for the duration (see _keras_common.floatx)."""
    return _keras_common.floatx(keras(), dtype)


def xla_evidence(function: Any, *args: Any) -> dict[str, Any]:
    """What TensorFlow says about a `tf.function` that was asked to compile with XLA: whether
    the traced function carries the must-compile attribute (TensorFlow then either runs the
    XLA program or raises; there is no silent fallback), and how often it was traced."""
    concrete = function.get_concrete_function(*args)
    attribute = concrete.function_def.attr.get("_XlaMustCompile")
    return {"must_compile": bool(attribute is not None and attribute.b),
            "traces": int(function.experimental_get_tracing_count())}


def keras_xla_evidence(model: Any, problem: Any) -> dict[str, Any]:
    """Whether Keras really compiled its train step with XLA: Keras's resolved `jit_compile`
    (it turns the flag off for models it deems unsupported), and the must-compile attribute of
    the jitted step function that its `train_function` calls, with that function's traces."""
    found = {id(function): function for function in _tf_functions(model.train_function)}
    jitted = [function for function in found.values() if getattr(function, "_jit_compile", None)]
    concrete = [c for function in jitted for c in function._list_all_concrete_functions()]
    attributes = [c.function_def.attr.get("_XlaMustCompile") for c in concrete]
    return {"keras_jit_compile": bool(getattr(model, "jit_compile", getattr(model, "_jit_compile", False))),
            # None: the jitted step was not reachable to look at (Keras 2 makes it inside the trace)
            "must_compile": all(a is not None and a.b for a in attributes) if attributes else None,
            "traces": sum(int(function.experimental_get_tracing_count()) for function in jitted),
            "batch_shapes": len(problem.batch_sizes)}


def _tf_functions(function: Any, depth: int = 0) -> list[Any]:
    """The tf.functions reachable from `function` through closures (Keras builds its train
    function as nested closures; Keras 2 and 3 nest them differently)."""
    if depth > 4:
        return []
    found = [function] if hasattr(function, "experimental_get_tracing_count") else []
    inner = getattr(function, "python_function", function)
    for cell in getattr(inner, "__closure__", None) or ():
        try:
            contents = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if callable(contents) and contents is not function:
            found += _tf_functions(contents, depth + 1)
    wrapped = getattr(inner, "__wrapped__", None)
    return found + (_tf_functions(wrapped, depth + 1) if wrapped is not None else [])


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
