"""Where a process's time goes: framework imports, planning, training, references.

Each phase's time is exclusive (an import that happens while planning counts as an import, not
as planning), so the phases and the rest of the process's wall time add up. Workers hand their
totals to the controller, and the report shows them: the suite's cost is part of its evidence.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

PHASES = ("imports", "planning", "training", "references")

_spent: dict[str, float] = defaultdict(float)
_open: list[float] = []  # per open phase: time spent in phases nested inside it
_started = time.perf_counter()


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Count the time inside the block towards `name`, less any phase nested inside it."""
    start = time.perf_counter()
    _open.append(0.0)
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        _spent[name] += elapsed - _open.pop()
        if _open:
            _open[-1] += elapsed


def restart() -> None:
    """Start this process's clock now (at pytest_configure) and forget earlier phases."""
    global _started
    _started = time.perf_counter()
    _spent.clear()


def summary() -> dict[str, float]:
    """Seconds per phase, the process's wall time since `restart`, and the rest ("harness")."""
    wall = time.perf_counter() - _started
    phases = {name: round(_spent.get(name, 0.0), 3) for name in PHASES}
    return phases | {"harness": round(wall - sum(phases.values()), 3), "wall": round(wall, 3)}
