"""The v1.2 model with hidden layers, in float64 NumPy: the parameter layout every backend and
the report share, the initialisers the harness draws from, and the forward and backward pass
of the replay.

Layout: the parameters of a model are one flat vector, layer by layer, each layer's kernel
(inputs, units) in row-major order and then its bias (units,): `hidden1.kernel[i,j]`,
`hidden1.bias[j]`, ..., `output.kernel[i]`, `output.bias`. Without hidden layers this is the v1
vector [weights..., bias], and the names stay the v1 ones (`weights[i]`, `bias`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import scipy.special

HE_TRUNCATION = 0.87962566103423978  # std of a unit normal truncated to [-2, 2] (Keras's constant)


@dataclass(frozen=True)
class Layer:
    """One dense layer: kernel (inputs, units), an optional bias, then the activation."""

    name: str
    inputs: int
    units: int
    activation: str = "linear"
    settings: dict[str, Any] | None = None  # the activation's (gelu's approximate, ...)
    bias: bool = True

    @property
    def size(self) -> int:
        return self.inputs * self.units + (self.units if self.bias else 0)


def layers(features: int, hidden: list[dict[str, Any]] | None, has_bias: bool) -> list[Layer]:
    """The model's layers, the output layer (one unit, linear) last; `hidden` as Problem keeps it."""
    found, inputs = [], features
    for index, layer in enumerate(hidden or [], start=1):
        found.append(Layer(f"hidden{index}", inputs, layer["units"], layer["activation"], layer["settings"], has_bias))
        inputs = layer["units"]
    return found + [Layer("output", inputs, 1, bias=has_bias)]


def with_switches(model: list[Layer], switches: frozenset[str]) -> list[Layer]:
    """The layers as a framework computes their activations (conformance/formulas.yaml):
    `activation_constants_in_float32`, TensorFlow's float32 GELU constants and LeakyReLU slope;
    `softplus_threshold`, torch's Softplus returning its input above 20;
    `gelu_terms_in_compute_dtype` (both forms) and `gelu_tanh_terms_in_compute_dtype` (the tanh
    form): under mixed precision, GELU's 1 + t rounded to the compute dtype (`_gelu_terms`)."""
    def settings_of(layer: Layer) -> dict[str, Any] | None:
        settings = dict(layer.settings or {})
        if "activation_constants_in_float32" in switches:
            if layer.activation == "leaky_relu":
                settings["negative_slope"] = float(np.float32(settings["negative_slope"]))
            if layer.activation == "gelu":  # TensorFlow < 2.16 divides by a float32 sqrt(2), later ones
                divides = "gelu_divides_by_float32_root_2" in switches  # multiply by a float32 1 / sqrt(2)
                settings["float32_constants"] = "divide" if divides else True
        if layer.activation == "gelu" and ("gelu_terms_in_compute_dtype" in switches or (
                "gelu_tanh_terms_in_compute_dtype" in switches and settings.get("approximate"))):
            settings["terms_in_compute_dtype"] = True  # 1 + t rounded to the compute dtype (_gelu_terms)
        if "softplus_threshold" in switches and layer.activation == "softplus":
            settings["threshold"] = SOFTPLUS_THRESHOLD
        return settings or layer.settings

    return [replace(layer, settings=settings_of(layer)) for layer in model]


SOFTPLUS_THRESHOLD = 20.0  # torch.nn.Softplus(beta=1, threshold=20)


def parameter_names(model: list[Layer]) -> list[str]:
    """Every parameter's name, in layout order (the v1 names for the linear model)."""
    if len(model) == 1:
        return [f"weights[{index}]" for index in range(model[0].inputs)] + (["bias"] if model[0].bias else [])
    names = []
    for layer in model:
        if layer.units == 1:
            names += [f"{layer.name}.kernel[{i}]" for i in range(layer.inputs)]
        else:
            names += [f"{layer.name}.kernel[{i},{j}]" for i in range(layer.inputs) for j in range(layer.units)]
        if layer.bias:
            names += [f"{layer.name}.bias"] if layer.units == 1 else \
                [f"{layer.name}.bias[{j}]" for j in range(layer.units)]
    return names


def blocks(model: list[Layer]) -> list[slice]:
    """Where each parameter tensor (a kernel, a bias) lies in the flat vector, in order."""
    found, start = [], 0
    for layer in model:
        for size in (layer.inputs * layer.units, layer.units if layer.bias else 0):
            if size:
                found.append(slice(start, start + size))
                start += size
    return found


def split(params: np.ndarray, model: list[Layer]) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(kernel (inputs, units), bias (units,) or None) of each layer, as views of `params`."""
    found, start = [], 0
    for layer in model:
        kernel = params[start:start + layer.inputs * layer.units].reshape(layer.inputs, layer.units)
        start += layer.inputs * layer.units
        bias = None
        if layer.bias:
            bias, start = params[start:start + layer.units], start + layer.units
        found.append((kernel, bias))
    return found


def initial(kind: str, settings: Any, model: list[Layer]) -> np.ndarray:
    """The flat initial parameters of an init other than `constant` (problem.py handles that).

    `zeros`; `normal` / `uniform`: one generator, every parameter drawn in layout order (the v1
    draw for the linear model); `glorot_uniform`: each kernel U(-l, l), l = sqrt(6 / (inputs +
    units)); `he_normal`: each kernel normal with std sqrt(2 / inputs) / 0.8796, redrawn
    outside two of those std (Keras's truncated form); both with zero biases and one generator
    for all layers, kernels drawn in layout order.
    """
    count = sum(layer.size for layer in model)
    if kind == "zeros":
        return np.zeros(count)
    rng = np.random.default_rng(settings.seed)
    if kind == "normal":
        return rng.normal(settings.mean, settings.std, size=count)
    if kind == "uniform":
        return rng.uniform(settings.low, settings.high, size=count)
    params = np.zeros(count)
    for (kernel, _), layer in zip(split(params, model), model):
        if kind == "glorot_uniform":
            limit = math.sqrt(6.0 / (layer.inputs + layer.units))
            kernel[...] = rng.uniform(-limit, limit, size=kernel.shape)
        else:
            kernel[...] = _truncated_normal(rng, math.sqrt(2.0 / layer.inputs) / HE_TRUNCATION, kernel.shape)
    return params


def _truncated_normal(rng: np.random.Generator, std: float, shape: tuple[int, ...]) -> np.ndarray:
    values = rng.normal(0.0, std, size=shape)
    outside = np.abs(values) > 2 * std
    while outside.any():
        values[outside] = rng.normal(0.0, std, size=int(outside.sum()))
        outside = np.abs(values) > 2 * std
    return values


def activate(name: str, settings: dict[str, Any] | None, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The activation and its derivative at z, in float64, exactly as the case format defines
    them (no framework's shortcuts: softplus is log(1 + e^z) everywhere; relu'(0) = 0)."""
    if name == "linear":
        return z, np.ones_like(z)
    if name == "relu":
        return np.maximum(z, 0.0), (z > 0).astype(z.dtype)
    if name == "tanh":
        t = np.tanh(z)
        return t, 1.0 - t * t
    if name == "sigmoid":
        s = scipy.special.expit(z)
        return s, s * (1.0 - s)
    if name == "softplus":
        value, slope = np.logaddexp(0.0, z), scipy.special.expit(z)
        if settings and "threshold" in settings:  # torch's: the input itself above it (switch softplus_threshold)
            above = z > settings["threshold"]
            value, slope = np.where(above, z, value), np.where(above, 1.0, slope)
        return value, slope
    if name == "silu":
        s = scipy.special.expit(z)
        return z * s, s * (1.0 + z * (1.0 - s))
    if name == "leaky_relu":
        slope = settings["negative_slope"]
        return np.where(z > 0, z, slope * z), np.where(z > 0, 1.0, slope)
    if name == "elu":
        alpha = settings["alpha"]
        grown = alpha * np.expm1(np.minimum(z, 0.0))
        return np.where(z > 0, z, grown), np.where(z > 0, 1.0, grown + alpha)
    if name == "gelu":
        in_float32 = settings.get("float32_constants", False)  # TensorFlow's (activation_constants_in_float32)
        if settings["approximate"]:
            k, c = math.sqrt(2.0 / math.pi), float(np.float32(0.044715)) if in_float32 else 0.044715
            t = np.tanh(k * (z + c * z**3))
            return 0.5 * z * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * k * (1.0 + 3 * c * z * z)
        s = 1.0 / float(np.float32(math.sqrt(2.0))) if in_float32 == "divide" else \
            float(np.float32(1.0 / math.sqrt(2.0))) if in_float32 else 1.0 / math.sqrt(2.0)  # z * s = z / sqrt(2)
        cdf = 0.5 * scipy.special.erfc(-z * s)
        return z * cdf, cdf + z * s * np.exp(-(z * s) ** 2) / math.sqrt(math.pi)
    raise ValueError(f"unknown activation {name!r}")


def forward(params: np.ndarray, x: np.ndarray, model: list[Layer],
            offsets: list[np.ndarray] | None = None,
            rd: Rounder | None = None) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """The model's output (m,) and, per layer, (its input, the activation's derivative).

    `offsets`: per hidden layer, (m, units) relative perturbations delta of its activations (the
    replay's model of rounding: a value times 1 + delta, kept as delta because 1 + delta rounds
    to 1 in float64), and under mixed precision of its pre-activations by the same delta times
    |a W| + |b|, the terms of the bias add in the compute dtype (a sum that cancels
    near a ReLU's kink is rounded relative to its terms, and can cross it: fuzz-61877-107);
    None for the exact pass. `rd`: mixed precision's rounding to
    the compute dtype (a float64 array to the nearest compute-dtype value, as float64): each
    layer's input, kernel and bias are rounded, then the matmul's result, then the bias add's,
    then the activation's (a Keras policy's Dense: `matmul`, `add`, activation, each in the
    compute dtype; JAX with cast parameters alike).
    """
    rd = rd or _exact
    tape, a = [], rd(x)
    parts = split(params, model)
    for index, (layer, (kernel, bias)) in enumerate(zip(model[:-1], parts[:-1])):
        product, z = _dense(rd, a, kernel, bias)
        if offsets is not None and rd is not _exact and bias is not None:
            # the bias add in the compute dtype (two roundings, or one where the framework fuses
            # it into the float32 matmul) is a sum rounded relative to its terms: it can cross a kink
            z = z + offsets[index] * (np.abs(product) + np.abs(rd(bias)))
        value, slope = activate(layer.activation, layer.settings, z)
        value = rd(value)
        if rd is not _exact:
            slope = _slope_from_output(layer.activation, value, slope)
        if offsets is not None and layer.activation == "gelu" and (
                rd is _exact or (layer.settings or {}).get("terms_in_compute_dtype")):
            value_terms, slope_terms = _gelu_terms(layer.settings, z)
            value, slope = value + offsets[index] * value_terms, slope + offsets[index] * slope_terms
        elif offsets is not None:
            value, slope = value * (1.0 + offsets[index]), slope * (1.0 + offsets[index])
        tape.append((a, slope))
        a = value
    kernel, bias = parts[-1]
    output = _dense(rd, a, kernel, bias)[1][:, 0]
    return output, tape + [(a, np.ones((len(a), 1)))]


Rounder = Callable[[np.ndarray], np.ndarray]


def _gelu_terms(settings: dict[str, Any] | None, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What bounds the rounding of GELU as the frameworks write it, 0.5 z (1 + t) with t =
    erf(z / sqrt 2) or tanh(...) rounded first: the sum of its terms' magnitudes, 0.5 |z| (1 + |t|),
    not |GELU(z)|; 1 + t cancels for negative z (bfloat16 -3.5: TensorFlow, XLA and JAX's tanh
    form give -0.0 for -6.2e-4; torch's float32 `x * 0.5 * (1 + erf(x * M_SQRT1_2))` alike in
    float32). The derivative 0.5 (1 + t) + 0.5 z t' cancels the same way."""
    if (settings or {}).get("approximate"):
        k, c = math.sqrt(2.0 / math.pi), 0.044715
        t = np.tanh(k * (z + c * z**3))
        derivative = (1.0 - t * t) * k * (1.0 + 3 * c * z * z)
    else:
        t = scipy.special.erf(z / math.sqrt(2.0))
        derivative = math.sqrt(2.0 / math.pi) * np.exp(-0.5 * z * z)
    return 0.5 * np.abs(z) * (1.0 + np.abs(t)), 0.5 * (1.0 + np.abs(t)) + 0.5 * np.abs(z * derivative)


def _exact(values: np.ndarray) -> np.ndarray:
    return values


def _slope_from_output(name: str, value: np.ndarray, slope: np.ndarray) -> np.ndarray:
    """tanh's and sigmoid's derivatives as every framework's backward pass computes them: from
    the (rounded) output, 1 - a^2 and a (1 - a) (TensorFlow's TanhGrad, torch's tanh_backward,
    JAX's JVP all read the result, not the input)."""
    if name == "tanh":
        return 1.0 - value * value
    if name == "sigmoid":
        return value * (1.0 - value)
    return slope


def _dense(rd: Rounder, a: np.ndarray, kernel: np.ndarray,
           bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """A layer's matmul a W (rounded) and its pre-activation a W + b (rounded again)."""
    product = rd(a @ rd(kernel))
    return product, product if bias is None else rd(product + rd(bias))


def backward(params: np.ndarray, model: list[Layer], tape: list[tuple[np.ndarray, np.ndarray]],
             output_slope: np.ndarray, rd: Rounder | None = None) -> np.ndarray:
    """The gradient of sum_i output_slope_i * output_i with respect to the flat parameters.

    With `rd` (mixed precision) every backward value is in the compute dtype, as the frameworks'
    backward passes of compute-dtype ops produce it: the output's gradient, each activation's
    chain-rule product, each kernel's and bias's gradient, and the gradient passed down.
    """
    rd = rd or _exact
    gradient = np.empty_like(params)
    grads = split(gradient, model)
    parts = split(params, model)
    delta = rd(output_slope[:, None])  # d loss / d pre-activation of the current layer, (m, units)
    for (a, slope), (kernel, _), (grad_kernel, grad_bias) in zip(reversed(tape), reversed(parts), reversed(grads)):
        delta = rd(delta * slope)
        grad_kernel[...] = rd(a.T @ delta)
        if grad_bias is not None:
            grad_bias[...] = rd(delta.sum(axis=0))
        delta = rd(delta @ rd(kernel).T)
    return gradient
