"""Finding, reading and validating case files; every error names file, field and expectation."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from conformance.schema import Case
from conformance.yamlio import YamlError, read_yaml

CASE_SUFFIXES = (".yaml", ".yml")


class CaseError(ValueError):
    """A case file that cannot be run; str() is the full message shown to the user."""


@dataclass(frozen=True)
class CaseFile:
    """Where a case comes from: the file, and the root its data paths must stay inside."""

    path: Path
    root: Path

    @property
    def display(self) -> str:
        try:
            return str(self.path.relative_to(Path.cwd()))
        except ValueError:
            return str(self.path)


@dataclass(frozen=True)
class LoadedCase:
    source: CaseFile
    name: str
    spec: Case


def discover(locations: Iterable[Path]) -> list[CaseFile]:
    """Case files under each location (a file or a folder, searched recursively), sorted."""
    found: dict[Path, CaseFile] = {}
    for location in locations:
        location = location.absolute()
        if location.is_file():
            found.setdefault(location, CaseFile(location, location.parent))
        elif location.is_dir():
            for path in sorted(location.rglob("*")):
                if path.suffix in CASE_SUFFIXES and path.is_file() and not _hidden(path, location):
                    found.setdefault(path, CaseFile(path, location))
        else:
            raise CaseError(f"{location}: no such case file or folder")
    return sorted(found.values(), key=lambda source: str(source.path))


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def load(source: CaseFile) -> LoadedCase:
    """Read and validate one file; raises CaseError with every problem found in it."""
    try:
        data = read_yaml(source.path)
    except (YamlError, OSError, UnicodeDecodeError) as error:
        raise CaseError(f"{source.display}: {error}") from None
    if not isinstance(data, dict):
        raise CaseError(f"{source.display}: expected a mapping of case fields at the top level, got {_kind(data)}")
    try:
        spec = Case.model_validate(data)
    except ValidationError as error:
        raise CaseError(format_errors(source.display, error)) from None
    return LoadedCase(source, spec.name or source.path.stem, spec)


def format_errors(display: str, error: ValidationError) -> str:
    lines = [f"{display}: {field_path(item['loc'])}: {_expectation(item)}" for item in _without_union_noise(error)]
    return "\n".join(lines) if len(lines) == 1 else f"{display}: {len(lines)} errors\n" + "\n".join(lines)


def _without_union_noise(error: ValidationError) -> list[dict[str, Any]]:
    """Pydantic reports an error for each member of a union such as `parity: auto | {rtol, atol}`,
    with the member in the path ('Tol', "literal['auto']"). The path loses the member's name, and
    the literal member's error goes when the other member's error says more (a wrong setting
    inside the mapping rather than no mapping at all)."""
    items = []
    for item in _meant_branch(error.errors()):
        loc = tuple(part for part in item["loc"] if not (_union_member(part) or _type_tag(part)))
        literal = any(str(part).startswith("literal[") for part in item["loc"])
        items.append(item | {"loc": loc, "literal_member": literal})
    others = [item for item in items if not item["literal_member"]]
    specific = {item["loc"][:-1] for item in others} | \
        {item["loc"] for item in others if item["type"] not in ("model_type", "dict_type")}
    return [item for item in items if not (item["literal_member"] and item["loc"] in specific)]


def _meant_branch(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For a union of shapes (`x`: numbers or rows of numbers), only the errors of the branch the
    value was meant for: the one with the fewest errors (then the deepest), so that a bad number
    in a list of numbers is not also reported as three list shapes the value never had. Unions
    with a literal member (`auto | {rtol, atol}`) are left to _without_union_noise."""
    branches: dict[tuple[Any, ...], dict[str, list[dict[str, Any]]]] = {}
    for item in errors:
        where = _first_member(item["loc"])
        if where is not None:
            branches.setdefault(item["loc"][:where], {}).setdefault(item["loc"][where], []).append(item)
    dropped: set[int] = set()
    for members in branches.values():
        if len(members) < 2 or any(str(member).startswith("literal[") for member in members):
            continue
        meant = min(members, key=lambda member: (len(members[member]),
                                                 -max(len(item["loc"]) for item in members[member])))
        dropped |= {id(item) for member, found in members.items() if member != meant for item in found}
    return [item for item in errors if id(item) not in dropped]


def _first_member(loc: tuple[Any, ...]) -> int | None:
    """Where the first union member's tag is in an error's path, if anywhere."""
    for index, part in enumerate(loc):
        if _union_member(part) or _type_tag(part):
            return index
    return None


def _type_tag(part: Any) -> bool:
    """A union member named by its type in an error's path: 'list[float]', 'function-after[...]'."""
    return isinstance(part, str) and "[" in part


def _union_member(part: Any) -> bool:
    return isinstance(part, str) and (part[:1].isupper() or part.startswith("literal["))


def field_path(loc: tuple[Any, ...]) -> str:
    """('training', 'optimizer', 'sgd', 'sgd', 'lr') -> 'training.optimizer.sgd.lr'."""
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif not parts or parts[-1] != f".{part}":
            parts.append(f".{part}")
    return "".join(parts).lstrip(".") or "(top level)"


_EXPECTED = {
    "missing": "required field is missing",
    "float_type": "expected a number",
    "int_type": "expected an integer",
    "bool_type": "expected true or false",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "finite_number": "expected a finite number (no NaN or infinity)",
    "literal_error": "expected {expected}",
}


def _expectation(item: dict[str, Any]) -> str:
    template = _EXPECTED.get(item["type"])
    if template is None:
        message = item["msg"]
        message = message[0].lower() + message[1:] if message else message
    else:
        message = template.format(**item.get("ctx", {}))
    if item["type"] == "one_of" and isinstance(item.get("input"), dict):
        keys = ", ".join(str(key) for key in item["input"]) or "none"
        message += f"; got {'key' if len(item['input']) == 1 else 'keys'}: {keys}"
    elif item["type"] not in ("missing", "unknown_key", "one_of") and "input" in item:
        message += f", got {_show(item['input'])}"
    return message


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return (text if len(text) <= 60 else text[:57] + "...") + f" ({_kind(value)})"


def _kind(value: Any) -> str:
    return {dict: "mapping", list: "list", str: "string", bool: "boolean", int: "integer",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def seeds(case: LoadedCase) -> dict[str, int]:
    """Every random seed the case sets, by field path (for the report: what makes a run repeatable)."""
    found: dict[str, int] = {}

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                if key == "seed" and isinstance(inner, int):
                    found[path or "seed"] = inner
                else:
                    walk(inner, f"{path}.{key}" if path else str(key))

    walk(case.spec.model_dump(warnings=False), "")
    return found
