"""Collects the items' plain-data records on the controller and writes the report at the end."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conformance import environment

ITEM_MARK = "test_parity.py::test_case["
DEVICES = pytest.StashKey[dict]()  # per backend: device kinds looked for and found (set where items are planned)


class ReportCollector:
    """Registered on the controller only (not on xdist workers): one writer per run."""

    def __init__(self, config: pytest.Config, folder: Path, started: float) -> None:
        self.config = config
        self.folder = folder
        self.started = started
        self.entries: dict[str, dict[str, Any]] = {}
        self.expected_ids: set[str] = set()
        self.devices: dict[str, Any] = {}

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.expected_ids.update(item.nodeid for item in session.items if ITEM_MARK in item.nodeid)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node: Any, ids: list[str]) -> None:
        self.expected_ids.update(nodeid for nodeid in ids if ITEM_MARK in nodeid)

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        self.devices.update(getattr(node, "workeroutput", {}).get("conformance_devices") or {})

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if ITEM_MARK not in report.nodeid:
            return
        status = _status(report)
        if status is None:
            return
        record = dict(report.user_properties).get("conformance") or _record_from_nodeid(report.nodeid)
        entry = self.entries.setdefault(report.nodeid, {**record, "nodeid": report.nodeid, "duration": 0.0})
        entry["duration"] += report.duration
        if entry.get("status") in (None, "passed") or status in ("error", "crashed"):
            entry["status"] = status
        if status in ("failed", "error", "crashed"):
            entry["failure"] = report.longreprtext[-4000:]
        if status == "xfailed":
            entry["xfail_reason"] = getattr(report, "wasxfail", "")

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if not self.entries and not self.expected_ids:
            return
        missing = sorted(self.expected_ids - set(self.entries))
        interrupted = int(exitstatus) == pytest.ExitCode.INTERRUPTED
        meta = {
            "label": self.folder.name,
            "command": " ".join(["pytest", *sys.argv[1:]]),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "duration": round(time.time() - self.started, 3),
            "exit_status": int(exitstatus),
            "complete": not missing and not interrupted,
            "interrupted": interrupted,
            "not_run": missing,
            "devices": self.config.stash.get(DEVICES, None) or self.devices,
            "host": environment.host(),
            "versions": environment.versions(),
            "workers": getattr(self.config.option, "numprocesses", None) or 0,
        }
        from conformance.report.writer import write_run  # matplotlib and jinja: controller only, at the end

        path = write_run(self.folder, list(self.entries.values()), meta)
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_sep("-", f"conformance report: {path}")


def _status(report: pytest.TestReport) -> str | None:
    if report.when == "call":
        if hasattr(report, "wasxfail"):
            return "xfailed" if report.skipped else "failed"
        if report.failed and "crashed" in report.longreprtext[:300] and "worker" in report.longreprtext[:300]:
            return "crashed"
        return report.outcome
    if report.failed:
        return "error"
    if report.when == "setup" and report.skipped:
        return "skipped"
    return None


def _record_from_nodeid(nodeid: str) -> dict[str, Any]:
    from conformance.items import case_of

    item_id = nodeid.split("[", 1)[1].rstrip("]")
    return {"id": item_id, "case": case_of(item_id), "check": "unknown", "backend": None, "device": None}
