"""TensorFlow with a hand-written loop: `tf.Variable`s, `tf.GradientTape`, `apply_gradients`.

The whole training runs as one `tf.function` (a graph loop over epochs and batches that also
records each epoch's parameters and loss) instead of eager steps: the same ops in the same
order, without ~1 ms of Python per step or a round trip to Python per epoch. Batches are cut
with static sizes (the full batches, then the smaller last one), which XLA requires; the
`gradient_tape_xla` backend runs this same function with `jit_compile=True`.

Mixed precision (`problem.precision`) as the TensorFlow guide's custom loops write it: float32
`tf.Variable`s (the policy's variable dtype), `tf.cast` of the inputs, kernels and biases to the
policy's compute dtype in the forward pass, the output cast to float32 before the loss; a loss
scale through Keras 3's optimizer (`scale_loss` in the tape, `apply` unscales, and skips a step
with non-finite gradients under `LossScaleOptimizer`), or under Keras 2 through its
`mixed_precision.LossScaleOptimizer` as its guide's loop writes it (`get_scaled_loss` in the
tape, `get_unscaled_gradients`, then the loop's own clipping and `apply_gradients`). Measured
on CPU (TF 2.21): in bfloat16 the graph executor's oneDNN fuses `matmul`, bias add and
activation and rounds once, after the activation; float16, and XLA in both, round the matmul
and the bias add apart (as the replay).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from conformance.backends import Unavailable, _frameworks, _keras_common, _keras_precision, _tensorflow, _tf_distributed
from conformance.backends import _tape_parts as parts
from conformance.problem import Problem, Trajectory

NAME = "gradient_tape"
LOOKED_FOR = _tensorflow.LOOKED_FOR
available = _tensorflow.available
devices = _tensorflow.devices
device_name = _tensorflow.device_name
DATA_PARALLEL = True
ACCUMULATES = True  # the idiom: each batch's gradient of loss / N summed in variables, applied every N


def train(problem: Problem, device: str) -> Trajectory:
    return train_loop(problem, device, jit_compile=False)


def train_loop(problem: Problem, device: str, jit_compile: bool) -> Trajectory:
    """The training loop as one tf.function, compiled by XLA when `jit_compile`.

    Under XLA the function is first called for zero epochs: that call compiles (and trains
    nothing), so the compile time is measured apart from the training, which reuses the
    compiled program.
    """
    if problem.replicas > 1:  # MirroredStrategy in a replicated worker (_tf_distributed)
        if problem.loss_scale is not None and _tensorflow.keras_major() < 3:
            raise Unavailable(f"the replicated GradientTape loop scales the loss with Keras 3's scale_loss / apply; "
                              f"under Keras {_tensorflow.keras_version()} (get_scaled_loss / "
                              "get_unscaled_gradients in strategy.run) it is not built: the single-replica loop "
                              "covers Keras 2's loss scaling")
        if not _tf_distributed.in_replicated_worker():
            return _tf_distributed.train_in_worker(NAME + ("_xla" if jit_compile else ""), problem, device)
        from conformance.backends import _tape_distributed

        return _tape_distributed.train(problem, device, jit_compile)
    tf = _frameworks.tensorflow()
    with _tensorflow.floatx(problem.dtype), tf.device(_tensorflow.tf_device(device)):
        layers = parts.variables(tf, problem)
        variables = [variable for _, kernel, bias in layers for variable in (kernel, bias) if variable is not None]
        keras = _tensorflow.keras()
        rate_schedule = _keras_common.schedule(keras, problem)
        # per step: the Keras schedule is the optimizer's learning rate; per epoch: the loop
        # assigns the schedule's value at each epoch's start to the optimizer's rate variable
        per_step = None if problem.schedule_every_epoch else rate_schedule
        optimizer, scaling = parts.loop_optimizer(keras, problem, per_step)
        optimizer.build(variables)
        compute_dtype = parts.compute_dtype_of(keras, problem)
        seen = None if compute_dtype is None else {}  # mixed precision: the traced tensors' dtypes
        run_training = _training_function(problem, layers, optimizer, rate_schedule, jit_compile, compute_dtype,
                                          seen)
        orders = tf.range(problem.n, dtype=tf.int64)[tf.newaxis] if problem.orders is None \
            else tf.constant(problem.orders, dtype=tf.int64)
        info: dict[str, Any] = {}
        if jit_compile:
            started = time.perf_counter()
            run_training(orders, tf.constant(0))
            info["compile_seconds"] = time.perf_counter() - started
        recorded = run_training(orders, tf.constant(problem.epochs))
        if jit_compile:
            info["xla"] = _tensorflow.xla_evidence(run_training, orders, tf.constant(problem.epochs))
        if compute_dtype is not None:
            info["precision"] = parts.precision_info(problem, seen, scaling)
        params = recorded["params"].numpy().astype(np.float64)
        losses = recorded["totals"].numpy().astype(np.float64) / problem.n
        predictions = None
        if problem.predict_x is not None:
            outputs = parts.forward(tf, tf.constant(problem.predict_x), layers, compute_dtype)
            if problem.loss == "bce":  # `predict` compares probabilities
                outputs = tf.math.sigmoid(outputs)
            predictions = outputs.numpy()[:, 0].astype(np.float64)
    scaled = problem.loss_scale is not None
    return Trajectory(params, losses, predictions, _tensorflow.environment(device, layers[0][1]) | info,
                      rates=recorded["rates"].numpy().astype(np.float64) if rate_schedule is not None else None,
                      loss_scale=recorded["scales"].numpy().astype(np.float64) if scaled else None,
                      skipped=recorded["skipped"].numpy().astype(np.int64) if scaled else None)


def _training_function(problem: Problem, layers: list[tuple[Any, Any, Any]], optimizer: Any, rate_schedule: Any,
                       jit_compile: bool, compute_dtype: str | None = None, seen: dict[str, str] | None = None) -> Any:
    """A tf.function(orders, epochs) that trains; returns per-epoch parameters ("params"), loss
    sums ("totals") and (with a schedule) the rate of each epoch's last step ("rates"), read
    from the Keras schedule at the optimizer's iteration count, or from its rate variable per
    epoch. With a loss scale also, per epoch, the optimizer's scale after its last step
    ("scales": `dynamic_scale`, or the fixed `loss_scale_factor`) and its skipped steps
    ("skipped": the steps that did not advance the optimizer's `iterations`, which under
    `LossScaleOptimizer` counts applied steps only).

    `orders` holds each epoch's row order, or one row (0..n-1) used by every epoch when the
    case does not shuffle. `epochs` (a tensor, so that XLA compiles one program for any count)
    is how many of the case's epochs to train. Loss sums are batch-size-weighted, in the
    case's dtype.
    """
    tf = _frameworks.tensorflow()
    variables = [variable for _, kernel, bias in layers for variable in (kernel, bias) if variable is not None]
    x = tf.constant(problem.x)
    y = tf.constant(problem.y.reshape(-1, 1))
    decay = problem.optimizer.settings.get("weight_decay", 0.0)
    reduce = tf.reduce_mean if problem.reduction == "mean" else tf.reduce_sum
    batch = problem.batch_size
    full_batches, last_batch = divmod(problem.n, batch)
    delta = tf.constant(problem.delta, dtype=x.dtype)
    weighted = problem.sample_weight is not None
    w = tf.constant(problem.sample_weight.reshape(-1, 1) if weighted else np.ones((1, 1), problem.dtype))

    def per_sample(output: Any, y_batch: Any) -> Any:
        return parts.per_sample_loss(tf, problem, output, y_batch, delta)

    shuffled = problem.orders is not None
    scaled = problem.loss_scale is not None
    keras2_scaled = scaled and _tensorflow.keras_major() < 3  # get_scaled_loss / get_unscaled_gradients
    # Keras 2 advances `iterations` on a skipped step: the loop counts the skips it reads
    keras2_skips = tf.Variable(0, dtype=tf.int64, trainable=False) \
        if keras2_scaled and problem.dynamic_scaling else None

    def rows(order: Any, start: Any, size: int) -> tuple[Any, Any, Any]:
        """`size` rows of `order` from `start` (x, y, sample weights or None). Unshuffled cases
        slice the data directly (the same rows, without a gather)."""
        if shuffled:
            indices = tf.slice(order, tf.reshape(start, [1]), [size])
            return tf.gather(x, indices), tf.gather(y, indices), tf.gather(w, indices) if weighted else None
        return (tf.slice(x, tf.stack([start, 0]), [size, problem.features]),
                tf.slice(y, tf.stack([start, 0]), [size, 1]),
                tf.slice(w, tf.stack([start, 0]), [size, 1]) if weighted else None)

    def gradients_of(order: Any, start: Any, size: int, divisor: int = 1) -> tuple[Any, list[Any]]:
        """The loss of `size` rows of `order` from `start`, and the gradients of loss / divisor
        (under a loss scale, of the scaled loss: a group's batches share the scale, which
        changes only at the group's step)."""
        x_batch, y_batch, w_batch = rows(order, start, size)
        with tf.GradientTape() as tape:
            losses = per_sample(parts.forward(tf, x_batch, layers, compute_dtype, seen), y_batch)
            loss = reduce(losses * w_batch if weighted else losses)
            objective = loss if divisor == 1 else loss / divisor
            if scaled:
                objective = optimizer.get_scaled_loss(objective) if keras2_scaled else optimizer.scale_loss(objective)
        gradients = tape.gradient(objective, variables)
        if seen is not None:
            seen.update(loss_dtype=loss.dtype.name, gradient_dtype=gradients[0].dtype.name,
                        variable_dtype=variables[0].dtype.name)
        return loss, gradients

    def step(order: Any, start: Any, size: int) -> Any:
        """One optimizer step on `size` rows of `order` from `start`; the loss times the size."""
        loss, gradients = gradients_of(order, start, size)
        update(gradients)
        return loss * tf.constant(size, dtype=x.dtype)

    def update(gradients: list[Any]) -> None:
        """The optimizer step from the (under a loss scale, scaled) gradients of the loss: Keras 3
        unscales, clips and skips in `apply`; otherwise the loop unscales (Keras 2), clips, adds
        the decay and applies."""
        if scaled and not keras2_scaled:
            scaled_step(gradients)
            return
        scale_before = optimizer.loss_scale if keras2_skips is not None else None
        if keras2_scaled:
            gradients = optimizer.get_unscaled_gradients(gradients)
        gradients = parts.clipped(tf, gradients, problem.clip)
        if decay:
            gradients = [g + decay * v for g, v in zip(gradients, variables)]
        optimizer.apply_gradients(zip(gradients, variables))
        if keras2_skips is not None:
            skipped = _keras_precision.keras2_step_skipped(tf.convert_to_tensor(optimizer.dynamic_counter),
                                                           scale_before, optimizer.loss_scale)
            keras2_skips.assign_add(tf.cast(skipped, tf.int64))

    accumulators = [tf.Variable(tf.zeros_like(v), trainable=False) for v in variables] \
        if problem.accumulate > 1 else []

    def accumulating_step(order: Any, start: Any, size: int) -> Any:
        """One batch of a group: the gradient of its loss / N added to the accumulators."""
        loss, gradients = gradients_of(order, start, size, problem.accumulate)
        for accumulator, gradient in zip(accumulators, gradients):
            accumulator.assign_add(gradient)
        return loss * tf.constant(size, dtype=x.dtype)

    def apply_accumulated() -> None:
        """The group's one step from the summed gradients (unscaled, clipped, decayed and applied
        as one batch's), then the accumulators zeroed."""
        update([tf.identity(accumulator) for accumulator in accumulators])
        for accumulator in accumulators:
            accumulator.assign(tf.zeros_like(accumulator))

    def scaled_step(gradients: list[Any]) -> None:
        """The update from the scaled loss's gradients: coupled decay joins them at the loss's
        scale (`scale_loss` of the decay term), and `apply` unscales, clips (the optimizer's
        own clipping) and updates, or under `LossScaleOptimizer` skips a non-finite step."""
        if decay:
            gradients = [g + optimizer.scale_loss(decay * v) for g, v in zip(gradients, variables)]
        optimizer.apply(gradients, variables)

    per_epoch = problem.schedule_every_epoch

    def last_rate() -> Any:
        if rate_schedule is None:
            return tf.constant(np.nan, tf.float64)
        if per_epoch:
            return tf.cast(optimizer.learning_rate, tf.float64)
        return tf.cast(rate_schedule(optimizer.iterations - 1), tf.float64)

    def last_scale() -> Any:
        """The loss scale the optimizer holds now: `LossScaleOptimizer`'s variable, or the fixed
        factor."""
        if keras2_scaled:
            return tf.cast(optimizer.loss_scale, tf.float64)
        if problem.dynamic_scaling:
            return tf.cast(optimizer.dynamic_scale, tf.float64)
        return tf.constant(optimizer.loss_scale_factor, tf.float64)

    def applied_steps() -> Any:
        """The optimizer's applied steps so far: its `iterations` (Keras 3's LossScaleOptimizer
        counts applied steps only; Keras 2's counts skips too, less those the loop read)."""
        # a read, not the variable: Keras 2's int64 `iterations` is returned as it is by tf.cast
        count = tf.identity(tf.cast(optimizer.iterations, tf.int64))
        return count if keras2_skips is None else count - keras2_skips

    def write_epoch(arrays: tuple[Any, ...], epoch: Any, total: Any, count_before: Any) -> tuple[Any, ...]:
        """`arrays` with the epoch's records written (a loss scale adds the scale and the
        skipped steps: those that did not advance `iterations` since `count_before`)."""
        params, totals, rates, *scaling = arrays
        written = (params.write(epoch, tf.concat([tf.reshape(v, [-1]) for v in variables], axis=0)),
                   totals.write(epoch, total), rates.write(epoch, last_rate()))
        if not scaled:
            return written
        scales, skipped = scaling
        applied = applied_steps() - count_before
        steps = problem.optimizer_steps_per_epoch
        return written + (scales.write(epoch, last_scale()), skipped.write(epoch, steps - applied))

    @tf.function(jit_compile=jit_compile)
    def run_training(orders: Any, epochs: Any) -> Any:
        arrays = (tf.TensorArray(x.dtype, size=problem.epochs, element_shape=[problem.parameter_count]),
                  tf.TensorArray(x.dtype, size=problem.epochs, element_shape=[]),
                  tf.TensorArray(tf.float64, size=problem.epochs, element_shape=[]))
        if scaled:
            arrays += (tf.TensorArray(tf.float64, size=problem.epochs, element_shape=[]),
                       tf.TensorArray(tf.int64, size=problem.epochs, element_shape=[]))
        for epoch in tf.range(epochs):
            order = orders[epoch] if shuffled else orders[0]
            if per_epoch:
                optimizer.learning_rate.assign(tf.cast(rate_schedule(epoch), optimizer.learning_rate.dtype))
            count_before = applied_steps() if scaled else None
            total = tf.constant(0.0, dtype=x.dtype)
            if accumulators:  # a step every N batches, and at the epoch's end for a partial group
                for index in tf.range(full_batches, dtype=tf.int64):
                    total += accumulating_step(order, index * batch, batch)
                    if (index + 1) % problem.accumulate == 0:
                        apply_accumulated()
                if last_batch:
                    total += accumulating_step(order, tf.constant(full_batches * batch, dtype=tf.int64), last_batch)
                if problem.steps_per_epoch % problem.accumulate or last_batch:
                    apply_accumulated()
            else:
                for index in tf.range(full_batches, dtype=tf.int64):
                    total += step(order, index * batch, batch)
                if last_batch:
                    total += step(order, tf.constant(full_batches * batch, dtype=tf.int64), last_batch)
            arrays = write_epoch(arrays, epoch, total, count_before)
        return dict(zip(("params", "totals", "rates", "scales", "skipped"), (a.stack() for a in arrays)))

    return run_training
