"""From case files to planned test items, and what one item does when it runs.

Item ids read `<case>-<backend>-<device>-<check>` for checks of one result (parity, trajectory,
lstsq; `unavailable` for a backend or device that cannot run here), `<case>-pairwise` and
`<case>-certified` for checks of the whole case, and `<file stem>-load` for a case file that
cannot be run (`<case>-load` when it loads but cannot be planned).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conformance import backends, environment, fuzz
from conformance.case import CaseError, LoadedCase, discover, load, seeds
from conformance.checks import CaseRun, Outcome, TrainingCrashed, make_run
from conformance.expectations import Expectations, applicable

RESULT_CHECKS = ("parity", "trajectory", "lstsq")
CASE_CHECKS = ("pairwise", "certified", "load")


def _id_pattern() -> re.Pattern[str]:
    """An item id's parts; of the backends known now (outside ones register at start-up)."""
    return re.compile(
        r"^(?P<case>.+?)-(?:(?P<backend>{})-(?P<device>[a-z]+(?::\d+)?)-(?:{}|unavailable)|{})$".format(
            "|".join(map(re.escape, backends.MODULES)), "|".join(RESULT_CHECKS), "|".join(CASE_CHECKS)))


@dataclass(frozen=True)
class ItemSpec:
    """One planned item: which case, which check, and for result checks which backend and device."""

    case: str
    check: str
    source: str
    backend: str | None = None
    device: str | None = None
    error: str | None = None
    skip: str | None = None

    @property
    def id(self) -> str:
        if self.backend is None:
            return f"{self.case}-{self.check}"
        return f"{self.case}-{self.backend}-{self.device}-{self.check}"


def result_of(item_id: str) -> tuple[str, str, str] | None:
    """(case, backend, device) of an item that checks one result; None for case checks."""
    match = _id_pattern().match(item_id)
    return (match.group("case"), match.group("backend"), match.group("device")) if match and match.group("backend") \
        else None


def case_of(item_id: str) -> str:
    """The case name inside an item id (used to keep one case's items on one xdist worker)."""
    match = _id_pattern().match(item_id)
    return match.group("case") if match else item_id


@dataclass
class Plan:
    items: list[ItemSpec]
    runs: dict[str, CaseRun]
    devices: dict[str, Any]  # per backend: the device kinds looked for, those found, or why none


def plan(locations: list[Path], only_backends: list[str], only_devices: list[str], repeat: bool = False,
         parity_auto: bool = False, known: Expectations | None = None) -> Plan:
    """Every item of a run, in a stable order; broken case files become `load` items that fail."""
    items: list[ItemSpec] = []
    runs: dict[str, CaseRun] = {}
    loaded: list[LoadedCase] = []
    for source in discover(locations):
        try:
            loaded.append(load(source))
        except CaseError as error:
            items.append(ItemSpec(source.path.stem, "load", source.display, error=str(error)))
    first_file: dict[str, str] = {}
    for case in loaded:
        first_file.setdefault(case.name, case.source.display)
    names = [case.name for case in loaded]
    devices_seen = _discover_devices(only_backends)
    for case in loaded:
        if names.count(case.name) > 1:
            others = sorted(c.source.display for c in loaded if c.name == case.name and c is not case)
            items.append(ItemSpec(case.name, "load", case.source.display,
                                  error=f"{case.source.display}: name: {case.name!r} is also the name of "
                                        f"{', '.join(others)}; expected case names to be unique in a run"))
            continue
        items.extend(_plan_case(case, only_backends, only_devices, devices_seen, runs, repeat, parity_auto, known))
    return Plan(items, runs, devices_seen)


def default_backends(devices_seen: dict[str, Any]) -> list[str]:
    """The backends a case without `backends:` runs on when no --backend is given."""
    return [name for name, seen in devices_seen.items() if seen["selected"]]


def _discover_devices(only_backends: list[str]) -> dict[str, Any]:
    """Per backend: the devices it can use, or why it cannot run at all, and whether a run
    without --backend selects it (the report lists the others as available, not selected)."""
    seen: dict[str, Any] = {}
    for name in backends.MODULES:
        if only_backends and name not in only_backends:
            continue
        module = backends.load(name)
        reason = module.available()
        seen[name] = {"looked_for": list(module.LOOKED_FOR),
                      "selected": bool(only_backends) or backends.selected_by_default(name)}
        if reason:
            seen[name]["unavailable"] = reason
            continue
        found = module.devices()
        seen[name] |= {"devices": found, "names": {device: module.device_name(device) for device in found},
                       "not_found": [kind for kind in module.LOOKED_FOR
                                     if not any(device.split(":")[0] == kind for device in found)]}
    return seen


def _plan_case(case: LoadedCase, only_backends: list[str], only_devices: list[str],
               devices_seen: dict[str, Any], runs: dict[str, CaseRun], repeat: bool,
               parity_auto: bool = False, known: Expectations | None = None) -> list[ItemSpec]:
    spec, source = case.spec, case.source.display
    candidates = spec.backends or [name for name in backends.MODULES if name in only_backends] \
        or default_backends(devices_seen)
    wanted_backends = [b for b in candidates if not only_backends or b in only_backends]
    items, pairs = [], []
    for backend in wanted_backends:
        found = devices_seen[backend]
        wanted_devices = [d for d in (spec.devices or ["cpu"] + [d for d in found.get("devices", []) if d != "cpu"])
                          if not only_devices or d in only_devices]
        for device in wanted_devices:
            if "unavailable" in found:
                items.append(ItemSpec(case.name, "unavailable", source, backend, device, skip=found["unavailable"]))
            elif device not in found["devices"]:
                items.append(ItemSpec(case.name, "unavailable", source, backend, device,
                                      skip=f"{device} is not available to {backend} "
                                           f"(found: {', '.join(found['devices'])})"))
            elif device == "mps" and spec.training.dtype == "float64":
                items.append(ItemSpec(case.name, "unavailable", source, backend, device,
                                      skip="mps has no float64; this case trains in float64"))
            else:
                pairs.append((backend, device))
                items.append(ItemSpec(case.name, "parity", source, backend, device))
                if spec.tolerance.along_path is not None:
                    items.append(ItemSpec(case.name, "trajectory", source, backend, device))
                if spec.tolerance.lstsq is not None:
                    items.append(ItemSpec(case.name, "lstsq", source, backend, device))
    try:
        runs[case.name] = make_run(case, pairs, repeat, parity_auto, known)
    except CaseError as error:
        return [ItemSpec(case.name, "load", source, error=str(error))]
    if len(pairs) > 1:
        items.append(ItemSpec(case.name, "pairwise", source))
    if spec.certified is not None:
        items.append(ItemSpec(case.name, "certified", source))
    return items


def run_item(spec: ItemSpec, runs: dict[str, CaseRun], user_properties: list) -> None:
    """Run one planned item: record plain data for the report, then pass, fail, xfail or skip."""
    record: dict[str, Any] = {"id": spec.id, "case": spec.case, "check": spec.check, "source": spec.source,
                              "backend": spec.backend, "device": spec.device}
    try:
        _run(spec, runs, record)
    finally:
        # xdist carries user_properties to the controller with execnet, which takes only plain
        # types (not numpy scalars, nor torch's TorchVersion str subclass).
        user_properties.append(("conformance", json.loads(json.dumps(record, default=str))))


def _run(spec: ItemSpec, runs: dict[str, CaseRun], record: dict[str, Any]) -> None:
    if spec.error is not None:
        record["message"] = spec.error
        pytest.fail(spec.error, pytrace=False)
    if spec.skip is not None:
        record["message"] = spec.skip
        pytest.skip(f"{spec.source}: {spec.skip}")
    run = runs[spec.case]
    problem = run.prepared.problem
    record.update(description=run.case.spec.description, seeds=seeds(run.case),
                  steps={"batches_per_epoch": problem.steps_per_epoch, "accumulate": problem.accumulate,
                         "optimizer_steps_per_epoch": problem.optimizer_steps_per_epoch})
    versions = environment.versions()
    try:
        outcome = _check(spec, run, versions)
    except backends.Unavailable as reason:
        record["message"] = str(reason)
        who = spec.backend or "one of the case's backends"  # the pairwise item trains every backend
        pytest.skip(f"{spec.source}: {who} cannot run here: {reason}")
    except TrainingCrashed as crash:
        if not crash.process_died:
            raise
        record.update(message=str(crash), crashed=True)  # the report shows it as crashed, not failed
        pytest.fail(str(crash), pytrace=False)
    record.update(outcome.record, message=outcome.message, environment=versions)
    if outcome.skipped:
        pytest.skip(f"{spec.source}: {outcome.message}")
    covering = _covering(spec, run, versions)
    if outcome.explained:  # the backend's own formulas explain where it ends (formulas.yaml)
        record["explained"] = outcome.explained
        pytest.xfail(outcome.explained if covering is None else f"{covering.reason} -- {outcome.explained}")
    if covering is None:
        if not outcome.passed and spec.check in SHRUNK_CHECKS and fuzz.shrunk_folder(run.case.source.path):
            shrunk = fuzz.shrink_failure(run.case.source.path, spec.backend, spec.device, outcome.message, run.known,
                                         spec.check)
            record["shrunk_case"] = str(shrunk.relative_to(shrunk.parents[2]))  # relative to the report folder
            pytest.fail(f"{outcome.message}\nshrunk to {shrunk}: run it alone with --cases {shrunk}", pytrace=False)
        if not outcome.passed:
            pytest.fail(outcome.message, pytrace=False)
        return
    if outcome.passed:
        if covering.strict:
            pytest.fail(f"expected deviation did not happen (strict): {covering.reason}", pytrace=False)
        record["known_deviation_not_seen"] = covering.entry.reason
        return
    entry = covering.entry
    when = getattr(entry, "when", None)  # an expectations-file entry's conditions (a case's own entries have none)
    if outcome.decision and when is not None and when.loss_scale is None:
        upstream = ("the first epoch's decision differs: no deviation came before it" if outcome.compared is None
                    else "the entry has no bound" if entry.bound is None else outcome.compared.beyond(entry.bound))
        if upstream:  # the decision is not downstream of the deviation this entry describes
            pytest.fail(f"{outcome.message}; the known deviation that applies here is not about loss scaling, and "
                        f"the path up to that epoch is beyond it ({upstream}): {covering.reason}", pytrace=False)
    record["expected"] = entry.reason
    if outcome.compared is not None:
        record["deviation"] = outcome.compared.size(entry.bound)
        beyond = outcome.compared.beyond(entry.bound) if entry.bound is not None else None
        if beyond is not None:
            measured = record["deviation"]
            pytest.fail(f"deviation larger than expected: {beyond}; measured max |a - b| "
                        f"{measured['max_abs_diff']:.2e} (relative {measured['max_rel_diff']:.2e}), "
                        f"{measured['share_of_bound']:.3g} x the bound "
                        f"rtol {entry.bound.rtol:.1e}, atol {entry.bound.atol:.1e} of: {covering.reason}",
                        pytrace=False)
    pytest.xfail(f"{covering.reason} -- {outcome.message}")


SHRUNK_CHECKS = ("parity", "trajectory")  # a generated case failing these is shrunk


@dataclass(frozen=True)
class Covering:
    """The known deviation an item is judged under: a case's own `expect` entry (strict: it
    must show), or one that applies without being strict (a `parity` entry over the trajectory
    item of the same result, an entry of the expectations file)."""

    entry: Any
    strict: bool
    reason: str


def _covering(spec: ItemSpec, run: CaseRun, versions: dict[str, str | None]) -> Covering | None:
    """The entry covering this item, if any, in this order: the case's own entry for the check;
    for `trajectory`, the case's `parity` entry (a known difference at the end is one along the
    way too; its bound then holds at every epoch); the expectations file's, likewise. The
    pairwise item has none: its pairs with an expected deviation are shown but not enforced
    (see CaseRun.check_pairwise)."""
    if spec.check == "pairwise":
        return None
    checks = [spec.check] + (["parity"] if spec.check == "trajectory" else [])
    source = run.case.source.display
    for check in checks:
        entry = applicable(run.case.spec.expect, check, spec.backend, spec.device, versions)
        if entry is not None:
            covered = ", ".join(entry.backend_names) or "any backend"
            inherited = " (covers the trajectory)" if check != spec.check else ""
            return Covering(entry, check == spec.check, f"{source}: expect {covered} {check}{inherited}: "
                                                        f"{entry.reason}")
    for check in checks if run.known is not None else []:
        entry = run.known.applicable(run.prepared.problem, check, spec.backend, spec.device, versions)
        if entry is not None:
            covered = ", ".join(entry.backend_names) or "any backend"
            return Covering(entry, False, f"{run.known.source_of(entry)}: known deviation of {covered} {check}: "
                                          f"{entry.reason}")
    return None


def _check(spec: ItemSpec, run: CaseRun, versions: dict[str, str | None]) -> Outcome:
    if spec.check == "parity":
        return run.check_parity(spec.backend, spec.device)
    if spec.check == "trajectory":
        return run.check_trajectory(spec.backend, spec.device)
    if spec.check == "lstsq":
        return run.check_lstsq(spec.backend, spec.device)
    if spec.check == "pairwise":
        return run.check_pairwise(_deviant(run, versions))
    return run.check_certified()


def _deviant(run: CaseRun, versions: dict[str, str | None]) -> dict[tuple[str, str], Any]:
    """Results of the case whose parity is expected to fail, each with a key: the index of its
    `expect` entry, so that two results under one entry (one known deviation) must still agree;
    or, for an entry of the expectations file, a key of its own. File entries are general, and
    a run that a deviation moves far from the replay can also be far more sensitive to rounding
    than the replay (Keras's float64 Adam with a large step: keras and keras_xla 0.24 apart in
    fuzz-0-64), so results whose deviation showed are compared but not enforced. Pairs across
    keys, or with a result that is not expected to deviate, are not enforced either."""
    found: dict[tuple[str, str], Any] = {}
    for backend, device in run.pairs:
        entry = applicable(run.case.spec.expect, "parity", backend, device, versions)
        if entry is not None:
            found[(backend, device)] = ("case", run.case.spec.expect.index(entry))
        elif run.known is not None and run.known.applicable(run.prepared.problem, "parity", backend, device,
                                                            versions) is not None:
            # Not strict: only a result whose deviation showed (its parity failed) is excused,
            # under a key of its own (no pair with it is enforced; see above).
            try:
                outcome = run.check_parity(backend, device)
            except backends.Unavailable:  # no result to excuse: the pairwise check leaves it out
                continue
            if not outcome.passed and not outcome.skipped:
                found[(backend, device)] = ("file", backend, device)
    return found
