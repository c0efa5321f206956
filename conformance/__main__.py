"""`python -m conformance doctor [--json]`: what the suite sees on this machine (see doctor.py).

Reports and comparisons have their own entry point: `python -m conformance.report`.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    doctor = commands.add_parser("doctor", help="frameworks, backends, devices and switches, before a run")
    doctor.add_argument("--json", action="store_true", help="print the same as JSON")
    arguments = parser.parse_args(argv)
    from conformance import doctor as doctor_module

    return doctor_module.main(as_json=arguments.json)


if __name__ == "__main__":
    sys.exit(main())
