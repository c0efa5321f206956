"""When things go wrong: a backend that kills its process, a run interrupted with Ctrl-C, and
training that is not bit-identical twice. Real pytest runs (pytester subprocesses) with real
PyTorch; the misbehaviour comes from a small test plugin (`misbehave.py`) that wraps the torch
backend, as the guide allows fakes for error paths."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import ROOT

pytest.importorskip("torch")
pytest.importorskip("xdist")

CASE = """\
dataset: {inline: {x: [-1, 0, 1, 2, 3, 4], y: [-3, -1, 1, 3, 5, 7]}}
training: {epochs: 20, optimizer: {sgd: {learning_rate: 0.05}}}
tolerance: {lstsq: null, trajectory: null}  # one item per result: these tests are about crashes
"""
MISBEHAVE = '''
import os
import signal

import numpy as np

import conformance.backends.torch as backend
from conformance.backends import Unavailable

_train = backend.train
_finished = []


def train(problem, device):
    mode = os.environ.get("MISBEHAVE", "")
    if mode == "abort" and problem.name == "crash":
        os.abort()
    if problem.name == "gone":  # a backend that turns out not to work here (a broken compiler)
        raise Unavailable("the compiler broke (pretend)")
    result = _train(problem, device)
    if problem.name == "noisy":  # a kernel that is not deterministic: the last bit moves between runs
        result.params = result.params + np.random.default_rng().normal(scale=1e-9, size=result.params.shape)
    return result


backend.train = train


def pytest_runtest_logfinish(nodeid):
    """MISBEHAVE=interrupt: Ctrl-C (SIGINT to this process) after the second item."""
    _finished.append(nodeid)
    if os.environ.get("MISBEHAVE") == "interrupt" and len(_finished) == 2:
        os.kill(os.getpid(), signal.SIGINT)
'''


@pytest.fixture
def suite(pytester, tmp_path, monkeypatch):
    """Run the conformance suite on a folder of small cases, with the misbehaving plugin loaded."""
    cases = tmp_path / "cases"
    cases.mkdir()
    for name in ("alpha", "crash", "gone", "noisy", "omega"):
        (cases / f"{name}.yaml").write_text(CASE)
    pytester.makepyfile(misbehave=MISBEHAVE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(pytester.path), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    reports = tmp_path / "reports"

    def run(mode: str, *extra: str):
        monkeypatch.setenv("MISBEHAVE", mode)
        result = pytester.runpytest_subprocess(
            str(ROOT / "conformance"), "--rootdir", str(ROOT), "--cases", str(cases), "--backend", "torch",
            "--reports-dir", str(reports), "--report-label", "run", "-p", "misbehave", "-p", "no:cacheprovider",
            *extra, timeout=180)
        results = reports / "run" / "results.json"
        data = json.loads(results.read_text()) if results.exists() else None
        return result, data

    run.reports = reports
    return run


def statuses(data: dict) -> dict[str, str]:
    return {item["id"]: item["status"] for item in data["items"]}


def test_under_xdist_a_crash_loses_only_its_item_and_an_unavailable_backend_skips(suite):
    """One run of five cases: one kills its worker, one finds its backend unusable, one is
    noisy in the last bits (fine without --determinism), and the rest pass."""
    result, data = suite("abort", "-n", "2", "-rs")
    assert "crashed while running" in result.stdout.str()
    assert result.stdout.str().count("replacing crashed worker") == 1  # the crashed item is not run again
    assert statuses(data) == {"alpha-torch-cpu-parity": "passed", "crash-torch-cpu-parity": "crashed",
                              "gone-torch-cpu-parity": "skipped", "noisy-torch-cpu-parity": "passed",
                              "omega-torch-cpu-parity": "passed"}
    crashed = next(item for item in data["items"] if item["status"] == "crashed")
    assert "crashed while running" in crashed["failure"]
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert "torch cannot run here: the compiler broke (pretend)" in result.stdout.str()
    noisy = next(item for item in data["items"] if item["case"] == "noisy")
    assert noisy["deterministic"] is None  # not checked without --determinism; 1e-9 is inside tolerance


def test_a_crash_without_xdist_is_recovered_from_the_journal(suite, tmp_path):
    """Without xdist the process dies with the backend, and so does pytest's own reporting; the
    journal keeps what finished, and the next run says how to turn it into a report."""
    result, data = suite("abort", "-k", "alpha or crash")
    assert (result.ret < 0 or result.ret == 134) and data is None  # SIGABRT took pytest down
    journal = suite.reports / "run" / ".journal.jsonl"
    assert journal.exists()
    result, _ = suite("", "-k", "alpha")  # the next run in the same folder
    kept = sorted((suite.reports / "run").glob(".journal-died-*.jsonl"))
    assert len(kept) == 1 and "died before writing its report" in result.stdout.str()
    from conformance.report.__main__ import main

    assert main(["recover", str(kept[0]), "-o", str(tmp_path / "recovered")]) == 0
    recovered = json.loads((tmp_path / "recovered" / "results.json").read_text())
    assert statuses(recovered) == {"alpha-torch-cpu-parity": "passed", "crash-torch-cpu-parity": "crashed"}
    assert recovered["meta"]["complete"] is False
    crashed = next(item for item in recovered["items"] if item["status"] == "crashed")
    assert "died while this item ran" in crashed["message"]
    assert "recovered from" in (tmp_path / "recovered" / "index.html").read_text()


def test_ctrl_c_keeps_what_finished_and_marks_the_report_incomplete(suite):
    result, data = suite("interrupt")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert data["meta"]["interrupted"] is True and data["meta"]["complete"] is False
    assert len(data["items"]) == 2 and set(statuses(data).values()) == {"passed"}
    assert "Incomplete run" in (suite.reports / "run" / "index.html").read_text()
    assert not (suite.reports / "run" / ".journal.jsonl").exists()  # the report was written, so no journal


def test_determinism_option_passes_bit_identical_training_and_fails_what_differs(suite):
    result, data = suite("", "--determinism", "-k", "alpha or noisy")
    result.assert_outcomes(passed=1, failed=1)
    alpha, noisy = sorted(data["items"], key=lambda item: item["case"])
    assert alpha["deterministic"] is True and alpha["info"]["torch.deterministic_algorithms"]
    assert data["meta"]["determinism"] is True
    assert "bit-identical" in (suite.reports / "run" / "index.html").read_text()
    assert "not deterministic (torch, cpu): a second training on the same device differs by up to" in \
        result.stdout.str()
    assert noisy["deterministic"] is False
