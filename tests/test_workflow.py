"""The GitHub Actions workflow (many machines, one comparison) fits the project: every env it
runs exists in tox.ini, every job that uploads a report is merged, and the merge reads them all.
Its schema is checked by the lint env (check-jsonschema, vendor.github-workflows)."""

from __future__ import annotations

import configparser

import yaml

from tests.conftest import ROOT

WORKFLOW = yaml.safe_load((ROOT / ".github" / "workflows" / "conformance.yml").read_text())
JOBS = WORKFLOW["jobs"]


def uploads(job: dict) -> list[str]:
    return [step["with"]["name"] for step in job["steps"] if str(step.get("uses", "")).startswith(
        "actions/upload-artifact")]


def test_every_matrix_env_is_a_tox_env():
    tox = configparser.ConfigParser()
    tox.read(ROOT / "tox.ini")
    for env in JOBS["matrix"]["strategy"]["matrix"]["env"]:
        assert f"testenv:{env}" in tox.sections(), env


def test_every_report_is_merged_and_the_gpu_job_asks_for_a_gpu_runner():
    reporting = [name for name, job in JOBS.items() if any(a.startswith("report-") for a in uploads(job))
                 and name != "merge"]
    assert set(reporting) == {"matrix", "gpu"} and set(JOBS["merge"]["needs"]) == set(reporting)
    assert JOBS["merge"]["if"] == "always()"  # a failing machine's report is still compared
    assert "gpu" in JOBS["gpu"]["runs-on"]
    commands = " ".join(step.get("run", "") for step in JOBS["merge"]["steps"])
    assert "conformance.report merge --all reports -o reports/compare" in commands
    gpu_commands = " ".join(step.get("run", "") for step in JOBS["gpu"]["steps"])
    assert "--report-label gpu" in gpu_commands and "python -m conformance doctor" in gpu_commands


def test_every_tox_env_that_installs_with_pip_gets_pip_under_tox_uv():
    """tox-uv makes environments without pip: the envs install the frameworks with
    `python -m pip` (torch's CPU build first), so pip must be seeded (`uv_seed`) in every one of
    them. CI runs tf215 under tox-uv; this keeps the other envs from drifting."""
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(ROOT / "tox.ini")
    assert tox["testenv"]["uv_seed"] == "true"
    for section in tox.sections():
        settings = tox[section]
        pre = settings.get("commands_pre", tox["testenv"]["commands_pre"] if section.startswith("testenv:") else "")
        installs = [line.split("pip install", 1)[1].split() for line in pre.splitlines() if "pip install" in line]
        if installs:
            assert settings.get("uv_seed", tox["testenv"]["uv_seed"]) == "true", section
            packages = [word.strip('"') for word in installs[0] if not word.startswith("-")]
            assert packages[0].startswith("torch"), f"{section}: torch's CPU build must be installed first"
