"""One comparison across runs: the same cases under other framework versions or machines.

Reads the `results.json` of each run (never the HTML), lines the runs' items up by item id, and
marks what changed between runs: an outcome that differs, or final parameters that moved by
more than the case's parity tolerance.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from conformance.report import writer

VERSION_KEYS = ("tensorflow", "keras", "torch", "numpy", "scipy", "python")


class MergeError(ValueError):
    """A run folder that cannot be merged: no results.json, or not one this suite wrote."""


def load_run(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "results.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MergeError(f"{path}: not found; expected the folder of a run, e.g. reports/local") from None
    except (OSError, ValueError) as error:
        raise MergeError(f"{path}: cannot be read as JSON ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("items"), list) or "meta" not in data:
        raise MergeError(f"{path}: expected a results file written by the conformance suite")
    data["folder"] = Path(folder)
    return data


def merge(folders: list[Path], output: Path) -> Path:
    """Write OUTPUT/index.html, OUTPUT/results.json and one page per case; returns index.html."""
    runs = [load_run(folder) for folder in folders]
    labels = _unique_labels(runs)
    comparison = compare(runs, labels)
    writer.atomic_write(output / "results.json", json.dumps(
        {"format": writer.RESULTS_FORMAT, "kind": "comparison", "runs": comparison["runs"],
         "cases": comparison["cases"]}, indent=1, allow_nan=False, default=str))
    for case in comparison["cases"]:
        page = writer.render("compare_case.html", case=case, runs=comparison["runs"], root="../")
        writer.atomic_write(output / case["page"], page)
    for run, data in zip(comparison["runs"], runs):
        run["link"] = os.path.relpath(Path(data["folder"]) / "index.html", output)
    return writer.write_page(output / "index.html", writer.render("compare.html", root="", **comparison))


def compare(runs: list[dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    """Plain data for the comparison pages: runs, then per case its items run by run, and changes."""
    by_case: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for label, run in zip(labels, runs):
        for entry in run["items"]:
            by_case.setdefault(entry["case"], {}).setdefault(entry["id"], {})[label] = entry
    cases = []
    for name in sorted(by_case):
        rows = [_row(item_id, per_run, labels) for item_id, per_run in sorted(by_case[name].items())]
        sources = [run.get("cases", {}).get(name, {}) for run in runs]
        cases.append({
            "name": name, "page": writer.page_name(name), "rows": rows,
            "status": {label: _case_status([row["status"][label] for row in rows]) for label in labels},
            "changes": [change for row in rows for change in row["changes"]],
            "description": next((s.get("description") for s in sources if s.get("description")), None),
            "yaml": _case_texts(labels, sources),
        })
    return {"runs": [_run_summary(label, run) for label, run in zip(labels, runs)], "labels": labels,
            "cases": cases, "changed": sum(bool(case["changes"]) for case in cases)}


def _row(item_id: str, per_run: dict[str, dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    status = {label: per_run[label].get("status", "not run") if label in per_run else "absent" for label in labels}
    present = [label for label in labels if label in per_run]
    changes = []
    outcomes = {status[label] for label in present}
    if len(outcomes) > 1:
        changes.append(f"{item_id}: " + ", ".join(f"{status[label]} in {label}" for label in present))
    moved = _moved(item_id, per_run, present)
    if moved and moved["message"]:
        changes.append(moved["message"])
    first = per_run[present[0]]
    return {"id": item_id, "check": first.get("check"), "backend": first.get("backend"),
            "device": first.get("device"), "status": status, "changes": changes, "moved": moved,
            "max_rel_diff": {label: per_run[label].get("max_rel_diff") for label in present},
            "params": {label: per_run[label].get("params") for label in present
                       if per_run[label].get("kind") == "parity"}}


def _moved(item_id: str, per_run: dict[str, dict[str, Any]], present: list[str]) -> dict[str, Any] | None:
    """Final parameters of a parity item that differ between two runs by more than the case's
    parity tolerance (the same test the parity check applies within one run)."""
    with_params = [label for label in present if per_run[label].get("kind") == "parity"
                   and per_run[label].get("params") and None not in per_run[label]["params"]]
    if len(with_params) < 2:
        return None
    base = with_params[0]
    reference = np.asarray(per_run[base]["params"], dtype=float)
    tolerance = per_run[base].get("tolerance") or {"rtol": 0.0, "atol": 0.0}
    largest, worst_label = 0.0, None
    outside = []
    for label in with_params[1:]:
        values = np.asarray(per_run[label]["params"], dtype=float)
        if values.shape != reference.shape:
            outside.append(label)
            continue
        relative = float(np.max(np.abs(values - reference) / np.maximum(np.abs(reference), np.finfo(float).tiny)))
        if relative >= largest:
            largest, worst_label = relative, label
        if np.any(np.abs(values - reference) > tolerance["atol"] + tolerance["rtol"] * np.abs(reference)):
            outside.append(label)
    message = None
    if outside:
        message = (f"{item_id}: final parameters moved by more than rtol {tolerance['rtol']:.1e}, "
                   f"atol {tolerance['atol']:.1e} between {base} and {', '.join(outside)} "
                   f"(largest relative difference {largest:.2e})")
    return {"largest_rel_diff": largest, "between": [base, worst_label], "outside": outside, "message": message}


def _case_status(statuses: list[str]) -> str:
    present = [status for status in statuses if status != "absent"]
    return writer.worst(present) if present else "absent"


def _case_texts(labels: list[str], sources: list[dict[str, Any]]) -> dict[str, str]:
    """The case file as each run read it; once, when every run read the same text."""
    texts = {label: source["yaml"] for label, source in zip(labels, sources) if source.get("yaml")}
    if len(set(texts.values())) == 1:
        return {"every run": next(iter(texts.values()))}
    return texts


def _run_summary(label: str, run: dict[str, Any]) -> dict[str, Any]:
    meta = run["meta"]
    totals: dict[str, int] = {}
    for entry in run["items"]:
        totals[entry.get("status", "not run")] = totals.get(entry.get("status", "not run"), 0) + 1
    return {"label": label, "folder": str(run["folder"]), "complete": meta.get("complete", False),
            "started": meta.get("started"), "duration": meta.get("duration"), "command": meta.get("command"),
            "versions": {key: (meta.get("versions") or {}).get(key) for key in VERSION_KEYS},
            "platform": (meta.get("host") or {}).get("platform"), "totals": totals}


def _unique_labels(runs: list[dict[str, Any]]) -> list[str]:
    """Each run's label, made unique by its folder name where two runs share one."""
    labels = []
    for run in runs:
        label = str(run["meta"].get("label") or run["folder"].name)
        if label in labels:
            label = f"{label} ({run['folder']})"
        labels.append(label)
    return labels
