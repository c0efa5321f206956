"""Hidden layers (v1.2 `model.hidden`): the replay's forward and backward pass against finite
differences for every activation, the parameter layout and names, the initialisers, and the
refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special

from conformance import model_loss, network, reference
from conformance.prepare import prepare
from tests.test_schema import error_of, load_text

ACTIVATIONS = [("linear", None), ("relu", None), ("tanh", None), ("sigmoid", None), ("softplus", None),
               ("silu", None), ("gelu", {"approximate": False}), ("gelu", {"approximate": True}),
               ("leaky_relu", {"negative_slope": 0.1}), ("elu", {"alpha": 0.7})]


def two_layers(activation: str, settings: dict | None, has_bias: bool = True) -> list[network.Layer]:
    hidden = [{"units": 3, "activation": activation, "settings": settings},
              {"units": 2, "activation": "tanh", "settings": None}]
    return network.layers(2, hidden, has_bias)


@pytest.mark.parametrize(("activation", "settings"), ACTIVATIONS)
@pytest.mark.parametrize("loss", ["mse", "huber", "bce"])
def test_gradient_matches_central_differences(activation, settings, loss):
    rng = np.random.default_rng(3)
    model = two_layers(activation, settings)
    params = rng.normal(0, 0.8, size=sum(layer.size for layer in model))
    x, y = rng.normal(size=(7, 2)), (rng.random(7) > 0.5).astype(float) if loss == "bce" else rng.normal(size=7)

    def objective(theta: np.ndarray) -> float:
        return model_loss.loss_and_gradient(theta, x, y, True, "mean", loss, 0.5, model=model)[0]

    gradient = model_loss.loss_and_gradient(params, x, y, True, "mean", loss, 0.5, model=model)[1]
    step = 1e-6
    numeric = np.array([(objective(params + step * e) - objective(params - step * e)) / (2 * step)
                        for e in np.eye(params.size)])
    assert gradient == pytest.approx(numeric, rel=1e-6, abs=1e-8)


@pytest.mark.parametrize(("activation", "settings"), ACTIVATIONS)
def test_activation_values_follow_the_case_format(activation, settings):
    z = np.array([-30.0, -1.5, 0.0, 0.7, 25.0])
    value, _ = network.activate(activation, settings, z)
    exact = {
        "linear": z, "relu": np.maximum(z, 0), "tanh": np.tanh(z), "sigmoid": 1 / (1 + np.exp(-z)),
        "softplus": np.log1p(np.exp(z)), "silu": z / (1 + np.exp(-z)),
        "leaky_relu": np.where(z > 0, z, 0.1 * z), "elu": np.where(z > 0, z, 0.7 * (np.exp(z) - 1)),
    }
    if activation == "gelu":
        if settings["approximate"]:
            expected = 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
        else:
            expected = z * 0.5 * np.array([math.erfc(-v / math.sqrt(2)) for v in z])
    else:
        expected = exact[activation]
    assert value == pytest.approx(expected, rel=1e-14, abs=1e-300)
    # softplus is log(1 + e^z) everywhere, not torch's linear branch above 20
    if activation == "softplus":
        assert value[-1] != z[-1]


def test_relu_derivative_at_exactly_zero_is_zero():
    assert network.activate("relu", None, np.array([0.0]))[1][0] == 0.0


def test_layout_names_and_blocks():
    model = two_layers("relu", None)
    names = network.parameter_names(model)
    assert names[:8] == ["hidden1.kernel[0,0]", "hidden1.kernel[0,1]", "hidden1.kernel[0,2]", "hidden1.kernel[1,0]",
                         "hidden1.kernel[1,1]", "hidden1.kernel[1,2]", "hidden1.bias[0]", "hidden1.bias[1]"]
    assert names[-3:] == ["output.kernel[0]", "output.kernel[1]", "output.bias"]
    assert len(names) == sum(layer.size for layer in model) == 2 * 3 + 3 + 3 * 2 + 2 + 2 + 1
    assert [block.stop - block.start for block in network.blocks(model)] == [6, 3, 6, 2, 2, 1]
    linear = network.layers(3, None, True)
    assert network.parameter_names(linear) == ["weights[0]", "weights[1]", "weights[2]", "bias"]  # v1's names
    assert [len(network.parameter_names(two_layers("relu", None, has_bias=False)))] == [6 + 6 + 2]


def test_kernels_are_laid_out_inputs_by_units_row_major():
    model = two_layers("tanh", None)
    params = np.arange(sum(layer.size for layer in model), dtype=float)
    (kernel, bias), *_ = network.split(params, model)
    assert kernel.tolist() == [[0, 1, 2], [3, 4, 5]] and bias.tolist() == [6, 7, 8]
    # the output is sum_j a_j k_j: a transposed first kernel gives another function
    x = np.array([[1.0, -2.0]])
    small = params / 20  # tanh unsaturated
    transposed = small.copy()
    transposed[:6] = kernel.T.reshape(-1) / 20
    assert network.forward(small, x, model)[0] != pytest.approx(network.forward(transposed, x, model)[0], rel=1e-3)


def test_initialisers_follow_keras_formulas():
    model = network.layers(50, [{"units": 40, "activation": "relu", "settings": None}], True)

    class Seed:
        seed = 0

    glorot = network.split(network.initial("glorot_uniform", Seed, model), model)
    limit = math.sqrt(6 / 90)
    assert np.abs(glorot[0][0]).max() <= limit and np.abs(glorot[0][0]).max() > 0.95 * limit
    assert not glorot[0][1].any() and not glorot[1][1].any()  # zero biases
    he = network.split(network.initial("he_normal", Seed, model), model)[0][0]
    std = math.sqrt(2 / 50) / network.HE_TRUNCATION
    assert np.abs(he).max() <= 2 * std
    assert he.std() == pytest.approx(math.sqrt(2 / 50), rel=0.05)  # truncation restores the target std
    again = network.initial("he_normal", Seed, model)
    assert np.array_equal(again, network.initial("he_normal", Seed, model))  # reproducible by seed


HIDDEN = """\
dataset: {inline: {x: [[1, 2], [2, 1], [3, 0], [0, 1]], y: [1, 2, 3, 4]}}
model:
  hidden: [{units: 3, activation: tanh}]
  init: {uniform: {low: -0.5, high: 0.5, seed: 4}}
training: {epochs: 3, optimizer: {sgd: {learning_rate: 0.01}}, dtype: float64}
"""


def test_a_case_with_hidden_layers_prepares_in_the_layout(write_case):
    case = load_text(write_case, HIDDEN)
    assert case.spec.tolerance.lstsq is None  # no closed-form optimum: lstsq defaults to off
    prepared = prepare(case)
    problem = prepared.problem
    assert problem.parameter_count == 2 * 3 + 3 + 3 + 1 == len(prepared.parameter_names)
    drawn = np.random.default_rng(4).uniform(-0.5, 0.5, size=13)  # the v1 draw, in layout order
    assert np.array_equal(problem.initial_params(), drawn)
    assert problem.init_hidden[0]["kernel"].shape == (2, 3)
    trajectory = reference.replay(problem)
    assert trajectory.params.shape == (3, 13) and np.isfinite(trajectory.params).all()


@pytest.mark.parametrize(("change", "message"), [
    ("hidden: [{units: 0, activation: tanh}]", "model.hidden[0].units"),
    ("hidden: [{units: 2, activation: swish}]", "expected exactly one of: linear, relu"),
    ("hidden: [{units: 2, activation: {gelu: {}}}]", "approximate"),
    ("hidden: [{units: 2, activation: {leaky_relu: {negative_slope: 0.1, alpha: 1}}}]", "unknown key 'alpha'"),
    ("hidden: [{units: 2000, activation: relu}]", "expected at most 2,000"),
    ("hidden: [{units: 2, activation: relu}]\n  init: {constant: {weights: [1, 2]}}", "model.init.constant"),
])
def test_bad_hidden_layers_are_refused_with_the_field(write_case, change, message):
    text = HIDDEN.replace("hidden: [{units: 3, activation: tanh}]\n  init: {uniform: {low: -0.5, high: 0.5, seed: 4}}",
                          change)
    assert message in error_of(write_case, text)


def test_lstsq_and_certified_are_refused_with_hidden_layers(write_case):
    assert "no closed-form optimum" in error_of(write_case, HIDDEN + "tolerance: {lstsq: {rtol: 0.1}}\n")
    certified = HIDDEN + "certified: {weights: [1, 2], bias: 0, min_digits: 5}\n"
    assert "certified values are for the linear model" in error_of(write_case, certified)


def test_a_kernel_loaded_without_its_transpose_fails_parity(monkeypatch):
    """torch's `weight` is (units, inputs): loading the harness's (inputs, units) kernel by
    reshaping instead of transposing (the classic porting bug) trains another model."""
    pytest.importorskip("torch")
    from conformance.backends import torch as torch_backend
    from conformance.case import CaseFile, load
    from conformance.checks import make_run
    from tests.conftest import ROOT

    path = ROOT / "cases" / "hidden" / "tanh-one-layer-sgd-float64.yaml"
    assert make_run(load(CaseFile(path, path.parent)), [("torch", "cpu")]).check_parity("torch", "cpu").passed
    original = torch_backend.build_model

    def reshaped(torch, problem, device, dtype):
        model, linears = original(torch, problem, device, dtype)
        with torch.no_grad():
            for (layer, kernel, _), linear in zip(problem.initial_layers(), linears):
                linear.weight.copy_(torch.as_tensor(kernel.reshape(layer.units, layer.inputs)))
        return model, linears

    monkeypatch.setattr(torch_backend, "build_model", reshaped)
    outcome = make_run(load(CaseFile(path, path.parent)), [("torch", "cpu")]).check_parity("torch", "cpu")
    assert not outcome.passed and "more value(s) out of tolerance" in outcome.message  # another model throughout


def test_the_case_page_shows_the_parameters_farthest_from_the_replay():
    from conformance.report.writer import parameter_columns

    replay = [1.0] * 20
    results = [{"replay": replay, "params": replay[:3] + [1.5] + replay[4:]},
               {"replay": replay, "params": [None] + replay[1:17] + [1.1, 1.0, 1.0]}]
    shown = parameter_columns(results, 20, shown=3)
    assert shown == [0, 3, 17]  # a missing value (NaN) counts as farthest; layout order kept
    assert parameter_columns(results[:1], 2, shown=3) == [0, 1]  # a small model: all


def test_the_data_picture_draws_the_network():
    from conformance.report.plots import _model_values

    model = network.layers(1, [{"units": 2, "activation": "tanh", "settings": None}], True)
    params = [0.5, -1.0, 0.1, 0.2, 2.0, 1.0, 0.3]
    data = {"degree": 1, "has_bias": True, "network": {"hidden": [{"units": 2, "activation": "tanh", "settings": None}],
                                                        "features": 1, "mean": [1.0], "scale": [2.0]}}
    grid = [-1.0, 0.0, 3.0]
    expected = network.forward(np.asarray(params), (np.asarray(grid)[:, None] - 1.0) / 2.0, model)[0]
    assert _model_values(data, params, grid) == pytest.approx(expected.tolist())
    assert _model_values(data, params[:-1], grid) == [None, None, None]  # not this network's parameters


def test_the_case_page_summarises_each_parameter_tensor():
    from conformance.report.writer import tensor_summary

    names = ["hidden1.kernel[0,0]", "hidden1.kernel[0,1]", "hidden1.bias[0]", "hidden1.bias[1]", "output.kernel[0]",
             "output.kernel[1]", "output.bias"]
    replay = [2.0, 1.0, 0.0, 0.5, 1.0, -1.0, 0.25]
    results = [{"backend": "torch", "device": "cpu", "replay": replay,
                "params": [2.0, 1.2, 0.0, 0.5, 1.0, -1.0, 0.35]}]
    summary = tensor_summary(results, names)
    assert summary["tensors"] == ["hidden1.kernel", "hidden1.bias", "output.kernel", "output.bias"]
    assert summary["sizes"] == [2, 2, 2, 1]
    assert summary["rows"][0]["values"] == pytest.approx([0.1, 0.0, 0.0, 0.05])  # over the largest, 2.0


@pytest.mark.parametrize("approximate", [False, True])
def test_gelu_terms_bound_the_compute_dtype_rounding_of_one_plus_t(approximate):
    """GELU written 0.5 z (1 + t) with every op rounded to bfloat16 (tf.nn.gelu, XLA's tanh form)
    is off by far more than u |GELU(z)| for negative z, and within u times the terms' magnitudes."""
    import ml_dtypes

    def rd(values):
        return np.asarray(values, dtype=np.float64).astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)

    z = rd(np.linspace(-5.0, 2.0, 57))
    settings = {"approximate": approximate}
    exact, _ = network.activate("gelu", settings, z)
    if approximate:
        k, c = math.sqrt(2.0 / math.pi), 0.044715
        t = rd(np.tanh(rd(rd(k) * rd(z + rd(rd(c) * rd(z**3))))))
    else:
        t = rd(scipy.special.erf(rd(z / rd(math.sqrt(2.0)))))
    op_by_op = rd(rd(0.5 * z) * rd(1.0 + t))
    u = 2.0**-8
    value_terms, _ = network._gelu_terms(settings, z)
    assert (np.abs(op_by_op - exact) > 4 * u * np.abs(exact)).any()  # the relative model misses it
    assert (np.abs(op_by_op - exact) <= 4 * u * value_terms).all()  # three roundings and t's own


def test_under_mixed_precision_a_bias_add_that_cancels_can_cross_a_relu_kink():
    """The bias add's rounding in the compute dtype is of its terms |a W| + |b|, not of the sum:
    a pre-activation just above 0 can land below it (fuzz-61877-107: frameworks split 4 to 4)."""
    model = network.layers(1, [{"units": 1, "activation": "relu", "settings": None}], True)
    names = network.parameter_names(model)
    params = np.zeros(len(names))
    for name, value in {"hidden1.kernel[0]": 1.0, "hidden1.bias": -1.0, "output.kernel[0]": 1.0}.items():
        params[names.index(name)] = value
    rd = reference.rounder("float16")
    x = np.array([[1.001]])  # float16 1.0009765625: the pre-activation is 9.8e-4 after the add
    u = reference.UNIT_ROUNDOFF["float16"]
    _, exact_tape = network.forward(params, x, model, None, rd)
    _, moved_tape = network.forward(params, x, model, [np.full((1, 1), -u)], rd)
    assert exact_tape[0][1][0, 0] == 1.0 and moved_tape[0][1][0, 0] == 0.0
