"""Each test process's share of the cores (environment.share_cores) and the frameworks'
persistent compilation caches (environment.use_compile_caches)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conformance import environment


@pytest.fixture
def cores(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "0")  # recorded, so that what the test sets is undone
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)


@pytest.mark.parametrize(("workers", "threads"), [(2, "4"), (3, "2"), (8, "1"), (16, "1")])
def test_each_worker_gets_its_share_of_the_cores(cores, workers, threads):
    environment.share_cores(workers)
    assert os.environ["OMP_NUM_THREADS"] == threads


def test_one_process_keeps_every_core_and_a_users_setting_stands(cores, monkeypatch):
    environment.share_cores(1)
    assert "OMP_NUM_THREADS" not in os.environ
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    environment.share_cores(4)
    assert os.environ["OMP_NUM_THREADS"] == "3"


CACHE_VARIABLES = (*environment.COMPILE_CACHE_VARIABLES, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")


@pytest.fixture
def no_caches(monkeypatch):
    for name in CACHE_VARIABLES:
        monkeypatch.setenv(name, "0")  # recorded, so that what the test sets is undone
        monkeypatch.delenv(name)


def test_the_caches_go_under_the_folder_and_a_users_setting_stands(no_caches, monkeypatch, tmp_path):
    assert environment.use_compile_caches(None) == {}
    applied = environment.use_compile_caches(tmp_path)
    assert applied == {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax"),
                       "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
                       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    for name in CACHE_VARIABLES:
        monkeypatch.delenv(name)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/mine")
    assert environment.use_compile_caches(tmp_path) == {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == "/mine"


TRAIN_JAX = """
import sys
from pathlib import Path
from conformance.case import CaseFile, load
from conformance.prepare import prepare
from conformance import backends
path = Path(sys.argv[1])
problem = prepare(load(CaseFile(path, path.parent))).problem
trajectory = backends.load("jax").train(problem, "cpu")
sys.stdout.write(trajectory.params.tobytes().hex() + " " + trajectory.loss.tobytes().hex())
"""


@pytest.mark.slow  # fresh interpreters
def test_a_rerun_loads_jaxs_compiled_programs_and_trains_the_same_bits(tmp_path):
    """Three fresh processes train one case (Adam, shuffled, two hidden layers):
    without a cache, filling one, loading from it. The cache holds programs after the second and
    gains none in the third (it loaded them), and all three give the same bits."""
    pytest.importorskip("jax")
    root = Path(__file__).resolve().parents[1]
    case = root / "cases" / "hidden" / "noisy-sine-curve.yaml"

    def train(cache: Path | None) -> str:
        env = {k: v for k, v in os.environ.items() if k not in CACHE_VARIABLES}
        env["PYTHONPATH"] = str(root)
        if cache is not None:
            env |= {"JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
        done = subprocess.run([sys.executable, "-c", TRAIN_JAX, str(case)], env=env, capture_output=True,
                              text=True, check=True, timeout=300)
        return done.stdout

    uncached = train(None)
    cache = tmp_path / "jax"
    filled = train(cache)
    programs = sorted(path.name for path in cache.iterdir())
    assert programs
    loaded = train(cache)
    assert sorted(path.name for path in cache.iterdir()) == programs
    assert uncached == filled == loaded
