"""A diverged result: a failure, unless the case format's own float64 replay diverges at the same
epoch (the case does not train: a skip that says so, never a pass). Results are planted in the
case's run (fakes for this path); the replay and the check are the real code."""

from __future__ import annotations

import numpy as np

from conformance.case import CaseFile, load
from conformance.checks import Trained, make_run
from conformance.problem import Trajectory

# SGD at 10x past the stability bound 2 / L: the float64 replay overflows within the 400 epochs
CASE = """\
dataset: {inline: {x: [1, 2, 3], y: [2, 4, 6]}}
training: {epochs: 400, dtype: float64, optimizer: {sgd: {learning_rate: 2.0}}}
tolerance: {parity: {rtol: 1.0e-6, atol: 1.0e-9}, lstsq: null}
"""


def planted(run, nonfinite_from: int) -> None:
    epochs = run.refs.replay.params.shape[0]
    params = np.ones((epochs, 2))
    params[nonfinite_from - 1:] = np.nan
    loss = np.ones(epochs)
    run.results[("torch", "cpu")] = Trained("torch", "cpu", Trajectory(params, loss), 0.0)


def test_divergence_with_the_replay_is_skipped_with_the_reason_and_alone_fails(write_case):
    path = write_case("diverging", CASE)
    run = make_run(load(CaseFile(path, path.parent)), [("torch", "cpu")])
    epoch = run.refs.replay.first_nonfinite_epoch()
    assert epoch is not None and epoch > 2
    planted(run, epoch)
    outcome = run.check_parity("torch", "cpu")
    assert outcome.skipped and not outcome.passed
    assert "replay becomes non-finite at the same epoch" in outcome.message
    planted(run, epoch - 1)  # a step earlier than the format's own training: the framework's doing
    outcome = run.check_parity("torch", "cpu")
    assert not outcome.skipped and not outcome.passed and outcome.message.startswith("training diverged")
