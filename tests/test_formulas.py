"""The catalogue of each framework's own formulas (conformance/formulas.yaml): it loads, names
only known formulas and backends, every switch's case exists and meets its conditions, the table
in docs/findings.md is the one it generates, and the switched updates compute, on hand-worked
steps, the formulas the catalogue states."""

from __future__ import annotations

import numpy as np
import pytest
from packaging.specifiers import SpecifierSet

from conformance import formulas
from conformance.backends import MODULES
from conformance.case import CaseFile, load
from conformance.expectations import When, holds
from conformance.optimizers import float32, make_update
from conformance.prepare import prepare
from conformance.problem import Optimizer
from tests.conftest import ROOT

FINDINGS = ROOT / "docs" / "findings.md"
CATALOGUE = formulas.catalogue()
IDS = [f"{switch.name}-{switch.backends[0]}-{index}" for index, switch in enumerate(CATALOGUE)]
# Entries whose `shows` case does not meet their own `when`, each with why (remove once fixed).
NOT_SHOWN = {
    ("schedule_in_float32", "cases/clipping/value-float32.yaml"):
        "optax's warm-up cosine switch needs dtype float64; its case trains in float32, and no "
        "shipped float64 case has a warm-up cosine schedule",
}


def test_the_catalogue_loads_with_every_formula_used():
    assert CATALOGUE, "formulas.yaml has no switches"
    used = {switch.name for switch in CATALOGUE}
    assert used <= formulas.NAMES
    assert formulas.NAMES - used == set(), "formulas.NAMES has names no entry of formulas.yaml uses"


@pytest.mark.parametrize("switch", CATALOGUE, ids=IDS)
def test_every_switch_names_known_backends_and_versions(switch):
    assert set(switch.backends) <= set(MODULES), f"unknown backends: {set(switch.backends) - set(MODULES)}"
    assert len(set(switch.backends)) == len(switch.backends), "a backend named twice"
    for specifier in switch.versions.values():
        SpecifierSet(specifier)  # InvalidSpecifier where it is not PEP 440


@pytest.mark.parametrize("switch", CATALOGUE, ids=IDS)
def test_every_switch_is_shown_by_a_case_that_meets_its_conditions(switch):
    path = ROOT / switch.shows
    assert path.is_file(), f"{switch.name}: shows {switch.shows}, which does not exist"
    problem = prepare(load(CaseFile(path, ROOT / "cases"))).problem
    why_not = NOT_SHOWN.get((switch.name, switch.shows))
    if why_not and not holds(switch.when, problem):
        pytest.xfail(why_not)
    assert holds(switch.when, problem), f"{switch.name}: {switch.shows} does not meet its `when`"
    assert why_not is None, f"{switch.name}: {switch.shows} shows it now; remove its NOT_SHOWN entry"


def test_the_table_in_the_findings_is_current():
    text = FINDINGS.read_text(encoding="utf-8")
    assert formulas.with_table(text, formulas.markdown_table()) == text, \
        "docs/findings.md is stale: regenerate it with python -m conformance.formulas --write docs/findings.md"


def test_the_table_has_a_row_per_switch_and_links_its_case():
    table = formulas.markdown_table()
    rows = table.splitlines()[2:]
    assert len(rows) == len(CATALOGUE)
    for row, switch in zip(rows, CATALOGUE):
        assert row.startswith(f"| `{switch.name}` |") and f"](../{switch.shows})" in row
        assert row.count(" | ") == 6, f"a cell of {switch.name} splits the row"
    when = When(optimizer=["rmsprop", "adagrad"], settings={"epsilon": "> 0", "centered": True})
    assert formulas.when_text(when) == "optimizer: rmsprop or adagrad; epsilon > 0; centered: true"
    assert formulas.when_text(When()) == "always"


# One step worked by hand, with and without the switch: the switched update is the framework's
# formula, the plain one the case format's, and the two differ by far more than rounding here.
P = np.array([1.0, -2.0])
G = np.array([0.5, -1e-3])


def step(name: str, switches: frozenset[str], steps: int = 1, **settings) -> np.ndarray:
    update = make_update(Optimizer(name, {"learning_rate": 0.1} | settings), switches=switches)
    params = P
    for _ in range(steps):
        params = update(params, G, 0.1)
    return params


def test_rmsprop_epsilon_inside_the_root():
    settings = {"rho": 0.9, "epsilon": 1e-3, "momentum": 0.0, "centered": False}
    v = 0.1 * G**2
    torch = P - 0.1 * G / (np.sqrt(v) + 1e-3)
    keras = P - 0.1 * G / np.sqrt(v + 1e-3)
    np.testing.assert_allclose(step("rmsprop", formulas.NONE, **settings), torch, rtol=1e-15)
    np.testing.assert_allclose(step("rmsprop", frozenset({"epsilon_inside_root"}), **settings), keras, rtol=1e-15)
    assert np.abs(keras - torch).max() > 1e-3


def test_adam_epsilon_hat():
    settings = {"beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-3, "amsgrad": False}
    m, v = 0.1 * G, 0.001 * G**2
    torch = P - 0.1 / 0.1 * m / (np.sqrt(v) / np.sqrt(0.001) + 1e-3)
    keras = P - 0.1 * np.sqrt(0.001) / 0.1 * m / (np.sqrt(v) + 1e-3)
    np.testing.assert_allclose(step("adam", formulas.NONE, **settings), torch, rtol=1e-15)
    np.testing.assert_allclose(step("adam", frozenset({"epsilon_hat"}), **settings), keras, rtol=1e-15)
    assert np.abs(keras - torch).max() > 1e-3


def test_sgd_momentum_rounded_to_float32_in_float64():
    settings = {"momentum": 0.9, "nesterov": False, "weight_decay": 0.0}
    momentum = float(np.float32(0.9))
    assert momentum == 0.8999999761581421 == float32(0.9)
    first = P - 0.1 * G  # the first step's buffer is the gradient itself
    torch = first - 0.1 * (0.9 * G + G)
    keras = first - 0.1 * (momentum * G + G)
    switched = step("sgd", frozenset({"hyperparameters_in_float32"}), steps=2, **settings)
    np.testing.assert_allclose(step("sgd", formulas.NONE, steps=2, **settings), torch, rtol=1e-15)
    np.testing.assert_allclose(switched, keras, rtol=1e-15)
    assert np.abs(switched - torch).max() > 1e-10
