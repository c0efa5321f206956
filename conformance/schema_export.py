"""Writes the JSON Schema of the case format, for editors.

    python -m conformance.schema_export [PATH]     # default: schema/case-v1.schema.json
    python -m conformance.schema_export --check    # exit 1 when the published file is stale
"""

import argparse
import json
import sys
from pathlib import Path

from conformance.schema import Case

DEFAULT = Path("schema/case-v1.schema.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.schema_export", description=__doc__.split("\n")[0])
    parser.add_argument("path", nargs="?", type=Path, default=DEFAULT, help=f"output file (default {DEFAULT})")
    parser.add_argument("--check", action="store_true", help="compare with the file instead of writing it")
    options = parser.parse_args(argv)
    text = json.dumps(Case.model_json_schema(), indent=2) + "\n"
    if options.check:
        current = options.path.read_text(encoding="utf-8") if options.path.exists() else ""
        if current != text:
            print(f"{options.path} is stale: regenerate with python -m conformance.schema_export", file=sys.stderr)
            return 1
        return 0
    options.path.parent.mkdir(parents=True, exist_ok=True)
    options.path.write_text(text, encoding="utf-8")
    print(options.path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
