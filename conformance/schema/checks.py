"""The case format's `tolerance`, `certified` and `expect` sections.
"""


from typing import Annotated, Literal, Optional, Union

from pydantic import (
    Field,
    field_validator,
)
from pydantic_core import PydanticCustomError

from conformance.schema._base import BACKEND_NAMES, CHECK_NAMES, DEVICE_PATTERN, NonNegative, Number, Strict

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
