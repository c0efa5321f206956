"""The plugin end to end on a small case folder written here, with real PyTorch, under -n 2."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT

pytest.importorskip("torch")
pytest.importorskip("xdist")

GOOD = """\
dataset: {inline: {x: [-1, 0, 1, 2, 3, 4], y: [-3, -1, 1, 3, 5, 7]}}
training: {epochs: 50, batch_size: 4, optimizer: {sgd: {learning_rate: 0.05, momentum: 0.5}}}
predict: [10.0]
tolerance: {parity: {rtol: 1.0e-5, atol: 1.0e-6}, lstsq: null}
"""


@pytest.fixture
def case_folder(tmp_path):
    folder = tmp_path / "my_cases"
    folder.mkdir()
    (folder / "good.yaml").write_text(GOOD)
    (folder / "too-tight.yaml").write_text(GOOD.replace("lstsq: null", "lstsq: {rtol: 0, atol: 1.0e-9}"))
    (folder / "typo.yaml").write_text(GOOD.replace("learning_rate", "learning_rat"))
    (folder / "gpu-only.yaml").write_text(GOOD + "devices: [cuda:0]\n")
    return folder


def run(pytester, case_folder, tmp_path, *extra):
    return pytester.runpytest_subprocess(
        str(ROOT / "conformance"), "--rootdir", str(ROOT), "--cases", str(case_folder), "--backend", "torch",
        "--reports-dir", str(tmp_path / "reports"), "--report-label", "e2e", "-p", "no:cacheprovider", *extra)


def test_a_strangers_cases_in_their_own_folder_get_the_right_outcomes_under_xdist(pytester, case_folder):
    """The installed suite from a user's own folder (`pytest --pyargs conformance`: the plugin
    comes from the package's entry point), the report under ./reports/ there; then
    `--collect-only` leaves that report alone."""
    def run(*extra):
        return pytester.runpytest_subprocess("--pyargs", "conformance", "--cases", str(case_folder), "--backend",
                                             "torch", "--report-label", "e2e", "-p", "no:cacheprovider", *extra)

    result = run("-n", "2", "-rA")
    result.assert_outcomes(passed=4, failed=2, skipped=1)  # parity and trajectory of good and too-tight
    output = result.stdout.str()
    assert "PASSED" in output and "good-torch-cpu-parity" in output
    assert "too-tight-torch-cpu-lstsq" in output and "but should be" in output and "(exact least squares)" in output
    assert "typo.yaml: training.optimizer.sgd: unknown key 'learning_rat'" in output
    assert "cuda:0 is not available to torch" in output
    reports = pytester.path / "reports"
    report = json.loads((reports / "e2e" / "results.json").read_text())
    ids = sorted(item["id"] for item in report["items"])
    assert ids == ["good-torch-cpu-parity", "good-torch-cpu-trajectory", "gpu-only-torch-cuda:0-unavailable",
                   "too-tight-torch-cpu-lstsq", "too-tight-torch-cpu-parity", "too-tight-torch-cpu-trajectory",
                   "typo-load"]
    assert report["meta"]["complete"] is True
    assert report["meta"]["devices"]["torch"]["not_found"] == ["cuda", "mps"]  # from the workers
    assert sorted(report["meta"]["time"]) == ["gw0", "gw1"]  # where each worker's time went
    assert sum(worker["training"] for worker in report["meta"]["time"].values()) > 0
    # One report for the whole run, written by the controller, with a page per case.
    assert [path.name for path in reports.iterdir()] == ["e2e"]
    folder = reports / "e2e"
    assert sorted(path.name for path in (folder / "cases").iterdir()) == [
        "good.html", "gpu-only.html", "too-tight.html", "typo.html"]
    # the curves; the trajectory and its band; the data and the fits
    assert (folder / "cases" / "good.html").read_text().count("<svg") == 3
    assert "unknown key &#39;learning_rat&#39;" in (folder / "cases" / "typo.html").read_text()
    before = (folder / "results.json").read_bytes()
    collected = run("--collect-only", "-q")
    assert collected.ret == 0 and "good-torch-cpu-parity" in collected.stdout.str()
    assert (folder / "results.json").read_bytes() == before


def test_pairwise_check_is_complete_when_items_spread_over_workers(pytester, case_folder, tmp_path):
    """worksteal hands out single items, so the pairwise item may run where no result was trained:
    it trains what it lacks, and still compares every pair."""
    pytest.importorskip("tensorflow")
    result = run(pytester, case_folder, tmp_path, "-n", "2", "--dist", "worksteal", "-k", "good",
                 "--backend", "gradient_tape")
    result.assert_outcomes(passed=5)  # parity and trajectory of each backend, and pairwise
    report = json.loads((tmp_path / "reports" / "e2e" / "results.json").read_text())
    pairwise = next(item for item in report["items"] if item["id"] == "good-pairwise")
    assert [pair["a"] + pair["b"] for pair in pairwise["pairs"]] == [["gradient_tape", "cpu", "torch", "cpu"]]


def test_an_unrelated_test_run_in_the_same_environment_leaves_no_report(pytester):
    """The plugin is installed for every pytest run; outside the conformance package it is dormant."""
    pytester.makepyfile(test_other="def test_other():\n    assert True\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=1)
    assert not (pytester.path / "reports").exists() and "conformance report" not in result.stdout.str()
