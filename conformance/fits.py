"""The fits of the case's objective, computed once and exactly where it is cheap:

- `least_squares`: the least-squares solution of the case's data. Small problems are solved
  exactly, in rational arithmetic on the float64 data, and rounded once: the reference then does
  not depend on the installed scipy and LAPACK (scipy's SVD solver gave NIST Wampler5 7.2 digits
  in one environment and 6.2 in another; the exact solution gives 15.0 in any). Larger problems
  go to scipy, with the columns of the design scaled to unit norm first.
- `ridge`: with coupled weight decay (SGD's `weight_decay`), the minimiser of the objective
  whose gradient the training follows: the case's loss plus the decay's penalty, bias included.
- `huber_fit`: with the Huber loss, scipy's Huber fit of the same objective, made exact.
- `weighted_least_squares`, `logistic_fit`: with sample weights; for `bce`, the maximum-likelihood
  fit, or NoFiniteFit when the classes are separable.
- `lre`: digits of agreement (log relative error) against certified values.
"""

from __future__ import annotations

import operator
from fractions import Fraction

import numpy as np
import scipy.linalg
import scipy.optimize
import scipy.special

from conformance.model_loss import predict
from conformance.problem import Problem

LRE_CAP = 15.0  # lre reports at most this many digits (an exact agreement would be infinite)

TALL_ROWS = 100_000  # from here on, well-conditioned problems are solved via the Gram matrix
GRAM_CONDITION_LIMIT = 1e8  # of the column-scaled Gram matrix, i.e. 1e4 for the scaled design


EXACT_WORK_LIMIT = 50_000  # rows x parameters^2 up to which least squares is solved exactly (Filip: 36 ms)


def least_squares_method(rows: int, parameters: int) -> str:
    """How `least_squares` solves a problem of this size, as the report names the reference."""
    return "exact least squares" if rows * parameters**2 <= EXACT_WORK_LIMIT else "scipy least squares"


def least_squares(x: np.ndarray, y: np.ndarray, has_bias: bool) -> np.ndarray:
    """[weights..., bias] minimising ||X w + b - y||.

    Small problems are solved exactly (`exact_least_squares`). Larger ones go through
    scipy's SVD solver on unit-norm columns. Tall,
    well-conditioned ones are solved from the Gram matrix with one step of iterative refinement:
    no copy of the data, two passes over it, and agreement with the SVD solution to ~1e-13
    (tests/test_reference.py), where the SVD path costs more than training one epoch.
    """
    if least_squares_method(len(y), x.shape[1] + has_bias) == "exact least squares":
        solution = exact_least_squares(x, y, has_bias)
        if solution is not None:
            return solution
    if len(y) >= TALL_ROWS:
        solution = _tall_least_squares(x, y, has_bias)
        if solution is not None:
            return solution
    design = np.empty((len(y), x.shape[1] + has_bias))  # one working copy, scaled in place
    design[:, : x.shape[1]] = x
    if has_bias:
        design[:, -1] = 1.0
    norms = np.linalg.norm(design, axis=0)
    norms[norms == 0] = 1.0
    design /= norms
    solution, *_ = scipy.linalg.lstsq(design, y, overwrite_a=True, check_finite=False)
    return solution / norms


def exact_least_squares(x: np.ndarray, y: np.ndarray, has_bias: bool, row_weights: np.ndarray | None = None,
                        penalty: float = 0.0) -> np.ndarray | None:
    """The exact minimiser for the float64 data, rounded once to float64; None if rank-deficient.

    Minimises sum_i c_i (x_i b - y_i)^2 + penalty * |b|^2 (c_i = 1 without row weights; the
    bias is part of b). Every float64 is a dyadic rational, so the normal equations
    (X^T C X + penalty I) b = X^T C y can be formed and solved by Gaussian elimination in
    `Fraction`s without any rounding. Rank-deficient data has no unique solution; the caller
    then takes scipy's minimum-norm one.
    """
    columns = [[Fraction(float(value)) for value in column] for column in np.asarray(x, dtype=np.float64).T]
    if has_bias:
        columns.append([Fraction(1)] * len(y))
    target = [Fraction(float(value)) for value in y]
    if row_weights is not None:
        weights = [Fraction(float(value)) for value in row_weights]
        weighted = [list(map(operator.mul, column, weights)) for column in columns]
    else:
        weighted = columns
    size = len(columns)
    gram = [[sum(map(operator.mul, weighted[i], columns[j]), Fraction(0)) for j in range(size)] for i in range(size)]
    for index in range(size):
        gram[index][index] += Fraction(float(penalty))
    right = [sum(map(operator.mul, column, target), Fraction(0)) for column in weighted]
    for col in range(size):
        pivot = next((row for row in range(col, size) if gram[row][col] != 0), None)
        if pivot is None:
            return None
        gram[col], gram[pivot], right[col], right[pivot] = gram[pivot], gram[col], right[pivot], right[col]
        for row in range(col + 1, size):
            factor = gram[row][col] / gram[col][col]
            if factor:
                gram[row] = [a - factor * b for a, b in zip(gram[row], gram[col])]
                right[row] -= factor * right[col]
    solution = [Fraction(0)] * size
    for col in reversed(range(size)):
        known = sum((gram[col][k] * solution[k] for k in range(col + 1, size)), Fraction(0))
        solution[col] = (right[col] - known) / gram[col][col]
    return np.array([float(value) for value in solution])


def ridge(problem: Problem) -> np.ndarray:
    """[weights..., bias] where the training's averaged update vanishes under coupled weight decay.

    Each step adds weight_decay * theta to one batch's gradient, so an epoch's steps sum to
    sum_b grad(loss_b) + B * weight_decay * theta (B batches). With the case's reduction a
    sample's squared error enters its batch's loss with weight c_i: 1 for `sum`; for `mean`,
    1/m over its batch's size m, or B/n on average when batches are reshuffled every epoch. The
    reference is the minimiser of sum_i c_i r_i^2 + (B * weight_decay / 2) |theta|^2, on the
    features as trained (after standardization), in float64.
    """
    x, y = problem.x.astype(np.float64), problem.y.astype(np.float64)
    weights, penalty = decay_objective(problem)
    if least_squares_method(problem.n, problem.features + problem.has_bias) == "exact least squares":
        solution = exact_least_squares(x, y, problem.has_bias, weights, penalty)
        if solution is not None:
            return solution
    design = np.hstack([x, np.ones((problem.n, 1))]) if problem.has_bias else x
    gram = design.T @ (design * weights[:, None]) + penalty * np.eye(design.shape[1])
    return scipy.linalg.solve(gram, design.T @ (weights * y), assume_a="pos")


def decay_objective(problem: Problem) -> tuple[np.ndarray, float]:
    """Under coupled weight decay: each sample's weight c_i in the objective the training follows,
    and the penalty on |theta|^2 (see `ridge`)."""
    batches = problem.optimizer_steps_per_epoch  # decay is added once per optimizer step
    step_size = problem.batch_size * problem.accumulate  # the samples of one optimizer step
    if problem.reduction == "sum":
        weights = np.ones(problem.n)
    elif problem.orders is None:
        weights = np.empty(problem.n)
        for start in range(0, problem.n, step_size):
            stop = min(start + step_size, problem.n)
            weights[start:stop] = 1.0 / (stop - start)
    else:
        weights = np.full(problem.n, batches / problem.n)
    if problem.sample_weight is not None:
        weights = weights * problem.sample_weight.astype(np.float64)
    return weights, batches * problem.optimizer.settings["weight_decay"] / 2


class NoFiniteFit(ValueError):
    """The case's objective has no finite minimiser (separable classes for `bce`)."""


def weighted_least_squares(x: np.ndarray, y: np.ndarray, has_bias: bool, weights: np.ndarray) -> np.ndarray:
    """[weights..., bias] minimising sum_i w_i r_i^2: exact for small data, else least squares
    on rows scaled by sqrt(w_i) (the intercept column scaled with them)."""
    if least_squares_method(len(y), x.shape[1] + has_bias) == "exact least squares":
        solution = exact_least_squares(x, y, has_bias, weights)
        if solution is not None:
            return solution
    design = np.hstack([x, np.ones((len(y), 1))]) if has_bias else x
    root = np.sqrt(weights)
    return least_squares(design * root[:, None], y * root, False)


def logistic_fit(x: np.ndarray, y: np.ndarray, has_bias: bool, weights: np.ndarray | None = None,
                 penalty: float = 0.0) -> np.ndarray:
    """[weights..., bias] maximising the likelihood of logistic regression: minimising
    sum_i w_i (softplus(z_i) - y_i z_i) + penalty |theta|^2, z = x w + b, in float64.

    scipy's trust-region Newton method with the exact gradient and Hessian, then Newton steps
    until the gradient is at most 1e-10 of its size at zero. Without a penalty, separable
    classes have no finite optimum: NoFiniteFit, found by a linear program (`separable`).
    """
    design = np.hstack([x, np.ones((len(y), 1))]) if has_bias else x
    weights = np.ones(len(y)) if weights is None else weights
    if penalty == 0 and separable(design, y, weights):
        raise NoFiniteFit("linearly separable: no finite maximum-likelihood fit (a linear program found "
                          "parameters that put every weighted sample on its label's side with a margin)")
    identity = np.eye(design.shape[1])

    def objective(theta: np.ndarray) -> float:
        z = design @ theta
        return float(weights @ (np.logaddexp(0.0, z) - y * z) + penalty * theta @ theta)

    def gradient(theta: np.ndarray) -> np.ndarray:
        return design.T @ (weights * (scipy.special.expit(design @ theta) - y)) + 2 * penalty * theta

    def hessian(theta: np.ndarray) -> np.ndarray:
        p = scipy.special.expit(design @ theta)
        return design.T @ (design * (weights * p * (1 - p))[:, None]) + 2 * penalty * identity

    start = np.zeros(design.shape[1])
    theta = scipy.optimize.minimize(objective, start, jac=gradient, hess=hessian, method="trust-exact",
                                    options={"gtol": 1e-13, "maxiter": 1000}).x
    for _ in range(20):
        step = np.linalg.lstsq(hessian(theta), gradient(theta), rcond=None)[0]
        theta = theta - step
        if np.abs(step).max() <= 1e-16 * max(1.0, np.abs(theta).max()):
            break
    scale = max(1.0, float(np.abs(gradient(start)).max()))
    if not np.abs(gradient(theta)).max() <= 1e-10 * scale:
        raise NoFiniteFit(f"no maximum-likelihood fit found: the gradient is still "
                          f"{np.abs(gradient(theta)).max():.1e} (the classes may be quasi-separable)")
    return theta


def separable(design: np.ndarray, y: np.ndarray, weights: np.ndarray) -> bool:
    """Whether some parameters put every sample with weight > 0 strictly on its label's side:
    z_i >= 1 for y_i = 1 and z_i <= -1 for y_i = 0 (scaling makes any strict separation one
    with margin 1). A label strictly between 0 and 1 pulls both ways: never separable."""
    used = weights > 0
    labels = y[used]
    if np.any((labels > 0) & (labels < 1)):
        return False
    signs = np.where(labels == 1, -1.0, 1.0)  # -z_i <= -1 for positives, z_i <= -1 for negatives
    found = scipy.optimize.linprog(np.zeros(design.shape[1]), A_ub=signs[:, None] * design[used],
                                   b_ub=-np.ones(used.sum()), bounds=[(None, None)] * design.shape[1],
                                   method="highs")
    return found.status == 0


def huber_fit(x: np.ndarray, y: np.ndarray, has_bias: bool, delta: float, weights: np.ndarray | None = None,
              penalty: float = 0.0) -> np.ndarray:
    """[weights..., bias] minimising sum_i c_i huber_delta(r_i) + penalty |theta|^2 (c_i = 1 unless
    given), in float64.

    scipy's `least_squares(loss="huber", f_scale=delta)` minimises exactly sum_i huber_delta(r_i)
    (its cost is 0.5 C^2 rho(f^2 / C^2) per residual); its solution then fixes which residuals
    are inside delta, and the objective is quadratic given those: one linear solve gives the
    exact minimiser, repeated until the sets no longer change (they rarely move at all).
    """
    design = np.hstack([x, np.ones((len(y), 1))]) if has_bias else x
    weights = np.ones(len(y)) if weights is None else weights
    start = scipy.optimize.least_squares(lambda theta: design @ theta - y, np.zeros(design.shape[1]),
                                         loss="huber", f_scale=delta, method="trf", xtol=1e-15, ftol=1e-15,
                                         gtol=1e-15, max_nfev=10_000).x
    theta, seen = start, []
    for _ in range(50):
        residual = design @ theta - y
        inside = np.abs(residual) <= delta
        outside_pull = delta * (design[~inside].T @ (weights[~inside] * np.sign(residual[~inside])))
        gram = design[inside].T @ (design[inside] * weights[inside, None]) + 2 * penalty * np.eye(design.shape[1])
        try:
            solution = np.linalg.solve(gram, design[inside].T @ (weights[inside] * y[inside]) - outside_pull)
        except np.linalg.LinAlgError:  # too few residuals inside delta to fix the parameters
            return theta
        if np.array_equal(np.abs(design @ solution - y) <= delta, inside):
            return solution
        if any(np.array_equal(inside, earlier) for earlier in seen):
            break  # the sets cycle: keep scipy's solution
        seen.append(inside)
        theta = solution
    return start


def _tall_least_squares(x: np.ndarray, y: np.ndarray, has_bias: bool) -> np.ndarray | None:
    """Normal equations on unit-norm columns plus one refinement step; None if ill-conditioned."""

    def transposed_times(vector: np.ndarray) -> np.ndarray:  # X^T v for the design [x, 1]
        return np.append(x.T @ vector, vector.sum()) if has_bias else x.T @ vector

    gram = x.T @ x
    if has_bias:
        sums = x.sum(axis=0)
        gram = np.block([[gram, sums[:, None]], [sums[None, :], np.array([[float(len(y))]])]])
    norms = np.sqrt(np.diag(gram))
    norms[norms == 0] = 1.0
    scaled = gram / np.outer(norms, norms)
    if not np.isfinite(scaled).all() or np.linalg.cond(scaled) > GRAM_CONDITION_LIMIT:
        return None
    factor = scipy.linalg.cho_factor(scaled)
    solution = scipy.linalg.cho_solve(factor, transposed_times(y) / norms) / norms
    residual = y - predict(solution, x, has_bias)
    return solution + scipy.linalg.cho_solve(factor, transposed_times(residual) / norms) / norms


def lre(estimate: np.ndarray, certified: np.ndarray) -> np.ndarray:
    """Significant digits of agreement per coefficient, capped at LRE_CAP."""
    estimate = np.asarray(estimate, dtype=np.float64)
    certified = np.asarray(certified, dtype=np.float64)
    error = np.abs(estimate - certified)
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(certified != 0, error / np.abs(certified), error)
        digits = -np.log10(relative)
    digits = np.where(np.isnan(digits), 0.0, digits)
    return np.clip(digits, 0.0, LRE_CAP)
