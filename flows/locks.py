"""Cluster-wide locks: Prefect global concurrency limits, always taken with ``strict=True``.

Three limits per inventory, created by :func:`ensure_limits` (``hostmaint setup``)::

    host:<name>            1                           one maintenance of a host at a time
    maintenance:<cluster>  limits.max_hosts_in_maintenance   hosts of a cluster in maintenance at once
    migrations:<cluster>   limits.migrations_per_cluster     live migrations of a cluster at once

A limit that does not exist is an error (:class:`~hostmaint.errors.LockError`),
never a warning: without ``strict`` Prefect would log and run unlocked. A list of
names is taken one name at a time in a fixed order (host, then cluster), because
Prefect only checks that *some* of a list exist; the fixed order keeps two runs
from each holding what the other waits for.

Locks are re-entrant within a run: a runbook holding ``host:hv01`` may call the
evacuate-host flow for hv01 as a subflow without waiting on itself.

Slots are leased: a process that dies stops renewing, and the server frees the slot
when the lease runs out (``$HOSTMAINT_LOCK_LEASE_SECONDS``, default 120, minimum 60),
so a dead machine does not hold a host forever. The lease store must survive a
server restart (``PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE``, see docs/deployments.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from prefect import runtime
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL

from hostmaint.errors import LockError, LockHeldError
from hostmaint.inventory import Inventory, load_inventory

LEASE_ENV = "HOSTMAINT_LOCK_LEASE_SECONDS"
DEFAULT_LEASE_SECONDS = 120.0
MIN_LEASE_SECONDS = 60.0  # the Prefect server refuses shorter leases

_held: ContextVar[frozenset[str]] = ContextVar("hostmaint_held_locks", default=frozenset())


def host_limit(host: str) -> str:
    return f"host:{host}"


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


@contextmanager
def hold(name: str, *, occupy: int = 1, wait_seconds: float | None = None, why: str = "") -> Iterator[None]:
    """Hold ``occupy`` slots of limit ``name`` for the block; strict: a missing limit raises LockError.

    ``wait_seconds``: give up after this long with a LockError saying who to wait
    for (``None`` waits as long as it takes). Already held by this run: no-op.
    """
    if name in _held.get():
        yield
        return
    from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError

    acquired = False
    try:
        with concurrency(name, occupy=occupy, timeout_seconds=wait_seconds, strict=True,
                         lease_duration=lease_seconds(), holder=_holder()):
            acquired = True
            token = _held.set(_held.get() | {name})
            try:
                yield
            finally:
                _held.reset(token)
    except ConcurrencySlotAcquisitionError as exc:
        if acquired:
            raise
        raise LockError(f"lock {name!r} is missing on the Prefect server {PREFECT_API_URL.value()}: refusing to "
                        f"run unlocked, nothing was changed. Create the limits with 'hostmaint setup "
                        f"--inventory INVENTORY' (flows.locks.ensure_limits). ({exc})") from exc
    except TimeoutError as exc:
        if acquired:
            raise
        raise LockHeldError(f"lock {name!r} is held by another run{why}; waited {wait_seconds:g}s and gave up, "
                        "nothing was changed. Run again when that run has finished (Prefect UI: "
                        "Concurrency, and the host's state in 'hostmaint host status').") from exc


@contextmanager
def host_maintenance(host: str, cluster: str, *, wait_seconds: float | None = None) -> Iterator[None]:
    """Hold ``host:<host>`` and one slot of ``maintenance:<cluster>`` for a host's whole maintenance.

    The host lock is taken first and may time out (another run has the host); the
    cluster slot is then waited for as long as it takes (the cluster is busy, not this host).
    """
    with ExitStack() as stack:
        stack.enter_context(hold(host_limit(host), wait_seconds=wait_seconds,
                                 why=f" (host {host} is under maintenance)"))
        stack.enter_context(hold(maintenance_limit(cluster)))
        yield


@contextmanager
def cluster_migrations(cluster: str) -> Iterator[None]:
    """Hold every slot of ``migrations:<cluster>`` while this run migrates VMs of the cluster.

    One drain already keeps to the cluster's migration limit on its own; holding the
    whole limit keeps two runs' drains from adding up past it.
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
    with hold(name, occupy=size):
        yield


def held() -> frozenset[str]:
    """The limits this run holds right now (for logs and tests)."""
    return _held.get()
