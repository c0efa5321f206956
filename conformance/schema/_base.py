"""What every part of the case format builds from: the strict base model (no unknown keys,
no coercion), one-key tagged unions, the numbers, names and patterns.
"""


from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    create_model,
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
        # named as the package's (the JSON Schema's $defs keep their names whichever part defines them)
        wrapper = create_model(f"{key.title().replace('_', '')}Choice", __base__=Strict,
                               __module__="conformance.schema", **{key: (inner, ...)})
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
