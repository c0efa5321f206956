"""The trajectory check and bounded deviations.

Unit part: results planted in a case's run (the guide allows fakes for such paths; comparing
them is the real code): the replay's own path passes; a path that ends at the same point
through different epochs fails, naming the epoch, the parameter, both values and the band.
Framework part: real torch made wrong on purpose (tests/wrong_torch.py): SGD that ignores
`nesterov` passes the shipped nesterov case's parity and fails its trajectory.
"""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

from conformance import reference, rounding_bands
from conformance.case import CaseFile, load
from conformance.checks import Trained, make_run
from conformance.problem import Trajectory
from conformance.schema import Tol
from tests.conftest import ROOT

CASE = """\
dataset: {inline: {x: [0, 1, 2, 3], y: [1, 3, 5, 7]}}
training: {epochs: 400, optimizer: {sgd: {learning_rate: 0.05}}, dtype: DTYPE}
"""


@pytest.fixture(params=["float32", "float64"])
def case_run(request, write_case):
    path = write_case("path", CASE.replace("DTYPE", request.param))
    return make_run(load(CaseFile(path, path.parent)), [("torch", "cpu")])


def plant(run, params: np.ndarray, loss: np.ndarray) -> None:
    run.results[("torch", "cpu")] = Trained("torch", "cpu", Trajectory(params, loss), 0.0)


def test_the_replays_own_path_passes(case_run):
    replay = case_run.refs.replay
    plant(case_run, replay.params.copy(), replay.loss.copy())
    outcome = case_run.check_trajectory("torch", "cpu")
    assert outcome.passed, outcome.message
    assert outcome.record["first_epoch_outside"] is None and outcome.record["worst_share"] == 0.0


def test_a_detour_that_ends_at_the_same_point_fails_at_its_first_epoch(case_run):
    """Epoch 5's weight moved by 1e-4 relative, every other epoch the replay's own: the parity
    check (the end point) passes, the trajectory fails at epoch 5 and says so."""
    replay = case_run.refs.replay
    params = replay.params.copy()
    params[4, 0] *= 1 + 1e-4
    plant(case_run, params, replay.loss.copy())
    assert case_run.check_parity("torch", "cpu").passed
    outcome = case_run.check_trajectory("torch", "cpu")
    assert not outcome.passed
    assert outcome.message.startswith("first outside its band at epoch 5: weights[0]=")
    assert f"{params[4, 0]:.10g}" in outcome.message and f"{replay.params[4, 0]:.10g}" in outcome.message
    assert "band there rtol" in outcome.message and "1 epoch(s) outside, the last at epoch 5" in outcome.message
    assert outcome.record["first_epoch_outside"] == 5 and outcome.record["worst_share"] > 1


def test_the_loss_is_checked_too(case_run):
    replay = case_run.refs.replay
    loss = replay.loss.copy()
    loss[0] *= 1.01
    plant(case_run, replay.params.copy(), loss)
    outcome = case_run.check_trajectory("torch", "cpu")
    assert not outcome.passed and "epoch 1: loss=" in outcome.message


def test_the_band_never_narrows_and_ends_near_the_parity_band(case_run):
    bands = case_run.refs.trajectory_bands
    assert np.all(np.diff(bands.rtol) >= 0) and np.all(np.diff(bands.atol) >= 0)
    assert bands.comparable == len(bands.rtol)
    dtype = case_run.prepared.problem.dtype
    assert bands.rtol[0] >= 4 * {"float32": 2.0**-24, "float64": 2.0**-53}[dtype]


def test_a_bound_measures_the_deviation_and_names_the_worst_value(case_run):
    replay = case_run.refs.replay
    params = replay.params.copy()
    params[:, 1] *= 1 + 1e-3
    plant(case_run, params, replay.loss.copy())
    compared = case_run.check_trajectory("torch", "cpu").compared
    size = compared.size(Tol(rtol=2e-3, atol=0))
    assert size["max_rel_diff"] == pytest.approx(1e-3, rel=1e-6) and size["share_of_bound"] == pytest.approx(0.5, 1e-5)
    assert compared.beyond(Tol(rtol=2e-3, atol=0)) is None
    beyond = compared.beyond(Tol(rtol=5e-4, atol=0))
    assert beyond is not None and ": bias=" in beyond


def test_hand_set_trajectory_tolerance_and_null(write_case):
    path = write_case("own", CASE.replace("DTYPE", "float64") + "tolerance: {trajectory: {rtol: 1.0e-3, atol: 0}}\n")
    run = make_run(load(CaseFile(path, path.parent)), [("torch", "cpu")])
    assert np.all(run.refs.trajectory_bands.rtol == 1e-3)
    off = write_case("off", CASE.replace("DTYPE", "float64") + "tolerance: {trajectory: null}\n")
    assert load(CaseFile(off, off.parent)).spec.tolerance.trajectory is None


def _run_torch(pytester, tmp_path, monkeypatch, cases, mistake: str) -> dict[str, str]:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("WRONG_TORCH", mistake)
    reports = tmp_path / "reports"
    result = pytester.runpytest_subprocess(
        str(ROOT / "conformance"), "--rootdir", str(ROOT), *[arg for case in cases for arg in ("--cases", case)],
        "--backend", "torch", "--reports-dir", str(reports), "--report-label", "run", "-p", "tests.wrong_torch",
        "-p", "no:cacheprovider", timeout=300)
    data = json.loads((reports / "run" / "results.json").read_text())
    return {item["id"]: item["status"] for item in data["items"]} | {"stdout": result.stdout.str()[-2000:]}


def test_sgd_ignoring_nesterov_passes_parity_and_fails_the_trajectory(pytester, tmp_path, monkeypatch):
    """The mutant of issue 25: shipped nesterov.yaml runs to convergence, so its end point
    cannot tell; its path can."""
    if importlib.util.find_spec("torch") is None:  # not imported here: the run is a subprocess
        pytest.skip("torch is not installed")
    statuses = _run_torch(pytester, tmp_path, monkeypatch, [str(ROOT / "cases/features/nesterov.yaml")], "nonesterov")
    assert statuses["nesterov-torch-cpu-parity"] == "passed", statuses
    assert statuses["nesterov-torch-cpu-trajectory"] == "failed", statuses


SCALED = """\
dataset: {inline: {x: [0, 1, 2, 3], y: [1, 3, 5, 7]}}
training:
  epochs: 20
  optimizer: {sgd: {learning_rate: 0.05}}
  precision: mixed_float16
  loss_scale: {dynamic: {initial: 1024.0, growth_interval: 2}}
"""


@pytest.mark.parametrize("open_decision", [True, False])
def test_a_decision_rounding_can_flip_ends_the_compared_path_there(write_case, open_decision):
    """A loss-scale decision that differs where rounding could flip it (here: a partial sum could
    overflow at epoch 6) is no mismatch, and the path after it, which follows other decisions, is
    not compared: the epochs before it are. Where rounding cannot flip it, it is a mismatch."""
    path = write_case("scaled", SCALED)
    run = make_run(load(CaseFile(path, path.parent)), [("torch", "cpu")])
    replay = run.refs.replay
    assert replay.loss_scale is not None
    replay.overflow_possible = np.zeros(len(replay.params), dtype=bool)
    replay.overflow_possible[5] = open_decision
    params = replay.params.copy()
    params[5:] *= 1.5  # the path after the other decision
    scale = replay.loss_scale.copy()
    scale[5:] /= 2
    plant(run, params, replay.loss.copy())
    run.results[("torch", "cpu")].trajectory.loss_scale = scale
    run.results[("torch", "cpu")].trajectory.skipped = replay.skipped.copy()
    outcome = run.check_trajectory("torch", "cpu")
    if open_decision:
        assert outcome.passed, outcome.message
        assert outcome.record["comparable"] == 5 and outcome.record["loss_scale_first_differs"]["within_rounding"]
        assert "went otherwise at epoch 6" in outcome.message
    else:
        assert not outcome.passed and outcome.decision and "loss scaling first differs at epoch 6" in outcome.message


def test_a_derived_band_is_of_the_largest_magnitude_along_the_path():
    """A parameter that shrank from 0.1 to 1e-4 keeps the absolute error it made on its way down:
    the derived band's relative part is of 0.1 there; a hand-set rule stays |a - b| <= atol + rtol |b|."""
    from conformance import compare

    path = np.array([[0.1, 1.0], [0.05, 1.0], [1e-4, 1.0]])
    peak = compare.path_magnitude(path)
    assert peak[-1].tolist() == [0.1, 1.0]
    band = Tol(rtol=1e-5, atol=0.0)
    got = path[-1] + np.array([5e-7, 0.0])  # 5e-6 of the path, 5e-3 of the final value
    assert compare.worst_mismatch(got, path[-1], band, ["w", "b"]) is not None
    assert compare.worst_mismatch(got, path[-1], band, ["w", "b"], peak[-1]) is None
    assert compare.worst_mismatch(path[-1] + np.array([2e-6, 0.0]), path[-1], band, ["w", "b"], peak[-1]) is not None


def test_an_overflow_past_the_comparable_epochs_is_within_rounding_and_a_growth_is_not():
    """Past the epochs rounding leaves comparable, a skipped step is made from other parameters
    (fuzz-27193-59); a scale grown at another time with the same steps skipped is counting."""
    from conformance import rounding_bands
    from conformance.checks.decisions import decision_within_rounding

    replay = Trajectory(np.zeros((30, 2)), np.zeros(30), None, loss_scale=np.full(30, 8.0),
                        skipped=np.zeros(30, dtype=np.int64))
    spread = rounding_bands.RoundingSpread(np.zeros((30, 2)), np.zeros(30), np.zeros(0), 2.0**-24)

    def apart(epoch, skipped, scale):
        return {"epoch": epoch, "got": {"scale": scale, "skipped": skipped},
                "expected": {"scale": 8.0, "skipped": 0}}

    assert decision_within_rounding(apart(25, 1, 4.0), replay, spread, comparable=17)
    assert not decision_within_rounding(apart(12, 1, 4.0), replay, spread, comparable=17)
    assert not decision_within_rounding(apart(25, 0, 16.0), replay, spread, comparable=17)


CANCELLING_FIRST_STEP = """\
dataset: {inline: {x: [1, 1, 1, 1, 1, 1, 1, 1], y: [0, 0, 0, 0, 0, 0, 0, 0]}}
model: {bias: false, init: {constant: {weights: [0.052733]}}}
training: {epochs: 3, optimizer: {rmsprop: {learning_rate: 0.0184, rho: 0.869}}, dtype: float64}
tolerance: {lstsq: null}
"""


def test_a_first_step_that_cancels_is_judged_by_the_weight_it_started_from(write_case, monkeypatch):
    """RMSprop's first step is lr g / sqrt((1 - rho) g^2), 0.0508 here, taken from 0.0527: the
    weight lands at 0.0019 with the increment's rounding (u x 0.0508) in it, 27 x its own unit.
    The same step one unit of its last place longer (what another order of the same formula
    gives: fuzz-73517-127, optax on a gradient summed over 86 rows) is inside the band; a step
    1e-12 longer is not."""
    path = write_case("cancel", CANCELLING_FIRST_STEP)
    run = make_run(load(CaseFile(path, path.parent)), [("jax", "cpu")])
    replay = run.refs.replay
    # where the perturbed replays show no spread at epoch 1 (each u-sized perturbation rounded
    # away in float64, as there), the band is its floor of 4 u, of the path's magnitude
    unit = reference.UNIT_ROUNDOFF["float64"]
    no_spread = rounding_bands.RoundingSpread(np.zeros_like(replay.params), np.zeros_like(replay.loss),
                                              np.zeros(0), unit, unit)
    monkeypatch.setattr(run.refs, "rounding_of", lambda switches: no_spread)
    w0 = 0.052733
    step = w0 - replay.params[0, 0]
    one_unit_longer = w0 - np.nextafter(step, np.inf)
    assert one_unit_longer != replay.params[0, 0]
    for epoch_one, passes in [(one_unit_longer, True), (w0 - step * (1 + 1e-12), False)]:
        params = replay.params.copy()
        params[0, 0] = epoch_one
        run.results[("jax", "cpu")] = Trained("jax", "cpu", Trajectory(params, replay.loss.copy()), 0.0)
        outcome = run.check_trajectory("jax", "cpu")
        assert outcome.passed is passes, outcome.message
