"""Fixtures shared by every test directory.

Flow tests run against one real temporary Prefect server per session
(``prefect_test_harness``); the SIMULATED fleet (hostmaint.simulated_fleet) stands in
for hosts where a test is about orchestration, not about the drivers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import pg

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """A real temporary Prefect server for the whole session (started on first use)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def postgres() -> Iterator[pg.Cluster]:
    """A throwaway PostgreSQL cluster for the session, on a Unix socket only."""
    reason = pg.unavailable()
    if reason is not None:
        if os.environ.get("CI") == "true":
            # CI installs PostgreSQL (scripts/install-system.sh) and psycopg (scripts/setup.sh)
            pytest.fail(f"PostgreSQL tests cannot run in CI: {reason}")
        pytest.skip(f"PostgreSQL tests skipped: {reason}")
    cluster = pg.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def hostmaint_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private state/audit database for one test; the runtimes opened on it are closed after it (each
    holds its database's files open: over a whole run they passed the 1,024 descriptors select() takes,
    and every SSH test after that failed)."""
    from hostmaint.runtime import close_all

    db = tmp_path / "hostmaint.db"
    monkeypatch.setenv("HOSTMAINT_DB", str(db))
    yield db
    close_all()


@pytest.fixture
def sim_inventory(tmp_path: Path, hostmaint_db: Path) -> Path:
    """A SIMULATED 4-host, 12-VM cluster ('demo') on disk; returns its inventory path."""
    from hostmaint.simulated_fleet import demo_packages, demo_snapshot, write_simulated_fleet

    snap = demo_snapshot(4, 12)
    return write_simulated_fleet(tmp_path / "fleet", snap, demo_packages(snap), time_scale=0.001)



@pytest.fixture
def growable_inventory(tmp_path: Path, hostmaint_db: Path) -> Path:
    """The SIMULATED demo cluster whose first VM (``demo_snapshot(4, 12).vms[0]``) can grow live: two
    vCPUs and four DIMM slots to spare, one guest cell holding them all."""
    from hostmaint.models import GuestCell
    from hostmaint.simulated_fleet import demo_packages, demo_snapshot, write_simulated_fleet

    snap = demo_snapshot(4, 12)
    first = snap.vms[0]
    grown = first.model_copy(update={
        "max_vcpus": first.vcpus + 2, "max_memory_mib": first.memory_mib * 4, "memory_slots": 4,
        "vnuma": (GuestCell(id=0, memory_mib=first.memory_mib, vcpus=tuple(range(first.vcpus + 2))),)})
    snap = snap.model_copy(update={"vms": (grown, *snap.vms[1:])})
    return write_simulated_fleet(tmp_path / "fleet", snap, demo_packages(snap), time_scale=0.001)
