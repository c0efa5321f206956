"""Generated cases (--fuzz): reproducible draws that are valid cases, and, with a framework made
wrong on purpose (tests/wrong_torch.py), a failure that Hypothesis shrinks to a smaller case
file which fails the same way when run alone, and passes with the framework put right."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest
import yaml

from conformance import fuzz, fuzz_draws, shrink
from conformance.case import discover, load
from conformance.prepare import prepare
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
    case = fuzz.draw(0, 7)  # full batch, rmsprop with momentum and centered (epsilon: the default)
    knobs = shrink.reduction_space(case)
    assert {"epochs", "samples", "features", "keep_init", "keep_momentum", "keep_centered"} <= set(knobs)
    simplest = {key: False for key in knobs if key.startswith("keep_")} | {"epochs": 1, "samples": 2, "features": 1}
    smaller = shrink.reduced(case, simplest)
    assert smaller["training"]["optimizer"] == {"rmsprop": {"learning_rate": case["training"]["optimizer"]["rmsprop"]
                                                            ["learning_rate"]}}
    assert smaller["training"]["epochs"] == 1 and len(smaller["dataset"]["inline"]["y"]) == 2
    assert all(len(row) == 1 for row in smaller["dataset"]["inline"]["x"]) and smaller["model"]["init"] == "zeros"
    prepare(shrink.loaded_case(smaller, ROOT))  # still a valid case


HARD_SEED, HARD_COUNT = 11, 300


def zero_init(model: dict) -> str | None:
    """How a case file's model starts from zero: the field absent, `zeros`, or a constant 0; None
    when it does not."""
    if "init" not in model:
        return "absent"
    init = model["init"]
    if init == "zeros":
        return "zeros"
    if isinstance(init, dict) and "constant" in init and not any(init["constant"]["weights"]) \
            and init["constant"]["bias"] == 0:
        return "constant"
    return None


def mirrored_pairs(inline: dict) -> bool:
    """Whether the data are mirrored pairs: x[2i+1] = -x[2i], with y[2i+1] = -y[2i] (or, for
    0/1 labels, 1 - y[2i]) and equal sample weights."""
    x, y = inline["x"], inline["y"]
    if len(y) % 2:
        return False
    weights = inline.get("sample_weight", [1.0] * len(y))
    classes = set(y) <= {0.0, 1.0}
    return all([-v for v in x[i]] == x[i + 1] and weights[i] == weights[i + 1]
               and y[i + 1] == (1.0 - y[i] if classes else -y[i]) for i in range(0, len(y), 2))


def first_bias_gradient(inline: dict, loss: dict) -> list[float]:
    """The terms of the first full-batch bias gradient of the linear model at a zero init (the
    prediction is 0, a probability 0.5), each weighted, in the data's order."""
    (kind, settings), = loss.items()
    weights = inline.get("sample_weight", [1.0] * len(inline["y"]))
    if kind == "bce":
        residual = [0.5 - target for target in inline["y"]]
    elif kind == "huber":
        residual = [min(max(-target, -settings["delta"]), settings["delta"]) for target in inline["y"]]
    else:
        residual = [-2.0 * target for target in inline["y"]]
    return [weight * term / len(weights) for weight, term in zip(weights, residual)]


@pytest.fixture(scope="module")
def hard_draws(tmp_path_factory):
    """The first 300 cases of a seed, each read back from its file and loaded by the case loader."""
    paths = fuzz.write_cases(tmp_path_factory.mktemp("hard"), HARD_SEED, HARD_COUNT)
    drawn = []
    for path in paths:
        loaded = load(discover([path])[0])  # raises on a case the format refuses
        prepare(loaded)
        drawn.append(yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))
    return drawn


def test_zero_initial_parameters_are_drawn_in_every_form(hard_draws):
    forms = [zero_init(case["model"]) for case in hard_draws]
    assert sum(form is not None for form in forms) >= 0.25 * HARD_COUNT, forms
    assert {"absent", "zeros", "constant"} <= set(forms)


def test_symmetric_data_whose_bias_gradient_cancels_exactly_are_drawn(hard_draws):
    """Where a description claims symmetric data or balanced classes, the data are mirrored
    pairs, and the first bias gradient at a zero init is exactly 0: in exact arithmetic
    (math.fsum) and summed in order in float64."""
    claimed = {case["name"] for case in hard_draws
               if "symmetric about 0" in case["description"] or "balanced classes" in case["description"]}
    mirrored = [case for case in hard_draws if mirrored_pairs(case["dataset"]["inline"])]
    assert claimed == {case["name"] for case in mirrored}
    assert len(mirrored) >= 0.08 * HARD_COUNT
    losses = [next(iter(case["training"]["loss"])) for case in mirrored]
    assert "bce" in losses and {"mse", "huber"} & set(losses)
    for case in mirrored:
        assert case["model"]["bias"] is True
        terms = first_bias_gradient(case["dataset"]["inline"], case["training"]["loss"])
        assert any(terms) and math.fsum(terms) == 0.0 and sum(terms) == 0.0, case["name"]
        bce = "bce" in case["training"]["loss"]
        assert not bce or case["dataset"]["inline"]["y"].count(1.0) == len(terms) / 2  # balanced classes
    zero = [case for case in mirrored if zero_init(case["model"]) and not case["model"].get("hidden")]
    assert len(zero) >= 0.5 * len(mirrored)


def test_long_float32_adam_runs_are_drawn_and_stay_cheap(hard_draws):
    long_runs = [case for case in hard_draws
                 if "adam" in case["training"]["optimizer"] and case["training"]["dtype"] == "float32"
                 and case["training"]["epochs"] >= 150 and case["training"]["batch_size"] is None
                 and len(case["dataset"]["inline"]["y"]) <= fuzz_draws.LONG_ADAM_SAMPLES]
    assert len(long_runs) >= 0.05 * HARD_COUNT
    assert any("epsilon" not in case["training"]["optimizer"]["adam"] for case in long_runs)
    for case in hard_draws:  # every case at most MAX_STEPS optimizer steps
        training, n = case["training"], len(case["dataset"]["inline"]["y"])
        assert training["epochs"] * math.ceil(n / (training["batch_size"] or n)) <= fuzz.MAX_STEPS


def test_epsilon_is_mostly_the_default_and_no_combination_is_excluded(hard_draws):
    adaptive = [case for case in hard_draws if "sgd" not in case["training"]["optimizer"]]
    explicit = [case for case in adaptive if "epsilon" in next(iter(case["training"]["optimizer"].values()))]
    assert 0 < len(explicit) < 0.4 * len(adaptive)

    def kinds(case):
        (kind, settings), = case["training"]["optimizer"].items()
        if kind != "sgd" and "epsilon" not in settings:
            yield f"{kind} default epsilon"
        if kind == "sgd" and settings.get("momentum"):
            yield "sgd momentum"
        if kind == "adam":
            yield "adam"

    for extra in ("schedule", "clip"):
        met = {kind for case in hard_draws if extra in case["training"] for kind in kinds(case)}
        assert {"rmsprop default epsilon", "adagrad default epsilon", "adam default epsilon", "sgd momentum",
                "adam"} <= met, (extra, met)


def test_a_hard_case_shrinks_like_any_other():
    """A symmetric, zero-init (field absent), long float32 Adam case: every reduction is a valid
    case, an even number of samples keeps it symmetric, and the simplest resets everything."""
    case = next(case for case in map(lambda k: fuzz.draw(HARD_SEED, k), range(HARD_COUNT))
                if mirrored_pairs(case["dataset"]["inline"]) and "init" not in case["model"]
                and case["training"]["epochs"] >= 150 and "adam" in case["training"]["optimizer"])
    knobs = shrink.reduction_space(case)
    assert {"epochs", "samples", "features", "keep_init"} <= set(knobs)
    simplest = {key: False for key in knobs if key.startswith("keep_")} | {"epochs": 1, "samples": 2, "features": 1}
    smaller = shrink.reduced(case, simplest)
    assert smaller["model"]["init"] == "zeros" and smaller["training"]["optimizer"] == {
        "adam": {"learning_rate": case["training"]["optimizer"]["adam"]["learning_rate"]}}
    assert mirrored_pairs(smaller["dataset"]["inline"])
    prepare(shrink.loaded_case(smaller, ROOT))
    half = shrink.reduced(case, {"samples": 4, "epochs": 150, "keep_init": True})
    assert mirrored_pairs(half["dataset"]["inline"]) and "init" not in half["model"]
    prepare(shrink.loaded_case(half, ROOT))


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
