"""Rolling window: patch hosts one at a time so each VM migrates about once.

Naive rolling maintenance (evacuate, patch, move back) costs two migrations
per VM. Here the VMs of each host move onto hosts that are already patched
(or are not part of the window) wherever capacity allows, and hosts still
waiting for their turn are used only when nothing else fits — so a VM moved
there will move again.

Order: hosts whose VMs cannot move and whose policy skips the host are left
out; the rest go emptiest first (by memory to move, then name), so the first
hosts — whose VMs must land on unpatched hosts — move the least, and every
patched host is an empty landing place for the next one.

Simulation between steps: after a host is drained and patched it rejoins
the cluster empty (its VMs' memory is credited back to its cells in
proportion to what each cell used), plus the VMs it shut down, which start
again where they were. A VM that moved is carried on with the pins its
placement gave it (``as_placed``), so a later step that moves it again frees
the CPUs it holds there.

Duration estimate per host: the memory it sends over its link
(``link_mib_s``, ~10 GbE by default; migrations from one source share the
link) plus ``per_migration_s`` of set-up per VM spread over
``migrations_per_source`` parallel slots, plus ``patch_seconds`` to update,
reboot and verify. Hosts go one at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

from hostmaint.models import (
    EvacuationPlan,
    FleetSnapshot,
    Placement,
    PlanProof,
    UnmigratableAction,
    Vm,
    WindowPlan,
    WindowStep,
)
from hostmaint.placement.evacuate import _capacity, _check_hosts, _skipped, evacuate, receivers_balance
from hostmaint.placement.exact import DEFAULT_BUDGET, weakest
from hostmaint.placement.ledger import Ledger, pages_for


def _empty_host(ledger: Ledger, name: str, vms: Sequence[Vm]) -> None:
    """Book a drained host as empty again: every VM that left gives its memory back to the cells."""
    host = ledger.hosts[name]
    for vm in vms:
        used = sum(c.used_mib for c in host.cells)
        for cell in host.cells:
            share = min(cell.used_mib, vm.memory_mib * cell.used_mib / used) if used > 0 else 0.0
            cell.used_mib -= share
            if vm.hugepage_kib:
                cell.hugepages[vm.hugepage_kib] = cell.hugepages.get(vm.hugepage_kib, 0) + pages_for(
                    share, vm.hugepage_kib)
            else:
                cell.avail_mib += share
        ledger.release_bookings(vm, name)


def as_placed(vm: Vm, placement: Placement) -> Vm:
    """``vm`` as it runs on its target after ``placement``: its pins and numatune nodeset rewritten.

    A VM the window moves twice leaves its second host from these, so that step frees and maps the
    CPUs it holds there.
    """
    update: dict[str, object] = {"host": placement.target}
    if vm.pinned:
        update |= {"vcpupin": placement.vcpupin, "emulatorpin": placement.emulatorpin,
                   "vcpu_cpuset": placement.vcpu_cpuset, "iothreadpin": placement.iothreadpin}
    if vm.numatune is not None and placement.numatune_nodeset is not None:
        update["numatune"] = vm.numatune.model_copy(update={"nodeset": placement.numatune_nodeset})
    return vm.model_copy(update=update)


def plan_window(snapshot: FleetSnapshot, hosts: Sequence[str] | None = None, *, spare_hosts: int | None = None,
                link_mib_s: float = 1100.0, per_migration_s: float = 10.0,
                patch_seconds: float = 900.0, prefer_patched: bool = True,
                exact_budget: float = DEFAULT_BUDGET) -> WindowPlan:
    """Order ``hosts`` (default: every host of the cluster) and plan each one's evacuation so VMs
    land on already-patched hosts; report migrations per VM and the estimated duration.

    ``prefer_patched=False`` plans each host as a plain evacuation (no preference for patched
    hosts): the benchmark's baseline. ``exact_budget``: what the exact stage may spend optimising the
    whole window's placements (shared by its steps, in order), and each step that the greedy would
    refuse gets that much again to search (see ``plan_evacuation``); the window's ``proof`` is the
    weakest of its steps'.
    """
    names = _check_hosts(snapshot, hosts if hosts is not None else sorted(h.name for h in snapshot.hosts))
    skipped = _skipped(snapshot, names)
    todo = [n for n in names if n not in skipped]
    # one host is out at a time: N+1 must hold for each of them; the plan states the tightest
    ledger = Ledger.from_snapshot(snapshot)
    checks = [_capacity(snapshot, ledger, [n], spare_hosts) for n in todo]  # reads the ledger only
    capacity = min(checks, key=lambda c: c.margin_mib) if checks else None

    def load(name: str) -> tuple[int, str]:
        return (sum(v.memory_mib for v in snapshot.vms_on(name) if v.migratable), name)

    order = sorted(todo, key=load)
    # Optimising every step would cost a window of dozens of hosts minutes; the steps share one
    # budget for that (first hosts first), while a step that refuses always gets its own to search.
    pool = exact_budget
    # where each VM is now, as the window moves it around
    location: dict[str, str] = {v.name: v.host for v in snapshot.vms}
    vm_by_name = {v.name: v for v in snapshot.vms}
    moves: dict[str, int] = {}
    steps: list[WindowStep] = []
    digest = snapshot.digest()
    total_seconds = 0.0
    for i, name in enumerate(order):
        here = [vm_by_name[v].model_copy(update={"host": name})
                for v, h in sorted(location.items()) if h == name]
        current = snapshot.model_copy(update={"vms": tuple(here)})
        later = set(order[i + 1:]) if prefer_patched else set()
        result = evacuate(current, ledger, [name], avoid=later, exact_budget=exact_budget, optimise_budget=pool)
        pool = max(pool - result.exact_spent, 0.0)
        plan = EvacuationPlan(cluster=snapshot.cluster, hosts=(name,), snapshot_digest=digest,
                              placements=tuple(result.placements), blocked=tuple(result.blocked),
                              vm_actions=tuple(result.vm_actions), skipped_hosts=tuple(result.skipped_hosts),
                              balance=receivers_balance(ledger, [name], result.placements),
                              proof=result.proof, proof_note=result.proof_note)
        # the host comes back patched, without the VMs that moved (those it shut down start again;
        # blocked ones never left); each leaving VM frees the CPUs it pins here, which for one that
        # arrived earlier in the window are those its placement gave it, not the snapshot's
        gone = {p.vm for p in result.placements}
        leaving = [v for v in here if v.name in gone]
        _empty_host(ledger, name, leaving)
        for p in result.placements:
            location[p.vm] = p.target
            moves[p.vm] = moves.get(p.vm, 0) + 1
            vm_by_name[p.vm] = as_placed(vm_by_name[p.vm], p)
        sent = sum(p.memory_mib for p in result.placements)
        slots = max(snapshot.limits.migrations_per_source, 1)
        seconds = sent / link_mib_s + per_migration_s * len(result.placements) / slots + patch_seconds
        if any(a.action is UnmigratableAction.SHUTDOWN for a in result.vm_actions):
            seconds += 120.0  # clean shutdown and start of the VMs that cannot move
        total_seconds += seconds
        steps.append(WindowStep(order=i + 1, host=name, evacuation=plan, estimated_seconds=round(seconds, 1)))
    migrations = sum(moves.values())
    moved = len(moves)
    return WindowPlan(cluster=snapshot.cluster, snapshot_digest=digest, steps=tuple(steps),
                      skipped_hosts=tuple(n for n in names if n in skipped), capacity=capacity,
                      migrations=migrations, vms_moved=moved,
                      migrations_per_vm=round(migrations / moved, 4) if moved else 0.0,
                      estimated_seconds=round(total_seconds, 1),
                      proof=weakest(s.evacuation.proof for s in steps) if steps else PlanProof.OPTIMAL)
