"""benchmarks/run.py and its section files: small files, each part defined once, and the entry
points the benchmark's child processes and Keras workers use still resolve. Nothing is measured
here (no framework is imported); the benchmark itself is too long for a test."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import ROOT

BENCHMARKS = ROOT / "benchmarks"
SECTIONS = ("per_step", "compiled", "keras_workers", "growth", "suite_wall")
RUN_FILES = ("run", "_runner", *SECTIONS)


def tree(name: str) -> ast.Module:
    return ast.parse((BENCHMARKS / f"{name}.py").read_text(encoding="utf-8"))


def test_every_benchmark_file_is_short_and_says_what_it_measures():
    for path in sorted(BENCHMARKS.glob("*.py")):
        assert len(path.read_text(encoding="utf-8").splitlines()) <= 200, path.name
        assert ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))), path.name


def test_each_function_and_constant_of_the_benchmark_lives_in_one_file():
    where: dict[str, list[str]] = {}
    for name in RUN_FILES:
        for node in tree(name).body:
            names = [node.name] if isinstance(node, ast.FunctionDef) else \
                [target.id for target in getattr(node, "targets", []) if isinstance(target, ast.Name)]
            for defined in names:
                where.setdefault(defined, []).append(name)
    where.pop("print_section")  # one per section, each printing its own tables
    assert {name: files for name, files in where.items() if len(files) > 1} == {}
    assert all("print_section" in {node.name for node in tree(section).body if isinstance(node, ast.FunctionDef)}
               for section in SECTIONS)


def test_the_entry_point_and_the_workers_callable_resolve():
    completed = subprocess.run([sys.executable, str(BENCHMARKS / "run.py"), "--help"], capture_output=True,
                               text=True, cwd=ROOT, check=True)
    assert "--quick" in completed.stdout
    # What a Keras worker does with the bare-fit callable's name (its sys.path holds benchmarks/,
    # as the benchmark's own does when it is run as a script).
    check = ("import sys; sys.path.insert(0, sys.argv[1]); import keras_workers, run, _runner; "
             "from conformance.workers import resolve; "
             "assert resolve(keras_workers.FIT_FLOOR) is keras_workers.keras_fit_floor; "
             "assert _runner.RUN.samefile(run.__file__); "
             "assert 'torch' not in sys.modules and 'tensorflow' not in sys.modules")
    subprocess.run([sys.executable, "-c", check, str(BENCHMARKS)], cwd=ROOT, check=True)
