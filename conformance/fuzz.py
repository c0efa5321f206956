"""Generated cases (`--fuzz N --fuzz-seed S`): differential fuzzing of the frameworks.

Case k of seed S is drawn from `numpy.random.default_rng([S, k])` and streams of its own for
later additions (`conformance/fuzz_draws.py`), so the same seed gives the same cases on every
machine and in every process of a run. A case is an ordinary case file (inline data,
`tolerance.parity: auto`, no lstsq check), written to
`reports/<label>/fuzz/generated/fuzz-<S>-<k>.yaml` and run like any other: items, report pages,
JSON. Its description lists the draws.

What is drawn (the case format's space): features 1-4 and 5-120 samples; the data's scale
(1e-2 to 1e2), its conditioning (columns mixed to a condition number up to 1e3, an offset from
zero) and noise; bias or not; the initialisation; full batch or mini-batches, shuffled or not;
the optimizer and every option; float32 or float64; the loss (mse, huber, bce) and its
settings; sample weights; learning-rate schedules and clipping (v1.2); hidden layers (v1.2,
`with_hidden_layers`); mixed precision and loss scaling (v1.2,
`with_precision`); data-parallel replicas (v1.2, `with_replicas`); gradient accumulation (v1.3,
`with_accumulation`); and the shapes a naive
rounding band gets wrong (`fuzz_draws.Shapes`): zero initial parameters, data symmetric about 0
(balanced classes for bce) whose bias gradient cancels exactly, long float32 Adam runs, and
epsilon left to the format's default. Learning rates come from
the data: for SGD, a fraction of 1/L, L the
Lipschitz constant of the full-batch gradient (below the stability bound 2/L of gradient
descent); for the adaptive optimizers, a step that is a small fraction of the parameters' scale.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from conformance.fuzz_draws import (
    MAX_STEPS,
    draw,
    name,
    with_accumulation,
    with_hidden_layers,
    with_precision,
    with_replicas,
)
from conformance.yamlio import dump_yaml, read_yaml

# the draws are in conformance/fuzz_draws.py; these names stay this module's too
__all__ = ["MAX_STEPS", "draw", "name", "shrink_failure", "shrunk_folder", "to_yaml", "with_accumulation",
           "with_hidden_layers", "with_precision", "with_replicas", "write_cases"]


def write_cases(folder: Path, seed: int, count: int) -> list[Path]:
    """Write the `count` cases of `seed` into `folder` (atomically: every process of a run writes
    the same bytes), and return their paths in order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"{name(seed, index)}.yaml"
        text = to_yaml(draw(seed, index))
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            temporary = path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(text, encoding="utf-8")
            temporary.replace(path)
        paths.append(path)
    return paths


def to_yaml(case: dict[str, Any]) -> str:
    return dump_yaml(case, sort_keys=False, default_flow_style=None, width=100)


def shrunk_folder(source: Path) -> Path | None:
    """Where shrunk cases of a generated case go (`.../fuzz/shrunk/`), or None when the case
    file is not one `write_cases` generated."""
    if source.parent.name == "generated" and source.parent.parent.name == "fuzz" and source.stem.startswith("fuzz-"):
        return source.parent.parent / "shrunk"
    return None


def shrink_failure(source: Path, backend: str, device: str, message: str, known: Any = None,
                   check: str = "parity") -> Path:
    """Shrink the generated case in `source` whose `check` (parity or trajectory) failed on
    (backend, device) with `message`; write the shrunk case file and return its path."""
    from conformance import shrink

    folder = shrunk_folder(source)
    assert folder is not None, source
    case = read_yaml(source)
    smaller, reduction = shrink.shrink(case, backend, device, shrink.failure_kind(message), folder, known,
                                       check)
    if reduction:
        smaller["description"] = shrink.describe(case["name"], backend, device, reduction, check) + " " + \
            case["description"]
    else:
        smaller = dict(case, name=f"{case['name']}-shrunk",
                       description=f"No smaller case failed the same way; {case['name']} as generated. "
                                   + case["description"])
    folder.mkdir(parents=True, exist_ok=True)
    suffix = "" if check == "parity" else f"-{check}"
    path = folder / f"{case['name']}-{backend}-{device.replace(':', '')}{suffix}.yaml"
    path.write_text(to_yaml(smaller), encoding="utf-8")
    return path
