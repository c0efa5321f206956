"""The `gradient_tape` loop data-parallel, as TensorFlow's custom-training tutorial writes it
("Custom training with tf.distribute.Strategy"), in a replicated worker (_tf_distributed):

- the variables and the Keras optimizer made in `strategy.scope()` (mirrored on every replica);
- a distributed iterator of the harness's shards (`distribute_datasets_from_function`), read
  with `next(iterator)` inside the `tf.function` loop over epochs and steps;
- `strategy.run(step)` per step: each replica's loss is `tf.nn.compute_average_loss(per-sample
  losses, sample_weight, global_batch_size=the step's batch size)` (for `reduction: sum`, its
  shard's sum), its gradient clipped as the one-replica loop clips (per replica, before the
  all-reduce), coupled weight decay added to it as `decay * v / R` (the 1/R share that
  `tf.nn.scale_regularization_loss` gives a regularization loss; that function sums its argument
  to a scalar, so it cannot take the per-variable term itself), then `optimizer.apply_gradients`, which sums the
  replicas' gradients (all-reduce) and updates every copy;
- `strategy.reduce(SUM, per-replica losses)` for the step's loss.

`gradient_tape_xla`: XLA cannot compile a function that reaches variables on several devices
(TensorFlow's known issue "tf.Variable on a different device"), so each replica's forward and
backward pass (`tf.function(jit_compile=True)`, inside `strategy.run`) is compiled and the
all-reduce and update run in the graph around it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from conformance.backends import _frameworks, _keras_common, _tensorflow, _tf_distributed
from conformance.backends import _tape_parts as parts
from conformance.problem import Problem, Trajectory

API = ("tf.distribute.MirroredStrategy(devices); tf.Variables and the Keras optimizer in strategy.scope(); "
       "next(iter(strategy.distribute_datasets_from_function(shards))) in a tf.function loop; "
       "strategy.run(step): tf.nn.compute_average_loss(global_batch_size=step's batch), clip per replica, "
       "+ decay * v / R, optimizer.apply_gradients (all-reduce SUM); "
       "strategy.reduce(SUM, losses)")


def train(problem: Problem, device: str, jit_compile: bool) -> Trajectory:
    """Train `problem` over R replicas; per-epoch parameters and losses as the one-replica loop."""
    tf = _frameworks.tensorflow()
    keras = _tensorflow.keras()
    strategy = _tf_distributed.strategy(problem, device)
    rate_schedule = _keras_common.schedule(keras, problem)
    with _tensorflow.floatx(problem.dtype):
        with strategy.scope():
            layers = parts.variables(tf, problem)
            variables = _flat(layers)
            optimizer, scaling = parts.loop_optimizer(
                keras, problem, None if problem.schedule_every_epoch else rate_schedule)
            optimizer.build(variables)
            # each replica's own sum of its shards' gradients (SyncOnRead: a replica reads and
            # writes its own copy), as the tutorials on accumulating under a strategy keep them
            accumulators = [tf.Variable(tf.zeros_like(v), trainable=False,
                                        synchronization=tf.VariableSynchronization.ON_READ,
                                        aggregation=tf.VariableAggregation.SUM)
                            for v in variables] if problem.accumulate > 1 else []
        compute_dtype = parts.compute_dtype_of(keras, problem)
        seen = None if compute_dtype is None else {}
        step = _replica_step(problem, layers, optimizer, compute_dtype, seen, jit_compile, accumulators)
        run_training = _training_function(problem, strategy, step, variables, optimizer, rate_schedule)
        iterator = iter(_tf_distributed.distributed_shards(strategy, problem, problem.sample_weight is not None))
        recorded = run_training(iterator, tf.constant(problem.epochs))
        predictions = _predictions(tf, problem, layers, compute_dtype)
    info = _tensorflow.environment(device, layers[0][1]) | {
        "replicas": _tf_distributed.info(strategy, variables, API + ("; each replica's forward and backward pass "
                                                                     "under tf.function(jit_compile=True)"
                                                                     if jit_compile else ""))}
    if jit_compile:
        info["xla"] = _xla_evidence(step.compiled)
    if compute_dtype is not None:
        info["precision"] = parts.precision_info(problem, seen, scaling)
    scaled = problem.loss_scale is not None
    return Trajectory(recorded["params"].numpy().astype(np.float64),
                      recorded["totals"].numpy().astype(np.float64) / problem.n, predictions, info,
                      rates=recorded["rates"].numpy().astype(np.float64) if rate_schedule is not None else None,
                      loss_scale=recorded["scales"].numpy().astype(np.float64) if scaled else None,
                      skipped=recorded["skipped"].numpy().astype(np.int64) if scaled else None)


def _flat(layers: list[tuple[Any, Any, Any]]) -> list[Any]:
    return [variable for _, kernel, bias in layers for variable in (kernel, bias) if variable is not None]


def _predictions(tf: Any, problem: Problem, layers: list[tuple[Any, Any, Any]], compute_dtype: Any) -> Any:
    if problem.predict_x is None:
        return None
    outputs = parts.forward(tf, tf.constant(problem.predict_x), layers, compute_dtype)
    if problem.loss == "bce":
        outputs = tf.math.sigmoid(outputs)
    return outputs.numpy()[:, 0].astype(np.float64)


def _replica_step(problem: Problem, layers: list[tuple[Any, Any, Any]], optimizer: Any, compute_dtype: Any,
                  seen: dict[str, str] | None, jit_compile: bool, accumulators: list[Any]) -> Any:
    """step(inputs, global_batch_size), run on each replica: its loss and the optimizer's update.
    With accumulation, step.accumulate(inputs, global_batch_size) adds the gradient of the
    replica's loss / N to its accumulators, and step.apply() makes the group's update from them
    (clipped per replica, then all-reduced by the optimizer) and zeroes them."""
    tf = _frameworks.tensorflow()
    variables = _flat(layers)
    delta = tf.constant(problem.delta, dtype=problem.dtype)
    decay = problem.optimizer.settings.get("weight_decay", 0.0)
    scaled = problem.loss_scale is not None
    replicas = problem.replicas  # each replica adds 1/R of the decay; the all-reduce sums the shares

    def loss_and_gradients(inputs: tuple[Any, ...], global_batch_size: int) -> tuple[Any, list[Any]]:
        x_shard, y_shard, *weights = inputs
        with tf.GradientTape() as tape:
            output = parts.forward(tf, x_shard, layers, compute_dtype, seen)
            losses = tf.reshape(parts.per_sample_loss(tf, problem, output, y_shard, delta), [-1])
            weight = tf.reshape(weights[0], [-1]) if weights else None
            if problem.reduction == "mean":
                loss = tf.nn.compute_average_loss(losses, sample_weight=weight, global_batch_size=global_batch_size)
            else:  # each replica's sum; the all-reduce sums them
                loss = tf.reduce_sum(losses if weight is None else losses * weight)
            objective = loss / problem.accumulate if accumulators else loss
            objective = optimizer.scale_loss(objective) if scaled else objective
        return loss, tape.gradient(objective, variables)

    compute = tf.function(loss_and_gradients, jit_compile=True) if jit_compile else loss_and_gradients

    def gradients_of(inputs: tuple[Any, ...], global_batch_size: int) -> tuple[Any, list[Any]]:
        loss, gradients = compute(inputs, global_batch_size)
        if seen is not None:
            seen.update(loss_dtype=loss.dtype.name, gradient_dtype=gradients[0].dtype.name,
                        variable_dtype=variables[0].dtype.name)
        return loss, gradients

    def step(inputs: tuple[Any, ...], global_batch_size: int) -> Any:
        loss, gradients = gradients_of(inputs, global_batch_size)
        update(gradients)
        return loss

    def accumulate(inputs: tuple[Any, ...], global_batch_size: int) -> Any:
        loss, gradients = gradients_of(inputs, global_batch_size)
        for accumulator, gradient in zip(accumulators, gradients):
            accumulator.assign_add(gradient)
        return loss

    def apply() -> Any:
        update([tf.identity(accumulator.read_value()) for accumulator in accumulators])
        for accumulator in accumulators:
            accumulator.assign(tf.zeros_like(accumulator))
        return tf.constant(0, tf.int32)

    def update(gradients: list[Any]) -> None:
        """The replica's part of the step: Keras 3's `apply` (unscales, clips with the
        optimizer's own clipping, updates) under a loss scale, else the loop's clip, the decay's
        share and `apply_gradients`; both all-reduce (SUM) the replicas' gradients."""
        if scaled:  # Keras 3's scale_loss / apply: apply unscales, clips (the optimizer's own), updates
            if decay:
                gradients = [g + optimizer.scale_loss(decay * v / replicas)
                             for g, v in zip(gradients, variables)]
            optimizer.apply(gradients, variables)
            return
        gradients = parts.clipped(tf, gradients, problem.clip)
        if decay:
            gradients = [g + decay * v / replicas for g, v in zip(gradients, variables)]
        optimizer.apply_gradients(zip(gradients, variables))

    step.compiled = compute if jit_compile else None
    step.accumulate, step.apply = accumulate, apply
    return step


def _xla_evidence(compiled: Any) -> dict[str, Any]:
    """What TensorFlow says about each replica's jitted loss-and-gradients function: the
    must-compile attribute of its traced functions, and how often it was traced."""
    concrete = compiled._list_all_concrete_functions()
    attributes = [function.function_def.attr.get("_XlaMustCompile") for function in concrete]
    return {"compiled": "each replica's forward and backward pass (tf.function(jit_compile=True) in strategy.run)",
            "must_compile": bool(attributes) and all(a is not None and a.b for a in attributes),
            "traces": int(compiled.experimental_get_tracing_count())}


def _training_function(problem: Problem, strategy: Any, step: Any, variables: list[Any], optimizer: Any,
                       rate_schedule: Any) -> Any:
    """tf.function(iterator, epochs) -> per-epoch "params", "totals" (batch-size-weighted loss
    sums), "rates", and with a loss scale "scales" and "skipped" (as gradient_tape's)."""
    tf = _frameworks.tensorflow()
    batch = problem.batch_size
    full_batches, last_batch = divmod(problem.n, batch)
    dtype = tf.as_dtype(problem.dtype)
    scaled = problem.loss_scale is not None

    def one_step(iterator: Any, size: int, run: Any = step) -> Any:
        losses = strategy.run(run, args=(next(iterator), size))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None) * tf.constant(size, dtype=dtype)

    def one_group(iterator: Any, sizes: list[int]) -> Any:
        """A group's batches accumulated, then its one step. The group's batches are unrolled and
        the step is not under a condition: TensorFlow refuses an all-reduce (merge_call) inside
        a tf.cond, so the loop over an epoch is over whole groups."""
        total = tf.constant(0.0, dtype=dtype)
        for size in sizes:
            total += one_step(iterator, size, step.accumulate)
        strategy.run(step.apply)
        return total

    accumulate = problem.accumulate
    full_groups, rest = divmod(full_batches, accumulate)
    tail = [batch] * rest + ([last_batch] if last_batch else [])  # the epoch's last group: at most N batches

    def last_rate() -> Any:
        if rate_schedule is None:
            return tf.constant(np.nan, tf.float64)
        if problem.schedule_every_epoch:
            return tf.cast(optimizer.learning_rate, tf.float64)
        return tf.cast(rate_schedule(optimizer.iterations - 1), tf.float64)

    def last_scale() -> Any:
        if problem.dynamic_scaling:
            return tf.cast(optimizer.dynamic_scale, tf.float64)
        return tf.constant(optimizer.loss_scale_factor, tf.float64)

    @tf.function
    def run_training(iterator: Any, epochs: Any) -> Any:
        names = ("params", "totals", "rates", "scales", "skipped")
        arrays = [tf.TensorArray(dtype, size=problem.epochs, element_shape=[problem.parameter_count]),
                  tf.TensorArray(dtype, size=problem.epochs, element_shape=[]),
                  tf.TensorArray(tf.float64, size=problem.epochs, element_shape=[]),
                  tf.TensorArray(tf.float64, size=problem.epochs, element_shape=[]),
                  tf.TensorArray(tf.int64, size=problem.epochs, element_shape=[])]
        for epoch in tf.range(epochs):
            if problem.schedule_every_epoch:
                optimizer.learning_rate.assign(tf.cast(rate_schedule(epoch), optimizer.learning_rate.dtype))
            count_before = tf.cast(optimizer.iterations, tf.int64)
            total = tf.constant(0.0, dtype=dtype)
            if accumulate > 1:
                for _ in tf.range(full_groups):
                    total += one_group(iterator, [batch] * accumulate)
                if tail:
                    total += one_group(iterator, tail)
            else:
                for _ in tf.range(full_batches):
                    total += one_step(iterator, batch)
                if last_batch:
                    total += one_step(iterator, last_batch)
            applied = tf.cast(optimizer.iterations, tf.int64) - count_before
            values = (tf.concat([tf.reshape(v, [-1]) for v in variables], axis=0), total, last_rate(),
                      last_scale() if scaled else tf.constant(np.nan, tf.float64),
                      problem.optimizer_steps_per_epoch - applied)
            arrays = [array.write(epoch, value) for array, value in zip(arrays, values)]
        return dict(zip(names, (array.stack() for array in arrays)))

    return run_training
