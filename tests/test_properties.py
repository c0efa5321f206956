"""Property tests (Hypothesis): the loader, the replay's update rules and convergence, on
randomly drawn cases and problems rather than hand-picked ones."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conformance.case import CaseFile, load
from conformance.fits import least_squares
from conformance.model_loss import loss_and_gradient
from conformance.prepare import prepare
from conformance.problem import Optimizer, Problem
from conformance.reference import replay
from conformance.yamlio import dump_yaml, parse_yaml, read_yaml
from tests.conftest import examples

finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False)
rates = st.floats(min_value=1e-4, max_value=0.5)
fractions = st.floats(min_value=0.0, max_value=0.99)

OPTIMIZERS = {
    "sgd": st.fixed_dictionaries({"learning_rate": rates}, optional={"momentum": fractions}),
    "adam": st.fixed_dictionaries({"learning_rate": rates}, optional={
        "beta_1": fractions, "beta_2": fractions, "epsilon": st.floats(0, 1e-3), "amsgrad": st.booleans()}),
    "rmsprop": st.fixed_dictionaries({"learning_rate": rates}, optional={
        "rho": fractions, "epsilon": st.floats(0, 1e-3), "momentum": fractions, "centered": st.booleans()}),
    "adagrad": st.fixed_dictionaries({"learning_rate": rates}, optional={
        "initial_accumulator_value": st.floats(0, 1), "epsilon": st.floats(0, 1e-3)}),
}


@st.composite
def case_documents(draw):
    """A valid v1 case as the mapping a user would write."""
    n = draw(st.integers(2, 12))
    features = draw(st.integers(1, 3))
    x = draw(st.lists(st.lists(finite, min_size=features, max_size=features), min_size=n, max_size=n))
    name = draw(st.sampled_from(sorted(OPTIMIZERS)))
    training = {"epochs": draw(st.integers(1, 1000)), "optimizer": {name: draw(OPTIMIZERS[name])},
                "dtype": draw(st.sampled_from(["float32", "float64"]))}
    if draw(st.booleans()):
        training["batch_size"] = draw(st.integers(1, n))
    if draw(st.booleans()):
        training["shuffle"] = {"seed": draw(st.integers(0, 2**31))}
    return {"name": draw(st.from_regex(r"[A-Za-z0-9_.-]{1,20}", fullmatch=True)),
            "description": draw(st.text(max_size=40)),
            "dataset": {"inline": {"x": x, "y": draw(st.lists(finite, min_size=n, max_size=n))}},
            "training": training,
            "tolerance": {"parity": {"rtol": draw(st.floats(0, 1)), "atol": draw(st.floats(0, 1))}}}


@settings(max_examples=examples(60), suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=case_documents())
@example(document={"name": "n", "description": "0E0", "dataset": {"inline": {"x": [[1.0], [2.0]], "y": [1.0, 2.0]}},
                   "training": {"epochs": 1, "optimizer": {"sgd": {"learning_rate": 0.1}}, "dtype": "float32"},
                   "tolerance": {"parity": {"rtol": 0.0, "atol": 0.0}}})  # found by Hypothesis: read back as 0.0
def test_valid_cases_round_trip_through_the_loader(tmp_path_factory, document):
    path = tmp_path_factory.mktemp("cases") / "case.yaml"
    path.write_text(dump_yaml(document), encoding="utf-8")
    case = load(CaseFile(path, path.parent))
    spec = case.spec
    assert case.name == document["name"] and spec.description == document["description"]
    assert spec.dataset.inline.x == document["dataset"]["inline"]["x"]
    assert spec.dataset.inline.y == document["dataset"]["inline"]["y"]
    training = document["training"]
    assert spec.training.epochs == training["epochs"] and spec.training.dtype == training["dtype"]
    (name, given_settings), = training["optimizer"].items()
    resolved = prepare(case).problem.optimizer
    assert resolved.name == name
    assert {key: resolved.settings[key] for key in given_settings} == given_settings  # nothing rounded or lost
    assert spec.tolerance.parity.model_dump() == document["tolerance"]["parity"]


def small_problem(x, y, optimizer: Optimizer, epochs: int) -> Problem:
    return Problem("p", x, y, np.zeros(x.shape[1]), np.asarray(0.0), epochs, len(y), None, "mean", optimizer,
                   "float64")


def direct_steps(x, y, name: str, settings: dict, steps: int) -> np.ndarray:
    """Each optimizer's update written out once more, on the full-batch gradient.

    The gradient is the replay's own (`loss_and_gradient`, tested in test_reference.py), so that
    only the update rules are compared: some drawn settings are ill-conditioned (centered
    RMSprop with rho = 1e-10 subtracts two numbers equal to 1e-10 relative), and there a
    gradient grouped differently, one ulp apart, ends 5e-7 apart after two steps (found by
    Hypothesis in CI).
    """
    p = np.zeros(x.shape[1] + 1)
    m = v = v_max = a = b = 0.0
    s = settings
    accumulator = s.get("initial_accumulator_value", 0.0)
    for t in range(1, steps + 1):
        _, g = loss_and_gradient(p, x, y, has_bias=True, reduction="mean")
        if name == "adam":
            m = s["beta_1"] * m + (1 - s["beta_1"]) * g
            v = s["beta_2"] * v + (1 - s["beta_2"]) * g * g
            v_max = np.maximum(v_max, v)
            second = v_max if s["amsgrad"] else v
            p = p - s["learning_rate"] / (1 - s["beta_1"] ** t) * m / (
                np.sqrt(second) / np.sqrt(1 - s["beta_2"] ** t) + s["epsilon"])
        elif name == "rmsprop":
            v = s["rho"] * v + (1 - s["rho"]) * g * g
            a = s["rho"] * a + (1 - s["rho"]) * g
            d = g / (np.sqrt(v - a * a if s["centered"] else v) + s["epsilon"])
            b = s["momentum"] * b + d
            p = p - s["learning_rate"] * (b if s["momentum"] > 0 else d)
        elif name == "adagrad":
            accumulator = accumulator + g * g
            p = p - s["learning_rate"] * g / (np.sqrt(accumulator) + s["epsilon"])
        else:
            b = g if t == 1 else s["momentum"] * b + g
            p = p - s["learning_rate"] * (b if s["momentum"] else g)
    return p


DEFAULTS = {"sgd": {"momentum": 0.0, "nesterov": False, "weight_decay": 0.0},
            "adam": {"beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-8, "amsgrad": False},
            "rmsprop": {"rho": 0.9, "epsilon": 1e-8, "momentum": 0.0, "centered": False},
            "adagrad": {"initial_accumulator_value": 0.0, "epsilon": 1e-10}}


@settings(max_examples=examples(80))
@given(name=st.sampled_from(sorted(OPTIMIZERS)), data=st.data(), n=st.integers(2, 8), steps=st.integers(1, 5),
       seed=st.integers(0, 2**32 - 1))
def test_replay_equals_each_optimizer_written_out(name, data, n, steps, seed):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(n, 2)), rng.normal(size=n)
    chosen = DEFAULTS[name] | data.draw(OPTIMIZERS[name])
    got = replay(small_problem(x, y, Optimizer(name, chosen), steps)).final
    np.testing.assert_allclose(got, direct_steps(x, y, name, chosen, steps), rtol=1e-10, atol=1e-12)


@settings(max_examples=examples(40))
@given(n=st.integers(5, 40), features=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_full_batch_sgd_converges_to_least_squares_on_well_conditioned_problems(n, features, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features))
    x = (x - x.mean(axis=0)) / x.std(axis=0)  # centred, unit scale: condition number stays small
    if np.linalg.cond(np.hstack([x, np.ones((n, 1))])) > 10:
        return  # an unlucky draw of nearly collinear columns is not the property under test
    y = x @ rng.normal(size=features) + 3.0 + 0.1 * rng.normal(size=n)
    hessian = 2.0 / n * np.hstack([x, np.ones((n, 1))]).T @ np.hstack([x, np.ones((n, 1))])
    rate = 1.0 / np.linalg.eigvalsh(hessian).max()
    settings_ = DEFAULTS["sgd"] | {"learning_rate": rate}
    trained = replay(small_problem(x, y, Optimizer("sgd", settings_), 2000)).final
    np.testing.assert_allclose(trained, least_squares(x, y, True), rtol=1e-7, atol=1e-8)


# Strings that some YAML reads as another type: YAML 1.2 floats without a dot (the case format's
# numbers), YAML 1.1 floats, ints, booleans and nulls, and their look-alikes.
NUMBER_LIKE = ["0E0", "1e5", "1E+5", "-2e-3", ".5", "-.5", "5.", "+1", "1_000", "0x1F", "0o17", "0b101", "012",
               "1:20", "1.5e3", ".inf", "-.Inf", ".NaN", "yes", "No", "on", "OFF", "true", "False", "y", "n",
               "null", "~", "", " ", "2001-12-14", "=", "<<", "- a", "a: b", "#x", "'", '"', "0.1e", "e5", "1e"]
scalars = st.one_of(st.text(), st.sampled_from(NUMBER_LIKE), st.integers(),
                    st.floats(allow_nan=False), st.booleans(), st.none())
documents = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.text(), st.sampled_from(NUMBER_LIKE)), inner, max_size=4)), max_leaves=20)


def same(a, b) -> bool:
    """Equal, with types: 1 == 1.0 == True in Python, but not in a case file."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[key], b[key]) for key in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


@pytest.mark.parametrize("text", NUMBER_LIKE)
def test_a_string_that_looks_like_a_number_is_written_so_both_yaml_versions_read_a_string(text):
    written = dump_yaml({"description": text})
    assert parse_yaml(written) == {"description": text}  # the loader's YAML 1.2 numbers
    import yaml
    assert yaml.safe_load(written) == {"description": text}  # a YAML 1.1 reader


@settings(max_examples=examples(200), suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=documents)
def test_writing_then_reading_a_document_gives_it_back(tmp_path_factory, document):
    path = tmp_path_factory.mktemp("yaml") / "case.yaml"
    path.write_text(dump_yaml(document, sort_keys=False, default_flow_style=None, width=100), encoding="utf-8")
    assert same(read_yaml(path), document)
