"""The pairwise item when there is nothing to compare: it is skipped with the reason, never passed.

The results are planted in the case's run (the guide allows fakes for such paths); comparing
them is the real code.
"""

from __future__ import annotations

import numpy as np
import pytest

from conformance.case import CaseFile, load
from conformance.checks import Trained, make_run
from conformance.items import ItemSpec, run_item
from conformance.problem import Trajectory

CASE = """\
dataset: {inline: {x: [1, 2, 3], y: [2, 4, 6]}}
training: {epochs: 2, optimizer: {sgd: {learning_rate: 0.01}}}
expect: [{backend: keras, check: parity, reason: known}]
"""
PAIRS = [("keras", "cpu"), ("torch", "cpu")]


@pytest.fixture
def case_run(write_case):
    path = write_case("case", CASE)
    return make_run(load(CaseFile(path, path.parent)), PAIRS)


def plant(run, backend: str, final: list[float]) -> None:
    params = np.array([[0.0, 0.0], final])
    run.results[(backend, "cpu")] = Trained(backend, "cpu", Trajectory(params, np.array([1.0, 0.5])), 0.0)


def test_every_result_diverged_skips_with_the_count(case_run):
    plant(case_run, "keras", [np.nan, 0.0])
    plant(case_run, "torch", [np.inf, 0.0])
    outcome = case_run.check_pairwise({})
    assert outcome.skipped and not outcome.passed
    assert outcome.message.startswith("nothing to compare: 2 of 2 result(s) diverged; 0 pairs checked")


def test_only_pairs_with_an_expected_deviation_skip_the_item_through_run_item(case_run):
    plant(case_run, "keras", [2.0, 0.0])
    plant(case_run, "torch", [2.0, 0.0])
    properties: list = []
    with pytest.raises(pytest.skip.Exception, match="1 pair\\(s\\) involve an expected deviation; 0 pairs checked"):
        run_item(ItemSpec("case", "pairwise", "case.yaml"), {"case": case_run}, properties)
    assert properties[0][1]["pairs"][0]["enforced"] is False  # the pair is still shown in the report


def test_a_checked_pair_still_passes(case_run):
    plant(case_run, "keras", [2.0, 0.0])
    plant(case_run, "torch", [2.0, 0.0])
    outcome = case_run.check_pairwise({})
    assert outcome.passed and not outcome.skipped and outcome.message.startswith("1 pair(s) within")


def test_results_under_one_expect_entry_share_the_deviation_and_must_agree(case_run):
    plant(case_run, "keras", [2.0, 0.0])
    plant(case_run, "torch", [2.5, 0.0])
    same_entry = {("keras", "cpu"): 0, ("torch", "cpu"): 0}
    outcome = case_run.check_pairwise(same_entry)
    assert not outcome.passed and not outcome.skipped and "(keras, cpu), but should be 2.5" in outcome.message
    other_entries = {("keras", "cpu"): 0, ("torch", "cpu"): 1}
    assert case_run.check_pairwise(other_entries).skipped
