"""The case format (v1 to v1.3) as pydantic models: the single source of validation and JSON
Schema. One module per part of a case file: `data` (dataset, preprocess, model), `training`,
`checks` (tolerance, certified, expect), over `_base`; `Case` ties them together here.

Every model forbids unknown keys and coerces nothing (a quoted "0.01" is not a number), so a
typo or a wrong type is an error with a field path, never a silent default. Mappings with
exactly one key (`optimizer: {sgd: ...}`, `init: {normal: ...}`) are tagged unions on that
key, which keeps error messages about the branch the user meant.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from conformance.schema._base import BACKEND_NAMES, DEVICE_PATTERN, NAME_PATTERN, Row, Strict, choice
from conformance.schema.checks import DEFAULT_PARITY, Certified, Expect, Tol, Tolerance
from conformance.schema.data import MAX_PARAMETERS, Csv, Dataset, Generate, Inline, Model, Preprocess
from conformance.schema.training import Training

__all__ = ["BACKEND_NAMES", "DEFAULT_PARITY", "DEVICE_PATTERN", "MAX_PARAMETERS", "Case", "Csv", "Expect", "Generate",
           "Inline", "Preprocess", "Strict", "Tol", "choice"]


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
