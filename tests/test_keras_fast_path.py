"""The Keras fast feeding path gives bit-identical parameters to the plain `fit` a user writes."""

from __future__ import annotations

import numpy as np
import pytest

from conformance.problem import Optimizer, Problem

pytest.importorskip("tensorflow")


@pytest.mark.parametrize("batch_size, momentum, dtype", [(6, 0.0, "float32"), (4, 0.9, "float32"), (4, 0.9, "float64")])
def test_fast_path_is_bit_identical_to_plain_fit(batch_size, momentum, dtype):
    from conformance.backends import keras

    x = np.arange(-1.0, 5.0).reshape(-1, 1).astype(dtype)
    problem = Problem("y-2x-minus-1", x, (2 * x[:, 0] - 1).astype(dtype), np.zeros(1, dtype), np.zeros((), dtype),
                      epochs=12, batch_size=batch_size, orders=None, reduction="mean",
                      optimizer=Optimizer("sgd", {"learning_rate": 0.01, "momentum": momentum, "nesterov": False,
                                                  "weight_decay": 0.0}), dtype=dtype)
    fast = keras.train(problem, "cpu")
    plain = keras.train_plain(problem, "cpu")
    assert fast.info["kernel_dtype"].endswith(dtype)
    np.testing.assert_array_equal(fast.params, plain.params)  # every epoch, bit for bit
    np.testing.assert_array_equal(fast.loss, plain.loss)
