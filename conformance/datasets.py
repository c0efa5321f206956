"""Turning a case's `dataset` and `preprocess` into float64 arrays.

All arrays here are float64: rounding to the training dtype happens once, in problem.py, so
that the replay and every backend see the same numbers.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass

import numpy as np

from conformance.case import CaseError, LoadedCase
from conformance.schema import Csv, Generate, Inline, Preprocess, choice

MAX_GENERATED_VALUES = 50_000_000  # a 1 KB case must not ask for terabytes: 400 MiB of float64 at most


def raw_data(case: LoadedCase) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(x, y, sample weights or None) as given by the case, before preprocessing: x is (n, d),
    y and the weights (n,)."""
    kind, settings = choice(case.spec.dataset)
    weights = None
    if kind == "inline":
        x, y = _inline(case, settings)
        if settings.sample_weight is not None:
            weights = np.asarray(settings.sample_weight, dtype=np.float64)
    elif kind == "generate":
        if settings.n * settings.features > MAX_GENERATED_VALUES:
            raise CaseError(f"{case.source.display}: dataset.generate: n x features = "
                            f"{settings.n * settings.features:,} values; expected at most {MAX_GENERATED_VALUES:,} "
                            f"({MAX_GENERATED_VALUES * 8 // 2**20:,} MiB in float64)")
        x, y = _generate(settings)
    else:
        x, y, weights = _csv(case, settings)
    _check_data(case, kind, x, y)
    if weights is not None:
        _check_weights(case, kind, weights)
    return x, y, weights


def as_rows(values: list, where: str, case: LoadedCase, width: int | None = None) -> np.ndarray:
    """A list of numbers (one feature) or of equal-length rows, as an (n, d) float64 array."""
    if not values:
        raise CaseError(f"{case.source.display}: {where}: empty; expected at least one value")
    if all(isinstance(value, list) for value in values):
        lengths = {len(row) for row in values}
        if len(lengths) > 1:
            raise CaseError(f"{case.source.display}: {where}: rows have different lengths {sorted(lengths)}; "
                            "expected every row to have the same number of features")
        rows = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
    elif any(isinstance(value, list) for value in values):
        raise CaseError(f"{case.source.display}: {where}: expected all numbers or all rows, got a mix")
    else:
        rows = np.asarray(values, dtype=np.float64).reshape(-1, 1)
    if width is not None and rows.shape[1] != width:
        raise CaseError(f"{case.source.display}: {where}: rows have {rows.shape[1]} values; "
                        f"expected {width} (the number of features of dataset x)")
    return rows


def _inline(case: LoadedCase, inline: Inline) -> tuple[np.ndarray, np.ndarray]:
    return as_rows(inline.x, "dataset.inline.x", case), np.asarray(inline.y, dtype=np.float64)


def _generate(spec: Generate) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic data, drawn in a documented order: x first, then noise, from one generator."""
    rng = np.random.default_rng(spec.seed)
    shape = (spec.n, spec.features)
    kind, dist = choice(spec.x)
    if kind == "uniform":
        x = rng.uniform(dist.low, dist.high, size=shape)
    elif kind == "normal":
        x = rng.normal(dist.mean, dist.std, size=shape)
    else:
        x = np.repeat(np.linspace(dist.start, dist.stop, spec.n)[:, None], spec.features, axis=1)
    y = x @ np.asarray(spec.weights, dtype=np.float64) + spec.bias
    if spec.noise is not None:
        _, noise = choice(spec.noise)
        y = y + rng.normal(noise.mean, noise.std, size=spec.n)
    return x, y


def _csv(case: LoadedCase, spec: Csv) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    display = case.source.display
    path = (case.source.path.parent / spec.path).resolve()
    root = case.source.root.resolve()
    if not path.is_relative_to(root):
        raise CaseError(f"{display}: dataset.csv.path: {spec.path!r} resolves to {path}, outside the cases "
                        f"root {root}; expected a file inside it")
    if not path.is_file():
        raise CaseError(f"{display}: dataset.csv.path: {spec.path!r}: no such file ({path})")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        columns = [*spec.x, spec.y] + ([spec.sample_weight] if spec.sample_weight else [])
        missing = [column for column in columns if column not in header]
        if missing:
            raise CaseError(f"{display}: dataset.csv: column(s) {', '.join(missing)} not in {spec.path} "
                            f"(columns: {', '.join(header) or 'none'})")
        rows = [[_cell(display, spec.path, number, row, column) for column in columns]
                for number, row in enumerate(reader, start=2)]
    table = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(columns))
    width = len(spec.x)
    return table[:, :width], table[:, width], (table[:, width + 1] if spec.sample_weight else None)


def _cell(display: str, name: str, line: int, row: dict, column: str) -> float:
    text = (row.get(column) or "").strip()
    try:
        return float(text)
    except ValueError:
        raise CaseError(f"{display}: dataset.csv: {name} line {line}, column {column}: "
                        f"expected a number, got {text!r}") from None


def _check_data(case: LoadedCase, kind: str, x: np.ndarray, y: np.ndarray) -> None:
    where = f"{case.source.display}: dataset.{kind}"
    if len(y) != len(x):
        raise CaseError(f"{where}: x has {len(x)} samples and y has {len(y)}; expected the same number")
    if len(y) < 2:
        raise CaseError(f"{where}: {len(y)} sample(s); expected at least 2")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise CaseError(f"{where}: data contains NaN or infinity; expected finite numbers")


def _check_weights(case: LoadedCase, kind: str, weights: np.ndarray) -> None:
    """Sample weights: finite, none negative, not all zero (the inline form is checked by the
    schema too; a CSV column only here)."""
    where = f"{case.source.display}: dataset.{kind}.sample_weight"
    if kind == "csv":
        where += f" (column {case.spec.dataset.csv.sample_weight})"
    bad = np.flatnonzero(~np.isfinite(weights) | (weights < 0))
    if bad.size:
        line = f"line {bad[0] + 2}" if kind == "csv" else f"sample {bad[0]}"
        raise CaseError(f"{where}: {float(weights[bad[0]])!r} at {line}; expected finite weights >= 0")
    if not weights.any():
        raise CaseError(f"{where}: every weight is 0; expected at least one > 0")


def check_labels(case: LoadedCase, y: np.ndarray) -> None:
    """`bce` needs every y in [0, 1] (probabilities of the positive class)."""
    outside = np.flatnonzero((y < 0) | (y > 1))
    if outside.size:
        kind, settings = choice(case.spec.dataset)
        field = f"dataset.{kind}.y" + (f" (column {settings.y})" if kind == "csv" else "")
        at = f"line {outside[0] + 2}" if kind == "csv" else f"sample {outside[0]}"
        raise CaseError(f"{case.source.display}: {field}: {float(y[outside[0]])!r} at {at}; training.loss is bce, "
                        f"which needs every y in [0, 1] ({outside.size} sample(s) outside)")


def polynomial(x: np.ndarray, degree: int | None) -> np.ndarray:
    """x (n, 1) -> the columns x, x^2, ..., x^degree; unchanged when degree is None.

    Each power is the previous one times x: IEEE multiplications, the same bits with every
    NumPy. `x ** k` is not: NumPy 1.26's SIMD pow gives 13.0 ** 4 = 28560.999999999996 on
    AVX-512 machines, which cost NIST Wampler1 2.7 of its 15 certified digits.
    """
    if degree is None:
        return x
    columns = [x]
    for _ in range(degree - 1):
        columns.append(columns[-1] * x)
    return np.hstack(columns)


@dataclass(frozen=True)
class Standardizer:
    """Column centring and scaling (population std), and the map of parameters back."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardizer:
        return cls(x.mean(axis=0), x.std(axis=0))

    def apply(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.scale

    def to_original(self, params: np.ndarray) -> np.ndarray:
        """[w_s..., b_s] learned on standardized x -> [w..., b] on the original x (any leading axes)."""
        weights = params[..., :-1] / self.scale
        bias = params[..., -1] - weights @ self.mean
        return np.concatenate([weights, bias[..., None]], axis=-1)


def preprocess(case: LoadedCase, x: np.ndarray, settings: Preprocess) -> tuple[np.ndarray, Standardizer | None]:
    """Features as the model sees them: polynomial expansion, then optional standardization."""
    display = case.source.display
    if settings.polynomial is not None and x.shape[1] != 1:
        raise CaseError(f"{display}: preprocess.polynomial: the data has {x.shape[1]} features; "
                        "expected exactly 1 to expand")
    features = polynomial(x, settings.polynomial)
    if not np.isfinite(features).all():
        raise CaseError(f"{display}: preprocess.polynomial: x^{settings.polynomial} overflows float64")
    if not settings.standardize:
        return features, None
    if not case.spec.model.bias:
        raise CaseError(f"{display}: preprocess.standardize: centring needs an intercept; "
                        "expected model.bias: true")
    standardizer = Standardizer.fit(features)
    constant = [index for index, scale in enumerate(standardizer.scale) if not scale > 0 or math.isinf(scale)]
    if constant:
        raise CaseError(f"{display}: preprocess.standardize: feature column(s) {constant} are constant; "
                        "expected a nonzero spread to scale by")
    return standardizer.apply(features), standardizer
