"""Keras: a `Sequential` model with one `Dense` unit, trained with `compile` + `fit`.

`fit` on NumPy arrays rebuilds its data iterator every epoch (about 30 ms per epoch in Keras 3),
so the suite feeds the same batches as one `tf.data` stream with `steps_per_epoch`: one
iterator for the whole run, the same `train_function`, and bit-identical parameters to
`fit(x, y, epochs=E, batch_size=B, shuffle=False)` (tests/test_keras_fast_path.py proves it).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from conformance.backends import Unavailable, _frameworks, _keras_common, _keras_precision, _tensorflow, _tf_distributed
from conformance.problem import Problem, Trajectory

NAME = "keras"
LOOKED_FOR = _tensorflow.LOOKED_FOR
available = _tensorflow.available
devices = _tensorflow.devices
device_name = _tensorflow.device_name
DATA_PARALLEL = True
ACCUMULATES = True  # Keras 3's optimizer argument gradient_accumulation_steps (Keras 2: a skip with the reason)
DISTRIBUTED_API = ("tf.distribute.MirroredStrategy(devices); model built and compiled in strategy.scope(); "
                   "fit(strategy.distribute_datasets_from_function(shards in order), steps_per_epoch)")


def train(problem: Problem, device: str) -> Trajectory:
    """Train with the fast feeding path (one tf.data stream for all epochs)."""
    return train_fit(problem, device, jit_compile=False)


def train_plain(problem: Problem, device: str) -> Trajectory:
    """Train exactly as a user writes it: fit on NumPy arrays. Slow; only for unshuffled cases."""
    if problem.orders is not None:
        raise ValueError("plain fit cannot follow the harness's shuffle order")
    return train_fit(problem, device, jit_compile=False, plain=True)


def train_fit(problem: Problem, device: str, jit_compile: bool, plain: bool = False) -> Trajectory:
    """`compile` + `fit`, with `compile(jit_compile=...)` as given (the `keras_xla` backend: True).

    Replicas > 1: the same model built and compiled inside `MirroredStrategy.scope()`, and `fit`
    fed each replica its shard of every step (_tf_distributed), in a replicated worker process.
    """
    if problem.replicas > 1 and not _tf_distributed.in_replicated_worker():
        return _tf_distributed.train_in_worker("keras_xla" if jit_compile else "keras", problem, device)
    if problem.replicas > 1 and plain:
        raise ValueError("plain fit trains one replica")
    tf = _frameworks.tensorflow()
    strategy = _tf_distributed.strategy(problem, device) if problem.replicas > 1 else None
    placement = tf.device(_tensorflow.tf_device(device)) if strategy is None else strategy.scope()
    per_step = plain or strategy is not None  # one step per execution, one Keras epoch per case epoch
    # Keras 2's skipped steps are read from the loss scaler after each step (Keras2Skips)
    steps_per_call = 1 if per_step or _keras2_dynamic_scaling(problem) else problem.steps_per_epoch
    with _tensorflow.floatx(problem.dtype), placement:
        model = _model(problem, steps_per_execution=steps_per_call, jit_compile=jit_compile)
        dtypes = None if problem.precision is None else _probe_dtypes(model, problem, strategy)
        recorder = _recorder_class()(problem, per_execution=not per_step, steps_per_call=steps_per_call)
        scheduler = _keras_common.epoch_scheduler(_tensorflow.keras(), problem)
        _fit(model, problem, [recorder] if scheduler is None else [scheduler, recorder], plain, strategy)
        predictions = None
        if problem.predict_x is not None:
            predictions = _keras_common.outputs_as_predictions(problem, model(problem.predict_x, training=False),
                                                               tf.math.sigmoid)
    kernel = _keras_common.output_kernel(model)
    feeding = "fit(x, y)" if plain else "fit(tf.data, steps_per_execution=one epoch)" if strategy is None else \
        "fit(distribute_datasets_from_function(one shard per replica and step), steps_per_execution=1)"
    info = _tensorflow.environment(device, kernel) | {"jit_compile": bool(getattr(model, "jit_compile", False)),
                                                      "feeding": feeding, "kernel_dtype": str(kernel.dtype)}
    if jit_compile:
        info |= {"xla": _tensorflow.keras_xla_evidence(model, problem), "compile_seconds": recorder.compile_seconds}
    if strategy is not None:
        info["replicas"] = _tf_distributed.info(strategy, _keras_common.parameters(model), DISTRIBUTED_API)
    if problem.optimizer.settings.get("weight_decay"):
        info |= {"loss_note": "Keras's loss includes the L2 term that carries weight decay",
                 "loss_includes_l2_penalty": True}  # the trajectory check adds the replay's penalty
    if scheduler is not None:
        info["schedule"] = "keras.callbacks.LearningRateScheduler (every epoch)"
    if dtypes is not None:
        info["precision"] = _keras_precision.precision_info(_tensorflow.keras(), problem, model, dtypes)
    return Trajectory(recorder.history_params, recorder.history_loss, predictions, info,
                      rates=recorder.history_rates, loss_scale=recorder.history_loss_scale,
                      skipped=recorder.history_skipped)


def _keras2_dynamic_scaling(problem: Problem) -> bool:
    return problem.dynamic_scaling and _tensorflow.keras_major() < 3


def _fit(model: Any, problem: Problem, callbacks: list[Any], plain: bool, strategy: Any) -> None:
    """`fit` on NumPy arrays (plain), on the harness's shards of every step under a strategy
    (one Keras epoch per case epoch, `steps_per_execution=1`: Keras 3.15's multi-step loop over
    a distributed iterator fails with "You must feed a value for placeholder tensor", measured;
    keras-team/keras#19246),
    or on one tf.data stream (one execution per case epoch, in one long Keras epoch; a per-epoch
    schedule's callback needs Keras's epochs, one per case epoch)."""
    if plain:
        model.fit(problem.x, problem.y.reshape(-1, 1), sample_weight=problem.sample_weight,
                  batch_size=problem.batch_size, epochs=problem.epochs, verbose=0, shuffle=False, callbacks=callbacks)
    elif strategy is not None:
        tf = _frameworks.tensorflow()
        try:
            model.fit(_tf_distributed.distributed_shards(strategy, problem, problem.sample_weight is not None),
                      epochs=problem.epochs, steps_per_epoch=problem.steps_per_epoch, verbose=0, shuffle=False,
                      callbacks=callbacks)
        except tf.errors.InvalidArgumentError as error:
            reason = _why_fit_failed(str(error), problem, model)
            if reason is None:
                raise
            raise Unavailable(reason) from None
    else:
        epochs = problem.epochs if problem.schedule_every_epoch else 1
        steps = problem.epochs * problem.steps_per_epoch // epochs
        model.fit(_stream(problem), epochs=epochs, steps_per_epoch=steps, verbose=0, shuffle=False,
                  callbacks=callbacks)


def _why_fit_failed(message: str, problem: Problem, model: Any) -> str | None:
    """Why `fit` under MirroredStrategy failed, for two known Keras/TensorFlow limits (a skip
    with the reason), or None for anything else (raised as it is)."""
    sizes = [len(shard) for shard in problem.shards(problem.batch(0, 0))]
    version = f"Keras {_tensorflow.keras_version()}"
    if "AddN" in message and len(set(sizes)) > 1:
        return (f"{version}'s fit under MirroredStrategy adds up the replicas' first batches to build the model "
                f"(Trainer._maybe_symbolic_build: strategy.reduce('MEAN', batch)), which fails when they differ "
                f"in size: the first step's shards here have {sizes} samples (keras-team/keras#19246); only a "
                "case whose first batch splits evenly trains")
    if "Trying to access resource" in message and getattr(model, "jit_compile", False):
        return (f"{version} compiles its train step with XLA together with the optimizer's update of every "
                "replica's copy of the variables (Keras 3: strategy.run inside the jitted function; Keras 2: the "
                "jitted replica step reaches them through the optimizer's merge_call), and XLA cannot reach "
                "variables on another device: "
                "\"Trying to access resource ... located in device CPU:1 from device CPU:0\" (TensorFlow's XLA "
                "known issue \"tf.Variable on a different device\"), measured on logical CPUs")
    return None


def _probe_dtypes(model: Any, problem: Problem, strategy: Any) -> dict[str, str]:
    """`_precision_dtypes`, under a strategy in its replicas' context (a mirrored variable's
    cast is refused in the cross-replica context); every replica sees the same dtypes."""
    if strategy is None:
        return _precision_dtypes(model, problem)
    found: dict[str, str] = {}
    strategy.run(lambda: found.update(_precision_dtypes(model, problem)))
    return found


def _precision_dtypes(model: Any, problem: Problem) -> dict[str, str]:
    """The dtypes of a mixed-precision step's real tensors, from one eager step's forward pass,
    loss and gradients on the first batch (nothing is applied): the same layers, policies and
    loss class that `fit` traces."""
    tf = _frameworks.tensorflow()
    rows = problem.batch(0, 0)
    with tf.GradientTape() as tape:
        output = model(problem.x[rows], training=True)
        loss = _keras_common.loss(_tensorflow.keras(), problem)(problem.y[rows].reshape(-1, 1), output)
    gradients = tape.gradient(loss, model.trainable_variables)
    name = _keras_precision.dtype_name
    return {"output_dtype": name(output.dtype), "loss_dtype": name(loss.dtype),
            "gradient_dtype": ", ".join(sorted({name(gradient.dtype) for gradient in gradients})),
            "variable_dtype": ", ".join(sorted({name(v.dtype) for v in model.trainable_variables}))}


def _model(problem: Problem, steps_per_execution: int, jit_compile: bool) -> Any:
    return _keras_common.model(_tensorflow.keras(), problem, steps_per_execution, jit_compile)


def _stream(problem: Problem) -> Any:
    """Every epoch's batches, in the harness's order, as one dataset (epoch boundaries kept)."""
    tf = _frameworks.tensorflow()
    data = (problem.x, problem.y.reshape(-1, 1))
    if problem.sample_weight is not None:  # (x, y, sample_weight) elements: fit's sample weights
        data += (problem.sample_weight,)
    if problem.orders is None:
        return tf.data.Dataset.from_tensor_slices(data).batch(problem.batch_size).repeat(problem.epochs)
    tensors = tuple(tf.constant(array) for array in data)

    def one_epoch(order: Any) -> Any:
        slices = tuple(tf.gather(tensor, order) for tensor in tensors)
        return tf.data.Dataset.from_tensor_slices(slices).batch(problem.batch_size)

    return tf.data.Dataset.from_tensor_slices(problem.orders).flat_map(one_epoch)


@functools.cache
def _recorder_class() -> type:
    """The callback class, made on first use because Keras is imported lazily."""
    keras = _tensorflow.keras()

    class EpochRecorder(_keras_common.EpochRecords, keras.callbacks.Callback):
        """Parameters and Keras's own epoch loss after every epoch.

        per_execution: the whole training is one Keras epoch (or one per case epoch) whose
        executions, `steps_per_call` steps each, end the case's epochs; the loss tracker is reset
        at each case epoch's end, so its mean is the epoch's, as in `fit`. Under Keras 2's dynamic
        loss scaling every step is an execution, and its skips are read after each.
        """

        def __init__(self, problem: Problem, per_execution: bool, steps_per_call: int) -> None:
            super().__init__()
            self.problem, self.per_execution = problem, per_execution
            self.calls_per_epoch = problem.steps_per_epoch // steps_per_call
            self.calls = 0
            self.reset_records()
            self._read_and_reset: Any = None

        def on_train_begin(self, logs: dict | None = None) -> None:
            super().on_train_begin(logs)
            if _keras2_dynamic_scaling(self.problem):
                self.skips = _keras_precision.Keras2Skips(self.model.optimizer)

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            if self.skips is not None:
                self.skips.after_step()
            self.calls += 1
            if self.per_execution and self.calls % self.calls_per_epoch == 0:
                parameters, scaling = self._read_parameters_and_reset_metrics()
                self.record(parameters, logs)
                self.record_rate(keras)
                if scaling:
                    self.record_scaling(float(scaling[0]), int(scaling[1]))

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            if not self.per_execution:
                self.record(np.concatenate([np.ravel(v.numpy()) for v in _keras_common.parameters(self.model)]),
                            logs)
                self.record_rate(keras)
                if self.problem.loss_scale is not None:
                    self.record_scaling(*_keras_precision.scaling_state(keras, self.model.optimizer))

        def _read_parameters_and_reset_metrics(self) -> tuple[np.ndarray, list[Any]]:
            """The layer's parameters, flat, with the metrics zeroed as `reset_metrics` does,
            and with a loss scale the optimizer's scale and iterations (else an empty list).

            One compiled call per execution instead of a read per variable and Keras's eager
            reset (which costs about as much as a small case's training step).
            """
            if self._read_and_reset is None:  # metrics exist after the first execution
                tf = _frameworks.tensorflow()
                weights = _keras_common.parameters(self.model)
                counters = [variable for metric in self.model.metrics for variable in metric.variables]
                optimizer = self.model.optimizer
                scale = getattr(optimizer, "dynamic_scale", None)  # Keras 3 dynamic
                keras2 = _tensorflow.keras_major() < 3

                def read_and_reset() -> Any:
                    flat = tf.concat([tf.reshape(weight, [-1]) for weight in weights], axis=0)
                    for variable in counters:
                        variable.assign(tf.zeros_like(variable))
                    if self.problem.loss_scale is None:
                        return flat, []
                    if keras2:  # mixed_precision.LossScaleOptimizer, fixed or dynamic
                        now = optimizer.loss_scale
                    else:
                        now = tf.constant(optimizer.loss_scale_factor, tf.float32) if scale is None else scale
                    return flat, [tf.identity(now), tf.identity(optimizer.iterations)]

                self._read_and_reset = tf.function(read_and_reset)
            flat, scaling = self._read_and_reset()
            return flat.numpy(), [value.numpy() for value in scaling]

    return EpochRecorder
