"""The suite's mutation score: the shipped cases against each deliberately wrong framework.

    python benchmarks/mutation.py                      # every mutant of tests/mutants.py
    python benchmarks/mutation.py torch-sgd-lr-1e-4    # some of them
    python benchmarks/mutation.py --cases cases/optimizers --workers 2

For each mutant, runs `pytest conformance -p tests.mutants` with CONFORMANCE_MUTANT set, on the
backends the mutant changes that a default run selects (the compiled ones only where the mutant
changes nothing else), and reads the run's results.json. A mutant is caught when at least one
item of a backend it changes fails (an expected deviation beyond its bound fails too; an xfail
does not count). First an honest run of the same backends: an item that fails without a mutant
is not evidence, and is left out (and printed). Prints, per mutant, caught or missed and by
which items, then the score; `--json FILE` keeps it all.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.mutants import BY_NAME, CATALOGUE, Mutant  # noqa: E402

COMPILED = ("keras_xla", "gradient_tape_xla", "torch_compile")


def backends_to_run(mutant: Mutant) -> list[str]:
    plain = [name for name in mutant.backends if name not in COMPILED]
    return plain or list(mutant.backends)


def run(backends: list[str], mutant: str | None, cases: list[str], workers: str, reports: Path) -> dict:
    """One pytest run; {item id: (status, backend, message)} and the seconds it took."""
    label = mutant or "honest"
    command = [sys.executable, "-m", "pytest", str(ROOT / "conformance"), "-q", "-n", workers, "-p", "tests.mutants",
               "--reports-dir", str(reports), "--report-label", label, "-p", "no:cacheprovider"]
    command += [argument for name in backends for argument in ("--backend", name)]
    command += [argument for case in cases for argument in ("--cases", case)]
    environment = os.environ | {"CONFORMANCE_MUTANT": mutant or "", "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    results = reports / label / "results.json"
    if not results.exists():
        raise RuntimeError(f"{label}: pytest wrote no results (exit {completed.returncode}):\n"
                           f"{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}")
    items = json.loads(results.read_text())["items"]
    return {"seconds": seconds, "items": {item["id"]: (item["status"], item.get("backend"),
                                                       (item.get("message") or "").split("\n")[0][:300])
                                          for item in items}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/mutation.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("mutants", nargs="*", help="names from tests/mutants.py (default: all)")
    parser.add_argument("--cases", action="append", default=[], help="case files or folders (default: cases/)")
    parser.add_argument("--workers", default="2", help="pytest -n (default 2)")
    parser.add_argument("--json", type=Path, help="write the per-mutant results here")
    options = parser.parse_args(argv)
    unknown = [name for name in options.mutants if name not in BY_NAME]
    if unknown:
        parser.error(f"not in the catalogue: {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
    chosen = [BY_NAME[name] for name in options.mutants] or CATALOGUE
    reports = Path(tempfile.mkdtemp(prefix="conformance-mutation-"))
    union = sorted({name for mutant in chosen for name in backends_to_run(mutant)})
    honest = run(union, None, options.cases, options.workers, reports)
    failing_anyway = {item for item, (status, _, _) in honest["items"].items() if status == "failed"}
    listed = ": " + ", ".join(sorted(failing_anyway)) if failing_anyway else ""
    print(f"honest run ({', '.join(union)}): {len(honest['items'])} items in {honest['seconds']:.0f} s, "
          f"{len(failing_anyway)} failing without a mutant{listed}")
    rows = []
    for mutant in chosen:
        backends = backends_to_run(mutant)
        found = run(backends, mutant.name, options.cases, options.workers, reports)
        caught = sorted(item for item, (status, backend, _) in found["items"].items()
                        if status == "failed" and backend in mutant.backends and item not in failing_anyway)
        rows.append({"mutant": mutant.name, "bug": mutant.bug, "backends": backends, "caught": bool(caught),
                     "items": caught, "messages": {item: found["items"][item][2] for item in caught[:3]},
                     "seconds": round(found["seconds"], 1)})
        verdict = f"CAUGHT by {len(caught)} item(s)" if caught else "MISSED"
        print(f"{mutant.name:42s} {verdict:24s} {found['seconds']:5.0f} s  {', '.join(caught[:4])}"
              f"{' ...' if len(caught) > 4 else ''}", flush=True)
    score = sum(row["caught"] for row in rows)
    percent = 100 * score / max(len(rows), 1)
    print(f"\nmutation score: {score}/{len(rows)} caught ({percent:.0f}%); reports under {reports}")
    if options.json:
        options.json.write_text(json.dumps({"score": [score, len(rows)], "mutants": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
