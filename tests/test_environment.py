"""Each test process's share of the cores (environment.share_cores)."""

from __future__ import annotations

import os

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
