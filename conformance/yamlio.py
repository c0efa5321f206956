"""Reading case files: YAML with a safe loader and YAML 1.2 numbers.

PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string. The case format promises that
`1e-3` is a number, so the loader resolves floats with the YAML 1.2 core-schema pattern.
Tags that construct Python objects are rejected, as by `yaml.safe_load`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

MAX_CASE_BYTES = 1_000_000
MAX_DEPTH = 64

_FLOAT_1_2 = re.compile(
    r"""^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class CaseLoader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` and `1E+5` as floats (YAML 1.2)."""


CaseLoader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
CaseLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_1_2, list("-+0123456789."))


class YamlError(ValueError):
    """The file is not readable YAML; the message names the file and the position."""


def read_yaml(path: Path) -> Any:
    """Parse one case file; refuse files that are too big or too deeply nested to be cases."""
    size = path.stat().st_size
    if size > MAX_CASE_BYTES:
        raise YamlError(f"file is {size} bytes; a case file may have at most {MAX_CASE_BYTES}")
    text = path.read_text(encoding="utf-8")
    try:
        _check_depth(yaml.compose(text, Loader=CaseLoader))
        return yaml.load(text, Loader=CaseLoader)  # CaseLoader is a SafeLoader
    except yaml.YAMLError as error:
        raise YamlError(f"not valid YAML: {_one_line(error)}") from None
    except RecursionError:  # PyYAML composes recursively: thousands of levels exhaust the stack
        raise YamlError(f"not valid YAML: nesting deeper than {MAX_DEPTH} levels") from None


def _check_depth(node: yaml.Node | None) -> None:
    stack = [(node, 1)] if node is not None else []
    while stack:
        current, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise yaml.YAMLError(f"nesting deeper than {MAX_DEPTH} levels")
        if isinstance(current, yaml.SequenceNode):
            stack.extend((child, depth + 1) for child in current.value)
        elif isinstance(current, yaml.MappingNode):
            stack.extend((child, depth + 1) for pair in current.value for child in pair)


def _one_line(error: yaml.YAMLError) -> str:
    return " ".join(str(error).replace('in "<unicode string>", ', "").split())
