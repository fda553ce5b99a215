"""The hostmaint database: where host states, window progress, VM origins and the audit trail live.

One SQLAlchemy engine, one schema. SQLite by default (a file several threads and
processes share: WAL journal, a busy timeout, and write transactions that take the
write lock up front with ``BEGIN IMMEDIATE`` so a read-then-write cannot be overtaken);
PostgreSQL by URL (verified: the state and audit tests run on both, tests/unit/conftest.py).
Writers that read before they write rely on :func:`write_transaction` plus a unique key
and a retry, which holds on both databases; on PostgreSQL the state machine also locks the
host's row (``SELECT ... FOR UPDATE``) and audit appenders take an advisory lock
(:func:`lock_for_append`), so concurrent writers queue instead of retrying.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_random

from hostmaint.errors import InputError

log = logging.getLogger(__name__)

ENV_VAR = "HOSTMAINT_DB"
DEFAULT_PATH = Path("~/.local/share/hostmaint/hostmaint.db")
BUSY_TIMEOUT_MS = 30_000

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    """The default clock: an aware UTC datetime."""
    return datetime.now(UTC)


# --- schema -------------------------------------------------------------------


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out (SQLite keeps no zone, so store UTC there)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: hostmaint stores aware UTC times only")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base of every hostmaint table; :func:`open_engine` creates them all."""


class HostStateRow(Base):
    """The current state of one host (one row per host ever seen)."""

    __tablename__ = "hostmaint_host_state"

    host: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    state: Mapped[str] = mapped_column(sa.String(32))
    reason: Mapped[str] = mapped_column(sa.Text, default="")
    since: Mapped[datetime] = mapped_column(UTCDateTime())
    run_id: Mapped[str | None] = mapped_column(sa.String(255), nullable=True)
    prior_state: Mapped[str | None] = mapped_column(sa.String(32), nullable=True)


class HostHistoryRow(Base):
    """Every state a host entered, in order."""

    __tablename__ = "hostmaint_host_history"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    host: Mapped[str] = mapped_column(sa.String(255), index=True)
    state: Mapped[str] = mapped_column(sa.String(32))
    reason: Mapped[str] = mapped_column(sa.Text, default="")
    since: Mapped[datetime] = mapped_column(UTCDateTime())
    run_id: Mapped[str | None] = mapped_column(sa.String(255), nullable=True)
    prior_state: Mapped[str | None] = mapped_column(sa.String(32), nullable=True)


class WindowProgressRow(Base):
    """A host patched within a maintenance window, so a re-run of the window skips it."""

    __tablename__ = "hostmaint_window_progress"

    window_id: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    host: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    run_id: Mapped[str | None] = mapped_column(sa.String(255), nullable=True)
    patched_at: Mapped[datetime] = mapped_column(UTCDateTime())


class VmOriginRow(Base):
    """Where a VM lived before maintenance moved it."""

    __tablename__ = "hostmaint_vm_origin"

    vm: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    origin: Mapped[str] = mapped_column(sa.String(255), index=True)
    run_id: Mapped[str | None] = mapped_column(sa.String(255), nullable=True)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime())


class VmStoppedRow(Base):
    """A VM maintenance shut down (its policy said so) and must start again once its host is verified.

    Recorded before the shutdown is asked for, so a run that dies in between still knows."""

    __tablename__ = "hostmaint_vm_stopped"

    vm: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    host: Mapped[str] = mapped_column(sa.String(255), index=True)
    run_id: Mapped[str | None] = mapped_column(sa.String(255), nullable=True)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime())


class LinkObservationRow(Base):
    """What one drain saw of a source host's migration link (hostmaint.migration.links)."""

    __tablename__ = "hostmaint_link_observation"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    host: Mapped[str] = mapped_column(sa.String(255), index=True)
    peak_mib_s: Mapped[float] = mapped_column(sa.Float)
    demand_mib_s: Mapped[float] = mapped_column(sa.Float)
    streams: Mapped[int] = mapped_column(sa.Integer)
    run_id: Mapped[str | None] = mapped_column(sa.String(255), nullable=True)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime())


class AuditRow(Base):
    """One audit record. ``seq`` is the primary key, so two writers cannot both append the same seq."""

    __tablename__ = "hostmaint_audit"
    # a cluster's migrations are read at every drain, return and rebalance (settling what dead runs left)
    __table_args__ = (sa.Index("ix_hostmaint_audit_cluster_step", "cluster", "step"),)

    seq: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=False)
    time: Mapped[str] = mapped_column(sa.String(40))  # ISO text: hashed exactly as stored
    run_id: Mapped[str | None] = mapped_column(sa.String(255), nullable=True, index=True)
    flow: Mapped[str] = mapped_column(sa.String(255), default="")
    trigger: Mapped[str | None] = mapped_column(sa.String(32), nullable=True)
    operator: Mapped[str] = mapped_column(sa.String(255), default="")
    cluster: Mapped[str] = mapped_column(sa.String(255), default="")
    host: Mapped[str | None] = mapped_column(sa.String(255), nullable=True, index=True)
    vm: Mapped[str | None] = mapped_column(sa.String(255), nullable=True)
    step: Mapped[str] = mapped_column(sa.String(255), default="")
    inputs: Mapped[str] = mapped_column(sa.Text, default="{}")  # canonical JSON
    outcome: Mapped[str] = mapped_column(sa.String(32))
    duration_s: Mapped[float] = mapped_column(sa.Float, default=0.0)
    details: Mapped[str] = mapped_column(sa.Text, default="{}")  # canonical JSON
    prev_hash: Mapped[str] = mapped_column(sa.String(64))
    hash: Mapped[str] = mapped_column(sa.String(64))


class SwitchoverRow(Base):
    """What one drain learned of its cluster's switch-over (hostmaint.migration.policy.learned_switchover_ms):
    the reserve it ended with when a pause outgrew the limit, else none (it learned nothing)."""

    __tablename__ = "hostmaint_switchover"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    cluster: Mapped[str] = mapped_column(sa.String(255), index=True)
    reserve_ms: Mapped[float | None] = mapped_column(sa.Float, nullable=True)
    run_id: Mapped[str | None] = mapped_column(sa.String(255), nullable=True)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime())


# Core handles on the tables (typed as Table, which ``Model.__table__`` is not)
host_state_table = cast(sa.Table, HostStateRow.__table__)
host_history_table = cast(sa.Table, HostHistoryRow.__table__)
window_progress_table = cast(sa.Table, WindowProgressRow.__table__)
vm_origin_table = cast(sa.Table, VmOriginRow.__table__)
vm_stopped_table = cast(sa.Table, VmStoppedRow.__table__)
link_observation_table = cast(sa.Table, LinkObservationRow.__table__)
switchover_table = cast(sa.Table, SwitchoverRow.__table__)
audit_table = cast(sa.Table, AuditRow.__table__)


# --- engine -------------------------------------------------------------------


def database_url(url: str | None = None) -> str:
    """The database to use: ``url``, else ``$HOSTMAINT_DB``, else ``~/.local/share/hostmaint/hostmaint.db``.

    ``$HOSTMAINT_DB`` may be an SQLAlchemy URL (``postgresql+psycopg://...``) or a bare
    file path, which means an SQLite file. The parent directory of an SQLite file is created.
    """
    chosen = url or os.environ.get(ENV_VAR) or str(DEFAULT_PATH)
    if "://" in chosen:
        return chosen
    path = Path(chosen).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def open_engine(url: str | None = None) -> Engine:
    """An engine on :func:`database_url` with every hostmaint table created.

    SQLite gets WAL, a 30 s busy timeout and explicit transaction control, so that
    :func:`write_transaction` can take the write lock with ``BEGIN IMMEDIATE``.
    """
    resolved = database_url(url)
    try:
        sa_url = sa.make_url(resolved)
        if sa_url.get_backend_name() == "sqlite":
            engine = _sqlite_engine(sa_url)
        else:
            engine = sa.create_engine(sa_url, pool_pre_ping=True)
    except (sa.exc.ArgumentError, ValueError, ImportError) as exc:
        raise _bad_url(url, resolved, exc) from None
    _create_tables(engine)
    return engine


def _bad_url(given: str | None, resolved: str, exc: Exception) -> InputError:
    """A URL SQLAlchemy cannot use, as one line naming where it came from; its password never shown.

    SQLAlchemy's messages may quote the URL, so the password is cut out of them too, and the
    original exception is not chained (a traceback would print it)."""
    source = "the database URL" if given else ENV_VAR
    password = _password_in(resolved)
    shown = resolved.replace(f":{password}@", ":***@") if password else resolved
    if isinstance(exc, sa.exc.NoSuchModuleError):
        why = f"no SQLAlchemy dialect or driver {resolved.split('://', 1)[0]!r}"
    elif isinstance(exc, ImportError):
        why = f"its database driver is not installed ({exc}); for PostgreSQL: pip install 'hostmaint[postgres]'"
    else:
        why = str(exc)
    if password:
        why = why.replace(password, "***")
    return InputError(f"{source}: not a usable database URL: {shown}: {why} (expected a file path or a URL like "
                      "postgresql+psycopg://USER:PASSWORD@HOST:5432/DATABASE)")


def _password_in(url: str) -> str:
    """The password in ``scheme://user:password@host...``, found without parsing (the URL may not parse)."""
    rest = url.split("://", 1)[1] if "://" in url else ""
    if "@" not in rest:
        return ""
    userinfo = rest.rsplit("@", 1)[0]
    return userinfo.split(":", 1)[1] if ":" in userinfo else ""


def _sqlite_engine(url: sa.URL) -> Engine:
    in_memory = url.database in (None, "", ":memory:")
    kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000}}
    if in_memory:
        # one shared connection, or every pooled connection would see its own empty database
        kwargs["poolclass"] = sa.pool.StaticPool
    engine = sa.create_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # take transaction control from the sqlite3 module: it would otherwise BEGIN lazily,
        # on the first write, after our read, which is too late to keep another writer out
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if not in_memory:
            _use_wal(cur)
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get("hostmaint_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _locked(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)


def _use_wal(cur: Any) -> None:
    """Switch the database file to WAL (it stays so); a no-op once any connection has.

    Switching needs the database to itself, and SQLite answers "database is locked" at once
    instead of waiting out the busy timeout: with six engines opening a fresh database together,
    about one run in forty failed here. So: look first, and retry the switch within the timeout."""
    if str(cur.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
        return
    for attempt in Retrying(stop=stop_after_delay(BUSY_TIMEOUT_MS / 1000), wait=wait_random(0.01, 0.1),
                            retry=retry_if_exception(_locked), reraise=True):
        with attempt:
            cur.execute("PRAGMA journal_mode = WAL")


def _create_tables(engine: Engine) -> None:
    # Several processes may open a fresh database at once (workers starting a window's runs): they take
    # turns, so the second finds the tables and creates nothing. Racing, SQLite's reader cannot become
    # a writer ("database is locked") and PostgreSQL's concurrent CREATE TABLEs collide in its catalog.
    with engine.connect() as conn:
        if set(Base.metadata.tables) <= set(sa.inspect(conn).get_table_names()) and not _missing_indexes(conn):
            return  # the usual case: nothing to create, no lock to take
    try:
        with write_transaction(engine) as conn:  # SQLite: the write lock, with the busy timeout
            if conn.dialect.name == "postgresql":
                # held until the DDL commits
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": advisory_key("schema")})
            Base.metadata.create_all(conn)  # new tables, with their indexes
            for index in _missing_indexes(conn):  # an index added since an existing table was made
                index.create(conn, checkfirst=True)
    except (sa.exc.ProgrammingError, sa.exc.OperationalError) as exc:
        # a role that may not create an index on a table it does not own (docs/deployments.md) still
        # works: the index only makes reads of a long trail faster. Tables it cannot create stop it below.
        with engine.connect() as conn:
            if not set(Base.metadata.tables) <= set(sa.inspect(conn).get_table_names()):
                raise
        log.warning("hostmaint database: an index could not be created (%s); reads of a long audit trail "
                    "will be slower until an owner of the tables opens it once", type(exc).__name__)


def _missing_indexes(conn: Connection) -> list[sa.Index]:
    """The indexes the model declares on tables that exist but lack them (added in a later version)."""
    inspector = sa.inspect(conn)
    existing = set(inspector.get_table_names())
    missing = []
    for table in Base.metadata.sorted_tables:
        if table.name not in existing:
            continue
        have = {ix["name"] for ix in inspector.get_indexes(table.name)}
        missing += [ix for ix in table.indexes if ix.name not in have]
    return missing


def lock_for_append(conn: Connection, table: sa.Table) -> None:
    """Keep every other hostmaint writer of ``table`` out until this transaction ends; readers carry on.

    For read-then-insert work whose read decides the new key (the audit chain's next seq).
    On SQLite the write transaction already holds the database's write lock: nothing to do.
    On PostgreSQL two READ COMMITTED writers would read the same last row and race for the
    same key; the loser retries, but with eight writers appending at once one writer lost
    20 races in a row and its append failed. So appenders queue on a transaction advisory
    lock named after the table: unlike ``LOCK TABLE`` in a mode that keeps writers out, it
    needs no UPDATE or DELETE right on the table, so a role that may only SELECT and INSERT
    the audit table (docs/deployments.md) can still append. Take it first in the transaction.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": advisory_key(table.name)})


def advisory_key(name: str) -> int:
    """The PostgreSQL advisory lock key (a signed 64-bit integer) hostmaint uses for ``name``."""
    return int.from_bytes(hashlib.sha256(f"hostmaint:{name}".encode()).digest()[:8], "big", signed=True)


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction for read-then-write work: holds SQLite's write lock from its first statement.

    On PostgreSQL it is an ordinary transaction; callers pair it with a unique key or a
    compare-and-set ``UPDATE ... WHERE`` and retry on conflict.
    """
    with engine.connect() as conn:
        conn.execution_options(hostmaint_write=True)
        with conn.begin():
            yield conn
