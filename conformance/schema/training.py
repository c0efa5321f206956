"""The case format's `training` section: optimizer, loss, schedule, clipping, precision,
replicas and accumulation.
"""


from typing import Annotated, Literal, Optional

from pydantic import (
    Field,
    model_validator,
)
from pydantic_core import PydanticCustomError

from conformance.schema._base import NonNegative, Positive, Strict, choice, one_of

# ---- training -------------------------------------------------------------------------------


class SGD(Strict):
    learning_rate: Positive
    momentum: NonNegative = 0.0
    nesterov: bool = False
    weight_decay: NonNegative = 0.0

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> "SGD":
        if self.nesterov and self.momentum == 0:
            raise PydanticCustomError("nesterov", "nesterov: true needs momentum > 0")
        return self


class Adam(Strict):
    learning_rate: Positive
    beta_1: Annotated[float, Field(ge=0, lt=1)] = 0.9
    beta_2: Annotated[float, Field(ge=0, lt=1)] = 0.999
    epsilon: NonNegative = 1e-8
    amsgrad: bool = False


class RMSprop(Strict):
    learning_rate: Positive
    rho: Annotated[float, Field(ge=0, lt=1)] = 0.9
    epsilon: NonNegative = 1e-8
    momentum: NonNegative = 0.0
    centered: bool = False


class Adagrad(Strict):
    learning_rate: Positive
    initial_accumulator_value: NonNegative = 0.0
    epsilon: NonNegative = 1e-10


Optimizer = one_of({"sgd": SGD, "adam": Adam, "rmsprop": RMSprop, "adagrad": Adagrad})


class MseSettings(Strict):
    reduction: Literal["mean", "sum"] = "mean"


class HuberSettings(Strict):
    """Per sample 0.5 r^2 if |r| <= delta, else delta * (|r| - delta / 2)."""

    delta: Positive = 1.0
    reduction: Literal["mean", "sum"] = "mean"


class BceSettings(Strict):
    """Logistic regression: p = sigmoid(x w + b), per sample -(y log p + (1 - y) log(1 - p)).
    from_logits: the framework's logits loss; else a sigmoid output and its probability loss."""

    from_logits: bool = True
    reduction: Literal["mean", "sum"] = "mean"


# v1.2 learning-rate schedules. t counts optimizer steps taken before this one (every: step) or
# epochs completed (every: epoch); the formulas are in conformance/schedules.py.
Steps = Annotated[int, Field(ge=1)]


class ExponentialDecay(Strict):
    decay_rate: Positive
    decay_steps: Steps
    staircase: bool = False


class PiecewiseConstant(Strict):
    boundaries: Annotated[list[Steps], Field(min_length=1)]
    values: Annotated[list[Positive], Field(min_length=2)]

    @model_validator(mode="after")
    def _one_value_per_interval(self) -> "PiecewiseConstant":
        if len(self.values) != len(self.boundaries) + 1:
            raise PydanticCustomError("piecewise", "values: {values} values for {boundaries} boundaries; expected "
                                      "{wanted} (one more than boundaries)",
                                      {"values": len(self.values), "boundaries": len(self.boundaries),
                                       "wanted": len(self.boundaries) + 1})
        if any(later <= earlier for earlier, later in zip(self.boundaries, self.boundaries[1:])):
            raise PydanticCustomError("piecewise", "boundaries: {boundaries} do not increase; expected each "
                                      "boundary larger than the one before", {"boundaries": self.boundaries})
        return self


class CosineDecay(Strict):
    decay_steps: Steps
    alpha: Annotated[float, Field(ge=0, le=1)] = 0.0
    warmup_steps: Annotated[int, Field(ge=0)] = 0


SCHEDULE_KINDS = ("exponential", "piecewise", "cosine")


class Schedule(Strict):
    """Exactly one schedule kind, and the unit of t."""

    exponential: Optional[ExponentialDecay] = None
    piecewise: Optional[PiecewiseConstant] = None
    cosine: Optional[CosineDecay] = None
    every: Literal["step", "epoch"] = "step"

    @model_validator(mode="after")
    def _exactly_one_kind(self) -> "Schedule":
        given = [kind for kind in SCHEDULE_KINDS if getattr(self, kind) is not None]
        if len(given) != 1:
            raise PydanticCustomError("one_of", "{given}; expected exactly one of: {kinds} (and optionally every)",
                                      {"given": f"{len(given)} schedule kinds given ({', '.join(given)})"
                                       if given else "no schedule kind given", "kinds": ", ".join(SCHEDULE_KINDS)})
        return self

    @property
    def kind(self) -> str:
        return next(kind for kind in SCHEDULE_KINDS if getattr(self, kind) is not None)

    @property
    def settings(self) -> Strict:
        return getattr(self, self.kind)


# v1.2 gradient clipping: of the loss's gradient, before weight decay is added.
Clip = one_of({"global_norm": Positive, "norm": Positive, "value": Positive})


class DynamicLossScale(Strict):
    """Dynamic loss scaling: start at `initial`, double after `growth_interval` consecutive
    finite steps, halve and skip the step on a non-finite gradient. The defaults are the spec
    example's (Keras's initial scale; torch's is 2^16: the harness passes both explicitly)."""

    initial: Positive = 32768.0
    growth_interval: Annotated[int, Field(ge=1)] = 2000


LossScale = one_of({"fixed": Positive, "dynamic": DynamicLossScale})
PRECISIONS = ("mixed_bfloat16", "mixed_float16")


MAX_ACCUMULATE = 100_000  # batches per optimizer step


class Training(Strict):
    epochs: Annotated[int, Field(ge=1, le=10_000_000)]
    batch_size: Optional[Annotated[int, Field(ge=1)]] = None
    shuffle: one_of({"seed": int}, bare=(False,)) = False  # type: ignore[valid-type]
    loss: one_of({"mse": MseSettings, "huber": HuberSettings, "bce": BceSettings},  # type: ignore[valid-type]
                 bare=("mse",)) = "mse"
    optimizer: Optimizer  # type: ignore[valid-type]
    dtype: Literal["float32", "float64"] = "float32"
    schedule: Optional[Schedule] = None  # v1.2
    clip: Optional[Clip] = None  # type: ignore[valid-type]  # v1.2
    precision: Optional[Literal[PRECISIONS]] = None  # type: ignore[valid-type]  # v1.2: compute dtype
    loss_scale: Optional[LossScale] = None  # type: ignore[valid-type]  # v1.2, only with mixed_float16
    replicas: Annotated[int, Field(ge=1, le=64)] = 1  # v1.2: data-parallel replicas, each a shard of every batch
    # v1.3: one optimizer step every `accumulate` batches, its gradient that of their union
    accumulate: Annotated[int, Field(ge=1, le=MAX_ACCUMULATE)] = 1

    @model_validator(mode="after")
    def _precision_rules(self) -> "Training":
        if self.precision is not None and self.dtype != "float32":
            raise PydanticCustomError("precision", "precision {precision} keeps the variables in float32; "
                                      "expected dtype float32 (it is {dtype})",
                                      {"precision": self.precision, "dtype": self.dtype})
        if self.loss_scale is not None and self.precision != "mixed_float16":
            raise PydanticCustomError("loss_scale", "loss_scale is for float16's narrow range; expected "
                                      "precision mixed_float16 with it (it is {precision})",
                                      {"precision": self.precision or "not set"})
        return self

    @model_validator(mode="after")
    def _piecewise_starts_at_the_rate(self) -> "Training":
        if self.schedule is not None and self.schedule.piecewise is not None:
            rate = choice(self.optimizer)[1].learning_rate
            first = self.schedule.piecewise.values[0]
            if rate != first:
                raise PydanticCustomError("piecewise", "schedule.piecewise.values[0] is {first}, optimizer "
                                          "learning_rate is {rate}; expected them equal (the rate before the "
                                          "first boundary)", {"first": first, "rate": rate})
        return self
