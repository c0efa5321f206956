"""Writes the JSON Schema of the case format, for editors: python -m conformance.schema_export"""

import json
import sys
from pathlib import Path

from conformance.schema import Case

if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "schema/case-v1.schema.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(Case.model_json_schema(), indent=2) + "\n", encoding="utf-8")
    print(target)
