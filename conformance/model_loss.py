"""The model's loss, gradient and predictions in float64 (the replay's and the fits'): the linear
model of v1 in closed form, a network through `network.forward`; the magnitudes of the sums a
float32 training rounds (for the replay's rounding model).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.linalg
import scipy.optimize
import scipy.special

from conformance import network


def loss_and_gradient(params: np.ndarray, x: np.ndarray, y: np.ndarray, has_bias: bool, reduction: str,
                      loss: str = "mse", delta: float = 1.0,
                      weights: np.ndarray | None = None,
                      output_offsets: np.ndarray | None = None,
                      model: list[network.Layer] | None = None,
                      hidden_offsets: list[np.ndarray] | None = None,
                      rd: Callable[[np.ndarray], np.ndarray] | None = None,
                      loss_scale: float = 1.0, magnitudes: list[np.ndarray] | None = None,
                      weights_in_float32_over: int | None = None,
                      probability_offsets: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """One batch's loss and its gradient with respect to [weights..., bias], or with hidden
    layers (`model`) to every parameter in network.py's layout (z is then the network's output).

    Per sample, with z = x w + b and r = z - y: `mse` r^2; `huber` 0.5 r^2 if |r| <= delta,
    else delta * (|r| - delta / 2); `bce` -(y log p + (1 - y) log(1 - p)) with p = sigmoid(z),
    computed as softplus(z) - y z (exact math: no framework's clipping). Sample weights
    multiply each sample's loss; `mean` divides the batch's sum by its size (not by the sum of
    the weights: Keras's "sum over batch size").

    `rd` (mixed precision): the forward and backward passes round to the compute dtype
    (network.forward/backward); the output's gradient is multiplied by `loss_scale` before it is
    rounded and the gradient divided by it after, so float16's overflow shows as a non-finite
    gradient.

    `weights_in_float32_over` (tf.nn.compute_average_loss with sample weights, `mean`): each
    sample's loss and weight are cast to float32 and multiplied there, so the loss sums
    float32(float32(loss_i) float32(w_i)) and the gradient of loss_i is float32(float32(1 / n) w_i),
    n this argument: the global batch's size, which each replica's shard divides by (in a shard of
    13 of 25, float32(1 / 25) is not float32(1 / 13) 13 / 25: fuzz-70211-80).

    `magnitudes`, when given, receives the sum of the magnitudes of the terms each gradient
    component sums (the same backward pass on absolute values): what bounds the rounding error
    of that sum, whatever the sum itself is (a gradient that cancels to 0 still has one); then
    the same for the loss. bce's loss cancels: torch computes (1 - y) z - log_sigmoid(z)
    (aten/src/ATen/native/Loss.cpp binary_cross_entropy_with_logits), TensorFlow
    max(z, 0) - z y + log1p(exp(-|z|)), the probability path -log(p) with p rounded near 1, so
    a saturated sample's loss (1e-21 in float64, 1e-249 in the replay of a float32 run) is
    rounding alone: its error is u times 2 |z| + 1, not u times the loss (fuzz-70211-0: torch
    0 in float64 where the exact loss is 3.3e-21).

    `probability_offsets` (`bce`, the replay's model of rounding): the frameworks' gradient of the
    output is p - y with p = sigmoid(z) rounded first (torch's BCELoss and BCEWithLogitsLoss
    backward, `sigmoid(z) - y`; TensorFlow's logits loss, whose gradient adds 1[z > 0] - y and
    -sigmoid(-z) in the dtype, and the probability path's clipped p), so its error is u p,
    not u |p - y|: a saturated sample's gradient (|p - y| below u) is rounding alone
    (fuzz-90417-187: keras, the loop and torch all 3.3e-6 from the exact replay after 34 epochs
    of Adam on separable data, each within 2.4e-7 of a float32 replay of p - y).
    """
    layered = model is not None and (len(model) > 1 or rd is not None)
    if layered:
        output, tape = network.forward(params, x, model, hidden_offsets, rd)
    else:
        output = predict(params, x, has_bias)
    if output_offsets is not None:  # the replay's model of rounding (`replay(rounding=...)`)
        if layered:
            output = output * (1.0 + output_offsets)
        else:  # x w + b rounds by u times the sum of its terms' magnitudes, not of its value
            terms = np.abs(x) @ np.abs(params[:x.shape[1]]) + (abs(params[-1]) if has_bias else 0.0)
            output = output + output_offsets * terms
    residual = output - y
    if loss == "bce":
        per_sample = np.logaddexp(0.0, output) - y * output
        terms = 2.0 * np.abs(output) + 1.0  # softplus(z) <= |z| + log 2, |y z| <= |z|: what the sum cancels
        slope = scipy.special.expit(output) - y
        if probability_offsets is not None:
            slope = slope + probability_offsets * scipy.special.expit(output)
    elif loss == "huber":
        inside = np.abs(residual) <= delta
        per_sample = np.where(inside, 0.5 * residual**2, delta * (np.abs(residual) - delta / 2))
        slope = np.where(inside, residual, delta * np.sign(residual))  # d loss_i / d prediction_i
    else:
        per_sample, slope = residual**2, 2.0 * residual
    if loss != "bce":
        terms = per_sample  # a square or a Huber branch: no cancellation, its rounding is relative
    scale = 1.0 / len(y) if reduction == "mean" else 1.0
    if weights is not None and weights_in_float32_over and reduction == "mean":
        weights32 = weights.astype(np.float32)
        per_sample = (per_sample.astype(np.float32) * weights32).astype(np.float64)
        slope = (np.float32(1.0 / weights_in_float32_over) * weights32).astype(np.float64) \
            * weights_in_float32_over * slope
    elif weights is not None:
        per_sample, slope = weights * per_sample, weights * slope
    if magnitudes is not None:
        magnitudes.append(_term_magnitudes(params, x, has_bias, scale * np.abs(slope),
                                           tape if layered else None, model))
        magnitudes.append(scale * float(np.sum(terms if weights is None else np.abs(weights) * terms)))
    if layered:
        if output_offsets is not None:
            slope = slope * (1.0 + output_offsets)
        if rd is None:
            return float(per_sample.sum()) * scale, scale * network.backward(params, model, tape, slope)
        gradient = network.backward(params, model, tape, loss_scale * scale * slope, rd)
        return float(per_sample.sum()) * scale, gradient / loss_scale
    grad_w = scale * (x.T @ slope)
    grad = np.append(grad_w, scale * slope.sum()) if has_bias else grad_w
    return float(per_sample.sum()) * scale, grad


def _term_magnitudes(params: np.ndarray, x: np.ndarray, has_bias: bool, slope: np.ndarray,
                     tape: list[tuple[np.ndarray, np.ndarray]] | None, model: list[network.Layer] | None) -> np.ndarray:
    """Per gradient component, the sum of |term| over the samples (and units) it adds up."""
    if tape is None:
        magnitude = np.abs(x).T @ slope
        return np.append(magnitude, slope.sum()) if has_bias else magnitude
    absolute = [(np.abs(a), np.abs(s)) for a, s in tape]
    return network.backward(np.abs(params), model, absolute, slope)


def predict(params: np.ndarray, x: np.ndarray, has_bias: bool, model: list[network.Layer] | None = None,
            rd: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """The model's output z for each row of x (the network's, with hidden layers in `model`,
    rounded as mixed precision computes it with `rd`)."""
    if model is not None and (len(model) > 1 or rd is not None):
        return network.forward(params, x, model, rd=rd)[0]
    weights = params[: x.shape[1]]
    return x @ weights + (params[-1] if has_bias else 0.0)
