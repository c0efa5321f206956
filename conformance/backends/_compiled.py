"""What the compiled backends share: how the compile time is told apart from the training."""

from __future__ import annotations

from typing import Any

import numpy as np


def first_call_overhead(durations: Any) -> float | None:
    """How much longer the first of these durations (one per epoch) took than the median of the
    rest, which ran the compiled program: the cost of tracing and compiling on first use."""
    durations = np.asarray(durations, dtype=np.float64)
    if durations.size < 2:
        return None
    return max(0.0, float(durations[0] - np.median(durations[1:])))
