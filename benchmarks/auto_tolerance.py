"""Derived (`parity: auto`) against hand-set parity tolerances, over every shipped case.

    python benchmarks/auto_tolerance.py            # runs: pytest conformance --parity auto -n auto
    python benchmarks/auto_tolerance.py --report reports/auto-tolerance/results.json   # table only

Prints, per case: the hand-set band, the derived one, and the largest relative difference of any
result from the float64 replay, with the outcome counts of the run (every shipped case must
still pass or show its recorded deviation).
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LABEL = "auto-tolerance"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, help="read this results.json instead of running the suite")
    arguments = parser.parse_args()
    report = arguments.report
    if report is None:
        subprocess.run([sys.executable, "-m", "pytest", "conformance", "-n", "auto", "-q", "-p", "no:cacheprovider",
                        "--parity", "auto", "--report-label", LABEL], cwd=ROOT, check=False)
        report = ROOT / "reports" / LABEL / "results.json"
    items = json.loads(report.read_text())["items"]
    rows: dict[str, dict] = {}
    worst: dict[str, float] = collections.defaultdict(float)
    statuses = collections.Counter(item["status"] for item in items)
    for item in items:
        if item.get("kind") == "parity" and item.get("tolerance", {}).get("auto"):
            rows[item["case"]] = item["tolerance"]
            if item.get("max_rel_diff") is not None and item.get("status") == "passed":
                worst[item["case"]] = max(worst[item["case"]], item["max_rel_diff"])
    print(f"{'case':42} {'hand-set rtol':>13} {'atol':>8} {'derived rtol':>13} {'atol':>8} "
          f"{'derived/hand':>12} {'largest passing diff':>20}")
    for case, tolerance in sorted(rows.items()):
        hand = tolerance.get("hand_set") or {}
        ratio = tolerance["rtol"] / hand["rtol"] if hand.get("rtol") else float("nan")
        print(f"{case:42} {hand.get('rtol', float('nan')):13.1e} {hand.get('atol', float('nan')):8.1e} "
              f"{tolerance['rtol']:13.1e} {tolerance['atol']:8.1e} {ratio:12.2g} {worst.get(case, 0.0):20.1e}")
    print("outcomes:", dict(statuses))


if __name__ == "__main__":
    main()
