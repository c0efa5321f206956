"""TensorFlow with a hand-written loop: `tf.Variable`s, `tf.GradientTape`, `apply_gradients`.

Each epoch runs as one `tf.function` (a graph loop over the epoch's batches) instead of one
eager step per batch: the same ops in the same order, without ~1 ms of Python per step.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from conformance.backends import _tensorflow
from conformance.backends import _frameworks
from conformance.problem import Problem, Trajectory

NAME = "gradient_tape"
LOOKED_FOR = _tensorflow.LOOKED_FOR
available = _tensorflow.available
devices = _tensorflow.devices
device_name = _tensorflow.device_name


def train(problem: Problem, device: str) -> Trajectory:
    tf = _frameworks.tensorflow()
    with _tensorflow.floatx(problem.dtype), tf.device(_tensorflow.tf_device(device)):
        weights = tf.Variable(problem.init_weights.reshape(-1, 1), name="weights")
        variables = [weights]
        if problem.has_bias:
            variables.append(tf.Variable(problem.init_bias.reshape(1), name="bias"))
        optimizer = _tensorflow.keras_optimizer(problem.optimizer)
        optimizer.build(variables)
        run_epoch = _epoch_function(problem, variables, optimizer)
        in_order = tf.range(problem.n, dtype=tf.int64)
        params = np.empty((problem.epochs, problem.features + problem.has_bias))
        losses = np.empty(problem.epochs)
        for epoch in range(problem.epochs):
            order = in_order if problem.orders is None else tf.constant(problem.orders[epoch])
            losses[epoch] = float(run_epoch(order)) / problem.n
            params[epoch] = np.concatenate([np.ravel(v.numpy()) for v in variables])
        predictions = None
        if problem.predict_x is not None:
            predictions = _forward(tf, tf.constant(problem.predict_x), variables).numpy()[:, 0].astype(np.float64)
    return Trajectory(params, losses, predictions, _tensorflow.environment(device))


def _forward(tf: Any, x: Any, variables: list[Any]) -> Any:
    output = tf.matmul(x, variables[0])
    return output + variables[1] if len(variables) > 1 else output


def _epoch_function(problem: Problem, variables: list[Any], optimizer: Any) -> Any:
    """A tf.function(order) that trains one epoch and returns the batch-size-weighted loss sum."""
    tf = _frameworks.tensorflow()
    x = tf.constant(problem.x)
    y = tf.constant(problem.y.reshape(-1, 1))
    decay = problem.optimizer.settings.get("weight_decay", 0.0)
    reduce = tf.reduce_mean if problem.reduction == "mean" else tf.reduce_sum
    batch, n = problem.batch_size, problem.n

    @tf.function
    def run_epoch(order: Any) -> Any:
        total = tf.constant(0.0, dtype=x.dtype)
        for start in tf.range(0, n, batch, dtype=tf.int64):
            indices = order[start:start + batch]
            x_batch, y_batch = tf.gather(x, indices), tf.gather(y, indices)
            with tf.GradientTape() as tape:
                loss = reduce(tf.square(_forward(tf, x_batch, variables) - y_batch))
            gradients = tape.gradient(loss, variables)
            if decay:
                gradients = [g + decay * v for g, v in zip(gradients, variables)]
            optimizer.apply_gradients(zip(gradients, variables))
            total += loss * tf.cast(tf.shape(indices)[0], x.dtype)
        return total

    return run_epoch
