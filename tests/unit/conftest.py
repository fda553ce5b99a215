"""Fixtures of the core's unit tests: a fresh SQLite state/audit database and a fake clock."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from hostmaint.db import open_engine

T0 = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)


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


@pytest.fixture
def engine(db_path: Path) -> Iterator[sa.Engine]:
    eng = open_engine(str(db_path))
    yield eng
    eng.dispose()
