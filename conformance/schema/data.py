"""The case format's `dataset`, `preprocess` and `model` sections.
"""


from typing import Annotated, Optional

from pydantic import (
    Field,
    model_validator,
)
from pydantic_core import PydanticCustomError

from conformance.schema._base import NonNegative, Number, Row, Strict, choice, one_of

# ---- dataset -------------------------------------------------------------------------------


class Inline(Strict):
    x: Row
    y: list[Number]
    sample_weight: Optional[list[NonNegative]] = None  # v1.1: one per sample, not all 0

    @model_validator(mode="after")
    def _one_weight_per_sample(self) -> "Inline":
        if self.sample_weight is not None and len(self.sample_weight) != len(self.y):
            raise PydanticCustomError(
                "sample_weight_length", "sample_weight has {got} values; expected one per sample of y ({want})",
                {"got": len(self.sample_weight), "want": len(self.y)},
            )
        return self


class Uniform(Strict):
    low: Number
    high: Number


class Normal(Strict):
    mean: Number = 0.0
    std: NonNegative


class Linspace(Strict):
    start: Number
    stop: Number


class Noise(Strict):
    std: NonNegative
    mean: Number = 0.0


class Generate(Strict):
    n: Annotated[int, Field(ge=1, le=100_000_000)]
    features: Annotated[int, Field(ge=1, le=10_000)] = 1
    x: one_of({"uniform": Uniform, "normal": Normal, "linspace": Linspace})  # type: ignore[valid-type]
    weights: list[Number]
    bias: Number = 0.0
    noise: Optional[one_of({"normal": Noise})] = None  # type: ignore[valid-type]
    seed: Optional[int] = None

    @model_validator(mode="after")
    def _seed_when_random(self) -> "Generate":
        random_x = choice(self.x)[0] != "linspace"
        if (random_x or self.noise is not None) and self.seed is None:
            raise PydanticCustomError("seed_required", "seed is required when x or noise is random")
        if len(self.weights) != self.features:
            raise PydanticCustomError(
                "weights_length", "weights has {got} values; expected features = {want}",
                {"got": len(self.weights), "want": self.features},
            )
        return self


class Csv(Strict):
    path: Annotated[str, Field(min_length=1)]
    x: Annotated[list[str], Field(min_length=1)]
    y: str
    sample_weight: Optional[str] = None  # v1.1: the column of per-sample weights


Dataset = one_of({"inline": Inline, "generate": Generate, "csv": Csv})


class Preprocess(Strict):
    polynomial: Optional[Annotated[int, Field(ge=1, le=30)]] = None
    standardize: bool = False


# ---- model ----------------------------------------------------------------------------------


class ConstantInit(Strict):
    weights: list[Number]
    bias: Number = 0.0


class NormalInit(Strict):
    std: NonNegative
    seed: int
    mean: Number = 0.0


class UniformInit(Strict):
    low: Number
    high: Number
    seed: int


class SeededInit(Strict):
    """v1.2 `glorot_uniform` and `he_normal`: drawn per layer from fan-in and fan-out (Keras's
    formulas, conformance/network.py), biases zero."""

    seed: int


Init = one_of({"constant": ConstantInit, "normal": NormalInit, "uniform": UniformInit,
               "glorot_uniform": SeededInit, "he_normal": SeededInit}, bare=("zeros",))


# v1.2 hidden layers. Activations whose frameworks disagree on a default take it explicitly.
class GeluSettings(Strict):
    approximate: bool  # true: the tanh form


class LeakyReluSettings(Strict):
    negative_slope: NonNegative


class EluSettings(Strict):
    alpha: NonNegative


PLAIN_ACTIVATIONS = ("linear", "relu", "tanh", "sigmoid", "softplus", "silu")
Activation = one_of({"gelu": GeluSettings, "leaky_relu": LeakyReluSettings, "elu": EluSettings},
                    bare=PLAIN_ACTIVATIONS)
MAX_PARAMETERS = 2_000  # every epoch's parameters of every result go to the JSON; docs/hidden-layers.md


class Hidden(Strict):
    units: Annotated[int, Field(ge=1, le=MAX_PARAMETERS)]
    activation: Activation  # type: ignore[valid-type]


class Model(Strict):
    bias: bool = True  # for every layer (Keras's use_bias)
    init: Init = "zeros"  # type: ignore[assignment]
    hidden: list[Hidden] = []  # v1.2; empty: the v1 linear model
