"""Cluster-wide locks: Prefect global concurrency limits, always strict (a missing limit stops the run).

The limits of an inventory, created by :func:`ensure_limits` (``hostmaint setup``)::

    host:<name>            1                           one maintenance of a host at a time
    inbound:<name>         1                           one drain sending VMs to a host at a time
    maintenance:<cluster>  limits.max_hosts_in_maintenance   hosts of a cluster in maintenance at once
    migrations:<cluster>   limits.migrations_per_cluster     live migrations of a cluster at once

Drains of one cluster run side by side (:func:`drain_slots`): each holds its targets' ``inbound:``
and a share of ``migrations:<cluster>``. Returning VMs and rebalancing hold all of the latter
(:func:`cluster_migrations`), so they run alone.

A limit that does not exist is an error (:class:`~hostmaint.errors.LockError`),
never a warning: Prefect's ``concurrency(strict=False)`` would log and run unlocked,
and even its ``strict=True`` only checks that *some* of a list exist. So hostmaint asks
the server itself (:func:`_acquire`): every name must come back granted, or the slots
are given back and the run stops. An inactive limit (switched off in the UI) is refused
the same way: the server grants it without counting the slot, so it would exclude nobody.
``host:`` and ``maintenance:`` are taken in one request when both are free (all or
nothing, on the server); when one is held they are taken one at a time in a fixed
order (host, then cluster), which keeps two runs from each holding what the other
waits for. A server too busy to answer (SQLite: 503) is asked again within 50 ms–1 s
rather than Prefect's client's ~2 s.

Locks are re-entrant within a run: a runbook holding ``host:hv01`` may call the
evacuate-host flow for hv01 as a subflow without waiting on itself.

Slots are leased: a process that dies stops renewing, and the server frees the slot
when the lease runs out (``$HOSTMAINT_LOCK_LEASE_SECONDS``, default 120, minimum 60),
so a dead machine does not hold a host forever. The lease store must survive a
server restart (``PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE``, see docs/deployments.md).
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection, Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote
from uuid import UUID

import httpx
from prefect import runtime
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.client.schemas.responses import ConcurrencyLimitWithLeaseResponse, GlobalConcurrencyLimitResponse
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL

from hostmaint.errors import LockError, LockHeldError
from hostmaint.inventory import Inventory, load_inventory
from tasks.prefect_private import announce_acquired, announce_released, hold_lease, send_once, send_through_prefect

LEASE_ENV = "HOSTMAINT_LOCK_LEASE_SECONDS"
DEFAULT_LEASE_SECONDS = 120.0
MIN_LEASE_SECONDS = 60.0  # the Prefect server refuses shorter leases

_held: ContextVar[frozenset[str]] = ContextVar("hostmaint_held_locks", default=frozenset())


def host_limit(host: str) -> str:
    return f"host:{host}"


def inbound_limit(host: str) -> str:
    return f"inbound:{host}"


def maintenance_limit(cluster: str) -> str:
    return f"maintenance:{cluster}"


def migrations_limit(cluster: str) -> str:
    return f"migrations:{cluster}"


@dataclass(frozen=True)
class LimitSpec:
    """One global concurrency limit the inventory asks for."""

    name: str
    limit: int


@dataclass(frozen=True)
class LimitChange:
    """What :func:`ensure_limits` did to one limit: created, updated (old -> new) or unchanged."""

    name: str
    limit: int
    action: str  # "created" | "updated" | "unchanged"
    previous: int | None = None


def limit_specs(inventory: Inventory) -> list[LimitSpec]:
    """Every limit the inventory needs, hosts first, in inventory order."""
    specs = [LimitSpec(host_limit(h.name), 1) for h in inventory.hosts]
    specs += [LimitSpec(inbound_limit(h.name), 1) for h in inventory.hosts]
    for c in inventory.clusters:
        specs.append(LimitSpec(maintenance_limit(c.name), c.limits.max_hosts_in_maintenance))
        specs.append(LimitSpec(migrations_limit(c.name), c.limits.migrations_per_cluster))
    return specs


def ensure_limits(inventory: str | Path | Inventory) -> list[LimitChange]:
    """Create (or correct) every limit of ``inventory`` on the Prefect server; safe to run again.

    A limit whose size changed in the inventory is updated in place; slots held
    right now stay held. Limits of hosts no longer in the inventory are left alone
    (a run may still hold one); remove them in the UI when you are sure.
    """
    inv = inventory if isinstance(inventory, Inventory) else load_inventory(inventory)
    changes = []
    with get_client(sync_client=True) as client:
        for spec in limit_specs(inv):
            try:
                existing = client.read_global_concurrency_limit_by_name(spec.name)
            except ObjectNotFound:
                existing = None
            if existing is None:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=spec.name,
                                                                                     limit=spec.limit))
                changes.append(LimitChange(spec.name, spec.limit, "created"))
            elif existing.limit != spec.limit or not existing.active:
                client.update_global_concurrency_limit(
                    spec.name, GlobalConcurrencyLimitUpdate(limit=spec.limit, active=True))
                changes.append(LimitChange(spec.name, spec.limit, "updated", existing.limit))
            else:
                changes.append(LimitChange(spec.name, spec.limit, "unchanged", existing.limit))
    return changes


def lease_seconds() -> float:
    """How long a slot outlives a process that stopped renewing it (``$HOSTMAINT_LOCK_LEASE_SECONDS``)."""
    raw = os.environ.get(LEASE_ENV)
    if raw is None:
        return DEFAULT_LEASE_SECONDS
    try:
        value = float(raw)
    except ValueError:
        raise LockError(f"${LEASE_ENV}={raw!r}: not a number of seconds") from None
    return max(MIN_LEASE_SECONDS, value)


def _holder() -> ConcurrencyLeaseHolder | None:
    run_id = runtime.flow_run.id
    return ConcurrencyLeaseHolder(type="flow_run", id=run_id) if run_id else None


# A Prefect server on SQLite answers 503 when its database is busy (its own event writers hold the
# write lock). Prefect's client then sleeps ~2 s before asking again — and sleeps even when told not
# to retry. Taking or giving back a lock is one short write, so hostmaint sends those requests itself,
# once each, and asks again after these waits (the last one repeating).
BUSY_RETRY_SECONDS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.0)
BUSY_ATTEMPTS = 40  # ~30 s of a busy or unreachable server, then LockError
RETRYABLE_STATUS = frozenset({408, 429, 502, 503})
MAX_POLL_SECONDS = 2.0  # a held lock is asked for again at most this long after (the server suggests longer)


def _busy_wait(attempt: int) -> float:
    return BUSY_RETRY_SECONDS[min(attempt, len(BUSY_RETRY_SECONDS) - 1)]


NO_SERVER = ("no Prefect server is configured (PREFECT_API_URL is not set), and the temporary one Prefect starts "
             "without it holds none of hostmaint's locks: start a server with 'hostmaint server' (or use yours), "
             "export PREFECT_API_URL=http://127.0.0.1:4200/api and run 'hostmaint setup --inventory INVENTORY' once")


def _missing(name: str, detail: str) -> LockError:
    if not PREFECT_API_URL.value():
        return LockError(f"lock {name!r}: {NO_SERVER}; refusing to run unlocked, nothing was changed")
    return LockError(f"lock {name!r} is missing on the Prefect server {PREFECT_API_URL.value()}: refusing to "
                     f"run unlocked, nothing was changed. Create the limits with 'hostmaint setup "
                     f"--inventory INVENTORY' (flows.locks.ensure_limits). ({detail})")


def _inactive(name: str) -> LockError:
    return LockError(f"lock {name!r} is inactive on the Prefect server {PREFECT_API_URL.value()}: an inactive "
                     f"limit lets every run through, so hostmaint refuses to run unlocked; nothing was changed. "
                     f"Re-activate it with 'hostmaint setup --inventory INVENTORY' or in the Prefect UI "
                     f"(Concurrency, the limit's Active toggle).")


def _is_active(client: SyncPrefectClient, name: str) -> bool:
    """Whether the server counts slots of limit ``name``; a busy server is asked again soon (as in _acquire)."""
    path = f"/v2/concurrency_limits/{quote(name, safe=':')}"
    busy = 0
    while True:
        try:
            response = send_once(client, "GET", path)
        except httpx.TransportError as exc:
            if busy >= BUSY_ATTEMPTS:
                raise LockError(f"the Prefect server {PREFECT_API_URL.value()} cannot be reached to read the "
                                f"lock {name!r} ({exc}); nothing was changed") from exc
        else:
            status = response.status_code
            if status == 200:
                return bool(GlobalConcurrencyLimitResponse.model_validate(response.json()).active)
            if status == 404:  # removed since it was granted
                raise _missing(name, f"the server has no limit named {name!r}")
            if status not in RETRYABLE_STATUS or busy >= BUSY_ATTEMPTS:
                raise LockError(f"the Prefect server {PREFECT_API_URL.value()} refused to read the lock "
                                f"{name!r} ({status}: {response.text[:200]}); nothing was changed")
        time.sleep(_busy_wait(busy))
        busy += 1


def _refuse_inactive(client: SyncPrefectClient, names: list[str],
                     lease: ConcurrencyLimitWithLeaseResponse) -> None:
    """Give ``lease`` back and raise LockError if one of ``names`` is inactive.

    The server grants an inactive limit without counting the slot (it lists it in the reply all the
    same), so a run "holding" it excludes nobody: toggled off in the UI, two runs would hold one host.
    Asked after the grant, not before, so a limit switched off while this run waited is caught too.
    Giving the lease back leaves the inactive limit's count alone (the server decrements active ones only).
    """
    try:
        off = [name for name in names if not _is_active(client, name)]
    except BaseException:
        _release(lease.lease_id)
        raise
    if off:
        _release(lease.lease_id)
        raise _inactive(off[0])


def _post_once(client: SyncPrefectClient, path: str, body: dict[str, Any]) -> httpx.Response:
    """POST ``body`` to the Prefect API once: the Prefect client's base URL and auth, not its retry loop."""
    response = send_once(client, "POST", path, json=body)
    if response.status_code == 403:
        # CSRF protection is on: the Prefect client's own send adds the token (and retries as it does)
        response = send_through_prefect(client, "POST", path, json=body)
    return response


def _acquire(names: list[str], occupy: int, wait_seconds: float | None, why: str, *,
             only_if_free: bool = False) -> ConcurrencyLimitWithLeaseResponse | None:
    """Take ``occupy`` slots of every limit in ``names`` in one request: all of them or none.

    Strict: every name must exist and be active, else the slots granted are given back and LockError
    names the missing or inactive one (Prefect's own ``strict`` only asks that *some* of a list exist). Held by others:
    asked again after the server's Retry-After (at most :data:`MAX_POLL_SECONDS`) until
    ``wait_seconds`` is over, then LockHeldError; with ``only_if_free`` None at once instead.
    """
    deadline = None if wait_seconds is None else time.monotonic() + wait_seconds
    holder = _holder()
    body: dict[str, Any] = {"names": names, "slots": occupy, "mode": "concurrency",
                            "lease_duration": lease_seconds()}
    if holder is not None:
        body["holder"] = holder.model_dump(mode="json")
    busy = 0
    with get_client(sync_client=True) as client:
        while True:
            try:
                response = _post_once(client, "/v2/concurrency_limits/increment-with-lease", body)
            except httpx.TransportError as exc:
                if busy >= BUSY_ATTEMPTS:
                    raise LockError(f"the Prefect server {PREFECT_API_URL.value()} cannot be reached to take "
                                    f"the lock {names!r} ({exc}); nothing was changed") from exc
                delay, busy = _busy_wait(busy), busy + 1
            else:
                status = response.status_code
                if status == 200:
                    lease = ConcurrencyLimitWithLeaseResponse.model_validate(response.json())
                    granted = {limit.name for limit in lease.limits}
                    missing = [name for name in names if name not in granted]
                    if missing:
                        if lease.limits:
                            _release(lease.lease_id)
                        raise _missing(missing[0], f"the server has no limit named {missing[0]!r}")
                    _refuse_inactive(client, names, lease)
                    return lease
                if status == 423:
                    if only_if_free:
                        return None
                    if deadline is not None and time.monotonic() >= deadline:
                        label = repr(names[0]) if len(names) == 1 else ", ".join(map(repr, names))
                        raise LockHeldError(
                            f"lock {label} is held by another run{why}; waited {wait_seconds:g}s and gave up, "
                            "nothing was changed. Run again when that run has finished (Prefect UI: "
                            "Concurrency, and the host's state in 'hostmaint host status').")
                    delay = min(MAX_POLL_SECONDS, float(response.headers.get("Retry-After", 1.0)))
                elif status in RETRYABLE_STATUS and busy < BUSY_ATTEMPTS:
                    delay, busy = _busy_wait(busy), busy + 1
                else:
                    raise LockError(f"the Prefect server {PREFECT_API_URL.value()} refused the lock {names!r} "
                                    f"({status}: {response.text[:200]}); nothing was changed")
            if deadline is not None:
                delay = max(0.0, min(delay, deadline - time.monotonic()))
            time.sleep(delay)


def _release(lease_id: UUID) -> None:
    """Give the lease's slots back; a busy server is asked again soon, then with Prefect's own retries."""
    body = {"lease_id": str(lease_id)}
    with get_client(sync_client=True) as client:
        for attempt in range(len(BUSY_RETRY_SECONDS)):
            try:
                response = _post_once(client, "/v2/concurrency_limits/decrement-with-lease", body)
            except httpx.TransportError:
                pass
            else:
                if response.status_code not in RETRYABLE_STATUS:
                    response.raise_for_status()
                    return
            time.sleep(_busy_wait(attempt))
        # still busy: Prefect's own retries (~2 s apart); if even that fails the error is raised, and
        # the server frees the slots when the lease runs out (lease_seconds())
        client.release_concurrency_slots_with_lease(lease_id)


@contextmanager
def _holding(names: list[str], lease: ConcurrencyLimitWithLeaseResponse, occupy: int) -> Iterator[None]:
    """Keep ``lease`` renewed for the block (a failed renewal stops the run: strict), then give it back."""
    events = announce_acquired(lease.limits, occupy)
    token = _held.set(_held.get() | set(names))
    try:
        with hold_lease(lease.lease_id, lease_seconds()):
            yield
    finally:
        _held.reset(token)
        _release(lease.lease_id)
        announce_released(lease.limits, occupy, events)


@contextmanager
def hold(name: str, *, occupy: int = 1, wait_seconds: float | None = None, why: str = "") -> Iterator[None]:
    """Hold ``occupy`` slots of limit ``name`` for the block; strict: a missing limit raises LockError.

    ``wait_seconds``: give up after this long with a LockHeldError saying who to wait
    for (``None`` waits as long as it takes). Already held by this run: no-op.
    """
    if name in _held.get():
        yield
        return
    lease = _acquire([name], occupy, wait_seconds, why)
    assert lease is not None  # only None with only_if_free
    with _holding([name], lease, occupy):
        yield


def describe_holder(run_id: str | None) -> str:
    """Who is likely to hold a host's lock, for a LockHeldError: the run recorded on the host (the
    one that last changed its state; Prefect's API does not name a lock's holder), what Prefect says
    of it, and when its lease frees by itself if that run is dead."""
    lease = lease_seconds()
    if not run_id:
        return (f" A run that died holding it frees it by itself: its lease runs out at most {lease:g}s after "
                "its last renewal.")
    try:
        with get_client(sync_client=True) as client:
            flow_run = client.read_flow_run(UUID(run_id))
    except (ValueError, ObjectNotFound, httpx.HTTPError):
        return (f" The host's state was last changed by run {run_id}, which Prefect does not know; if it died "
                f"holding the lock, its lease runs out by itself at most {lease:g}s after its last renewal.")
    state = flow_run.state
    text = f" The host's state was last changed by run {run_id} ({flow_run.name})"
    if state is None:
        return text + f"; if it died holding the lock, its lease runs out at most {lease:g}s after its last renewal."
    text += f", which Prefect says is {state.name}"
    if state.is_final():
        ended = state.timestamp
        return (text + f" since {ended:%Y-%m-%d %H:%M:%S %Z}: a run that has ended renews no lease, so the lock "
                f"frees by itself by {ended + timedelta(seconds=lease):%H:%M:%S %Z} at the latest; run again then.")
    return (text + f". If its process died (killed, its machine lost), Prefect shows it {state.name} until its "
            f"zombie detection marks it crashed, and the lock frees by itself at most {lease:g}s after the process "
            "last renewed its lease; otherwise it is still working on the host.")


@contextmanager
def host_maintenance(host: str, cluster: str, *, wait_seconds: float | None = None,
                     holder: str | None = None) -> Iterator[None]:
    """Hold ``host:<host>``, one slot of ``maintenance:<cluster>`` and ``inbound:<host>`` for a host's
    whole maintenance (the last keeps every drain from sending VMs to it meanwhile).

    All free (the usual case): taken together in one request. Otherwise one at a time,
    host first: the host lock may time out (another run has the host); the cluster slot and
    the inbound lock are then waited for as long as it takes (the cluster is busy, or another
    host's drain is still sending VMs here). ``holder``: the run recorded on the host, named (with
    what Prefect says of it) when the host lock times out (:func:`describe_holder`).
    """
    names = [n for n in (host_limit(host), maintenance_limit(cluster), inbound_limit(host)) if n not in _held.get()]
    lease = _acquire(names, 1, 0, "", only_if_free=True) if len(names) == 3 else None
    if lease is not None:
        with _holding(names, lease, 1):
            yield
        return
    with ExitStack() as stack:
        try:
            stack.enter_context(hold(host_limit(host), wait_seconds=wait_seconds,
                                     why=f" (host {host} is under maintenance)"))
        except LockHeldError as exc:
            raise LockHeldError(str(exc) + describe_holder(holder)) from exc
        stack.enter_context(hold(maintenance_limit(cluster)))
        # no drain sends VMs to a host in maintenance: one that is doing so now finishes first
        stack.enter_context(hold(inbound_limit(host)))
        yield


@contextmanager
def drain_slots(cluster: str, targets: Collection[str], share: int, *,
                wait_seconds: float | None = None) -> Iterator[None]:
    """Hold ``inbound:<t>`` of every target and ``share`` slots of ``migrations:<cluster>`` for a drain.

    Two drains then never send to the same host, so each alone counts what lands on its targets
    (their free memory, the per-target limit), and their slots add up to at most the cluster's
    limit. The targets are taken first, all or none, waiting as long as another drain sends to one
    of them (at most ``wait_seconds``, then LockHeldError); then the slots. A run that holds the
    whole limit (:func:`cluster_migrations`) already excludes every other migration: re-entrant,
    nothing more is taken.
    """
    if migrations_limit(cluster) in _held.get():
        yield
        return
    names = sorted({inbound_limit(t) for t in targets} - _held.get())
    with ExitStack() as stack:
        if names:
            lease = _acquire(names, 1, wait_seconds, " (another drain sends VMs there, or it is in maintenance)")
            assert lease is not None  # only None with only_if_free
            stack.enter_context(_holding(names, lease, 1))
        stack.enter_context(hold(migrations_limit(cluster), occupy=share))
        yield


def busy_targets(hosts: Collection[str]) -> list[str]:
    """Which of ``hosts`` another run's drain is sending VMs to right now (their ``inbound:`` is taken).

    A plan that avoids them can drain beside that drain instead of waiting for it. A snapshot:
    by the time the plan's targets are locked it may have changed, which only means waiting.
    """
    wanted = {inbound_limit(h): h for h in hosts}
    busy: list[str] = []
    page = 200
    with get_client(sync_client=True) as client:
        offset = 0
        while True:
            limits = client.read_global_concurrency_limits(limit=page, offset=offset)
            busy += [wanted[lim.name] for lim in limits
                     if lim.name in wanted and lim.active_slots > 0 and lim.name not in _held.get()]
            if len(limits) < page:
                return sorted(busy)
            offset += page


@contextmanager
def cluster_migrations(cluster: str, targets: Collection[str] = ()) -> Iterator[None]:
    """Hold every slot of ``migrations:<cluster>`` (and ``inbound:`` of ``targets``) while this run
    migrates VMs of the cluster that are not a drain's: returning VMs, rebalancing.

    Holding the whole limit keeps every drain and every other such run out meanwhile; the targets'
    inbound locks keep a host from going into maintenance while VMs are sent to it.
    """
    name = migrations_limit(cluster)
    if name in _held.get():
        yield
        return
    with get_client(sync_client=True) as client:
        try:
            size = client.read_global_concurrency_limit_by_name(name).limit
        except ObjectNotFound:
            size = 1  # hold() raises the LockError that explains what is missing
    with drain_slots(cluster, targets, size):
        yield


def held() -> frozenset[str]:
    """The limits this run holds right now (for logs and tests)."""
    return _held.get()
