"""The window's slot bound: never above an optimum known by hand or by CP-SAT, never beaten by a
simulated window, and above the fluid bound where the first wave's VMs have to move twice."""

from __future__ import annotations

import random

import pytest

from hostmaint.migration.policy import SchedulerPolicy
from hostmaint.migration.simulate import SimParams, simulate_window, window_floor_bound
from hostmaint.migration.window_bound import packing_bound, slot_columns, slot_hosts, window_slot_bound
from hostmaint.models import Cell, FleetSnapshot, Host, Limits, StepOutcome, Vm

# benchmarks/night_bound.py's tiny windows: one stream fills a link, 2 s set-up and look-ahead
TINY = SimParams(default_link_mib_s=600.0, setup_s=2.0)


@pytest.mark.parametrize(("lengths", "k", "expected"), [
    ([1.0] * 5, 2, 3.0),  # five hosts, two slots: one holds three
    ([3.0, 3.0, 2.0, 2.0, 2.0], 2, 6.0),  # {3, 3} and {2, 2, 2}
    ([5.0, 1.0, 1.0], 3, 2.0),  # two in a slot (the two shortest), or one each (their mean at least)
    ([4.0, 4.0, 1.0, 1.0], 1, 10.0),  # one slot: all of them
    ([], 3, 0.0),
])
def test_packing_counts_whole_hosts_per_slot(lengths: list[float], k: int, expected: float) -> None:
    assert packing_bound(lengths, k) == pytest.approx(expected)


def _tiny(vms: dict[str, tuple[int, ...]], k: int, slots: int) -> FleetSnapshot:
    hs = tuple(Host(name=h, cluster="t", cells=(Cell(id=0, memory_mib=1 << 20, free_mib=1 << 20),)) for h in vms)
    return FleetSnapshot(cluster="t", taken_at="t", source="test", hosts=hs,
                         vms=tuple(Vm(name=f"{h}v{j}", uuid=f"{h}v{j}", host=h, memory_mib=m, vcpus=1)
                                   for h, sizes in vms.items() for j, m in enumerate(sizes)),
                         limits=Limits(memory_headroom_pct=0, max_hosts_in_maintenance=k, migrations_per_cluster=slots,
                                       migrations_per_source=1, migrations_per_target=1))


# (VMs per host, k, the cluster's slots, patch, CP-SAT's proven optimum: night_bound.py windows 10, 14, 0, 18)
KNOWN = [
    ({"h0": (2400, 600), "h1": (2400,), "h2": (1800, 1200)}, 1, 1, 40, 144.0),
    ({"h0": (1800,), "h1": (1800, 600), "h2": (1800, 2400)}, 1, 3, 20, 83.0),
    ({"h0": (600, 1800), "h1": (2400, 1800), "h2": (1800, 1200), "h3": (1800,), "h4": (600,), "h5": (1200, 1800)},
     2, 1, 40, 144.0),
    ({"h0": (2400,), "h1": (1200, 1200), "h2": (2400, 1200), "h3": (1800, 2400)}, 2, 2, 10, 39.0),
]


@pytest.mark.parametrize(("vms", "k", "slots", "patch", "optimum"), KNOWN)
def test_the_slot_bound_is_at_most_the_optimum_of_tiny_windows(vms: dict[str, tuple[int, ...]], k: int, slots: int,
                                                                patch: int, optimum: float) -> None:
    snap = _tiny(vms, k, slots)
    slot = window_slot_bound(snap, list(vms), k, patch_s=patch, policy=SchedulerPolicy(), params=TINY)
    floor = window_floor_bound(snap, list(vms), k, patch_s=patch, policy=SchedulerPolicy(), params=TINY)
    assert floor.total_s <= slot.bound_s <= optimum


def test_the_first_wave_moving_twice_lifts_the_bound_toward_the_optimum() -> None:
    # night_bound.py window 10: three hosts one at a time. The first host's VMs can only go to a host
    # still due, which sends them again: the fluid bound (140 s) does not count that, the optimum is 144
    vms, k, slots, patch, optimum = KNOWN[0]
    snap = _tiny(vms, k, slots)
    slot = window_slot_bound(snap, list(vms), k, patch_s=patch, policy=SchedulerPolicy(), params=TINY)
    assert slot.floor.total_s == pytest.approx(140.0)
    assert slot.slots_s > 143.0
    assert slot.bound_s <= optimum
    est = simulate_window(snap, ["h1", "h2", "h0"], parallel=k, patch_s=patch, params=TINY, rebalance_within=None)
    assert est.makespan_s >= slot.bound_s


def _pair(hosts: int, free_gib: int = 256) -> FleetSnapshot:
    hs = tuple(Host(name=f"h{i}", cluster="c", cells=(Cell(id=0, memory_mib=free_gib * 1024 + 6600,
                                                           free_mib=free_gib * 1024),)) for i in range(hosts))
    vms = tuple(Vm(name=f"h{i}-v", uuid=str(i), host=f"h{i}", memory_mib=6600, vcpus=2) for i in range(hosts))
    return FleetSnapshot(cluster="c", taken_at="t", hosts=hs, vms=vms,
                         limits=Limits(memory_headroom_pct=0, max_hosts_in_maintenance=1))


def test_the_slot_bound_is_at_most_the_optimum_of_two_hosts() -> None:
    # test_migration_simulate's pair: the optimum is 866 s (the second host sends both VMs, 13.5 s)
    slot = window_slot_bound(_pair(2), ["h0", "h1"], 1, patch_s=420)
    assert 865.0 < slot.bound_s <= 866.0


def test_a_host_too_full_to_take_the_first_ones_vms_is_no_landing_place() -> None:
    # Three hosts one at a time: the first host's VM must wait on a host not yet patched. With room
    # for it the bound is one patch cycle per host; with no room on any host no schedule exists that
    # the bound could be below, and the LP says every makespan it tries is out of reach
    roomy = window_slot_bound(_pair(3), ["h0", "h1", "h2"], 1, patch_s=420)
    full = window_slot_bound(_pair(3, free_gib=0), ["h0", "h1", "h2"], 1, patch_s=420)
    assert roomy.bound_s == pytest.approx(1297.5)
    assert full.slots_s > roomy.bound_s


def _cluster(seed: int, hosts: int = 8, free_gib: int = 160) -> tuple[FleetSnapshot, dict[str, float]]:
    rng = random.Random(seed)
    sizes = {f"h{i}": [rng.choice((2, 8, 16, 32)) * 1024 for _ in range(rng.randint(2, 6))] for i in range(hosts)}
    hs = tuple(Host(name=h, cluster="c", cells=(Cell(id=0, memory_mib=free_gib * 1024 + sum(s),
                                                     free_mib=free_gib * 1024),)) for h, s in sizes.items())
    vms = tuple(Vm(name=f"{h}-v{j}", uuid=f"{h}-{j}", host=h, memory_mib=m, vcpus=2)
                for h, s in sizes.items() for j, m in enumerate(s))
    snap = FleetSnapshot(cluster="c", taken_at="t", hosts=hs, vms=vms,
                         limits=Limits(memory_headroom_pct=0, max_hosts_in_maintenance=hosts, migrations_per_cluster=8,
                                       migrations_per_source=8, migrations_per_target=4))
    return snap, {v.name: rng.choice((0.0, 5.0, 50.0, 200.0)) for v in vms}


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("free_gib", [40, 160])
def test_no_simulated_window_beats_the_slot_bound(seed: int, free_gib: int) -> None:
    # each simulated run is one schedule within the limits (free memory too): none ends before it
    snap, dirty = _cluster(seed, free_gib=free_gib)
    names = [h.name for h in snap.hosts]
    for order, at_once in ((names, None), (names[::-1], None), (names, 8)):
        est = simulate_window(snap, order, patch_s=200, dirty_rate=dirty, drains_at_once=at_once,
                              rebalance_within=None)
        assert all(h.outcome is StepOutcome.OK for h in est.hosts)
        slot = window_slot_bound(snap, names, est.parallel, patch_s=200)
        assert slot.bound_s >= est.valid_bound_s - 1e-3  # the estimate rounds to the millisecond
        assert est.makespan_s >= slot.bound_s * 0.999


def test_same_window_same_bound() -> None:
    snap, _ = _cluster(4)
    names = [h.name for h in snap.hosts]
    assert window_slot_bound(snap, names, 3, patch_s=200) == window_slot_bound(snap, names, 3, patch_s=200)


def test_a_window_estimate_can_carry_the_slot_bound() -> None:
    # what 'hostmaint simulate window' prints as lower bound: the tighter one, still below the window
    snap, dirty = _cluster(0)
    names = [h.name for h in snap.hosts]
    plain = simulate_window(snap, names, patch_s=200, dirty_rate=dirty, rebalance_within=None, yardsticks=False)
    tight = simulate_window(snap, names, patch_s=200, dirty_rate=dirty, rebalance_within=None, yardsticks=False,
                            slot_bound=True)
    slot = window_slot_bound(snap, names, tight.parallel, patch_s=200)
    assert plain.slot_bound_s == 0.0
    assert tight.bound_s == pytest.approx(slot.bound_s, abs=1e-3) and tight.bound_s > plain.bound_s
    assert tight.makespan_s == plain.makespan_s >= tight.bound_s


def test_each_early_led_filling_names_the_host_that_leads_it() -> None:
    # benchmarks/night_bound.py --probe charges each filling's hosts in their order, the early one
    # first: a set of hosts has one early-led filling per host that can lead it, each naming that host
    snap, _ = _cluster(1, hosts=5)
    names = [h.name for h in snap.hosts]
    hosts = slot_hosts(snap, names, patch_s=200, policy=SchedulerPolicy())
    assert [h.name for h in hosts] == names
    columns = list(slot_columns(hosts, 201.5, 3000.0))
    early: dict[tuple[int, ...], list[int]] = {}
    for c in columns:
        if c.early:
            assert c.leader is not None
            early.setdefault(c.hosts, []).append(c.leader)
        else:
            assert c.leader is None
    assert early and all(sorted(leaders) == list(members) for members, leaders in early.items())
