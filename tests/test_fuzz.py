"""Generated cases (--fuzz): reproducible draws that are valid cases, and, with a framework made
wrong on purpose (tests/wrong_torch.py), a failure that Hypothesis shrinks to a smaller case
file which fails the same way when run alone, and passes with the framework put right."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import yaml

from conformance import fuzz, shrink
from conformance.case import discover, load
from conformance.problem import prepare
from tests.conftest import ROOT


def test_the_same_seed_gives_the_same_cases_and_every_draw_is_a_valid_case(tmp_path):
    first = fuzz.write_cases(tmp_path / "a", seed=3, count=25)
    second = fuzz.write_cases(tmp_path / "b", seed=3, count=25)
    assert [path.read_text() for path in first] == [path.read_text() for path in second]
    assert fuzz.draw(3, 0) != fuzz.draw(4, 0)
    drawn = {"optimizer": set(), "loss": set(), "dtype": set()}
    for path in first:
        case = load(discover([path])[0])
        problem = prepare(case).problem  # valid: loads and prepares like any case file
        assert case.name == path.stem and case.spec.tolerance.parity == "auto"
        drawn["optimizer"].add(problem.optimizer.name)
        drawn["loss"].add(problem.loss)
        drawn["dtype"].add(problem.dtype)
    assert drawn == {"optimizer": {"sgd", "adam", "rmsprop", "adagrad"}, "loss": {"mse", "huber", "bce"},
                     "dtype": {"float32", "float64"}}


def test_reductions_keep_a_valid_case_and_the_simplest_resets_everything():
    case = fuzz.draw(0, 7)  # full batch, rmsprop with momentum, centered and epsilon
    knobs = shrink.reduction_space(case)
    assert {"epochs", "samples", "features", "keep_init", "keep_momentum", "keep_centered"} <= set(knobs)
    simplest = {key: False for key in knobs if key.startswith("keep_")} | {"epochs": 1, "samples": 2, "features": 1}
    smaller = shrink.reduced(case, simplest)
    assert smaller["training"]["optimizer"] == {"rmsprop": {"learning_rate": case["training"]["optimizer"]["rmsprop"]
                                                            ["learning_rate"]}}
    assert smaller["training"]["epochs"] == 1 and len(smaller["dataset"]["inline"]["y"]) == 2
    assert all(len(row) == 1 for row in smaller["dataset"]["inline"]["x"]) and smaller["model"]["init"] == "zeros"
    prepare(shrink.loaded_case(smaller, ROOT))  # still a valid case


def run(pytester, cases, reports, *extra):
    return pytester.runpytest_subprocess(
        str(ROOT / "conformance"), "--rootdir", str(ROOT), "--cases", str(cases), "--backend", "torch",
        "--reports-dir", str(reports), "--report-label", "run", "-p", "tests.wrong_torch", "-p", "no:cacheprovider",
        *extra, timeout=600)


def test_a_wrong_framework_is_found_and_the_shrunk_case_fails_alone(pytester, tmp_path, monkeypatch):
    if importlib.util.find_spec("torch") is None:  # not imported here: the runs are subprocesses
        pytest.skip("torch is not installed")
    empty = tmp_path / "no-cases"
    empty.mkdir()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("WRONG_TORCH", "lr")  # torch's learning rate 1e-4 too large, in every case
    reports = tmp_path / "reports"
    result = run(pytester, empty, reports, "--fuzz", "4", "--fuzz-seed", "1")
    data = json.loads((reports / "run" / "results.json").read_text())
    failed = [item for item in data["items"] if item["status"] == "failed" and item["check"] == "parity"]
    assert failed, result.stdout.str()[-3000:]
    shrunk = [reports / "run" / item["shrunk_case"] for item in failed]
    assert all(path.parent.name == "shrunk" and path.is_file() for path in shrunk)
    smallest = yaml.safe_load(shrunk[0].read_text())
    original = yaml.safe_load((reports / "run" / "fuzz" / "generated" / f"{failed[0]['case']}.yaml").read_text())
    assert smallest["training"]["epochs"] <= original["training"]["epochs"]
    assert len(smallest["dataset"]["inline"]["y"]) <= len(original["dataset"]["inline"]["y"])
    assert smallest["description"].startswith(("Shrunk by Hypothesis", "No smaller case"))
    # Alone, with the framework still wrong: the same failure. Put right: it passes.
    run(pytester, shrunk[0], tmp_path / "alone")
    alone_items = json.loads((tmp_path / "alone" / "run" / "results.json").read_text())["items"]
    assert {item["status"] for item in alone_items if item["check"] == "parity"} == {"failed"}
    monkeypatch.setenv("WRONG_TORCH", "right")
    right = run(pytester, shrunk[0], tmp_path / "right")
    right_items = json.loads((tmp_path / "right" / "run" / "results.json").read_text())["items"]
    assert {item["status"] for item in right_items if item["check"] == "parity"} == {"passed"}, \
        right.stdout.str()[-2000:]
