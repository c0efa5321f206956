"""Generated cases (`--fuzz N --fuzz-seed S`): differential fuzzing of the frameworks.

Case k of seed S is drawn from `numpy.random.default_rng([S, k])` alone, so the same seed gives
the same cases on every machine and in every process of a run. A case is an ordinary case file
(inline data, `tolerance.parity: auto`, no lstsq check), written to
`reports/<label>/fuzz/generated/fuzz-<S>-<k>.yaml` and run like any other: items, report pages,
JSON. Its description lists the draws.

What is drawn (the case format's space): features 1-4 and 5-120 samples; the data's scale
(1e-2 to 1e2), its conditioning (columns mixed to a condition number up to 1e3, an offset from
zero) and noise; bias or not; the initialisation; full batch or mini-batches, shuffled or not;
the optimizer and every option; float32 or float64; the loss (mse, huber, bce) and its
settings; sample weights; learning-rate schedules and clipping (v1.2); hidden layers (v1.2,
`with_hidden_layers`); mixed precision and loss scaling (v1.2,
`with_precision`); data-parallel replicas (v1.2, `with_replicas`). Learning rates come from
the data: for SGD, a fraction of 1/L, L the
Lipschitz constant of the full-batch gradient (below the stability bound 2/L of gradient
descent); for the adaptive optimizers, a step that is a small fraction of the parameters' scale.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from conformance.yamlio import dump_yaml, read_yaml

MAX_STEPS = 2000  # epochs x batches per epoch of one generated case: a generated case costs about a second


def name(seed: int, index: int) -> str:
    return f"fuzz-{seed}-{index}"


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


def draw(seed: int, index: int) -> dict[str, Any]:
    """Case `index` of `seed`, as the dict a case file holds."""
    rng = np.random.default_rng([seed, index])
    features = int(rng.integers(1, 5))
    n = int(rng.integers(5, 121))
    scale = 10.0 ** rng.uniform(-2, 2)
    x = _features(rng, n, features, scale)
    has_bias = bool(rng.random() < 0.8)
    loss, loss_settings = _loss(rng)
    true_weights = rng.normal(size=features) / scale
    output = x @ true_weights + (rng.normal() if has_bias else 0.0)
    if loss == "bce":
        probability = 1.0 / (1.0 + np.exp(-2.0 * output))
        y = (rng.random(n) < probability).astype(float)
    else:
        y = output + rng.choice([0.0, 0.1, 1.0]) * rng.normal(size=n)
    weights = np.round(rng.uniform(0.0, 2.0, size=n), 3) if rng.random() < 0.2 else None
    if weights is not None and not weights.any():
        weights[0] = 1.0
    batch_size = None if rng.random() < 0.5 else int(rng.integers(1, n + 1))
    batches = 1 if batch_size is None else math.ceil(n / batch_size)
    epochs = int(max(1, min(rng.integers(5, 201), MAX_STEPS // batches)))
    dtype = "float64" if rng.random() < 0.3 else "float32"
    optimizer = _optimizer(rng, x, has_bias, loss, loss_settings, batch_size, n, true_weights)
    training: dict[str, Any] = {"epochs": epochs, "batch_size": batch_size}
    if batch_size is not None and rng.random() < 0.5:
        training["shuffle"] = {"seed": int(rng.integers(0, 1000))}
    training |= {"loss": {loss: loss_settings}, "optimizer": optimizer, "dtype": dtype}
    # v1.2 fields from a stream of their own, so that the rest of every case stays as it was drawn
    extras = np.random.default_rng([seed, index, 12])
    training |= _schedule_and_clip(extras, x, y, has_bias, loss, optimizer, epochs, batches)
    init = _init(rng, features)
    inline: dict[str, Any] = {"x": [[_number(v) for v in row] for row in x], "y": [_number(v) for v in y]}
    if weights is not None:
        inline["sample_weight"] = [_number(v) for v in weights]
    init_kind = init if isinstance(init, str) else next(iter(init))
    batching = "full batch" if batch_size is None else f"batch {batch_size}"
    summary = (f"n={n}, features={features}, x scale {scale:.1e}, {'bias' if has_bias else 'no bias'}, "
               f"init {init_kind}, {batching}"
               f"{', shuffled' if 'shuffle' in training else ''}, {_describe(optimizer)}, {dtype}, "
               f"{loss} {loss_settings}, {'sample weights, ' if weights is not None else ''}{epochs} epochs"
               + "".join(f", {key} {training[key]}" for key in ("schedule", "clip") if key in training))
    case = {"name": name(seed, index),
            "description": f"Generated by --fuzz (seed {seed}, case {index}): {summary}.",
            "dataset": {"inline": inline}, "model": {"bias": has_bias, "init": init}, "training": training,
            "tolerance": {"parity": "auto", "lstsq": None}}
    case = with_hidden_layers(np.random.default_rng([seed, index, 23]), case)
    case = with_precision(np.random.default_rng([seed, index, 22]), case)
    return with_replicas(np.random.default_rng([seed, index, 24]), case)


def with_replicas(rng: np.random.Generator, case: dict[str, Any]) -> dict[str, Any]:
    """Maybe (one case in six) 2 or 3 data-parallel replicas, from a stream of its own (v1.2;
    every other draw stays as it was), when every batch, the last one included, has a sample for
    each replica."""
    if rng.random() >= 1 / 6:
        return case
    replicas = int(rng.integers(2, 4))
    n = len(case["dataset"]["inline"]["y"])
    batch = case["training"]["batch_size"] or n
    smallest = min(batch, n - (math.ceil(n / batch) - 1) * batch)
    if smallest < replicas:
        return case
    case["training"]["replicas"] = replicas
    case["description"] = case["description"][:-1] + f"; {replicas} replicas."
    return case


def with_precision(rng: np.random.Generator, case: dict[str, Any]) -> dict[str, Any]:
    """Maybe (one float32 case in five) mixed precision, from a stream of its own (v1.2; every
    other draw stays as it was): bfloat16 or float16 compute, and for float16 no loss scale, a
    fixed one (2^4 to 2^12) or a dynamic one (initial 2^8 to 2^20, growth interval 1 to 20), so
    that overflow, skipped steps and regrowth all occur."""
    training = case["training"]
    if training["dtype"] != "float32" or rng.random() >= 0.2:
        return case
    training["precision"] = str(rng.choice(["mixed_bfloat16", "mixed_float16"]))
    scaling = int(rng.integers(3)) if training["precision"] == "mixed_float16" else 0
    if scaling == 1:
        training["loss_scale"] = {"fixed": _number(2.0 ** int(rng.integers(4, 13)))}
    elif scaling == 2:
        training["loss_scale"] = {"dynamic": {"initial": _number(2.0 ** int(rng.integers(8, 21))),
                                              "growth_interval": int(rng.integers(1, 21))}}
    case["description"] = case["description"][:-1] + f"; {training['precision']}" + (
        f", loss scale {training['loss_scale']}." if "loss_scale" in training else ".")
    return case


ACTIVATION_DRAWS = ["linear", "relu", "tanh", "sigmoid", "softplus", "silu", {"gelu": {"approximate": False}},
                    {"gelu": {"approximate": True}}, "leaky_relu", "elu"]


def with_hidden_layers(rng: np.random.Generator, case: dict[str, Any]) -> dict[str, Any]:
    """Maybe (one case in four) one or two hidden layers of 2-8 units, each activation with its
    settings, from a stream of their own (v1.2; every other draw stays as it was).

    A network's stable step does not follow from the data's Lipschitz constant as the linear
    model's does, so such a case trains on standardized features (with a bias, which centring
    needs) at rates that stay stable for a small network on unit-scale data: SGD
    0.005-0.1 x (1 - momentum), the adaptive optimizers 1e-3 to 3e-2 (divided by the batch for
    a summed loss); a `constant` init (one layer's weights) becomes glorot_uniform.
    """
    if rng.random() >= 0.25:
        return case
    hidden = []
    for _ in range(int(rng.integers(1, 3))):
        activation = ACTIVATION_DRAWS[int(rng.integers(len(ACTIVATION_DRAWS)))]
        if activation == "leaky_relu":
            activation = {"leaky_relu": {"negative_slope": _number(rng.choice([0.01, 0.1, 0.2, 0.3]))}}
        elif activation == "elu":
            activation = {"elu": {"alpha": _number(rng.uniform(0.5, 1.5))}}
        hidden.append({"units": int(rng.integers(2, 9)), "activation": activation})
    training, model = case["training"], case["model"]
    (kind, settings), = training["optimizer"].items()
    summed = next(iter(training["loss"].values()))["reduction"] == "sum"
    batch = training["batch_size"] or len(case["dataset"]["inline"]["y"])
    if kind == "sgd":
        rate = rng.uniform(0.005, 0.1) * (1 - settings.get("momentum", 0.0))
    else:
        rate = 10.0 ** rng.uniform(-3, -1.5)
    rate = _number(rate / (batch if summed else 1))
    piecewise = training.get("schedule", {}).get("piecewise")
    if piecewise:  # the rate before the first boundary is the optimizer's
        piecewise["values"] = [_number(value * rate / settings["learning_rate"]) for value in piecewise["values"]]
        piecewise["values"][0] = rate
    settings["learning_rate"] = rate
    model["hidden"], model["bias"] = hidden, True
    init = model["init"]
    if init == "zeros" or "constant" in init or rng.random() < 0.5:
        model["init"] = {str(rng.choice(["glorot_uniform", "he_normal"])): {"seed": int(rng.integers(0, 1000))}}
    case["preprocess"] = {"standardize": True}
    case["description"] = case["description"][:-1] + (
        f"; hidden layers {[(layer['units'], layer['activation']) for layer in hidden]} on standardized features, "
        f"learning rate {rate:.3g}, init {next(iter(model['init']))}.")
    return case


def _features(rng: np.random.Generator, n: int, features: int, scale: float) -> np.ndarray:
    """Standard normal columns, mixed to a condition number up to 1e3, scaled, maybe offset."""
    z = rng.normal(size=(n, features))
    if features > 1:
        condition = 10.0 ** rng.uniform(0, 3)
        q, _ = np.linalg.qr(rng.normal(size=(features, features)))
        z = z @ np.diag(np.geomspace(1.0, 1.0 / condition, features)) @ q
    offset = rng.normal(size=features) * 10.0 ** rng.uniform(-1, 1) if rng.random() < 0.3 else 0.0
    return (z + offset) * scale


def _loss(rng: np.random.Generator) -> tuple[str, dict[str, Any]]:
    kind = rng.choice(["mse", "mse", "mse", "huber", "bce"])
    reduction = "sum" if rng.random() < 0.2 else "mean"
    if kind == "huber":
        return "huber", {"delta": _number(10.0 ** rng.uniform(-1, 1)), "reduction": reduction}
    if kind == "bce":
        return "bce", {"from_logits": bool(rng.random() < 0.6), "reduction": reduction}
    return "mse", {"reduction": reduction}


def _lipschitz(x: np.ndarray, has_bias: bool, loss: str) -> float:
    """L of the mean loss's gradient over the full batch (per-sample curvature 2, 1 or 1/4)."""
    design = np.hstack([x, np.ones((len(x), 1))]) if has_bias else x
    largest = float(np.linalg.eigvalsh(design.T @ design / len(x))[-1])
    return {"mse": 2.0, "huber": 1.0, "bce": 0.25}[loss] * largest


def _optimizer(rng: np.random.Generator, x: np.ndarray, has_bias: bool, loss: str, loss_settings: dict[str, Any],
               batch_size: int | None, n: int, true_weights: np.ndarray) -> dict[str, Any]:
    kind = str(rng.choice(["sgd", "sgd", "adam", "rmsprop", "adagrad"]))
    summed = loss_settings["reduction"] == "sum"
    if kind == "sgd":
        momentum = 0.0 if rng.random() < 0.4 else _number(rng.uniform(0.1, 0.95))
        # below gradient descent's stability bound (2 / L; (2 + 2 momentum) / L with momentum), with room
        # for mini-batches, whose own curvature can be larger than the full batch's
        fraction = rng.uniform(0.05, 0.9) * (1 - momentum) * (0.5 if batch_size else 1.0)
        rate = fraction / _lipschitz(x, has_bias, loss) / ((batch_size or n) if summed else 1)
        settings: dict[str, Any] = {"learning_rate": _number(rate), "momentum": momentum}
        if momentum and rng.random() < 0.3:
            settings["nesterov"] = True
        if rng.random() < 0.2:
            settings["weight_decay"] = _number(10.0 ** rng.uniform(-4, -1))
        return {"sgd": settings}
    parameter_scale = float(np.max(np.abs(true_weights), initial=1.0))
    settings = {"learning_rate": _number(parameter_scale * 10.0 ** rng.uniform(-3, -1.3))}
    if kind == "adam":
        settings |= {"beta_1": _number(rng.uniform(0.5, 0.99)), "beta_2": _number(rng.uniform(0.9, 0.9999))}
        if rng.random() < 0.2:
            settings["amsgrad"] = True
    elif kind == "rmsprop":
        settings["rho"] = _number(rng.uniform(0.8, 0.99))
        if rng.random() < 0.3:
            settings["momentum"] = _number(rng.uniform(0.1, 0.9))
        if rng.random() < 0.3:
            settings["centered"] = True
    else:
        settings["initial_accumulator_value"] = float(rng.choice([0.0, 0.1]))
    if rng.random() < 0.5:
        settings["epsilon"] = _number(10.0 ** rng.uniform(-10, -6))
    return {kind: settings}


def _schedule_and_clip(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, has_bias: bool, loss: str,
                       optimizer: dict[str, Any], epochs: int, batches: int) -> dict[str, Any]:
    """Maybe a schedule (each kind, per step or per epoch, spanning a fraction of the training)
    and maybe clipping, with a threshold between 1/30 and 3 times the size of the first full-batch
    gradient from zero, so that clipping is active for part of the training."""
    drawn: dict[str, Any] = {}
    (_, settings), = optimizer.items()
    if rng.random() < 0.3:
        every = "epoch" if rng.random() < 0.3 else "step"
        units = epochs if every == "epoch" else epochs * batches
        kind = str(rng.choice(["exponential", "piecewise", "cosine"]))
        if kind == "exponential":
            schedule: dict[str, Any] = {"decay_rate": _number(rng.uniform(0.2, 0.95)),
                                        "decay_steps": int(max(1, units * rng.uniform(0.1, 0.6))),
                                        "staircase": bool(rng.random() < 0.4)}
        elif kind == "piecewise":
            count = int(rng.integers(1, 3))
            boundaries = sorted({int(b) for b in rng.integers(1, max(2, units), size=count)})
            values = [settings["learning_rate"]]
            for _ in boundaries:
                values.append(_number(values[-1] * rng.uniform(0.1, 0.7)))
            schedule = {"boundaries": boundaries, "values": values}
        else:
            schedule = {"decay_steps": int(max(1, units * rng.uniform(0.3, 1.2))),
                        "alpha": 0.0 if rng.random() < 0.5 else _number(rng.uniform(0.0, 0.5)),
                        "warmup_steps": 0 if rng.random() < 0.5 else int(units * rng.uniform(0.0, 0.2))}
        drawn["schedule"] = {kind: schedule, "every": every}
    if rng.random() < 0.3:
        design = np.hstack([x, np.ones((len(x), 1))]) if has_bias else x
        target = y - 0.5 if loss == "bce" else y  # the logits loss's gradient from zero: sigmoid(0) - y
        gradient = design.T @ target / len(y)
        kind = str(rng.choice(["global_norm", "norm", "value"]))
        size = float(np.max(np.abs(gradient))) if kind == "value" else float(np.linalg.norm(gradient))
        drawn["clip"] = {kind: _number(max(size, 1e-6) * 10.0 ** rng.uniform(-1.5, 0.5))}
    return drawn


def _init(rng: np.random.Generator, features: int) -> str | dict[str, Any]:
    kind = rng.choice(["zeros", "normal", "uniform", "constant"])
    if kind == "zeros":
        return "zeros"
    if kind == "normal":
        return {"normal": {"std": _number(rng.uniform(0.01, 1.0)), "seed": int(rng.integers(0, 1000))}}
    if kind == "uniform":
        return {"uniform": {"low": -0.5, "high": 0.5, "seed": int(rng.integers(0, 1000))}}
    return {"constant": {"weights": [_number(v) for v in rng.normal(size=features)], "bias": _number(rng.normal())}}


def _describe(optimizer: dict[str, Any]) -> str:
    (kind, settings), = optimizer.items()
    return f"{kind}(" + ", ".join(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"
                                  for key, value in settings.items()) + ")"


def _number(value: float) -> float:
    """A float that reads back the same from YAML (shortest repr, 10 significant digits)."""
    return float(f"{float(value):.10g}")


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
