"""The v1 case format as pydantic models: the single source of validation and JSON Schema.

Every model forbids unknown keys and coerces nothing (a quoted "0.01" is not a number), so a
typo or a wrong type is an error with a field path, never a silent default. Mappings with
exactly one key (`optimizer: {sgd: ...}`, `init: {normal: ...}`) are tagged unions on that
key, which keeps error messages about the branch the user meant.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

BACKEND_NAMES = ("keras", "gradient_tape", "torch", "keras_xla", "gradient_tape_xla", "torch_compile", "jax",
                 "keras_jax", "keras_torch", "lightning", "accelerate")
CHECK_NAMES = ("parity", "lstsq", "certified", "trajectory")
DEVICE_PATTERN = r"^(cpu|cuda:[0-9]+|mps)$"
NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"

Number = Annotated[float, Field(allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Row = Union[list[Number], list[list[Number]]]


class Strict(BaseModel):
    """Base of every case model: unknown keys are errors that list the keys allowed."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = [key for key in data if key not in cls.model_fields]
            if unknown:
                raise PydanticCustomError(
                    "unknown_key",
                    "unknown key {keys}; expected one of: {allowed}",
                    {"keys": ", ".join(map(repr, map(str, unknown))), "allowed": ", ".join(cls.model_fields)},
                )
        return data


def one_of(choices: dict[str, Any], *, bare: tuple[Any, ...] = ()) -> Any:
    """A value that is a mapping with exactly one key from `choices` (or one of `bare`).

    `bare` values stand for themselves (`init: zeros`, `shuffle: false`, `loss: mse`). A bare
    value may share its word with a key (`loss: mse` and `loss: {mse: {...}}`): bare values are
    tagged apart from keys, so each form reaches its own branch.
    """

    def tag(value: Any) -> str | None:
        for word in bare:
            if value is word or (isinstance(word, str) and value == word):
                return _bare_tag(word)
        if isinstance(value, dict) and len(value) == 1:
            return str(next(iter(value)))
        if isinstance(value, BaseModel):
            return next(iter(type(value).model_fields))
        return None

    shown = {False: "false", True: "true"}
    expected = ", ".join([shown.get(word, str(word)) for word in bare] + [f"{{{key}: ...}}" for key in choices])
    members = [Annotated[Literal[word], Tag(_bare_tag(word))] for word in bare]  # type: ignore[valid-type]
    for key, inner in choices.items():
        wrapper = create_model(f"{key.title().replace('_', '')}Choice", __base__=Strict, **{key: (inner, ...)})
        members.append(Annotated[wrapper, Tag(key)])
    return Annotated[
        Union[tuple(members)],  # type: ignore[valid-type]
        Discriminator(
            tag,
            custom_error_type="one_of",
            custom_error_message=f"expected exactly one of: {expected}",
        ),
    ]


def _bare_tag(word: Any) -> str:
    return f"={word}"


def choice(value: Any) -> tuple[str, Any]:
    """(tag, settings) of a value validated by `one_of`; settings is None for bare values."""
    if isinstance(value, BaseModel):
        key = next(iter(type(value).model_fields))
        return key, getattr(value, key)
    return str(value).lower(), None


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



# ---- checks ---------------------------------------------------------------------------------


class Tol(Strict):
    rtol: NonNegative = 0.0
    atol: NonNegative = 0.0


DEFAULT_PARITY = Tol(rtol=1.0e-5, atol=1.0e-6)
DEFAULT_LSTSQ = Tol(rtol=1.0e-3, atol=1.0e-3)


class Tolerance(Strict):
    # "auto" (v1.1): derived from how far rounding alone moves this case (rounding_bands.rounding_band)
    parity: Union[Literal["auto"], Tol] = DEFAULT_PARITY
    lstsq: Optional[Tol] = DEFAULT_LSTSQ
    # v1.2: every epoch's parameters and loss against the replay's; auto: a band per epoch
    # (rounding_bands.trajectory_bands); null: not checked. v1.3: when absent, the parity tolerance
    # where the file sets parity by hand (a v1 file keeps its meaning), else auto: `along_path`.
    trajectory: Union[Literal["auto"], Tol, None] = "auto"

    @property
    def along_path(self) -> Union[Literal["auto"], Tol, None]:
        """The trajectory tolerance in force: the file's own, or (absent) its hand-set parity
        tolerance, or auto."""
        if "trajectory" in self.model_fields_set:
            return self.trajectory
        if "parity" in self.model_fields_set and isinstance(self.parity, Tol):
            return self.parity
        return "auto"


class Certified(Strict):
    weights: Annotated[list[Number], Field(min_length=1)]
    bias: Optional[Number] = None
    min_digits: Annotated[float, Field(gt=0, le=17, allow_inf_nan=False)]


BackendName = Literal[BACKEND_NAMES]  # type: ignore[valid-type]


class Expect(Strict):
    # One backend, or (v1.1, additive) a list of them that share the deviation and its reason.
    backend: Optional[Union[BackendName, Annotated[list[BackendName], Field(min_length=1)]]] = None
    device: Optional[Annotated[str, Field(pattern=DEVICE_PATTERN)]] = None
    check: Literal[CHECK_NAMES]  # type: ignore[valid-type]
    reason: Annotated[str, Field(min_length=1)]
    versions: dict[str, str] = {}
    # v1.2: how large the deviation may be (against the check's reference side); larger fails
    bound: Optional[Tol] = None

    @field_validator("versions")
    @classmethod
    def _specifiers(cls, versions: dict[str, str]) -> dict[str, str]:
        from packaging.specifiers import InvalidSpecifier, SpecifierSet

        for package, spec in versions.items():
            try:
                SpecifierSet(spec)
            except InvalidSpecifier:
                raise PydanticCustomError(
                    "specifier", "{package}: {spec!r} is not a PEP 440 version specifier",
                    {"package": package, "spec": spec},
                ) from None
        return versions

    @property
    def backend_names(self) -> list[str]:
        """The backends this entry covers; empty for every backend."""
        if self.backend is None:
            return []
        return [self.backend] if isinstance(self.backend, str) else list(self.backend)


class Case(Strict):
    """One v1 case file, validated. Cross-field rules that need the data live in problem.py."""

    model_config = ConfigDict(json_schema_extra={"$schema": "https://json-schema.org/draft/2020-12/schema"})

    name: Optional[Annotated[str, Field(pattern=NAME_PATTERN, max_length=120)]] = None
    description: Optional[str] = None
    dataset: Dataset  # type: ignore[valid-type]
    preprocess: Preprocess = Preprocess()
    model: Model = Model()
    training: Training
    predict: Optional[Row] = None
    backends: Optional[Annotated[list[Literal[BACKEND_NAMES]], Field(min_length=1)]] = None  # type: ignore[valid-type]
    devices: Optional[Annotated[list[Annotated[str, Field(pattern=DEVICE_PATTERN)]], Field(min_length=1)]] = None
    tolerance: Tolerance = Tolerance()
    certified: Optional[Certified] = None
    expect: list[Expect] = []

    @model_validator(mode="before")
    @classmethod
    def _no_lstsq_with_hidden_layers(cls, data: Any) -> Any:
        """A model with hidden layers has no closed-form optimum: `tolerance.lstsq` defaults to
        null for it, and a case that asks for one is told why there is none."""
        model, tolerance = (data.get(key) if isinstance(data, dict) else None for key in ("model", "tolerance"))
        if not (isinstance(model, dict) and model.get("hidden")):
            return data
        if isinstance(tolerance, dict) and tolerance.get("lstsq") is not None:
            raise PydanticCustomError("hidden_lstsq", "tolerance.lstsq: a model with hidden layers has no "
                                      "closed-form optimum to compare with; expected null (or no lstsq key)")
        if data.get("certified") is not None:
            raise PydanticCustomError("hidden_certified", "certified: certified values are for the linear model; "
                                      "expected no certified section with model.hidden")
        return data | {"tolerance": (tolerance if isinstance(tolerance, dict) else {}) | {"lstsq": None}} \
            if tolerance is None or isinstance(tolerance, dict) else data
