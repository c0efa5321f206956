"""Every YAML example of the spec and the docs loads: the contract as written is the contract run.

A block is checked as a whole case file when it has `dataset` and `training`; a fragment (a
block showing a few fields) is checked by completing it with a minimal case around it. A block
that is not meant to load says so on its first line with `# fragment: not a case`.
"""

from __future__ import annotations

import copy
import re

import pytest
import yaml
from pydantic import ValidationError

from conformance.schema import Case
from tests.conftest import ROOT

SPEC = ROOT.parent / "shared" / "spec" / "case-format.md"
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"] + ([SPEC] if SPEC.exists() else [])
BLOCK = re.compile(r"^```ya?ml\n(.*?)^```", re.S | re.M)
MINIMAL = {"dataset": {"inline": {"x": [0, 1, 2], "y": [1, 3, 5]}},
           "training": {"epochs": 1, "optimizer": {"sgd": {"learning_rate": 0.1}}}}
# The spec's mixed-precision block lists alternatives in its comments: as written it puts a
# loss_scale under mixed_bfloat16, which its own comment ("only with mixed_float16") and the rule
# of issue 22 forbid. It must fail with that rule's message, and load with the alternative.
SELF_CONTRADICTING = {"loss_scale": ({"precision": "mixed_float16"}, "expected precision mixed_float16")}


def blocks() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        for number, match in enumerate(BLOCK.finditer(path.read_text(encoding="utf-8"))):
            found.append((f"{path.name}#{number}", match.group(1)))
    return found


def completed(data: dict) -> dict:
    """The fragment inside a minimal case (its keys merged over the minimal one's)."""
    case = copy.deepcopy(MINIMAL)
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(case.get(key), dict):
            case[key] = case[key] | value
        else:
            case[key] = value
    return case


@pytest.mark.parametrize(("where", "text"), blocks(), ids=[where for where, _ in blocks()])
def test_every_yaml_example_loads(where, text):
    if text.startswith("# fragment: not a case"):
        pytest.skip("marked as not a case")
    data = yaml.safe_load(text.replace("[...]", "[1, 2, 3]"))  # placeholders stand for numbers
    if isinstance(data, list):  # an expectations-file or `expect` list example
        pytest.skip("a list: checked by the expectations tests")
    assert isinstance(data, dict), f"{where}: not a mapping"
    contradiction = next((fix for key, fix in SELF_CONTRADICTING.items()
                          if where.startswith("case-format.md") and key in data.get("training", {})), None)
    if contradiction is not None and data["training"].get("precision") != "mixed_float16":
        fix, message = contradiction
        with pytest.raises(ValidationError, match=message):
            Case.model_validate(completed(data))
        data = copy.deepcopy(data)
        data["training"] |= fix
    try:
        Case.model_validate(completed(data))
    except ValidationError as error:
        pytest.fail(f"{where} does not load:\n{error}\n---\n{text}")


def test_the_v1_default_spelling_of_the_loss_loads():
    assert Case.model_validate(completed({"training": {"loss": "mse"}})).training.loss == "mse"
    assert Case.model_validate(completed({"training": {"loss": {"mse": {"reduction": "sum"}}}}))
