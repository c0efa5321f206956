"""A regression gate: did an item that passed in a baseline run fail in this one?

    python -m conformance.report gate reports/main reports/local

Reads both runs' results.json (as the merge does) and lists every item that passed (or was an
expected deviation, xfailed) in the baseline and now fails, errors or crashed: exit status 1
with the list, 0 when there is none. Items new in the current run, items the current run did
not have, and items that failed in both are printed for information but do not fail the gate:
the gate is about what got worse.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conformance.report.merge import load_run

GOOD = ("passed", "xfailed")
BAD = ("failed", "error", "crashed")


def regressions(baseline: dict[str, Any], current: dict[str, Any]) -> dict[str, list[tuple[str, str, str]]]:
    """(item id, baseline status, current status and message) per kind of change."""
    before = {item["id"]: item for item in baseline["items"]}
    now = {item["id"]: item for item in current["items"]}
    found: dict[str, list[tuple[str, str, str]]] = {"regressed": [], "still_failing": [], "new": [], "gone": []}
    for item_id, item in sorted(now.items()):
        status = item.get("status", "?")
        message = (item.get("message") or item.get("failure") or "").split("\n")[0][:240]
        if item_id not in before:
            found["new"].append((item_id, "-", status))
        elif status in BAD and before[item_id].get("status") in GOOD:
            found["regressed"].append((item_id, before[item_id]["status"], f"{status}: {message}"))
        elif status in BAD and before[item_id].get("status") in BAD:
            found["still_failing"].append((item_id, before[item_id]["status"], status))
    found["gone"] = [(item_id, item.get("status", "?"), "-") for item_id, item in sorted(before.items())
                     if item_id not in now]
    return found


def gate(baseline_folder: Path, current_folder: Path) -> int:
    """Print the comparison; 1 when an item regressed, else 0."""
    found = regressions(load_run(baseline_folder), load_run(current_folder))
    for item_id, was, now in found["regressed"]:
        print(f"REGRESSED {item_id}: {was} in {baseline_folder}, now {now}")
    notes = {"still_failing": "failing in both", "new": "new here", "gone": "only in the baseline"}
    for kind, words in notes.items():
        if found[kind]:
            print(f"{len(found[kind])} item(s) {words}: {', '.join(row[0] for row in found[kind][:10])}"
                  f"{' ...' if len(found[kind]) > 10 else ''}")
    print(f"gate: {len(found['regressed'])} regression(s) against {baseline_folder}")
    return 1 if found["regressed"] else 0
