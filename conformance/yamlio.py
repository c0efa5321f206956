"""Reading and writing case files: one YAML dialect, YAML 1.2 numbers.

PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string. The case format promises that
`1e-3` is a number, so the loader resolves floats with the YAML 1.2 core-schema pattern.
Tags that construct Python objects are rejected, as by `yaml.safe_load`.

Every case the suite writes (generated cases, shrunk reproducers) goes through `dump_yaml`,
whose dumper quotes a string whenever YAML 1.1 or the loader's YAML 1.2 numbers would read it
as another type (`0E0`, `1e5`, `.5`, `yes`, `1_000`): written then read, a document is itself,
here and in any YAML 1.1 reader.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

MAX_CASE_BYTES = 1_000_000
MAX_DEPTH = 64
# Aliases let a 1 KB file stand for billions of nodes ("billion laughs"): everything after the
# parser (validation, data conversion) walks the expanded document, so its size is bounded. A
# 1 MB file of plain data has at most ~500,000 nodes; this bound only refuses expansion.
MAX_EXPANDED_NODES = 2_000_000

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


class CaseDumper(yaml.SafeDumper):
    """SafeDumper that quotes every string CaseLoader or a YAML 1.1 loader would resolve to
    another type.

    PyYAML writes a string plain only when its own resolvers read it back as a string, so the
    dumper resolves with both dialects: YAML 1.1's (SafeDumper's) and the loader's 1.2 floats.
    """


CaseDumper.yaml_implicit_resolvers = {
    key: list(resolvers) for key, resolvers in yaml.SafeDumper.yaml_implicit_resolvers.items()
}
CaseDumper.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_1_2, list("-+0123456789."))


def dump_yaml(document: Any, **options: Any) -> str:
    """A document as YAML text that `read_yaml` (and any YAML 1.1 reader) reads back unchanged;
    `options` go to `yaml.dump` (sort_keys, width, ...)."""
    return yaml.dump(document, Dumper=CaseDumper, **options)  # non-ASCII escaped: PyYAML mangles a raw NEL (\x85)


def parse_yaml(text: str) -> Any:
    """Text in the case format's dialect as Python data (no size or shape checks: see read_yaml)."""
    return yaml.load(text, Loader=CaseLoader)  # CaseLoader is a SafeLoader


class YamlError(ValueError):
    """The file is not readable YAML; the message names the file and the position."""


def read_yaml(path: Path) -> Any:
    """Parse one case file; refuse files that are too big or too deeply nested to be cases."""
    size = path.stat().st_size
    if size > MAX_CASE_BYTES:
        raise YamlError(f"file is {size} bytes; a case file may have at most {MAX_CASE_BYTES}")
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text, Loader=CaseLoader)
        _check_expansion(root)
        _check_unique_keys(root)
        return parse_yaml(text)
    except yaml.YAMLError as error:
        raise YamlError(f"not valid YAML: {_one_line(error)}") from None
    except RecursionError:  # PyYAML composes recursively: thousands of levels exhaust the stack
        raise YamlError(f"not valid YAML: nesting deeper than {MAX_DEPTH} levels") from None


def _check_expansion(root: yaml.Node | None) -> None:
    """Refuse documents nested deeper than MAX_DEPTH, or larger than MAX_EXPANDED_NODES once
    their aliases are expanded, or that contain themselves (a recursive alias).

    Each distinct node is visited once (aliases share nodes), and its expanded size and depth
    are computed from its children's, so the check costs the file's size, not the expansion's.
    """
    if root is None:
        return
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    in_progress: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        children = _children(node)
        if children_done:
            in_progress.discard(key)
            size[key] = 1 + sum(size[id(child)] for child in children)
            depth[key] = 1 + max((depth[id(child)] for child in children), default=0)
            if depth[key] > MAX_DEPTH:
                raise yaml.YAMLError(f"nesting deeper than {MAX_DEPTH} levels")
            if size[key] > MAX_EXPANDED_NODES:
                raise yaml.YAMLError(f"its aliases expand to more than {MAX_EXPANDED_NODES:,} nodes; a case file "
                                     f"may have at most that many")
            continue
        if key in size:
            continue
        if key in in_progress:
            raise yaml.YAMLError("a recursive alias (a node that contains itself)")
        if len(in_progress) >= MAX_DEPTH:
            raise yaml.YAMLError(f"nesting deeper than {MAX_DEPTH} levels")
        in_progress.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in children if id(child) not in size)


def _check_unique_keys(root: yaml.Node | None) -> None:
    """Refuse a key repeated in one mapping (YAML 1.2 requires unique keys; PyYAML keeps the
    last value without a word, so `epochs: 5` then `epochs: 500000` trains 500,000 epochs).
    The error names the key's path and both lines. Runs after `_check_expansion`, so the walk
    is bounded; aliased nodes are checked once."""
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, str]] = [(root, "")] if root is not None else []
    while stack:
        node, path = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, f"{path}[{index}]") for index, child in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            lines: dict[str, int] = {}
            for key, value in node.value:
                name = str(key.value) if isinstance(key, yaml.ScalarNode) else "?"
                where = f"{path}.{name}" if path else name
                if isinstance(key, yaml.ScalarNode) and name in lines:
                    raise yaml.YAMLError(f"duplicate key {where!r}: first on line {lines[name]}, again on line "
                                         f"{key.start_mark.line + 1}; a key may appear once in a mapping")
                lines[name] = key.start_mark.line + 1
                stack.append((value, where))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [child for pair in node.value for child in pair]
    return []


def _one_line(error: yaml.YAMLError) -> str:
    return " ".join(str(error).replace('in "<unicode string>", ', "").split())
