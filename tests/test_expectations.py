"""The expectations files of a run: the shipped one, the user's on top, `none` to drop them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conformance import expectations
from conformance.case import CaseFile, load
from conformance.checks import make_run
from conformance.plugin import SHIPPED_EXPECTATIONS, _expectations_files

MINE = """\
- check: parity
  backend: torch
  when: {optimizer: sgd}
  reason: my own finding
"""
CASE = """\
dataset: {inline: {x: [0, 1, 2], y: [1, 3, 5]}}
training: {epochs: 3, optimizer: {sgd: {learning_rate: 0.1}}}
"""


def test_a_users_file_adds_to_the_shipped_one_and_none_drops_what_came_before(tmp_path):
    (tmp_path / "mine.yaml").write_text(MINE)
    assert _expectations_files([], tmp_path) == [SHIPPED_EXPECTATIONS]
    assert _expectations_files(["mine.yaml"], tmp_path) == [SHIPPED_EXPECTATIONS, tmp_path / "mine.yaml"]
    assert _expectations_files(["none", "mine.yaml"], tmp_path) == [tmp_path / "mine.yaml"]
    assert _expectations_files(["mine.yaml", "none"], tmp_path) == []
    with pytest.raises(pytest.UsageError, match="--expectations nope.yaml: no such file"):
        _expectations_files(["nope.yaml"], tmp_path)


def test_entries_keep_the_file_they_came_from(tmp_path, write_case):
    mine = tmp_path / "mine.yaml"
    mine.write_text(MINE)
    known = expectations.load_all([SHIPPED_EXPECTATIONS, mine])
    shipped = expectations.load(SHIPPED_EXPECTATIONS)
    assert len(known.entries) == len(shipped.entries) + 1 and known.source == f"{SHIPPED_EXPECTATIONS}, {mine}"
    path = write_case("sgd", CASE)
    run = make_run(load(CaseFile(path, path.parent)), [("torch", "cpu")], known=known)
    entry = known.applicable(run.prepared.problem, "parity", "torch", "cpu", {})
    assert entry is not None and entry.reason == "my own finding" and known.source_of(entry) == str(mine)
    assert expectations.load_all([]).entries == () and Path(known.source_of(known.entries[0])) == SHIPPED_EXPECTATIONS


def test_when_holds_for_the_schedule_its_settings_and_the_clip():
    from dataclasses import replace

    from conformance.problem import Optimizer, Problem

    base = Problem("p", np.zeros((2, 1)), np.zeros(2), np.zeros(1), None, 1, 2, None, "mean",
                   Optimizer("sgd", {"learning_rate": 0.1}), "float64")
    cosine = replace(base, schedule={"kind": "cosine", "settings": {"decay_steps": 5, "alpha": 0.0,
                                                                     "warmup_steps": 2}, "every": "epoch"},
                     clip={"kind": "norm", "threshold": 1.0})

    def when(**conditions):
        return expectations.When.model_validate(conditions)

    assert not expectations.holds(when(schedule="cosine"), base)
    assert expectations.holds(when(schedule=["exponential", "cosine"]), cosine)
    assert expectations.holds(when(schedule="cosine", schedule_settings={"warmup_steps": "> 0", "every": "epoch"}),
                              cosine)
    assert not expectations.holds(when(schedule_settings={"every": "step"}), cosine)
    assert expectations.holds(when(clip=["global_norm", "norm"]), cosine)
    assert not expectations.holds(when(clip="value"), cosine) and not expectations.holds(when(clip="norm"), base)


def test_when_activation_matches_any_hidden_layer():
    from dataclasses import replace

    from conformance.problem import Optimizer, Problem

    linear = Problem("p", np.zeros((2, 1)), np.zeros(2), np.zeros(3), None, 1, 2, None, "mean",
                     Optimizer("sgd", {"learning_rate": 0.1}), "float64")
    hidden = [{"units": 3, "activation": "tanh", "settings": None},
              {"units": 2, "activation": "gelu", "settings": {"approximate": False}}]
    network = replace(linear, hidden=hidden)
    when = expectations.When.model_validate
    assert expectations.holds(when({"activation": "gelu"}), network)
    assert expectations.holds(when({"activation": ["relu", "tanh"]}), network)
    assert not expectations.holds(when({"activation": "relu"}), network)
    assert not expectations.holds(when({"activation": "gelu"}), linear)  # no hidden layers: no activation
    assert expectations.holds(when({}), linear)


def test_when_shards_tells_even_splits_from_uneven_ones():
    """The short-shard deviation needs a batch the replicas do not divide: a full batch or the
    shorter last one; one replica is always even."""
    from dataclasses import replace

    from conformance.problem import Optimizer, Problem

    base = Problem("p", np.zeros((8, 1)), np.zeros(8), np.zeros(2), None, 1, 4, None, "mean",
                   Optimizer("sgd", {"learning_rate": 0.1}), "float64")
    when = expectations.When.model_validate
    even = replace(base, replicas=2)  # batches of 4 and 4
    short_last = replace(base, x=np.zeros((7, 1)), y=np.zeros(7), replicas=2)  # 4 and 3
    odd_batch = replace(base, replicas=3)  # 4 over 3 replicas
    assert expectations.holds(when({"shards": "even"}), even) and expectations.holds(when({"shards": "even"}), base)
    assert expectations.holds(when({"shards": "uneven"}), short_last)
    assert expectations.holds(when({"replicas": "> 1", "shards": "uneven"}), odd_batch)
    assert not expectations.holds(when({"shards": "uneven"}), even)


def test_when_sample_weights_tells_weighted_data_from_unweighted():
    from dataclasses import replace

    from conformance.problem import Optimizer, Problem

    plain = Problem("p", np.zeros((4, 1)), np.zeros(4), np.zeros(2), None, 1, 4, None, "mean",
                    Optimizer("sgd", {"learning_rate": 0.1}), "float64")
    weighted = replace(plain, sample_weight=np.ones(4))
    when = expectations.When.model_validate
    assert expectations.holds(when({"sample_weights": True}), weighted)
    assert not expectations.holds(when({"sample_weights": True}), plain)
    assert expectations.holds(when({"sample_weights": False}), plain)
    assert expectations.holds(when({}), weighted)
