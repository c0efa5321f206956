"""The float64 references: replay formulas by hand, least squares against NIST's certified values."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from conformance.datasets import Standardizer
from conformance.problem import Optimizer, Problem
from conformance.reference import least_squares, lre, replay
from tests.conftest import ROOT


def problem(x, y, epochs=1, batch_size=None, orders=None, reduction="mean", **sgd) -> Problem:
    x = np.asarray(x, dtype=np.float64).reshape(len(y), -1)
    settings = {"learning_rate": 0.1, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0} | sgd
    return Problem("p", x, np.asarray(y, dtype=np.float64), np.zeros(x.shape[1]), np.asarray(0.0), epochs,
                   batch_size or len(y), orders, reduction, Optimizer("sgd", settings), "float64")


def test_one_full_batch_sgd_step_matches_the_closed_form():
    # loss = mean((w x + b - y)^2); at w = b = 0 the gradient is (-2 mean(x y), -2 mean(y)).
    x, y = [1.0, 2.0, 3.0], [2.0, 4.0, 7.0]
    result = replay(problem(x, y, learning_rate=0.1))
    expected = 0.1 * 2 * np.array([np.mean(np.multiply(x, y)), np.mean(y)])
    np.testing.assert_allclose(result.final, expected, rtol=1e-15)
    assert result.loss[0] == pytest.approx(np.mean(np.square(y)))


def test_summed_loss_scales_the_gradient_by_the_batch_size():
    x, y = [1.0, 2.0, 3.0], [2.0, 4.0, 7.0]
    mean = replay(problem(x, y, learning_rate=0.01)).final
    summed = replay(problem(x, y, learning_rate=0.01, reduction="sum")).final
    np.testing.assert_allclose(summed, 3 * mean, rtol=1e-15)


def test_momentum_nesterov_and_weight_decay_follow_torch_sgd():
    x, y = [1.0, -1.0], [1.0, 1.0]  # gradient at (w, b): (2 w, 2 (b - 1))
    lr, mu, wd = 0.1, 0.9, 0.5
    params, buffer = np.zeros(2), None
    for _ in range(3):
        grad = np.array([2 * params[0], 2 * (params[1] - 1)]) + wd * params
        buffer = grad if buffer is None else mu * buffer + grad
        params = params - lr * (grad + mu * buffer)
    result = replay(problem(x, y, epochs=3, learning_rate=lr, momentum=mu, nesterov=True, weight_decay=wd))
    np.testing.assert_allclose(result.final, params, rtol=1e-15)


def test_batches_follow_the_given_order_and_keep_the_smaller_last_batch():
    p = problem(np.arange(5.0), np.arange(5.0), epochs=2, batch_size=2, orders=np.array([[4, 3, 2, 1, 0],
                                                                                          [0, 1, 2, 3, 4]]))
    batches = [list(np.atleast_1d(np.arange(5)[b])) for b in p.batches(0)]
    assert batches == [[4, 3], [2, 1], [0]]


def test_standardized_parameters_map_back_to_the_original_scale():
    rng = np.random.default_rng(0)
    x = rng.normal(5, 3, size=(50, 2))
    y = x @ [2.0, -1.0] + 4
    standardizer = Standardizer.fit(x)
    on_standardized = least_squares(standardizer.apply(x), y, True)
    np.testing.assert_allclose(standardizer.to_original(on_standardized), [2.0, -1.0, 4.0], rtol=1e-12)


@pytest.mark.parametrize("name, degree, certified, digits", [
    ("norris", 1, [1.00211681802045, -0.262323073774029], 12),
    ("pontius", 2, [0.732059160401003e-06, -0.316081871345029e-14, 0.673565789473684e-03], 12),
])
def test_least_squares_reaches_nist_certified_digits(name, degree, certified, digits):
    with open(ROOT / "cases" / "nist" / "data" / f"{name}.csv") as handle:
        rows = list(csv.DictReader(handle))
    x = np.array([float(row["x"]) for row in rows])[:, None]
    y = np.array([float(row["y"]) for row in rows])
    design = np.hstack([x ** power for power in range(1, degree + 1)])
    assert lre(least_squares(design, y, True), certified).min() >= digits


def test_lre_counts_digits_and_handles_zero():
    np.testing.assert_allclose(lre([1.0001, 1e-9], [1.0, 0.0]), [4.0, 9.0], atol=1e-6)
    assert lre([2.0], [2.0])[0] == 15.0
