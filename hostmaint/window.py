"""Maintenance windows: when a host may still start, in what order hosts go, how long one takes,
and whether the cluster has room for one more host in maintenance.

Pure: time comes in as a parameter (``now``), so a table of times tests it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from hostmaint.audit import AuditRecord
from hostmaint.inventory import Inventory
from hostmaint.migration.policy import DEFAULT_LINK_MIB_S
from hostmaint.models import CapacityCheck, FleetSnapshot, HostState
from hostmaint.state import MAINTENANCE_STATES, HostRecord

# What a host costs besides moving memory: package update and verification. Deliberately
# pessimistic; once a host of the window has finished, its real duration is used instead.
PATCH_SECONDS = 300.0


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class WindowClock:
    """The end of a window, and whether work of a given length still fits before it."""

    end: datetime | None
    now: Callable[[], datetime] = field(default=_utcnow)

    def contains(self, at: datetime) -> bool:
        return self.end is None or at < self.end

    def fits(self, seconds: float) -> bool:
        """True when work started now and lasting ``seconds`` ends inside the window."""
        return self.contains(self.now() + timedelta(seconds=seconds))

    def remaining(self) -> float | None:
        return None if self.end is None else (self.end - self.now()).total_seconds()


def estimate_host_seconds(snapshot: FleetSnapshot, host: str, inventory: Inventory,
                          link_mib_s: float | None = None) -> float:
    """A pessimistic estimate of one host's maintenance: drain + patch + reboot timeout.

    ``link_mib_s``: the host's link as the drain will use it (measured, say); default: the inventory's."""
    entry = inventory.host(host)
    cluster = inventory.cluster(entry.cluster)
    bandwidth = link_mib_s or entry.link_bandwidth_mib_s or cluster.link_bandwidth_mib_s or DEFAULT_LINK_MIB_S
    memory = sum(v.memory_mib for v in snapshot.vms_on(host))
    drain = memory / bandwidth * 1.5  # re-sent dirty pages and per-migration overhead
    policy = inventory.policy_for(host)
    reboot = policy.reboot_timeout_s if policy.reboot.value != "never" else 0.0
    return drain + PATCH_SECONDS + reboot


def host_budget_s(estimate_s: float, finished_s: Sequence[float] = ()) -> float:
    """How long a host of the window is given to finish: its own estimate, or the longest a host of
    this window actually took when that was longer. A quick host before it never shortens it: the
    estimate is what its drain, update and reboot may take, and a host that starts with less time
    left than that may still be in maintenance when the window ends."""
    return max([estimate_s, *finished_s])


def window_left(window_id: str, cluster: str, left: Sequence[str], started: Sequence[str],
                failure_limit: bool, clock: WindowClock) -> str:
    """What a window leaves undone and how to resume it, in one paragraph for the operator."""
    why = "the failure limit was reached" if failure_limit else "the window ends before they could finish"
    text = (f"window {window_id} {'started no host' if not started else f'patched or tried {len(started)} host(s)'}"
            f": {len(left)} host(s) of {cluster} left unpatched ({', '.join(left)}), {why}")
    remaining = clock.remaining()
    if remaining is not None and clock.end is not None and not failure_limit:
        end = clock.end.astimezone(UTC)
        text += f" ({max(remaining, 0):.0f}s left of the window, ending {end:%Y-%m-%d %H:%M:%S} UTC)"
    return (text + f". Resume in a later window with the same id: hostmaint window run {cluster} --window-id "
            f"{window_id} --window-end <time>; hosts patched already are skipped.")


def window_order(snapshot: FleetSnapshot, hosts: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """The order hosts are patched in, and the hosts the window must leave out.

    The order is the planner's rolling-window order (VMs move onto already-patched
    hosts, about one migration per VM). Left out are hosts whose VMs' policy says
    ``skip-host``; the window reports them instead of dropping them silently.
    """
    from hostmaint.placement import plan_window

    wanted = list(hosts) if hosts else [h.name for h in snapshot.hosts]
    unknown = [h for h in wanted if h not in {x.name for x in snapshot.hosts}]
    if unknown:
        raise KeyError(f"unknown host(s) in cluster {snapshot.cluster}: {', '.join(unknown)}")
    plan = plan_window(snapshot, wanted)
    order = [h for h in plan.order if h in wanted]
    left_out = [h for h in wanted if h not in order]
    return order, left_out


def left_rebooting(cluster_hosts: Sequence[str], snapshot: FleetSnapshot, records: Mapping[str, HostRecord],
                   hosts: Sequence[str] | None = None) -> list[str]:
    """The hosts of the cluster (or of ``hosts``) an earlier run left rebooting, in the cluster's order.

    The discovery leaves a rebooting host out (it may not answer), so the window's order lacks it,
    yet it is in maintenance, out of service, and this window's to finish: a run killed while it
    rebooted left it there."""
    known = {h.name for h in snapshot.hosts}
    return [h for h in cluster_hosts if h not in known and (not hosts or h in hosts)
            and (record := records.get(h)) is not None and record.state is HostState.REBOOTING]


def room_for(snapshot: FleetSnapshot, in_maintenance: Sequence[str], host: str) -> CapacityCheck:
    """Whether the window may start ``host`` now: the N+1 check with it out as well as the hosts
    already in maintenance, on a discovery made just now.

    The VMs still on hosts in maintenance (not moved yet) count as load the others must take;
    hosts missing from the discovery (rebooting) hold nothing and are out already.
    """
    from hostmaint.placement import check_capacity

    known = {h.name for h in snapshot.hosts}
    return check_capacity(snapshot, [h for h in in_maintenance if h in known and h != host] + [host])


class Held(StrEnum):
    """Why a window leaves a host alone: an operator took it out of service on purpose."""

    EVACUATED = "evacuated"  # an evacuation (on demand or an incident runbook's) left it in its maintenance
    CORDONED = "cordoned"  # cordoned outside any maintenance: an operator's cordon, or an incident's


# Flows that take a host out on purpose. A maintenance begun by any other run (a patch of this window or
# another) is one a patch run finishes, as before.
_EVACUATING_FLOWS = frozenset({"evacuate-host", "evacuate-on-request"})


def _evacuating(flow: str) -> bool:
    return flow in _EVACUATING_FLOWS or flow.endswith("-runbook")


@dataclass(frozen=True)
class HostHold:
    """A host the window leaves alone: how it was taken out, why, by whom (the run's operator), since when."""

    host: str
    held: Held
    reason: str
    by: str
    flow: str
    since: datetime

    def detail(self) -> str:
        """The window's summary line for the host, saying how to include it."""
        how = (f"hostmaint host return {self.host}" if self.held is Held.EVACUATED
               else f"hostmaint host uncordon {self.host}")
        return (f"left alone: {self.held.value} by {self.by} ({self.flow}, since "
                f"{self.since.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC): {self.reason}; to patch it in a window, "
                f"return it to service first ({how}), then run the window again")


# State reasons that only repeat the state's name: what a drain writes as it goes ("draining", "drained")
_STATE_WORDS = frozenset(s.value for s in HostState)


def status_reason(state_reason: str, hold: HostHold | None) -> str:
    """What ``host status`` says of why a host is out: for a host an evacuation took out, the
    evacuation's reason and who asked for it (the state's own reason at that point is a drain's
    "drained", which says what, not why), then the state's reason when it adds to it (a drain that
    failed, a VM started since); otherwise the state's reason as it is."""
    if hold is None or hold.held is not Held.EVACUATED:
        return state_reason
    text = f"{hold.reason or 'no reason given'} (evacuated by {hold.by}, {hold.flow})"
    if state_reason and state_reason != hold.reason and state_reason not in _STATE_WORDS:
        text += f"; {state_reason}"
    return text


def operator_hold(record: HostRecord, history: Sequence[HostRecord],
                  audit: Sequence[AuditRecord]) -> HostHold | None:
    """Whether a window leaves ``record``'s host alone, and why; None: the window takes it.

    Left alone: a host cordoned outside any maintenance (an operator's or an incident's cordon: its
    reason is theirs), and a host whose current maintenance an evacuation began (drained, say: its
    reason is the evacuation's, read from the record that began it). Taken: an active host, a failed one
    (as before: its patch refuses it until an operator resets it), and a maintenance a patch run began
    (a window run again goes on with the hosts it left mid-way). ``history``: the host's records, oldest
    first (:meth:`HostStateStore.history`); ``audit``: its audit records, which name each run's flow and
    operator. Naming the host in the window's ``hosts`` does not take it: a deployment's parameters name
    hosts too, and a patch run would end by putting an evacuated host back into service."""
    # each run's latest record: an incident runbook's later records carry its approver's name
    runs = {r.run_id: (r.flow, r.operator) for r in audit if r.run_id is not None}
    if record.state is HostState.CORDONED and record.prior_state is None:
        # a maintenance that found it cordoned so leaves it with the same reason: who set it aside first
        origin = record
        for earlier in reversed(history):
            if earlier.prior_state is not None:
                continue
            if earlier.state is not HostState.CORDONED or earlier.reason != record.reason:
                break
            origin = earlier
        flow, by = runs.get(origin.run_id or "", ("unknown", "unknown"))
        return HostHold(record.host, Held.CORDONED, record.reason, by, flow, origin.since)
    if record.prior_state is None or record.state not in {*MAINTENANCE_STATES, HostState.CORDONED}:
        return None
    began = record
    for earlier in reversed(history):
        if earlier.prior_state is None:
            break
        began = earlier
    flow, by = runs.get(began.run_id or "", ("unknown", "unknown"))
    if not _evacuating(flow):
        return None
    return HostHold(record.host, Held.EVACUATED, began.reason, by, flow, began.since)


def hosts_held(order: Sequence[str], holds: Mapping[str, HostHold | None]) -> tuple[list[str], list[HostHold]]:
    """The hosts of ``order`` the window takes, in order, and those it leaves alone (``holds``)."""
    taken = [h for h in order if holds.get(h) is None]
    held = [hold for h in order if (hold := holds.get(h)) is not None]
    return taken, held


def unfinished_first(order: Sequence[str], records: Mapping[str, HostRecord]) -> list[str]:
    """``order`` with the hosts in an unfinished maintenance first, each group in its own order.

    A host an earlier run left in maintenance (draining to verifying, or cordoned with the state it
    had before kept) is out of service already: while it stays out, the N+1 check of any other host
    counts it as lost and may refuse the host. A re-run finishes it before it takes another out."""

    def unfinished(host: str) -> bool:
        record = records.get(host)
        return record is not None and (record.state in MAINTENANCE_STATES or (
            record.state is HostState.CORDONED and record.prior_state is not None))

    return [h for h in order if unfinished(h)] + [h for h in order if not unfinished(h)]


def window_held(window_id: str, cluster: str, held: Sequence[HostHold], started: Sequence[str]) -> str:
    """What a window left alone on purpose, in one paragraph for the operator."""
    names = ", ".join(f"{h.host} ({h.held.value} by {h.by}: {h.reason})" for h in held)
    return (f"window {window_id} {'started no host' if not started else f'patched or tried {len(started)} host(s)'}"
            f": {len(held)} host(s) of {cluster} left alone, taken out of service by an operator: {names}. "
            "A window patches such a host once it is back in service (hostmaint host return HOST after an "
            "evacuation, hostmaint host uncordon HOST after a cordon); run the window again then.")
