"""The whole suite's wall time: where the time goes, generated cases, and which backends to select.

Sections "The default suite", "Generated cases" and "The run of the shipped cases" of
`benchmarks/run.py` (not in `--quick`). Each runs `pytest conformance` as a subprocess and reads
the run's results.json, where every test process records what it spent on imports, training,
planning, references and the harness: with -n 0 and -n auto, the share of the wall time that
is the frameworks' (imports + training) rather than the suite's, and how long the report takes
to write; -n auto again with every worker's OpenMP threads on every core, against the workers'
shared cores (environment.share_cores); the cost of a generated case (--fuzz); and the wall
time of the shipped cases with each optional backend added to the v1 backends (torch_compile
first with an empty inductor cache, as on a new machine), which is how the default selection
was chosen.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from _runner import BACKENDS, ROOT, timed


def suite_wall(workers: str, only: tuple[str, ...] = (), label: str = "", env: dict | None = None,
               extra: tuple[str, ...] = ()) -> dict:
    """The suite's wall time (default selection, or only these backends), and where each test
    process spent it (its results.json)."""
    label = label or f"bench-n{workers}"
    selection = [argument for backend in only for argument in ("--backend", backend)]
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pytest", "conformance", "-q", "-p", "no:cacheprovider", "-n", workers,
                    "--report-label", label, *selection, *extra], cwd=ROOT, capture_output=True, check=False,
                   env=os.environ | (env or {}))
    wall = time.perf_counter() - started
    data = json.loads((ROOT / "reports" / label / "results.json").read_text())
    processes = data["meta"]["time"]
    total = {key: sum(spent[key] for spent in processes.values()) for key in next(iter(processes.values()))}
    from conformance.report.writer import write_run

    report = timed(write_run, ROOT / "reports" / label, data["items"], data["meta"])
    # Every process could have worked for the whole wall time: that is the time there was to spend.
    available = wall * len(processes)
    return {"workers": workers, "processes": len(processes), "wall_s": wall, "report_s": report,
            "total": total, "share": (total["imports"] + total["training"]) / available,
            "outside_s": available - total["wall"]}


def print_section() -> None:
    """Run the suite for each of the three tables, printing each row as it is measured."""
    print("\nThe default suite (pytest conformance): seconds summed over test processes; the share is "
          "imports + training over (wall x processes)")
    for workers in ("0", "auto"):
        row = suite_wall(workers)
        total = row["total"]
        print(f"  -n {workers:4}: wall {row['wall_s']:5.1f} s x {row['processes']} process(es); imports "
              f"{total['imports']:5.1f}, training {total['training']:5.1f}, planning {total['planning']:4.1f}, "
              f"references {total['references']:4.1f}, harness {total['harness']:4.1f}, outside the processes' "
              f"pytest session (start, exit, report) {row['outside_s']:4.1f}; report writing alone "
              f"{row['report_s']:4.2f} s; imports + training {row['share']:.0%}")
    cores = str(os.cpu_count() or 1)
    every_core = suite_wall("auto", label="bench-threads", env={"OMP_NUM_THREADS": cores})
    print(f"  -n auto with each worker's OpenMP threads on every core (OMP_NUM_THREADS={cores}, the default "
          f"before the workers shared the cores): wall {every_core['wall_s']:5.1f} s, "
          f"{every_core['wall_s'] / row['wall_s']:4.2f}x the shared run's; training "
          f"{every_core['total']['training']:5.1f} s against {row['total']['training']:5.1f} s")

    print("\nGenerated cases (--fuzz 20 --fuzz-seed 0, no shipped cases, default backends, -n auto)")
    with tempfile.TemporaryDirectory() as empty:
        row = suite_wall("auto", label="bench-fuzz", extra=("--fuzz", "20", "--fuzz-seed", "0", "--cases", empty))
    print(f"  wall {row['wall_s']:5.1f} s for 20 cases: {row['wall_s'] / 20:4.2f} s per generated case "
          f"(training {row['total']['training'] / 20:4.2f} s and references {row['total']['references'] / 20:4.2f} s "
          f"per case, summed over processes)")

    print("\nThe run of the shipped cases (-n auto) with and without the compiled backends, one after another; "
          "torch_compile first with an empty inductor cache (a new machine), then with the cache it left")
    baseline = None
    with tempfile.TemporaryDirectory() as cache:
        for name, only in (("v1 backends only", BACKENDS), ("v1 + jax", BACKENDS + ("jax",)),
                           ("v1 + keras_xla", BACKENDS + ("keras_xla",)),
                           ("v1 + gradient_tape_xla", BACKENDS + ("gradient_tape_xla",)),
                           ("v1 + keras_jax", BACKENDS + ("keras_jax",)),
                           ("v1 + keras_torch", BACKENDS + ("keras_torch",)),
                           ("default (v1, both XLA, jax, keras_jax, keras_torch)", ()),
                           ("v1 + torch_compile, cold cache", BACKENDS + ("torch_compile",)),
                           ("v1 + torch_compile, warm cache", BACKENDS + ("torch_compile",))):
            wall = suite_wall("auto", only, label="bench-selection", env={"TORCHINDUCTOR_CACHE_DIR": cache})["wall_s"]
            baseline = baseline or wall
            print(f"  {name:52}: wall {wall:5.1f} s, {wall / baseline:4.2f}x the v1 backends' run")
