"""pytest hooks only: options, collection of cases, xdist scheduling, the report writer.

The plugin is registered with pytest through the `pytest11` entry point (pyproject.toml), so
the installed suite runs from any folder (`pytest --pyargs conformance --cases my_cases/`).
Being installed, it is loaded by every pytest run in that environment: it stays dormant (its
options exist, nothing else happens: no report, no scheduler, no fast exit) unless the run
collects the conformance package itself.

Configuration flows one way: options are read and validated in `pytest_configure` and kept
in `config.stash`; items read them from there. Results reach the report as plain data on
`report.user_properties`, which xdist carries from workers to the controller, where one
`ReportCollector` renders them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conformance import backends, environment, expectations, fuzz, timing
from conformance.items import Plan, case_of, plan, result_of
from conformance.report.collector import DEVICES, NOT_RERUN, OPTIONS
from conformance.schema import DEVICE_PATTERN

PLAN = pytest.StashKey[Plan]()
ACTIVE = pytest.StashKey[bool]()
PACKAGE = Path(__file__).resolve().parent
_PARAM = re.compile(r"\[(.*)\]$")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("conformance", "TensorFlow / PyTorch training conformance")
    group.addoption("--cases", action="append", default=[], metavar="PATH",
                    help="case file or folder of case files (repeatable); default: cases/ under the rootdir")
    group.addoption("--backend", action="append", default=[], metavar="NAME",
                    help=f"run only this backend (repeatable): {', '.join(backends.MODULES)}")
    group.addoption("--device", action="append", default=[], metavar="NAME",
                    help="run only on this device (repeatable): cpu, cuda:N, mps")
    group.addoption("--determinism", action="store_true", default=False,
                    help="train every result twice on the same device and fail unless the two are bit-identical "
                         "(turns on torch.use_deterministic_algorithms and TF op determinism)")
    group.addoption("--parity", choices=["auto"], default=None,
                    help="auto: derive every case's parity tolerance from the case (as `tolerance.parity: auto` "
                         "does); the report shows the derived band beside the case's own")
    group.addoption("--fuzz", type=int, default=0, metavar="N",
                    help="add N generated cases (fuzz-<seed>-<k>, parity: auto) to the run; a failing one is shrunk "
                         "to a smaller case that fails the same way, written under reports/<label>/fuzz/")
    group.addoption("--fuzz-seed", type=int, default=0, metavar="S",
                    help="seed of the generated cases (default 0): the same seed gives the same cases everywhere")
    group.addoption("--expectations", action="append", default=[], metavar="FILE",
                    help="known deviations applied to every case (YAML), on top of the file shipped with the "
                         "harness (conformance/expectations.yaml); repeatable; 'none' drops the files before it, "
                         "the shipped one included")
    group.addoption("--data-parallel", action="store_true", default=False,
                    help=f"add the data-parallel cases (cases/{COSTLY_CASES}/) to a run without --cases: each "
                         "replica count starts its own process group or worker per backend, about 25%% of the "
                         "default run's time on 2 cores")
    group.addoption("--compile-cache", default=".conformance_cache", metavar="DIR",
                    help="the frameworks' persistent caches of compiled programs (JAX's, Inductor's) under "
                         "DIR, relative to where pytest starts, so that a rerun loads what the last run "
                         "compiled; 'none': leave the frameworks' own settings (default: %(default)s)")
    group.addoption("--report-label", default=None, metavar="LABEL",
                    help="report folder name under the reports folder; default: $TOX_ENV_NAME or 'local'")
    group.addoption("--reports-dir", default=None, metavar="DIR",
                    help="where reports go; default: reports/ in the folder pytest is started in")


COSTLY_CASES = "data-parallel"  # left out of a run without --cases unless --data-parallel


def default_locations(root: Path, data_parallel: bool) -> list[Path]:
    """The shipped cases a run without --cases takes: every folder of `root`, the data-parallel
    one only with --data-parallel (an explicit --cases takes what it names)."""
    if data_parallel or not (root / COSTLY_CASES).is_dir():
        return [root]
    return sorted(path for path in root.iterdir() if path.name != COSTLY_CASES and not path.name.startswith("."))


def runs_conformance(config: pytest.Config) -> bool:
    """Whether this run collects the conformance package: an argument is the package, a file or
    folder inside it, or a folder that holds it (`pytest` in the repository), or `--pyargs
    conformance`."""
    here = config.invocation_params.dir
    for argument in config.args or [str(here)]:
        name = argument.split("::")[0]
        if config.option.pyargs and not (here / name).exists():
            spec = importlib.util.find_spec(name.split(".")[0]) if re.fullmatch(r"[\w.]+", name) else None
            location = Path(spec.origin).resolve().parent if spec and spec.origin else None
        else:
            location = (here / name).resolve()
        if location is not None and (location.is_relative_to(PACKAGE) or PACKAGE.is_relative_to(location)):
            return True
    return False


def active(config: pytest.Config) -> bool:
    return config.stash.get(ACTIVE, False)


FRAMEWORK_MODULES = ("torch", "tensorflow", "keras", "jax", "jaxlib", "optax")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[ACTIVE] = runs_conformance(config)
    if not active(config):
        return
    workers = getattr(config.option, "numprocesses", None)
    if not hasattr(config, "workerinput") and isinstance(workers, int):
        environment.share_cores(workers)
    cache = config.getoption("compile_cache")
    if cache != "none" and not hasattr(config, "workerinput"):  # workers inherit the controller's
        environment.use_compile_caches(config.invocation_params.dir / cache)
    outside = []
    for point in importlib.metadata.entry_points(group=backends.ENTRY_POINT_GROUP):  # installed packages' own
        try:
            backends.register(point.name)
        except ValueError as error:
            outside.append(f"(entry point {point.name}) {error}")
    for index, reference in enumerate(config.getoption("backend")):
        if reference not in backends.MODULES:
            try:  # a backend from outside the project: registered under its NAME
                config.option.backend[index] = backends.register(reference)
            except ValueError as error:
                outside.append(str(error))
    if outside:
        raise pytest.UsageError("--backend " + "; ".join(outside))
    unknown = [name for name in config.getoption("backend") if name not in backends.MODULES]
    if unknown:
        raise pytest.UsageError(f"--backend {', '.join(unknown)}: unknown; expected one of: "
                                f"{', '.join(backends.MODULES)}")
    bad_devices = [name for name in config.getoption("device") if not re.match(DEVICE_PATTERN, name)]
    if bad_devices:
        raise pytest.UsageError(f"--device {', '.join(bad_devices)}: expected cpu, cuda:N or mps")
    for framework in FRAMEWORK_MODULES:  # their own deprecations: nothing a user of the suite can act on
        config.addinivalue_line("filterwarnings", f"ignore::DeprecationWarning:{framework}.*")
    timing.restart()
    label = config.getoption("report_label") or os.environ.get("TOX_ENV_NAME") or "local"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", label) or label in (".", ".."):
        raise pytest.UsageError(f"--report-label {label!r}: expected letters, digits, '_', '.' or '-'")
    here = config.invocation_params.dir  # the folder pytest was started in
    reports = Path(config.getoption("reports_dir") or here / "reports")
    default_cases = here / "cases" if (here / "cases").is_dir() else config.rootpath / "cases"
    cases = [Path(path) for path in config.getoption("cases")] or default_locations(
        default_cases, config.getoption("data_parallel"))
    config.stash[OPTIONS] = {"cases": cases, "backends": config.getoption("backend"),
                             "devices": config.getoption("device"), "label": label, "reports": reports,
                             "determinism": config.getoption("determinism"),
                             "parity_auto": config.getoption("parity") == "auto",
                             "expectations": _expectations_files(config.getoption("expectations"), here),
                             "fuzz": (config.getoption("fuzz"), config.getoption("fuzz_seed"))}
    if config.getoption("fuzz") < 0:
        raise pytest.UsageError(f"--fuzz {config.getoption('fuzz')}: expected a number of cases >= 0")
    if config.getoption("determinism"):
        from conformance.backends import _frameworks

        _frameworks.request_determinism()
    # Only a run that runs items writes a report: `--collect-only` must not replace the last one.
    if not hasattr(config, "workerinput") and not config.option.collectonly:
        from conformance.report.collector import ReportCollector

        config.pluginmanager.register(ReportCollector(config, reports / label, time.time()), "conformance-report")


SHIPPED_EXPECTATIONS = Path(__file__).resolve().parent / "expectations.yaml"


def _expectations_files(options: list[str], here: Path) -> list[Path]:
    """The expectations files of this run, in the order they are looked at: the shipped file,
    then each --expectations FILE (relative to where pytest started); 'none' drops the files
    before it."""
    files = [SHIPPED_EXPECTATIONS]
    for option in options:
        if option == "none":
            files = []
            continue
        path = here / option
        if not path.is_file():
            raise pytest.UsageError(f"--expectations {option}: no such file ({path})")
        files.append(path)
    return files


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "conformance_item" not in metafunc.fixturenames or not active(metafunc.config):
        return
    config = metafunc.config
    if PLAN not in config.stash:
        options = config.stash[OPTIONS]
        try:
            with timing.phase("planning"):
                count, seed = options["fuzz"]
                fuzz_folder = options["reports"] / options["label"] / "fuzz"
                generated = fuzz.write_cases(fuzz_folder / "generated", seed, count) if count else []
                config.stash[PLAN] = plan(options["cases"] + generated, options["backends"], options["devices"],
                                          repeat=options["determinism"], parity_auto=options["parity_auto"],
                                          known=expectations.load_all(options["expectations"]))
        except Exception as error:  # a missing --cases path and the like: one clear sentence
            raise pytest.UsageError(str(error)) from None
        config.stash[DEVICES] = config.stash[PLAN].devices
    items = config.stash[PLAN].items
    metafunc.parametrize("conformance_item", items, ids=[item.id for item in items])


def pytest_sessionfinish(session: pytest.Session) -> None:
    """On an xdist worker: hand the devices it looked for, and where its time went, to the
    controller's report."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is None or not active(session.config):
        return
    if DEVICES in session.config.stash:
        workeroutput["conformance_devices"] = session.config.stash[DEVICES]
    workeroutput["conformance_time"] = timing.summary()


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """On an xdist worker that loaded TensorFlow or PyTorch: leave now, without tearing them down.

    Releasing the frameworks' objects and modules at the end of a worker takes 2-3 s, during
    which the controller waits for it (measured: 2.4 s of a 35 s run, after the worker's last
    message). By the last unconfigure hook the worker has sent its results and "finished" to the
    controller, which treats the closed connection as a normal end; so the worker flushes its
    output and exits at once. CONFORMANCE_FAST_EXIT=0 turns this off.
    """
    if not active(config) or not hasattr(config, "workerinput") or os.environ.get("CONFORMANCE_FAST_EXIT", "1") == "0":
        return
    if "tensorflow" in sys.modules or "torch" in sys.modules:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                stream.flush()
            except (AttributeError, OSError, ValueError):
                pass
        os._exit(0)


@pytest.fixture
def case_runs(request: pytest.FixtureRequest) -> dict:
    return request.config.stash[PLAN].runs


def _result_of_node(nodeid: str) -> tuple[str, str, str] | None:
    match = _PARAM.search(nodeid)
    return result_of(match.group(1)) if match and "test_parity.py" in nodeid else None


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under `-n`, keep every item of a case on one worker, so each result is trained once and
    the pairwise check finds its results in-process (default `--dist load` only)."""
    if config.getoption("dist", "load") != "load" or not active(config):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class CaseScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            match = _PARAM.search(nodeid)
            return case_of(match.group(1)) if match and "test_parity.py" in nodeid else nodeid

        def remove_node(self, node: Any) -> str | None:
            """A worker died: hand out what it had not run yet, except the item it died in.

            xdist's scope scheduler puts the dead worker's whole work units back, the item
            it crashed in and the finished ones included: the crashed item then runs (and
            crashes) again, and a unit with nothing left to run is handed to a worker that
            never reports back, so the run waits forever (seen with five cases, one aborting).
            """
            workload = self.assigned_work.pop(node)
            pending = {scope: [nodeid for nodeid, done in unit.items() if not done] for scope, unit in workload.items()}
            running = next((nodeids[0] for nodeids in pending.values() if nodeids), None)
            if running is None:
                return None
            # The other checks of the result whose training killed the worker would kill the
            # next one too: they are not run again, and the report marks them crashed.
            crashed = _result_of_node(running)
            for scope, nodeids in pending.items():
                siblings = [nodeid for nodeid in nodeids if nodeid != running and crashed is not None
                            and _result_of_node(nodeid) == crashed]
                for nodeid in siblings:
                    NOT_RERUN[nodeid] = running
                left = {nodeid: False for nodeid in nodeids if nodeid != running and nodeid not in siblings}
                if left:
                    self.workqueue[scope] = left
            for other in self.assigned_work:
                self._reschedule(other)
            return running

    return CaseScheduling(config, log)
