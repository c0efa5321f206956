"""The v1 case format: what loads, what is refused, and how the refusal reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conformance.case import CaseError, CaseFile, load
from conformance.prepare import prepare
from conformance.schema import Case, choice
from tests.conftest import ROOT

MINIMAL = """\
dataset: {inline: {x: [1, 2, 3], y: [2, 4, 6]}}
training: {epochs: 3, optimizer: {sgd: {learning_rate: 1e-3}}}
"""


def load_text(write_case, text: str, name: str = "case"):
    path = write_case(name, text)
    return load(CaseFile(path, path.parent))


def error_of(write_case, text: str) -> str:
    with pytest.raises(CaseError) as caught:
        case = load_text(write_case, text)
        prepare(case)
    return str(caught.value)


def test_minimal_case_gets_the_documented_defaults(write_case):
    case = load_text(write_case, MINIMAL, name="my-case")
    assert case.name == "my-case"
    assert case.spec.training.optimizer.sgd.learning_rate == 1e-3  # YAML 1.2 number, not a string
    assert (case.spec.training.dtype, case.spec.training.batch_size, case.spec.model.bias) == ("float32", None, True)
    assert choice(case.spec.model.init) == ("zeros", None)
    assert choice(case.spec.training.loss) == ("mse", None)
    assert case.spec.tolerance.parity.rtol == 1e-5 and case.spec.tolerance.lstsq.atol == 1e-3
    settings = prepare(case).problem.optimizer.settings
    assert settings == {"learning_rate": 1e-3, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0}


@pytest.mark.parametrize(("tolerance", "along_path"), [
    ("", "auto"),  # neither set: derived
    ("tolerance: {parity: {rtol: 1.0e-4, atol: 1.0e-5}}\n", {"rtol": 1e-4, "atol": 1e-5}),  # a v1 file's own
    ("tolerance: {parity: auto}\n", "auto"),
    ("tolerance: {parity: {rtol: 1.0e-4}, trajectory: auto}\n", "auto"),  # set: the file's own word
    ("tolerance: {parity: {rtol: 1.0e-4}, trajectory: {rtol: 1.0e-3}}\n", {"rtol": 1e-3, "atol": 0.0}),
    ("tolerance: {parity: {rtol: 1.0e-4}, trajectory: null}\n", None),
])
def test_the_trajectory_tolerance_is_the_hand_set_parity_one_when_absent(write_case, tolerance, along_path):
    got = load_text(write_case, MINIMAL + tolerance).spec.tolerance.along_path
    assert (got.model_dump() if hasattr(got, "model_dump") else got) == along_path


def test_unknown_key_names_file_field_and_allowed_keys(write_case):
    message = error_of(write_case, MINIMAL.replace("learning_rate", "learning_rat"))
    assert "case.yaml: training.optimizer.sgd: unknown key 'learning_rat'" in message
    assert "expected one of: learning_rate, momentum, nesterov, weight_decay" in message


@pytest.mark.parametrize("text, expected", [
    (MINIMAL.replace("1e-3", '"0.01"'), "training.optimizer.sgd.learning_rate: expected a number"),
    (MINIMAL.replace("epochs: 3", "epochs: 0"), "training.epochs: input should be greater than or equal to 1"),
    (MINIMAL.replace("sgd", "sgdd"), "training.optimizer: expected exactly one of: {sgd: ...}"),
    (MINIMAL + "model: {init: ones}\n", "model.init: expected exactly one of: zeros, {constant: ...}"),
    (MINIMAL.replace("epochs: 3", "epochs: 3, shuffle: true"), "training.shuffle: expected exactly one of: false"),
    (MINIMAL.replace("1e-3}", "1e-3, nesterov: true}"), "nesterov: true needs momentum > 0"),
    (MINIMAL.replace("y: [2, 4, 6]", "y: [2, 4]"), "x has 3 samples and y has 2"),
    (MINIMAL.replace("x: [1, 2, 3]", "x: [[1, 2], [3], [4, 5]]"), "rows have different lengths"),
    (MINIMAL.replace("y: [2, 4, 6]", "y: [2, .nan, 6]"), "expected a finite number"),
    (MINIMAL.replace("epochs: 3", "epochs: 3, batch_size: 4"), "batch_size: 4 is larger than the 3 samples"),
    (MINIMAL.replace("sgd: {learning_rate: 1e-3}", "adam: {learning_rate: 1e-3, beta1: 0.9}"),
     "training.optimizer.adam: unknown key 'beta1'"),
    (MINIMAL.replace("sgd: {learning_rate: 1e-3}", "rmsprop: {learning_rate: 1e-3, rho: 1}"),
     "training.optimizer.rmsprop.rho: input should be less than 1"),
    (MINIMAL + "tolerance: {parity: {rtol: -1}}\n",
     "tolerance.parity.rtol: input should be greater than or equal to 0"),
    (MINIMAL + "expect: [{check: parity}]\n", "expect[0].reason: required field is missing"),
    (MINIMAL + "expect: [{check: parity, reason: r, backend: [keras, kears]}]\n", "expect[0].backend"),
    (MINIMAL + "expect: [{check: parity, reason: r, backend: []}]\n", "expect[0].backend"),
    (MINIMAL + "backends: [torch_compiled]\n", "backends[0]"),
    ("!!python/object/apply:os.system [echo hacked]\n", "not valid YAML: could not determine a constructor"),
    ("dataset: [1\n", "not valid YAML"),
    ("- 1\n- 2\n", "expected a mapping of case fields at the top level, got list"),
])
def test_bad_cases_say_what_was_expected(write_case, text, expected):
    message = error_of(write_case, text)
    assert message.startswith(str(Path("case.yaml"))) or "case.yaml:" in message
    assert expected in message


def test_expect_names_one_backend_or_a_list_and_applies_to_each(write_case):
    from conformance.expectations import applicable

    path = write_case("case", MINIMAL + "backends: [keras_xla, gradient_tape_xla, torch_compile]\n"
                      "expect: [{check: parity, reason: r, backend: [keras, keras_xla]},\n"
                      "         {check: lstsq, reason: s, backend: torch_compile}]\n")
    case = load(CaseFile(path, path.parent))
    expect = case.spec.expect
    assert [entry.backend_names for entry in expect] == [["keras", "keras_xla"], ["torch_compile"]]
    assert applicable(expect, "parity", "keras_xla", "cpu", {}) is expect[0]
    assert applicable(expect, "parity", "gradient_tape_xla", "cpu", {}) is None
    assert applicable(expect, "lstsq", "torch_compile", "cpu", {}) is expect[1]


def test_csv_path_may_not_leave_the_cases_root(tmp_path, write_case):
    outside = tmp_path / "outside.csv"
    outside.write_text("x,y\n1,2\n2,4\n")
    root = tmp_path / "cases"
    path = write_case("leaky", MINIMAL.replace("{inline: {x: [1, 2, 3], y: [2, 4, 6]}}",
                                               "{csv: {path: ../outside.csv, x: [x], y: y}}"), folder=root)
    with pytest.raises(CaseError, match="outside the cases root"):
        prepare(load(CaseFile(path, root)))
    (root / "link.csv").symlink_to(outside)
    path.write_text(path.read_text().replace("../outside.csv", "link.csv"))
    with pytest.raises(CaseError, match="outside the cases root"):
        prepare(load(CaseFile(path, root)))


def test_published_json_schema_is_current():
    published = json.loads((ROOT / "schema" / "case-v1.schema.json").read_text())
    assert published == Case.model_json_schema(), "regenerate with: python -m conformance.schema_export"


def test_every_shipped_case_is_valid():
    from conformance.case import discover

    sources = discover([ROOT / "cases"])
    assert len(sources) >= 20
    for source in sources:
        prepare(load(source))
