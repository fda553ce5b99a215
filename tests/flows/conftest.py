"""Flow tests: one Prefect server for the session, with the concurrency limits the demo cluster needs.

The flows hold strict global limits (host:<name>, maintenance:<cluster>, migrations:<cluster>)
and refuse to run when one is missing, so the limits are created here, as `hostmaint setup` would.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def demo_limits(prefect_server: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    from flows.locks import ensure_limits
    from hostmaint.simulated_fleet import demo_packages, demo_snapshot, write_simulated_fleet

    snap = demo_snapshot(4, 12)
    inventory = write_simulated_fleet(Path(tmp_path_factory.mktemp("limits")), snap, demo_packages(snap))
    ensure_limits(inventory)
    yield
