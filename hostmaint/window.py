"""Maintenance windows: when a host may still start, in what order hosts go, how long one takes,
and whether the cluster has room for one more host in maintenance.

Pure: time comes in as a parameter (``now``), so a table of times tests it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from hostmaint.inventory import Inventory
from hostmaint.migration.policy import DEFAULT_LINK_MIB_S
from hostmaint.models import CapacityCheck, FleetSnapshot

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


def room_for(snapshot: FleetSnapshot, in_maintenance: Sequence[str], host: str) -> CapacityCheck:
    """Whether the window may start ``host`` now: the N+1 check with it out as well as the hosts
    already in maintenance, on a discovery made just now.

    The VMs still on hosts in maintenance (not moved yet) count as load the others must take;
    hosts missing from the discovery (rebooting) hold nothing and are out already.
    """
    from hostmaint.placement import check_capacity

    known = {h.name for h in snapshot.hosts}
    return check_capacity(snapshot, [h for h in in_maintenance if h in known and h != host] + [host])
