"""Collects the items' plain-data records on the controller and writes the report at the end.

While the run goes on, every item's start and record are also appended to a journal
(`<report folder>/.journal.jsonl`), deleted once the report is written. A run whose process
dies outright (a backend that aborts without pytest-xdist to isolate it) leaves the journal
behind; the next run in that folder keeps it as `.journal-died-<time>.jsonl` and says how to
turn it into a report (`python -m conformance.report recover`), with the item that was running
marked crashed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conformance import environment, timing

ITEM_MARK = "test_parity.py::test_case["
JOURNAL = ".journal.jsonl"
DEVICES = pytest.StashKey[dict]()  # per backend: device kinds looked for and found (set where items are planned)
OPTIONS = pytest.StashKey[dict]()  # the run's options as the report shows them (set by the plugin)
NOT_RERUN: dict[str, str] = {}  # nodeid -> the item whose worker died training the same result (the scheduler's)


class ReportCollector:
    """Registered on the controller only (not on xdist workers): one writer per run."""

    def __init__(self, config: pytest.Config, folder: Path, started: float) -> None:
        self.config = config
        self.folder = folder
        self.started = started
        self.entries: dict[str, dict[str, Any]] = {}
        self.expected_ids: set[str] = set()
        self.devices: dict[str, Any] = {}
        self.worker_time: dict[str, dict[str, float]] = {}  # per xdist worker: timing.summary()
        self.notice = self._keep_journal_of_a_dead_run()
        self.journal = (folder / JOURNAL).open("w", encoding="utf-8")
        self._log({"meta": self._meta(pytest.ExitCode.INTERRUPTED, [])})

    def _keep_journal_of_a_dead_run(self) -> str | None:
        stale = self.folder / JOURNAL
        self.folder.mkdir(parents=True, exist_ok=True)
        if not stale.exists():
            return None
        died = time.localtime(stale.stat().st_mtime)
        kept = stale.with_name(time.strftime(".journal-died-%Y%m%dT%H%M%S.jsonl", died))
        stale.rename(kept)
        return (f"the previous run in {self.folder} died before writing its report; what it finished is in "
                f"{kept}: python -m conformance.report recover {kept} -o {self.folder}-recovered")

    def _log(self, line: dict[str, Any]) -> None:
        self.journal.write(json.dumps(line, default=str) + "\n")
        self.journal.flush()

    def pytest_report_header(self) -> list[str]:
        return [f"conformance: {self.notice}"] if self.notice else []

    def pytest_runtest_logstart(self, nodeid: str) -> None:
        if ITEM_MARK in nodeid:
            self._log({"running": nodeid})

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.expected_ids.update(item.nodeid for item in session.items if ITEM_MARK in item.nodeid)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node: Any, ids: list[str]) -> None:
        self.expected_ids.update(nodeid for nodeid in ids if ITEM_MARK in nodeid)

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        output = getattr(node, "workeroutput", {})
        self.devices.update(output.get("conformance_devices") or {})
        if output.get("conformance_time"):
            worker = getattr(getattr(node, "gateway", None), "id", None) or f"worker {len(self.worker_time)}"
            self.worker_time[str(worker)] = output["conformance_time"]

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if ITEM_MARK not in report.nodeid:
            return
        status = _status(report)
        if status is None:
            return
        record = dict(report.user_properties).get("conformance") or _record_from_nodeid(report.nodeid)
        if status == "failed" and record.get("crashed"):
            status = "crashed"  # a backend's worker process died while training this item's result
        entry = self.entries.setdefault(report.nodeid, {**record, "nodeid": report.nodeid, "duration": 0.0})
        entry["duration"] += report.duration
        if entry.get("status") in (None, "passed") or status in ("error", "crashed"):
            entry["status"] = status
        if status in ("failed", "error", "crashed"):
            entry["failure"] = report.longreprtext[-4000:]
        if status == "xfailed":
            entry["xfail_reason"] = getattr(report, "wasxfail", "")
        self._log({"entry": entry})

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        self.journal.close()
        if not self.entries and not self.expected_ids:
            (self.folder / JOURNAL).unlink(missing_ok=True)
            return
        self._not_rerun()
        missing = sorted(self.expected_ids - set(self.entries))
        from conformance.report.writer import write_run  # jinja: controller only, at the end

        path = write_run(self.folder, list(self.entries.values()), self._meta(exitstatus, missing))
        (self.folder / JOURNAL).unlink(missing_ok=True)
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_sep("-", f"conformance report: {path}")

    def _not_rerun(self) -> None:
        """Items left out after a worker died training their result (NOT_RERUN): crashed."""
        for nodeid, running in NOT_RERUN.items():
            if nodeid not in self.entries:
                message = (f"not run: the worker died in {running} while training the same result, "
                           f"and would die again")
                self.entries[nodeid] = {**_record_from_nodeid(nodeid), "nodeid": nodeid, "status": "crashed",
                                        "failure": message, "message": message, "duration": 0.0}

    def _options(self) -> dict[str, Any]:
        return self.config.stash.get(OPTIONS, {})

    def _meta(self, exitstatus: int, missing: list[str]) -> dict[str, Any]:
        interrupted = int(exitstatus) == pytest.ExitCode.INTERRUPTED
        return {
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
            "determinism": bool(self.config.getoption("determinism", False)),
            "expectations": [str(path) for path in self._options().get("expectations", [])],
            "time": dict(sorted(self.worker_time.items())) or {"main": timing.summary()},
        }


def recover(journal: Path, output: Path) -> Path:
    """A report from the journal of a run that died: what finished, and the item that was
    running when the process went down marked crashed."""
    meta: dict[str, Any] = {}
    entries: dict[str, dict[str, Any]] = {}
    running: list[str] = []
    for line in journal.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the last line may be half-written
        if "meta" in record:
            meta = record["meta"]
        elif "running" in record:
            running.append(record["running"])
        elif "entry" in record:
            entries[record["entry"]["nodeid"]] = record["entry"]
    for nodeid in running:
        if nodeid not in entries or entries[nodeid].get("status") is None:
            entries[nodeid] = {**_record_from_nodeid(nodeid), "nodeid": nodeid, "status": "crashed",
                               "message": "the test process died while this item ran (no report came back); "
                                          "run with pytest-xdist (-n 1 or more) so that a crash only loses its item"}
    meta |= {"complete": False, "interrupted": False, "exit_status": -1, "recovered_from": str(journal),
             "not_run": [nodeid for nodeid in running if nodeid not in entries]}
    from conformance.report.writer import write_run

    return write_run(output, list(entries.values()), meta)


def _status(report: pytest.TestReport) -> str | None:
    if report.failed and report.when not in ("setup", "call", "teardown") and "crashed while running" in \
            report.longreprtext[:500]:
        return "crashed"  # pytest-xdist's report for an item whose worker died (its phase is "???")
    if report.when == "call":
        if hasattr(report, "wasxfail"):
            return "xfailed" if report.skipped else "failed"
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
