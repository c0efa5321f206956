"""The draws of a generated case (`conformance/fuzz.py` writes and runs them).

Case k of seed S is drawn from `numpy.random.default_rng([S, k])` (the case's data, loss,
optimizer, batching, init), and from streams of its own for each later addition:
`[S, k, 12]` schedule and clipping, `[S, k, 22]` precision, `[S, k, 23]` hidden layers,
`[S, k, 24]` replicas, `[S, k, 26]` gradient accumulation, `[S, k, 25]` the shapes that rounding
bands get wrong (`Shapes`).
Nothing here imports `conformance.fuzz`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_STEPS = 2000  # epochs x batches per epoch of one generated case: a generated case costs about a second

SYMMETRIC = 0.15  # the data come in mirrored pairs: (x, y), (-x, -y); for bce (x, y), (-x, 1 - y)
LONG_ADAM = 0.1  # float32 Adam, full batch, 150-400 epochs on at most LONG_ADAM_SAMPLES samples
LONG_ADAM_SAMPLES = 40
ZERO_INIT = 0.15  # zero initial parameters (beside the init draw's own "zeros", one case in four)
ZERO_INIT_SYMMETRIC = 0.8  # ... for symmetric data, whose bias then stays 0 in exact arithmetic
EXPLICIT_EPSILON = 0.25  # adam, rmsprop, adagrad: otherwise epsilon is absent (the format's default)


def name(seed: int, index: int) -> str:
    return f"fuzz-{seed}-{index}"


@dataclass(frozen=True)
class Shapes:
    """The shapes that a naive rounding band gets wrong, drawn from a stream of their own
    (`default_rng([S, k, 25])`) so that the rest of a case is drawn as before:

    - `symmetric`: data symmetric about 0 in mirrored pairs, so that the bias's gradient is a sum
      of exactly cancelling terms (0 in exact arithmetic at a zero bias, and so at every step);
      for bce, balanced classes (each pair one 1 and one 0, x mirrored);
    - `zero_init`: every initial parameter 0, written as the field absent (the format's default),
      `zeros`, or a `constant` init of zeros;
    - `long_adam`: a float32 Adam run, full batch, 150-400 epochs on few samples, long enough
      that the gradients shrink and Adam divides small quantities by small quantities.
    """

    symmetric: bool
    long_adam: bool
    zero_init: str | None  # None: the init as drawn; "absent" | "zeros" | "constant"
    long_epochs: int

    @staticmethod
    def draw(rng: np.random.Generator) -> Shapes:
        symmetric = bool(rng.random() < SYMMETRIC)
        long_adam = bool(rng.random() < LONG_ADAM)
        zero = rng.random() < (ZERO_INIT_SYMMETRIC if symmetric else ZERO_INIT)
        form = str(rng.choice(["absent", "zeros", "constant"], p=[0.4, 0.4, 0.2]))
        return Shapes(symmetric, long_adam, form if zero else None, int(rng.integers(150, 401)))


def draw(seed: int, index: int) -> dict[str, Any]:
    """Case `index` of `seed`, as the dict a case file holds."""
    rng = np.random.default_rng([seed, index])
    shapes_rng = np.random.default_rng([seed, index, 25])
    shapes = Shapes.draw(shapes_rng)
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
    if shapes.long_adam:  # few samples: a long run stays cheap
        n = min(n, LONG_ADAM_SAMPLES - (LONG_ADAM_SAMPLES // 2 if shapes.symmetric else 0))
        x, y, weights = x[:n], y[:n], None if weights is None else weights[:n]
    if shapes.symmetric:
        x, y, weights = mirrored(x, y, weights, loss)
        n, has_bias = len(y), True  # the bias is the parameter whose gradient cancels
    if weights is not None and not weights.any():
        weights[:2 if shapes.symmetric else 1] = 1.0  # (both of a mirrored pair)
    batch_size = None if rng.random() < 0.5 else int(rng.integers(1, n + 1))
    batches = 1 if batch_size is None else math.ceil(n / batch_size)
    epochs = int(max(1, min(rng.integers(5, 201), MAX_STEPS // batches)))
    dtype = "float64" if rng.random() < 0.3 else "float32"
    optimizer = _optimizer(rng, x, has_bias, loss, loss_settings, batch_size, n, true_weights)
    shuffle = int(rng.integers(0, 1000)) if batch_size is not None and rng.random() < 0.5 else None
    if shapes.long_adam:
        batch_size, batches, epochs, dtype, shuffle = None, 1, shapes.long_epochs, "float32", None
        optimizer = _optimizer(shapes_rng, x, has_bias, loss, loss_settings, None, n, true_weights, kind="adam")
    training: dict[str, Any] = {"epochs": epochs, "batch_size": batch_size}
    if shuffle is not None:
        training["shuffle"] = {"seed": shuffle}
    training |= {"loss": {loss: loss_settings}, "optimizer": optimizer, "dtype": dtype}
    # v1.2 fields from a stream of their own, so that the rest of every case stays as it was drawn
    extras = np.random.default_rng([seed, index, 12])
    training |= _schedule_and_clip(extras, x, y, has_bias, loss, optimizer, epochs, batches)
    init = _init(rng, features)
    if shapes.zero_init == "absent":
        init = None
    elif shapes.zero_init == "zeros":
        init = "zeros"
    elif shapes.zero_init == "constant":
        init = {"constant": {"weights": [0.0] * features, "bias": 0.0}}
    inline: dict[str, Any] = {"x": [[_number(v) for v in row] for row in x], "y": [_number(v) for v in y]}
    if weights is not None:
        inline["sample_weight"] = [_number(v) for v in weights]
    init_kind = "absent (zeros)" if init is None else init if isinstance(init, str) else next(iter(init))
    if shapes.zero_init == "constant":
        init_kind = "constant zeros"
    batching = "full batch" if batch_size is None else f"batch {batch_size}"
    (kind, settings), = optimizer.items()
    summary = (f"n={n}, features={features}, x scale {scale:.1e}, {'bias' if has_bias else 'no bias'}, "
               + (("balanced classes, mirrored x, " if loss == "bce" else "data symmetric about 0, ")
                  if shapes.symmetric else "")
               + f"init {init_kind}, {batching}"
               f"{', shuffled' if 'shuffle' in training else ''}, {_describe(optimizer)}"
               f"{' with the default epsilon' if kind != 'sgd' and 'epsilon' not in settings else ''}, {dtype}, "
               f"{loss} {loss_settings}, {'sample weights, ' if weights is not None else ''}{epochs} epochs"
               + (" (a long float32 Adam run)" if shapes.long_adam else "")
               + "".join(f", {key} {training[key]}" for key in ("schedule", "clip") if key in training))
    model: dict[str, Any] = {"bias": has_bias} if init is None else {"bias": has_bias, "init": init}
    case = {"name": name(seed, index),
            "description": f"Generated by --fuzz (seed {seed}, case {index}): {summary}.",
            "dataset": {"inline": inline}, "model": model, "training": training,
            "tolerance": {"parity": "auto", "lstsq": None}}
    case = with_hidden_layers(np.random.default_rng([seed, index, 23]), case)
    case = with_precision(np.random.default_rng([seed, index, 22]), case)
    case = with_replicas(np.random.default_rng([seed, index, 24]), case)
    return with_accumulation(np.random.default_rng([seed, index, 26]), case)


def mirrored(x: np.ndarray, y: np.ndarray, weights: np.ndarray | None,
             loss: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The first ceil(n/2) samples, each followed by its mirror image: -x with -y (bce: 1 - y,
    so the classes are exactly balanced) and the same sample weight. Adjacent pairs, so that
    the first 2k samples (what the shrinker keeps, and every even batch) are symmetric too."""
    half = math.ceil(len(y) / 2)
    both_x = np.empty((2 * half, x.shape[1]))
    both_x[0::2], both_x[1::2] = x[:half], -x[:half]
    both_y = np.repeat(y[:half], 2)
    both_y[1::2] = 1.0 - y[:half] if loss == "bce" else -y[:half]
    return both_x, both_y, None if weights is None else np.repeat(weights[:half], 2)


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


def with_accumulation(rng: np.random.Generator, case: dict[str, Any]) -> dict[str, Any]:
    """Maybe (one mini-batch case in eight) gradient accumulation over 2 to 4 batches, from a
    stream of its own (v1.3; every other draw stays as it was): with the epoch's batch count
    drawn independently, partial last groups and short last batches inside a group both occur."""
    training = case["training"]
    n = len(case["dataset"]["inline"]["y"])
    if rng.random() >= 1 / 8 or training["batch_size"] is None or training["batch_size"] >= n:
        return case
    training["accumulate"] = int(rng.integers(2, 5))
    case["description"] = case["description"][:-1] + f"; a step every {training['accumulate']} batches."
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
    init = model.get("init", "zeros")  # absent: zeros
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
               batch_size: int | None, n: int, true_weights: np.ndarray, kind: str | None = None) -> dict[str, Any]:
    """An optimizer and its options; `kind` when given, else drawn. Adam, RMSprop and Adagrad
    leave epsilon out (the format's default) three times in four."""
    kind = kind or str(rng.choice(["sgd", "sgd", "adam", "rmsprop", "adagrad"]))
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
    if rng.random() < EXPLICIT_EPSILON:
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
