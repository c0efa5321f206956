"""Benchmark: the harness's cost next to each framework's bare loop, measured side by side.

    python benchmarks/run.py            # everything (well over 25 minutes on 2 cores; --quick for the short one)
    python benchmarks/run.py --quick    # per-step ratios and memory only

Prints ratios (harness / floor), not just absolute times: the training arithmetic here is tiny,
so nearly all time is framework overhead, and the question is whether the suite adds its own.
Each backend is measured in its own process (imports paid once there, peak memory its own).

This file is the entry point, both for you and for those processes (the internal options
`--one BACKEND` and `--growth`); each section lives in a file of its own, in the order printed:

    per_step.py       per step against the bare loop; the references' share; import and memory
    compiled.py       the compiled backends against their bare compiled loops; compile time
    keras_workers.py  Keras 3 worker processes: start-up, round trip, per step, the pipe's cost
    schedules.py      what a learning-rate schedule or clipping costs per step  (not in --quick)
    hidden.py         hidden layers: harness / bare loop beside the linear model's (not in --quick)
    precision.py      mixed precision: each backend's ms per step in bfloat16 and float16 against
                      float32                                                 (not in --quick)
    data_parallel.py  data parallelism: ms per step with 2 and 3 replicas against one
                                                                             (not in --quick)
    growth.py         cost against n and against epochs                       (not in --quick)
    suite_wall.py     the whole suite's wall time: -n 0 / -n auto, --fuzz, each backend added
                                                                             (not in --quick)
    floors.py         the bare framework loops the harness is timed against, for any model
    _runner.py        what they share: problems, sizes, timing, running this file in a child

Run it as a script (`python benchmarks/run.py`): the sections import each other by their own
names, from this folder, which Python puts on `sys.path` for a script.
"""

from __future__ import annotations

import argparse
import json

import compiled
import data_parallel
import growth
import hidden
import keras_workers
import per_step
import precision
import schedules
import suite_wall
from _runner import BACKENDS, COMPILED, OTHERS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="per-step ratios and memory only")
    parser.add_argument("--one", choices=BACKENDS + OTHERS + COMPILED, help=argparse.SUPPRESS)  # internal
    parser.add_argument("--growth", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.one:  # in a child process: measure one backend, print the numbers as JSON
        print(json.dumps(compiled.measure_compiled(arguments.one) if arguments.one in COMPILED else
                         per_step.measure_backend(arguments.one)))
        return
    if arguments.growth:
        print(json.dumps(growth.growth()))
        return
    per_step.print_section()
    compiled.print_section()
    keras_workers.print_section()
    if arguments.quick:
        return
    schedules.print_section()
    hidden.print_section()
    precision.print_section()
    data_parallel.print_section()
    growth.print_section()
    suite_wall.print_section()


if __name__ == "__main__":
    main()
