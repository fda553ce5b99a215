"""Fixtures of the core's unit tests: a fresh state/audit database on each backend, and a fake clock.

``db_url`` (and ``engine`` on it) is parametrized over SQLite and PostgreSQL, so every state
and audit test that takes it runs on both. PostgreSQL is one throwaway cluster per session
(tests/pg.py, the ``postgres`` fixture of tests/conftest.py), emptied before each test; where it
cannot run, the PostgreSQL cases are skipped with the reason, except under CI, where a skip would
hide that they never ran.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from hostmaint.db import open_engine
from tests import pg

T0 = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
BACKENDS = ("sqlite", "postgresql")


class FakeClock:
    """A clock that moves one second per reading."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "hostmaint.db"


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, db_path: Path) -> str:
    """A fresh, empty hostmaint database for one test: an SQLite file, or the PostgreSQL test database."""
    if request.param == "sqlite":
        return str(db_path)
    cluster: pg.Cluster = request.getfixturevalue("postgres")
    cluster.reset()
    return cluster.url


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    eng = open_engine(db_url)
    yield eng
    eng.dispose()
