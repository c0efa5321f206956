"""TensorFlow with a hand-written loop: `tf.Variable`s, `tf.GradientTape`, `apply_gradients`.

The whole training runs as one `tf.function` (a graph loop over epochs and batches that also
records each epoch's parameters and loss) instead of eager steps: the same ops in the same
order, without ~1 ms of Python per step or a round trip to Python per epoch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from conformance.backends import _frameworks, _tensorflow
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
        run_training = _training_function(problem, variables, optimizer)
        orders = tf.range(problem.n, dtype=tf.int64)[tf.newaxis] if problem.orders is None \
            else tf.constant(problem.orders, dtype=tf.int64)
        params, totals = run_training(orders)
        params = params.numpy().astype(np.float64)
        losses = totals.numpy().astype(np.float64) / problem.n
        predictions = None
        if problem.predict_x is not None:
            predictions = _forward(tf, tf.constant(problem.predict_x), variables).numpy()[:, 0].astype(np.float64)
    return Trajectory(params, losses, predictions, _tensorflow.environment(device, weights))


def _forward(tf: Any, x: Any, variables: list[Any]) -> Any:
    output = tf.matmul(x, variables[0])
    return output + variables[1] if len(variables) > 1 else output


def _training_function(problem: Problem, variables: list[Any], optimizer: Any) -> Any:
    """A tf.function(orders) that trains every epoch; returns per-epoch parameters and loss sums.

    `orders` holds each epoch's row order, or one row (0..n-1) used by every epoch when the
    case does not shuffle. Loss sums are batch-size-weighted, in the case's dtype.
    """
    tf = _frameworks.tensorflow()
    x = tf.constant(problem.x)
    y = tf.constant(problem.y.reshape(-1, 1))
    decay = problem.optimizer.settings.get("weight_decay", 0.0)
    reduce = tf.reduce_mean if problem.reduction == "mean" else tf.reduce_sum
    batch, n, epochs = problem.batch_size, problem.n, problem.epochs
    shuffled = problem.orders is not None

    @tf.function
    def run_training(orders: Any) -> Any:
        params = tf.TensorArray(x.dtype, size=epochs, element_shape=[problem.features + problem.has_bias])
        totals = tf.TensorArray(x.dtype, size=epochs, element_shape=[])
        for epoch in tf.range(epochs):
            order = orders[epoch] if shuffled else orders[0]
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
            totals = totals.write(epoch, total)
            params = params.write(epoch, tf.concat([tf.reshape(v, [-1]) for v in variables], axis=0))
        return params.stack(), totals.stack()

    return run_training
