"""Shrinking a generated case that failed to a smaller case that fails the same way.

Hypothesis does the search: `hypothesis.find` over reductions of the failing case (how many
epochs, samples, features, hidden layers and hidden units to keep; which batching, shuffling,
initialisation, sample weights, optimizer options, schedule, clipping, precision and loss scale
to keep rather than reset to the format's
defaults) with the predicate
"this reduced case still fails parity on the same backend and device, in the same way (a
mismatch, or a divergence)". Hypothesis shrinks integers toward their lower bounds and booleans
toward False, so the case it returns is the smallest, simplest one it found that still fails.
The result is an ordinary case file, written under `reports/<label>/fuzz/shrunk/`, that fails the
same way when run alone.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

from conformance.case import CaseFile, LoadedCase
from conformance.schema import Case

MAX_EXAMPLES = 60  # reductions tried by Hypothesis (each trains the case once on one backend)
BUDGET_SECONDS = 90.0  # after this, no further reduction counts as failing: the search winds down


def failure_kind(message: str) -> str:
    return "diverged" if message.startswith("training diverged") else "mismatch"


def shrink(case: dict[str, Any], backend: str, device: str, kind: str, folder: Path,
           known: Any = None, check: str = "parity") -> tuple[dict[str, Any], dict[str, Any]]:
    """The smallest reduction of `case` whose `check` item (parity or trajectory) on (backend,
    device) still fails with `kind`; and the reductions chosen. The case itself when no smaller
    one fails."""
    from hypothesis import HealthCheck, Phase, find, settings
    from hypothesis.errors import NoSuchExample

    started = time.perf_counter()

    def fails(reduction: dict[str, Any]) -> bool:
        if time.perf_counter() - started > BUDGET_SECONDS:
            return False
        return still_fails(reduced(case, reduction), backend, device, kind, folder, known, check)

    try:
        found = find(reductions(case), fails, settings=settings(
            max_examples=MAX_EXAMPLES, database=None, deadline=None, derandomize=True,
            phases=[Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck)))
    except NoSuchExample:
        return case, {}
    return reduced(case, found), found


def reductions(case: dict[str, Any]) -> Any:
    """What may be cut or reset, as a Hypothesis strategy (the simplest reduction first)."""
    from hypothesis import strategies as st

    return st.fixed_dictionaries(reduction_space(case))


def reduction_space(case: dict[str, Any]) -> dict[str, Any]:
    """Each knob of a reduction and its Hypothesis strategy: how many epochs, samples and
    features to keep (integers, shrinking to 1 or 2), and which parts to keep rather than reset
    (booleans, shrinking to False: reset)."""
    from hypothesis import strategies as st

    inline = case["dataset"]["inline"]
    training = case["training"]
    (_, settings), = training["optimizer"].items()
    knobs: dict[str, Any] = {
        "epochs": st.integers(1, training["epochs"]),
        "samples": st.integers(min(2, len(inline["y"])), len(inline["y"])),
        "features": st.integers(1, len(inline["x"][0])),
        "keep_init": st.booleans(),
    }
    if training.get("batch_size") is not None:
        knobs["keep_batching"] = st.booleans()
    if "shuffle" in training:
        knobs["keep_shuffle"] = st.booleans()
    if "sample_weight" in inline:
        knobs["keep_weights"] = st.booleans()
    for option in settings:
        if option != "learning_rate":
            knobs[f"keep_{option}"] = st.booleans()
    for extra in ("schedule", "clip", "precision", "loss_scale"):
        if extra in training:
            knobs[f"keep_{extra}"] = st.booleans()
    if training.get("replicas", 1) > 1:  # how many replicas to keep (1: no data parallelism)
        knobs["replicas"] = st.integers(1, training["replicas"])
    if training.get("accumulate", 1) > 1:  # how many batches a step accumulates (1: none)
        knobs["accumulate"] = st.integers(1, training["accumulate"])
    hidden = case["model"].get("hidden") or []
    if hidden:  # how many hidden layers to keep (0: the linear model), and at most how many units each
        knobs["hidden_layers"] = st.integers(0, len(hidden))
        knobs["hidden_units"] = st.integers(1, max(layer["units"] for layer in hidden))
    return knobs


def reduced(case: dict[str, Any], reduction: dict[str, Any]) -> dict[str, Any]:
    """`case` with `reduction` applied: a valid case dict."""
    result = copy.deepcopy(case)
    inline, training, model = result["dataset"]["inline"], result["training"], result["model"]
    samples = reduction.get("samples", len(inline["y"]))
    features = reduction.get("features", len(inline["x"][0]))
    inline["x"] = [row[:features] for row in inline["x"][:samples]]
    inline["y"] = inline["y"][:samples]
    if "sample_weight" in inline:
        weights = inline["sample_weight"][:samples]
        if not reduction.get("keep_weights", True):
            del inline["sample_weight"]
        else:
            inline["sample_weight"] = weights if any(weights) else [1.0] + weights[1:]
    if model.get("hidden"):
        kept = model["hidden"][:reduction.get("hidden_layers", len(model["hidden"]))]
        units = reduction.get("hidden_units")
        model["hidden"] = [dict(layer, units=min(layer["units"], units or layer["units"])) for layer in kept]
        if not model["hidden"]:
            del model["hidden"]
    if not reduction.get("keep_init", True):
        model["init"] = "zeros"
    elif isinstance(model.get("init"), dict) and "constant" in model["init"]:
        model["init"]["constant"]["weights"] = model["init"]["constant"]["weights"][:features]
    training["epochs"] = reduction.get("epochs", training["epochs"])
    if training.get("batch_size") is not None:
        if reduction.get("keep_batching", True):
            training["batch_size"] = min(training["batch_size"], samples)
        else:
            training["batch_size"] = None
    if "shuffle" in training and (not reduction.get("keep_shuffle", True) or training.get("batch_size") is None):
        del training["shuffle"]
    (kind, settings), = training["optimizer"].items()
    training["optimizer"] = {kind: {option: value for option, value in settings.items()
                                    if option == "learning_rate" or reduction.get(f"keep_{option}", True)}}
    if kind == "sgd" and not training["optimizer"][kind].get("momentum"):
        training["optimizer"][kind].pop("nesterov", None)  # nesterov needs momentum
    for extra in ("schedule", "clip", "precision", "loss_scale"):
        if extra in training and not reduction.get(f"keep_{extra}", True):
            del training[extra]
    if "precision" not in training:  # a loss scale only with mixed_float16
        training.pop("loss_scale", None)
    if "replicas" in training:  # never more replicas than the smallest batch has samples
        batch = training.get("batch_size") or samples
        smallest = min(batch, samples - (-(-samples // batch) - 1) * batch)
        training["replicas"] = min(reduction.get("replicas", training["replicas"]), smallest)
    if "accumulate" in training:
        training["accumulate"] = reduction.get("accumulate", training["accumulate"])
        if training["accumulate"] == 1 or training.get("batch_size") is None:
            del training["accumulate"]
    cosine = training.get("schedule", {}).get("cosine")
    if cosine and cosine.get("warmup_steps", 0) > training["epochs"]:  # a warm-up within the fewer epochs
        cosine["warmup_steps"] = training["epochs"]
    result["name"] = f"{case['name']}-shrunk"
    return result


def still_fails(case: dict[str, Any], backend: str, device: str, kind: str, folder: Path, known: Any,
                check: str = "parity") -> bool:
    """Whether `case`'s `check` on (backend, device) fails with `kind` (not a skip, not a case
    that cannot be loaded)."""
    from conformance.checks import make_run

    try:
        loaded = loaded_case(case, folder)
        run = make_run(loaded, [(backend, device)], known=known)
        outcome = getattr(run, f"check_{check}")(backend, device)
    except Exception:  # an invalid reduction, or a backend error: not the same failure
        return False
    return not outcome.passed and not outcome.skipped and failure_kind(outcome.message) == kind


def loaded_case(case: dict[str, Any], folder: Path) -> LoadedCase:
    spec = Case.model_validate(case)
    return LoadedCase(CaseFile(folder / f"{case['name']}.yaml", folder), case["name"], spec)


def describe(original: str, backend: str, device: str, reduction: dict[str, Any], check: str = "parity") -> str:
    kept = {key: value for key, value in reduction.items() if not key.startswith("keep_")}
    reset = [key[5:] for key, value in reduction.items() if key.startswith("keep_") and not value]
    return (f"Shrunk by Hypothesis from {original}, whose {check} failed on {backend}, {device}: kept "
            + ", ".join(f"{key} {value}" for key, value in kept.items())
            + (f"; reset to the defaults: {', '.join(reset)}" if reset else "") + ".")
