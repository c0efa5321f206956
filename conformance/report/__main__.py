"""`python -m conformance.report`: merge runs into one comparison, or screenshot a report.

    python -m conformance.report merge reports/tf215 reports/torch23 reports/local -o reports/compare
    python -m conformance.report screenshot reports/local -o shots/
    python -m conformance.report recover reports/local/.journal-died-<time>.jsonl -o reports/local-recovered
    python -m conformance.report gate reports/main reports/local    # exit 1 when an item regressed

`merge` always exits 0 when it could merge; `gate` is the one to fail a CI job on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from conformance.report import gate, merge, screenshot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.report", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    merging = commands.add_parser("merge", help="build one comparison report from several runs")
    merging.add_argument("runs", nargs="*", type=Path, help="run folders holding results.json")
    merging.add_argument("--all", type=Path, metavar="FOLDER", dest="all_under",
                         help="also every run folder directly under FOLDER (e.g. reports)")
    merging.add_argument("-o", "--output", type=Path, required=True, help="folder for the comparison report")
    shooting = commands.add_parser("screenshot", help="render a report in headless Chromium to PNG files")
    shooting.add_argument("report", type=Path, help="a run or comparison folder holding index.html")
    shooting.add_argument("-o", "--output", type=Path, required=True, help="folder for the PNG files")
    shooting.add_argument("--case", action="append", default=[], help="also shoot this case's page (repeatable)")
    shooting.add_argument("--browser", default=None, help="browser executable (default: chromium on PATH)")
    recovering = commands.add_parser("recover", help="build the report of a run whose process died, from its journal")
    recovering.add_argument("journal", type=Path, help="the .journal-died-*.jsonl file the dead run left")
    recovering.add_argument("-o", "--output", type=Path, required=True, help="folder for the recovered report")
    gating = commands.add_parser("gate", help="exit 1 when an item that passed in BASELINE fails in CURRENT")
    gating.add_argument("baseline", type=Path, help="the baseline run's folder (holding results.json)")
    gating.add_argument("current", type=Path, help="this run's folder")
    arguments = parser.parse_args(argv)
    try:
        if arguments.command == "gate":
            return gate.gate(arguments.baseline, arguments.current)
        if arguments.command == "merge":
            found = sorted(path.parent for path in arguments.all_under.glob("*/results.json")) \
                if arguments.all_under else []
            runs = [run for run in [*arguments.runs, *found] if run.resolve() != arguments.output.resolve()]
            if not runs:
                raise merge.MergeError("no run folders to merge (give folders, or --all reports)")
            print(merge.merge(runs, arguments.output))
        elif arguments.command == "recover":
            from conformance.report.collector import recover

            if not arguments.journal.is_file():
                raise merge.MergeError(f"{arguments.journal}: no such journal file")
            print(recover(arguments.journal, arguments.output))
        else:
            for path in screenshot.shoot(arguments.report, arguments.output, arguments.case, arguments.browser):
                print(path)
    except (merge.MergeError, screenshot.ScreenshotError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
