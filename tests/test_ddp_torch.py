"""torch's data-parallel training (conformance/backends/_torch_ddp.py): DistributedDataParallel
in a long-lived group of one process per replica. A case trains and its ranks end bit for bit
equal; a rank killed mid-case, or one that hangs while the other waits in a collective, makes
that case crash within its time limit, the group is killed, and the next case trains on a fresh
group; end to end, a killed rank gives one crashed item and the run goes on."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time

import numpy as np
import pytest

from conformance import reference, workers
from conformance.backends import _torch_ddp
from conformance.backends import torch as torch_backend
from conformance.case import CaseFile, load
from conformance.prepare import prepare
from tests.conftest import ROOT

if not pytest.importorskip("torch").distributed.is_available():
    pytest.skip("this torch has no torch.distributed", allow_module_level=True)

CASE = """\
dataset: {inline: {x: [-1, 0, 1, 2, 3, 4, 5, 6], y: [-3, -1, 1, 3, 5, 7, 9, 11]}}
training: {epochs: 30, batch_size: 4, replicas: 2, optimizer: {sgd: {learning_rate: 0.01}}}
tolerance: {lstsq: null, trajectory: null}
"""
UNEVEN_CASE = CASE.replace(", 6]", "]").replace(", 11]", "]")  # a last batch of 3: shards of 2 and 1
LONG_CASE = CASE.replace("epochs: 30", "epochs: 20000")  # 40,000 steps, tens of seconds: stopped long before
LIMIT_SECONDS = 30  # a killed or hung rank must crash its case well within this


@pytest.fixture
def groups(monkeypatch):
    """A fresh set of process groups for this test alone, killed at its end."""
    fresh = _torch_ddp.Groups()
    monkeypatch.setattr(_torch_ddp, "GROUPS", fresh)
    yield fresh
    for group in list(fresh._groups.values()):
        group.kill()
        group.close()


def problem_of(write_case, name, text):
    path = write_case(name, text)
    return prepare(load(CaseFile(path, path.parent))).problem


def test_two_replicas_train_their_shards_in_one_group_and_end_equal(groups, write_case):
    """Even shards (2 + 2) give the one-replica result; the short last batch of 3 (2 + 1) is
    weighted per rank, as DDP averages the ranks' gradients."""
    even = torch_backend.train(problem_of(write_case, "even", CASE), "cpu")
    assert np.allclose(even.params, reference.replay(problem_of(write_case, "even", CASE)).params, rtol=1e-5)
    problem = problem_of(write_case, "uneven", UNEVEN_CASE)
    trained = torch_backend.train(problem, "cpu")
    info = trained.info["replicas"]
    assert info["replicas"] == 2 and info["ranks"] == [0, 1] and info["parameters_equal_across_replicas"]
    assert len(set(info["processes"])) == 2 and os.getpid() not in info["processes"]
    assert even.info["replicas"]["processes"] == info["processes"]  # one group served both
    single = torch_backend.train(dataclasses.replace(problem, replicas=1), "cpu")
    # DDP averages the ranks' means: the last batch's sample alone on rank 1 weighs 1/2, not 1/3
    assert 1e-4 < np.max(np.abs(trained.params - single.params)) < 0.1
    assert np.allclose(single.final, reference.replay(problem).final, rtol=1e-5)


def rank_pids(groups, replicas=2):
    return groups._groups[(replicas, "gloo")].pids


def test_a_rank_killed_mid_case_crashes_it_in_time_and_the_next_case_trains(groups, write_case):
    short, long = problem_of(write_case, "short", CASE), problem_of(write_case, "long", LONG_CASE)
    torch_backend.train(short, "cpu")
    old = rank_pids(groups)
    threading.Timer(1.0, os.kill, (old[1], signal.SIGKILL)).start()
    started = time.monotonic()
    with pytest.raises(workers.WorkerDied) as died:
        torch_backend.train(long, "cpu")
    assert time.monotonic() - started < LIMIT_SECONDS
    message = str(died.value)
    assert "rank 1 of 2 died" in message and "killed by signal 9 (SIGKILL)" in message
    assert "the next case starts a fresh group" in message
    assert all(_gone(pid) for pid in old)  # rank 0 was killed with it
    trained = torch_backend.train(short, "cpu")
    assert trained.info["replicas"]["parameters_equal_across_replicas"]
    assert not set(trained.info["replicas"]["processes"]) & set(old)


def hang_rank_one() -> None:
    """Worker extra setup (CONFORMANCE_WORKER_SETUP): rank 1 stops at its 20th step, before its
    optimizer step, as a rank stuck outside a collective would; rank 0 waits in the next one."""
    clip = torch_backend.clip_gradients
    steps = {"count": 0}

    def clip_gradients(*args):
        distributed = __import__("torch").distributed
        steps["count"] += 1
        if distributed.get_rank() == 1 and steps["count"] == 20:
            time.sleep(3600)
        return clip(*args)

    torch_backend.clip_gradients = clip_gradients


def test_a_hung_rank_crashes_the_case_in_time_and_the_next_case_trains(groups, write_case, monkeypatch):
    monkeypatch.setenv(workers.EXTRA_SETUP, f"{__name__}:hang_rank_one")
    monkeypatch.setenv(_torch_ddp.TIMEOUT_VARIABLE, "3")
    long = problem_of(write_case, "long", LONG_CASE)
    started = time.monotonic()
    with pytest.raises(workers.WorkerDied) as died:
        torch_backend.train(long, "cpu")
    assert time.monotonic() - started < LIMIT_SECONDS
    message = str(died.value)
    assert "rank 0 of 2 raised" in message and "rank(s) [1] had not answered" in message
    monkeypatch.delenv(workers.EXTRA_SETUP)
    trained = torch_backend.train(problem_of(write_case, "short", CASE), "cpu")  # a fresh group, not hung
    assert trained.info["replicas"]["parameters_equal_across_replicas"]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


KILL_PLUGIN = '''
import os
import signal
import threading

from conformance import workers

_send = workers.Worker.send


def send(self, function, *args):
    """Kill rank 1 (SIGKILL) a second into training case 'killed'."""
    if function.endswith(":train_rank") and args[1]["name"] == "killed" and self.kind.name.endswith("rank1"):
        threading.Timer(1.0, os.kill, (self.pid, signal.SIGKILL)).start()
    return _send(self, function, *args)


workers.Worker.send = send
'''


def test_a_rank_killed_mid_case_gives_one_crashed_item_and_the_run_goes_on(pytester, tmp_path, monkeypatch):
    cases = tmp_path / "cases"
    cases.mkdir()
    for name, text in (("before", CASE), ("killed", LONG_CASE), ("next", CASE)):
        (cases / f"{name}.yaml").write_text(text)
    pytester.makepyfile(kill_rank=KILL_PLUGIN)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(pytester.path), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    reports = tmp_path / "reports"
    result = pytester.runpytest_subprocess(
        str(ROOT / "conformance"), "--rootdir", str(ROOT), "--cases", str(cases), "--backend", "torch",
        "--reports-dir", str(reports), "--report-label", "run", "-p", "kill_rank", "-p", "no:cacheprovider",
        "-p", "no:randomly", timeout=300)
    data = json.loads((reports / "run" / "results.json").read_text())
    items = {item["id"]: item for item in data["items"]}
    assert {name: item["status"] for name, item in items.items()} == {
        "before-torch-cpu-parity": "passed", "killed-torch-cpu-parity": "crashed",
        "next-torch-cpu-parity": "passed"}, result.stdout.str()[-3000:]
    crashed = items["killed-torch-cpu-parity"]
    assert "torch on cpu lost its worker process while training [case killed]" in crashed["failure"]
    assert "rank 1 of 2 died" in crashed["failure"] and "killed by signal 9 (SIGKILL)" in crashed["failure"]
    assert crashed["duration"] < LIMIT_SECONDS
    for name in ("before", "next"):
        assert items[f"{name}-torch-cpu-parity"]["replicas"]["parameters_equal_across_replicas"]
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_accumulation_under_ddp_trains_the_one_process_result(groups, write_case):
    """Even shards, two batches a step (the group's first backward under no_sync): the
    one-process loop's numbers, as an all-reduce of the summed gradients equals the sum of
    all-reduced ones; and not those of a step every batch."""
    text = CASE.replace("replicas: 2,", "replicas: 2, accumulate: 2,")
    problem = problem_of(write_case, "accumulate", text)
    trained = torch_backend.train(problem, "cpu")
    single = torch_backend.train(dataclasses.replace(problem, replicas=1), "cpu")
    assert trained.info["replicas"]["parameters_equal_across_replicas"]
    np.testing.assert_allclose(trained.params, single.params, rtol=1e-6, atol=1e-7)
    one_step = dataclasses.replace(problem, accumulate=1)
    assert not np.allclose(torch_backend.train(one_step, "cpu").params, trained.params, rtol=1e-4)
