"""Cost growth: the torch backend's and the float64 replay's time against n and against epochs.

Section "Cost growth" of `benchmarks/run.py` (not in `--quick`). Shows that cost grows linearly
in steps (epochs x batches per epoch) and, for large n, in n, with nothing worse hiding in the
harness or the references: one epoch at batch 1024 for n from 10^3 to 10^6 (10 features), then
6 points for 100, 500 and 2000 epochs. Measured in a child process of its own
(`run.py --growth`), after a first small case has paid torch's first-use costs.
"""

from __future__ import annotations

from _runner import in_child, make_problem, timed


def growth() -> list[dict]:
    """Harness time against n (one epoch, batch 1024) and against epochs (6 points), torch and references."""
    from conformance.backends import torch as backend
    from conformance.reference import replay

    rows = []
    backend.train(make_problem(6, 1, 6, 3), "cpu")  # first use of torch, not the first size's cost
    for n in (10**3, 10**4, 10**5, 10**6):
        problem = make_problem(n, 10, 1024, 1)
        rows.append({"vary": "n", "value": n, "torch_s": timed(backend.train, problem, "cpu"),
                     "replay_s": timed(replay, problem)})
    for epochs in (100, 500, 2000):
        problem = make_problem(6, 1, 6, epochs)
        rows.append({"vary": "epochs", "value": epochs, "torch_s": timed(backend.train, problem, "cpu"),
                     "replay_s": timed(replay, problem)})
    return rows


def print_section() -> None:
    """Measure in a child process, then print the table."""
    print("\nCost growth (torch backend and float64 replay)")
    for row in in_child("--growth"):
        print(f"  {row['vary']:6} {row['value']:>8}: torch {row['torch_s']:7.3f} s   replay {row['replay_s']:7.3f} s")
