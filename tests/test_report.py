"""The report writer and the merge command: complete files, escaped case strings, plain JSON."""

from __future__ import annotations

import json

import pytest

from conformance.report import merge, screenshot
from conformance.report.__main__ import main
from conformance.report.writer import page_name, write_run

META = {"label": "t", "command": "pytest conformance", "started": "now", "duration": 1.0, "exit_status": 1,
        "complete": True, "not_run": [], "host": {"variables": {}}, "versions": {"numpy": "2"}, "workers": 0,
        "devices": {"torch": {"looked_for": ["cpu", "cuda", "mps"], "devices": ["cpu"], "not_found": ["cuda", "mps"]}}}
EVIL = "<script>alert(1)</script>"


def parity_record(case: str, source: str, status: str, params=(1.0, 2.0), description: str = "") -> dict:
    curve = {"epoch": [1, 2], "value": [1.0, 0.5]}
    return {"id": f"{case}-torch-cpu-parity", "case": case, "check": "parity", "kind": "parity",
            "backend": "torch", "device": "cpu", "source": source, "status": status, "seconds": 0.1,
            "params": list(params), "replay": [1.0, 2.0], "max_rel_diff": 0.0,
            "tolerance": {"rtol": 1e-5, "atol": 1e-6}, "description": description, "seeds": {"training.shuffle": 3},
            "curve": {"loss": curve, "params": [curve, curve]}, "distance": curve, "info": {"torch": "2"},
            "message": "<b>bold</b> message"}


def write(folder, records, **meta):
    return write_run(folder, records, META | meta)


def test_case_strings_are_escaped_on_every_page(tmp_path):
    source = tmp_path / "evil.yaml"
    source.write_text(f"description: {EVIL}\n")
    index = write(tmp_path / "out", [parity_record(EVIL, str(source), "failed", description=EVIL)])
    case_page = tmp_path / "out" / page_name(EVIL)
    for html in (index.read_text(), case_page.read_text()):
        assert "<script" not in html and "<b>bold</b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in case_page.read_text()
    assert "<svg" in case_page.read_text()  # the loss and distance plots are inline


def test_overview_links_every_case_page_and_shows_devices_not_found(tmp_path):
    index = write(tmp_path, [parity_record("a", "a.yaml", "passed"), parity_record("b c", "b.yaml", "failed")])
    html = index.read_text()
    assert 'href="cases/a.html"' in html and f'href="{page_name("b c")}"' in html
    assert (tmp_path / page_name("b c")).is_file()
    assert "cuda, mps" in html  # looked for, not found
    assert "training.shuffle=3" in (tmp_path / "cases" / "a.html").read_text()


@pytest.mark.parametrize("name", ["../../escape", "/abs/path", "a/b", ".hidden", "", "x" * 300])
def test_case_pages_stay_inside_the_report_folder(name):
    page = page_name(name)
    assert page.startswith("cases/") and page.count("/") == 1 and ".." not in page
    assert len(page) < 120 and not page.startswith("cases/.")


def test_results_json_holds_every_item_and_the_case_files(tmp_path):
    (tmp_path / "a.yaml").write_text("description: first\n")
    records = [parity_record("a", str(tmp_path / "a.yaml"), "passed"), parity_record("b", "b.yaml", "failed")]
    write(tmp_path / "out", records)
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [item["id"] for item in data["items"]] == ["a-torch-cpu-parity", "b-torch-cpu-parity"]
    assert data["meta"]["versions"] == {"numpy": "2"}
    assert data["cases"]["a"]["yaml"] == "description: first\n"
    assert not list((tmp_path / "out").rglob(".*.tmp"))  # atomic writes leave no temporary files


def test_a_rerun_removes_pages_of_cases_it_no_longer_has(tmp_path):
    write(tmp_path, [parity_record("old", "o.yaml", "passed"), parity_record("kept", "k.yaml", "passed")])
    write(tmp_path, [parity_record("kept", "k.yaml", "passed")])
    assert sorted(path.name for path in (tmp_path / "cases").iterdir()) == ["kept.html"]


def test_an_interrupted_run_is_marked_incomplete(tmp_path):
    index = write(tmp_path, [parity_record("a", "a.yaml", "passed")], complete=False, interrupted=True,
                  exit_status=2, not_run=["b-torch-cpu-parity"])
    assert "Incomplete run" in index.read_text() and "b-torch-cpu-parity" in index.read_text()


def test_a_result_with_its_own_formulas_lists_each_switch_with_its_size(tmp_path):
    switches = [{"name": "epsilon_hat", "size": 1.234e-3, "reason": "r", "source": "s", "shows": "c.yaml"},
                {"name": EVIL, "size": None, "reason": "r", "source": "s", "shows": "c.yaml"}]
    keras = parity_record("a", "a.yaml", "xfailed") | {"id": "a-keras-cpu-parity", "backend": "keras",
                                                       "formulas": ["epsilon_hat", EVIL], "switches": switches}
    write(tmp_path, [keras, parity_record("a", "a.yaml", "passed")])
    html = (tmp_path / "cases" / "a.html").read_text()
    assert "own formulas: epsilon_hat (1.2e-03), &lt;script&gt;alert(1)&lt;/script&gt; (non-finite)" in html
    assert html.count("<small>own formulas:") == 1  # the keras row; torch has none
    assert "<script" not in html


@pytest.fixture
def two_runs(tmp_path):
    """The same cases under two labels: one parameter moved beyond tolerance, one outcome changed."""
    old = [parity_record("steady", "s.yaml", "passed"), parity_record("drifts", "d.yaml", "passed"),
           parity_record(EVIL, "e.yaml", "passed")]
    new = [parity_record("steady", "s.yaml", "passed", params=(1.0 + 1e-9, 2.0)),
           parity_record("drifts", "d.yaml", "failed", params=(1.01, 2.0)),
           parity_record("only-new", "n.yaml", "passed"), parity_record(EVIL, "e.yaml", "passed")]
    write(tmp_path / "tf215", old, label="tf215")
    write(tmp_path / "current", new, label="current", versions={"numpy": "2", "torch": "2.13.0"})
    return tmp_path


def test_merge_lines_runs_up_and_reports_what_changed(two_runs):
    index = merge.merge([two_runs / "tf215", two_runs / "current"], two_runs / "compare")
    data = json.loads((two_runs / "compare" / "results.json").read_text())
    cases = {case["name"]: case for case in data["cases"]}
    assert [run["label"] for run in data["runs"]] == ["tf215", "current"]
    assert cases["steady"]["changes"] == []  # 1e-9 relative is inside rtol 1e-5
    drifts = cases["drifts"]["changes"]
    assert any("passed in tf215, failed in current" in change for change in drifts)
    assert any("moved by more than rtol 1.0e-05" in change and "1.00e-02" in change for change in drifts)
    assert cases["only-new"]["status"] == {"tf215": "absent", "current": "passed"}
    html = index.read_text()
    assert "<script" not in html and "&lt;script&gt;" in html
    assert (two_runs / "compare" / page_name("drifts")).is_file()
    assert 'href="../tf215/index.html"' in html


def test_merge_command_refuses_a_folder_without_results(two_runs, capsys):
    assert main(["merge", str(two_runs / "tf215"), str(two_runs / "nope"), "-o", str(two_runs / "out")]) == 2
    assert "nope/results.json: not found" in capsys.readouterr().err
    assert main(["merge", str(two_runs / "tf215"), str(two_runs / "current"), "-o", str(two_runs / "out")]) == 0


def test_report_renders_in_headless_chromium(two_runs):
    """The real browser check: Chromium loads the pages from disk and draws them (skips without Chromium)."""
    try:
        screenshot.find_browser()
    except screenshot.ScreenshotError as error:
        pytest.skip(str(error))
    shots = screenshot.shoot(two_runs / "current", two_runs / "shots", ["drifts"], size=(800, 600))
    assert [shot.name for shot in shots] == ["index.png", "drifts.png"]
    assert all(shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000 for shot in shots)


def test_gate_exits_1_on_a_regression_and_0_otherwise(two_runs, capsys):
    """`drifts` passed in tf215 and fails in current: a regression. Against itself, none."""
    assert main(["gate", str(two_runs / "tf215"), str(two_runs / "current")]) == 1
    out = capsys.readouterr().out
    assert "REGRESSED drifts-torch-cpu-parity: passed in" in out and "now failed: <b>bold</b> message" in out
    assert "1 item(s) new here: only-new-torch-cpu-parity" in out and "gate: 1 regression(s)" in out
    assert main(["gate", str(two_runs / "current"), str(two_runs / "current")]) == 0
    assert main(["gate", str(two_runs / "current"), str(two_runs / "tf215")]) == 0  # failed -> passed: better
    assert main(["gate", str(two_runs / "nope"), str(two_runs / "tf215")]) == 2


def test_a_non_finite_float_in_a_record_is_written_as_null_not_lost(tmp_path):
    """A switch whose replay alone diverged has no finite size: the run's results still land."""
    record = parity_record("a", "a.yaml", "xfailed") | {"switches": [{"name": "s", "size": float("nan")}],
                                                        "max_rel_diff_case_format": float("inf")}
    write(tmp_path, [record])
    item = json.loads((tmp_path / "results.json").read_text())["items"][0]
    assert item["switches"][0]["size"] is None and item["max_rel_diff_case_format"] is None
    assert item["params"] == [1.0, 2.0]
