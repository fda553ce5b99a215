"""The maintenance steps, as plain functions over a Runtime: cordon, plan, drain, patch, verify, return.

Each step checks its precondition first (so a re-run skips what is done), acts,
and leaves an audit record through ``audited``. Prefect tasks wrap these one to
one; the runbook order lives in ``flows/``.

Guards that hold whatever the caller does:
- a host is never rebooted while any VM runs on it (``reboot_host`` re-checks);
- a VM is only placed on ``active`` hosts (the planner filters on state);
- a failed step leaves the host ``cordoned`` or ``failed`` with the reason, never ``active``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from typing import Any

from hostmaint import patching
from hostmaint.audit import AuditEntry, AuditRecord
from hostmaint.cancel import Cancellation, RunCancelled
from hostmaint.display import visible
from hostmaint.drivers.base import (
    STOPPED_OUTSIDE_REASONS,
    AutostartFlags,
    MigrationStates,
    ShutOffReasons,
    ShutOffVms,
    StrandedVms,
)
from hostmaint.errors import (
    DriverError,
    HostmaintError,
    PlanError,
    StepError,
    TargetsUnreachable,
    TargetsWithdrawn,
    TransientDriverError,
    without_host,
)
from hostmaint.fleet import discover_cluster
from hostmaint.inventory import Inventory, MigrationTls
from hostmaint.migration import DrainEvent, DrainReport, drain
from hostmaint.migration.links import LinkFigure, resolve_link
from hostmaint.migration.policy import (
    DEFAULT_LINK_MIB_S,
    DEFAULT_TLS_STREAM_FACTOR,
    SchedulerPolicy,
    drain_limits,
    slots_per_drain,
)
from hostmaint.migration.probe import probe_dirty_rates
from hostmaint.migration.transport import Route, render_refusals
from hostmaint.migration.transport_probe import needs_reading, read_transport
from hostmaint.models import (
    QEMU_DOWNTIME_LIMIT_MS,
    Cell,
    EvacuationPlan,
    FleetSnapshot,
    HostState,
    Limits,
    MigrationOptions,
    MigrationResult,
    RebalancePlan,
    Step,
    StepOutcome,
    Trigger,
    UnmigratableAction,
)
from hostmaint.placement import check_capacity, plan_evacuation, plan_rebalance, render_plan, stale_targets
from hostmaint.placement.exact import DEFAULT_BUDGET
from hostmaint.placement.rebalance import plan_return as plan_return_home
from hostmaint.resume import cells_before_reboot, issued_boot_id
from hostmaint.runtime import Runtime
from hostmaint.state import HostRecord, HostStateStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunContext:
    """Who and what started a run; stamped on every audit record it writes."""

    run_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    flow: str = "cli"
    trigger: Trigger = Trigger.CLI
    operator: str = "unknown"
    reason: str = ""
    window_id: str | None = None


@dataclass
class StepRecord:
    """Filled in by a step while it runs; written to the audit trail when it ends."""

    outcome: StepOutcome = StepOutcome.OK
    details: dict[str, Any] = field(default_factory=dict)


@contextmanager
def audited(rt: Runtime, run: RunContext, step: Step, *, host: str | None = None, vm: str | None = None,
            cluster: str | None = None, inputs: dict[str, Any] | None = None) -> Iterator[StepRecord]:
    """Time a step and append its audit record, whether it succeeds or fails."""
    rec = StepRecord()
    started = time.monotonic()
    if cluster is None and host is not None:
        try:
            cluster = rt.cluster_of(host)
        except KeyError:
            cluster = None

    def write(outcome: StepOutcome, details: dict[str, Any]) -> None:
        rt.audit.append(AuditEntry(
            run_id=run.run_id, flow=run.flow, trigger=run.trigger, operator=run.operator,
            cluster=cluster or "", host=host, vm=vm, step=step, inputs=inputs or {}, outcome=outcome,
            duration_s=round(time.monotonic() - started, 3),
            details={"simulated": rt.simulated, **details}))

    try:
        yield rec
    except HostmaintError as exc:
        write(StepOutcome.FAILED, {**rec.details, "error": str(exc), "error_type": type(exc).__name__})
        raise
    except BaseException as exc:
        write(StepOutcome.FAILED, {**rec.details, "error": f"{type(exc).__name__}: {exc}"})
        raise
    write(rec.outcome, rec.details)


# --- state ------------------------------------------------------------------------


def fail_host(rt: Runtime, run: RunContext, host: str, reason: str) -> None:
    """Leave a host ``failed`` with the reason: never silently active."""
    current = rt.states.state(host)
    if current is HostState.FAILED:
        return
    if current is HostState.ACTIVE:
        rt.states.transition(host, HostState.CORDONED, reason, run.run_id)
    rt.states.transition(host, HostState.FAILED, reason, run.run_id)


def cordon(rt: Runtime, run: RunContext, host: str) -> HostRecord:
    """Cordon ``host``: nothing new is placed on it. Idempotent; remembers the state before."""
    rt.inventory.host(host)  # unknown host: KeyError before anything changes
    with audited(rt, run, Step.CORDON, host=host, inputs={"reason": run.reason}) as rec:
        before = rt.states.get(host)
        if before.state is HostState.FAILED:
            raise StepError(f"host {host} is failed ({before.reason}); an operator must clear it with "
                            f"'hostmaint host reset {host}' first", host, Step.CORDON)
        if before.state is not HostState.ACTIVE and before.run_id not in (None, run.run_id) \
                and before.state is not HostState.CORDONED:
            rec.details["resumed_from"] = before.state.value
        record = rt.states.begin_maintenance(host, run.run_id, run.reason or "maintenance")
        rec.details["state_before"] = before.state.value
        if before.state is not HostState.ACTIVE:
            rec.outcome = StepOutcome.SKIPPED
            rec.details["note"] = f"already {before.state.value}"
        return record


def uncordon(rt: Runtime, run: RunContext, host: str) -> HostState:
    """Return a host verified in this maintenance to the state it had before (an operator's cordon stays).

    Only a ``verifying`` host (it passed :func:`verify`) goes back: a host that left service and was
    not verified stays out, whatever asks. A maintenance that ends before it started anything is
    :func:`end_unstarted`."""
    with audited(rt, run, Step.UNCORDON, host=host) as rec:
        record = rt.states.get(host)
        if record.state is HostState.FAILED:
            # a failed host is cleared by an operator, never by a run that finds it so: it may be
            # unpatched or unverified, and uncordoning it would let VMs onto it
            raise StepError(f"host {host} is failed ({record.reason}); an operator must clear it with "
                            f"'hostmaint host reset {host}' first", host, Step.UNCORDON)
        target = record.prior_state or HostState.ACTIVE
        if target not in (HostState.ACTIVE, HostState.CORDONED):
            target = HostState.ACTIVE
        if record.state is not HostState.VERIFYING:
            raise StepError(f"host {host} is {record.state.value} ({record.reason}), not verified in this "
                            "maintenance: it stays out of service", host, Step.UNCORDON)
        # cordoned by an operator before: it ends cordoned, outside any maintenance, so the host is the
        # operator's again (hostmaint host uncordon), with the reason it was out of service for
        kept = rt.states.reason_before_maintenance(host) if target is HostState.CORDONED else None
        rt.states.transition(host, target, kept or "maintenance finished: verified" + (
            "; cordoned as before" if target is HostState.CORDONED else ""), run.run_id)
        rec.details["state"] = target.value
        return target


def displaced_vms(rt: Runtime, host: str, snap: FleetSnapshot, *, since: datetime | None = None) -> dict[str, str]:
    """VM -> the host it runs on now, for every VM maintenance moved off ``host`` (its recorded
    origin) that is not back on it; a VM running nowhere in ``snap`` is named with "nowhere".
    ``since``: only the VMs whose origin was recorded then or later (moved in this maintenance)."""
    where = {v.name: v.host for v in snap.vms}
    return {vm: where.get(vm, "nowhere") for vm, _, at in rt.states.origin_records(host)
            if where.get(vm) != host and (since is None or at >= since)}


def moved_off_since(rt: Runtime, host: str, snap: FleetSnapshot, since: datetime) -> dict[str, str]:
    """VM -> where it runs now, for every VM a migration recorded since ``since`` took off ``host``
    (``migrate``, or a dead run's ``migration-found``; a move whose outcome is unknown counts when the VM
    is not on ``host`` now) and that is not back on it. Unlike :func:`displaced_vms` it sees a VM whose
    origin is another host (an origin keeps a VM's first home)."""
    where = {v.name: v.host for v in snap.vms}
    moved: dict[str, str] = {}
    for r in rt.audit.records(host=host, steps=(Step.MIGRATE, Step.MIGRATION_FOUND)):
        if (r.vm is None or r.step not in (Step.MIGRATE, Step.MIGRATION_FOUND)
                or r.outcome not in (StepOutcome.OK, StepOutcome.UNKNOWN)
                or datetime.fromisoformat(r.time) < since):
            continue
        if where.get(r.vm) != host:
            moved[r.vm] = where.get(r.vm, "nowhere")
        else:
            moved.pop(r.vm, None)  # back on it since
    return moved


PATCHED_STATES = frozenset({HostState.PATCHING, HostState.REBOOTING, HostState.VERIFYING})


def end_unstarted(rt: Runtime, run: RunContext, host: str, why: str, snap: FleetSnapshot | None = None) -> HostState:
    """End a maintenance that cannot go on (its plan was refused): the host goes back to the state it
    had before only when nothing of it was moved, stopped or patched for maintenance, so it never left
    service.

    Otherwise (an earlier run's drain moved some of its VMs, or shut some down, or an earlier run got as
    far as patching it and stopped before it was verified) it stays cordoned with the reason and the
    VMs that are away named in its state and the audit record (step ``keep-cordoned``); the run that
    can plan finishes it later, and ``host status`` lists them.
    ``snap``: the cluster as discovered just now; by default discovered here (the hosts that answer:
    :func:`reachable_snapshot`). Never one from before a drain that ran: its moves would look undone."""
    if snap is None:
        snap = reachable_snapshot(rt, rt.cluster_of(host))
    # VMs an earlier, finished maintenance left away (a return that found no room) were away while
    # the host was in service: they do not keep it out now (round 1318253299: a refused plan took an
    # active host out of service for them, and N+1 then refused the next host of its cluster)
    began = rt.states.maintenance_began(host)
    displaced = displaced_vms(rt, host, snap, since=began)
    if began is not None:
        # and the VMs this maintenance moved off it whose home is another host (round 833846139: a VM
        # away from an earlier maintenance, moved on by this one's drain, was "nothing moved")
        displaced = {**moved_off_since(rt, host, snap, began), **displaced}
    away_before = {vm: where for vm, where in displaced_vms(rt, host, snap).items() if vm not in displaced}
    stopped = rt.states.stopped_on(host)
    record = rt.states.get(host)
    # an earlier run of this maintenance that got to patching changed the host (packages, a reboot)
    # and did not verify it: that host left service whether or not anything of it is away now
    reached = [s for s in rt.states.reached_in_maintenance(host) if s in PATCHED_STATES]
    if not displaced and not stopped and not reached and record.state is HostState.CORDONED:
        with audited(rt, run, Step.UNCORDON, host=host, inputs={"why": why}) as rec:
            target = record.prior_state or HostState.ACTIVE
            if target is HostState.CORDONED:
                rt.states.set_aside(host, rt.states.reason_before_maintenance(host)
                                    or "maintenance not started; cordoned as before", run.run_id)
            else:
                left = ("; its VMs still away from an earlier maintenance: "
                        + ", ".join(f"{vm} (on {where})" for vm, where in sorted(away_before.items()))
                        if away_before else "")
                rt.states.transition(host, HostState.ACTIVE,
                                     f"maintenance not started, nothing moved: {why}{left}", run.run_id)
            rec.details["state"] = target.value
            rec.details["note"] = "nothing was moved or stopped: the host never left service"
            if away_before:
                rec.details["away_before"] = away_before
            return target
    away = [f"{vm} (on {where})" for vm, where in sorted(displaced.items())]
    reason = (f"maintenance cannot go on, not patched: {why}" if not reached else
              f"maintenance cannot go on, not verified (it got as far as {reached[-1].value}): {why}")
    if away:
        reason += f"; its VMs away: {', '.join(away)}"
        # a VM on a host that did not answer reads "nowhere": say which hosts those were, so that
        # "nowhere" is not taken for lost
        silent = sorted({h.name for h in rt.inventory.hosts_of(snap.cluster)} - {h.name for h in snap.hosts})
        if silent and "nowhere" in displaced.values():
            reason += f" ('nowhere': not on any host that answered; not discovered now: {', '.join(silent)})"
    if stopped:
        reason += f"; shut down by maintenance: {', '.join(stopped)}"
    with audited(rt, run, Step.KEEP_CORDONED, host=host, inputs={"why": why}) as rec:
        rec.details["displaced"] = displaced
        rec.details["stopped"] = list(stopped)
        rec.details["state_before"] = record.state.value
        rec.details["reached"] = [s.value for s in reached]
        rt.states.keep_out(host, reason, run.run_id)
    return HostState.CORDONED


def cancelled_reason(reason: str) -> str:
    """A cancelled host's reason for staying out of service (the same text each time, so standing
    down twice, in the run's process and then from outside it, changes nothing the second time)."""
    return f"{reason}; maintenance unfinished: run it again to finish"


STAND_DOWN_SETTLE_S = 60.0  # how long a stand-down waits for aborted migrations to settle


def stand_down(rt: Runtime, run: RunContext, host: str, reason: str, *, settle_s: float = STAND_DOWN_SETTLE_S,
               sleep: Callable[[float], None] = time.sleep,
               clock: Callable[[], float] = time.monotonic) -> HostRecord:
    """Bring ``host`` to a safe state after ``run`` was cancelled, from wherever the run got.

    Idempotent, and made to work from outside the run's process (which may have been killed):
    migrations off the host still in pre-copy are aborted (a killed run's carry on in libvirt), a
    post-copy one is let finish; it waits up to ``settle_s`` until every VM that left the host runs on
    exactly one host, records the moves the run did not (``migration-found``), and leaves the host
    out of service with ``reason`` (:func:`cancelled_reason`): cordoned from cordoned, draining or
    drained; from patching, rebooting or verifying it stays where it is, so a re-run resumes there and
    verifies it. Only a host this run holds is touched: one still active never left service, one
    another run holds is that run's. Audit step ``cancel``."""
    text = cancelled_reason(reason)
    with audited(rt, run, Step.CANCEL, host=host, inputs={"reason": reason}) as rec:
        record = rt.states.get(host)
        rec.details["state_before"] = record.state.value
        if record.run_id != run.run_id or record.state in (HostState.ACTIVE, HostState.FAILED):
            rec.outcome = StepOutcome.SKIPPED
            rec.details["note"] = (f"{host} is {record.state.value}, not held by this run: nothing to stop"
                                   if record.run_id != run.run_id else
                                   f"{host} is {record.state.value}: nothing of it to stop")
            return record
        aborted = _abort_outgoing(rt, host)
        rec.details["aborted"] = aborted
        rec.details["unsettled"] = _settle(rt, host, settle_s, sleep, clock)
        snap = snapshot(rt, rt.cluster_of(host))
        rec.details["found_moved"] = record_found_moves(rt, run, host, snap, include_own=True)
        rec.details["displaced"] = displaced_vms(rt, host, snap)
        if record.state in (HostState.CORDONED, HostState.DRAINING, HostState.DRAINED):
            after = rt.states.keep_out(host, text, run.run_id)
        else:
            after = rt.states.note(host, text, run.run_id)
        rec.details["state"] = after.state.value
        if after == record and not aborted:
            rec.details["note"] = "already stopped safely"
        return after


def _abort_outgoing(rt: Runtime, host: str) -> list[str]:
    """Abort the pre-copy migrations off ``host`` (found on the hosts, not in any run's memory)."""
    hv = rt.hypervisor
    if not isinstance(hv, MigrationStates):
        return []  # a driver whose migrations live in its caller: a stopped caller left none running
    try:
        here = set(hv.running_vms(host))
        switching = set(hv.in_migration(host))  # paused at switch-over or in post-copy: let it finish
        outgoing = set()
        for other in rt.inventory.hosts_of(rt.cluster_of(host)):
            if other.name != host:
                outgoing |= (set(hv.in_migration(other.name)) & here) - switching
    except DriverError as exc:
        log.warning("%s: cannot list its migrations to stop them: %s", host, visible(exc))
        return []
    aborted = []
    for vm in sorted(outgoing):
        try:
            hv.abort(vm, host)
            aborted.append(vm)
        except DriverError as exc:
            log.warning("%s: cannot abort the migration of %s: %s", host, visible(vm), exc)
    return aborted


def _settle(rt: Runtime, host: str, settle_s: float, sleep: Callable[[float], None],
            clock: Callable[[], float]) -> list[str]:
    """Wait until every VM whose origin is ``host`` runs on exactly one host and none of them is being
    migrated; return those that did not settle within ``settle_s``."""
    return _settle_vms(rt, rt.cluster_of(host), lambda: sorted(rt.states.origins(host)), settle_s, sleep, clock)


def _settle_vms(rt: Runtime, cluster: str, which: Callable[[], list[str]], settle_s: float,
                sleep: Callable[[float], None], clock: Callable[[], float]) -> list[str]:
    """Wait until each VM ``which()`` names runs on exactly one host of ``cluster`` and none of them is
    being migrated; return those that did not settle within ``settle_s``."""
    deadline = clock() + settle_s
    hv = rt.hypervisor
    while True:
        vms = which()
        unsettled = []
        try:
            moving: set[str] = set()
            if isinstance(hv, MigrationStates):
                for h in rt.inventory.hosts_of(cluster):
                    moving |= set(hv.in_migration(h.name))
            unsettled = [vm for vm in vms if vm in moving or len(hv.locate(vm)) != 1]
        except DriverError as exc:
            log.warning("%s: cannot see where its VMs run yet: %s", cluster, visible(exc))
            unsettled = vms
        if not unsettled or clock() >= deadline:
            return unsettled
        sleep(1.0)


def record_moves(rt: Runtime, run: RunContext, plan: EvacuationPlan, host: str | None = None, *,
                 drain: bool = False) -> None:
    """Record the moves a return, a rebalance or a drain (``drain``) is about to start (step
    ``moves-started``), before any starts: no host state or origin says which VMs such a run moves
    (an origin keeps a VM's first home), and what a run that died left unrecorded is settled from it
    (:func:`settle_earlier_moves`); a stand-down from outside a killed return's or rebalance's
    process (:func:`stand_down_moves`) must know which to stop (a drain's host stands down its own).
    Each move says whether its VM starts with its host (``autostart``, where the source answered): the
    move drops the flag and a run that dies before the move ends cannot put it back
    (:func:`restore_autostart`)."""
    flags = _autostarts(rt, sorted({p.source for p in plan.placements}))
    inputs: dict[str, Any] = {"moves": [{"vm": p.vm, "source": p.source, "target": p.target,
                                         **({"autostart": flags[p.source].get(p.vm, False)}
                                            if p.source in flags else {})}
                                        for p in plan.placements]}
    if drain:
        inputs["drain"] = True
    with audited(rt, run, Step.MOVES_STARTED, host=host, cluster=plan.cluster, inputs=inputs):
        pass


def _autostarts(rt: Runtime, hosts: Sequence[str]) -> dict[str, dict[str, bool]]:
    """Host -> (VM -> whether it starts with the host), for each of ``hosts`` that answers; none at all
    with a driver that has no such flag."""
    hv = rt.hypervisor
    if not isinstance(hv, AutostartFlags):
        return {}
    flags = {}
    for h in hosts:
        try:
            flags[h] = hv.autostarts(h)
        except DriverError as exc:
            # left out of the record: a move found later reads its source's definition, or says unknown
            log.warning("%s: cannot read which VMs start with it: %s", h, visible(exc))
    return flags


def restore_autostart(rt: Runtime, rec: StepRecord, vm: str, source: str, target: str,
                      started_by: str | None) -> None:
    """Give ``vm``, found moved from ``source`` to ``target`` by run ``started_by`` (which died before the
    move ended), the autostart flag it had on ``source``: the move defined it on ``target`` without it,
    and only the driver of a migration that saw it end puts it back. Known from the moves that run
    recorded before it started them, else from ``vm``'s definition still on ``source``; when neither
    tells, the record and the log say so (never a guess). Only a dropped flag is set: one on ``target``
    that ``vm`` did not have on ``source`` was set since, by someone else, and is left. Written into
    ``rec`` (the ``migration-found`` record); a flag that cannot be set does not undo the move."""
    hv = rt.hypervisor
    if not isinstance(hv, AutostartFlags):
        return  # a driver with no such flag: the move dropped nothing
    wanted, known_from = _autostart_before(rt, hv, vm, source, started_by)
    if wanted is None:
        rec.details["autostart"] = "unknown"
        rec.details["autostart_note"] = (f"whether {vm} started with {source} is not known ({known_from}): "
                                         f"check it (virsh autostart {vm} on {target})")
        log.warning("%s: whether %s started with it is not known (%s); it now runs on %s, where it may not "
                    "start with the host: check it (virsh autostart)", source, visible(vm), visible(known_from), target)
        return
    rec.details["autostart"] = wanted
    rec.details["autostart_from"] = known_from
    try:
        now = hv.autostarts(target).get(vm, False)
        if wanted and not now:
            hv.set_autostart(vm, target, True)
            rec.details["autostart_set"] = target
        elif now and not wanted:
            rec.details["autostart_note"] = (f"{vm} starts with {target}, though it did not with {source}: "
                                             "set since the move, left as it is")
    except DriverError as exc:
        rec.details["autostart_error"] = str(exc)
        log.warning("%s: %s moved to %s, but its autostart could not be set there (virsh autostart %s): %s",
                    source, visible(vm), target, visible(vm), visible(exc))


def _autostart_before(rt: Runtime, hv: AutostartFlags, vm: str, source: str,
                      started_by: str | None) -> tuple[bool | None, str]:
    """Whether ``vm`` started with ``source`` when run ``started_by`` moved it, and how that is known
    (or, with None, why it is not)."""
    records = rt.audit.records(run_id=started_by, steps=(Step.MOVES_STARTED,)) if started_by else []
    for r in reversed(records):
        for m in r.inputs.get("moves", []):
            if m.get("vm") == vm and m.get("source") == source and "autostart" in m:
                return bool(m["autostart"]), f"recorded by run {started_by} before the move (record {r.seq})"
    try:
        defined = hv.autostarts(source)
    except DriverError as exc:
        return None, f"run {started_by} did not record it, and {source} does not answer: {exc}"
    if vm in defined:
        return defined[vm], f"its definition still on {source}"
    return None, f"run {started_by} did not record it, and {source} no longer defines {vm}"


def stand_down_moves(rt: Runtime, run: RunContext, cluster: str, reason: str, *,
                     settle_s: float = STAND_DOWN_SETTLE_S, sleep: Callable[[float], None] = time.sleep,
                     clock: Callable[[], float] = time.monotonic) -> list[str]:
    """Stop the moves a cancelled return or rebalance of ``run`` started (:func:`record_moves`) and
    account for each; returns the VMs found moved with no record.

    Idempotent, and made to work from outside the run's process: of the moves no ``migrate`` record
    of the run covers, those still in pre-copy are aborted (a killed run's carry on in libvirt), a
    post-copy one is let finish; it waits up to ``settle_s`` until each of those VMs runs on exactly
    one host, and records the ones that landed on their target (``migration-found``; a VM back home
    loses its origin, as a return that finished would have cleared it). No host's state changes: a
    return or a rebalance takes no host out of service. Audit step ``cancel`` (cluster), written
    only when the run started moves."""
    mine = rt.audit.records(run_id=run.run_id)
    moves = {m["vm"]: m for r in mine if r.step == Step.MOVES_STARTED and not r.inputs.get("drain")
             for m in r.inputs.get("moves", [])}
    if not moves:
        return []
    with audited(rt, run, Step.CANCEL, cluster=cluster, inputs={"reason": reason}) as rec:
        recorded = {r.vm for r in mine if r.step in (Step.MIGRATE, Step.MIGRATION_FOUND)}
        pending = {vm: m for vm, m in moves.items() if vm not in recorded}
        if not pending:
            rec.details["note"] = "already stopped safely"
            return []
        rec.details["aborted"] = aborted = _abort_moves(rt, list(pending.values()))
        rec.details["unsettled"] = _settle_vms(rt, cluster, lambda: sorted(pending), settle_s, sleep, clock)
        found = []
        for vm, m in sorted(pending.items()):
            if rt.hypervisor.locate(vm) != (m["target"],):
                continue  # still on its source (aborted, never started), or unsettled: named above
            with audited(rt, run, Step.MIGRATION_FOUND, host=m["source"], vm=vm,
                         inputs={"target": m["target"], "started_by_run": run.run_id}) as found_rec:
                found_rec.details["note"] = (f"{vm} left {m['source']} for {m['target']} in a move run {run.run_id} "
                                             "started and never recorded: it was cancelled before the move ended")
                restore_autostart(rt, found_rec, vm, m["source"], m["target"], run.run_id)
            if rt.states.origins().get(vm) == m["target"]:
                rt.states.clear_origin(vm)  # it is home again
            found.append(vm)
        rec.details["found_moved"] = found
        if not aborted and not found:
            rec.details["note"] = "nothing was moving"
        return found


def _abort_moves(rt: Runtime, moves: Sequence[dict[str, str]]) -> list[str]:
    """Abort the moves still in pre-copy (their VM runs on its source, a copy waits on the target)."""
    hv = rt.hypervisor
    if not isinstance(hv, MigrationStates):
        return []  # a driver whose migrations live in its caller: a stopped caller left none running
    aborted = []
    for m in moves:
        vm, source, target = m["vm"], m["source"], m["target"]
        try:
            precopy = (vm in hv.in_migration(target) and vm in hv.running_vms(source)
                       and vm not in hv.in_migration(source))  # paused on the source: post-copy, let it finish
            if precopy:
                hv.abort(vm, source)
                aborted.append(vm)
        except DriverError as exc:
            log.warning("cannot stop the move of %s off %s: %s", visible(vm), source, visible(exc))
    return aborted


# --- discovery and plans ----------------------------------------------------------------


def snapshot(rt: Runtime, cluster: str, unreachable: Sequence[str] = ()) -> FleetSnapshot:
    """Discover the cluster now, with kept host states and VM origins; rebooting hosts are left out,
    and so are ``unreachable`` ones (targets a drain of this run lost: nothing is planned onto them)."""
    states = {h: r.state for h, r in rt.states.all().items()}
    skip = frozenset(h for h, s in states.items() if s is HostState.REBOOTING) | frozenset(unreachable)
    return discover_cluster(rt.inventory, cluster, rt.hypervisor, states=states,
                            origins=rt.states.origins(), source=rt.source, skip_unreachable=skip)


def reachable_snapshot(rt: Runtime, cluster: str) -> FleetSnapshot:
    """:func:`snapshot` of the hosts that answer now: each host that does not (a target a drain lost) is
    left out, its VMs then run "nowhere" in it. For judging what is away from a host, where leaving a
    host out can only keep more out of service; never for planning onto."""
    lost: list[str] = []
    for _ in rt.inventory.hosts_of(cluster):
        try:
            return snapshot(rt, cluster, unreachable=lost)
        except TransientDriverError as exc:
            if exc.host is None or exc.host in lost:
                raise
            lost.append(exc.host)
    return snapshot(rt, cluster, unreachable=lost)


def plan_drain(rt: Runtime, run: RunContext, host: str, *, avoid: Sequence[str] = (), busy: Sequence[str] = (),
               focus: bool = False, dry_run: bool = False, snap: FleetSnapshot | None = None,
               exact_budget: float = DEFAULT_BUDGET) -> EvacuationPlan:
    """Discover, check N+1 and plan the evacuation of ``host``. Raises PlanError when unsafe.

    ``avoid``: hosts due for maintenance later; ``busy``: hosts other drains fill now; ``focus``:
    send to few hosts (see ``plan_evacuation``). With ``dry_run`` an unsafe plan is returned (to be
    printed) instead of raised, and the audit record says dry-run. ``snap``: the cluster as the
    caller discovered it just now, after cordoning ``host`` (the plan is made on it instead of
    discovering again). ``exact_budget``: the planner's exact stage (``plan_evacuation``).
    """
    cluster = rt.cluster_of(host)
    with audited(rt, run, Step.PLAN, host=host, inputs={"avoid": list(avoid), "busy": list(busy), "focus": focus,
                                                     "dry_run": dry_run, "exact_budget": exact_budget}) as rec:
        if snap is None:
            snap = snapshot(rt, cluster)
        elif snap.cluster != cluster:
            raise PlanError(f"planning {host} of cluster {cluster} on a snapshot of cluster {snap.cluster}")
        at_once = focus_at_once(rt, [host], cluster) if focus else None
        plan = plan_evacuation(snap, [host], avoid=tuple(avoid), busy=tuple(busy), focus=focus,
                               focus_at_once=at_once, exact_budget=exact_budget)
        if at_once is not None:
            rec.details["focus_at_once"] = at_once
        rec.details["proof"] = plan.proof.value
        if plan.capacity is None:
            plan = plan.model_copy(update={"capacity": check_capacity(snap, [host])})
        if not plan.feasible and not plan.blocked and not snap.vms_on(host) and out_before(rt, run, host):
            # N+1 keeps a host in service that the cluster needs as a spare; this one is out already and
            # holds nothing, so refusing it keeps the spare away longer: its maintenance brings it back
            assert plan.capacity is not None
            note = (f"not applied: {host} was out of service before this run and moves nothing; finishing its "
                    f"maintenance brings capacity back ({plan.capacity.reason})")
            plan = plan.model_copy(update={"capacity": plan.capacity.model_copy(update={"ok": True, "reason": note})})
            rec.details["capacity_note"] = note
        rec.details["plan"] = plan.model_dump(mode="json")
        if dry_run:
            rec.outcome = StepOutcome.DRY_RUN
        elif not plan.feasible:
            raise PlanError(f"cannot evacuate {host}: " + "; ".join(plan.refusals))
        return plan


def out_before(rt: Runtime, run: RunContext, host: str) -> bool:
    """Whether ``host`` was out of service (any state but active) when ``run`` took it over, or now
    when the run has not (a plan before the cordon)."""
    history = rt.states.history(host)
    mine = next((i for i, r in enumerate(history) if r.run_id == run.run_id), None)
    if mine is None:
        return rt.states.state(host) is not HostState.ACTIVE
    return mine > 0 and history[mine - 1].state is not HostState.ACTIVE


# --- drain --------------------------------------------------------------------------


def replan(rt: Runtime, run: RunContext, plan: EvacuationPlan, planned_on: FleetSnapshot, now: FleetSnapshot, *,
           avoid: Sequence[str] = (), focus: bool = False, exact_budget: float = DEFAULT_BUDGET,
           unreachable: Sequence[str] = ()) -> EvacuationPlan:
    """``plan`` if it still fits the cluster as ``now`` shows it; otherwise a new plan made on ``now``,
    with its own audit record (step ``replan``: why, and the plan that replaces the old one).

    A plan waits for its targets' locks while other runs drain; what they moved can fill the
    targets it counted on. Raises PlanError when the new plan is not feasible.
    """
    reasons = stale_targets(plan, planned_on, now)
    if not reasons:
        return plan
    lost = sorted(set(unreachable) & {p.target for p in plan.placements})
    reasons = [f"{h} stopped answering during the drain" for h in lost] + reasons
    host = plan.hosts[0] if plan.hosts else None
    with audited(rt, run, Step.REPLAN, host=host, cluster=plan.cluster,
                 inputs={"reasons": reasons, "replaces": plan.snapshot_digest, "avoid": list(avoid),
                         **({"unreachable": list(unreachable)} if unreachable else {})}) as rec:
        fresh = plan_evacuation(now, list(plan.hosts), avoid=tuple(avoid), focus=focus,
                                focus_at_once=focus_at_once(rt, plan.hosts, plan.cluster) if focus else None,
                                exact_budget=exact_budget)
        rec.details["plan"] = fresh.model_dump(mode="json")
        rec.details["proof"] = fresh.proof.value
        log.info("%s: the plan changed while it waited (%s); re-planned:\n%s", ", ".join(plan.hosts),
                 visible("; ".join(reasons)), render_plan(fresh))  # the reasons name tenants' VMs
        if not fresh.feasible:
            raise PlanError(f"cannot evacuate {', '.join(plan.hosts)} any more ({'; '.join(reasons)}): "
                            + "; ".join(fresh.refusals))
        return fresh


def recheck_plan(rt: Runtime, run: RunContext, plan: EvacuationPlan, planned_on: FleetSnapshot, *,
                 avoid: Sequence[str] = (), focus: bool = False, exact_budget: float = DEFAULT_BUDGET,
                 unreachable: Sequence[str] = ()) -> tuple[EvacuationPlan, FleetSnapshot]:
    """The cluster discovered now, and the plan to drain on it: ``plan`` (made on ``planned_on``) if it
    still fits, else a recorded re-plan (:func:`replan`). For a caller that holds the plan's targets.
    ``unreachable``: targets an earlier drain of this run lost, left out of the discovery and the plan."""
    now = snapshot(rt, plan.cluster, unreachable)
    return replan(rt, run, plan, planned_on, now, avoid=avoid, focus=focus, exact_budget=exact_budget,
                  unreachable=unreachable), now


def retarget(rt: Runtime, run: RunContext, plan: EvacuationPlan, now: FleetSnapshot, busy: Sequence[str], *,
             avoid: Sequence[str] = (), focus: bool = False, exact_budget: float = DEFAULT_BUDGET) -> EvacuationPlan:
    """``plan`` moved off the hosts other drains fill now (``busy``), when a plan on ``now`` that sends
    to none of them exists; else ``plan`` itself, to wait for them. A plan made before those drains
    began (every host of a window plans at its start) would otherwise wait for each in turn.

    A new plan gets its audit record (step ``replan``, reason: the busy targets)."""
    taken = sorted({p.target for p in plan.placements} & set(busy))
    if not taken:
        return plan
    fresh = plan_evacuation(now, list(plan.hosts), avoid=tuple(avoid), busy=tuple(busy), focus=focus,
                            focus_at_once=focus_at_once(rt, plan.hosts, plan.cluster) if focus else None,
                            exact_budget=exact_budget)
    if not fresh.feasible or {p.target for p in fresh.placements} & set(busy):
        return plan
    host = plan.hosts[0] if plan.hosts else None
    reasons = [f"{t} is busy: another drain sends VMs there" for t in taken]
    with audited(rt, run, Step.REPLAN, host=host, cluster=plan.cluster,
                 inputs={"reasons": reasons, "replaces": plan.snapshot_digest, "avoid": list(avoid),
                         "busy": list(busy), "focus": focus}) as rec:
        rec.details["plan"] = fresh.model_dump(mode="json")
        log.info("%s: its targets %s are busy with other drains; re-planned onto free hosts:\n%s",
                 ", ".join(plan.hosts), ", ".join(taken), render_plan(fresh))
    return fresh


def drain_host(rt: Runtime, run: RunContext, plan: EvacuationPlan, *, now: FleetSnapshot | None = None,
               cluster_slots: int | None = None,
               on_event: Callable[[DrainEvent], None] | None = None,
               cancel: Cancellation | None = None) -> DrainReport:
    """Live-migrate every placement of ``plan``, within the cluster's limits.

    ``now``: the cluster as the caller discovered it just now, holding the plan's targets (else it is
    discovered here); a plan that waited for them is checked first with :func:`recheck_plan`.
    ``cluster_slots``: this drain's share of the cluster's migrations (other drains run beside it).
    Origins are recorded before a VM moves, so a crash mid-drain still knows where to return it.
    A failed migration leaves its VM on the source and the host cordoned. ``cancel`` set while it
    runs stops it safely (:func:`~hostmaint.migration.drain`): the host stays cordoned with the
    reason "cancelled by X" and :class:`RunCancelled` is raised once every migration has settled.
    """
    if not plan.feasible:
        raise PlanError("refusing to drain with an infeasible plan")
    cluster = plan.cluster
    host = plan.hosts[0] if plan.hosts else None
    limits = rt.inventory.cluster(cluster).limits
    if cluster_slots is not None:
        limits = drain_limits(limits, cluster_slots)
    if now is None:
        now = snapshot(rt, cluster)
    with audited(rt, run, Step.DRAIN, host=host, cluster=cluster,
                 inputs={"placements": len(plan.placements), "snapshot": plan.snapshot_digest,
                         "cluster_slots": limits.migrations_per_cluster}) as rec:
        for h in plan.hosts:
            if rt.states.state(h) in (HostState.CORDONED, HostState.DRAINED):
                rt.states.transition(h, HostState.DRAINING, "draining", run.run_id)
        for p in plan.placements:
            rt.states.record_origin(p.vm, p.source, run.run_id)
        # an origin keeps a VM's home (the first one wins): a VM away already, moved on again by a drain
        # whose run dies, is found by this record (record_found_moves), not by its origin
        record_moves(rt, run, plan, host, drain=True)
        # the scheduler orders, admits and throttles by how fast each guest dirties memory
        rates, notes = probe_dirty_rates(rt.hypervisor, plan.hosts, [p.vm for p in plan.placements])
        rec.details["dirty_rate_mib_s"] = {vm: round(r, 1) for vm, r in sorted(rates.items())}
        if notes:
            rec.details["dirty_rate_notes"] = notes
        report = run_migrations(rt, run, rec, plan, limits, cluster, snap=now, on_event=on_event, dirty_rate=rates,
                        cancel=cancel)
        rec.details["migrations"] = [r.model_dump(mode="json") for r in report.results]
        rec.details["seconds"] = round(report.seconds, 3)
        rec.details["max_concurrency"] = report.max_concurrency
        # what the scheduler decided, not only what came of it: concurrency over time, escalations, aborts
        rec.details["concurrency"] = [list(point) for point in report.concurrency]
        rec.details["decisions"] = list(report.decisions)
        for r in report.results:
            _audit_migration(rt, run, cluster, r)
            if r.outcome in (StepOutcome.FAILED, StepOutcome.ABORTED) and _still_home(rt, r.vm, r.source):
                rt.states.clear_origin(r.vm)  # it never left: its origin would call it displaced
            elif r.stopped_outside is not None and rt.states.origins().get(r.vm) == r.source:
                rt.states.clear_origin(r.vm)  # stopped where it was, by its tenant: nothing to bring back
        if cancel is not None and cancel.is_set():
            rec.details["cancelled_by"] = cancel.who()
            for h in plan.hosts:
                rt.states.keep_out(h, cancelled_reason(cancel.reason), run.run_id)
            raise RunCancelled(f"drain of {', '.join(plan.hosts)} {cancel.reason}: "
                               f"{sum(r.outcome is StepOutcome.OK for r in report.results)} VM(s) moved, "
                               f"{len(report.failed)} still on their source", host, Step.DRAIN)
        if not report.ok:
            unknown = [r.vm for r in report.failed if r.outcome is StepOutcome.UNKNOWN]
            for h in plan.hosts:
                # the reason names what keeps the host out: the VMs on it now, as libvirt lists them (one a
                # tenant started during the drain too); the plan's failures when the host cannot be asked
                still = _still_on(rt, h, [r.vm for r in report.failed
                                          if r.source == h and r.outcome is not StepOutcome.UNKNOWN], unknown)
                why = "; ".join(([f"{', '.join(still)} still on it"] if still else [])
                                + ([f"whether {', '.join(unknown)} moved is unknown"] if unknown else []))
                rt.states.keep_out(h, f"drain failed: {why}" if why else "drain failed", run.run_id)
            failed = ", ".join(f"{r.vm} ({r.error})" for r in report.failed)
            after = ("the VMs that did not move still run on their source" if not unknown else
                     f"whether {', '.join(unknown)} moved is unknown (the next run finds out from the hosts); "
                     "the others that did not move still run on their source")
            # only targets that left service stopped it: the caller re-plans the rest onto the others
            if report.withdrawn and all(r.outcome is StepOutcome.FAILED and r.target in report.withdrawn
                                        for r in report.failed):
                rec.details["withdrawn_targets"] = list(report.withdrawn)
                raise TargetsWithdrawn(f"drain of {', '.join(plan.hosts)}: {', '.join(report.withdrawn)} left service "
                                       f"during it ({failed}); {after}", host, list(report.withdrawn), report)
            lost = _unreachable(rt, sorted({r.target for r in report.failed}))
            if lost:
                rec.details["unreachable_targets"] = lost
                raise TargetsUnreachable(f"drain of {', '.join(plan.hosts)}: {', '.join(lost)} stopped answering "
                                         f"during it ({failed}); {after}", host, lost, report)
            raise StepError(f"drain of {', '.join(plan.hosts)} failed: {failed}; {after}", host, Step.DRAIN)
        # A VM started on the host while it drained is not in the plan: the host is not drained, and
        # its state must not say so while that VM runs there
        kept = {a.vm for a in plan.vm_actions if a.action is UnmigratableAction.SHUTDOWN}
        arrived = {h: sorted(set(rt.hypervisor.running_vms(h)) - kept) for h in plan.hosts}
        arrived = {h: vms for h, vms in arrived.items() if vms}
        if arrived:
            rec.details["arrived_during_drain"] = arrived
            for h, vms in arrived.items():
                rt.states.keep_out(h, f"not drained: {', '.join(vms)} started on it during "
                                   "the drain; run again to move it off", run.run_id)
            named = "; ".join(f"{', '.join(vms)} on {h}" for h, vms in arrived.items())
            raise StepError(f"drain of {', '.join(plan.hosts)} is not complete: {named} started during the drain "
                            "(not in its plan); the host stays cordoned, run again to move it off", host, Step.DRAIN)
        for h in plan.hosts:
            if rt.states.state(h) is HostState.DRAINING:
                rt.states.transition(h, HostState.DRAINED, "drained", run.run_id)
        return report


def _still_on(rt: Runtime, host: str, failed_here: list[str], unknown: list[str]) -> list[str]:
    try:
        return sorted(set(rt.hypervisor.running_vms(host)) - set(unknown))
    except DriverError:
        return failed_here


def record_found_moves(rt: Runtime, run: RunContext, host: str, snap: FleetSnapshot, *,
                       include_own: bool = False) -> list[str]:
    """Record the migrations off ``host`` that completed with nobody left to record them.

    A drain records each VM's origin before moving it, and each migration when it ends. A run killed
    while its migrations were in flight leaves origins with no ``migrate`` record: libvirt carries on
    and the VM lands on its target after the run died. Each VM found away from ``host`` (``snap``: the
    cluster discovered now) whose move no record of that run covers gets one now (step
    ``migration-found``, naming the run that started it and where the VM runs); an origin whose VM
    never left is dropped, so the host is not said to have VMs away. Returns the VMs found moved.
    ``include_own``: this run's origins too (a stand-down after its process was killed mid-drain)."""
    where = {v.name: v.host for v in snap.vms}
    records = rt.audit.records(host=host, steps=(Step.MIGRATE, Step.MIGRATION_FOUND, Step.VM_NOT_FOUND))
    # a found move is recorded by a later run: it speaks for the run that started the migration
    moved = {(r.vm, r.inputs.get("started_by_run") if r.step == Step.MIGRATION_FOUND else r.run_id) for r in records
             if r.step in (Step.MIGRATE, Step.MIGRATION_FOUND) and r.outcome is StepOutcome.OK}
    missing = {(r.vm, r.inputs.get("started_by_run")) for r in records if r.step == Step.VM_NOT_FOUND}
    found = []
    for vm, started_by, recorded_at in rt.states.origin_records(host):
        if started_by == run.run_id and not include_own:
            continue
        now = where.get(vm)
        if now == host:
            rt.states.clear_origin(vm)  # its migration never completed: it is home
            continue
        if now is None:
            # running nowhere now: shut off where it is, or lost by the migration the dead run left
            # behind; hostmaint cannot tell which, so it says so (once), and the origin keeps it "away"
            if (vm, started_by) not in missing and (vm, started_by) not in moved:
                with audited(rt, run, Step.VM_NOT_FOUND, host=host, vm=vm,
                             inputs={"started_by_run": started_by}) as rec:
                    rec.outcome = StepOutcome.UNKNOWN
                    rec.details["note"] = (f"maintenance recorded {host} as its origin (run {started_by}) and it runs "
                                           "on no host discovered now: shut off, or lost in a migration that run "
                                           "left behind; look for it on the cluster's hosts")
                log.warning("%s: %s, whose origin run %s recorded, runs on no host now", host, visible(vm),
                            started_by)
            continue
        if (vm, started_by) in moved:
            continue
        with audited(rt, run, Step.MIGRATION_FOUND, host=host, vm=vm,
                     inputs={"target": now, "started_by_run": started_by}) as rec:
            rec.details["note"] = (f"{vm} left {host} for {now} in a migration run {started_by} started (origin "
                                   f"recorded {recorded_at.isoformat(timespec='seconds')}) and never recorded: "
                                   "that run ended before the migration did")
            log.warning("%s: %s was found on %s: moved by run %s, which died before recording it", host,
                        visible(vm), now, started_by)
            restore_autostart(rt, rec, vm, host, now, started_by)
        found.append(vm)
    # the drains of this host a dead run recorded before it started them, and its migrations whose
    # outcome was unknown (held by this run's host lock)
    found += settle_earlier_moves(rt, run, rt.cluster_of(host), host=host, include_own=include_own)
    return found


RESOLVING_STEPS = (Step.MIGRATE, Step.MIGRATION_FOUND, Step.MIGRATION_RESOLVED, Step.VM_NOT_FOUND)


def settle_earlier_moves(rt: Runtime, run: RunContext, cluster: str, *, host: str | None = None,
                         include_own: bool = False) -> list[str]:
    """Account for the moves earlier drains, returns and rebalances of ``cluster`` left unrecorded;
    returns the VMs found moved.

    Each records the moves it is about to start (``moves-started``) and each one when it ends. A run
    killed in between leaves moves with no record while libvirt finishes them; a
    migration whose VM could not be located after it failed is recorded ``unknown``. Each such move
    is settled from where its VM runs now: on its target, ``migration-found`` (naming the run that
    started it; a VM back home loses its origin, as the return would have cleared it); an unknown
    migration whose VM runs on its source, ``migration-resolved`` (it did not happen). A move never
    recorded whose VM is still on its source gets no record: a killed run's migration may still be
    under way once its lease has run out, and one that never started needs none. A VM that runs
    elsewhere or nowhere is left to the record that speaks of it next. Call it holding the cluster's
    whole migration limit (as a return and a rebalance do): then no live run has a move in flight.
    With ``host``: only the records of that host (a drain's of it, its unknown migrations), for a run
    holding the host's lock, which any run that drained it held. ``include_own``: this run's records
    too (a stand-down after its process was killed mid-drain)."""
    settle_stranded(rt, run, cluster)  # a VM a dead run's migration left paused runs first, then is located
    records = rt.audit.records(cluster=cluster, steps=(Step.MOVES_STARTED, *RESOLVING_STEPS))
    owed: list[tuple[AuditRecord, str, str, str]] = []  # (record, vm, source, target), oldest first
    # what speaks of a VM's move for good: any record of RESOLVING_STEPS but an unknown migration;
    # the newest such record per VM (a dict: the trail holds every migration the cluster ever had)
    spoken: dict[str, int] = {}
    for r in records:
        if r.vm and r.step in RESOLVING_STEPS and not (r.step == Step.MIGRATE and r.outcome is StepOutcome.UNKNOWN):
            spoken[r.vm] = r.seq
        if (r.run_id == run.run_id and not include_own) or (host is not None and r.host != host):
            continue
        if r.step == Step.MOVES_STARTED:
            owed += [(r, m["vm"], m["source"], m["target"]) for m in r.inputs.get("moves", [])]
        elif r.step == Step.MIGRATE and r.outcome is StepOutcome.UNKNOWN and r.vm and r.host:
            owed.append((r, r.vm, r.host, str(r.inputs.get("target") or r.details.get("target") or "")))
    found: list[str] = []
    settled: set[str] = set()
    for r, vm, source, target in reversed(owed):  # the newest word on a VM first; once per VM
        if vm in settled or spoken.get(vm, 0) > r.seq:
            continue  # a later record moved it, found it, or settled it
        try:
            now = rt.hypervisor.locate(vm)
        except DriverError:
            continue  # cannot tell now: the next run asks again
        settled.add(vm)
        note = f"(record {r.seq} of run {r.run_id}, {r.step}"
        if now == (source,) and r.step == Step.MIGRATE:
            with audited(rt, run, Step.MIGRATION_RESOLVED, host=source, vm=vm,
                         inputs={"resolves": r.seq, "started_by_run": r.run_id, "planned_target": target}) as rec:
                rec.details["note"] = f"the move of {vm} to {target} {note}) did not happen: it runs on {source}"
        elif now == (target,):
            with audited(rt, run, Step.MIGRATION_FOUND, host=source, vm=vm,
                         inputs={"target": target, "started_by_run": r.run_id, "resolves": r.seq}) as rec:
                rec.details["note"] = (f"{vm} left {source} for {target} in a move {note}) that was never "
                                       "recorded as done: that run ended before the move did, or lost sight of it")
                restore_autostart(rt, rec, vm, source, target, r.run_id)
            if rt.states.origins().get(vm) == target:
                rt.states.clear_origin(vm)
            log.warning("%s: %s was found on %s: moved by run %s, which never recorded it", source, visible(vm),
                        target, r.run_id)
            found.append(vm)
    return found


def _unreachable(rt: Runtime, hosts: Sequence[str]) -> list[str]:
    """Which of ``hosts`` do not answer now (asked once each)."""
    lost = []
    for h in hosts:
        try:
            rt.hypervisor.running_vms(h)
        except TransientDriverError:
            lost.append(h)
    return lost


def _still_home(rt: Runtime, vm: str, source: str) -> bool:
    """Whether ``vm``, whose origin is recorded as ``source``, runs there alone now (asked, not assumed)."""
    if rt.states.origins().get(vm) != source:
        return False
    try:
        return rt.hypervisor.locate(vm) == (source,)
    except DriverError:
        return False  # cannot tell: keep the origin, the VM may be away


def link_figures(inventory: Inventory, states: HostStateStore, cluster: str) -> dict[str, LinkFigure]:
    """Each host's migration link as the scheduler will use it, and where the figure came from:
    the inventory (host, then cluster), else what its past drains measured, else the default."""
    cluster_mib_s = inventory.cluster(cluster).link_bandwidth_mib_s
    return {h.name: resolve_link(h.link_bandwidth_mib_s, cluster_mib_s, states.link_observations(h.name),
                                 DEFAULT_LINK_MIB_S)
            for h in inventory.hosts_of(cluster)}


def drain_share(rt: Runtime, plan: EvacuationPlan, hosts_at_once: int = 1) -> int:
    """The slots of the cluster's migration limit a drain of ``plan`` holds: what its sources can use
    with the links the scheduler will see and the cluster's drain settings (``slots_per_drain``).

    The drains that may want slots beside it: ``hosts_at_once`` (what a window runs at once), or the
    hosts of the cluster in maintenance and not drained yet, whichever is more."""
    return _share(rt, plan.hosts, plan.cluster, hosts_at_once)


def focus_at_once(rt: Runtime, hosts: Sequence[str], cluster: str) -> int:
    """The migrations a drain of ``hosts`` will run at once, as its focused plan counts them (the fewest
    targets it needs): its share of the cluster's slots (:func:`drain_share`) as the cluster stands now."""
    return _share(rt, hosts, cluster, 1)


def _share(rt: Runtime, hosts: Sequence[str], cluster: str, hosts_at_once: int) -> int:
    figures = link_figures(rt.inventory, rt.states, cluster)
    policy, options = drain_settings(rt.inventory, cluster)
    links = {h: figures[h].mib_s if h in figures else policy.default_link_mib_s for h in hosts}
    records = rt.states.all()
    undrained = sum(1 for h in rt.inventory.hosts_of(cluster)
                    if h.name in records and records[h.name].state in (HostState.CORDONED, HostState.DRAINING))
    return slots_per_drain(links, rt.inventory.cluster(cluster).limits, policy, options,
                           max(hosts_at_once, undrained, 1))


def drain_settings(inventory: Inventory, cluster: str) -> tuple[SchedulerPolicy, MigrationOptions]:
    """The scheduler policy and migration options of ``cluster``'s drains, from its ``migration`` settings."""
    m = inventory.cluster(cluster).migration
    policy = SchedulerPolicy(allow_post_copy=m.allow_post_copy, auto_converge=m.auto_converge,
                             auto_converge_max_initial_pct=m.max_upfront_throttle_pct,
                             tls_stream_factor=m.tls_stream_factor or DEFAULT_TLS_STREAM_FACTOR,
                             switchover_ms=m.switchover_ms)
    # tls: what the scheduler and the simulator expect of a stream (each migration's own route decides
    # whether it is encrypted: preferred may fall back); a SIMULATED fleet's migrations are never encrypted
    tls = m.tls is not MigrationTls.OFF and inventory.simulation is None
    options = MigrationOptions(parallel_connections=m.parallel_connections, bandwidth_mib_s=m.bandwidth_mib_s,
                               stall_seconds=m.stall_seconds, seconds_per_gib=m.seconds_per_gib,
                               min_budget_seconds=m.min_budget_seconds, tls=tls,
                               downtime_limit_ms=m.downtime_limit_ms)
    return policy, options


def run_migrations(rt: Runtime, run: RunContext, rec: StepRecord, plan: EvacuationPlan, limits: Limits,
                   cluster: str, *, snap: FleetSnapshot | None = None,
                   on_event: Callable[[DrainEvent], None] | None = None, dirty_rate: dict[str, float] | None = None,
                   cancel: Cancellation | None = None) -> DrainReport:
    """Run ``plan``'s migrations for the step ``rec`` records (a drain, a return, a rebalance, a resize's
    move), within ``limits``; the audit record says which link figures the scheduler used and
    what the drain saw of the links, and the state keeps the latter for the next drains."""
    figures = link_figures(rt.inventory, rt.states, cluster)
    rec.details["links"] = {h: {"mib_s": figures[h].mib_s, "basis": figures[h].basis,
                                **({"note": figures[h].note} if figures[h].note else {})}
                            for h in sorted({p.source for p in plan.placements}) if h in figures}
    inputs = _drain_inputs(rt, cluster, {h: f.mib_s for h, f in figures.items()}, snap)
    policy, options = drain_settings(rt.inventory, cluster)
    rec.details["migration_settings"] = rt.inventory.cluster(cluster).migration.model_dump(mode="json")
    configured = policy.switchover_ms
    policy = replace(policy, switchover_ms=switchover_start_ms(rt.states, cluster, policy.switchover_ms,
                                                                options.downtime_limit_ms or QEMU_DOWNTIME_LIMIT_MS))
    if policy.switchover_ms > configured:
        rec.details["switchover_start_ms"] = round(policy.switchover_ms, 1)
    route = _transport(rt, rec, plan, cluster)
    report = drain(plan, rt.hypervisor, limits, policy=policy, options=options, on_event=on_event,
                   dirty_rate=dirty_rate, cancel=cancel, route=route, target_usable=lambda h: _out_of_service(rt, h),
                   **inputs)
    learned = keep_switchover(rt.states, cluster, policy, report, run.run_id)
    # a simulated fleet runs on a scaled clock and shares no link: its rates say nothing of a link
    if report.links and not rt.simulated:
        rt.states.record_links(report.links, run.run_id)
        rec.details["links_observed"] = [{**asdict(o), "saturated": o.saturated} for o in report.links]
    if learned is not None:
        # the hosts switch over slower than the inventory says: the operator can start the drains there
        rec.details["switchover_learned_ms"] = round(learned, 1)
        rec.details["switchover_note"] = (
            f"a pause outgrew the downtime limit: the drain reserved {learned:.0f} ms for the switch-over from "
            f"then on, and the cluster's next drains start there (migration.switchover_ms is {configured:g})")
    if any(r.outcome is not StepOutcome.OK for r in report.results):
        # a migration that failed with its source's libvirtd gone may leave the VM paused there
        settle_stranded(rt, run, cluster)
    return report


def _out_of_service(rt: Runtime, host: str) -> str | None:
    """Why ``host`` takes no VMs now (its state and reason), or None when it is active: every plan's
    targets were active when it was made, and an operator's cordon or another run's maintenance since
    must stop what was not sent yet."""
    record = rt.states.get(host)
    if record.state is HostState.ACTIVE:
        return None
    return f"is {record.state.value} ({visible(record.reason or '')})" if record.reason else f"is {record.state.value}"


SWITCHOVER_RECENT = 5  # drains of a cluster whose learned switch-over the next one starts from


def switchover_start_ms(states: HostStateStore, cluster: str, configured_ms: float, limit_ms: float) -> float:
    """The switch-over reserve a drain of ``cluster`` starts with: the inventory's, or more when one of
    the cluster's last :data:`SWITCHOVER_RECENT` drains learned more (a drain learns only from a pause
    over the limit, too late for the migrations already in flight: its successors start there). After
    that many drains that learned nothing the figure goes, so a cluster whose hosts got faster is not
    held to it for ever (if they did not, a drain learns it again); it never leaves QEMU less than a
    tenth of the limit."""
    recent = [r for r in states.switchover_reserves(cluster, SWITCHOVER_RECENT) if r is not None]
    return min(max([configured_ms, *recent]), max(configured_ms, 0.9 * limit_ms))


def keep_switchover(states: HostStateStore, cluster: str, policy: SchedulerPolicy, report: DrainReport,
                    run_id: str | None) -> float | None:
    """Keep what the drain ``report`` (run with ``policy``) learned of ``cluster``'s switch-over for
    :func:`switchover_start_ms`, and return it (None: no pause outgrew the limit)."""
    learned = report.switchover_ms if (report.switchover_ms or 0.0) > policy.switchover_ms else None
    if any(r.outcome is StepOutcome.OK for r in report.results):  # a drain that moved nothing saw no pause
        states.record_switchover(cluster, learned, run_id)
    return learned


def settle_stranded(rt: Runtime, run: RunContext, cluster: str) -> list[str]:
    """Settle each VM of ``cluster`` that a live migration left paused on a host (its job ended, the
    domain paused for it: the source's libvirtd died at the switch-over), each with its audit record:
    run nowhere else, it runs again where it is (step ``vm-resumed``); running on exactly one other
    host, the migration completed and the paused copy is removed, as the source would have done
    (``stale-copy-removed``); otherwise (another copy paused too) it is left paused and recorded
    with outcome unknown: which copy is the VM is for an operator to say. A host that does not answer
    is asked again by the next run. Returns the VMs settled."""
    hv = rt.hypervisor
    if not isinstance(hv, StrandedVms):
        return []
    seen = _stranded_now(hv, [entry.name for entry in rt.inventory.hosts_of(cluster)])
    if seen:
        # a libvirtd that has just restarted recovers its migration jobs in a thread of its own, after it
        # answers: one cancelled in its perform phase reads paused with no job until libvirt resumes the
        # guest itself (seen on the lab). Only a VM still so a moment later is ours to settle.
        time.sleep(0.0 if rt.simulated else STRANDED_CONFIRM_S)
        again = _stranded_now(hv, list(seen))
        seen = {host: tuple(vm for vm in vms if vm in again.get(host, ())) for host, vms in seen.items()}
    settled = []
    for host, paused in seen.items():
        for vm in paused:
            try:
                others = [h for h in hv.locate(vm) if h != host]
                # a copy there that runs (not paused for a migration, ended or not)
                running = [h for h in others if vm not in hv.stranded(h)
                           and not (isinstance(hv, MigrationStates) and vm in hv.in_migration(h))]
            except DriverError:
                continue  # cannot tell whether a copy runs elsewhere: left as it is
            try:
                if _settle_one(rt, run, hv, vm, host, others, running):
                    settled.append(vm)
            except DriverError as exc:
                log.warning("%s: cannot settle %s, left paused by a migration: %s", host, visible(vm), visible(exc))
    return settled


STRANDED_CONFIRM_S = 3.0  # how long a VM must stay paused with no migration job before we settle it


def _stranded_now(hv: StrandedVms, hosts: list[str]) -> dict[str, tuple[str, ...]]:
    """The VMs each of ``hosts`` holds paused by an ended migration, for the hosts that hold any; a host
    that does not answer is left out (the next run asks again)."""
    found = {}
    for host in hosts:
        try:
            paused = hv.stranded(host)
        except DriverError:
            continue
        if paused:
            found[host] = paused
    return found


def _settle_one(rt: Runtime, run: RunContext, hv: StrandedVms, vm: str, host: str, others: list[str],
                running: list[str]) -> bool:
    if not others:
        with audited(rt, run, Step.VM_RESUMED, host=host, vm=vm, inputs={"paused_on": host}) as rec:
            hv.resume(vm, host)
            rec.details["note"] = (f"{vm} was paused on {host} by a migration that no longer runs and ran on "
                                   "no other host: resumed there")
        log.warning("%s: %s was left paused by an ended migration: resumed", host, visible(vm))
        return True
    if len(others) == 1 and running == others:
        with audited(rt, run, Step.STALE_COPY_REMOVED, host=host, vm=vm,
                     inputs={"paused_on": host, "runs_on": running[0]}) as rec:
            hv.discard_stale(vm, host, running[0])
            rec.details["note"] = (f"{vm} runs on {running[0]}; its copy on {host}, paused by that migration, "
                                   "which no longer runs, was removed (the source's part of the migration)")
        log.warning("%s: the stale copy of %s (it runs on %s) was removed", host, visible(vm), running[0])
        return True
    with audited(rt, run, Step.VM_RESUMED, host=host, vm=vm, inputs={"paused_on": host}) as rec:
        rec.outcome = StepOutcome.UNKNOWN
        rec.details["note"] = (f"{vm} is paused on {host} by a migration that no longer runs, and is also "
                               f"active on {', '.join(others)} (running on {', '.join(running) or 'none'}): "
                               "left as it is; which copy is the VM is for an operator to say")
    log.error("%s: %s paused by an ended migration and active on %s too: left as it is", host, visible(vm),
              ", ".join(others))
    return False


def _transport(rt: Runtime, rec: StepRecord, plan: EvacuationPlan, cluster: str) -> Callable[[str, str], Route] | None:
    """How the plan's migrations travel, read from its hosts now (the precheck's view may be old: a resumed
    run, an evacuation, certificates changed since). Under ``required`` a host that cannot take part
    stops the drain before any migration starts; ``preferred``'s fallbacks to plain are recorded."""
    if rt.simulated or not plan.placements or not needs_reading(rt.inventory, cluster):
        return None
    hosts = [h for p in plan.placements for h in (p.source, p.target)]
    transport = read_transport(rt.shell, rt.inventory, cluster, hosts)
    rec.details["transport"] = transport.summary()
    targets: dict[str, list[str]] = {}
    for p in plan.placements:
        targets.setdefault(p.source, []).append(p.target)
    refusals = list(dict.fromkeys(r for source, ts in targets.items() for r in transport.refusals(source, ts)))
    if refusals:
        raise StepError(f"refused before any migration: migration.tls is {transport.mode.value}: "
                        f"{render_refusals(refusals)}", plan.hosts[0] if plan.hosts else None, "drain")
    warnings = sorted({w for p in plan.placements if (w := transport.route(p.source, p.target).warning)})
    if warnings:
        rec.details["transport_warnings"] = warnings
        for warning in warnings:
            log.warning("%s", visible(warning))  # quotes what hosts said (their certificates)
    return transport.route


def _drain_inputs(rt: Runtime, cluster: str, link: dict[str, float],
                  snap: FleetSnapshot | None = None) -> dict[str, Any]:
    """What the drain scheduler needs besides the plan: each host's ``link``, and the targets' free
    memory now, so migrations in flight are counted against their target.

    ``snap``: a discovery the caller made just now, in the same step, under the same locks
    (None: discover now)."""
    if snap is None:
        snap = snapshot(rt, cluster)
    free = {h.name: sum(c.free_mib for c in h.cells) for h in snap.hosts}
    # Libvirt's free memory excludes the hugepage pool, so a hugepage-backed VM is counted against the
    # free pages of its size (summed over the cells), as the planner placed it, not against ``free``.
    pages: dict[str, dict[int, int]] = {}
    for h in snap.hosts:
        per_size = pages.setdefault(h.name, {})
        for c in h.cells:
            for hp in c.hugepages:
                per_size[hp.size_kib] = per_size.get(hp.size_kib, 0) + hp.free
    return {"bandwidth_mib_s": link, "target_free_mib": free, "target_free_hugepages": pages,
            "vm_memory_mib": {v.name: v.memory_mib for v in snap.vms},
            "vm_hugepage_kib": {v.name: v.hugepage_kib for v in snap.vms if v.hugepage_kib}}


def _audit_migration(rt: Runtime, run: RunContext, cluster: str, result: MigrationResult) -> None:
    rt.audit.append(AuditEntry(
        run_id=run.run_id, flow=run.flow, trigger=run.trigger, operator=run.operator, cluster=cluster,
        host=result.source, vm=result.vm, step=Step.MIGRATE, inputs={"target": result.target},
        outcome=result.outcome, duration_s=result.seconds,
        details={"simulated": rt.simulated, **result.model_dump(mode="json")}))


def stop_unmigratable(rt: Runtime, run: RunContext, plan: EvacuationPlan) -> list[str]:
    """Shut down the VMs whose policy says so, before the host reboots.

    Each is recorded before its shutdown is asked for: a run that dies in between still knows to
    start it again (:func:`start_unmigratable` reads the record, not the plan)."""
    stopped = []
    for action in plan.vm_actions:
        if action.action is not UnmigratableAction.SHUTDOWN:
            continue
        with audited(rt, run, Step.SHUTDOWN_VM, host=action.host, vm=action.vm,
                     inputs={"reason": action.reason}) as rec:
            if action.vm not in rt.hypervisor.running_vms(action.host):
                rec.outcome = StepOutcome.SKIPPED
                continue
            rt.states.record_stopped(action.vm, action.host, run.run_id)
            rt.hypervisor.shutdown(action.vm, action.host)
            stopped.append(action.vm)
    return stopped


def start_unmigratable(rt: Runtime, run: RunContext, host: str, plan: EvacuationPlan | None = None) -> list[str]:
    """Start again, on ``host`` once it is verified, every VM maintenance shut down there: those
    recorded by any run (a resumed run has no plan of the stop) and those of ``plan``."""
    state = rt.states.state(host)
    if state not in (HostState.VERIFYING, HostState.ACTIVE, HostState.CORDONED):
        # only a verified host (or one whose maintenance ended) takes its VMs back
        raise StepError(f"host {host} is {state.value}: its VMs start again only once it is verified",
                        host, Step.START_VM)
    names = set(rt.states.stopped_on(host))
    if plan is not None:
        names |= {a.vm for a in plan.vm_actions if a.action is UnmigratableAction.SHUTDOWN and a.host == host}
    started = []
    for vm in sorted(names):
        with audited(rt, run, Step.START_VM, host=host, vm=vm) as rec:
            if vm in rt.hypervisor.running_vms(host):
                rec.outcome = StepOutcome.SKIPPED
            else:
                rt.hypervisor.start(vm, host)
                started.append(vm)
            rt.states.clear_stopped(vm)
    return started


def report_shut_off(rt: Runtime, run: RunContext, host: str) -> list[str]:
    """The persistent VMs defined on ``host`` and shut off (not by maintenance: those it starts
    again). They stay defined where they are; the audit record (step ``shut-off-vms``) and the run's
    summary name them, since nobody would otherwise learn that a patched host holds them."""
    with audited(rt, run, Step.SHUT_OFF_VMS, host=host) as rec:
        if not isinstance(rt.hypervisor, ShutOffVms):
            rec.outcome = StepOutcome.SKIPPED
            rec.details["note"] = "the hypervisor driver cannot list shut-off VMs"
            return []
        ours = set(rt.states.stopped_on(host))
        off = [vm for vm in rt.hypervisor.shut_off_vms(host) if vm not in ours]
        rec.details["vms"] = off
        if off:
            rec.details["note"] = "defined on the host and shut off; left defined where they are"
            log.warning("%s: shut-off VMs left defined on it: %s", host, ", ".join(map(visible, off)))
        else:
            rec.outcome = StepOutcome.SKIPPED
        return off


def confirm_empty(rt: Runtime, run: RunContext, host: str, before: Step | None = None) -> None:
    """The gate before the update and before any reboot (``before`` names which, when it is one): no VM may run on
    ``host``. A VM found there (one started since the drain) is refused with a failed record, and a
    host whose state says it is empty (drained, patching, verifying) goes back to cordoned, its
    maintenance open, with a reason naming the VMs: the next run drains them and goes on."""
    inputs = {"before": before.value} if before is not None else {}
    with audited(rt, run, Step.CONFIRM_EMPTY, host=host, inputs=inputs) as rec:
        running = rt.hypervisor.running_vms(host)
        rec.details["running"] = list(running)
        if running:
            when = f" before the {before.value}" if before is not None else ""
            if rt.states.state(host) in EMPTY_STATES:
                rt.states.keep_out(host, f"not drained: {', '.join(running)} runs on it (started after its "
                                   f"drain{when}); run again to move it off", run.run_id)
            raise StepError(f"host {host} still runs {len(running)} VM(s): {', '.join(running)}; refused{when}: "
                            "it will not be patched or rebooted", host, Step.CONFIRM_EMPTY)
        if before is Step.REBOOT:
            # empty as libvirt sees it; the reboot goes over SSH: proven to reach that same machine, also
            # for a run that resumes a host whose precheck an earlier run did
            check_same_machine(rt, rec, host, refused="refused before the reboot", step=Step.CONFIRM_EMPTY)


EMPTY_STATES = frozenset({HostState.DRAINED, HostState.PATCHING, HostState.REBOOTING, HostState.VERIFYING})
"""States that say no VM runs on the host; a rebooting host keeps its state (its reboot may be under
way) and only the reason changes."""


def state_as_seen(rt: Runtime, host: str) -> HostRecord:
    """``host``'s record as an operator should read it: a state that says the host is empty (drained,
    patching, verifying) is checked against libvirt, and when VMs run there (a tenant started
    one after the drain, with no run of ours there to see it) it reads ``cordoned`` with a reason naming
    them and the state recorded. Nothing is written: the next run of the host drains them
    (:func:`~hostmaint.resume.drain_due`) or refuses to go on (:func:`confirm_empty`)."""
    record = rt.states.get(host)
    # a rebooting host runs nothing by then, and does not answer: nothing to ask
    if record.state not in EMPTY_STATES or record.state is HostState.REBOOTING:
        return record
    try:
        running = rt.hypervisor.running_vms(host)
    except DriverError:
        return record  # not answering (powered off for its repair): the recorded state is all there is
    if not running:
        return record
    return replace(record, state=HostState.CORDONED,
                   reason=f"not drained: {', '.join(running)} runs on it (started after its drain; recorded "
                          f"state {record.state.value}: {record.reason})")


# --- patching --------------------------------------------------------------------------


def precheck(rt: Runtime, run: RunContext, host: str) -> patching.Preflight:
    """Before the cordon: the host answers over SSH with a trusted key, has its package manager and
    the free space its policy asks for (:func:`patching.precheck`). A host that cannot be patched is
    refused while nothing has changed, not after its VMs were moved off it."""
    with audited(rt, run, Step.PRECHECK, host=host) as rec:
        try:
            # the repositories too: what would be updated is part of what the precheck records
            result = patching.preflight(rt.shell, host, rt.inventory.policy_for(host))
        except DriverError as exc:
            raise StepError(f"cannot be patched, nothing changed: {without_host(exc, host)}", host,
                             Step.PRECHECK) from exc
        except StepError as exc:
            raise StepError(f"cannot be patched, nothing changed: {without_host(exc, host)}", host,
                             Step.PRECHECK) from exc
        rec.details["precheck"] = _jsonable(result)
        try:
            check_same_machine(rt, rec, host)
        except DriverError as exc:
            raise StepError(f"cannot be patched, nothing changed: {without_host(exc, host)}", host,
                             Step.PRECHECK) from exc
        check_transport(rt, rec, host)
        return result


def check_same_machine(rt: Runtime, rec: StepRecord, host: str, *,
                       refused: str = "cannot be patched, nothing changed", step: Step = Step.PRECHECK) -> None:
    """Before the cordon, and again before a reboot: SSH and libvirt reach one machine. Otherwise StepError
    naming both names.

    The drain moves the VMs off the machine libvirt reaches and the update and reboot go to the one
    SSH reaches: with an address or a DNS name pointing at another hypervisor, that other one would
    be rebooted with its VMs on it. Its own name is the one thing both can be asked for. A host that
    cannot be asked raises the driver's error (a dropped connection stays retryable).
    """
    entry = rt.inventory.host(host)
    by_ssh = patching.nodename(rt.shell, host, step)
    by_libvirt = rt.hypervisor.discover(host).hostname
    rec.details["machine"] = {"ssh": by_ssh, "libvirt": by_libvirt}
    declared = entry.machine_names
    if declared is not None:
        # the operator named both: exactly those, whatever the usual matching would say
        rec.details["machine"]["declared"] = {"ssh": declared.ssh, "libvirt": declared.libvirt}
        wrong = [f"{what} ({where}) reaches a machine named {got!r}, the inventory's machine_names.{key} is "
                 f"{want!r}" for what, where, key, got, want in (
                     ("SSH", entry.ssh.address, "ssh", by_ssh, declared.ssh),
                     ("libvirt", entry.libvirt_uri, "libvirt", by_libvirt, declared.libvirt))
                 if not patching.same_name(got, want)]
        if wrong:
            raise StepError(f"{refused}: " + "; ".join(wrong) + ": the update and the reboot may go to another "
                            f"machine than the drain; correct {host}'s ssh.address, libvirt_uri or machine_names in "
                            "the inventory", host, step)
        return
    if not by_libvirt:
        rec.details["machine"]["note"] = "libvirt names no hostname here: not compared"
        return
    if not (patching.names_a_machine(by_ssh) and patching.names_a_machine(by_libvirt)):
        # two freshly installed hypervisors are both localhost.localdomain: equal names prove nothing
        raise StepError(f"{refused}: SSH ({entry.ssh.address}) reaches a machine named {by_ssh!r}, libvirt "
                        f"({entry.libvirt_uri}) one named {by_libvirt!r}: such a name is every unnamed machine's, "
                        "so nothing shows that the update and the reboot would go to the machine the drain "
                        f"empties; give {host} its own hostname (hostnamectl set-hostname)", host, step)
    if not patching.same_machine(by_ssh, by_libvirt):
        # libvirt canonicalises its name through the resolver (a CNAME's target): so does hostname -f there
        full = patching.canonical_name(rt.shell, host, step)
        rec.details["machine"]["ssh_canonical"] = full
        if full is not None and patching.same_machine(full, by_libvirt):
            return
        raise StepError(f"{refused}: SSH ({entry.ssh.address}) reaches a machine named "
                        f"{by_ssh!r}, libvirt ({entry.libvirt_uri}) one named {by_libvirt!r}: the update and the "
                        f"reboot would go to another machine than the drain; correct ssh.address or libvirt_uri of "
                        f"{host} in the inventory (if both are that one machine's names, declare them as its "
                        "machine_names)", host, step)


def check_transport(rt: Runtime, rec: StepRecord, host: str) -> None:
    """Before the cordon: every host a drain of ``host`` may use can migrate as its cluster's
    ``migration`` settings ask (TLS under ``required``, an address on the migration network); otherwise
    StepError naming each host and what is missing, while nothing has changed. The candidate targets
    are the cluster's hosts in service (cordon a broken one to leave it out)."""
    cluster = rt.cluster_of(host)
    if rt.simulated or not needs_reading(rt.inventory, cluster):
        rec.details["transport"] = "not checked: " + ("a simulated fleet" if rt.simulated else "migration.tls: off")
        return
    targets = [h.name for h in rt.inventory.hosts_of(cluster)
               if h.name != host and rt.states.state(h.name) is HostState.ACTIVE]
    transport = read_transport(rt.shell, rt.inventory, cluster, [host, *targets])
    rec.details["transport"] = transport.summary()
    refusals = transport.refusals(host, targets)
    if refusals:
        raise StepError(f"cannot be drained, nothing changed: migration.tls is {transport.mode.value}: "
                        f"{render_refusals(refusals)}", host, Step.PRECHECK)


def precheck_transport(rt: Runtime, run: RunContext, host: str) -> None:
    """An evacuation's precheck, before its cordon: :func:`check_transport` alone (an evacuation patches
    nothing, so it has no package precheck), audited."""
    with audited(rt, run, Step.PRECHECK, host=host, inputs={"checks": "migration transport"}) as rec:
        check_transport(rt, rec, host)


def patch(rt: Runtime, run: RunContext, host: str) -> tuple[patching.PackageDiff, patching.RebootDecision]:
    """Preflight, update with the host's policy, and record the package diff and reboot decision.

    The installed packages are recorded (step ``update-started``) before the package manager runs.
    When the connection drops while it runs, the update may have completed or not: the ``update``
    record says its outcome is unknown, the host stays ``patching`` with that reason, and the next run
    reads what changed from the host's package database against that list (step ``update-recovered``,
    :func:`recover_lost_update`) before it updates again. The diff returned counts both."""
    policy = rt.inventory.policy_for(host)
    confirm_empty(rt, run, host, Step.UPDATE)
    if rt.states.state(host) is not HostState.PATCHING:
        rt.states.transition(host, HostState.PATCHING, "patching", run.run_id)
    lost: TransientDriverError | None = None
    try:
        with audited(rt, run, Step.PREFLIGHT, host=host, inputs={"policy": policy.model_dump(mode="json")}) as rec:
            pre = patching.preflight(rt.shell, host, policy)
            rec.details["preflight"] = _jsonable(pre)
        recovered = recover_lost_update(rt, run, host)
        with audited(rt, run, Step.UPDATE_STARTED, host=host) as rec:
            before = patching.installed_packages(rt.shell, host)
            rec.details["packages_before"] = before
        with audited(rt, run, Step.UPDATE, host=host) as rec:
            try:
                result = patching.apply_updates(rt.shell, host, policy, package_manager=pre.package_manager)
                after = patching.installed_packages(rt.shell, host)
            except TransientDriverError as exc:
                lost = exc
                rec.outcome = StepOutcome.UNKNOWN
                rec.details["error"] = str(exc)
                rec.details["note"] = ("connection lost while the update ran: whether it completed is unknown; the "
                                       "next run reads what changed from the host's package database")
            except HostmaintError:
                # a failed transaction (a scriptlet, a full disk) can have changed packages all the same;
                # when they cannot be read now, the record lacks the diff and the next run reads it
                try:
                    failed_diff = patching.package_diff(before, patching.installed_packages(rt.shell, host))
                    rec.details["package_diff"] = _jsonable(failed_diff)
                except HostmaintError as unread:
                    rec.details["package_diff_unread"] = str(unread)
                raise
            else:
                diff = patching.package_diff(before, after)
                rec.details["package_diff"] = _jsonable(diff)
                rec.details["update"] = _jsonable(result)
        if lost is not None:
            rt.states.note(host, f"update outcome unknown (connection lost: {lost}); run again to read what "
                                 "changed from the host", run.run_id)
            raise StepError(f"connection lost during the update, its outcome is unknown ({without_host(lost, host)}); "
                            "the host stays patching; run again to read what changed from the host",
                            host, Step.UPDATE) from lost
        if recovered is not None:
            diff = patching.PackageDiff(installed=recovered.installed + diff.installed,
                                        upgraded=recovered.upgraded + diff.upgraded,
                                        removed=recovered.removed + diff.removed)
        with audited(rt, run, Step.REBOOT_DECISION, host=host) as rec:
            decision = patching.reboot_decision(rt.shell, host, policy)
            rec.details["decision"] = _jsonable(decision)
        return diff, decision
    except (StepError, DriverError) as exc:
        if lost is None:  # an unknown outcome is not a failure: the host stays patching for the next run
            fail_host(rt, run, host, f"patch failed: {exc}")
        raise


UPDATE_STEPS = (Step.UPDATE_STARTED, Step.UPDATE, Step.UPDATE_RECOVERED)


def recover_lost_update(rt: Runtime, run: RunContext, host: str) -> patching.PackageDiff | None:
    """What an earlier update of ``host`` changed when that was never recorded (the connection dropped,
    or the run died, while the package manager ran; it failed and the packages could not be read after
    it; a recovery before this one failed): the host's packages now against the list
    recorded before it ran, recorded as step ``update-recovered``. None when the last update's outcome
    is known."""
    records = rt.audit.records(host=host, steps=UPDATE_STEPS)
    starts = [i for i, r in enumerate(records) if r.step == Step.UPDATE_STARTED and r.outcome is StepOutcome.OK]
    if not starts:
        return None
    started = records[starts[-1]]
    # a recovery that failed (the connection dropped again) recorded nothing, nor did a failed update
    # whose changes could not be read: both are still owed
    if any((r.step == Step.UPDATE_RECOVERED and r.outcome in (StepOutcome.OK, StepOutcome.SKIPPED))
           or (r.step == Step.UPDATE and r.outcome is not StepOutcome.UNKNOWN
               and (r.outcome is not StepOutcome.FAILED or "package_diff" in r.details))
           for r in records[starts[-1] + 1:]):
        return None
    with audited(rt, run, Step.UPDATE_RECOVERED, host=host,
                 inputs={"update_started_seq": started.seq, "update_run": started.run_id}) as rec:
        now = patching.installed_packages(rt.shell, host)
        diff = patching.package_diff(dict(started.details.get("packages_before") or {}), now)
        rec.details["package_diff"] = _jsonable(diff)
        rec.details["note"] = (f"the update of run {started.run_id} ended without a known outcome; what it changed "
                               "was read from the host's package database against the list recorded before it ran")
        if diff.empty:
            rec.outcome = StepOutcome.SKIPPED
        log.warning("%s: the update of run %s had an unknown outcome; it changed %s", host, started.run_id,
                    diff.summary())
        return diff


def reboot(rt: Runtime, run: RunContext, host: str) -> patching.RebootResult:
    """Reboot an empty host and wait for a new boot id.

    The boot id before the reboot is recorded (step ``reboot-issued``) before the reboot is asked
    for: a run that dies while the host reboots leaves it ``rebooting``, and only that id lets the
    next run tell a reboot that happened from one that never did (:func:`prove_reboot`)."""
    policy = rt.inventory.policy_for(host)
    confirm_empty(rt, run, host, Step.REBOOT)
    # what verify compares the host with after the reboot, also when the run verifying it is another
    cells = rt.hypervisor.discover(host).cells
    rt.states.transition(host, HostState.REBOOTING, "rebooting", run.run_id)

    def issued(boot_id: str) -> None:
        with audited(rt, run, Step.REBOOT_ISSUED, host=host) as rec:
            rec.details["boot_id_before"] = boot_id
            rec.details["cells_before"] = _jsonable(list(cells))

    try:
        with audited(rt, run, Step.REBOOT, host=host, inputs={"timeout_s": policy.reboot_timeout_s}) as rec:
            result = patching.reboot_and_wait(rt.shell, host, policy, before_issue=issued)
            rec.details["reboot"] = _jsonable(result)
            return result
    except (StepError, DriverError) as exc:
        fail_host(rt, run, host, f"reboot failed: {exc}")
        raise


def prove_reboot(rt: Runtime, run: RunContext, host: str) -> patching.RebootResult | None:
    """Prove the reboot an earlier run issued for a host it left ``rebooting``: proven, not assumed.

    With the boot id that run recorded before asking for the reboot (:func:`~hostmaint.resume.issued_boot_id`):
    a host that answers with another has rebooted; one that does not answer is waited for as a reboot
    is. One that still answers with it never rebooted (the run died before the command went out, or
    the host had not gone down yet): None, and so without a recorded id (the reboot was never asked
    for). The caller then reboots it as a fresh run does, the reboot gate and pre-reboot hooks first;
    :func:`reboot` proves it empty again."""
    policy = rt.inventory.policy_for(host)
    old = issued_boot_id(rt.states.get(host), rt.audit.records(host=host))
    if old is None:
        return None
    try:
        with audited(rt, run, Step.REBOOT, host=host, inputs={"resumed": True, "boot_id_before": old,
                                                              "timeout_s": policy.reboot_timeout_s}) as rec:
            try:
                now = patching.read_boot_id(rt.shell, host)
            except TransientDriverError:
                now = None  # down: rebooting right now
            if now == old:
                rec.details["note"] = "the host still ran the boot it had before: it never rebooted"
                rec.outcome = StepOutcome.SKIPPED
                return None
            result = patching.wait_for_new_boot(rt.shell, host, policy, old, time.monotonic())
            rec.details["reboot"] = _jsonable(result)
            return result
    except (StepError, DriverError) as exc:
        fail_host(rt, run, host, f"reboot failed: {exc}")
        raise


def verify(rt: Runtime, run: RunContext, host: str, cells_before: tuple[Cell, ...] | None) -> None:
    """Verify the host after patching: kernel, libvirtd, NUMA topology, the host's own checks.

    ``cells_before``: the topology this run saw before the update; a run that did not (it took the host
    up after the reboot another run issued) compares with the one recorded before that reboot."""
    policy = rt.inventory.policy_for(host)
    if cells_before is None:
        cells_before = cells_before_reboot(rt.audit.records(host=host, steps=(Step.CORDON, Step.REBOOT_ISSUED)))
    if rt.states.state(host) is not HostState.VERIFYING:
        rt.states.transition(host, HostState.VERIFYING, "verifying", run.run_id)
    try:
        with audited(rt, run, Step.VERIFY, host=host) as rec:
            # a host just back from its reboot may not answer every check yet (libvirtd still starting)
            report, attempts = patching.verify_host_settled(rt.shell, rt.hypervisor, host, policy,
                                                            cells_before=cells_before)
            rec.details["verify"] = _jsonable(report)
            if attempts > 1:
                rec.details["attempts"] = attempts
            if not report.ok:
                bad = [f"{c.name}: {c.detail}" for c in report.checks if not c.ok]
                raise StepError(f"host {host} failed verification: " + "; ".join(bad), host, Step.VERIFY)
            for check in report.warnings:  # passed, but an operator should know (a reboot pending by policy)
                log.warning("%s: %s: %s", host, check.name, visible(check.detail))  # host output in it
    except TransientDriverError:
        raise  # the host is not answering yet: the task retries, the host stays verifying
    except (StepError, DriverError) as exc:
        fail_host(rt, run, host, f"verify failed: {exc}")
        raise


def _jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if hasattr(value, "__dataclass_fields__"):
        from dataclasses import asdict

        return _jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


# --- return and rebalance ----------------------------------------------------------------


def plan_return(rt: Runtime, host: str, snap: FleetSnapshot | None = None) -> EvacuationPlan:
    """Plan moving back the VMs whose recorded origin is ``host``, where the host still has room.

    A VM that no longer fits stays where it is (recorded), since a return is an
    optimisation, never a reason to overload a host. ``snap``: the cluster discovered just
    now (None: discover now).
    """
    cluster = rt.cluster_of(host)
    if snap is None:
        snap = snapshot(rt, cluster)
    target = snap.host(host)
    if target.state is not HostState.ACTIVE:
        return EvacuationPlan(cluster=cluster, hosts=(), snapshot_digest=snap.digest())
    origins = rt.states.origins(host)
    placements = plan_return_home(snap, host, [vm for vm, origin in origins.items() if origin == host])
    return EvacuationPlan(cluster=cluster, hosts=(), snapshot_digest=snap.digest(), placements=tuple(placements))


def return_vms(rt: Runtime, run: RunContext, host: str, *,
               on_event: Callable[[DrainEvent], None] | None = None,
               cancel: Cancellation | None = None) -> DrainReport | None:
    """Move back the VMs that left ``host`` for its maintenance; clear their origin once home.

    ``cancel`` set while they move stops the return safely: nothing more starts, pre-copy moves are
    aborted (those VMs stay where they are, still away), and :class:`RunCancelled` is raised once every
    move has settled and is recorded."""
    with audited(rt, run, Step.RETURN_VMS, host=host) as rec:
        # one discovery serves the plan and the drain's free-memory view: both are taken at once,
        # in this step, under the same locks (it was discovered twice, a few ms apart)
        snap = snapshot(rt, rt.cluster_of(host))
        plan = plan_return(rt, host, snap)
        rec.details["plan"] = plan.model_dump(mode="json")
        rec.details["found_moved"] = settle_earlier_moves(rt, run, plan.cluster)
        if not plan.placements:
            rec.outcome = StepOutcome.SKIPPED
            return None
        limits = rt.inventory.cluster(plan.cluster).limits
        record_moves(rt, run, plan, host)
        report = run_migrations(rt, run, rec, plan, limits, plan.cluster, snap=snap, on_event=on_event, cancel=cancel)
        for r in report.results:
            _audit_migration(rt, run, plan.cluster, r)
            if r.outcome in (StepOutcome.OK, StepOutcome.SKIPPED):
                rt.states.clear_origin(r.vm)
        rec.details["migrations"] = [r.model_dump(mode="json") for r in report.results]
        _raise_if_cancelled(rec, report, cancel, f"return of VMs to {host}", host)
        if not report.ok:
            rec.outcome = StepOutcome.FAILED
        return report


def _raise_if_cancelled(rec: StepRecord, report: DrainReport, cancel: Cancellation | None, what: str,
                        host: str | None) -> None:
    """After a return's or rebalance's moves settled: raise RunCancelled if it was cancelled."""
    if cancel is None or not cancel.is_set():
        return
    rec.details["cancelled_by"] = cancel.who()
    raise RunCancelled(f"{what} {cancel.reason}: {sum(r.outcome is StepOutcome.OK for r in report.results)} "
                       f"VM(s) moved, {len(report.failed)} left where they were", host, "moves")


def recheck_rebalance(rt: Runtime, run: RunContext, plan: RebalancePlan, planned_on: FleetSnapshot, *,
                      max_moves: int | None, prefer_origin: bool = True,
                      within: float | None = None,
                      exact_budget: float = DEFAULT_BUDGET) -> tuple[RebalancePlan, FleetSnapshot]:
    """The cluster discovered now, and the rebalance to run on it: ``plan`` (made on ``planned_on``
    with these settings) if it still stands, else a new plan made on it with its audit record (step
    ``replan``). For a caller that holds the plan's targets.

    A rebalance waits for its targets' locks while drains run: meanwhile a target can go into
    maintenance or fill up, and a VM can leave the host the plan moves it from."""
    now = snapshot(rt, plan.cluster)
    moves = EvacuationPlan(cluster=plan.cluster, hosts=(), snapshot_digest=plan.snapshot_digest,
                           placements=tuple(m.placement for m in plan.moves))
    reasons = stale_targets(moves, planned_on, now)
    where = {v.name: v.host for v in now.vms}
    reasons += [f"{m.placement.vm} is no longer on {m.placement.source}" for m in plan.moves
                if where.get(m.placement.vm) != m.placement.source]
    if not reasons:
        return plan, now
    with audited(rt, run, Step.REPLAN, cluster=plan.cluster,
                 inputs={"reasons": reasons, "replaces": plan.snapshot_digest, "rebalance": True}) as rec:
        fresh = plan_rebalance(now, max_moves, prefer_origin=prefer_origin, within=within, exact_budget=exact_budget)
        rec.details["plan"] = fresh.model_dump(mode="json")
        log.info("rebalance of %s: the cluster changed while it waited (%s); re-planned:\n%s", plan.cluster,
                 visible("; ".join(reasons)), render_plan(fresh))
    return fresh, now


def rebalance(rt: Runtime, run: RunContext, plan: RebalancePlan, *,
              on_event: Callable[[DrainEvent], None] | None = None,
              cancel: Cancellation | None = None) -> DrainReport | None:
    """Carry out a rebalance plan's moves within the cluster's limits.

    ``cancel`` set while they run stops it safely, as for :func:`return_vms`."""
    limits = rt.inventory.cluster(plan.cluster).limits
    with audited(rt, run, Step.REBALANCE, cluster=plan.cluster,
                 inputs={"moves": len(plan.moves), "snapshot": plan.snapshot_digest}) as rec:
        rec.details["found_moved"] = settle_earlier_moves(rt, run, plan.cluster)
        if not plan.moves:
            rec.outcome = StepOutcome.SKIPPED
            return None
        evac = EvacuationPlan(cluster=plan.cluster, hosts=(), snapshot_digest=plan.snapshot_digest,
                              placements=tuple(m.placement for m in plan.moves))
        record_moves(rt, run, evac)
        report = run_migrations(rt, run, rec, evac, limits, plan.cluster, on_event=on_event, cancel=cancel)
        for r in report.results:
            _audit_migration(rt, run, plan.cluster, r)
            if r.outcome is StepOutcome.OK and rt.states.origins().get(r.vm) == r.target:
                rt.states.clear_origin(r.vm)
        rec.details["balance_before"] = plan.balance_before
        rec.details["balance_after"] = plan.balance_after
        _raise_if_cancelled(rec, report, cancel, f"rebalance of {plan.cluster}", None)
        if not report.ok:
            rec.outcome = StepOutcome.FAILED
        return report


# --- invariants -------------------------------------------------------------------------------


def shut_off_where(rt: Runtime, cluster: str, vms: Sequence[str]) -> dict[str, dict[str, str]]:
    """For each of ``vms`` shut off on hosts of ``cluster``: host -> libvirt's reason. Hosts that do not
    answer (rebooting) and drivers that cannot say are left out."""
    if not isinstance(rt.hypervisor, ShutOffReasons):
        return {}
    wanted = set(vms)
    found: dict[str, dict[str, str]] = {}
    for entry in rt.inventory.hosts_of(cluster):
        try:
            reasons = rt.hypervisor.shut_off_reasons(entry.name)
        except DriverError:
            continue
        for vm, reason in reasons.items():
            if vm in wanted:
                found.setdefault(vm, {})[entry.name] = reason
    return found


def stopped_outside(rt: Runtime, run: RunContext | None, off: Mapping[str, Mapping[str, str]]
                    ) -> dict[str, tuple[str, str]]:
    """Of VMs running nowhere and shut off where ``off`` says: those stopped outside hostmaint, vm ->
    (host, reason). On one host libvirt's reason says its guest shut down or someone
    destroyed it (hostmaint destroys no running VM; its policy stops are recorded, in the host states
    and the trail, and are not taken for a tenant's), or this run recorded it so before (libvirtd
    forgets the reason when the host reboots). Each is recorded once per run, with a warning: nobody
    else would learn that a tenant's VM is down."""
    earlier: dict[str, tuple[str, str]] = {}
    moving: dict[str, str] = {}  # vm -> the source its migration found it stopped on, this run
    if run is not None and off:
        for r in rt.audit.records(run_id=run.run_id, steps=(Step.VM_STOPPED_OUTSIDE, Step.MIGRATE)):
            if r.vm is None:
                continue
            if r.step == Step.VM_STOPPED_OUTSIDE:
                earlier[r.vm] = (r.host or "", r.details.get("reason", "unknown"))
            elif r.details.get("stopped_outside") and r.details.get("source"):
                moving[r.vm] = str(r.details["source"])
    found: dict[str, tuple[str, str]] = {}
    for vm, hosts in sorted(off.items()):
        if vm in earlier and earlier[vm][0] in hosts:
            found[vm] = earlier[vm]
            continue
        # one host where it stopped so; a definition elsewhere (shut off: migrated, unknown) is a stale
        # copy another tool left, which runs nowhere either
        stopped_here = [(h, reason) for h, reason in sorted(hosts.items()) if reason in STOPPED_OUTSIDE_REASONS]
        if len(stopped_here) > 1 and moving.get(vm) in hosts:
            # stopped while it moved: the migration found it stopped on its source; the target's copy that
            # libvirt tore down may read "destroyed" too where the driver did not see it come in
            stopped_here = [(h, reason) for h, reason in stopped_here if h == moving[vm]]
        if len(stopped_here) != 1 or _shut_down_by_us(rt, vm, stopped_here[0][0]):
            continue
        host, reason = found[vm] = stopped_here[0]
        log.warning("%s stopped outside hostmaint during maintenance: shut off on %s (%s); left as it is",
                    visible(vm), visible(host), reason)
        if run is not None:
            with audited(rt, run, Step.VM_STOPPED_OUTSIDE, host=host, vm=vm, inputs={"reason": reason}) as rec:
                rec.details["reason"] = reason
                rec.details["note"] = ("its guest shut down or someone destroyed it (libvirt's reason); not "
                                       "stopped by hostmaint, not started again by it, left as it is (defined "
                                       "where it stopped; a transient guest leaves no definition)")
    return found


def _shut_down_by_us(rt: Runtime, vm: str, host: str) -> bool:
    """Whether the trail's last word on ``vm`` at ``host`` is a shutdown hostmaint asked for (its policy's,
    ``shutdown-vm``) and no start since: libvirt words that "shutdown" as it does a guest's own, and a
    lost stop record must not turn our stop into a tenant's."""
    last = [r for r in rt.audit.records(host=host, steps=(Step.SHUTDOWN_VM, Step.START_VM)) if r.vm == vm]
    return bool(last) and last[-1].step == Step.SHUTDOWN_VM and last[-1].outcome is not StepOutcome.SKIPPED


def check_invariants(rt: Runtime, cluster: str, expected: Sequence[str], *,
                     stopped: Sequence[str] = (), run: RunContext | None = None) -> dict[str, str]:
    """Every expected VM runs exactly once (VMs stopped by their policy: not at all).

    A VM that runs nowhere because its guest shut down or a tenant destroyed it while its host was in
    maintenance is not ours to have lost: :func:`stopped_outside` finds it by libvirt's word, records it
    (step ``vm-stopped-outside``, once per ``run``) and it is no breach. Vanished, crashed, or shut off
    for any other reason, it is one, and the message says which.

    Returns vm → host. Raises StepError naming every VM that is missing or doubled.
    A rebooting host cannot be asked; it was proven empty before its reboot. A copy paused for a
    live migration (another run's drain may be moving VMs right now) is not a second run of the
    VM; a VM seen only paused for one (at its switch-over) is in transit, not missing. A VM another
    run shuts down (or has shut down) by its policy may run once or not at all: that run records it
    before asking, and starts it again after its host's maintenance. A VM paused on a host by a
    migration that no longer runs (:func:`settle_stranded`) does not run: a problem.
    """
    elsewhere = set(rt.states.stopped()) - set(stopped)
    where: dict[str, list[str]] = {}
    transit: dict[str, list[str]] = {}
    for entry in rt.inventory.hosts_of(cluster):
        try:
            names = rt.hypervisor.running_vms(entry.name)
            moving = set(rt.hypervisor.in_migration(entry.name)) if isinstance(rt.hypervisor, MigrationStates) \
                else set()
        except TransientDriverError:
            if rt.states.state(entry.name) in (HostState.REBOOTING, HostState.PATCHING, HostState.FAILED):
                continue
            raise
        for name in names:
            (transit if name in moving else where).setdefault(name, []).append(entry.name)
    problems = []
    if isinstance(rt.hypervisor, StrandedVms):
        for entry in rt.inventory.hosts_of(cluster):
            try:
                paused = rt.hypervisor.stranded(entry.name)
            except TransientDriverError:
                continue  # asked above: a host in maintenance that does not answer holds nothing
            problems += [f"{vm} is paused on {entry.name} by a migration that no longer runs (a run of "
                         "hostmaint resumes it when it runs nowhere else)" for vm in paused if vm in expected]
    missing = [vm for vm in expected
               if vm not in stopped and not where.get(vm) and vm not in transit and vm not in elsewhere]
    off = shut_off_where(rt, cluster, missing) if missing else {}
    outside = stopped_outside(rt, run, off)
    for vm in expected:
        hosts = where.get(vm, [])
        if vm in stopped:
            if hosts:
                problems.append(f"{vm} should be stopped but runs on {', '.join(hosts)}")
        elif len(hosts) > 1:
            problems.append(f"{vm} runs {len(hosts)} times ({', '.join(hosts)})")
        elif vm in missing and vm not in outside:
            seen = off.get(vm, {})
            how = ("; defined on no host" if not seen else
                   "; shut off on " + ", ".join(f"{h} ({reason})" for h, reason in sorted(seen.items())))
            problems.append(f"{vm} runs 0 times (nowhere{how})")
    if problems:
        error = StepError("invariant broken: " + "; ".join(problems), None, Step.INVARIANTS)
        if run is not None:
            # the run stops here: its trail must say why, not only its log (a record of the breach)
            with audited(rt, run, Step.INVARIANTS, cluster=cluster, inputs={"expected": len(expected),
                                                                            "stopped": sorted(stopped)}) as rec:
                rec.details["problems"] = problems
                raise error
        raise error
    return {vm: hosts[0] for vm, hosts in where.items() if hosts}
