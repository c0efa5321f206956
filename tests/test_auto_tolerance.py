"""`tolerance.parity: auto`: the band derived from the case, tight enough to catch real update
mistakes in a real framework (torch, with its optimizer made wrong on purpose by
tests/wrong_torch.py) and loose enough for rounding (every shipped case passes with it:
benchmarks/auto_tolerance.py)."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

from conformance import reference, rounding_bands
from conformance.problem import Optimizer, Problem
from tests.conftest import ROOT


def problem(dtype: str) -> Problem:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(20, 2)).astype(dtype)
    y = (x @ [1.5, -2.0] + 0.5 + 0.1 * rng.normal(size=20)).astype(dtype)
    sgd = Optimizer("sgd", {"learning_rate": 0.02, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0})
    return Problem("p", x, y, np.zeros(2, dtype), np.asarray(0.0, dtype), 30, 5, None, "mean", sgd, dtype)


def test_the_band_is_reproducible_and_scales_with_the_dtype():
    bands = {}
    for dtype in ("float32", "float64"):
        case = problem(dtype)
        unperturbed = reference.replay(case)
        bands[dtype] = rounding_bands.rounding_band(case, unperturbed, lambda params: params)
        again = rounding_bands.rounding_band(case, unperturbed, lambda params: params)
        assert again == bands[dtype]  # seeded: the same band on every machine
        assert bands[dtype]["rtol"] >= 4 * reference.UNIT_ROUNDOFF[dtype]
    assert 1e-8 < bands["float64"]["rtol"] * 2**29 / bands["float32"]["rtol"] < 1e3  # about the ratio of units
    assert bands["float32"]["rtol"] < 1e-4


CASE = """\
dataset:
  generate: {{n: 40, features: 2, x: {{normal: {{std: 1}}}}, weights: [1.5, -2.0], bias: 0.5,
             noise: {{normal: {{std: 0.1}}}}, seed: 7}}
training:
  epochs: 15
  batch_size: 8
  optimizer: {{sgd: {{learning_rate: 0.01, momentum: 0.9}}}}
  dtype: {dtype}
tolerance: {{parity: auto, lstsq: null}}
"""


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_auto_catches_a_wrong_learning_rate_late_momentum_and_a_skipped_step(pytester, tmp_path, monkeypatch, dtype):
    """Four runs of one unconverged case through real torch: correct, and three optimizers made
    wrong on purpose. Only the correct one passes parity, in float32 and in float64."""
    if importlib.util.find_spec("torch") is None:  # not imported here: the run is a subprocess
        pytest.skip("torch is not installed")
    cases = tmp_path / "cases"
    cases.mkdir()
    for name in ("right", "wrong-lr", "wrong-latemomentum", "wrong-skip"):
        (cases / f"{name}.yaml").write_text(CASE.format(dtype=dtype))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    reports = tmp_path / "reports"
    result = pytester.runpytest_subprocess(
        str(ROOT / "conformance"), "--rootdir", str(ROOT), "--cases", str(cases), "--backend", "torch",
        "--reports-dir", str(reports), "--report-label", "run", "-p", "tests.wrong_torch", "-p", "no:cacheprovider",
        timeout=300)
    data = json.loads((reports / "run" / "results.json").read_text())
    statuses = {item["case"]: item["status"] for item in data["items"]}
    assert statuses == {"right": "passed", "wrong-lr": "failed", "wrong-latemomentum": "failed",
                        "wrong-skip": "failed"}, result.stdout.str()[-3000:]
    parity = [item for item in data["items"] if item["check"] == "parity"]
    bands = {item["case"]: item["tolerance"] for item in parity}
    assert all(band["auto"]["runs"] == rounding_bands.AUTO_RUNS for band in bands.values())
    lr = next(item for item in parity if item["case"] == "wrong-lr")
    assert lr["max_rel_diff"] > 2 * bands["wrong-lr"]["rtol"]  # caught with room to spare (4.7x in float32)
