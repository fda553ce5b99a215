"""Hand-written cases for the planner: NUMA fit, rewrites, policies, N+1, window, rebalance."""

from __future__ import annotations

import pytest

from hostmaint.errors import InputError
from hostmaint.models import (
    Cell,
    FleetSnapshot,
    GuestCell,
    Host,
    HostState,
    HugePages,
    Limits,
    Numatune,
    RebalanceMove,
    UnmigratableAction,
    Vm,
)
from hostmaint.placement import (
    check_capacity,
    plan_evacuation,
    plan_rebalance,
    plan_window,
    render_plan,
    stale_targets,
)

GIB = 1024
_uuid = iter(range(1, 10**6))


def cell(id: int, gib: int, free_gib: float, cpus: range | tuple[int, ...] = (), hugepages: tuple[HugePages, ...] = ()
         ) -> Cell:
    return Cell(id=id, memory_mib=gib * GIB, free_mib=int(free_gib * GIB), cpus=tuple(cpus), hugepages=hugepages)


def host(name: str, *cells: Cell, state: HostState = HostState.ACTIVE, cpu_group: str = "default",
         reserved_gib: int = 0) -> Host:
    return Host(name=name, cluster="c", state=state, cells=cells, cpu_group=cpu_group,
                reserved_memory_mib=reserved_gib * GIB)


def two_cells(name: str, free0: float, free1: float, **kw: object) -> Host:
    """A 2 × 64 GiB, 2 × 8 CPU host."""
    return host(name, cell(0, 64, free0, range(0, 8)), cell(1, 64, free1, range(8, 16)), **kw)  # type: ignore[arg-type]


def vm(name: str, on: str, gib: float, vcpus: int = 2, **kw: object) -> Vm:
    return Vm(name=name, uuid=f"u{next(_uuid)}", host=on, memory_mib=int(gib * GIB), vcpus=vcpus, **kw)  # type: ignore[arg-type]


def snap(*hosts: Host, vms: tuple[Vm, ...] = (), headroom: float = 0.0, overcommit: float = 4.0) -> FleetSnapshot:
    return FleetSnapshot(cluster="c", taken_at="t", hosts=hosts, vms=vms,
                         limits=Limits(memory_headroom_pct=headroom, vcpu_overcommit=overcommit))


def only(plan, name: str):  # type: ignore[no-untyped-def]
    return next(p for p in plan.placements if p.vm == name)


# --- NUMA fit -------------------------------------------------------------------------------------


def test_vnuma_guest_cells_map_one_to_one_onto_distinct_cells_that_fit() -> None:
    target = host("b", cell(0, 64, 10, range(0, 4)), cell(1, 64, 40, range(4, 8)),
                  cell(2, 64, 12, range(8, 12)), cell(3, 64, 35, range(12, 16)))
    wide = vm("wide", "a", 60, vcpus=4, vnuma=(GuestCell(id=0, memory_mib=30 * GIB, vcpus=(0, 1)),
                                                 GuestCell(id=1, memory_mib=30 * GIB, vcpus=(2, 3))))
    plan = plan_evacuation(snap(two_cells("a", 0, 0), target, two_cells("z", 64, 64), vms=(wide,)), ["a"],
                           spare_hosts=0, avoid={"z"})
    p = only(plan, "wide")
    assert plan.feasible and p.target == "b" and p.numa_local
    assert sorted(p.target_cells) == [1, 3]  # the only two cells with 30 GiB free each


def test_vnuma_memory_outside_the_guest_cells_is_charged_to_them_in_proportion() -> None:
    # 20 GiB of the VM's 24 are hot-plugged DIMMs outside its 1 + 3 GiB guest cells: every MiB is
    # on the host, so the cells' 16 GiB free (32 together) cannot take 1:1 what needs 6 + 18
    dimms = vm("dimms", "a", 24, vcpus=4, vnuma=(GuestCell(id=0, memory_mib=1 * GIB, vcpus=(0, 1)),
                                                   GuestCell(id=1, memory_mib=3 * GIB, vcpus=(2, 3))),
               numatune=Numatune(mode="strict", nodeset=(0, 1)))
    small = host("small", cell(0, 16, 16, range(0, 4)), cell(1, 16, 16, range(4, 8)))
    plan = plan_evacuation(snap(two_cells("a", 0, 0), small, vms=(dimms,)), ["a"], spare_hosts=0)
    [blk] = plan.blocked
    assert (blk.vm, blk.constraint) == ("dimms", "numa") and "6144, 18432 MiB" in blk.reason
    big = host("big", cell(0, 64, 10, range(0, 4)), cell(1, 64, 30, range(4, 8)))
    plan = plan_evacuation(snap(two_cells("a", 0, 0), big, vms=(dimms,)), ["a"], spare_hosts=0)
    p = only(plan, "dimms")
    # guest cell 1 (3 of the 4 listed GiB) takes 3/4 of the memory: only cell 1 holds 18 GiB
    assert p.target_cells == (0, 1) and p.cell_memory_mib == (6 * GIB, 18 * GIB)
    assert sum(p.cell_memory_mib) == p.memory_mib == 24 * GIB


def test_rounding_leftovers_make_the_guest_cells_add_up_to_the_vm() -> None:
    odd = vm("odd", "a", 3002 / GIB, vcpus=3,
             vnuma=tuple(GuestCell(id=i, memory_mib=1000, vcpus=(i,)) for i in range(3)))
    p = only(plan_evacuation(snap(two_cells("a", 0, 0), two_cells("b", 60, 60), host("c", *(
        cell(i, 16, 16, range(i * 2, i * 2 + 2)) for i in range(3))), vms=(odd,)), ["a"], spare_hosts=0), "odd")
    assert p.cell_memory_mib == (1001, 1001, 1000)


def test_vnuma_with_more_guest_cells_than_any_host_is_blocked_as_numa() -> None:
    wide = vm("wide", "a", 8, vcpus=4, vnuma=tuple(GuestCell(id=i, memory_mib=2 * GIB, vcpus=(i,)) for i in range(4)))
    plan = plan_evacuation(snap(two_cells("a", 0, 0), two_cells("b", 60, 60), vms=(wide,)), ["a"], spare_hosts=0)
    assert not plan.feasible
    [b] = plan.blocked
    assert (b.vm, b.host, b.constraint) == ("wide", "a", "numa")


def test_single_cell_fit_beats_a_emptier_host_that_could_only_take_it_across_cells() -> None:
    # b is emptier overall but holds 48 GiB only across its two cells; c holds it in cell 1
    b = two_cells("b", 30, 30)
    c = two_cells("c", 2, 50)
    plan = plan_evacuation(snap(two_cells("a", 0, 0), b, c, vms=(vm("big", "a", 48),)), ["a"], spare_hosts=0)
    p = only(plan, "big")
    assert (p.target, p.target_cells, p.numa_local) == ("c", (1,), True)


def test_numa_remote_only_when_no_single_cell_fit_exists_anywhere() -> None:
    plan = plan_evacuation(snap(two_cells("a", 0, 0), two_cells("b", 30, 30), vms=(vm("big", "a", 48),)),
                           ["a"], spare_hosts=0)
    p = only(plan, "big")
    assert plan.feasible and not p.numa_local and sorted(p.target_cells) == [0, 1]
    assert "NUMA-remote" in p.reason


def test_pinned_vm_gets_free_unpinned_cpus_of_its_new_cell_and_rewritten_pins() -> None:
    # target cell 0 has no memory; cell 1 (CPUs 8-15) has 8 and 9 pinned by a VM already there
    b = two_cells("b", 1, 40)
    resident = vm("resident", "b", 1, vcpus=2, vcpupin={0: (8,), 1: (9,)}, emulatorpin=(8,))
    pinned = vm("pinned", "a", 8, vcpus=2, vcpupin={0: (2,), 1: (3,)}, emulatorpin=(2, 3),
                numatune=Numatune(mode="strict", nodeset=(0,)))
    plan = plan_evacuation(snap(two_cells("a", 0, 0), b, vms=(resident, pinned)), ["a"], spare_hosts=0)
    p = only(plan, "pinned")
    assert (p.target, p.target_cells) == ("b", (1,))
    assert p.vcpupin == {0: (10,), 1: (11,)}
    assert p.emulatorpin == (10, 11)
    assert p.numatune_nodeset == (1,)


def test_emulator_pinning_alone_is_pinning_it_moves_rewritten_and_reserves_its_cpus() -> None:
    # b's CPUs 8 and 9 hold the emulator threads of "emu", which pins no vCPU: they are taken
    b = host("b", cell(0, 64, 40, range(0, 8)), cell(1, 64, 40, range(8, 10)))
    emu_there = vm("emu", "b", 1, emulatorpin=(8, 9))
    # "moving" pins only its emulator threads, on CPUs a VM on b pins for its vCPUs
    resident = vm("resident", "b", 1, vcpupin={0: (2,), 1: (3,)})
    moving = vm("moving", "a", 4, emulatorpin=(2, 3))
    pinned = vm("pinned", "a", 4, vcpupin={0: (4,), 1: (5,)})
    s = snap(two_cells("a", 0, 0), b, vms=(emu_there, resident, moving, pinned))
    plan = plan_evacuation(s, ["a"], spare_hosts=0)
    assert plan.feasible
    mv, pn = only(plan, "moving"), only(plan, "pinned")
    # the emulator pinning is rewritten onto free CPUs of the chosen cell (never 2, 3 or 8, 9) ...
    assert mv.vcpupin == {} and len(mv.emulatorpin) == 2
    assert mv.target_cells == (0,) and set(mv.emulatorpin) <= set(range(0, 8)) - {2, 3}
    # ... and no vCPU is pinned onto emulator threads' CPUs, those of "emu" or of "moving"
    pins = {c for cpus in pn.vcpupin.values() for c in cpus}
    assert len(pins) == 2 and not pins & ({2, 3, 8, 9} | set(mv.emulatorpin))


def test_vcpu_cpuset_alone_is_pinning_it_reserves_its_cpus_and_is_rewritten() -> None:
    # b's cell 1 (CPUs 8-15): 8-9 held by the <vcpu cpuset> of "there", which has no vcpupin
    b = host("b", cell(0, 64, 0, range(0, 8)), cell(1, 64, 40, range(8, 16)))
    there = vm("there", "b", 1, vcpu_cpuset=(8, 9))
    # "moving" is bound by its cpuset alone, to CPUs that are "there"'s on b
    moving = vm("moving", "a", 4, vcpu_cpuset=(8, 9))
    pinned = vm("pinned", "a", 2, vcpupin={0: (10,), 1: (11,)})
    plan = plan_evacuation(snap(two_cells("a", 0, 0), b, vms=(there, moving, pinned)), ["a"], spare_hosts=0)
    assert plan.feasible
    mv, pn = only(plan, "moving"), only(plan, "pinned")
    # the cpuset moves onto free CPUs of its target cell, never the 8-9 "there" holds ...
    assert mv.target_cells == (1,) and len(mv.vcpu_cpuset) == 2
    assert set(mv.vcpu_cpuset) <= set(range(10, 16))
    # ... its emulator threads (which run on the cpuset) say so explicitly ...
    assert mv.emulatorpin == mv.vcpu_cpuset and mv.vcpupin == {}
    # ... and the CPUs it now holds are reserved: no vCPU of "pinned" lands on them
    pins = {c for cpus in pn.vcpupin.values() for c in cpus}
    assert len(pins) == 2 and not pins & ({8, 9} | set(mv.vcpu_cpuset))


def test_a_vcpu_cpuset_without_room_in_any_cell_is_blocked_as_pinning() -> None:
    b = host("b", cell(0, 64, 40, range(0, 2)), cell(1, 64, 40, range(2, 4)))
    wide = vm("wide", "a", 4, vcpu_cpuset=(0, 1, 2, 3, 4))
    plan = plan_evacuation(snap(two_cells("a", 0, 0), b, vms=(wide,)), ["a"], spare_hosts=0)
    [blk] = plan.blocked
    assert (blk.vm, blk.constraint) == ("wide", "pinning")


def test_pinned_vm_without_enough_free_cpus_in_any_cell_is_blocked_as_pinning() -> None:
    b = host("b", cell(0, 64, 40, range(0, 2)))
    pinned = vm("pinned", "a", 4, vcpus=4, vcpupin={i: (i,) for i in range(4)})
    plan = plan_evacuation(snap(two_cells("a", 0, 0), b, vms=(pinned,)), ["a"], spare_hosts=0)
    [blk] = plan.blocked
    assert (blk.vm, blk.constraint) == ("pinned", "pinning")


def test_strict_numatune_nodeset_is_rewritten_to_a_cell_that_holds_the_memory() -> None:
    b = two_cells("b", 20, 5)
    strict = vm("strict", "a", 16, numatune=Numatune(mode="strict", nodeset=(1,)))
    p = only(plan_evacuation(snap(two_cells("a", 0, 0), b, vms=(strict,)), ["a"], spare_hosts=0), "strict")
    assert p.numatune_nodeset == (0,) and p.target_cells == (0,)


def test_hugepage_vm_needs_free_pages_of_its_size_in_the_cell() -> None:
    gig = 1024 * 1024
    b = host("b", cell(0, 64, 60, range(0, 8), (HugePages(size_kib=2048, total=8192, free=8192),)))
    c = host("c", cell(0, 64, 5, range(0, 8), (HugePages(size_kib=gig, total=20, free=10),)),
             cell(1, 64, 5, range(8, 16), (HugePages(size_kib=gig, total=20, free=12),)))
    hp = vm("hp", "a", 12, hugepage_kib=gig)
    a = host("a", cell(0, 64, 0, range(0, 8), (HugePages(size_kib=gig, total=12, free=0),)))  # its pool backs hp
    plan = plan_evacuation(snap(a, b, c, vms=(hp,)), ["a"], spare_hosts=0)
    p = only(plan, "hp")
    assert (p.target, p.target_cells) == ("c", (1,))  # b has only 2 MiB pages; c cell 0 has 10 x 1 GiB


def test_vcpu_budget_is_cpu_count_times_overcommit_minus_vcpus_there() -> None:
    b = two_cells("b", 60, 60)  # 16 CPUs x 1.0 = 16 vCPUs, 14 taken
    s = snap(two_cells("a", 0, 0), b, vms=(vm("busy", "b", 1, vcpus=14), vm("mover", "a", 1, vcpus=4)),
             overcommit=1.0)
    [blk] = plan_evacuation(s, ["a"], spare_hosts=0).blocked
    assert (blk.vm, blk.constraint) == ("mover", "vcpu")


def test_memory_accounts_for_reserved_headroom_and_earlier_placements() -> None:
    # b cell 0: 20 GiB free - 4 GiB reserved share - 10 % of 64 GiB = 9.6 GiB plannable
    b = host("b", cell(0, 64, 20, range(0, 8)), reserved_gib=4)
    vms = (vm("v1", "a", 6), vm("v2", "a", 6))
    plan = plan_evacuation(snap(two_cells("a", 0, 0), b, vms=vms, headroom=10), ["a"], spare_hosts=0)
    assert [p.vm for p in plan.placements] == ["v1"] or [p.vm for p in plan.placements] == ["v2"]
    [blk] = plan.blocked
    assert blk.constraint == "memory" and "needs 6144" in blk.reason


# --- which hosts may receive ----------------------------------------------------------------------


def test_targets_stay_in_the_cluster_of_the_source() -> None:
    other = two_cells("x", 63, 63).model_copy(update={"cluster": "other"})
    s = snap(two_cells("a", 0, 0), two_cells("b", 20, 20), other, vms=(vm("v", "a", 4),))
    assert only(plan_evacuation(s, ["a"], spare_hosts=0), "v").target == "b"


def test_targets_are_active_same_cpu_group_and_not_drained() -> None:
    hosts = (two_cells("a", 0, 0, cpu_group="icelake"), two_cells("b", 60, 60, cpu_group="icelake"),
             two_cells("c", 63, 63, cpu_group="icelake", state=HostState.CORDONED),
             two_cells("d", 63, 63, cpu_group="sapphire"), two_cells("e", 63, 63, cpu_group="icelake"))
    vms = tuple(vm(f"v{i}", "a", 4) for i in range(6))
    plan = plan_evacuation(snap(*hosts, vms=vms), ["a", "e"], spare_hosts=0)
    assert plan.feasible and {p.target for p in plan.placements} == {"b"}


def test_no_host_in_the_cpu_group_is_a_cpu_group_blocker() -> None:
    s = snap(two_cells("a", 0, 0, cpu_group="x"), two_cells("b", 60, 60, cpu_group="y"), vms=(vm("v", "a", 1),))
    [blk] = plan_evacuation(s, ["a"], spare_hosts=0).blocked
    assert blk.constraint == "cpu-group"


def test_avoided_hosts_are_used_only_when_nothing_else_fits() -> None:
    s = snap(two_cells("a", 0, 0), two_cells("later", 63, 63), two_cells("b", 12, 0),
             vms=(vm("v1", "a", 8), vm("v2", "a", 8)))
    plan = plan_evacuation(s, ["a"], avoid={"later"}, spare_hosts=0)
    targets = {p.vm: p.target for p in plan.placements}
    assert sorted(targets.values()) == ["b", "later"]
    assert "due for maintenance later" in only(plan, targets and next(v for v, t in targets.items()
                                                                     if t == "later")).reason


def test_anti_affinity_counts_vms_already_on_the_target() -> None:
    hosts = (two_cells("a", 0, 0), two_cells("b", 60, 60), two_cells("c", 30, 30), two_cells("d", 20, 20))
    vms = (vm("db1", "a", 4, anti_affinity="db"), vm("db2", "a", 4, anti_affinity="db"),
           vm("db3", "b", 4, anti_affinity="db"))
    plan = plan_evacuation(snap(*hosts, vms=vms), ["a"], spare_hosts=0)
    assert plan.feasible
    assert sorted(p.target for p in plan.placements) == ["c", "d"]


def test_anti_affinity_with_no_free_host_is_named() -> None:
    vms = (vm("db1", "a", 4, anti_affinity="db"), vm("db2", "b", 4, anti_affinity="db"))
    [blk] = plan_evacuation(snap(two_cells("a", 0, 0), two_cells("b", 60, 60), vms=vms), ["a"], spare_hosts=0).blocked
    assert (blk.vm, blk.constraint) == ("db1", "anti-affinity")


# --- VMs that cannot move -----------------------------------------------------------------------


@pytest.mark.parametrize("policy", list(UnmigratableAction))
def test_unmigratable_vms_follow_their_policy(policy: UnmigratableAction) -> None:
    vms = (vm("gpu", "a", 4, migratable=False, not_migratable_reason="host device", on_unmigratable=policy),
           vm("web", "a", 4))
    plan = plan_evacuation(snap(two_cells("a", 0, 0), two_cells("b", 60, 60), vms=vms), ["a"], spare_hosts=0)
    if policy is UnmigratableAction.BLOCK:
        [blk] = plan.blocked
        assert (blk.vm, blk.constraint) == ("gpu", "unmigratable") and "on_unmigratable: shutdown" in blk.hint
        assert not plan.feasible
    elif policy is UnmigratableAction.SHUTDOWN:
        assert plan.feasible and [p.vm for p in plan.placements] == ["web"]
        assert [(a.vm, a.action) for a in plan.vm_actions] == [("gpu", UnmigratableAction.SHUTDOWN)]
    else:
        assert plan.feasible and plan.skipped_hosts == ("a",) and plan.placements == ()


# --- N+1 --------------------------------------------------------------------------------------------


def test_n_plus_one_refuses_when_losing_the_largest_remaining_host_would_not_fit() -> None:
    # each host 128 GiB, 64 GiB used; draining a moves 64 GiB onto b and c (128 GiB used of 256);
    # losing one of them leaves 128 GiB for 192 GiB of load
    hosts = (two_cells("a", 32, 32), two_cells("b", 32, 32), two_cells("c", 32, 32))
    vms = tuple(vm(f"v{i}", "a", 8) for i in range(8))
    check = check_capacity(snap(*hosts, vms=vms), ["a"])
    assert not check.ok and check.margin_mib == -64 * GIB and "refused" in check.reason
    plan = plan_evacuation(snap(*hosts, vms=vms), ["a"])
    assert not plan.feasible and not plan.blocked and plan.capacity == check


def test_n_plus_one_states_the_margin_when_it_holds() -> None:
    hosts = (two_cells("a", 60, 60), two_cells("b", 60, 60), two_cells("c", 60, 60), two_cells("d", 60, 60))
    vms = (vm("v", "a", 8),)
    check = check_capacity(snap(*hosts, vms=vms), ["a"])
    # usable 3 x 128, lose 128, used 3 x 8 GiB + 8 GiB moved
    assert check.ok and check.margin_mib == (256 - 24 - 8) * GIB


def test_spare_hosts_comes_from_the_cluster_limits() -> None:
    s = snap(two_cells("a", 60, 60), two_cells("b", 60, 60), vms=(vm("v", "a", 4),))
    assert not check_capacity(s, ["a"]).ok  # one host left: N+1 cannot hold
    lab = s.model_copy(update={"limits": Limits(spare_hosts=0)})
    check = check_capacity(lab, ["a"])
    assert check.ok and "N+0" in check.reason
    assert plan_evacuation(lab, ["a"]).feasible and not plan_evacuation(s, ["a"]).feasible
    assert check_capacity(lab, ["a"], spare_hosts=1) == check_capacity(s, ["a"])


def test_unknown_host_is_an_input_error() -> None:
    with pytest.raises(InputError, match="nope"):
        plan_evacuation(snap(two_cells("a", 0, 0), two_cells("b", 9, 9)), ["nope"])


# --- determinism and output ---------------------------------------------------------------------------


def test_same_snapshot_same_plan_and_digest_recorded() -> None:
    hosts = tuple(two_cells(n, 30, 30) for n in "abcde")
    vms = tuple(vm(f"v{i}", "a", 2 + i % 5, anti_affinity="g" if i % 3 == 0 else None) for i in range(9))
    s = snap(*hosts, vms=vms)
    first, second = plan_evacuation(s, ["a"]), plan_evacuation(s, ["a"])
    assert first == second and first.snapshot_digest == s.digest()
    reordered = FleetSnapshot.model_validate(s.model_dump() | {"hosts": tuple(reversed(s.hosts)),
                                                               "vms": tuple(reversed(s.vms))})
    assert plan_evacuation(reordered, ["a"]).placements == first.placements


def test_every_placement_says_why_and_names_the_runner_up() -> None:
    s = snap(two_cells("a", 0, 0), two_cells("b", 60, 60), two_cells("c", 40, 40), vms=(vm("v", "a", 4),))
    plan = plan_evacuation(s, ["a"], spare_hosts=0)
    p = only(plan, "v")
    assert p.target == "b" and p.runner_up == "c" and "runner-up c" in p.reason and "single-cell" in p.reason
    # b: 128 GiB with 4 + 4 GiB used + 4 moved = 12; c: 48 used of 128; capacity-weighted mean 30/128
    assert plan.balance is not None and plan.balance.hosts == 2 and plan.balance.numa_remote == 0
    assert plan.balance.host_max_mean == pytest.approx((48 / 128) / (60 / 256), abs=1e-3)


def test_render_plan_shows_placements_and_blockers() -> None:
    vms = (vm("gpu", "a", 4, migratable=False), vm("web", "a", 4))
    text = render_plan(plan_evacuation(snap(two_cells("a", 0, 0), two_cells("b", 60, 60), vms=vms), ["a"]))
    assert "NOT FEASIBLE" in text and "web" in text and "BLOCKED" in text and "unmigratable" in text


# --- rolling window ---------------------------------------------------------------------------------


def _window_fleet() -> FleetSnapshot:
    hosts = tuple(two_cells(f"h{i}", 40, 40) for i in range(5))
    vms = tuple(vm(f"h{i}-v{j}", f"h{i}", 6) for i in range(5) for j in range(3 + i % 2))
    return snap(*hosts, vms=vms)


def test_window_moves_vms_onto_already_patched_hosts() -> None:
    s = _window_fleet()
    plan = plan_window(s, spare_hosts=0)
    assert plan.feasible and len(plan.steps) == 5
    assert plan.order[0] in {"h0", "h2", "h4"}  # the emptiest host goes first
    for step in plan.steps[1:]:
        patched = set(plan.patched_before(step.host))
        assert step.evacuation.placements
        assert all(p.target in patched for p in step.evacuation.placements), step.host
    # only the first host's VMs move twice
    first = len(plan.steps[0].evacuation.placements)
    assert plan.migrations == len(s.vms) + first
    assert plan.migrations_per_vm == pytest.approx(plan.migrations / len(s.vms), abs=1e-3)
    assert plan.migrations_per_vm < 1.25
    assert plan.estimated_seconds == pytest.approx(sum(st.estimated_seconds for st in plan.steps), abs=1)
    assert "Rolling window" in render_plan(plan)


def test_window_leaves_out_hosts_whose_vms_skip_the_host() -> None:
    s = _window_fleet()
    stuck = vm("stuck", "h1", 1, migratable=False, on_unmigratable=UnmigratableAction.SKIP_HOST)
    s = s.model_copy(update={"vms": s.vms + (stuck,)})
    plan = plan_window(s, ["h0", "h1", "h2"], spare_hosts=0)
    assert plan.skipped_hosts == ("h1",) and plan.order == ("h0", "h2")


def test_a_vm_moved_twice_frees_the_cpus_it_was_given_not_its_original_ones() -> None:
    # A's Y pins A's CPUs 0-1 and lands on B (CPUs 2-3: X pins 0-1 and stays, shut down for B's
    # patch); when B is drained Y leaves B's 2-3, and C's Z, pinned too, must not get X's 0-1
    def one(name: str, gib: int, used: int, cpus: tuple[int, ...]) -> Host:
        return host(name, cell(0, gib, gib - used, cpus))

    vms = (vm("X", "B", 4, vcpupin={0: (0,), 1: (1,)}, migratable=False,
              on_unmigratable=UnmigratableAction.SHUTDOWN),
           vm("W", "B", 6, vcpus=1),
           vm("Y", "A", 4, vcpupin={0: (0,), 1: (1,)}),
           vm("Z", "C", 8, vcpupin={0: (0,), 1: (1,)}))
    s = snap(one("A", 9, 4, (0, 1)), one("B", 64, 10, (0, 1, 2, 3)), one("C", 64, 8, (0, 1)), vms=vms)
    plan = plan_window(s, spare_hosts=0)
    assert plan.feasible and plan.order == ("A", "B", "C")
    # replay the window: after every step no CPU of a host is pinned by two VMs
    where = {v.name: v.host for v in s.vms}
    pins = {v.name: {c for cpus in v.vcpupin.values() for c in cpus} for v in s.vms}
    for step in plan.steps:
        for p in step.evacuation.placements:
            where[p.vm] = p.target
            pins[p.vm] = {c for cpus in p.vcpupin.values() for c in cpus} | set(p.emulatorpin)
        for h in ("A", "B", "C"):
            held = [c for v, on in where.items() if on == h for c in pins[v]]
            assert len(held) == len(set(held)), (step.host, h, sorted(held))
    z = next(p for st in plan.steps for p in st.evacuation.placements if p.vm == "Z")
    assert z.target == "B" and z.vcpupin == {0: (2,), 1: (3,)}


# --- rebalance --------------------------------------------------------------------------------------


def _lopsided() -> FleetSnapshot:
    hosts = (two_cells("full", 8, 8), two_cells("mid", 40, 40), two_cells("empty", 62, 62))
    vms = tuple(vm(f"f{i}", "full", 14) for i in range(8)) + tuple(vm(f"m{i}", "mid", 12) for i in range(4))
    return snap(*hosts, vms=vms)


def test_rebalance_improves_balance_within_the_move_budget() -> None:
    plan = plan_rebalance(_lopsided(), 3)
    assert 0 < len(plan.moves) <= 3
    assert plan.balance_after < plan.balance_before
    assert all(m.improvement > 0 for m in plan.moves)
    assert sum(m.improvement for m in plan.moves) == pytest.approx(plan.balance_before - plan.balance_after,
                                                                   abs=1e-4)
    assert all(m.placement.source == "full" for m in plan.moves)
    assert plan.spread_before is not None and plan.spread_after is not None
    assert plan.spread_after.host_std < plan.spread_before.host_std
    assert plan_rebalance(_lopsided(), 0).moves == ()


def test_a_move_budget_past_the_vms_plans_as_one_of_every_vm() -> None:
    # a budget of 10^20 moves ended in a TypeError from OR-Tools (its constants are 64-bit); a VM moves
    # at most once, so any budget past the VMs is the same plan
    fleet = _lopsided()
    assert plan_rebalance(fleet, 10**20) == plan_rebalance(fleet, len(fleet.vms)) == plan_rebalance(fleet, None)
    with pytest.raises(ValueError, match="max_moves"):
        plan_rebalance(fleet, -1)


def test_rebalance_stops_when_no_move_helps() -> None:
    hosts = (two_cells("a", 40, 40), two_cells("b", 40, 40))
    vms = (vm("a1", "a", 24), vm("b1", "b", 24))
    assert plan_rebalance(snap(*hosts, vms=vms), 10).moves == ()


def test_rebalance_returns_vms_to_their_origin_first() -> None:
    s = _lopsided()
    homesick = vm("homesick", "empty", 2, origin="mid")
    s = s.model_copy(update={"vms": s.vms + (homesick,)})
    plan = plan_rebalance(s, 2)
    assert plan.moves[0].placement.vm == "homesick" and plan.moves[0].placement.target == "mid"
    assert "origin" in plan.moves[0].placement.reason
    assert all(m.placement.vm != "homesick" for m in plan_rebalance(s, 2, prefer_origin=False).moves)


def test_rebalance_and_evacuation_leave_a_memoryless_cell_alone() -> None:
    # a host must hold memory (the snapshot refuses one without: tests/unit/test_models.py), but a
    # CPU-only cell beside others is real; it neither divides by zero nor receives memory
    odd = host("odd", cell(0, 64, 64, range(0, 4)), cell(1, 0, 0, range(4, 8)))
    s = snap(two_cells("full", 8, 8), odd, vms=tuple(vm(f"f{i}", "full", 14) for i in range(8)))
    moves = plan_rebalance(s, 4).moves
    assert moves and all(m.placement.target_cells == (0,) for m in moves if m.placement.target == "odd")
    evac = plan_evacuation(s, ["full"], spare_hosts=0)
    assert all(p.target_cells == (0,) for p in evac.placements)


def _after_a_window() -> FleetSnapshot:
    """Four hosts at 75 % and two left empty, as the last hosts of a rolling window are."""
    hosts = tuple(two_cells(f"h{i}", 16, 16) for i in range(4)) + (two_cells("h4", 64, 64), two_cells("h5", 64, 64))
    return snap(*hosts, vms=tuple(vm(f"v{i}{j}", f"h{i}", 8) for i in range(4) for j in range(12)))


def _utils_after(s: FleetSnapshot, moves: tuple[RebalanceMove, ...]) -> dict[str, float]:
    used = {h.name: 0 for h in s.hosts}
    for v in s.vms:
        used[v.host] += v.memory_mib
    for m in moves:
        used[m.placement.source] -= m.placement.memory_mib
        used[m.placement.target] += m.placement.memory_mib
    return {h.name: used[h.name] / h.memory_mib for h in s.hosts}


def test_rebalance_within_a_tolerance_stops_as_soon_as_every_host_is_that_close_to_the_mean() -> None:
    s = _after_a_window()
    full = plan_rebalance(s, None, prefer_origin=False)
    enough = plan_rebalance(s, None, prefer_origin=False, within=0.10)

    mean = sum(v.memory_mib for v in s.vms) / sum(h.memory_mib for h in s.hosts)
    assert all(abs(u - mean) <= 0.10 for u in _utils_after(s, enough.moves).values())
    # the same greedy moves, cut at the first point where the cluster is level enough
    assert enough.moves == full.moves[:len(enough.moves)]
    assert len(enough.moves) < len(full.moves)
    assert any(abs(u - mean) > 0.10 for u in _utils_after(s, enough.moves[:-1]).values())
    assert plan_rebalance(s, 3, prefer_origin=False, within=0.10).moves == enough.moves[:3]


def test_rebalance_refuses_a_tolerance_that_is_not_a_utilisation() -> None:
    with pytest.raises(ValueError, match="within"):
        plan_rebalance(_after_a_window(), None, within=1.5)


def test_a_vm_that_fits_nowhere_gets_room_made_by_moving_a_planned_vm() -> None:
    # balance sends the pinned VM to the emptier b first; then the 10 GiB VM fits nowhere unless the
    # pinned one goes to c instead
    b = host("b", cell(0, 64, 10, range(0, 8)))
    c = host("c", cell(0, 64, 6, range(8, 12)))
    pinned = vm("pinned", "a", 4, vcpus=2, vcpupin={0: (0,), 1: (1,)})
    big = vm("big", "a", 10)
    plan = plan_evacuation(snap(two_cells("a", 0, 0), b, c, vms=(pinned, big)), ["a"], spare_hosts=0)
    assert plan.feasible
    assert {p.vm: p.target for p in plan.placements} == {"pinned": "c", "big": "b"}
    assert only(plan, "pinned").vcpupin == {0: (8,), 1: (9,)}


def test_two_equal_hosts_end_as_even_as_any_split_allows() -> None:
    sizes = (20, 12, 8, 8, 6, 6)
    hosts = (two_cells("a", 0, 0), two_cells("b", 40, 40), two_cells("c", 40, 40))
    vms = tuple(vm(f"v{i}", "a", size) for i, size in enumerate(sizes))
    plan = plan_evacuation(snap(*hosts, vms=vms), ["a"], spare_hosts=0)
    per_host = {t: sum(p.memory_mib for p in plan.placements if p.target == t) for t in ("b", "c")}
    best = min(abs(sum(s for i, s in enumerate(sizes) if mask >> i & 1) * 2 - sum(sizes))
               for mask in range(1 << len(sizes)))
    assert abs(per_host["b"] - per_host["c"]) == best * GIB


def test_a_remote_placement_becomes_local_when_moving_one_planned_vm_frees_a_cell() -> None:
    # the pinned VM goes first (hardest) into b's only 20 GiB cell (b is the emptier host: its free
    # hugepages count as free); then "wide" has no single cell anywhere until "pinned" moves to c
    gig = 1024 * 1024
    b = host("b", cell(0, 128, 20, range(0, 4)),
             cell(1, 128, 10, range(4, 8), (HugePages(size_kib=gig, total=100, free=100),)))
    c = host("c", cell(0, 64, 18, range(0, 4)), cell(1, 64, 18, range(4, 8)))
    vms = (vm("pinned", "a", 18, vcpus=1, vcpupin={0: (0,)}), vm("wide", "a", 20))
    plan = plan_evacuation(snap(two_cells("a", 0, 0), b, c, vms=vms), ["a"], spare_hosts=0)
    assert plan.feasible and all(p.numa_local for p in plan.placements)
    assert {p.vm: p.target for p in plan.placements} == {"pinned": "c", "wide": "b"}


# --- a plan that waited -------------------------------------------------------------------------


def test_a_plan_goes_stale_when_a_target_receives_vms_or_leaves_the_active_hosts() -> None:
    before = snap(two_cells("a", 40, 40), two_cells("b", 60, 60), two_cells("c", 60, 60),
                  vms=(vm("x", "a", 8), vm("y", "b", 4), vm("z", "c", 4)))
    plan = plan_evacuation(before, ["a"])
    [target] = {p.target for p in plan.placements}
    other = "c" if target == "b" else "b"
    assert stale_targets(plan, before, before) == []
    # a VM leaving the target only frees room: the plan still stands
    left = before.model_copy(update={"vms": tuple(v for v in before.vms if v.host != target)})
    assert stale_targets(plan, before, left) == []
    # another run's drain moved a VM onto the target while this plan waited
    moved = before.model_copy(update={"vms": before.vms + (vm("w", target, 50),)})
    assert stale_targets(plan, before, moved) == [f"{target} received w"]
    # the target was cordoned meanwhile
    cordoned = before.model_copy(update={"hosts": tuple(h.model_copy(update={"state": HostState.CORDONED})
                                                        if h.name == target else h for h in before.hosts)})
    assert stale_targets(plan, before, cordoned) == [f"{target} is cordoned now"]
    # a host the plan does not use may change freely
    elsewhere = before.model_copy(update={"vms": before.vms + (vm("v", other, 30),)})
    assert stale_targets(plan, before, elsewhere) == []
    # a VM that landed on the drained host would be left behind by the plan
    landed = before.model_copy(update={"vms": before.vms + (vm("u", "a", 1),)})
    assert stale_targets(plan, before, landed) == ["a (drained) received u"]


# --- focus: a drain sends to few hosts, so drains of one cluster can run side by side ---------------


def _even_cluster(hosts: int = 8, free_gib: float = 40) -> tuple[Host, ...]:
    """``hosts`` hosts of 2 x 64 GiB with ``free_gib`` free in each cell."""
    return tuple(two_cells(f"h{i}", free_gib, free_gib) for i in range(hosts))


def _drain_of(n: int, gib: float = 4) -> tuple[Vm, ...]:
    return tuple(vm(f"v{i}", "h0", gib) for i in range(n))


def test_a_focused_drain_sends_to_as_few_hosts_as_hold_it() -> None:
    # 7 receivers with 80 GiB free each, 16 x 4 GiB to place (10 % headroom: 67.2 GiB plannable each).
    # Balanced, every receiver gets some; focused, one host holds them (64 GiB), and one is what its
    # migrations need at once (2 per source, 2 per target)
    s = snap(*_even_cluster(), vms=_drain_of(16), headroom=10)
    spread = plan_evacuation(s, ["h0"], spare_hosts=0)
    focused = plan_evacuation(s, ["h0"], spare_hosts=0, focus=True)
    assert spread.feasible and focused.feasible and len(focused.placements) == 16
    assert len({p.target for p in spread.placements}) == 7
    targets = {p.target for p in focused.placements}
    assert len(targets) == 1
    # never past the headroom: every target keeps 10 % of its memory
    for t in targets:
        moved = sum(p.memory_mib for p in focused.placements if p.target == t) / GIB
        assert 48 + moved <= 128 * 0.9
    assert "best of" in focused.placements[0].reason


def test_a_focused_drain_takes_as_many_hosts_as_its_migrations_need() -> None:
    # 8 migrations per source, 2 per target: four targets at least, though one could hold the drain
    hosts = tuple(two_cells(f"h{i}", 60, 60) for i in range(8))
    s = FleetSnapshot(cluster="c", taken_at="t", hosts=hosts, vms=_drain_of(8),
                      limits=Limits(memory_headroom_pct=0, migrations_per_source=8, migrations_per_target=2))
    focused = plan_evacuation(s, ["h0"], spare_hosts=0, focus=True)
    assert len({p.target for p in focused.placements}) == 4


def test_a_focused_drain_counts_the_migrations_its_share_lets_it_run_not_its_sources_limit() -> None:
    # 8 per source, 4 per target: two targets by the source's limit; a drain whose share of the
    # cluster's slots is 3 (10 GbE: 2 streams and a set-up slot) runs 3 at once, which one target takes.
    # A second target would be this drain's alone (its inbound lock) and kept from the drains beside it
    hosts = tuple(two_cells(f"h{i}", 60, 60) for i in range(8))
    s = FleetSnapshot(cluster="c", taken_at="t", hosts=hosts, vms=_drain_of(8),
                      limits=Limits(memory_headroom_pct=0, migrations_per_source=8, migrations_per_target=4))
    by_limit = plan_evacuation(s, ["h0"], spare_hosts=0, focus=True)
    assert len({p.target for p in by_limit.placements}) == 2
    by_share = plan_evacuation(s, ["h0"], spare_hosts=0, focus=True, focus_at_once=3)
    assert by_share.feasible and len({p.target for p in by_share.placements}) == 1
    assert len({p.target for p in plan_evacuation(s, ["h0"], spare_hosts=0, focus=True,
                                                  focus_at_once=7).placements}) == 2  # 25 GbE: 5 + 2
    # the share never asks more targets than the source's limit would
    assert plan_evacuation(s, ["h0"], spare_hosts=0, focus=True, focus_at_once=64) == by_limit


def test_a_drain_avoids_hosts_another_drain_fills_and_two_drains_share_no_host() -> None:
    hosts = (*(two_cells(f"h{i}", 60, 60) for i in range(8)),)
    vms = (*(vm(f"a{i}", "h0", 8) for i in range(6)), *(vm(f"b{i}", "h1", 8) for i in range(6)))
    s = snap(*hosts, vms=vms)
    first = plan_evacuation(s, ["h0"], spare_hosts=0, avoid={"h1"}, focus=True)
    busy = {p.target for p in first.placements}
    assert len(busy) < 6  # focused: room for the second drain
    second = plan_evacuation(s, ["h1"], spare_hosts=0, busy=busy, focus=True)
    assert first.feasible and second.feasible
    assert not busy & {p.target for p in second.placements}
    # a busy host is still used when nothing else fits, with the reason in the plan
    crowded = snap(two_cells("h0", 0, 0), two_cells("h1", 30, 30), two_cells("h2", 2, 2),
                   vms=(vm("x", "h0", 20),))
    plan = plan_evacuation(crowded, ["h0"], spare_hosts=0, busy={"h1"})
    assert only(plan, "x").target == "h1" and "another drain is sending VMs" in only(plan, "x").reason


def test_focus_never_prefers_a_host_due_for_maintenance_over_one_that_is_not() -> None:
    # "later" is empty and due; b is fuller than the cluster's level but takes the VMs
    s = snap(two_cells("a", 0, 0), two_cells("later", 64, 64), two_cells("b", 20, 20),
             vms=(vm("v1", "a", 8), vm("v2", "a", 8)))
    plan = plan_evacuation(s, ["a"], avoid={"later"}, spare_hosts=0, focus=True)
    assert {p.target for p in plan.placements} == {"b"}


def test_focused_plans_are_deterministic() -> None:
    s = snap(*_even_cluster(), vms=_drain_of(16))
    assert plan_evacuation(s, ["h0"], spare_hosts=0, focus=True) == plan_evacuation(s, ["h0"], spare_hosts=0,
                                                                                    focus=True)


def test_vms_returning_home_get_pins_of_their_home_and_only_if_they_fit() -> None:
    from hostmaint.placement.rebalance import plan_return

    # "home" is empty after its maintenance but for a resident pinned to CPUs 0-1; three VMs wait on
    # "away": two pinned there to CPUs that mean nothing at home, and one too big to fit home any more
    resident = vm("resident", "home", 4, vcpupin={0: (0,), 1: (1,)})
    first = vm("first", "away", 8, vcpupin={0: (0,), 1: (1,)}, origin="home")
    second = vm("second", "away", 8, vcpupin={0: (2,), 1: (3,)}, origin="home")
    huge = vm("huge", "away", 70, origin="home")
    s = snap(two_cells("home", 60, 64), two_cells("away", 20, 30), vms=(resident, first, second, huge))

    placements = plan_return(s, "home", ["first", "second", "huge"])

    assert [p.vm for p in placements] == ["first", "second"]  # huge stays where it is
    pins = [cpu for p in placements for cpus in p.vcpupin.values() for cpu in cpus]
    assert len(pins) == len(set(pins)) == 4  # no CPU given twice
    assert not {0, 1} & set(pins)  # nor the resident's
    assert all(p.target == "home" and p.reason.startswith("return to origin home") for p in placements)


def test_a_transient_vm_whose_policy_is_shutdown_blocks_the_plan_before_anything_moves() -> None:
    # libvirt forgets a transient domain once it stops: shut down, it could never be started again
    keep = vm("keep", "a", 2, migratable=False, on_unmigratable=UnmigratableAction.SHUTDOWN)
    scratch = vm("scratch", "a", 2, migratable=False, on_unmigratable=UnmigratableAction.SHUTDOWN, persistent=False)
    plan = plan_evacuation(snap(two_cells("a", 60, 60), two_cells("b", 64, 64), vms=(keep, scratch)), ["a"])

    assert not plan.feasible
    assert [(b.vm, b.constraint) for b in plan.blocked] == [("scratch", "transient")]
    assert "could never be started again" in plan.blocked[0].reason
    assert [(a.vm, a.action) for a in plan.vm_actions] == [("keep", UnmigratableAction.SHUTDOWN)]
