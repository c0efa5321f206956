"""Measure the size of every known deviation of some cases and suggest its `bound`.

    python -m conformance.bounds cases/optimizers/adam-float64.yaml [PATH ...] [--margin 3]

For each `expect` entry of each case, trains the backends it covers (on the CPU) and measures
how far their results are from the check's reference side: final parameters and predictions
for `parity`, every epoch's parameters and loss for `trajectory` (a `parity` entry covers its
trajectory item too, so both are measured for it), the fit for `lstsq`. The suggested bound is
the band that holds `margin` times the measured difference everywhere, built as the `auto`
bands are (`rounding_bands.band_from_spread`). A `parity` entry's deviation is usually far larger
along the way than at the end (Keras's float32 momentum in float64 training: 1.2e-8 at the
end, 2.0e-5 mid-training), so it gets a bound of its own and, where the trajectory item
fails, a `check: trajectory` entry of its own with its bound.

Prints the suggestions; `--write` adds them to the case files (a `bound:` line under each
entry without one, the trajectory entries at the end of `expect`, which must be the file's
last key).

    python -m conformance.bounds --results reports/fuzz200/results.json [--results ...] [--write]

The expectations file's entries are general: their sizes come from runs, not from one case. From
the `results.json` of runs (the shipped cases, `--fuzz 200 --fuzz-seed 0`), each entry's largest
deviation over every item it covered (parity and trajectory items alike: a parity entry's bound
holds its trajectory items too) gives `bound: {rtol: margin x largest relative, atol: margin x
largest absolute}`; `--write` puts it under the entry in conformance/expectations.yaml.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from conformance import backends, environment, rounding_bands
from conformance.case import discover, load
from conformance.checks import CaseRun, Compared, make_run
from conformance.expectations import applicable

MARGIN = 3.0  # the stated margin: a bound is three times the largest deviation measured


def measure(run: CaseRun, entry: Any, check: str, versions: dict[str, str | None]) -> list[tuple[str, Any]]:
    """(backend, Outcome) for every item of `check` that `entry` covers in this case here."""
    found = []
    for name in entry.backend_names or list(backends.MODULES):
        device = entry.device or "cpu"
        if (run.case.spec.backends and name not in run.case.spec.backends) or backends.load(name).available():
            continue
        if applicable(run.case.spec.expect, entry.check, name, device, versions) is not entry:
            continue
        if check == "trajectory" and run.case.spec.tolerance.along_path is None:
            continue
        outcome = run.check_certified() if check == "certified" else getattr(run, f"check_{check}")(name, device)
        if outcome.compared is not None and not outcome.skipped:
            found.append((name, outcome))
    return found


def suggest(compared: list[Compared], margin: float = MARGIN) -> tuple[float, float]:
    """(rtol, atol) holding `margin` times every measured difference."""
    got = np.concatenate([c.got for c in compared])
    expected = np.concatenate([c.expected for c in compared])
    band = rounding_bands.band_from_spread(expected, np.abs(got - expected), 0.0, factor=margin)
    if band is None:
        return 0.0, 0.0
    return _round_up(band[0]), _round_up(band[1])


def _round_up(value: float) -> float:
    """Up to two significant digits, never down."""
    if value <= 0:
        return 0.0
    exponent = np.floor(np.log10(value)) - 1
    return float(np.ceil(value / 10 ** exponent) * 10 ** exponent)


def general_sizes(results: list[Path], known: Any) -> list[dict[str, Any]]:
    """Per entry of `known` (the expectations files): how many items it covers in these runs, and
    the largest absolute and relative deviation among them. Each item is attributed anew, by the
    rules a run applies (its case's own entries first, then the first file entry that holds, a
    parity entry covering the trajectory item it has no trajectory entry for), so that the sizes
    follow the file as it is now, not as it was when the runs ran."""
    from conformance.prepare import prepare

    sizes = [{"items": 0, "max_abs_diff": 0.0, "max_rel_diff": 0.0} for _ in known.entries]
    problems: dict[str, Any] = {}
    for path in results:
        for item in json.loads(path.read_text(encoding="utf-8"))["items"]:
            deviation = item.get("deviation")
            if not isinstance(deviation, dict) or not item.get("backend") or not Path(item["source"]).is_file():
                continue
            if item["source"] not in problems:
                case = load(discover([Path(item["source"])])[0])
                problems[item["source"]] = (case, prepare(case).problem)
            case, problem = problems[item["source"]]
            checks = [item["check"]] + (["parity"] if item["check"] == "trajectory" else [])
            versions = item.get("environment") or {}
            if any(applicable(case.spec.expect, check, item["backend"], item["device"], versions) for check in checks):
                continue  # the case's own entry: bounded in the case (`python -m conformance.bounds CASE`)
            entry = next((found for check in checks if (found := known.applicable(
                problem, check, item["backend"], item["device"], versions)) is not None), None)
            if entry is None:
                continue
            size = sizes[next(index for index, candidate in enumerate(known.entries) if candidate is entry)]
            size["items"] += 1
            for key in ("max_abs_diff", "max_rel_diff"):
                value = deviation.get(key)
                if value is not None and np.isfinite(value):
                    size[key] = max(size[key], float(value))
    return sizes


def main_general(results: list[Path], margin: float, write: bool) -> int:
    """Suggest (and with `write`, put in) a bound for every entry of the shipped expectations file."""
    from conformance.expectations import load as load_expectations
    from conformance.plugin import SHIPPED_EXPECTATIONS

    known = load_expectations(SHIPPED_EXPECTATIONS)
    entries = known.entries
    sizes = general_sizes(results, known)
    lines = SHIPPED_EXPECTATIONS.read_text(encoding="utf-8").split("\n")
    starts = [number for number, line in enumerate(lines) if line.startswith("- ")]
    for index in reversed(range(len(entries))):
        entry, size = entries[index], sizes[index]
        name = f"entry {index} ({entry.check}, {', '.join(entry.backend_names)})"
        if not size["items"] or not size["max_abs_diff"]:
            print(f"{name}: no finite deviation measured in these runs; no bound suggested")
            continue
        rtol, atol = _round_up(margin * size["max_rel_diff"]), _round_up(margin * size["max_abs_diff"])
        note = (f"{margin:g} x the largest of {size['items']} items in {', '.join(p.parent.name for p in results)}: "
                f"{size['max_abs_diff']:.1e} absolute, {size['max_rel_diff']:.1e} relative")
        print(f"{name}: bound: {{rtol: {rtol:.2g}, atol: {atol:.2g}}}   # {note}")
        if write and entry.bound is None:
            end = starts[index + 1] if index + 1 < len(starts) else len(lines)
            while end > starts[index] and (not lines[end - 1].strip() or lines[end - 1].startswith("#")):
                end -= 1
            lines.insert(end, f"  bound: {{rtol: {rtol:.2g}, atol: {atol:.2g}}}   # {note}")
    if write:
        SHIPPED_EXPECTATIONS.write_text("\n".join(lines), encoding="utf-8")
        print(f"wrote {SHIPPED_EXPECTATIONS}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.bounds", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", type=Path, help="case files or folders")
    parser.add_argument("--results", action="append", type=Path, default=[],
                        help="results.json of a run: bounds for the expectations file's entries from it")
    parser.add_argument("--margin", type=float, default=MARGIN, help=f"bound / measured size (default {MARGIN:g})")
    parser.add_argument("--write", action="store_true", help="add the bounds and trajectory entries to the files")
    options = parser.parse_args(argv)
    if options.results:
        return main_general(options.results, options.margin, options.write)
    versions = environment.versions()
    measured_with = ", ".join(f"{package} {version}" for package, version in sorted(versions.items())
                              if version and package in ("tensorflow", "keras", "torch", "jax", "optax"))
    for source in discover(options.paths):
        case = load(source)
        if not case.spec.expect:
            continue
        run = make_run(case, [])
        bounds, added = {}, []
        for index, entry in enumerate(case.spec.expect):
            print(f"{source.display}: expect[{index}] {entry.check} {entry.backend_names or 'any backend'}")
            checks = [entry.check] + (["trajectory"] if entry.check == "parity" and not any(
                other.check == "trajectory" and set(other.backend_names or []) & set(entry.backend_names or [])
                for other in case.spec.expect) else [])
            for check in checks:
                found = measure(run, entry, check, versions)
                failing = [(name, outcome) for name, outcome in found if not outcome.passed]
                for name, outcome in found:
                    size = outcome.compared.size(entry.bound if check == entry.check else None)
                    share = f", {size['share_of_bound']:.2f} of the bound" if "share_of_bound" in size else ""
                    print(f"    {name} {check}: {'passes' if outcome.passed else 'deviates'}: max |a - b| "
                          f"{size['max_abs_diff']:.2e}, relative {size['max_rel_diff']:.2e}{share}")
                if not failing:
                    continue
                rtol, atol = suggest([outcome.compared for _, outcome in failing], options.margin)
                relative = max(outcome.compared.size(None)["max_rel_diff"] for _, outcome in failing)
                bound = f"{{rtol: {rtol:.2g}, atol: {atol:.2g}}}"
                print(f"    {check} bound: {bound}   # {options.margin:g} x the measured size")
                if check == entry.check:
                    if entry.bound is None:  # an entry's own bound stays as it was written
                        bounds[index] = (bound, relative)
                else:
                    added.append(_trajectory_entry(entry, index, [name for name, _ in failing], bound, relative,
                                                   measured_with))
        if options.write:
            _write(source.path, bounds, added, options.margin, measured_with)
    return 0


def _trajectory_entry(entry: Any, index: int, names: list[str], bound: str, relative: float, measured_with: str) -> str:
    lines = [f"  - backend: [{', '.join(names)}]", "    check: trajectory"]
    if entry.device:
        lines.append(f"    device: {entry.device}")
    if entry.versions:
        lines.append("    versions: {" + ", ".join(f'{k}: "{v}"' for k, v in entry.versions.items()) + "}")
    lines += ["    reason: >",
              f"      The deviation of the {entry.check} entry above (expect[{index}]) along the whole path: up to",
              f"      {relative:.1e} relative, measured with {measured_with}.",
              f"    bound: {bound}"]
    return "\n".join(lines)


def _write(path: Path, bounds: dict[int, tuple[str, float]], added: list[str], margin: float,
           measured_with: str) -> None:
    """Insert `bound:` under the entries (by position: entries start at '  - ' under `expect:`)
    and append the trajectory entries."""
    lines = path.read_text(encoding="utf-8").rstrip("\n").split("\n")
    start = lines.index("expect:")
    starts = [number for number in range(start + 1, len(lines)) if lines[number].startswith("  - ")]
    ends = starts[1:] + [len(lines)]
    for index in sorted(bounds, reverse=True):
        bound, relative = bounds[index]
        end = ends[index]
        while end > starts[index] and not lines[end - 1].strip():
            end -= 1
        lines.insert(end, f"    bound: {bound}   # {margin:g} x {relative:.1e} relative, measured with {measured_with}")
    path.write_text("\n".join(lines + added) + "\n", encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
