"""The one report writer: plain records in; `results.json`, `index.html` and one page per case out.

Every string from a case reaches HTML through Jinja2 with autoescaping on; pages render fully
on the server side (tables and SVG inline), so a report folder works offline and without
JavaScript. Every file is written beside its target and renamed over it, so an interrupted
write never leaves half a page.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from conformance.records import json_safe
from conformance.report.plots import curves_svg, fit_svg, loss_scale_svg, rates_svg, trajectory_svg

STATUSES = ("passed", "failed", "xfailed", "skipped", "error", "crashed")
SEVERITY = ("crashed", "error", "failed", "not run", "xfailed", "skipped", "passed")
RESULTS_FORMAT = 2
_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("conformance.report", "templates"),
    # ChainableUndefined: a record missing a field must not cost the report.
    autoescape=True, trim_blocks=True, lstrip_blocks=True, undefined=jinja2.ChainableUndefined,
    extensions=["jinja2.ext.do"],
)
_TEMPLATES.filters["status_class"] = lambda status: (status or "not run").replace(" ", "-")
_TEMPLATES.filters["number"] = lambda value, spec="%.10g": "non-finite" if value is None else spec % value


def write_run(folder: Path, entries: list[dict[str, Any]], meta: dict[str, Any]) -> Path:
    """Write results.json, index.html and cases/<case>.html for one run; returns index.html."""
    entries = sorted(entries, key=lambda entry: entry.get("id", ""))
    cases = case_files(entries)
    results = {"format": RESULTS_FORMAT, "meta": meta, "cases": cases, "items": entries}
    try:
        text = json.dumps(results, indent=1, allow_nan=False, default=str)
    except ValueError:  # a non-finite float some record let through: written as null, never lost
        text = json.dumps(json_safe(results), indent=1, allow_nan=False, default=str)
    atomic_write(folder / "results.json", text)
    overview = summarize(entries)
    for view in overview["cases"]:
        view |= cases.get(view["name"], {})
        page = render("case.html", meta=meta, case=view, columns=overview["columns"], root="../")
        atomic_write(folder / view["page"], page)
    _remove_stale_pages(folder, {view["page"] for view in overview["cases"]})
    return write_page(folder / "index.html", render("run.html", meta=meta, root="", **overview))


def render(template: str, **context: Any) -> str:
    return _TEMPLATES.get_template(template).render(statuses=STATUSES, **context)


def write_page(path: Path, html: str) -> Path:
    atomic_write(path, html)
    return path


def case_files(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per case: its source path, description, seeds and YAML text, kept with the results so a
    report (and a merge of reports) shows what was run even after the case file changes."""
    found: dict[str, dict[str, Any]] = {}
    for entry in entries:
        if entry["case"] in found:
            continue
        source = entry.get("source", "")
        found[entry["case"]] = {"source": source, "yaml": _read_case(source),
                                "description": entry.get("description"), "seeds": entry.get("seeds") or {},
                                "steps": entry.get("steps")}
    for entry in entries:  # a later item of the case may know what the first did not
        known = found[entry["case"]]
        known["description"] = known["description"] or entry.get("description")
        known["seeds"] = known["seeds"] or entry.get("seeds") or {}
        known["steps"] = known.get("steps") or entry.get("steps")
    return found


def page_name(case: str) -> str:
    """A file name for a case's page: readable, safe on every file system, unique per name."""
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "-", case).strip(".-")[:80] or "case"
    if readable != case:
        readable += "-" + hashlib.sha1(case.encode("utf-8")).hexdigest()[:8]
    return f"cases/{readable}.html"


def summarize(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The numbers and groupings the pages show, computed once from the plain records."""
    by_case: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for entry in entries:
        by_case[entry["case"]].append(entry)
    columns = sorted({(e["backend"], e["device"]) for e in entries if e.get("backend")},
                     key=lambda column: (column[1] != "cpu", column))
    cases = [_case_view(name, items, columns) for name, items in sorted(by_case.items())]
    per_backend: dict[str, Counter] = defaultdict(Counter)
    for entry in entries:
        per_backend[entry.get("backend") or "(case checks)"][entry.get("status", "not run")] += 1
    return {"cases": cases, "columns": columns,
            "totals": Counter(entry.get("status", "not run") for entry in entries),
            "per_backend": dict(sorted(per_backend.items())), "engines": _engines(entries),
            "determinism": _determinism(entries), "generated": _generated(cases)}


def _generated(cases: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The generated cases (--fuzz) as a table of their draws and outcomes, with how many
    diverged and how many had settled before their last epoch; None without any."""
    rows = []
    for view in cases:
        if not view["name"].startswith("fuzz-"):
            continue
        parity = [entry for entry in view["entries"] if entry.get("check") == "parity"]
        messages = [entry.get("message") or "" for entry in parity]
        settled = next((entry.get("replay_settled") for entry in parity if entry.get("replay_settled")), None)
        epochs = next((entry.get("epochs") for entry in parity if entry.get("epochs")), None)
        rows.append({"name": view["name"], "page": view["page"], "status": view["status"],
                     "draws": (view["entries"][0].get("description") or "").split(": ", 1)[-1],
                     "diverged": any(message.startswith("training diverged") for message in messages),
                     "settled": settled, "epochs": epochs,
                     "shrunk": [entry["shrunk_case"] for entry in view["entries"] if entry.get("shrunk_case")]})
    if not rows:
        return None
    return {"rows": rows, "diverged": sum(row["diverged"] for row in rows),
            "settled_early": sum(bool(row["settled"] and row["epochs"] and row["settled"] < row["epochs"])
                                 for row in rows)}


def _determinism(entries: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per backend and device (only with --determinism): results trained twice, and how many
    of them were bit-identical."""
    found: dict[str, dict[str, int]] = {}
    for entry in entries:
        if entry.get("deterministic") is not None:
            counts = found.setdefault(f"{entry['backend']}, {entry['device']}", {"checked": 0, "identical": 0})
            counts["checked"] += 1
            counts["identical"] += bool(entry["deterministic"])
    return dict(sorted(found.items()))


def worst(statuses: list[str]) -> str:
    """The most severe of several outcomes (a cell, a case, a case across runs)."""
    for status in SEVERITY:
        if status in statuses:
            return status
    return "passed"


def _case_view(name: str, items: list[dict[str, Any]], columns: list[tuple[str, str]]) -> dict[str, Any]:
    cells = {}
    for column in columns:
        found = {e["check"]: e for e in items if (e.get("backend"), e.get("device")) == column}
        if found:
            cells[column] = {"checks": found, "status": worst([e.get("status", "not run") for e in found.values()])}
    case_checks = {e["check"]: e for e in items if not e.get("backend")}
    pairwise = case_checks.get("pairwise", {})
    results = [_with_lstsq(e, items) for e in items if e.get("kind") == "parity"]
    trajectories = [e for e in items if e.get("kind") == "trajectory"]
    names = pairwise.get("parameter_names") or _names(results)
    return {
        "name": name, "page": page_name(name), "cells": cells, "case_checks": case_checks,
        "status": worst([e.get("status", "not run") for e in items]), "entries": items,
        "parameter_names": names, "columns": parameter_columns(results, len(names)),
        "tensors": tensor_summary(results, names) if len(names) > SHOWN_PARAMETERS else None,
        "results": results, "pairwise": pairwise, "certified": case_checks.get("certified"),
        "plot": curves_svg(results, pairwise.get("replay")) if results else "",
        "fit_plot": _fit_plot(results),
        "rate_plot": rates_svg(results, pairwise.get("replay")) if results else "",
        "loss_scale_plot": loss_scale_svg(results, pairwise.get("replay")) if results else "",
        "precision": [r for r in results if r.get("precision")],
        "replicas": [r for r in results if r.get("replicas")],
        "trajectories": trajectories, "trajectory_plot": trajectory_svg(trajectories),
        "expected": [e for e in items if e.get("expected")],
        "failures": [e for e in items if e.get("status") in ("failed", "error", "crashed")],
    }


def _fit_plot(results: list[dict[str, Any]]) -> str:
    """The picture of the data and every fit, for cases with one feature (their parity records
    carry the data)."""
    data = next((result["data"] for result in results if result.get("data")), None)
    return fit_svg(data, results) if data else ""


def _with_lstsq(result: dict[str, Any], items: list[dict[str, Any]]) -> dict[str, Any]:
    """A parity record with its least-squares sibling's numbers beside it (one table row)."""
    sibling = next((e for e in items if e.get("kind") == "lstsq" and e.get("backend") == result["backend"]
                    and e.get("device") == result["device"]), {})
    return result | {"lstsq_rel_diff": sibling.get("max_rel_diff"), "lre_certified": sibling.get("lre_certified"),
                     "lstsq_tolerance": sibling.get("tolerance"), "lstsq_status": sibling.get("status")}


SHOWN_PARAMETERS = 8  # a case page's parameter table shows all of up to this many parameters


def parameter_columns(results: list[dict[str, Any]], count: int, shown: int = SHOWN_PARAMETERS) -> list[int]:
    """The parameters the case page's table shows, in layout order: all of a small model's; of
    a larger one (hidden layers), the `shown` farthest from the replay in any result, relative
    to the replay's largest parameter (the table's "vs replay" column covers them all)."""
    if count <= shown:
        return list(range(count))
    replay = _array(results[0].get("replay") if results else None, count)
    scale = float(np.nanmax(np.abs(replay))) if np.isfinite(replay).any() else 1.0
    apart = np.zeros(count)
    for result in results:
        with np.errstate(invalid="ignore"):
            distance = np.abs(_array(result.get("params"), count) - replay) / (scale or 1.0)
        apart = np.fmax(apart, np.where(np.isnan(distance), np.inf, distance))
    return sorted(int(index) for index in np.argsort(-apart, kind="stable")[:shown])


def tensor_summary(results: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Per result, the largest |result - replay| in each parameter tensor (`hidden1.kernel`,
    `hidden1.bias`, ..., named by what precedes `[` in each parameter's name), relative to the
    replay's largest parameter: a network's whole parameter table in a few columns."""
    tensors = list(dict.fromkeys(name.split("[")[0] for name in names))
    where = {tensor: [index for index, name in enumerate(names) if name.split("[")[0] == tensor] for tensor in tensors}
    replay = _array(results[0].get("replay") if results else None, len(names))
    scale = float(np.nanmax(np.abs(replay))) if np.isfinite(replay).any() else 1.0
    rows = []
    for result in results:
        with np.errstate(invalid="ignore"):
            apart = np.abs(_array(result.get("params"), len(names)) - replay) / (scale or 1.0)
        rows.append({"label": f"{result['backend']}, {result['device']}", "status": result.get("status"),
                     "values": [float(np.max(apart[where[tensor]])) for tensor in tensors]})
    return {"tensors": tensors, "sizes": [len(where[tensor]) for tensor in tensors], "rows": rows}


def _array(values: list[float | None] | None, count: int) -> np.ndarray:
    if not values or len(values) != count:
        return np.full(count, np.nan)
    return np.asarray([np.nan if value is None else value for value in values], dtype=np.float64)


def _names(results: list[dict[str, Any]]) -> list[str]:
    size = len(results[0].get("params") or []) if results else 0
    return [f"p[{index}]" for index in range(size)]


PER_CASE_INFO = ("compile_seconds", "xla", "torch_compile")  # shown on each case's page, not per backend


def _engines(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Distinct (backend, device) with the framework's own details: versions, device names,
    switches, and the total compile time of the compiled backends."""
    seen: dict[str, dict[str, Any]] = {}
    for entry in entries:
        if entry.get("info"):
            key = f"{entry['backend']}, {entry['device']}"
            info = {name: value for name, value in entry["info"].items() if name not in PER_CASE_INFO}
            engine = seen.setdefault(key, {"name": key, "info": info})
            if entry["info"].get("compile_seconds") is not None:
                total = engine["info"].get("compile seconds, all cases", 0.0) + entry["info"]["compile_seconds"]
                engine["info"]["compile seconds, all cases"] = round(total, 2)
    return list(seen.values())


def _remove_stale_pages(folder: Path, current: set[str]) -> None:
    """Pages of cases that are not in this run (left by an earlier run with the same label)."""
    for page in (folder / "cases").glob("*.html"):
        if f"cases/{page.name}" not in current:
            page.unlink(missing_ok=True)


def _read_case(source: str) -> str:
    try:
        return Path(source).read_text(encoding="utf-8")[:20000]
    except (OSError, UnicodeDecodeError):
        return "(case file not readable)"


def atomic_write(path: Path, text: str) -> None:
    """Write beside the target and rename over it: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
