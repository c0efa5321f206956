"""The report writer: complete files, escaped case strings, plain JSON."""

from __future__ import annotations

import json

from conformance.report.writer import write_run

META = {"label": "t", "command": "pytest conformance", "started": "now", "duration": 1.0, "exit_status": 1,
        "complete": True, "not_run": [], "host": {"variables": {}}, "versions": {"numpy": "2"}, "workers": 0}


def parity_record(case: str, source: str, status: str) -> dict:
    curve = {"epoch": [1, 2], "value": [1.0, 0.5]}
    return {"id": f"{case}-torch-cpu-parity", "case": case, "check": "parity", "kind": "parity",
            "backend": "torch", "device": "cpu", "source": source, "status": status, "seconds": 0.1,
            "params": [1.0, 2.0], "replay": [1.0, 2.0], "max_rel_diff": 0.0, "tolerance": {"rtol": 0, "atol": 0},
            "curve": {"loss": curve, "params": [curve, curve]}, "distance": curve, "info": {"torch": "2"},
            "message": "<b>bold</b> message"}


def test_case_strings_are_escaped_in_html(tmp_path):
    source = tmp_path / "evil.yaml"
    source.write_text("description: <script>alert(1)</script>\n")
    path = write_run(tmp_path / "out", [parity_record("<script>x</script>", str(source), "passed")], META)
    html = path.read_text()
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script>x</script>" not in html and "<b>bold</b>" not in html
    assert "<svg" in html  # the loss and distance plots are inline


def test_results_json_holds_every_item(tmp_path):
    records = [parity_record("a", "a.yaml", "passed"), parity_record("b", "b.yaml", "failed")]
    write_run(tmp_path, records, META)
    data = json.loads((tmp_path / "results.json").read_text())
    assert [item["id"] for item in data["items"]] == ["a-torch-cpu-parity", "b-torch-cpu-parity"]
    assert data["meta"]["versions"] == {"numpy": "2"}
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files
