"""Worker processes (conformance.workers): calls and errors across the pipe, a worker killed
mid-call, a fresh worker after a death, and, end to end, a Keras-on-JAX worker killed while it
trains a case in a real conformance run: one crashed item, the rest of the run passes."""

from __future__ import annotations

import json
import os
import signal
import threading

import pytest

from conformance import workers
from tests.conftest import ROOT

ECHO = workers.WorkerKind("echo", {"CONFORMANCE_TEST_VALUE": "42"})


@pytest.fixture
def pool():
    pool = workers.Pool()
    yield pool
    pool.stop_all()


def test_a_worker_runs_calls_in_its_own_process_with_its_environment(pool):
    assert pool.call(ECHO, "os:getenv", "CONFORMANCE_TEST_VALUE") == "42"
    assert pool.call(ECHO, "os:getpid") != os.getpid()
    assert pool.call(ECHO, "builtins:print", "framework chatter on stdout") is None  # goes to its log
    assert pool.call(ECHO, "operator:add", 2, 3) == 5
    assert len(pool.started) == 1  # one worker served every call


def test_an_exception_in_the_worker_comes_back_with_its_type_and_traceback(pool):
    with pytest.raises(workers.WorkerError, match="math domain error") as raised:
        pool.call(ECHO, "math:sqrt", -1.0)
    assert raised.value.kind == "ValueError" and "in the worker process" in str(raised.value)
    assert pool.call(ECHO, "operator:add", 1, 1) == 2  # the worker lives on
    assert len(pool.started) == 1


def test_a_worker_that_exits_gives_its_status_and_the_next_call_gets_a_fresh_one(pool):
    with pytest.raises(workers.WorkerDied, match=r"exited with status 3 during os:_exit"):
        pool.call(ECHO, "os:_exit", 3)
    assert pool.call(ECHO, "operator:add", 1, 1) == 2
    assert len(pool.started) == 2 and pool.started[0][1] != pool.started[1][1]


def test_a_worker_killed_mid_call_says_so_with_its_log(pool):
    worker = pool.worker(ECHO)
    pool.call(ECHO, "builtins:print", "last words")
    threading.Timer(0.5, os.kill, (worker.pid, signal.SIGKILL)).start()
    with pytest.raises(workers.WorkerDied) as died:
        pool.call(ECHO, "time:sleep", 30)
    message = str(died.value)
    assert "killed by signal 9 (SIGKILL) during time:sleep" in message
    assert "last words" in message and "A fresh worker serves the next call" in message
    assert not worker.alive()
    assert pool.call(ECHO, "os:getpid") != worker.pid


def test_stop_all_ends_every_worker(pool):
    worker = pool.worker(ECHO)
    pool.stop_all()
    assert not worker.alive() and worker.process.returncode == 0


def test_keras_on_jax_or_torch_says_why_not_under_keras_2(monkeypatch):
    from conformance.backends import _keras3

    monkeypatch.setattr(_keras3._frameworks, "distribution_version", lambda name: "2.15.0")
    reason = _keras3.available("jax")
    assert "Keras 2.15.0 is installed" in reason and "needs Keras 3" in reason
    monkeypatch.setattr(_keras3._frameworks, "installed", lambda module: module != "torch")
    monkeypatch.setattr(_keras3._frameworks, "distribution_version", lambda name: "3.15.1")
    assert _keras3.available("torch") == "torch is not installed"


KILL_PLUGIN = '''
import os
import signal
import threading

from conformance import workers

_call = workers.Worker.call


def call(self, function, *args):
    """Kill the worker (SIGKILL, a real process exit) half a second into training case 'killed'."""
    if function.endswith(":train_here") and args[0]["name"] == "killed":
        threading.Timer(0.5, os.kill, (self.pid, signal.SIGKILL)).start()
    return _call(self, function, *args)


workers.Worker.call = call
'''
LONG_CASE = """\
dataset: {inline: {x: [-1, 0, 1, 2, 3, 4], y: [-3, -1, 1, 3, 5, 7]}}
training: {epochs: 20000, batch_size: 1, optimizer: {sgd: {learning_rate: 0.001}}}
tolerance: {lstsq: null, trajectory: null}  # one item per result: these tests are about crashes
"""
SHORT_CASE = LONG_CASE.replace("epochs: 20000, batch_size: 1", "epochs: 30")


def test_a_worker_killed_mid_case_gives_one_crashed_item_and_the_run_goes_on(pytester, tmp_path, monkeypatch):
    pytest.importorskip("jax")
    from conformance.backends import keras_jax

    if keras_jax.available():
        pytest.skip(keras_jax.available())
    cases = tmp_path / "cases"
    cases.mkdir()
    for name, text in (("before", SHORT_CASE), ("killed", LONG_CASE), ("next", SHORT_CASE)):
        (cases / f"{name}.yaml").write_text(text)
    pytester.makepyfile(kill_worker=KILL_PLUGIN)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(pytester.path), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    reports = tmp_path / "reports"
    result = pytester.runpytest_subprocess(
        str(ROOT / "conformance"), "--rootdir", str(ROOT), "--cases", str(cases), "--backend", "keras_jax",
        "--reports-dir", str(reports), "--report-label", "run", "-p", "kill_worker", "-p", "no:cacheprovider",
        "-p", "no:randomly", timeout=300)
    data = json.loads((reports / "run" / "results.json").read_text())
    statuses = {item["id"]: item["status"] for item in data["items"]}
    assert statuses == {"before-keras_jax-cpu-parity": "passed", "killed-keras_jax-cpu-parity": "crashed",
                        "next-keras_jax-cpu-parity": "passed"}, result.stdout.str()[-3000:]
    crashed = next(item for item in data["items"] if item["status"] == "crashed")
    assert "keras_jax on cpu lost its worker process while training [case killed]" in crashed["failure"]
    assert "killed by signal 9 (SIGKILL)" in crashed["failure"]
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_the_float64_probe_names_each_op_that_rounds_to_float32():
    """Keras ops as NumPy computes them in float64, then with a mean that works in float32 (what
    Keras 3.15 does on JAX and PyTorch) and a matmul that returns float32 (PyTorch)."""
    import types

    import numpy as np

    from conformance.backends import _keras3

    exact = types.SimpleNamespace(matmul=np.matmul, add=np.add, subtract=np.subtract, square=np.square,
                                  sum=np.sum, mean=np.mean, convert_to_numpy=np.asarray)
    assert _keras3.float64_rounding(types.SimpleNamespace(ops=exact)) == []
    rounding = types.SimpleNamespace(**vars(exact))
    rounding.mean = lambda x: np.float64(np.mean(x, dtype=np.float32))
    rounding.matmul = lambda a, b: np.matmul(a, b).astype(np.float32)
    found = _keras3.float64_rounding(types.SimpleNamespace(ops=rounding))
    assert [entry.split(" of ")[0] for entry in found] == ["keras.ops.matmul", "keras.ops.mean"]
    assert "returned float32" in found[0] and "returned float64 0.5, exactly 0.5000000000004547" in found[1]
