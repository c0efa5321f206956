"""The registry of backends. Each module exposes the same names:

    NAME: str
    LOOKED_FOR: tuple[str, ...]          device kinds it asks its framework for: "cpu", "cuda", "mps"
    available() -> str | None            None, or why it cannot run (framework not installed)
    devices() -> list[str]               devices it can train on: "cpu", "cuda:0", "mps"
    device_name(device) -> str           what the device is (CPU or GPU model), for the report
    train(problem, device) -> Trajectory numpy in, numpy out; raises Unavailable when the
                                         backend turns out not to work here (a broken compiler)
    SELECTED_BY_DEFAULT: bool            optional (default True): False leaves it out of a run unless
                                         --backend or a case's `backends:` names it
    DATA_PARALLEL: bool                  optional (default False): trains `problem.replicas` > 1 as
                                         its framework's data-parallel API does; else such a case
                                         skips, with WHY_NOT_DATA_PARALLEL (optional) as the reason
    ACCUMULATES: bool                    optional (default False): trains `problem.accumulate` > 1 (one
                                         optimizer step per `Problem.groups` group); else such a case
                                         skips, with WHY_NOT_ACCUMULATING (optional) as the reason

    SWITCHES: list[dict]                 optional, backends from outside the project: the replay's
                                         formulas it follows, as formulas.yaml writes them (name,
                                         when, versions, reason, source, shows; `backends` is itself)

Modules are imported on first use, and frameworks only inside them, so that the harness (and
its own tests) work without TensorFlow or PyTorch installed. A backend from outside the project
(`--backend path/to/file.py`, `--backend package.module`, or an installed package's entry point
in the group ENTRY_POINT_GROUP) has the same names (`register`; examples/my_training_loop.py).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from conformance.schema import BACKEND_NAMES

if TYPE_CHECKING:
    from conformance.problem import Trajectory
    from conformance.workers import WorkerKind

MODULES = {name: f"conformance.backends.{name}" for name in BACKEND_NAMES}
ENTRY_POINT_GROUP = "conformance.backends"
INTERFACE = ("NAME", "LOOKED_FOR", "available", "devices", "device_name", "train")


class Unavailable(Exception):
    """Raised by `train` when the backend cannot run here after all (its compiler is missing or
    broken): the item is skipped with this reason, never passed or failed."""


def selected_by_default(name: str) -> bool:
    return getattr(load(name), "SELECTED_BY_DEFAULT", True)


def load(name: str) -> ModuleType:
    """The backend module called `name`; KeyError names the known ones."""
    if name not in MODULES:
        raise KeyError(f"unknown backend {name!r}; expected one of: {', '.join(MODULES)}")
    return importlib.import_module(MODULES[name])


def register(reference: str) -> str:
    """The name of the backend `reference` names, registered so that `load` finds it: a shipped
    backend's name, a Python file (`path/to/backend.py`), a module path (`package.module`), or
    an installed entry point's name (group ENTRY_POINT_GROUP). ValueError, naming what is
    wrong, for anything else or a module that lacks the interface's names."""
    if reference in MODULES:
        return reference
    if reference.endswith(".py"):
        path = Path(reference).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"{reference}: no such file")
        module_name = f"conformance_outside_{path.stem}_{abs(hash(str(path))) % 10**8}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[module_name] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    else:
        points = {point.name: point.value for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
        try:
            module = importlib.import_module(points.get(reference, reference))
        except ImportError as error:
            raise ValueError(f"{reference}: not a shipped backend ({', '.join(BACKEND_NAMES)}), an entry point of "
                             f"{ENTRY_POINT_GROUP!r}, a .py file or an importable module ({error})") from None
    missing = [name for name in INTERFACE if not hasattr(module, name)]
    if missing:
        raise ValueError(f"{reference}: a backend module needs {', '.join(INTERFACE)}; it lacks {', '.join(missing)} "
                         "(docs/backends.md, 'Your own training code')")
    name = str(module.NAME)
    if name in MODULES and MODULES[name] != module.__name__:
        raise ValueError(f"{reference}: NAME {name!r} is taken by {MODULES[name]}")
    MODULES[name] = module.__name__
    return name


def train_in_worker(kind: WorkerKind, function: str, *arguments: Any) -> Trajectory:
    """`function(*arguments)` in this process's worker of `kind`, its trajectory data back as a
    Trajectory; the worker's Unavailable raised here as Unavailable (a skip with its reason),
    any other error as the worker reported it."""
    from conformance import workers
    from conformance.problem import Trajectory

    try:
        data = workers.POOL.call(kind, function, *arguments)
    except workers.WorkerError as error:
        if error.kind == Unavailable.__name__:
            raise Unavailable(error.message) from None
        raise
    return Trajectory.from_data(data)
