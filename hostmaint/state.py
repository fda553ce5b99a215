"""The host state machine, persisted.

The way through maintenance, and the ways out of it::

    active -> cordoned -> draining -> drained -> patching -> rebooting -> verifying -> active
                                                  (patching and rebooting are optional after drained)
    back out:   cordoned -> active;  draining | drained | patching | verifying -> cordoned;  drained -> active
    retry:      drained -> draining (a resumed drain);  verifying -> drained
    give up:    any maintenance state except active -> failed;  failed -> cordoned (operator recovery)

Every transition is checked against :data:`TRANSITIONS`; anything else raises
:class:`~hostmaint.errors.StateError` naming the host, from and to. Moving to the state a
host is already in is "already there": no new record, no error (cordon is idempotent).

Writes are compare-and-set on the current state inside one write transaction, so two
writers racing on one host cannot both win: the second one sees the first one's result
and is judged against it.

``prior_state`` is the state a host had when its maintenance began (kured's habit): a host an
operator had cordoned is cordoned again afterwards, not made active. It is set by
:meth:`HostStateStore.begin_maintenance` and cleared when the host reaches that state again
(or ``active``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from hostmaint.db import (
    Clock,
    host_history_table,
    host_state_table,
    link_observation_table,
    switchover_table,
    utcnow,
    vm_origin_table,
    vm_stopped_table,
    window_progress_table,
    write_transaction,
)
from hostmaint.errors import StateError
from hostmaint.migration.links import RECENT, LinkObservation
from hostmaint.models import HostState

S = HostState

TRANSITIONS: dict[HostState, frozenset[HostState]] = {
    S.ACTIVE: frozenset({S.CORDONED}),
    S.CORDONED: frozenset({S.DRAINING, S.ACTIVE, S.FAILED}),
    S.DRAINING: frozenset({S.DRAINED, S.CORDONED, S.FAILED}),
    # drained -> draining: a resumed drain
    S.DRAINED: frozenset({S.PATCHING, S.REBOOTING, S.VERIFYING, S.CORDONED, S.ACTIVE, S.FAILED, S.DRAINING}),
    S.PATCHING: frozenset({S.REBOOTING, S.VERIFYING, S.FAILED, S.CORDONED}),
    S.REBOOTING: frozenset({S.VERIFYING, S.FAILED}),
    S.VERIFYING: frozenset({S.ACTIVE, S.CORDONED, S.FAILED, S.DRAINED}),
    S.FAILED: frozenset({S.CORDONED}),  # operator recovery
}
"""Allowed moves: state -> the states it may go to next (besides staying where it is)."""

MAINTENANCE_STATES = frozenset({S.DRAINING, S.DRAINED, S.PATCHING, S.REBOOTING, S.VERIFYING})

NEVER_SEEN = datetime(1970, 1, 1, tzinfo=UTC)
_ATTEMPTS = 5  # compare-and-set retries; only PostgreSQL ever needs more than one


@dataclass(frozen=True)
class HostRecord:
    """A host's state, why it is there, since when, which run put it there, and its pre-maintenance state."""

    host: str
    state: HostState
    reason: str
    since: datetime
    run_id: str | None
    prior_state: HostState | None  # the state before this maintenance began: restore exactly that


def check_transition(host: str, current: HostState, to: HostState) -> None:
    """Raise :class:`StateError` unless ``current -> to`` is allowed (staying put is allowed)."""
    if current == to or to in TRANSITIONS[current]:
        return
    allowed = ", ".join(sorted(TRANSITIONS[current]))
    raise StateError(f"host {host}: cannot go from {current} to {to}"
                     f" (from {current} it may go to: {allowed})")


T = TypeVar("T")
_Change = Callable[[Connection, "HostRecord", bool], "HostRecord"]


class _Conflict(Exception):
    """Another writer changed the row between our read and our write (PostgreSQL only)."""


class HostStateStore:
    """Host states, their history, window progress and VM origins, in the hostmaint database."""

    def __init__(self, engine: Engine, clock: Clock = utcnow) -> None:
        self._engine = engine
        self._clock = clock

    # --- reading ---------------------------------------------------------------

    def get(self, host: str) -> HostRecord:
        """The host's current record; a host never seen is ``active`` with reason "never seen"."""
        with self._engine.connect() as conn:
            return self._read(conn, host)[0]

    def state(self, host: str) -> HostState:
        """The host's current state."""
        return self.get(host).state

    def history(self, host: str) -> list[HostRecord]:
        """Every state the host entered, oldest first."""
        t = host_history_table
        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(t).where(t.c.host == host).order_by(t.c.id)).all()
        return [_record(r) for r in rows]

    def reason_before_maintenance(self, host: str) -> str | None:
        """Why ``host`` was out of service when its current maintenance began (the reason of its last
        record outside any maintenance, if it was cordoned then); None if it was in service.

        A maintenance that leaves the host cordoned as it found it gives it back this reason: an
        incident's "degraded: ..." must not become "maintenance finished" for whoever clears it."""
        for record in reversed(self.history(host)):
            if record.prior_state is None:
                return record.reason if record.state == S.CORDONED else None
        return None

    def maintenance_began(self, host: str) -> datetime | None:
        """When ``host``'s current maintenance began (its first record since it was last out of
        maintenance); None outside maintenance."""
        began: datetime | None = None
        for record in reversed(self.history(host)):
            if record.prior_state is None:
                break
            began = record.since
        return began

    def reached_in_maintenance(self, host: str) -> list[HostState]:
        """The states ``host`` has been in since its current maintenance began, in order, each once
        (empty outside maintenance)."""
        seen: list[HostState] = []
        for record in reversed(self.history(host)):
            if record.prior_state is None:
                break
            if record.state not in seen:
                seen.append(record.state)
        return seen[::-1]

    def all(self) -> dict[str, HostRecord]:
        """Every host ever seen, by name."""
        t = host_state_table
        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(t).order_by(t.c.host)).all()
        return {r.host: _record(r) for r in rows}

    # --- changing --------------------------------------------------------------

    def transition(self, host: str, to: HostState, reason: str, run_id: str | None = None) -> HostRecord:
        """Move ``host`` to ``to``; raise :class:`StateError` if the state machine forbids it.

        Already in ``to``: returns the current record and writes nothing. Reaching the
        host's ``prior_state`` (or ``active``) ends its maintenance and clears ``prior_state``.
        """
        to = HostState(to)

        def move(conn: Connection, current: HostRecord, exists: bool) -> HostRecord:
            if current.state == to:
                return current
            check_transition(host, current.state, to)
            prior = current.prior_state
            if to == S.ACTIVE or to == prior:
                prior = None
            return self._write(conn, current, exists, to, reason, run_id, prior)

        return self._atomically(host, move)

    def begin_maintenance(self, host: str, run_id: str | None, reason: str) -> HostRecord:
        """Take ``host`` into maintenance: remember the state it is in now, and cordon it.

        ``active`` -> ``cordoned`` with prior state ``active``. Already ``cordoned`` (by an
        operator) -> stays cordoned with prior state ``cordoned``, so it is left cordoned
        afterwards. A host already mid-maintenance (a resumed run) keeps its state and
        prior state and is taken over by ``run_id``. A ``failed`` host is refused: an
        operator recovers it first (``failed -> cordoned``).
        """

        def begin(conn: Connection, current: HostRecord, exists: bool) -> HostRecord:
            if current.state == S.ACTIVE:
                return self._write(conn, current, exists, S.CORDONED, reason, run_id, S.ACTIVE)
            if current.state == S.CORDONED:
                prior = current.prior_state or S.CORDONED  # an unfinished maintenance keeps its prior
                if current.prior_state == prior and current.run_id == run_id:
                    return current
                return self._write(conn, current, exists, S.CORDONED, reason, run_id, prior)
            if current.state in MAINTENANCE_STATES:
                if current.run_id == run_id:
                    return current
                return self._write(conn, current, exists, current.state,
                                   f"maintenance resumed: {reason}", run_id, current.prior_state)
            raise StateError(f"host {host}: cannot go from {current.state} to {S.CORDONED} to begin"
                             " maintenance (a failed host needs an operator: transition it failed -> cordoned"
                             " first)")

        return self._atomically(host, begin)

    def set_aside(self, host: str, reason: str, run_id: str | None = None) -> HostRecord:
        """Leave ``host`` cordoned outside any maintenance, as an operator's cordon is: no prior
        state is kept, so no later run puts it back into service; only an operator does
        (:meth:`return_to_service`). For an operator's cordon, and an incident that takes a host out.

        From ``active``, ``cordoned`` (an unfinished maintenance is ended here) or ``drained`` (an
        evacuation's end); any other state is mid-maintenance or failed and raises StateError."""

        def aside(conn: Connection, current: HostRecord, exists: bool) -> HostRecord:
            if current.state not in (S.ACTIVE, S.CORDONED, S.DRAINED):
                raise StateError(f"host {host} is {current.state}: only an active, cordoned or drained host is "
                                 "set aside (a host in maintenance finishes it; a failed one is reset first)")
            if current.state == S.CORDONED and current.prior_state is None and current.reason == reason:
                return current
            return self._write(conn, current, exists, S.CORDONED, reason, run_id, None)

        return self._atomically(host, aside)

    def keep_out(self, host: str, reason: str, run_id: str | None = None) -> HostRecord:
        """Leave ``host`` cordoned, its maintenance unfinished, with ``reason`` saying why: the work
        cannot go on, and the host may not go back into service until a run verifies it.

        Unlike :meth:`set_aside` the state before maintenance is kept, so the run that finishes the
        maintenance later restores it. From ``cordoned`` (a new reason is written even when the state
        stays) or any state that may back out to it (draining, drained, patching, verifying). A
        ``rebooting`` host cannot back out (its reboot may be under way): it stays rebooting with the
        reason, and the run that finishes it proves the reboot first."""

        def out(conn: Connection, current: HostRecord, exists: bool) -> HostRecord:
            if current.state in (S.CORDONED, S.REBOOTING) and current.reason == reason:
                return current
            if current.state == S.REBOOTING:
                return self._write(conn, current, exists, S.REBOOTING, reason, run_id, current.prior_state)
            if current.state != S.CORDONED:
                check_transition(host, current.state, S.CORDONED)
            # cordoned with no maintenance open is an operator's (or an incident's) cordon: where it goes back to
            prior = current.prior_state or (S.CORDONED if current.state == S.CORDONED else S.ACTIVE)
            return self._write(conn, current, exists, S.CORDONED, reason, run_id, prior)

        return self._atomically(host, out)

    def note(self, host: str, reason: str, run_id: str | None = None) -> HostRecord:
        """Say why ``host`` is where it is, staying there (a recorded change of reason, no transition):
        for what a run learns about a host without moving it, such as an update whose outcome is unknown."""

        def say(conn: Connection, current: HostRecord, exists: bool) -> HostRecord:
            if current.reason == reason:
                return current
            return self._write(conn, current, exists, current.state, reason, run_id, current.prior_state)

        return self._atomically(host, say)

    def return_to_service(self, host: str, reason: str, run_id: str | None = None) -> HostRecord:
        """An operator's uncordon: ``cordoned`` outside maintenance -> ``active``. A host cordoned by a
        maintenance that has not finished (it has a prior state), or in any other state, raises
        StateError naming it: that run finishes it, or an operator resets a failed host first."""

        def back(conn: Connection, current: HostRecord, exists: bool) -> HostRecord:
            if current.state == S.ACTIVE:
                return current
            if current.state != S.CORDONED or current.prior_state is not None:
                why = ("it is failed: reset it first" if current.state == S.FAILED else
                       f"an evacuation left it drained; 'hostmaint host return {host}' (or the return-host "
                       "deployment) verifies it, puts it back and returns its VMs" if current.state == S.DRAINED
                       else "a maintenance holds it (run it again to finish)")
                raise StateError(f"host {host} is {current.state}"
                                 f"{' (in maintenance)' if current.prior_state else ''}: {why}")
            return self._write(conn, current, exists, S.ACTIVE, reason, run_id, None)

        return self._atomically(host, back)

    # --- window progress -------------------------------------------------------

    def mark_patched(self, window_id: str, host: str, run_id: str | None = None) -> None:
        """Remember that ``host`` was patched in window ``window_id`` (idempotent)."""
        t = window_progress_table

        def mark(conn: Connection) -> None:
            query = sa.select(t.c.host).where(t.c.window_id == window_id, t.c.host == host)
            if conn.execute(query).first() is None:
                conn.execute(sa.insert(t).values(window_id=window_id, host=host, run_id=run_id,
                                                 patched_at=self._clock()))

        self._retry(mark)

    def patched_in(self, window_id: str) -> set[str]:
        """Hosts already patched in window ``window_id``."""
        t = window_progress_table
        with self._engine.connect() as conn:
            return set(conn.execute(sa.select(t.c.host).where(t.c.window_id == window_id)).scalars())

    # --- VM origins --------------------------------------------------------------

    def record_origin(self, vm: str, origin: str, run_id: str | None = None) -> None:
        """Remember that ``vm`` lived on ``origin``; an origin already recorded is kept (the first one wins).

        A VM moved twice in one maintenance must still go home to where it started.
        """
        t = vm_origin_table

        def record(conn: Connection) -> None:
            if conn.execute(sa.select(t.c.vm).where(t.c.vm == vm)).first() is None:
                conn.execute(sa.insert(t).values(vm=vm, origin=origin, run_id=run_id,
                                                 recorded_at=self._clock()))

        self._retry(record)

    def origins(self, origin_host: str | None = None) -> dict[str, str]:
        """VM -> origin host, for every recorded VM or only those that came from ``origin_host``."""
        t = vm_origin_table
        query = sa.select(t.c.vm, t.c.origin).order_by(t.c.vm)
        if origin_host is not None:
            query = query.where(t.c.origin == origin_host)
        with self._engine.connect() as conn:
            return {r.vm: r.origin for r in conn.execute(query)}

    def origin_records(self, origin_host: str) -> list[tuple[str, str | None, datetime]]:
        """(vm, the run that recorded it, when) for every VM whose recorded origin is ``origin_host``."""
        t = vm_origin_table
        query = sa.select(t.c.vm, t.c.run_id, t.c.recorded_at).where(t.c.origin == origin_host).order_by(t.c.vm)
        with self._engine.connect() as conn:
            return [(r.vm, r.run_id, r.recorded_at) for r in conn.execute(query)]

    def clear_origin(self, vm: str) -> None:
        """Forget ``vm``'s origin (it is home again); nothing happens if none was recorded."""
        t = vm_origin_table
        with write_transaction(self._engine) as conn:
            conn.execute(sa.delete(t).where(t.c.vm == vm))

    # --- VMs stopped by maintenance -------------------------------------------------

    def record_stopped(self, vm: str, host: str, run_id: str | None = None) -> None:
        """Remember that maintenance is about to shut ``vm`` down on ``host`` (idempotent)."""
        t = vm_stopped_table

        def record(conn: Connection) -> None:
            if conn.execute(sa.select(t.c.vm).where(t.c.vm == vm)).first() is None:
                conn.execute(sa.insert(t).values(vm=vm, host=host, run_id=run_id, recorded_at=self._clock()))

        self._retry(record)

    def stopped_on(self, host: str) -> list[str]:
        """The VMs maintenance shut down on ``host`` and has not started again."""
        t = vm_stopped_table
        with self._engine.connect() as conn:
            return [r.vm for r in conn.execute(sa.select(t.c.vm).where(t.c.host == host).order_by(t.c.vm))]

    def stopped(self) -> dict[str, str]:
        """Every VM maintenance shut down and has not started again, with the host it was on."""
        t = vm_stopped_table
        with self._engine.connect() as conn:
            return {r.vm: r.host for r in conn.execute(sa.select(t.c.vm, t.c.host).order_by(t.c.vm))}

    def clear_stopped(self, vm: str) -> None:
        """``vm`` runs again (or never was stopped): forget it."""
        t = vm_stopped_table
        with write_transaction(self._engine) as conn:
            conn.execute(sa.delete(t).where(t.c.vm == vm))

    # --- what drains saw of the links ----------------------------------------------

    def record_links(self, observations: Sequence[LinkObservation], run_id: str | None = None) -> None:
        """Keep what a drain saw of its sources' links, for the next drains' link estimates."""
        if not observations:
            return
        t = link_observation_table
        with write_transaction(self._engine) as conn:
            conn.execute(sa.insert(t), [dict(host=o.host, peak_mib_s=o.peak_mib_s, demand_mib_s=o.demand_mib_s,
                                             streams=o.streams, run_id=run_id, recorded_at=self._clock())
                                        for o in observations])

    def link_observations(self, host: str, limit: int = RECENT) -> list[LinkObservation]:
        """``host``'s most recent link observations, newest first."""
        t = link_observation_table
        query = sa.select(t).where(t.c.host == host).order_by(t.c.id.desc()).limit(limit)
        with self._engine.connect() as conn:
            return [LinkObservation(r.host, r.peak_mib_s, r.demand_mib_s, r.streams) for r in conn.execute(query)]

    # --- what drains learned of the switch-over -------------------------------------

    def record_switchover(self, cluster: str, reserve_ms: float | None, run_id: str | None = None) -> None:
        """Keep what a drain of ``cluster`` learned of the switch-over: the reserve it raised to, or None
        when no pause outgrew the limit (which, counted among the recent drains, lets an old figure go)."""
        t = switchover_table
        with write_transaction(self._engine) as conn:
            conn.execute(sa.insert(t).values(cluster=cluster, reserve_ms=reserve_ms, run_id=run_id,
                                             recorded_at=self._clock()))

    def switchover_reserves(self, cluster: str, limit: int) -> list[float | None]:
        """What the ``limit`` most recent drains of ``cluster`` learned of the switch-over, newest first."""
        t = switchover_table
        query = sa.select(t.c.reserve_ms).where(t.c.cluster == cluster).order_by(t.c.id.desc()).limit(limit)
        with self._engine.connect() as conn:
            return [r.reserve_ms for r in conn.execute(query)]

    # --- internals ---------------------------------------------------------------

    def _read(self, conn: Connection, host: str, for_update: bool = False) -> tuple[HostRecord, bool]:
        """The host's record, and whether a row exists for it."""
        t = host_state_table
        query = sa.select(t).where(t.c.host == host)
        if for_update:
            query = query.with_for_update()  # a row lock on PostgreSQL; SQLite holds the write lock already
        row = conn.execute(query).first()
        if row is None:
            return HostRecord(host=host, state=S.ACTIVE, reason="never seen", since=NEVER_SEEN,
                              run_id=None, prior_state=None), False
        return _record(row), True

    def _atomically(self, host: str, change: _Change) -> HostRecord:
        """Read the host's record and apply ``change`` to it in one write transaction, retrying lost races."""

        def attempt(conn: Connection) -> HostRecord:
            current, exists = self._read(conn, host, for_update=True)
            return change(conn, current, exists)

        return self._retry(attempt)

    def _retry(self, work: Callable[[Connection], T]) -> T:
        for attempt in range(_ATTEMPTS):
            try:
                with write_transaction(self._engine) as conn:
                    return work(conn)
            except (_Conflict, IntegrityError):
                # another writer got there first: read again and judge against what it wrote
                if attempt == _ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _write(self, conn: Connection, current: HostRecord, exists: bool, to: HostState, reason: str,
               run_id: str | None, prior: HostState | None) -> HostRecord:
        now = self._clock()
        values = dict(state=to.value, reason=reason, since=now, run_id=run_id,
                      prior_state=prior.value if prior else None)
        t = host_state_table
        if exists:
            # compare-and-set: only if nobody changed the state since we read it
            cas = sa.update(t).where(t.c.host == current.host, t.c.state == current.state.value)
            result = conn.execute(cas.values(**values))
            if result.rowcount != 1:
                raise _Conflict(current.host)
        else:
            conn.execute(sa.insert(t).values(host=current.host, **values))  # IntegrityError if we lost a race
        conn.execute(sa.insert(host_history_table).values(host=current.host, **values))
        return HostRecord(host=current.host, state=to, reason=reason, since=now, run_id=run_id,
                          prior_state=prior)


def _record(row: sa.Row) -> HostRecord:
    return HostRecord(host=row.host, state=HostState(row.state), reason=row.reason, since=row.since,
                      run_id=row.run_id, prior_state=HostState(row.prior_state) if row.prior_state else None)
