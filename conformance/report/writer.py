"""The one report writer: plain records in, `results.json` and `index.html` out, atomically.

Every string from a case reaches HTML through Jinja2 with autoescaping on; the page renders
fully on the server side (tables and SVG inline), so it works offline and without JavaScript.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import jinja2

from conformance.report.plots import curves_svg

STATUSES = ("passed", "failed", "xfailed", "skipped", "error", "crashed")
_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("conformance.report", "templates"),
    autoescape=True, trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined,
)


def write_run(folder: Path, entries: list[dict[str, Any]], meta: dict[str, Any]) -> Path:
    """Write results.json and index.html for one run; returns the HTML path."""
    entries = sorted(entries, key=lambda entry: entry.get("id", ""))
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(folder / "results.json", json.dumps({"format": 1, "meta": meta, "items": entries},
                                                       indent=1, allow_nan=False, default=str))
    html = _TEMPLATES.get_template("run.html").render(meta=meta, **summarize(entries))
    _atomic_write(folder / "index.html", html)
    return folder / "index.html"


def summarize(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The numbers and groupings the page shows, computed once from the plain records."""
    by_case: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for entry in entries:
        by_case[entry["case"]].append(entry)
    columns = sorted({(e["backend"], e["device"]) for e in entries if e.get("backend")},
                     key=lambda column: (column[1] != "cpu", column))
    cases = [_case_view(name, items, columns) for name, items in sorted(by_case.items())]
    per_backend: dict[str, Counter] = defaultdict(Counter)
    for entry in entries:
        per_backend[entry.get("backend") or "(case checks)"][entry.get("status", "not run")] += 1
    return {"cases": cases, "columns": columns, "statuses": STATUSES,
            "totals": Counter(entry.get("status", "not run") for entry in entries),
            "per_backend": dict(sorted(per_backend.items())), "engines": _engines(entries)}


def _case_view(name: str, items: list[dict[str, Any]], columns: list[tuple[str, str]]) -> dict[str, Any]:
    cells = {}
    for column in columns:
        found = {e["check"]: e for e in items if (e.get("backend"), e.get("device")) == column}
        if found:
            cells[column] = {"checks": found, "status": _worst([e.get("status", "not run") for e in found.values()])}
    case_checks = {e["check"]: e for e in items if not e.get("backend")}
    results = [e for e in items if e.get("kind") == "parity"]
    pairwise = case_checks.get("pairwise", {})
    source = items[0].get("source", "")
    return {
        "name": name, "anchor": "case-" + "".join(c if c.isalnum() else "-" for c in name),
        "source": source, "yaml": _read_case(source), "cells": cells, "case_checks": case_checks,
        "status": _worst([e.get("status", "not run") for e in items]), "entries": items,
        "parameter_names": pairwise.get("parameter_names") or _names(results),
        "results": results, "pairwise": pairwise,
        "certified": case_checks.get("certified"),
        "plot": curves_svg(results, pairwise.get("replay")) if results else "",
        "expected": [e for e in items if e.get("expected")],
    }


def _names(results: list[dict[str, Any]]) -> list[str]:
    if not results:
        return []
    size = len(results[0].get("params") or [])
    return [f"p[{index}]" for index in range(size)]


def _worst(statuses: list[str]) -> str:
    for status in ("crashed", "error", "failed", "not run", "xfailed", "skipped", "passed"):
        if status in statuses:
            return status
    return "passed"


def _engines(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Distinct (backend, device, framework details) seen in the run: versions, device names."""
    seen: dict[str, dict[str, Any]] = {}
    for entry in entries:
        if entry.get("info"):
            key = f"{entry['backend']}, {entry['device']}"
            seen.setdefault(key, {"name": key, "info": entry["info"]})
    return list(seen.values())


def _read_case(source: str) -> str:
    try:
        return Path(source).read_text(encoding="utf-8")[:20000]
    except (OSError, UnicodeDecodeError):
        return "(case file not readable)"


def _atomic_write(path: Path, text: str) -> None:
    """Write beside the target and rename over it: readers never see half a file."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
