"""Evacuation: where every VM of the hosts being drained goes, and the N+1 check before it.

The procedure, as ``plan_evacuation`` runs it:

1. N+1: the cluster must absorb the drained hosts' VMs and still survive the
   loss of its largest remaining host(s) (``check_capacity``).
2. Policy: VMs that cannot live-migrate follow ``on_unmigratable`` — block the
   host (a Blocker with the override hint), shut down and start after, or
   leave the host out of the plan altogether.
3. Placement, hardest VMs first (vNUMA, pinned, hugepages, then by size):
   each VM goes where the balance objective grows least, among active hosts of
   the same CPU group that are not drained. Order: NUMA-local before remote, and
   within each by the target's rank (:data:`Ranks`: focus hosts, other hosts,
   hosts due for maintenance, hosts another drain fills now). A VM that fits
   nowhere is a Blocker naming the
   constraint that stopped it on most hosts.

Pure and deterministic: hosts and VMs are taken in sorted order and ties are
broken by name.
"""

from __future__ import annotations

import copy
import heapq
import math
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from hostmaint.bulk import collector_paused
from hostmaint.errors import InputError
from hostmaint.models import (
    Balance,
    Blocker,
    CapacityCheck,
    EvacuationPlan,
    FleetSnapshot,
    HostState,
    Placement,
    PlanProof,
    UnmigratableAction,
    Vm,
    VmAction,
)
from hostmaint.placement import bounds, exact
from hostmaint.placement.fit import Demand, Miss, could_fit, demand_of, fit_host
from hostmaint.placement.ledger import Fit, HostLoad, Ledger
from hostmaint.placement.objective import balance, fit_delta, measure

GIB = 1024

# How much a plan wants a target, best first. A VM goes to a worse rank only when it fits no host of
# a better one (NUMA-local first, always): the placement's tier after locality.
Ranks = Mapping[str, int]
PREFERRED = 0  # one of the hosts this drain focuses on (or any host, without focus)
UNFOCUSED = 1  # a good host, outside the few this drain sends to
DUE = 2  # due for maintenance later (``avoid``); with focus, one of the few of those
DUE_UNFOCUSED = 3  # due for maintenance later, outside the few
BUSY = 4  # another drain sends VMs there now: this drain would wait for it
KIND = {PREFERRED: 0, UNFOCUSED: 0, DUE: 1, DUE_UNFOCUSED: 1, BUSY: 2}
RANK_NOTES = {
    UNFOCUSED: "; outside this drain's focus hosts (they are full)",
    DUE: "; host is due for maintenance later but nothing else fits",
    DUE_UNFOCUSED: "; host is due for maintenance later but nothing else fits",
    BUSY: "; another drain is sending VMs to this host now: this drain waits for it",
}

_HINTS = {
    "memory": "free memory on the remaining hosts (or drain fewer hosts at once; a fleet that overcommits "
              "memory says so with memory_overcommit in the cluster limits)",
    "hugepages": "reserve more hugepages of that size on the remaining hosts",
    "vcpu": "raise vcpu_overcommit in the cluster limits or free vCPUs on the remaining hosts",
    "numa": "no target has the NUMA cells this VM needs; resize its vNUMA topology or add a larger host",
    "pinning": "free pinned CPUs on a target or unpin the VM",
    "anti-affinity": "every candidate already runs a VM of its anti-affinity group; relax the group",
    "cpu-group": "add an active host of the same CPU group or uncordon one",
    "unmigratable": "set on_unmigratable: shutdown (or skip-host) for it in the inventory's vm_policies",
    "transient": "define the domain persistently (virsh dumpxml + virsh define), or set its policy to skip-host",
}


def _check_hosts(snapshot: FleetSnapshot, hosts: Iterable[str]) -> list[str]:
    """The drained hosts, de-duplicated in the given order; an unknown name is an InputError."""
    known = {h.name for h in snapshot.hosts}
    out: list[str] = []
    for name in hosts:
        if name not in known:
            raise InputError(f"host {name!r} is not in the snapshot of cluster {snapshot.cluster!r}")
        if name not in out:
            out.append(name)
    return out


def _skipped(snapshot: FleetSnapshot, hosts: Iterable[str]) -> set[str]:
    """Hosts left out because one of their VMs cannot move and its policy says skip-host."""
    return {h for h in hosts for vm in snapshot.vms_on(h)
            if not vm.migratable and vm.on_unmigratable is UnmigratableAction.SKIP_HOST}


def check_capacity(snapshot: FleetSnapshot, hosts: Sequence[str], *, spare_hosts: int | None = None
                   ) -> CapacityCheck:
    """The N+1 check: after draining ``hosts`` the remaining active hosts hold all load and still
    survive losing their ``spare_hosts`` largest hosts (default: the cluster's ``limits.spare_hosts``).

    Usable capacity of a host = memory - reserved - headroom. ``margin_mib`` is what is left after
    load and the lost largest host(s); negative means refused. Hosts skipped by policy and VMs that
    shut down instead of moving add no load.
    """
    drained = _check_hosts(snapshot, hosts)
    return _capacity(snapshot, Ledger.from_snapshot(snapshot), drained, spare_hosts)


def _capacity(snapshot: FleetSnapshot, ledger: Ledger, drained: Sequence[str], spare: int | None
              ) -> CapacityCheck:
    """check_capacity on a ledger nothing has been charged to yet."""
    spare_hosts = snapshot.limits.spare_hosts if spare is None else spare
    skipped = _skipped(snapshot, drained)
    demand = sum(vm.memory_mib for h in drained if h not in skipped for vm in snapshot.vms_on(h)
                 if vm.migratable)
    head = snapshot.limits.memory_headroom_pct / 100
    by_name = {h.name: h for h in snapshot.hosts}
    remaining = [by_name[name] for name, load in ledger.hosts.items()
                 if load.state is HostState.ACTIVE and (name not in drained or name in skipped)]
    capacity = {h.name: h.memory_mib * (1 - head) - h.reserved_memory_mib for h in remaining}
    used = sum(ledger.hosts[h.name].used_mib for h in remaining)
    lost = heapq.nsmallest(spare_hosts, capacity.items(), key=lambda kv: (-kv[1], kv[0]))
    margin = sum(capacity.values()) - sum(c for _, c in lost) - used - demand
    what = f"draining {', '.join(drained)} moves {demand / GIB:.1f} GiB"
    if len(remaining) <= spare_hosts:
        return CapacityCheck(ok=False, margin_mib=math.floor(margin),
                             reason=f"{what}; only {len(remaining)} active host(s) remain, "
                                    f"N+{spare_hosts} needs more than {spare_hosts}")
    lost_words = ("after losing " + ", ".join(f"{n} ({c / GIB:.1f} GiB)" for n, c in lost)) if lost else \
        "with no spare host required"
    tail = (f"{len(remaining)} remaining hosts hold {(used + demand) / GIB:.1f} of "
            f"{sum(capacity.values()) / GIB:.1f} GiB usable; {lost_words}")
    if margin < 0:
        return CapacityCheck(ok=False, margin_mib=math.floor(margin),
                             reason=f"N+{spare_hosts} refused: {what}; {tail} it is short by "
                                    f"{-margin / GIB:.1f} GiB")
    return CapacityCheck(ok=True, margin_mib=math.floor(margin),
                         reason=f"N+{spare_hosts} holds: {what}; {tail} {margin / GIB:.1f} GiB spare")


def difficulty_order(vms: Iterable[Vm]) -> list[Vm]:
    """Hardest first: vNUMA, pinned, hugepages, then largest memory and vCPUs; name breaks ties."""
    return sorted(vms, key=lambda v: (not v.vnuma, not v.pinned, not v.hugepage_kib,
                                      -v.memory_mib, -v.vcpus, v.name))


@dataclass
class Choice:
    """The winning fit for a VM, its runner-up on another host, and how many hosts were weighed."""

    fit: Fit
    delta: float
    rank: int  # the target's rank (see Ranks): PREFERRED (0) up to BUSY
    runner_up: tuple[str, float] | None
    candidates: int
    util_before: float = 0.0
    note: str = ""

    @property
    def tier(self) -> tuple[bool, int]:
        """Lower is better: NUMA-local before remote, then the target's kind: neither due nor busy,
        due for maintenance, busy. Focus is a preference inside a kind (:func:`choose` ranks by
        it), not a tier: a VM may leave a focus host to make another VM NUMA-local."""
        return (not self.fit.numa_local, KIND[self.rank])


@dataclass
class Evacuation:
    """What ``evacuate`` decided, before it is frozen into an EvacuationPlan."""

    placements: list[Placement] = field(default_factory=list)
    blocked: list[Blocker] = field(default_factory=list)
    vm_actions: list[VmAction] = field(default_factory=list)
    skipped_hosts: list[str] = field(default_factory=list)
    proof: PlanProof = PlanProof.GREEDY_ONLY
    proof_note: str = ""
    exact_spent: float = 0.0  # deterministic seconds the exact stage used


def _leftover(vm: Vm, host: HostLoad, fit: Fit) -> float:
    """Room the chosen cells keep after the fit (for packing: smaller is tighter)."""
    left = 0.0
    for cell_id, mib in zip(fit.cells, fit.cell_mib, strict=True):
        cell = host.cell(cell_id)
        room = cell.hugepages.get(vm.hugepage_kib, 0) * vm.hugepage_kib / 1024 if vm.hugepage_kib else cell.avail_mib
        left += room - mib
    return left


def _by_bound(vm: Vm, need: Demand, targets: Sequence[HostLoad], avoid: Ranks, pack: bool,
              remote: bool, scored: list[tuple[int, float, str, Fit, float]]) -> Iterator[HostLoad]:
    """The hosts worth weighing for ``vm``, cheapest possible objective growth first.

    A fit's growth is at least its host term (cell terms only add), so once a host's (tier,
    bound) ranks below the runner-up found so far, neither it nor any later host can win or be
    runner-up: stop there.
    Packing and the NUMA-remote pass weigh every host.
    """
    if pack or remote:
        for host in targets:
            # the screen only skips hosts a single-cell fit cannot use; a spread may still fit them
            if remote or could_fit(vm, need, host):
                yield host
        return
    top: list[tuple[int, float]] = []  # the best two (tier, growth) found so far
    seen = 0
    for rank, bound, host in bounds.by_bound(targets, avoid, float(need.total_mib), len(need.mib) == 1):
        for s in scored[seen:]:
            top = sorted([*top, (s[0], s[1])])[:2]
        seen = len(scored)
        if len(top) == 2 and (rank, bound) > top[1]:
            return  # this host, and every later one, ranks below the best two found
        if could_fit(vm, need, host):
            yield host


def choose(vm: Vm, targets: Sequence[HostLoad], avoid: Ranks, *, pack: bool = False
           ) -> Choice | list[Miss]:
    """The best fit for ``vm`` among ``targets`` by tier then objective growth, or every host's Miss.

    ``pack`` ranks by the tightest fit instead (best fit), for when not everything fits.
    """
    need = demand_of(vm)
    for remote in (False, True):
        scored: list[tuple[int, float, str, Fit, float]] = []
        weighed: dict[str, HostLoad] = {}
        for host in _by_bound(vm, need, targets, avoid, pack, remote, scored):
            got = fit_host(vm, host, allow_remote=remote, need=need)
            if isinstance(got, Miss):
                continue
            weighed[host.name] = host
            delta = fit_delta(host, got)
            scored.append((avoid.get(host.name, PREFERRED), _leftover(vm, host, got) if pack else delta, host.name,
                           got, delta))
        if scored:
            scored.sort(key=lambda s: (s[0], s[1], s[2]))
            best = scored[0]
            runner = next(((s[2], s[4]) for s in scored[1:] if s[2] != best[2]), None)
            util = weighed[best[2]].util
            return Choice(best[3], best[4], best[0], runner, len(scored), util,
                          note="packed tightly: not everything fits with balanced placement" if pack else "")
    # nothing fits: ask every host why, for the blocker
    found = [fit_host(vm, host, allow_remote=True, need=need) for host in targets]
    return [m for m in found if isinstance(m, Miss)]


def placement_for(vm: Vm, choice: Choice) -> Placement:
    """Freeze a choice into a Placement with the rewrite the target needs and the reason."""
    fit = choice.fit

    def mapped(cpus: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(sorted(fit.cpu_map[c] for c in cpus)) if vm.pinned else ()

    vcpupin = {vcpu: mapped(cpus) for vcpu, cpus in sorted(vm.vcpupin.items())} if vm.pinned else {}
    iothreadpin = {thread: mapped(cpus) for thread, cpus in sorted(vm.iothreadpin.items())} if vm.pinned else {}
    vcpu_cpuset = mapped(vm.vcpu_cpuset)
    # Without an emulatorpin libvirt runs the emulator threads on the <vcpu cpuset>; saying so
    # explicitly keeps the placement's emulatorpin what those threads get on the target, and makes
    # the driver send the rewritten XML for a VM bound by its cpuset alone.
    emulatorpin = mapped(vm.emulatorpin) or vcpu_cpuset
    nodeset = tuple(sorted(fit.cells)) if vm.numatune is not None else None
    cells = ",".join(str(c) for c in fit.cells)
    kind = "NUMA-remote (no single-cell fit anywhere)"
    if fit.numa_local:
        kind = "vNUMA 1:1" if vm.vnuma else "single-cell"
    reason = (f"{kind} on {fit.host} cell(s) {cells}; host at {choice.util_before:.0%} before; "
              f"objective +{choice.delta:.4f}, best of {choice.candidates} fitting host(s) weighed")
    if choice.rank:
        reason += RANK_NOTES[min(choice.rank, BUSY)]
    runner = None
    if choice.runner_up is not None:
        runner = choice.runner_up[0]
        reason += f"; runner-up {runner} (+{choice.runner_up[1]:.4f})"
    if choice.note:
        reason += f"; {choice.note}"
    return Placement(vm=vm.name, source=vm.host, target=fit.host, target_cells=fit.cells,
                     numa_local=fit.numa_local, vcpupin=vcpupin, emulatorpin=emulatorpin,
                     vcpu_cpuset=vcpu_cpuset, iothreadpin=iothreadpin, numatune_nodeset=nodeset,
                     memory_mib=vm.memory_mib, reason=reason, runner_up=runner,
                     cell_memory_mib=tuple(math.ceil(m) for m in fit.cell_mib))


def blocker_for(vm: Vm, misses: list[Miss], group_size: int, prefer: str | None = None) -> Blocker:
    """Name the constraint that stopped the VM on most candidate hosts (or ``prefer``, when some
    host missed on it: the cause a proven refusal found), with examples."""
    if group_size == 0:
        return Blocker(vm=vm.name, host=vm.host, constraint="cpu-group",
                       reason=f"no active host outside the drained ones shares {vm.host}'s CPU group",
                       hint=_HINTS["cpu-group"])
    counts = Counter(m.constraint for m in misses)
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    constraint = prefer if prefer is not None and prefer in counts else top[0][0]
    example = next(m.reason for m in misses if m.constraint == constraint)
    summary = ", ".join(f"{n} host(s) {c}" for c, n in top)
    return Blocker(vm=vm.name, host=vm.host, constraint=constraint,
                   reason=f"fits none of {group_size} candidate host(s) ({summary}); e.g. {example}",
                   hint=_HINTS.get(constraint, ""))


def evacuate(snapshot: FleetSnapshot, ledger: Ledger, hosts: Sequence[str], *,
             avoid: Collection[str] | Ranks = (), exclude: Collection[str] = (),
             exact_budget: float = exact.DEFAULT_BUDGET, optimise_budget: float | None = None) -> Evacuation:
    """Plan the VMs of ``hosts`` onto the other active hosts, charging ``ledger`` as it goes.

    ``exclude`` names further hosts that must not receive VMs (e.g. ones already out for
    maintenance); ``avoid`` are used only when nothing else fits: names (rank DUE) or ranks.
    ``exact_budget``: deterministic seconds for the exact stage (:func:`exact_stage`); 0: greedy only.
    ``optimise_budget``: at most this much when every VM is placed already (a window's shared budget).
    """
    avoid = ({h: r for h, r in avoid.items() if r > PREFERRED} if isinstance(avoid, Mapping)
             else dict.fromkeys(avoid, DUE))
    out = Evacuation()
    skipped = _skipped(snapshot, hosts)
    movers: list[Vm] = []
    for name in hosts:
        vms = sorted(snapshot.vms_on(name), key=lambda v: v.name)
        if name in skipped:
            out.skipped_hosts.append(name)
            out.vm_actions.extend(
                VmAction(vm=v.name, host=name, action=UnmigratableAction.SKIP_HOST,
                         reason=f"cannot live-migrate ({v.not_migratable_reason or 'policy'}); "
                                f"{name} is left out and none of its VMs move")
                for v in vms if not v.migratable and v.on_unmigratable is UnmigratableAction.SKIP_HOST)
            continue
        for vm in vms:
            if vm.migratable:
                movers.append(vm)
            elif vm.on_unmigratable is UnmigratableAction.SHUTDOWN and not vm.persistent:
                out.blocked.append(Blocker(
                    vm=vm.name, host=name, constraint="transient",
                    reason=f"cannot live-migrate ({vm.not_migratable_reason or 'policy'}) and its policy is "
                           f"shutdown, but it is a transient domain: libvirt forgets it once it stops, so it "
                           f"could never be started again", hint=_HINTS["transient"]))
            elif vm.on_unmigratable is UnmigratableAction.SHUTDOWN:
                out.vm_actions.append(VmAction(
                    vm=vm.name, host=name, action=UnmigratableAction.SHUTDOWN,
                    reason=f"cannot live-migrate ({vm.not_migratable_reason or 'policy'}); shut down before "
                           f"the reboot of {name}, started again after it is verified"))
            else:
                out.blocked.append(Blocker(
                    vm=vm.name, host=name, constraint="unmigratable",
                    reason=f"cannot live-migrate ({vm.not_migratable_reason or 'policy'}) and its policy "
                           f"is block", hint=_HINTS["unmigratable"]))
    barred = set(hosts) | set(exclude)
    groups: dict[str, list[HostLoad]] = {}

    def targets_for(vm: Vm) -> list[HostLoad]:
        source = ledger.hosts[vm.host]
        key = f"{source.cluster}/{source.cpu_group}"
        if key not in groups:
            groups[key] = bounds.Targets(h for h in ledger.hosts.values()
                                         if h.state is HostState.ACTIVE and h.name not in barred
                                         and h.cpu_group == source.cpu_group and h.cluster == source.cluster)
        return groups[key]

    chosen, unplaced = _greedy(difficulty_order(movers), ledger, targets_for, avoid, pack=False)
    if unplaced:
        for vm, choice in chosen.values():  # back to where this evacuation started
            ledger.unapply(vm, choice.fit)
        start = copy.deepcopy(ledger.hosts)
        for vm, choice in chosen.values():
            ledger.apply(vm, choice.fit)
        # not everything fits when balancing: also try packing tightly, largest and smallest first,
        # and keep whichever places most VMs (then most NUMA-local, then the better objective)
        best = (_rank(chosen, ledger), chosen, unplaced, ledger.hosts)
        for order in (difficulty_order(movers), sorted(movers, key=lambda v: (v.memory_mib, v.name))):
            ledger.hosts = copy.deepcopy(start)
            groups.clear()
            got, left = _greedy(order, ledger, targets_for, avoid, pack=True)
            if _rank(got, ledger) < best[0]:
                best = (_rank(got, ledger), got, left, ledger.hosts)
        _, chosen, unplaced, ledger.hosts = best
        groups.clear()
    _localize(chosen, ledger, targets_for, avoid)
    _improve(chosen, ledger, targets_for, avoid)
    _shave_peak(chosen, ledger, targets_for, avoid)
    for vm in unplaced:
        late = choose(vm, targets_for(vm), avoid)
        if isinstance(late, Choice):  # the local search happened to free a place for it
            ledger.apply(vm, late.fit)
            chosen[vm.name] = (vm, late)
    out.proof, out.proof_note, blocked, out.exact_spent = exact_stage(movers, chosen, ledger, targets_for, avoid,
                                                                      exact_budget, optimise_budget)
    out.blocked.extend(blocked)
    out.placements.extend(placement_for(vm, choice) for vm, choice in chosen.values())
    out.placements.sort(key=lambda p: (p.source, p.vm))
    out.blocked.sort(key=lambda b: (b.host, b.vm))
    out.vm_actions.sort(key=lambda a: (a.host, a.vm))
    return out


def _greedy(order: Iterable[Vm], ledger: Ledger, targets_for: Callable[[Vm], list[HostLoad]],
            avoid: Ranks, *, pack: bool) -> tuple[dict[str, tuple[Vm, Choice]], list[Vm]]:
    """Place VMs one by one in ``order``; then try to make room for those that did not fit."""
    chosen: dict[str, tuple[Vm, Choice]] = {}
    unplaced: list[Vm] = []
    for vm in order:
        got = choose(vm, targets_for(vm), avoid, pack=pack)
        if isinstance(got, Choice):
            ledger.apply(vm, got.fit)
            chosen[vm.name] = (vm, got)
        else:
            unplaced.append(vm)
    unplaced = [vm for vm in unplaced if not _make_room(vm, chosen, ledger, targets_for, avoid)]
    return chosen, unplaced


def _rank(chosen: dict[str, tuple[Vm, Choice]], ledger: Ledger) -> tuple[int, int, float]:
    """Lower is better: most VMs placed, then most NUMA-local, then the lowest objective."""
    return (-len(chosen), -sum(c.fit.numa_local for _, c in chosen.values()), balance(ledger.hosts.values()))


# Local search bounds: enough to settle a 40-VM evacuation, small enough for 1,000 hosts.
IMPROVE_ROUNDS = 3
IMPROVE_HOSTS = 32  # least-loaded targets weighed per re-placement, besides the ones already used


def _improve(chosen: dict[str, tuple[Vm, Choice]], ledger: Ledger,
             targets_for: Callable[[Vm], list[HostLoad]], avoid: Ranks) -> None:
    """Re-place planned VMs one at a time while that lowers the objective (never a worse tier).

    Greedy placement in a fixed order leaves easy gains (an early VM on a host that later
    filled up); moving single VMs fixes most of them. Deterministic: largest VMs first, then name.
    """
    for _ in range(IMPROVE_ROUNDS):
        changed = False
        light: dict[int, set[str]] = {}  # per target pool: its least-loaded hosts this round
        where: dict[int, dict[str, int]] = {}  # per target pool: each host's place in it
        for name in sorted(chosen, key=lambda n: (-chosen[n][0].memory_mib, n)):
            vm, cur = chosen[name]
            used = {c.fit.host for _, c in chosen.values()}
            pool = targets_for(vm)
            if id(pool) not in light:
                light[id(pool)] = {h.name for h in heapq.nsmallest(IMPROVE_HOSTS, pool,
                                                                  key=lambda h: (h.util, h.name))}
                where[id(pool)] = {h.name: i for i, h in enumerate(pool)}
            at = where[id(pool)]
            candidates = [pool[i] for i in sorted(at[n] for n in used | light[id(pool)] if n in at)]
            ledger.unapply(vm, cur.fit)
            stay = fit_delta(ledger.hosts[cur.fit.host], cur.fit)
            alt = choose(vm, candidates, avoid)
            better = isinstance(alt, Choice) and alt.fit != cur.fit and (
                alt.tier < cur.tier or (alt.tier == cur.tier and alt.delta < stay - 1e-9))
            if isinstance(alt, Choice) and better:
                ledger.apply(vm, alt.fit)
                chosen[name] = (vm, alt)
                changed = True
            else:
                ledger.apply(vm, cur.fit)
        if not changed:
            return


SHAVE_MOVES = 40


def _shave_peak(chosen: dict[str, tuple[Vm, Choice]], ledger: Ledger,
                targets_for: Callable[[Vm], list[HostLoad]], avoid: Ranks) -> None:
    """Lower the fullest receiving host: move one of its planned VMs to a host that stays below it.

    The sum of squares settles the bulk; this pass trims the single highest utilisation, which
    is what operators watch. Stops when the fullest host received nothing from this plan (its load
    was there before) or none of its planned VMs can go anywhere lower.
    """
    pools = {id(p): p for p in (targets_for(vm) for vm, _ in chosen.values())}
    pool = {h.name: h for p in pools.values() for h in p}
    for _ in range(SHAVE_MOVES):
        if not chosen:
            return
        peak = max(pool.values(), key=lambda h: (h.util, h.name))
        mine = sorted((c for c in chosen.values() if c[1].fit.host == peak.name),
                      key=lambda c: (-c[0].memory_mib, c[0].name))
        if not mine:
            return
        top = peak.util
        moved = False
        for vm, cur in mine:
            ledger.unapply(vm, cur.fit)
            alt = choose(vm, [h for h in targets_for(vm) if h.name != peak.name
                              and h.util + vm.memory_mib / max(h.memory_mib, 1) < top - 1e-9], avoid)
            # only to as good a rank: shaving must not spread a focused drain again
            if isinstance(alt, Choice) and alt.tier <= cur.tier and alt.rank <= cur.rank:
                ledger.apply(vm, alt.fit)
                alt.note = f"moved off {peak.name} to lower the fullest host"
                chosen[vm.name] = (vm, alt)
                moved = True
                break
            ledger.apply(vm, cur.fit)
        if not moved:
            return


def _localize(chosen: dict[str, tuple[Vm, Choice]], ledger: Ledger,
              targets_for: Callable[[Vm], list[HostLoad]], avoid: Ranks) -> None:
    """Turn NUMA-remote placements local where moving one other planned VM makes a cell free.

    Greedy order can use up the only single cells a later VM needed; this undoes that.
    """
    for name in sorted(n for n, (_, c) in chosen.items() if not c.fit.numa_local):
        vm, cur = chosen.pop(name)
        ledger.unapply(vm, cur.fit)
        again = choose(vm, targets_for(vm), avoid)
        if isinstance(again, Choice) and again.fit.numa_local:
            ledger.apply(vm, again.fit)
            chosen[name] = (vm, again)
        elif not _make_room(vm, chosen, ledger, targets_for, avoid, local_only=True):
            ledger.apply(vm, cur.fit)
            chosen[name] = (vm, cur)


def _make_room(vm: Vm, chosen: dict[str, tuple[Vm, Choice]], ledger: Ledger,
               targets_for: Callable[[Vm], list[HostLoad]], avoid: Ranks, *,
               local_only: bool = False) -> bool:
    """Place a VM that fits nowhere by moving one already-planned VM elsewhere (one ejection).

    Tries the emptiest hosts first and, on each, its planned VMs largest first; the displaced VM
    must land no worse (NUMA-local stays local). ``local_only`` accepts only a single-cell (or
    vNUMA 1:1) fit for ``vm``. True when ``vm`` is placed.
    """
    targets = targets_for(vm)
    for host in sorted(targets, key=lambda h: (h.util, h.name)):
        planned = sorted((c for c in chosen.values() if c[1].fit.host == host.name),
                         key=lambda c: (-c[0].memory_mib, c[0].name))
        for other, was in planned:
            ledger.unapply(other, was.fit)
            util = host.util
            got = fit_host(vm, host, allow_remote=not local_only)
            if not isinstance(got, Miss):
                delta = fit_delta(host, got)
                ledger.apply(vm, got)
                alt = choose(other, [t for t in targets_for(other) if t.name != host.name], avoid)
                if isinstance(alt, Choice) and alt.tier <= was.tier:
                    ledger.apply(other, alt.fit)
                    alt.note = f"moved here to make room for {vm.name}"
                    chosen[other.name] = (other, alt)
                    chosen[vm.name] = (vm, Choice(got, delta, avoid.get(host.name, PREFERRED), None, 1, util,
                                                  note=f"room made by moving {other.name} to {alt.fit.host}"))
                    return True
                ledger.unapply(vm, got)
            ledger.apply(other, was.fit)
    return False


def plan_evacuation(snapshot: FleetSnapshot, hosts: Sequence[str], *, avoid: Collection[str] = (),
                    busy: Collection[str] = (), focus: bool = False, focus_at_once: int | None = None,
                    spare_hosts: int | None = None, exact_budget: float = exact.DEFAULT_BUDGET) -> EvacuationPlan:
    """Plan where every VM of ``hosts`` goes; the N+1 check is part of the plan.

    ``avoid``: hosts due for maintenance later, used only when nothing else fits. ``busy``: hosts
    another drain sends VMs to now, used last (this drain would wait for that one).
    ``focus``: send to as few hosts as hold the VMs (:func:`focus_hosts`), so other drains of the
    cluster find hosts to send to beside this one; balanced among those. For VMs that come back or
    are rebalanced soon (a patch); an evacuation whose VMs stay is balanced over every host.
    ``focus_at_once``: the migrations the drain will run at once (its share of the cluster's slots),
    which sets the fewest focus hosts; None: as many as its sources may send.
    ``spare_hosts`` overrides the cluster's ``limits.spare_hosts`` (how many of the largest
    remaining hosts the cluster must be able to lose).
    ``exact_budget``: deterministic seconds of CP-SAT work behind the greedy (0: greedy only); the
    plan's ``proof`` says what it established.

    The plan is feasible only when no VM is blocked and the N+1 check holds. Same snapshot,
    same arguments: same plan.
    """
    drained = _check_hosts(snapshot, hosts)
    # the plan allocates without cycles; each collection it would start walks the whole snapshot
    # once it is older than the plan (~0.1 s at 1,000 hosts)
    with collector_paused():
        ledger = Ledger.from_snapshot(snapshot)
        capacity = _capacity(snapshot, ledger, drained, spare_hosts)
        ranks = target_ranks(snapshot, ledger, drained, avoid=avoid, busy=busy, focus=focus,
                             focus_at_once=focus_at_once)
        result = evacuate(snapshot, ledger, drained, avoid=ranks, exact_budget=exact_budget)
        return EvacuationPlan(cluster=snapshot.cluster, hosts=tuple(drained), snapshot_digest=snapshot.digest(),
                              placements=tuple(result.placements), blocked=tuple(result.blocked),
                              vm_actions=tuple(result.vm_actions), skipped_hosts=tuple(result.skipped_hosts),
                              capacity=capacity, balance=receivers_balance(ledger, drained, result.placements),
                              proof=result.proof, proof_note=result.proof_note)


def target_ranks(snapshot: FleetSnapshot, ledger: Ledger, drained: Sequence[str], *, avoid: Collection[str] = (),
                 busy: Collection[str] = (), focus: bool = False, focus_at_once: int | None = None) -> dict[str, int]:
    """Each receiver's rank for a drain of ``drained`` (see :data:`Ranks`): due for maintenance
    (``avoid``), busy with another drain (``busy``), and with ``focus`` outside the drain's
    :func:`focus_hosts` (``focus_at_once``: its migrations at once) one rank down within its kind."""
    ranks: dict[str, int] = dict.fromkeys(avoid, DUE) | dict.fromkeys(busy, BUSY)
    if not focus:
        return ranks
    chosen = focus_hosts(snapshot, ledger, drained, ranks, at_once=focus_at_once)
    return {h: r + 1 if r in (PREFERRED, DUE) and h not in chosen else r
            for h, r in ((h, ranks.get(h, PREFERRED)) for h in ledger.hosts)}


def focus_hosts(snapshot: FleetSnapshot, ledger: Ledger, drained: Sequence[str], ranks: Ranks, *,
                at_once: int | None = None) -> set[str]:
    """The few hosts a drain of ``drained`` sends to: the emptiest receivers, as many as hold its VMs
    (up to each one's headroom), and at least as many as its migrations need at once (``at_once``, its
    share of the cluster's slots, else ``migrations_per_source``; ÷ ``migrations_per_target``).
    A drain that runs 3 migrations at once needs one target of 4 per target, not two: each target is
    the drain's alone while it runs, so a second one is kept from the drains beside it for nothing.

    Balancing every VM over every host spreads one drain over the whole cluster; two drains then
    always share a target and run one after the other (a target takes one drain at a time), so a
    window's drains would go one by one. Focused, they run side by side. The price is balance while
    the window runs: the focus hosts end fuller than the rest (never past the headroom), until the
    window's rebalance or the VMs' return home. Hosts not due for maintenance come first (VMs
    landing there need not move again); a host another drain fills now (rank BUSY) is never one.
    Empty when nothing moves.
    """
    skipped = _skipped(snapshot, drained)
    need = float(sum(vm.memory_mib for h in drained if h not in skipped for vm in snapshot.vms_on(h)
                     if vm.migratable))
    limits = snapshot.limits
    at_most_at_once = min(limits.migrations_per_source * len(drained), limits.migrations_per_cluster)
    if at_once is not None:
        at_most_at_once = min(at_most_at_once, max(1, at_once))
    at_least = math.ceil(at_most_at_once / limits.migrations_per_target)
    receivers = sorted((h for h in ledger.hosts.values() if h.state is HostState.ACTIVE and h.name not in drained
                        and ranks.get(h.name, PREFERRED) < BUSY),
                       key=lambda h: (ranks.get(h.name, PREFERRED) >= DUE, -h.avail_mib, h.name))
    chosen: set[str] = set()
    room = 0.0
    for host in receivers:
        if need <= 0 or (room >= need and len(chosen) >= at_least):
            break
        if host.avail_mib > 0:
            chosen.add(host.name)
            room += host.avail_mib
    return chosen


def stale_targets(plan: EvacuationPlan, planned_on: FleetSnapshot, now: FleetSnapshot) -> list[str]:
    """Why ``plan``, made on ``planned_on``, may no longer fit the cluster as ``now`` shows it: each
    target that is no longer active, or that received VMs since (another run's drain moved them
    there while this plan waited its turn), and each drained host that received VMs the plan does
    not move. Empty: the plan still stands.

    Only arrivals and state count: a VM leaving a target frees memory, CPUs and anti-affinity
    slots, which cannot make a placement wrong.
    """
    before = {h.name: h for h in planned_on.hosts}
    after = {h.name: h for h in now.hosts}
    reasons = []
    for source in plan.hosts:  # a VM that landed on a host being drained must leave with the others
        arrived = sorted({v.name for v in now.vms_on(source)} - {v.name for v in planned_on.vms_on(source)})
        if arrived:
            reasons.append(f"{source} (drained) received {', '.join(arrived)}")
    for target in sorted({p.target for p in plan.placements}):
        host = after.get(target)
        if host is None:
            reasons.append(f"{target} is gone from the cluster's discovery")
            continue
        if host.state is not HostState.ACTIVE:
            reasons.append(f"{target} is {host.state.value} now")
            continue
        had = {v.name for v in planned_on.vms_on(target)} if target in before else set()
        arrived = sorted({v.name for v in now.vms_on(target)} - had)
        if arrived:
            reasons.append(f"{target} received {', '.join(arrived)}")
    return reasons


def receivers_balance(ledger: Ledger, drained: Collection[str], placements: Sequence[Placement]) -> Balance:
    """Balance over the active hosts that were not drained, after the plan is charged."""
    return measure((h for h in ledger.hosts.values() if h.state is HostState.ACTIVE and h.name not in drained),
                   numa_remote=sum(1 for p in placements if not p.numa_local))


# --- the exact stage -------------------------------------------------------------------------------

Chosen = dict[str, tuple[Vm, Choice]]


def _key(chosen: Chosen, hosts: Sequence[HostLoad], avoid: Ranks, n: int) -> tuple[int, int, int, float, float,
                                                                              float]:
    """The lexicographic objective, lower is better: most VMs placed, most NUMA-local, best target
    ranks, lowest peak utilisation, least spread (``exact.spread_of``), then the greedy's balance
    objective (over the hosts the plan may fill; ``n``: VMs to place)."""
    w = exact.rank_weights(n)
    placed = [c.fit for _, c in chosen.values()]
    return (-len(placed), -sum(f.numa_local for f in placed),
            sum(w[min(avoid.get(f.host, PREFERRED), BUSY)] for f in placed),
            round(max((h.util for h in hosts), default=0.0), 4), round(exact.spread_of(hosts), 4),
            round(balance(hosts), 9))


def exact_stage(movers: Sequence[Vm], chosen: Chosen, ledger: Ledger, targets_for: Callable[[Vm], list[HostLoad]],
                avoid: Ranks, budget: float, optimise_budget: float | None = None
                ) -> tuple[PlanProof, str, list[Blocker], float]:
    """Run CP-SAT behind the greedy's ``chosen`` (charged on ``ledger``); adopt its placement when it
    is better by :func:`_key`. Returns the proof, what the stage did, and a Blocker per VM left out.

    The greedy is the hint and the answer without budget. An optimisation (the greedy placed every
    VM) larger than ``exact.MAX_PAIRS`` VM-host pairs stays greedy; a refusal is always searched.
    ``optimise_budget`` (default ``budget``) is what an optimisation may spend: a window shares one
    among its steps. The last value returned is the deterministic time spent.
    """
    left = [vm for vm in movers if vm.name not in chosen]
    if not movers:
        return PlanProof.OPTIMAL, "nothing to place", [], 0.0
    pairs = sum(len(targets_for(vm)) for vm in movers)
    if budget <= 0:
        return PlanProof.GREEDY_ONLY, "exact stage off (budget 0)", _greedy_blockers(
            left, chosen, ledger, targets_for, avoid,
            "not proven impossible: the exact stage did not run (budget 0); give it a budget with --exact-budget "
            "(flows: exact_budget)"), 0.0
    if not left and pairs > exact.MAX_PAIRS:
        return PlanProof.GREEDY_ONLY, (f"greedy only: {pairs} VM-host pairs, above the exact stage's "
                                       f"{exact.MAX_PAIRS}; every VM is placed"), [], 0.0
    if not left and optimise_budget is not None:
        if optimise_budget <= 0:
            return PlanProof.GREEDY_ONLY, "greedy only: the window's exact budget is spent; every VM is placed", \
                [], 0.0
        budget = min(budget, optimise_budget)
    pool = {h.name: h for vm in movers for h in targets_for(vm)}
    greedy = {name: c.fit for name, (_, c) in chosen.items()}
    before = _key(chosen, list(pool.values()), avoid, len(movers))
    for vm, c in chosen.values():
        ledger.unapply(vm, c.fit)
    start = {name: copy.deepcopy(h) for name, h in pool.items()}
    for vm, c in chosen.values():
        ledger.apply(vm, c.fit)
    order = difficulty_order(movers)
    prob = exact.Problem(vms=order, hosts=start, targets={vm.name: [h.name for h in targets_for(vm)] for vm in order},
                         ranks=avoid, remote=bool(left) or any(not c.fit.numa_local for _, c in chosen.values()))
    spend = exact.Budget(budget)
    outcome = exact.solve(prob, greedy, spend)
    note = f"exact stage (CP-SAT, budget {budget:g}): {outcome.note}"
    proof = outcome.proof
    if outcome.choices is not None:
        adopted = _adopt(outcome.choices, prob, chosen, ledger, avoid)
        if adopted is None:
            blocked = _greedy_blockers(left, chosen, ledger, targets_for, avoid,
                                       "not proven impossible: the exact stage's answer was not used")
            return PlanProof.GREEDY_ONLY, note + "; its placement failed the fit rules: kept the greedy's", blocked, \
                budget - spend.left
        if _key(adopted, list(pool.values()), avoid, len(movers)) < before:
            chosen.clear()
            chosen.update(adopted)
            note += "; its placement is better than the greedy's and was taken"
        else:
            for vm, c in adopted.values():
                ledger.unapply(vm, c.fit)
            for vm, c in chosen.values():
                ledger.apply(vm, c.fit)
            note += "; the greedy's placement is as good and was kept"
    left = [vm for vm in order if vm.name not in chosen]
    if not left:
        return proof, note, [], budget - spend.left
    if proof is not PlanProof.INFEASIBLE:
        return proof, note, _greedy_blockers(
            left, chosen, ledger, targets_for, avoid,
            f"not proven impossible: no placement of every VM was found within the exact stage's budget "
            f"({budget:g}); a larger --exact-budget (flows: exact_budget) may find one"), budget - spend.left
    placed = {name: c.fit.host for name, (_, c) in chosen.items() if name in prob.needs}
    proven: list[Blocker] = []
    for i, vm in enumerate(left):
        core = exact.refusal_core(prob, placed, vm, spend) if i < exact.CORES and spend.left > 0 else None
        proven.append(_proven_blocker(vm, core, targets_for(vm), chosen, ledger, avoid, len(placed), len(order)))
    return proof, note, proven, budget - spend.left


def _adopt(choices: Mapping[str, exact.Choice], prob: exact.Problem, chosen: Chosen, ledger: Ledger,
           avoid: Ranks) -> Chosen | None:
    """Swap the greedy's placement on ``ledger`` for the exact stage's, each fit checked again by the
    fit rules as it is charged; None (and the greedy's restored) if one breaks a rule."""
    for vm, c in chosen.values():
        ledger.unapply(vm, c.fit)
    out: Chosen = {}
    # local placements first: an unpinned spread takes what the cells keep after them
    for vm in sorted(prob.vms, key=lambda v: bool(choices.get(v.name) and not choices[v.name].cells)):
        pick = choices.get(vm.name)
        if pick is None:
            continue
        host = ledger.hosts[pick.host]
        fit = exact.to_fit(vm, prob.needs[vm.name], host, pick)
        if fit is None:
            for done, c in out.values():
                ledger.unapply(done, c.fit)
            for back, c in chosen.values():
                ledger.apply(back, c.fit)
            return None
        util = host.util
        delta = fit_delta(host, fit)
        ledger.apply(vm, fit)
        out[vm.name] = (vm, Choice(fit, delta, avoid.get(pick.host, PREFERRED), None,
                                   len(prob.targets[vm.name]), util, note="placed by the exact stage"))
    return out


def _greedy_blockers(left: Sequence[Vm], chosen: Chosen, ledger: Ledger,
                     targets_for: Callable[[Vm], list[HostLoad]], avoid: Ranks, unproven: str) -> list[Blocker]:
    """The greedy's blocker for each VM left out, saying the refusal is not proven and how to prove it."""
    out = []
    for vm in left:
        got = choose(vm, targets_for(vm), avoid)
        if isinstance(got, Choice):  # room left after all: take it
            ledger.apply(vm, got.fit)
            chosen[vm.name] = (vm, got)
            continue
        b = blocker_for(vm, got, len(targets_for(vm)))
        out.append(b.model_copy(update={"hint": f"{b.hint}; {unproven}" if b.hint else unproven}))
    return out


CORE_NAMES = 8  # VMs of a core a reason names (Blocker.core has them all)

_CAUSE_WORDS = {
    "anti-affinity": "the VMs' anti-affinity group",
    "vcpu": "the targets' vCPU budget",
    "memory": "the targets' free memory",
    "hugepages": "the targets' free hugepages",
    "pinning": "the targets' free unpinned CPUs",
    "numa": "the VMs' vNUMA cells (each onto its own host cell)",
}


def _proven_blocker(vm: Vm, core: exact.Core | None, targets: Sequence[HostLoad], chosen: Chosen,
                    ledger: Ledger, avoid: Ranks, placed: int, total: int) -> Blocker:
    """A proven refusal's blocker: the reason and hint follow from the core, not from a count of
    the constraints each host happened to miss on. Without a core (the budget ran out first), the
    proven bound and the hosts' misses."""
    if not targets:
        return blocker_for(vm, [], 0)
    if core is None:
        got = choose(vm, targets, avoid)
        base = blocker_for(vm, got if isinstance(got, list) else [], len(targets))
        return base.model_copy(update={
            "reason": f"proven by the exact stage: at most {placed} of these {total} VMs can be placed; "
                      f"as planned, it {base.reason}",
            "hint": f"{base.hint}; a larger --exact-budget (flows: exact_budget) names the VMs it cannot be "
                    f"placed with"})
    others = [n for n in core.vms if n != vm.name]
    if others:
        named = ", ".join(others[:CORE_NAMES]) + (f" and {len(others) - CORE_NAMES} more" if
                                                   len(others) > CORE_NAMES else "")
        what = f"{vm.name} cannot be placed together with {named}"
    else:
        what = f"{vm.name} fits no target even if nothing else moved"
    if len(core.vms) > 1:
        what += (" (a minimal set: each one is needed)" if core.minimal else
                 " (not shrunk to a minimal set within the budget)")
    if core.causes:
        constraint = core.causes[0]
        because = " or ".join(_CAUSE_WORDS[c] for c in core.causes)
        who = "it would" if len(core.vms) == 1 else "they would"
        reason = f"proven by the exact stage: {what}; {who} fit if nothing but {because} gave way"
        hint = "; or ".join(_HINTS[c] for c in core.causes)
    elif core.tested:
        constraint = "capacity"
        reason = f"proven by the exact stage: {what}; no single rule is the cause: several hold them back together"
        hint = "free capacity on the remaining hosts (memory, CPUs, hugepages) or drain fewer hosts at once"
    else:
        constraint = "capacity"
        reason = f"proven by the exact stage: {what}; which rule holds them back was not found within the budget"
        hint = ("free capacity on the remaining hosts or drain fewer hosts at once; a larger --exact-budget "
                "(flows: exact_budget) names the rule")
    got = choose(vm, targets, avoid)
    if isinstance(got, list) and got:
        # what each host misses with the others placed: detail, not the cause (the core is)
        base = blocker_for(vm, got, len(targets), prefer=constraint)
        reason += f"; as planned, it {base.reason}"
        if (len(core.vms) == 1 and base.constraint in core.causes) or (not core.causes and not core.tested):
            constraint = base.constraint  # alone, the hosts' own misses name it best
    return Blocker(vm=vm.name, host=vm.host, constraint=constraint, reason=reason, hint=hint, core=core.vms)
