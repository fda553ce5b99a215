"""The order the greedy weighs hosts in (placement/bounds.py) is the same whether the bounds are
computed host by host or as arrays (above VECTOR_MIN targets): same hosts, same bounds to the last
bit, same order, ties broken by name. Plans at 1,000 hosts depend on it being so."""

from __future__ import annotations

import random

import pytest

from hostmaint.models import HostState, Vm
from hostmaint.placement import bounds
from hostmaint.placement.fit import fit_host
from hostmaint.placement.ledger import CellLoad, Fit, HostLoad, Ledger
from hostmaint.placement.synthetic import generate_fleet
from tests.fleet_shapes import FAMILIES, generate


def _both(hosts: list[HostLoad], ranks: dict[str, int], add: float, one_cell: bool
          ) -> tuple[list[tuple[int, float, str]], list[tuple[int, float, str]]]:
    arrays = [(r, b, h.name) for r, b, h in bounds._by_arrays(hosts, ranks, add, one_cell)]
    loop = [(r, b, h.name) for r, b, h in bounds._by_loop(hosts, ranks, add, one_cell)]
    return arrays, loop


@pytest.mark.parametrize("fleet", ["generated", "real-mix", "mixed-sizes", "cells-2-4-8"])
def test_arrays_and_loop_give_the_same_order(fleet: str) -> None:
    snap = generate_fleet(1, 80) if fleet == "generated" else generate(FAMILIES[fleet], 2, 80)
    hosts = list(Ledger.from_snapshot(snap).hosts.values())
    rng = random.Random(7)
    rng.shuffle(hosts)  # not in name order: ties must still go by name
    for trial in range(12):
        ranks = {h.name: rng.choice([0, 0, 1, 2, 4]) for h in hosts} if trial % 2 else {}
        add = float(rng.choice([1, 512, 4096, 3000, 65536, 10**6]))
        for one_cell in (True, False):
            arrays, loop = _both(hosts, ranks, add, one_cell)
            assert arrays == loop and len(loop) == len(hosts)


def _host(name: str, cells: list[tuple[int, float]]) -> HostLoad:
    return HostLoad(name=name, cluster="c", cpu_group="g", state=HostState.ACTIVE,
                    cells=[CellLoad(id=i, memory_mib=m, avail_mib=m - u, used_mib=u, hugepages={}, cpus=())
                           for i, (m, u) in enumerate(cells)], vcpu_budget=64.0)


def test_ties_cells_of_no_memory_and_hosts_of_none() -> None:
    rng = random.Random(3)
    hosts = []
    for i in range(400):
        shape = rng.choice([[(65536, 1000.0), (65536, 1000.0)],  # many identical hosts: equal bounds
                            [(65536, 1000.0), (0, 0.0), (65536, 2000.0)],  # a cell without memory
                            [(32768, 500.0)] * 4, [(0, 0.0)]])  # a host without memory: never weighed
        hosts.append(_host(f"h{rng.randrange(10**6):06d}-{i}", shape))
    rng.shuffle(hosts)
    for one_cell in (True, False):
        arrays, loop = _both(hosts, {}, 4096.0, one_cell)
        assert arrays == loop
        assert len(loop) == sum(1 for h in hosts if h.memory_mib)


def test_a_target_pool_sees_what_the_ledger_charged_since() -> None:
    snap = generate_fleet(4, 80, drain_vms=5)
    ledger = Ledger.from_snapshot(snap)
    pool = bounds.Targets(h for h in ledger.hosts.values() if h.name != "h0000")
    vm = Vm(name="new", uuid="u", host="h0000", memory_mib=8192, vcpus=2)
    before = {h.name: b for _, b, h in bounds._by_arrays(pool, {}, 8192.0, True)}
    assert pool.layout is not None  # kept with the pool
    charged = min(before, key=lambda n: (before[n], n))
    fit = fit_host(vm, ledger.hosts[charged])
    assert isinstance(fit, Fit)
    ledger.apply(vm, fit)
    again = [(r, b, h.name) for r, b, h in bounds._by_arrays(pool, {}, 8192.0, True)]
    assert again == [(r, b, h.name) for r, b, h in bounds._by_loop(pool, {}, 8192.0, True)]
    assert dict((n, b) for _, b, n in again)[charged] > before[charged]
