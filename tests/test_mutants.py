"""The catalogue of deliberately wrong frameworks (tests/mutants.py) and a few of its mutants
caught on every CI run, by the shipped cases, through real frameworks: one in the test process
(torch) and one in a Keras worker process (Keras on JAX), which loads it through
CONFORMANCE_WORKER_SETUP. The whole score: benchmarks/mutation.py."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from tests import mutants
from tests.conftest import ROOT


def test_the_catalogue_covers_every_framework_path():
    assert len(mutants.CATALOGUE) >= 15 and len(mutants.BY_NAME) == len(mutants.CATALOGUE)
    covered = {backend for mutant in mutants.CATALOGUE for backend in mutant.backends}
    assert {"torch", "keras", "gradient_tape", "jax", "keras_jax", "keras_torch"} <= covered
    assert {mutant.process for mutant in mutants.CATALOGUE} == {"main", "keras_jax", "keras_torch", "jax_sharded",
                                                               "tf_replicated"}


def test_an_unknown_mutant_is_an_error(monkeypatch):
    monkeypatch.setenv(mutants.VARIABLE, "torch-sgd-lr-1e-5")
    with pytest.raises(ValueError, match="not in the catalogue"):
        mutants.selected()
    monkeypatch.setenv(mutants.VARIABLE, "")
    assert mutants.selected() is None


def _run(pytester, tmp_path, monkeypatch, mutant: str, backend: str, case: str) -> dict[str, str]:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv(mutants.VARIABLE, mutant)
    reports = tmp_path / "reports"
    pytester.runpytest_subprocess(
        str(ROOT / "conformance"), "--rootdir", str(ROOT), "--cases", str(ROOT / case), "--backend", backend,
        "--reports-dir", str(reports), "--report-label", "run", "-p", "tests.mutants", "-p", "no:cacheprovider",
        timeout=300)
    data = json.loads((reports / "run" / "results.json").read_text())
    return {item["id"]: item["status"] for item in data["items"]}


@pytest.mark.parametrize(("mutant", "backend", "case", "caught"), [
    ("torch-huber-as-smooth-l1", "torch", "cases/losses/huber-small-delta-sum-minibatch.yaml",
     "huber-small-delta-sum-minibatch-torch-cpu-trajectory"),  # Adam: the end point is scale-free, the loss not
    ("keras-jax-sgd-nesterov-ignored", "keras_jax", "cases/features/nesterov.yaml",
     "nesterov-keras_jax-cpu-trajectory"),
    ("torch-relu-as-clamp", "torch", "cases/hidden/relu-at-zero.yaml", "relu-at-zero-torch-cpu-parity"),
    # mixed precision: the three bugs the spec says must fail whatever the band
    ("torch-master-weights-in-compute-dtype", "torch", "cases/precision/bfloat16-master-weights-and-loss.yaml",
     "bfloat16-master-weights-and-loss-torch-cpu-parity"),
    ("torch-mse-in-compute-dtype", "torch", "cases/precision/float16-large-targets-loss-in-float32.yaml",
     "float16-large-targets-loss-in-float32-torch-cpu-trajectory"),
    ("torch-grad-scaler-default-initial-scale", "torch", "cases/precision/float16-adam-dynamic-overflow.yaml",
     "float16-adam-dynamic-overflow-torch-cpu-trajectory"),
])
def test_a_shipped_case_catches_the_mutant(pytester, tmp_path, monkeypatch, mutant, backend, case, caught):
    needs = {"torch": "torch", "keras_jax": "jax"}[backend]
    if importlib.util.find_spec(needs) is None or importlib.util.find_spec("keras") is None and needs == "jax":
        pytest.skip(f"{needs} is not installed")
    statuses = _run(pytester, tmp_path, monkeypatch, mutant, backend, case)
    assert statuses[caught] == "failed", statuses
