"""`python -m conformance doctor`: what the suite sees here, before a run.

Frameworks and versions, every backend and whether it can run (and why not), the devices each
finds with their names, the numerics switches as the frameworks report them, and which backends
a run without --backend selects. It is the first command to run on a new machine.
"""

from __future__ import annotations

import json
from typing import Any

from conformance import environment
from conformance.backends import _frameworks
from conformance.items import _discover_devices, default_backends


def collect() -> dict[str, Any]:
    """What `doctor` prints, as plain data (`--json`)."""
    backends = _discover_devices([])
    return {"versions": environment.versions(), "host": environment.host(), "backends": backends,
            "default_selection": default_backends(backends), "switches": _switches()}


def _switches() -> dict[str, Any]:
    """The frameworks' numerics and determinism switches, as they are in this process."""
    switches: dict[str, Any] = {}
    if _frameworks.installed("torch"):
        switches |= _frameworks.torch_settings()
    if _frameworks.installed("tensorflow"):
        tf = _frameworks.tensorflow()
        switches |= {"tf.tensor_float_32_execution": tf.config.experimental.tensor_float_32_execution_enabled(),
                     "tf.op_determinism": _frameworks.tensorflow_determinism(),
                     "tf.xla_built_in": tf.test.is_built_with_xla()}
    return switches


def render(found: dict[str, Any]) -> str:
    """The human-readable report."""
    host, versions = found["host"], found["versions"]
    lines = [f"Python {host['python']} on {host['platform']} ({host['cpu_count']} CPUs)", "", "Packages:"]
    lines += [f"  {name:12} {version or 'not installed'}" for name, version in versions.items() if name != "python"]
    lines += ["", "Backends:"]
    for name, seen in found["backends"].items():
        if "unavailable" in seen:
            state = f"not available: {seen['unavailable']}"
        else:
            devices = ", ".join(f"{device} ({seen['names'][device]})" for device in seen["devices"])
            missing = f"; not found: {', '.join(seen['not_found'])}" if seen["not_found"] else ""
            selected = "" if seen["selected"] else f" [available, not selected: --backend {name}]"
            state = f"{devices}{missing}{selected}"
        lines.append(f"  {name:18} {state}")
    cannot = [name for name in found["default_selection"] if "unavailable" in found["backends"][name]]
    lines += ["", f"A run without --backend selects: {', '.join(found['default_selection']) or 'nothing'}"
              + (f" (its items skip, with the reason above, for: {', '.join(cannot)})" if cannot else ""),
              "", "Numerics switches (as the frameworks report them):"]
    lines += [f"  {name:40} {value}" for name, value in found["switches"].items()]
    variables = host["variables"]
    lines += [f"  ${name:39} {value}" for name, value in variables.items()] or ["  (no numerics variables set)"]
    return "\n".join(lines)


def main(as_json: bool = False) -> int:
    found = collect()
    print(json.dumps(found, indent=2, default=str) if as_json else render(found))
    return 0
