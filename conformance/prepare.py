"""From a validated case file to the `Problem` every backend trains: the data as the training
dtype sees it, the initial parameters, each epoch's order, every hyperparameter explicit, and
the rules that need the data (replicas, certified values, predictions). `Prepared` keeps what
the references need beside it (the float64 design before standardization).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from conformance import network
from conformance.case import CaseError, LoadedCase
from conformance.datasets import Standardizer, as_rows, check_labels, polynomial, preprocess, raw_data
from conformance.problem import MAX_STEPS, SUPPORTED_OPTIMIZERS, Optimizer, Problem
from conformance.schema import MAX_PARAMETERS, choice


@dataclass(frozen=True)
class Prepared:
    """A problem plus what the references need: the float64 design before standardization."""

    problem: Problem
    x_design: np.ndarray
    y: np.ndarray
    standardizer: Standardizer | None
    parameter_names: list[str] = field(default_factory=list)
    sample_weight: np.ndarray | None = None  # float64, as the case gives them

    def to_original(self, params: np.ndarray) -> np.ndarray:
        """Parameters learned on the trained features, expressed on the case's own features (a
        model with hidden layers is compared as trained: only the linear model maps back)."""
        if self.standardizer is None or self.problem.hidden:
            return params
        return self.standardizer.to_original(params)

    @property
    def initial_original(self) -> np.ndarray:
        """The initial parameters on the case's own features: where every path starts."""
        return self.to_original(self.problem.initial_params().astype(np.float64))


def prepare(case: LoadedCase) -> Prepared:
    """Build the problem of a validated case; CaseError for rules that need the data."""
    spec = case.spec
    x_raw, y, sample_weight = raw_data(case)
    loss_name, loss_settings = choice(spec.training.loss)
    if loss_name == "bce":
        check_labels(case, y)
    x_trained, standardizer = preprocess(case, x_raw, spec.preprocess)
    x_design = polynomial(x_raw, spec.preprocess.polynomial)
    dtype = np.dtype(spec.training.dtype)
    d = x_trained.shape[1]
    hidden = _hidden(case, d)
    model = network.layers(d, hidden, spec.model.bias)
    layered = network.split(initial_parameters(case, model), model)
    weights, bias = layered[-1][0][:, 0], (float(layered[-1][1][0]) if spec.model.bias else None)
    batch_size = spec.training.batch_size or len(y)
    if batch_size > len(y):
        raise CaseError(f"{case.source.display}: training.batch_size: {batch_size} is larger than the "
                        f"{len(y)} samples; expected at most {len(y)} (or null for full batch)")
    steps = spec.training.epochs * -(-len(y) // batch_size)
    if steps > MAX_STEPS:
        raise CaseError(f"{case.source.display}: training: epochs x batches per epoch = {steps:,} optimizer steps; "
                        f"expected at most {MAX_STEPS:,} (hours of training per backend and device)")
    problem = Problem(
        name=case.name,
        x=x_trained.astype(dtype),
        y=y.astype(dtype),
        init_weights=weights.astype(dtype),
        init_bias=None if bias is None else np.asarray(bias, dtype=dtype),
        epochs=spec.training.epochs,
        batch_size=batch_size,
        orders=_orders(spec.training.shuffle, spec.training.epochs, len(y)),
        reduction=_reduction(spec.training.loss),
        loss=loss_name,
        delta=float(getattr(loss_settings, "delta", 1.0)),
        from_logits=bool(getattr(loss_settings, "from_logits", True)),
        sample_weight=None if sample_weight is None else sample_weight.astype(dtype),
        optimizer=_optimizer(case),
        dtype=str(dtype),
        predict_x=_predict(case, x_raw.shape[1], standardizer, dtype),
        schedule=_schedule(case, -(-(steps // spec.training.epochs) // spec.training.accumulate)),
        clip=_clip(spec.training.clip),
        hidden=hidden,
        init_hidden=[{"kernel": kernel.astype(dtype), "bias": None if part is None else part.astype(dtype)}
                     for kernel, part in layered[:-1]] if hidden else None,
        precision=spec.training.precision,
        loss_scale=_loss_scale(spec.training.loss_scale),
        replicas=_replicas(case, len(y), batch_size),
        accumulate=spec.training.accumulate,
    )
    names = network.parameter_names(model)
    _check_certified(case, d)
    return Prepared(problem, x_design, y, standardizer, names, sample_weight)


def initial_parameters(case: LoadedCase, model: list[network.Layer]) -> np.ndarray:
    """The flat initial parameters (network.py's layout), drawn once by the harness; for the
    linear model [weights..., bias], weights drawn first."""
    kind, init = choice(case.spec.model.init)
    if kind != "constant":
        return network.initial(kind, init, model)
    d = model[0].inputs
    if len(model) > 1:
        raise CaseError(f"{case.source.display}: model.init.constant: gives the weights of one linear layer; "
                        "expected zeros, normal, uniform, glorot_uniform or he_normal with model.hidden")
    if len(init.weights) != d:
        raise CaseError(f"{case.source.display}: model.init.constant.weights: {len(init.weights)} values; "
                        f"expected {d} (one per feature after preprocessing)")
    return np.asarray([*init.weights, init.bias][:model[0].size], dtype=np.float64)


def _hidden(case: LoadedCase, features: int) -> list[dict[str, Any]] | None:
    """The case's hidden layers as plain data; CaseError beyond MAX_PARAMETERS parameters."""
    hidden = case.spec.model.hidden
    if not hidden:
        return None
    plain = []
    for layer in hidden:
        name, settings = choice(layer.activation)
        plain.append({"units": layer.units, "activation": name,
                      "settings": None if settings is None else settings.model_dump()})
    count = sum(layer.size for layer in network.layers(features, plain, case.spec.model.bias))
    if count > MAX_PARAMETERS:
        raise CaseError(f"{case.source.display}: model.hidden: {count:,} parameters ({features} features after "
                        f"preprocessing); expected at most {MAX_PARAMETERS:,} (docs/hidden-layers.md says why)")
    return plain


def _orders(shuffle: Any, epochs: int, n: int) -> np.ndarray | None:
    """One permutation per epoch from numpy.random.default_rng(seed), shared by every backend."""
    kind, seed = choice(shuffle)
    if kind == "false":
        return None
    rng = np.random.default_rng(seed)
    orders = np.empty((epochs, n), dtype=np.int64)
    for epoch in range(epochs):
        orders[epoch] = rng.permutation(n)
    return orders


def _reduction(loss: Any) -> str:
    _, settings = choice(loss)
    return "mean" if settings is None else settings.reduction


def _optimizer(case: LoadedCase) -> Optimizer:
    name, settings = choice(case.spec.training.optimizer)
    if name not in SUPPORTED_OPTIMIZERS:
        raise CaseError(f"{case.source.display}: training.optimizer.{name}: not supported yet; "
                        f"expected one of: {', '.join(SUPPORTED_OPTIMIZERS)}")
    return Optimizer(name, settings.model_dump())


def _schedule(case: LoadedCase, steps_per_epoch: int) -> dict[str, Any] | None:
    """The case's schedule as plain data; CaseError for a warm-up longer than the training."""
    schedule = case.spec.training.schedule
    if schedule is None:
        return None
    plain = {"kind": schedule.kind, "settings": schedule.settings.model_dump(), "every": schedule.every}
    epochs = case.spec.training.epochs
    units = epochs if schedule.every == "epoch" else epochs * steps_per_epoch
    warmup = plain["settings"].get("warmup_steps", 0)
    if warmup > units:
        unit = "epochs" if schedule.every == "epoch" else "optimizer steps"
        raise CaseError(f"{case.source.display}: training.schedule.cosine.warmup_steps: {warmup} is longer than the "
                        f"training ({units} {unit}, every: {schedule.every}); expected at most {units}")
    return plain


def _clip(clip: Any) -> dict[str, Any] | None:
    if clip is None:
        return None
    kind, threshold = choice(clip)
    return {"kind": kind, "threshold": float(threshold)}


def _replicas(case: LoadedCase, n: int, batch_size: int) -> int:
    """The case's replicas; CaseError when a step's batch (the last one included) has fewer
    samples than replicas: every replica needs a shard (an empty one has no mean loss)."""
    replicas = case.spec.training.replicas
    smallest = min(batch_size, n - (-(-n // batch_size) - 1) * batch_size)
    if replicas > smallest:
        which = "the last batch" if smallest < batch_size else "each batch"
        raise CaseError(f"{case.source.display}: training.replicas: {replicas} replicas, but {which} has "
                        f"{smallest} sample(s); expected at most {smallest} (every replica needs at least one "
                        "sample of every step)")
    return replicas


def _loss_scale(loss_scale: Any) -> dict[str, Any] | None:
    if loss_scale is None:
        return None
    kind, settings = choice(loss_scale)
    if kind == "fixed":
        return {"kind": "fixed", "scale": float(settings)}
    return {"kind": "dynamic", "initial": float(settings.initial), "growth_interval": int(settings.growth_interval)}


def _predict(case: LoadedCase, width: int, standardizer: Standardizer | None, dtype: np.dtype) -> np.ndarray | None:
    if case.spec.predict is None:
        return None
    rows = as_rows(case.spec.predict, "predict", case, width=width)
    features = polynomial(rows, case.spec.preprocess.polynomial)
    if standardizer is not None:
        features = standardizer.apply(features)
    return features.astype(dtype)


def _check_certified(case: LoadedCase, d: int) -> None:
    certified = case.spec.certified
    if certified is None:
        return
    display = case.source.display
    if len(certified.weights) != d:
        raise CaseError(f"{display}: certified.weights: {len(certified.weights)} values; expected {d} "
                        "(one per feature after preprocessing)")
    if (certified.bias is None) == case.spec.model.bias:
        want = "a bias (model.bias is true)" if case.spec.model.bias else "no bias (model.bias is false)"
        raise CaseError(f"{display}: certified.bias: expected {want}")
