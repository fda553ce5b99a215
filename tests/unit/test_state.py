"""The persisted host state machine: transitions, prior state, races, window progress, VM origins."""

from __future__ import annotations

import itertools
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from hostmaint.db import HostStateRow, database_url, open_engine
from hostmaint.errors import StateError
from hostmaint.models import HostState as S
from hostmaint.state import HostRecord, HostStateStore
from tests.unit.conftest import T0, FakeClock

# the state machine as the brief states it, written out independently of hostmaint.state.TRANSITIONS
ALLOWED = {
    S.ACTIVE: {S.CORDONED},
    S.CORDONED: {S.DRAINING, S.ACTIVE, S.FAILED},
    S.DRAINING: {S.DRAINED, S.CORDONED, S.FAILED},
    S.DRAINED: {S.PATCHING, S.REBOOTING, S.VERIFYING, S.CORDONED, S.ACTIVE, S.FAILED, S.DRAINING},
    S.PATCHING: {S.REBOOTING, S.VERIFYING, S.FAILED, S.CORDONED},
    S.REBOOTING: {S.VERIFYING, S.FAILED},
    S.VERIFYING: {S.ACTIVE, S.CORDONED, S.FAILED, S.DRAINED},
    S.FAILED: {S.CORDONED},
}
VALID = [(a, b) for a, targets in ALLOWED.items() for b in sorted(targets)]
INVALID = [(a, b) for a, b in itertools.product(S, S) if a != b and b not in ALLOWED[a]]



@pytest.fixture
def store(engine: sa.Engine) -> HostStateStore:
    return HostStateStore(engine, clock=FakeClock())


def put(engine: sa.Engine, host: str, state: S) -> None:
    """Place a host in a state directly, bypassing the state machine (test setup only)."""
    with engine.begin() as conn:
        conn.execute(sa.insert(HostStateRow.__table__).values(
            host=host, state=state.value, reason="test setup", since=T0, run_id=None, prior_state=None))


# --- the transition table ---------------------------------------------------------


def test_table_covers_every_pair() -> None:
    assert len(VALID) + len(INVALID) + len(S) == len(S) ** 2
    assert (S.DRAINED, S.DRAINING) in VALID  # a resumed drain
    assert (S.ACTIVE, S.DRAINING) in INVALID  # never drain an uncordoned host


@pytest.mark.parametrize(("frm", "to"), VALID, ids=[f"{a}->{b}" for a, b in VALID])
def test_valid_transition_is_stored_with_history(engine: sa.Engine, store: HostStateStore,
                                                  frm: S, to: S) -> None:
    put(engine, "hv01", frm)
    rec = store.transition("hv01", to, reason=f"test {frm}->{to}", run_id="run-1")
    assert rec.state == to
    assert rec.run_id == "run-1"
    assert rec.since.tzinfo is not None
    again = store.get("hv01")
    assert again == rec
    assert store.state("hv01") == to
    assert [h.state for h in store.history("hv01")] == [to]


@pytest.mark.parametrize(("frm", "to"), INVALID, ids=[f"{a}->{b}" for a, b in INVALID])
def test_invalid_transition_raises_naming_host_from_and_to(engine: sa.Engine, store: HostStateStore,
                                                           frm: S, to: S) -> None:
    put(engine, "hv07", frm)
    with pytest.raises(StateError) as err:
        store.transition("hv07", to, reason="should not happen")
    message = str(err.value)
    assert "hv07" in message
    assert f"from {frm.value} to {to.value}" in message
    assert store.state("hv07") == frm
    assert store.history("hv07") == []


def test_invalid_transition_on_a_never_seen_host(store: HostStateStore) -> None:
    with pytest.raises(StateError, match="hv09: cannot go from active to drained"):
        store.transition("hv09", S.DRAINED, reason="skip the drain")
    assert store.all() == {}


@pytest.mark.parametrize("state", list(S))
def test_same_state_is_a_noop(engine: sa.Engine, store: HostStateStore, state: S) -> None:
    put(engine, "hv02", state)
    before = store.get("hv02")
    rec = store.transition("hv02", state, reason="again", run_id="run-2")
    assert rec == before  # not re-stamped with the new reason or run
    assert store.history("hv02") == []


def test_unknown_host_is_active_and_never_seen(store: HostStateStore) -> None:
    rec = store.get("hv99")
    assert rec.state == S.ACTIVE
    assert rec.reason == "never seen"
    assert rec.prior_state is None
    assert store.history("hv99") == []
    assert store.transition("hv99", S.ACTIVE, "noop") == rec
    assert store.all() == {}  # a no-op does not create the host


def test_since_comes_from_the_clock(store: HostStateStore) -> None:
    rec = store.transition("hv01", S.CORDONED, "cordon")
    assert rec.since == T0 + timedelta(seconds=1)
    assert store.get("hv01").since == T0 + timedelta(seconds=1)


def test_history_keeps_every_step_in_order(store: HostStateStore) -> None:
    path = [S.CORDONED, S.DRAINING, S.DRAINED, S.PATCHING, S.REBOOTING, S.VERIFYING, S.ACTIVE]
    for step in path:
        store.transition("hv03", step, reason=f"to {step}", run_id="run-3")
    history = store.history("hv03")
    assert [h.state for h in history] == path
    assert [h.reason for h in history] == [f"to {s}" for s in path]
    assert history == sorted(history, key=lambda h: h.since)


# --- prior state (kured: restore exactly the state before maintenance) ---------------------------


def test_begin_maintenance_on_active_host_cordons_and_remembers_active(store: HostStateStore) -> None:
    rec = store.begin_maintenance("hv01", "run-1", "patch window")
    assert (rec.state, rec.prior_state, rec.run_id) == (S.CORDONED, S.ACTIVE, "run-1")
    for step in (S.DRAINING, S.DRAINED, S.PATCHING):
        assert store.transition("hv01", step, "step", "run-1").prior_state == S.ACTIVE
    rec = store.transition("hv01", S.REBOOTING, "reboot", "run-1")
    assert rec.prior_state == S.ACTIVE
    store.transition("hv01", S.VERIFYING, "verify", "run-1")
    done = store.transition("hv01", rec.prior_state, "restore prior state", "run-1")
    assert (done.state, done.prior_state) == (S.ACTIVE, None)


def test_begin_maintenance_keeps_an_operator_cordon(store: HostStateStore) -> None:
    store.transition("hv02", S.CORDONED, "operator: bad DIMM, keep empty")
    rec = store.begin_maintenance("hv02", "run-2", "patch window")
    assert (rec.state, rec.prior_state) == (S.CORDONED, S.CORDONED)
    assert [h.state for h in store.history("hv02")] == [S.CORDONED, S.CORDONED]
    for step in (S.DRAINING, S.DRAINED, S.VERIFYING):
        store.transition("hv02", step, "step", "run-2")
    assert store.get("hv02").prior_state == S.CORDONED  # survives a persisted round trip
    done = store.transition("hv02", store.get("hv02").prior_state, "restore prior state", "run-2")
    assert (done.state, done.prior_state) == (S.CORDONED, None)


def test_begin_maintenance_is_idempotent_for_one_run(store: HostStateStore) -> None:
    first = store.begin_maintenance("hv03", "run-3", "patch")
    assert store.begin_maintenance("hv03", "run-3", "patch") == first
    assert len(store.history("hv03")) == 1


def test_begin_maintenance_resumed_by_another_run_keeps_state_and_prior(store: HostStateStore) -> None:
    store.begin_maintenance("hv04", "run-4", "patch")
    store.transition("hv04", S.DRAINING, "drain", "run-4")
    store.transition("hv04", S.DRAINED, "drained", "run-4")
    rec = store.begin_maintenance("hv04", "run-5", "re-run of the window")
    assert (rec.state, rec.prior_state, rec.run_id) == (S.DRAINED, S.ACTIVE, "run-5")
    assert "resumed" in rec.reason


def test_begin_maintenance_refuses_a_failed_host(store: HostStateStore) -> None:
    store.begin_maintenance("hv05", "run-6", "patch")
    store.transition("hv05", S.FAILED, "drain failed", "run-6")
    with pytest.raises(StateError, match="hv05: cannot go from failed to cordoned"):
        store.begin_maintenance("hv05", "run-7", "patch again")
    assert store.state("hv05") == S.FAILED
    recovered = store.transition("hv05", S.CORDONED, "operator recovery")
    assert recovered.state == S.CORDONED



def test_keep_out_of_a_rebooting_host_keeps_it_rebooting_with_the_reason(store: HostStateStore) -> None:
    # a resumed run found the host never rebooted, and its reboot gate (or a pre-reboot hook) held it:
    # rebooting cannot back out to cordoned, so the host stays out of service there, saying why
    store.begin_maintenance("hv06", "run-8", "patch")
    for state in (S.DRAINING, S.DRAINED, S.PATCHING, S.REBOOTING):
        store.transition("hv06", state, str(state), "run-8")
    kept = store.keep_out("hv06", "not rebooted, held by monitoring: storage", "run-9")
    assert (kept.state, kept.reason, kept.prior_state) == (S.REBOOTING, "not rebooted, held by monitoring: storage",
                                                          S.ACTIVE)
    assert store.keep_out("hv06", "not rebooted, held by monitoring: storage", "run-9") == kept  # said once

# --- races: compare-and-set --------------------------------------------------------------------


def _race(jobs: list) -> tuple[list, list[Exception]]:
    """Run every job at once (a barrier lines the threads up); collect results and errors."""
    barrier = threading.Barrier(len(jobs))
    results: list = []
    errors: list[Exception] = []
    lock = threading.Lock()

    def run(job) -> None:
        barrier.wait()
        try:
            out = job()
        except StateError as exc:
            with lock:
                errors.append(exc)
        else:
            with lock:
                results.append(out)

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


@pytest.mark.parametrize("round_", range(10))
def test_conflicting_transitions_from_two_threads_exactly_one_wins(db_url: str, round_: int) -> None:
    # one engine per thread: the same as two processes sharing the database
    engines = [open_engine(db_url) for _ in range(2)]
    try:
        a, b = (HostStateStore(e) for e in engines)
        a.transition("hv01", S.CORDONED, "setup")
        results, errors = _race([
            lambda: a.transition("hv01", S.DRAINING, "run A drains", "run-A"),
            lambda: b.transition("hv01", S.ACTIVE, "run B uncordons", "run-B"),
        ])
        assert len(results) == 1 and len(errors) == 1
        winner = results[0]
        assert a.state("hv01") == winner.state
        # the loser was judged against the winner's state, and says so
        assert f"from {winner.state.value}" in str(errors[0])
        assert [h.state for h in a.history("hv01")] == [S.CORDONED, winner.state]
    finally:
        for e in engines:
            e.dispose()


def test_same_transition_from_eight_threads_is_written_once(db_url: str) -> None:
    engines = [open_engine(db_url) for _ in range(8)]
    try:
        stores = [HostStateStore(e) for e in engines]
        results, errors = _race([
            (lambda s=s, i=i: s.transition("hv02", S.CORDONED, f"cordon by run {i}", f"run-{i}"))
            for i, s in enumerate(stores)
        ])
        assert errors == []
        assert len({r.run_id for r in results}) == 1  # everyone sees the one winner's record
        assert len(stores[0].history("hv02")) == 1
    finally:
        for e in engines:
            e.dispose()


def test_compare_and_set_refuses_a_write_based_on_a_stale_read(engine: sa.Engine, store: HostStateStore,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """What PostgreSQL can do and SQLite's write lock prevents: state changed between read and write."""
    put(engine, "hv01", S.DRAINING)
    real_read = store._read
    reads = []

    def stale_first(conn: sa.Connection, host: str, for_update: bool = False) -> tuple[HostRecord, bool]:
        record, exists = real_read(conn, host, for_update)
        reads.append(record.state)
        if len(reads) == 1:  # what another writer saw a moment ago
            record = HostRecord(**{**record.__dict__, "state": S.CORDONED})
        return record, exists

    monkeypatch.setattr(store, "_read", stale_first)
    with pytest.raises(StateError, match="hv01: cannot go from draining to active"):
        store.transition("hv01", S.ACTIVE, "uncordon, judged on a stale read")
    assert reads == [S.DRAINING, S.DRAINING]  # retried with a fresh read
    assert store.state("hv01") == S.DRAINING
    assert store.history("hv01") == []


# --- window progress and VM origins ------------------------------------------------------------


def test_patched_in_round_trip(store: HostStateStore) -> None:
    assert store.patched_in("2026-11-w48") == set()
    store.mark_patched("2026-11-w48", "hv01", "run-1")
    store.mark_patched("2026-11-w48", "hv02", "run-1")
    store.mark_patched("2026-11-w48", "hv01", "run-2")  # a re-run marks it again: no error, no duplicate
    store.mark_patched("2026-12-w01", "hv03")
    assert store.patched_in("2026-11-w48") == {"hv01", "hv02"}
    assert store.patched_in("2026-12-w01") == {"hv03"}


def test_origins_round_trip_and_keep_the_first(store: HostStateStore) -> None:
    store.record_origin("web1", "hv01", "run-1")
    store.record_origin("web2", "hv01", "run-1")
    store.record_origin("db1", "hv02", "run-1")
    store.record_origin("web1", "hv03", "run-1")  # moved again: home is still hv01
    assert store.origins() == {"web1": "hv01", "web2": "hv01", "db1": "hv02"}
    assert store.origins("hv01") == {"web1": "hv01", "web2": "hv01"}
    assert store.origins("hv03") == {}
    store.clear_origin("web1")
    store.clear_origin("never-recorded")
    assert store.origins("hv01") == {"web2": "hv01"}
    store.record_origin("web1", "hv03")  # after clearing, a new origin is taken
    assert store.origins()["web1"] == "hv03"


# --- persistence and the database -----------------------------------------------------------------


def test_state_survives_a_new_engine_on_the_same_database(db_url: str) -> None:
    first = open_engine(db_url)
    s1 = HostStateStore(first)
    s1.begin_maintenance("hv01", "run-1", "patch")
    s1.transition("hv01", S.DRAINING, "drain", "run-1")
    s1.mark_patched("w1", "hv00")
    s1.record_origin("vm1", "hv01")
    first.dispose()

    second = open_engine(db_url)
    try:
        s2 = HostStateStore(second)
        rec = s2.get("hv01")
        assert (rec.state, rec.prior_state, rec.run_id) == (S.DRAINING, S.ACTIVE, "run-1")
        assert rec.since.tzinfo is not None
        assert [h.state for h in s2.history("hv01")] == [S.CORDONED, S.DRAINING]
        assert set(s2.all()) == {"hv01"}
        assert s2.patched_in("w1") == {"hv00"}
        assert s2.origins() == {"vm1": "hv01"}
        with pytest.raises(StateError):
            s2.transition("hv01", S.ACTIVE, "the rules hold after a restart too")
    finally:
        second.dispose()


def test_a_fresh_database_opened_by_six_engines_at_once(db_url: str) -> None:
    """Workers starting together on a new database: every one gets the schema, none fails creating it."""
    barrier = threading.Barrier(6)
    engines: list[sa.Engine] = []
    failures: list[BaseException] = []

    def open_one() -> None:
        barrier.wait()
        try:
            engines.append(open_engine(db_url))
        except BaseException as exc:  # collected and asserted below
            failures.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    try:
        assert failures == []
        HostStateStore(engines[0]).transition("hv01", S.CORDONED, "the schema is there")
        assert HostStateStore(engines[-1]).state("hv01") == S.CORDONED
    finally:
        for e in engines:
            e.dispose()


def test_sqlite_file_uses_wal_and_a_busy_timeout(db_path: Path) -> None:
    engine = open_engine(str(db_path))
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
    finally:
        engine.dispose()


def test_database_url_choices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOSTMAINT_DB", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    default = database_url()
    assert default == f"sqlite:///{tmp_path}/home/.local/share/hostmaint/hostmaint.db"
    assert (tmp_path / "home/.local/share/hostmaint").is_dir()

    monkeypatch.setenv("HOSTMAINT_DB", str(tmp_path / "env" / "x.db"))
    assert database_url() == f"sqlite:///{tmp_path}/env/x.db"
    assert (tmp_path / "env").is_dir()

    monkeypatch.setenv("HOSTMAINT_DB", "postgresql+psycopg://hm@localhost/hm")
    assert database_url() == "postgresql+psycopg://hm@localhost/hm"
    assert database_url("sqlite:///:memory:") == "sqlite:///:memory:"  # explicit wins over the env


def test_in_memory_database_is_shared_across_connections() -> None:
    eng = open_engine("sqlite://")
    try:
        s = HostStateStore(eng)
        s.transition("hv01", S.CORDONED, "cordon")
        assert HostStateStore(eng).state("hv01") == S.CORDONED
    finally:
        eng.dispose()


# --- what drains saw of the links ---------------------------------------------------------------


def test_link_observations_come_back_newest_first_per_host(store: HostStateStore) -> None:
    from hostmaint.migration.links import LinkObservation, estimate_link

    store.record_links([LinkObservation("hv1", 110.0, 1200.0, 2), LinkObservation("hv2", 900.0, 600.0, 1)], "run-1")
    store.record_links([LinkObservation("hv1", 130.0, 1200.0, 2)], "run-2")
    store.record_links([], "run-3")  # a drain that saw nothing countable writes nothing
    assert [o.peak_mib_s for o in store.link_observations("hv1")] == [130.0, 110.0]
    assert store.link_observations("hv2") == [LinkObservation("hv2", 900.0, 600.0, 1)]
    assert store.link_observations("hv3") == []
    assert [o.peak_mib_s for o in store.link_observations("hv1", limit=1)] == [130.0]
    figure = estimate_link(store.link_observations("hv1"), 1100.0)
    assert figure is not None and (figure.basis, figure.mib_s) == ("measured", 120.0)
