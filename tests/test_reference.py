"""The float64 references: replay formulas by hand, least squares against NIST's certified values."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import scipy.linalg

from conformance import fits, model_loss, reference
from conformance.datasets import Standardizer
from conformance.fits import least_squares, lre
from conformance.problem import Optimizer, Problem
from conformance.reference import replay
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


# ---- adaptive optimizers: the replay's rules against steps written out by hand ----------------

GRADIENTS = [np.array([3.0, -2.0]), np.array([-0.01, 0.01]), np.array([0.5, 4.0])]  # v falls at step 2


def run_steps(name: str, **settings) -> np.ndarray:
    from conformance.optimizers import make_update

    update = make_update(Optimizer(name, settings))
    params = np.array([1.0, -1.0])
    for grad in GRADIENTS:
        params = update(params, grad, settings["learning_rate"])
    return params


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_follows_torch_with_epsilon_outside_the_corrected_root(amsgrad):
    lr, b1, b2, eps = 0.1, 0.8, 0.9, 1e-3
    params, m, v, v_max = np.array([1.0, -1.0]), 0.0, 0.0, 0.0
    for t, g in enumerate(GRADIENTS, start=1):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g**2
        v_max = np.maximum(v_max, v)
        second = v_max if amsgrad else v
        params = params - lr / (1 - b1**t) * m / (np.sqrt(second / (1 - b2**t)) + eps)
    got = run_steps("adam", learning_rate=lr, beta_1=b1, beta_2=b2, epsilon=eps, amsgrad=amsgrad)
    np.testing.assert_allclose(got, params, rtol=1e-14)
    if amsgrad:  # the second gradient is smaller, so the running maximum must have mattered
        assert not np.allclose(got, run_steps("adam", learning_rate=lr, beta_1=b1, beta_2=b2, epsilon=eps,
                                              amsgrad=False))


@pytest.mark.parametrize("momentum,centered", [(0.0, False), (0.5, False), (0.0, True), (0.5, True)])
def test_rmsprop_follows_torch(momentum, centered):
    lr, rho, eps = 0.01, 0.9, 1e-3
    params, v, a, b = np.array([1.0, -1.0]), 0.0, 0.0, 0.0
    for g in GRADIENTS:
        v = rho * v + (1 - rho) * g**2
        a = rho * a + (1 - rho) * g
        direction = g / (np.sqrt(v - a**2 if centered else v) + eps)
        b = momentum * b + direction
        params = params - lr * (b if momentum else direction)
    got = run_steps("rmsprop", learning_rate=lr, rho=rho, epsilon=eps, momentum=momentum, centered=centered)
    np.testing.assert_allclose(got, params, rtol=1e-14)


def test_adagrad_follows_torch_from_its_initial_accumulator():
    lr, start, eps = 0.5, 0.1, 1e-3
    squares = np.cumsum([g**2 for g in GRADIENTS], axis=0) + start
    expected = np.array([1.0, -1.0]) - sum(lr * g / (np.sqrt(s) + eps) for g, s in zip(GRADIENTS, squares))
    got = run_steps("adagrad", learning_rate=lr, initial_accumulator_value=start, epsilon=eps)
    np.testing.assert_allclose(got, expected, rtol=1e-14)


def test_tall_problems_solved_via_the_gram_matrix_agree_with_the_svd_path():
    rng = np.random.default_rng(5)
    x = rng.normal(loc=3.0, scale=[1, 10, 0.1], size=(fits.TALL_ROWS, 3))
    y = x @ [1.5, -2.0, 30.0] + 7.0 + rng.normal(size=len(x))
    tall = fits.least_squares(x, y, True)
    design = np.hstack([x, np.ones((len(x), 1))])
    svd = scipy.linalg.lstsq(design, y)[0]
    np.testing.assert_allclose(tall, svd, rtol=1e-12)
    collinear = np.hstack([x[:, :1], x[:, :1] * (1 + 1e-12)])  # ill-conditioned: falls back to the SVD path
    assert fits._tall_least_squares(collinear, y, True) is None


def test_exact_least_squares_matches_scipy_where_scipy_is_accurate_and_beats_it_on_wampler5():
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, size=(40, 3))
    y = x @ [1.5, -2.0, 0.25] + 0.5 + rng.normal(0, 0.1, size=40)
    design = np.hstack([x, np.ones((40, 1))])
    scipy_solution = scipy.linalg.lstsq(design, y)[0]
    np.testing.assert_allclose(fits.exact_least_squares(x, y, True), scipy_solution, rtol=1e-13)
    with open(ROOT / "cases" / "nist" / "data" / "wampler5.csv") as handle:
        rows = list(csv.DictReader(handle))
    raw = np.array([float(row["x"]) for row in rows])
    target = np.array([float(row["y"]) for row in rows])
    powers = np.hstack([raw[:, None] ** power for power in range(1, 6)])
    assert lre(fits.exact_least_squares(powers, target, True), np.ones(6)).min() >= 14.5


def test_exact_least_squares_declines_rank_deficient_data_and_scipy_gives_a_minimiser():
    x = np.array([[1.0, 2.0], [2.0, 4.0], [3.0, 6.0]])
    y = np.array([1.0, 2.0, 3.0])
    assert fits.exact_least_squares(x, y, False) is None
    np.testing.assert_allclose(x @ least_squares(x, y, False), y, rtol=1e-12)


@pytest.mark.parametrize("reduction, batch_size", [("mean", 8), ("sum", 8), ("mean", 3)])
def test_training_with_weight_decay_converges_to_the_ridge_reference(reduction, batch_size):
    """The float64 replay of SGD with coupled weight decay settles where the ridge reference
    says: exactly for full and equal batches, to O(learning rate) for a smaller last batch."""
    rng = np.random.default_rng(9)
    x = rng.normal(size=(8 if batch_size == 8 else 10, 2))
    y = x @ [1.5, -0.5] + 0.25 + 0.1 * rng.normal(size=len(x))
    rate = {("mean", 8): 0.05, ("sum", 8): 0.01, ("mean", 3): 0.002}[reduction, batch_size]
    sgd = Optimizer("sgd", {"learning_rate": rate, "momentum": 0.0, "nesterov": False, "weight_decay": 0.3})
    epochs = 4000 if batch_size == 8 else 20000
    problem = Problem("ridge", x, y, np.zeros(2), np.zeros(()), epochs, batch_size, None, reduction, sgd, "float64")
    trained = replay(problem).final
    expected = fits.ridge(problem)
    design = np.hstack([x, np.ones((len(x), 1))])
    if batch_size == 8:  # closed form: (X^T X / scale + lambda/2 I) theta = X^T y / scale
        scale = len(x) if reduction == "mean" else 1.0
        closed = np.linalg.solve(design.T @ design / scale + 0.15 * np.eye(3), design.T @ y / scale)
        np.testing.assert_allclose(expected, closed, rtol=1e-12)
        np.testing.assert_allclose(trained, expected, rtol=1e-10)
    else:
        np.testing.assert_allclose(trained, expected, rtol=5e-3)
        ordinary = least_squares(x, y, True)
        assert np.abs(trained - expected).max() < np.abs(trained - ordinary).max() / 5


def huber_objective(theta, design, y, delta, weights, penalty):
    residual = design @ theta - y
    size = np.abs(residual)
    per_sample = np.where(size <= delta, 0.5 * residual**2, delta * (size - delta / 2))
    return float(weights @ per_sample + penalty * theta @ theta)


@pytest.mark.parametrize("weighted", [False, True])
def test_huber_fit_is_the_minimiser_of_the_huber_objective(weighted):
    """The objective's gradient vanishes at the reference (to 1e-12), no step of 1e-7 lowers the
    objective beyond its rounding, and it is not least squares: the outliers pull least
    squares, not the Huber fit."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(30, 2))
    y = x @ [2.0, -1.0] + 0.5 + 0.3 * rng.normal(size=30)
    y[:4] += [8.0, -9.0, 12.0, 7.0]
    weights, penalty = (rng.uniform(0.5, 2, size=30), 0.2) if weighted else (np.ones(30), 0.0)
    fit = fits.huber_fit(x, y, True, 0.7, weights if weighted else None, penalty)
    design = np.hstack([x, np.ones((30, 1))])
    best = huber_objective(fit, design, y, 0.7, weights, penalty)
    for direction in np.vstack([np.eye(3), -np.eye(3), rng.normal(size=(10, 3))]):
        assert huber_objective(fit + 1e-7 * direction, design, y, 0.7, weights, penalty) >= best * (1 - 1e-14)
    residual = design @ fit - y
    inside = np.abs(residual) <= 0.7
    gradient = design[inside].T @ (weights[inside] * residual[inside]) \
        + 0.7 * design[~inside].T @ (weights[~inside] * np.sign(residual[~inside])) + 2 * penalty * fit
    assert np.abs(gradient).max() < 1e-12
    if not weighted:
        assert np.abs(fit - least_squares(x, y, True)).max() > 0.1


def test_huber_loss_and_gradient_match_the_formula_and_finite_differences():
    """Both branches (|r| <= delta and beyond), mean and sum; the gradient against central
    differences of the loss."""
    x = np.array([[0.5], [-1.0], [2.0], [3.0]])
    y = np.array([0.2, 4.0, -3.0, 3.1])
    params = np.array([1.0, 0.1])
    residual = x[:, 0] * 1.0 + 0.1 - y
    expected = np.where(np.abs(residual) <= 1.5, 0.5 * residual**2, 1.5 * (np.abs(residual) - 0.75))
    for reduction, scale in (("mean", 0.25), ("sum", 1.0)):
        loss, grad = model_loss.loss_and_gradient(params, x, y, True, reduction, "huber", 1.5)
        assert loss == pytest.approx(expected.sum() * scale, rel=1e-15)
        numeric = [(model_loss.loss_and_gradient(params + h, x, y, True, reduction, "huber", 1.5)[0]
                    - model_loss.loss_and_gradient(params - h, x, y, True, reduction, "huber", 1.5)[0]) / 2e-6
                   for h in 1e-6 * np.eye(2)]
        np.testing.assert_allclose(grad, numeric, rtol=1e-7)


def test_logistic_fit_zeroes_the_gradient_and_matches_a_generic_optimiser():
    """The weighted maximum-likelihood fit: gradient at most 1e-10 of its size at zero, and the
    same point as BFGS on the same objective (to BFGS's own accuracy)."""
    import scipy.optimize

    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 2))
    y = (rng.uniform(size=40) < 1 / (1 + np.exp(-(x @ [1.0, -2.0] + 0.5)))).astype(float)
    weights = rng.uniform(0.1, 2.0, size=40)
    fit = fits.logistic_fit(x, y, True, weights)
    design = np.hstack([x, np.ones((40, 1))])

    def objective(theta):
        z = design @ theta
        return weights @ (np.logaddexp(0, z) - y * z)

    gradient = design.T @ (weights * (1 / (1 + np.exp(-(design @ fit))) - y))
    assert np.abs(gradient).max() < 1e-10 * np.abs(design.T @ (weights * (0.5 - y))).max()
    generic = scipy.optimize.minimize(objective, np.zeros(3), method="BFGS", options={"gtol": 1e-9}).x
    np.testing.assert_allclose(fit, generic, rtol=1e-5)


def test_separable_classes_have_no_finite_logistic_fit():
    """A real test of separability (a linear program), not a guess from large weights: the
    same points with one label flipped across the boundary are fitted; a fractional label or
    a zero-weighted outlier changes the verdict as it should."""
    x = np.array([[-2.0], [-1.0], [-0.5], [0.5], [1.0], [2.0]])
    y = np.array([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    with pytest.raises(fits.NoFiniteFit, match="linearly separable: no finite maximum-likelihood fit"):
        fits.logistic_fit(x, y, True)
    overlapping = y.copy()
    overlapping[2], overlapping[3] = 1.0, 0.0  # x = -0.5 labelled 1 and x = 0.5 labelled 0: they overlap
    assert np.isfinite(fits.logistic_fit(x, overlapping, True)).all()
    design = np.hstack([x, np.ones((6, 1))])
    soft = y.copy()
    soft[0] = 0.3
    assert not fits.separable(design, soft, np.ones(6))
    assert fits.separable(design, overlapping, np.array([1, 1, 0, 0, 1, 1.0]))  # the overlap weighs 0
    assert np.isfinite(fits.logistic_fit(x, y, True, penalty=0.01)).all()  # weight decay: finite


def test_weighted_least_squares_equals_least_squares_with_repeated_rows():
    """Integer weights are repeated rows; a zero weight drops its row."""
    x = np.array([[0.0], [1.0], [2.0], [3.0], [4.0]])
    y = np.array([1.0, 2.9, 5.2, 6.8, 9.5])
    weights = np.array([1.0, 3.0, 0.0, 2.0, 1.0])
    repeated = np.repeat(np.arange(5), weights.astype(int))
    np.testing.assert_allclose(fits.weighted_least_squares(x, y, True, weights),
                               least_squares(x[repeated], y[repeated], True), rtol=1e-14)


def test_bce_and_sample_weights_in_the_replay_match_the_formula_and_finite_differences():
    x = np.array([[0.5], [-1.0], [2.0], [3.0]])
    y = np.array([1.0, 0.0, 0.0, 0.7])
    weights = np.array([1.0, 2.0, 0.5, 0.0])
    params = np.array([0.8, -0.2])
    z = x[:, 0] * 0.8 - 0.2
    p = 1 / (1 + np.exp(-z))
    expected = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    for reduction, scale in (("mean", 0.25), ("sum", 1.0)):
        loss, grad = model_loss.loss_and_gradient(params, x, y, True, reduction, "bce", weights=weights)
        assert loss == pytest.approx(weights @ expected * scale, rel=1e-14)
        numeric = [(model_loss.loss_and_gradient(params + h, x, y, True, reduction, "bce", weights=weights)[0]
                    - model_loss.loss_and_gradient(params - h, x, y, True, reduction, "bce", weights=weights)[0])
                   / 2e-6 for h in 1e-6 * np.eye(2)]
        np.testing.assert_allclose(grad, numeric, rtol=1e-7)


def test_the_lstsq_item_of_separable_data_fails_with_the_reason(write_case):
    """The check itself, on a loaded case: a result is there, the reference is not."""
    from conformance.case import discover, load
    from conformance.checks import Trained, make_run
    from conformance.problem import Trajectory

    path = write_case("separable", """\
        dataset: {inline: {x: [-2, -1, 1, 2], y: [0, 0, 1, 1]}}
        training: {epochs: 5, loss: {bce: {from_logits: true}}, optimizer: {sgd: {learning_rate: 0.1}}}
        tolerance: {parity: {rtol: 1.0e-5, atol: 1.0e-6}, lstsq: {rtol: 1.0e-5, atol: 1.0e-6}}
        """)
    run = make_run(load(discover([path])[0]), [("torch", "cpu")], False)
    replayed = run.refs.replay
    run.results[("torch", "cpu")] = Trained("torch", "cpu", Trajectory(replayed.params, replayed.loss), 0.0)
    outcome = run.check_lstsq("torch", "cpu")
    assert not outcome.passed
    assert outcome.message.startswith("scipy logistic maximum likelihood: linearly separable: no finite "
                                      "maximum-likelihood fit")


def test_weighted_losses_in_float32_round_each_product_and_each_gradient_weight_to_float32():
    """tf.nn.compute_average_loss with sample weights (weighted_losses_in_float32): the loss sums
    float32(float32(loss_i) float32(w_i)) / n; loss_i's gradient weight is float32(float32(1 / n) w_i)."""
    x = np.array([[0.5], [-1.0], [2.0]])
    y = np.array([1.0, 0.0, 0.3])
    weights = np.array([0.901, 0.742, 1.3])
    params = np.array([0.8, -0.2])
    per_sample = (x[:, 0] * 0.8 - 0.2 - y) ** 2
    loss, grad = model_loss.loss_and_gradient(params, x, y, True, "mean", weights=weights, weights_in_float32_over=3)
    products = (per_sample.astype(np.float32) * weights.astype(np.float32)).astype(np.float64)
    assert loss == pytest.approx(products.sum() / 3, rel=1e-15)
    factors = (np.float32(1 / 3) * weights.astype(np.float32)).astype(np.float64)
    slope = factors * 2 * (x[:, 0] * 0.8 - 0.2 - y)
    np.testing.assert_allclose(grad, [slope @ x[:, 0], slope.sum()], rtol=1e-14, atol=1e-16)
    exact = model_loss.loss_and_gradient(params, x, y, True, "mean", weights=weights)
    assert exact[0] != loss and 0 < abs(exact[0] / loss - 1) < 1e-7  # a float32 rounding away, no more
    summed = model_loss.loss_and_gradient(params, x, y, True, "sum", weights=weights, weights_in_float32_over=3)
    assert summed[0] == model_loss.loss_and_gradient(params, x, y, True, "sum", weights=weights)[0]  # mean only


def test_the_bce_gradient_is_rounded_as_p_then_p_minus_y():
    """A saturated sample's p - y is below float32's u: the frameworks round p first, so their
    gradient is off by up to u p (here all of it), and the replay's rounding model moves it by that."""
    import scipy.special

    x, y, params = np.array([[1.0]]), np.array([1.0]), np.array([18.0, 0.0])
    _, exact = model_loss.loss_and_gradient(params, x, y, True, "mean", loss="bce")
    unit = reference.UNIT_ROUNDOFF["float32"]
    _, perturbed = model_loss.loss_and_gradient(params, x, y, True, "mean", loss="bce",
                                               probability_offsets=np.array([unit]))
    float32_gradient = float(np.float32(scipy.special.expit(np.float32(18.0))) - np.float32(1.0))
    assert abs(float32_gradient - exact[1]) > 100 * unit * abs(exact[1])  # the relative model misses it
    assert abs(float32_gradient - exact[1]) <= unit * scipy.special.expit(18.0)
    assert abs(perturbed[1] - exact[1]) == pytest.approx(unit * scipy.special.expit(18.0), rel=1e-9)


def test_a_replica_shard_weighs_its_losses_by_the_global_batch_in_float32():
    """compute_average_loss(global_batch_size=n) in a shard of 2 of 3 rows: each gradient weight
    is float32(float32(1 / 3) w_i), not float32(float32(1 / 2) w_i) 2 / 3 (fuzz-70211-80)."""
    x, y = np.array([[0.5], [-1.0]]), np.array([1.0, 0.0])
    weights, params = np.array([0.901, 0.742]), np.array([0.8, -0.2])
    _, grad = model_loss.loss_and_gradient(params, x, y, True, "mean", weights=weights, weights_in_float32_over=3)
    factors = (np.float32(1 / 3) * weights.astype(np.float32)).astype(np.float64)
    slope = factors * 2 * (x[:, 0] * 0.8 - 0.2 - y)
    np.testing.assert_allclose(grad * 2 / 3, [slope @ x[:, 0], slope.sum()], rtol=1e-15)
    shard_factors = (np.float32(1 / 2) * weights.astype(np.float32)).astype(np.float64) * 2 / 3
    assert not np.allclose(factors, shard_factors, rtol=1e-9, atol=0)  # the two roundings differ here


def test_the_loss_rounding_of_a_saturated_bce_sample_is_of_its_terms_not_its_value():
    """softplus(z) - y z cancels: a saturated sample's loss (here 1e-21) is computed from terms of
    size |z| (torch: 0 in float64), so the replay's model of the loss's rounding is u (2 |z| + 1)."""
    x, y, params = np.array([[1.0], [2.0]]), np.array([0.0, 1.0]), np.array([-24.0, 0.0])
    magnitudes: list = []
    loss, _ = model_loss.loss_and_gradient(params, x, y, True, "sum", "bce", weights=np.array([1.0, 0.5]),
                                          magnitudes=magnitudes)
    assert loss == pytest.approx(np.logaddexp(0, -24.0) + 0.5 * (np.logaddexp(0, -48.0) + 48.0))
    assert magnitudes[1] == pytest.approx((2 * 24 + 1) + 0.5 * (2 * 48 + 1))
    magnitudes = []
    model_loss.loss_and_gradient(params, x, y, True, "mean", weights=np.array([1.0, 0.5]), magnitudes=magnitudes)
    assert magnitudes[1] == pytest.approx((1.0 * 24**2 + 0.5 * 49**2) / 2)  # mse: the loss itself
