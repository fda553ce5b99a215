"""Rebalance: level a cluster's memory load with at most ``max_moves`` live migrations.

Two passes, both greedy and deterministic:

1. Return to origin (when ``prefer_origin``): a VM whose recorded ``origin`` is
   another active host of its CPU group goes back there if it fits, whether or
   not that improves balance — it is where the operator put it.
2. Levelling: repeatedly take the fullest host and move the VM off it that buys
   the largest drop in the balance objective onto a fitting host; a move that
   does not lower the objective is not kept, and the pass stops.

A host that gives a VM away in this plan does not receive one, and vice versa,
so the moves are independent and may run in any order or in parallel: memory a
departing VM frees is never planned onto.
"""

from __future__ import annotations

import heapq

from hostmaint.models import FleetSnapshot, HostState, RebalanceMove, RebalancePlan, Vm
from hostmaint.placement.evacuate import Choice, placement_for
from hostmaint.placement.fit import Miss, fit_host
from hostmaint.placement.objective import balance, fit_delta, release_delta
from hostmaint.placement.state import Fit, Ledger

# How many of the least-loaded hosts a levelling step weighs as targets; the best move
# almost always goes to one of them, and it keeps 1,000-host clusters fast.
TARGET_FANOUT = 12


def _move_gain(ledger: Ledger, vm: Vm, fit: Fit) -> float:
    """Drop in the objective if ``vm`` moves from its host to ``fit`` (positive = better)."""
    return -(fit_delta(ledger.hosts[fit.host], fit) + release_delta(ledger.hosts[vm.host], vm.memory_mib))


def plan_rebalance(snapshot: FleetSnapshot, max_moves: int, *, prefer_origin: bool = True) -> RebalancePlan:
    """Level the cluster with at most ``max_moves`` migrations; report balance before and after."""
    ledger = Ledger.from_snapshot(snapshot)
    active = {n: h for n, h in ledger.hosts.items() if h.state is HostState.ACTIVE}
    before = balance(active.values())
    moves: list[RebalanceMove] = []
    gave: set[str] = set()
    took: set[str] = set()
    moved: set[str] = set()
    vms_by_host: dict[str, list[Vm]] = {n: [] for n in ledger.hosts}
    for vm in sorted(snapshot.vms, key=lambda v: v.name):
        vms_by_host[vm.host].append(vm)

    def commit(vm: Vm, fit: Fit, why: str, gain: float) -> None:
        src = ledger.hosts[vm.host]
        choice = Choice(fit=fit, delta=-gain, avoided=False, runner_up=None, candidates=1)
        placement = placement_for(vm, choice, ledger.hosts[fit.host])
        placement = placement.model_copy(update={"reason": f"{why}; {placement.reason}"})
        ledger.release(vm, credit_cells=False)
        ledger.apply(vm, fit)
        moves.append(RebalanceMove(placement=placement, improvement=round(gain, 6)))
        gave.add(src.name)
        took.add(fit.host)
        moved.add(vm.name)

    if prefer_origin:
        for vm in sorted(snapshot.vms, key=lambda v: v.name):
            if len(moves) >= max_moves:
                break
            origin = vm.origin
            if (not vm.migratable or origin is None or origin == vm.host or origin not in active
                    or vm.host not in active or origin in gave or vm.host in took
                    or active[origin].cpu_group != ledger.hosts[vm.host].cpu_group):
                continue
            got = fit_host(vm, active[origin])
            if isinstance(got, Miss):
                continue
            commit(vm, got, f"returns to its origin {origin}", _move_gain(ledger, vm, got))

    # levelling: a heap of hosts by utilisation, fullest first
    while len(moves) < max_moves:
        best: tuple[float, str, Vm, Fit] | None = None
        donors = heapq.nsmallest(3, (h for h in active.values()
                                     if h.name not in took and vms_by_host[h.name]),
                                 key=lambda h: (-h.util, h.name))
        for src in donors:
            receivers = heapq.nsmallest(
                TARGET_FANOUT, (h for h in active.values()
                                if h.name not in gave and h.name != src.name and h.cpu_group == src.cpu_group
                                and h.util < src.util),
                key=lambda h: (h.util, h.name))
            for vm in vms_by_host[src.name]:
                if vm.name in moved or not vm.migratable:
                    continue
                for dst in receivers:
                    got = fit_host(vm, dst)
                    if isinstance(got, Miss):
                        continue
                    gain = _move_gain(ledger, vm, got)
                    key = (gain, vm.name)
                    if gain > 1e-9 and (best is None or key > (best[0], best[1])):
                        best = (gain, vm.name, vm, got)
        if best is None:
            break
        gain, _, vm, fit = best
        commit(vm, fit, f"levels {vm.host} ({ledger.hosts[vm.host].util:.0%})", gain)

    after = balance(active.values())
    return RebalancePlan(cluster=snapshot.cluster, snapshot_digest=snapshot.digest(), moves=tuple(moves),
                         balance_before=round(before, 6), balance_after=round(after, 6))

