"""What a run was made with: package versions, platform, and numerics switches.

Framework versions are read from modules already imported (never importing a framework just to
report it); packages not imported are looked up in the installed distributions.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import sys
from typing import Any

# Report key -> distributions that provide it (tensorflow-cpu and tensorflow are one package).
DISTRIBUTIONS = {
    "tensorflow": ("tensorflow", "tensorflow-cpu", "tensorflow-macos", "tf-nightly"),
    "keras": ("keras", "tf-keras"),
    "torch": ("torch",),
    "jax": ("jax",),
    "jaxlib": ("jaxlib",),
    "optax": ("optax",),
    "numpy": ("numpy",),
    "scipy": ("scipy",),
    "pydantic": ("pydantic",),
    "pytest": ("pytest",),
}
NUMERICS_VARIABLES = ("TF_ENABLE_ONEDNN_OPTS", "TF_DETERMINISTIC_OPS", "CUBLAS_WORKSPACE_CONFIG",
                      "OMP_NUM_THREADS", "TF_FORCE_GPU_ALLOW_GROWTH", "KERAS_BACKEND", "TF_USE_LEGACY_KERAS",
                      "TF_XLA_FLAGS", "XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE", "JAX_PLATFORMS",
                      "TORCHINDUCTOR_CACHE_DIR", "JAX_COMPILATION_CACHE_DIR")


def share_cores(workers: int) -> None:
    """Give each of `workers` test processes its share of the cores, for the frameworks' OpenMP
    threads (torch's intra-op pool, oneDNN), unless OMP_NUM_THREADS is set already: as torchrun
    does for several processes on one machine. Two workers of two threads each on two cores made
    a small torch step 6 to 10 times as long (1.8-3.1 ms against 0.2-0.33 ms: benchmarks). Set
    before the workers start, so that they inherit it and the report shows it."""
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // workers))


COMPILE_CACHE_VARIABLES = {  # the frameworks' own persistent caches of compiled programs, under the run's folder
    "JAX_COMPILATION_CACHE_DIR": "jax",  # jax and Keras on JAX: the XLA executables, keyed by program and versions
    "TORCHINDUCTOR_CACHE_DIR": "inductor",  # torch.compile: Inductor's generated kernels and FX graphs
}


def use_compile_caches(folder: str | os.PathLike[str] | None) -> dict[str, str]:
    """Point the frameworks' persistent compilation caches at `folder` (None: leave them as they
    are), unless the user set a variable already; set before any worker starts, so that workers
    and Keras's processes inherit them. JAX caches only compiles longer than a second unless told
    otherwise; the suite's are 0.1-0.2 s each, so every one is kept
    (JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0). A rerun then loads instead of compiling: 16
    jax cases 7.2 s -> 2.4 s on this machine (docs/benchmarks.md); the results are the same bits
    (tests/test_environment.py). Returns the variables it set."""
    if folder is None:
        return {}
    chosen = {name: os.path.join(os.fspath(folder), part) for name, part in COMPILE_CACHE_VARIABLES.items()}
    chosen["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:  # the user's cache keeps the user's threshold
        del chosen["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]
    applied = {name: value for name, value in chosen.items() if name not in os.environ}
    os.environ.update(applied)
    return applied


def versions() -> dict[str, str | None]:
    """Version of every package that can change a result (None: not installed)."""
    found = {name: _distribution_version(names) for name, names in DISTRIBUTIONS.items()}
    if "tensorflow" in sys.modules:
        found["tensorflow"] = str(sys.modules["tensorflow"].__version__)
        from conformance.backends import _tensorflow

        found["keras"] = _tensorflow.keras_version()
    if "torch" in sys.modules:
        found["torch"] = str(sys.modules["torch"].__version__)
    found["python"] = platform.python_version()
    return found


def host() -> dict[str, Any]:
    """The machine and process, for the report's header."""
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "variables": {name: os.environ.get(name) for name in NUMERICS_VARIABLES if os.environ.get(name)},
    }


@functools.cache
def _distribution_version(names: tuple[str, ...]) -> str | None:
    """The first of `names` installed, its version; read once per process (importlib.metadata
    parses the METADATA files on every call: 1.4 ms, 5,797 calls in a run of 175 items, 19% of
    its time, since every check asks for the versions its expectations and switches hold for)."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def versions_hold(specifiers: dict[str, str], versions: dict[str, str | None]) -> bool:
    """Whether every package named is installed at a version its specifier contains."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        return all(versions.get(package) is not None
                   and SpecifierSet(spec).contains(Version(versions[package]), prereleases=True)
                   for package, spec in specifiers.items())
    except InvalidVersion:
        return False
