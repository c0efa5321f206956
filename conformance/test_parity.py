"""The items `pytest conformance` runs: one per case, backend, device and check (see items.py)."""

import pytest

from conformance.items import ItemSpec, run_item


def test_case(conformance_item: ItemSpec, case_runs: dict, request: pytest.FixtureRequest) -> None:
    run_item(conformance_item, case_runs, request.node.user_properties)
