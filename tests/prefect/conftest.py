"""Fixtures of the Prefect deployment tests.

Most tests run under the session's ``prefect_test_harness`` (tests/conftest.py);
tests/prefect/test_prefect_server.py starts its own real ``prefect server start``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect_support import make_fleet


@pytest.fixture
def fleet(tmp_path: Path, hostmaint_db: Path, prefect_server: None) -> Path:
    """A fresh simulated fleet whose limits exist on the harness server."""
    from flows.locks import ensure_limits

    inventory = make_fleet(tmp_path / "fleet")
    ensure_limits(inventory)
    return inventory
