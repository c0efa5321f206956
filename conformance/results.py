"""The training results of one case in one process, trained once each and kept.

Items of one case are scheduled onto one worker (see plugin.py), so each result is trained
once; an item that needs a result its process has not trained (another item ran elsewhere, or
was deselected) trains it itself, so pairwise comparisons are complete under any scheduling.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from conformance import backends, timing, workers
from conformance.problem import Problem, Trajectory


@dataclass
class Trained:
    """One backend's result on one device, parameters on the case's own features."""

    backend: str
    device: str
    trajectory: Trajectory | None
    seconds: float
    error: str | None = None
    repeat: dict[str, Any] | None = None  # with --determinism: how a second training compared
    unavailable: str | None = None  # the backend could not run here after all (backends.Unavailable)
    process_died: bool = False  # the error is the death of the worker process that trained it

    @property
    def label(self) -> str:
        return f"{self.backend}, {self.device}"


class TrainingCrashed(RuntimeError):
    """A backend raised while training: an error with its traceback, not a mismatch.
    process_died: the backend's worker process died (the item is reported as crashed)."""

    def __init__(self, message: str, process_died: bool = False) -> None:
        super().__init__(message)
        self.process_died = process_died


class TrainedResults:
    """Every (backend, device) result of one case that this process has trained."""

    def __init__(self, case_name: str, problem: Problem, to_original: Callable[[np.ndarray], np.ndarray],
                 repeat: bool = False) -> None:
        self.case_name = case_name
        self.problem = problem
        self.to_original = to_original
        self.repeat = repeat  # train every result twice and demand bit-identical results
        self.results: dict[tuple[str, str], Trained] = {}

    def train(self, backend: str, device: str) -> Trained:
        key = (backend, device)
        if key not in self.results:
            self.results[key] = self._train(backend, device)
        return self.results[key]

    def trained_or_raise(self, backend: str, device: str) -> Trained:
        """The result; backends.Unavailable (a skip) or TrainingCrashed (an error) when there is none."""
        result = self.train(backend, device)
        if result.unavailable is not None:
            raise backends.Unavailable(result.unavailable)
        if result.error is not None:
            what = "lost its worker process" if result.process_died else "raised"
            raise TrainingCrashed(f"{backend} on {device} {what} while training [case {self.case_name}]:\n"
                                  f"{result.error}", result.process_died)
        return result

    def _train(self, backend: str, device: str) -> Trained:
        started = time.perf_counter()
        try:
            with timing.phase("training"):
                module = backends.load(backend)
                if self.problem.replicas > 1 and not getattr(module, "DATA_PARALLEL", False):
                    raise backends.Unavailable(f"{backend} does not train data-parallel (training.replicas: "
                                               f"{self.problem.replicas}): " + getattr(
                                                   module, "WHY_NOT_DATA_PARALLEL", "no DATA_PARALLEL = True"))
                if self.problem.accumulate > 1 and not getattr(module, "ACCUMULATES", False):
                    raise backends.Unavailable(f"{backend} does not accumulate gradients (training.accumulate: "
                                               f"{self.problem.accumulate}): " + getattr(
                                                   module, "WHY_NOT_ACCUMULATING", "no ACCUMULATES = True"))
                trajectory = module.train(self.problem, device)
        except backends.Unavailable as reason:
            return Trained(backend, device, None, time.perf_counter() - started, unavailable=str(reason))
        except workers.WorkerDied as death:
            return Trained(backend, device, None, time.perf_counter() - started, str(death), process_died=True)
        except Exception:  # any backend error is kept with its traceback and reported as a crash
            return Trained(backend, device, None, time.perf_counter() - started, traceback.format_exc())
        seconds = time.perf_counter() - started
        with timing.phase("training"):
            repeat = _second_training(backend, device, self.problem, trajectory) if self.repeat else None
        trajectory.params = self.to_original(trajectory.params)
        return Trained(backend, device, trajectory, seconds, repeat=repeat)


def _second_training(backend: str, device: str, problem: Problem, first: Trajectory) -> dict[str, Any]:
    """Train again on the same device and compare bit for bit (parameters, losses, predictions)."""
    second = backends.load(backend).train(problem, device)
    same_rows = [np.array_equal(a, b, equal_nan=True) for a, b in zip(first.params, second.params)]
    identical = all(same_rows) and np.array_equal(first.loss, second.loss, equal_nan=True) and (
        first.predictions is None or np.array_equal(first.predictions, second.predictions, equal_nan=True))
    with np.errstate(invalid="ignore"):
        difference = float(np.nanmax(np.abs(first.params - second.params), initial=0.0))
    first_epoch = next((epoch + 1 for epoch, same in enumerate(same_rows) if not same), None)
    return {"identical": bool(identical), "max_abs_diff": difference, "first_epoch": first_epoch}
