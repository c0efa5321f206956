"""The catalogue of bad case files (tests/data/bad_cases.yaml): each one becomes one failing
`load` item whose message names the file, the field and what was expected, and the good case
beside it still runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from conformance.case import CaseError, CaseFile, load
from conformance.items import plan
from tests.conftest import ROOT

CATALOGUE = yaml.safe_load((ROOT / "tests" / "data" / "bad_cases.yaml").read_text())
BASE = CATALOGUE["base"]
OUTSIDE_CSV = "x,y\n1,2\n2,4\n3,6\n"


def build(tmp_path: Path, entry: dict) -> Path:
    """A cases folder holding a good case, the bad one, and whatever the entry needs beside it."""
    root = tmp_path / "cases"
    root.mkdir()
    (root / "good.yaml").write_text(BASE)
    for name, text in (entry.get("files") or {}).items():
        (root / name).write_text(text.replace("{BASE}", BASE))
    bad = root / f"{entry['id']}.yaml"
    bad.write_text(entry["text"].replace("{BASE}", BASE))
    (tmp_path / "outside.csv").write_text(OUTSIDE_CSV)
    make = entry.get("make")
    if make == "link-outside":
        os.symlink(tmp_path / "outside.csv", root / "link.csv")
    elif make == "huge":
        with bad.open("r+b") as stream:
            stream.truncate(100 * 1024 * 1024)  # sparse: 100 MB on paper, nothing on disk
    elif make == "deep":
        bad.write_text("dataset: " + "[" * 5_000 + "]" * 5_000 + "\n")
    return root


def test_catalogue_is_large_and_ids_are_unique():
    ids = [entry["id"] for entry in CATALOGUE["entries"]]
    assert len(ids) >= 30 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("entry", CATALOGUE["entries"], ids=lambda entry: entry["id"])
def test_bad_case_fails_alone_with_a_clear_message(tmp_path, entry):
    root = build(tmp_path, entry)
    items = plan([root], ["torch"], []).items
    failing = [item for item in items if item.check == "load"]
    assert len(failing) == entry.get("count", 1), [item.error for item in failing]
    bad = f"{entry['id']}.yaml"
    message = next(item.error for item in failing if item.source.endswith(bad))
    assert bad in message.split(":")[0], message  # the file comes first
    for words in entry["error"]:
        assert words in message, message
    assert "Traceback" not in message and len(message) < 2000
    assert any(item.case == "good" and item.check != "load" for item in items), "the good case must still run"


def test_an_alias_bomb_is_refused_in_well_under_a_second(tmp_path):
    """9^9 nodes after expansion from a 500-byte file; walking the expansion took 155 s of CPU."""
    import time

    from conformance.case import CaseError, CaseFile, load

    entry = next(entry for entry in CATALOGUE["entries"] if entry["id"] == "billion-laughs")
    root = build(tmp_path, entry)
    started = time.perf_counter()
    with pytest.raises(CaseError, match="its aliases expand to more than"):
        load(CaseFile(root / "billion-laughs.yaml", root))
    assert time.perf_counter() - started < 0.5


def test_a_repeated_key_is_an_error_naming_the_path_and_both_lines(tmp_path):
    from conformance.yamlio import YamlError, read_yaml

    path = tmp_path / "twice.yaml"
    path.write_text("dataset: {inline: {x: [1, 2], y: [1, 2]}}\ntraining:\n  epochs: 5\n"
                    "  optimizer: {sgd: {learning_rate: 0.1}}\n  epochs: 500000\n")
    with pytest.raises(YamlError, match=r"duplicate key 'training.epochs': first on line 3, again on line 5"):
        read_yaml(path)
    nested = tmp_path / "nested.yaml"
    nested.write_text("expect:\n  - {check: parity, reason: a, reason: b}\n")
    with pytest.raises(YamlError, match=r"duplicate key 'expect\[0\].reason'"):
        read_yaml(nested)


def test_a_bad_value_in_a_union_reports_only_the_branch_it_was_meant_for(write_case):
    """x is numbers or rows of numbers: an infinite number is one error, not also three list
    shapes the value never had."""
    path = write_case("inf", "dataset: {inline: {x: [1, 2, 1e400], y: [1, 2, 3]}}\n"
                             "training: {epochs: 3, optimizer: {sgd: {learning_rate: 0.01}}}\n")
    with pytest.raises(CaseError) as error:
        load(CaseFile(path, path.parent))
    assert str(error.value) == f"{path}: dataset.inline.x[2]: expected a finite number (no NaN or infinity), " \
                               "got Infinity (number)"
