"""Phase timing: exclusive per phase, so phases and the rest add up to the wall time."""

from __future__ import annotations

import time

from conformance import timing


def test_nested_phases_count_once_each():
    timing.restart()
    with timing.phase("planning"):
        time.sleep(0.05)
        with timing.phase("imports"):
            time.sleep(0.1)
    summary = timing.summary()
    assert 0.1 <= summary["imports"] < 0.2
    assert 0.05 <= summary["planning"] < 0.1  # without the import inside it
    assert abs(sum(summary[key] for key in (*timing.PHASES, "harness")) - summary["wall"]) < 0.01


def test_a_phase_that_raises_is_still_counted():
    timing.restart()
    try:
        with timing.phase("training"):
            time.sleep(0.02)
            raise RuntimeError("backend crashed")
    except RuntimeError:
        pass
    assert timing.summary()["training"] >= 0.02
