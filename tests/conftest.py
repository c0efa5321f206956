"""Shared helpers for the harness's own tests (no framework needed unless a test says so)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

try:
    from hypothesis import settings as _hypothesis_settings
except ImportError:  # the property tests import hypothesis themselves and skip without it
    _hypothesis_settings = None

# Hypothesis profiles, chosen by HYPOTHESIS_PROFILE (hypothesis's pytest plugin, and so its
# --hypothesis-profile option, is off: see pyproject.toml):
# - "dev" (the default): new random draws on every run, to keep exploring;
# - "ci" (.ci/run): derandomized, so that a commit that changed nothing cannot turn CI red by
#   chance, with twice the examples to make up for exploring the same ones every time.
# Both print a failing example's reproduce blob (@reproduce_failure) beside the example itself.
if _hypothesis_settings is not None:
    _hypothesis_settings.register_profile("dev", print_blob=True, deadline=None)
    _hypothesis_settings.register_profile("ci", derandomize=True, max_examples=200, print_blob=True,
                                          deadline=None)
    _hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def examples(count: int) -> int:
    """`count` examples under the default profile's 100, scaled with the loaded profile's
    max_examples (an explicit max_examples on a test would override the profile's)."""
    return max(1, count * _hypothesis_settings.default.max_examples // 100)

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """The tests' workers share the cores as the suite's do (environment.share_cores)."""
    config.addinivalue_line("markers", f"slow: {SLOW}")
    workers = getattr(config.option, "numprocesses", None)
    if not hasattr(config, "workerinput") and isinstance(workers, int):
        from conformance import environment

        environment.share_cores(workers)


SLOW = ("the test starts processes of its own: a whole pytest run of the suite (every test that uses "
        "pytester), process groups, worker processes or fresh interpreters; `make test` leaves these out, "
        "`make test-slow` runs them, CI runs both")
# Fixtures whose tests start processes: a pytest run (pytester), torch process groups (groups), worker
# processes (pool), JAX's and Keras-on-JAX's replicas on the host devices of a worker.
PROCESS_FIXTURES = {"pytester", "groups", "pool", "jax_backend", "keras_jax_backend"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks `slow` every test that runs the suite in a pytest of its own or starts process groups
    or workers through a fixture (the others carry the mark themselves)."""
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def write_case(tmp_path: Path):
    """write_case("name", yaml_text) -> path of a case file in a fresh cases folder."""

    def write(name: str, text: str, folder: Path | None = None) -> Path:
        path = (folder or tmp_path) / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return write
