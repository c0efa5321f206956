"""Backends from outside the project (v1.3): --backend path/to/file.py or package.module, the
documented interface, declared switches, and clear errors for a module that is not a backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conformance import backends, formulas
from tests.conftest import ROOT

EXAMPLE = ROOT / "examples" / "my_training_loop.py"


@pytest.fixture(autouse=True)
def registry(monkeypatch):
    """Registrations stay in the test: the other tests see the shipped backends only."""
    monkeypatch.setattr(backends, "MODULES", dict(backends.MODULES))
    yield
    formulas.declared_outside.cache_clear()


def test_a_file_registers_under_its_name_with_its_declared_switches():
    name = backends.register(str(EXAMPLE))
    assert name == "my_loop" and backends.load(name).NAME == "my_loop"
    declared = formulas.declared_outside(name)
    assert [switch.name for switch in declared] == ["clip_norm_plus_epsilon"]
    assert declared[0].backends == ["my_loop"]


def test_what_is_not_a_backend_is_refused_naming_what_is_missing(tmp_path):
    partial = tmp_path / "partial.py"
    partial.write_text("NAME = 'partial'\ndef train(problem, device):\n    pass\n")
    with pytest.raises(ValueError, match="it lacks LOOKED_FOR, available, devices, device_name"):
        backends.register(str(partial))
    with pytest.raises(ValueError, match="no such file"):
        backends.register(str(tmp_path / "missing.py"))
    with pytest.raises(ValueError, match="not a shipped backend"):
        backends.register("no_such_package.backend")
    taken = tmp_path / "taken.py"
    taken.write_text("NAME = 'torch'\nLOOKED_FOR = ()\n" + "".join(
        f"def {name}(*a):\n    pass\n" for name in ("available", "devices", "device_name", "train")))
    with pytest.raises(ValueError, match="NAME 'torch' is taken"):
        backends.register(str(taken))


@pytest.mark.skipif(backends.load("torch").available() is not None, reason="the example trains with torch")
@pytest.mark.slow  # a pytest run of its own
def test_the_example_loop_is_checked_like_a_shipped_backend(tmp_path):
    """The example (a user's plain PyTorch loop) passes parity and trajectory on a user's case,
    beside torch, and is compared pairwise with it."""
    command = [sys.executable, "-m", "pytest", str(ROOT / "conformance"), "-p", "no:cacheprovider", "-q",
               "--rootdir", str(ROOT), "--cases", str(ROOT / "cases/users/sgd-global-norm-clip.yaml"),
               "--backend", str(EXAMPLE), "--backend", "torch", "--reports-dir", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(next(tmp_path.rglob("results.json")).read_text())
    statuses = {item["id"]: item["status"] for item in results["items"]}
    assert statuses["sgd-global-norm-clip-my_loop-cpu-parity"] == "passed"
    assert statuses["sgd-global-norm-clip-my_loop-cpu-trajectory"] == "passed"
    assert statuses["sgd-global-norm-clip-pairwise"] == "passed"
    record = next(item for item in results["items"] if item["id"] == "sgd-global-norm-clip-my_loop-cpu-parity")
    assert [switch["name"] for switch in record["switches"]] == ["clip_norm_plus_epsilon"]
