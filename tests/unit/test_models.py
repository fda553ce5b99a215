"""Snapshot validation: bad input is refused with an error naming the host, VM or field."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from hostmaint.errors import SnapshotError
from hostmaint.fleet import parse_snapshot

BASE: dict[str, Any] = {
    "cluster": "c", "taken_at": "t",
    "hosts": [
        {"name": "a", "cluster": "c", "cells": [{"id": 0, "memory_mib": 4096, "free_mib": 4096, "cpus": [0, 1]}]},
        {"name": "b", "cluster": "c", "cells": [{"id": 0, "memory_mib": 4096, "free_mib": 4096, "cpus": [0, 1]}]},
    ],
    "vms": [{"name": "web-1", "uuid": "u", "host": "a", "memory_mib": 1024, "vcpus": 1}],
}

Mutation = Callable[[dict[str, Any]], object]


def _parse(mutate: Mutation) -> None:
    data = copy.deepcopy(BASE)
    mutate(data)
    parse_snapshot(json.dumps(data))


def test_the_base_snapshot_is_valid() -> None:
    _parse(lambda d: None)


@pytest.mark.parametrize(("mutate", "words"), [
    pytest.param(lambda d: d["hosts"][1]["cells"].append({"id": 0, "memory_mib": 4096, "free_mib": 4096}),
                 ("hosts[1]", "host 'b'", "cell id 0 is listed twice"), id="duplicate-cell-id"),
    pytest.param(lambda d: d["hosts"][1]["cells"].append(
        {"id": 1, "memory_mib": 4096, "free_mib": 4096, "cpus": [1, 2]}),
                 ("hosts[1]", "host 'b'", "CPU 1 is listed in cells 0 and 1"), id="cpu-in-two-cells"),
    pytest.param(lambda d: d["hosts"][0]["cells"][0].update(cpus=[0, 1, 1]),
                 ("hosts[0]", "host 'a'", "CPU 1 is listed twice in cell 0"), id="cpu-twice-in-a-cell"),
    pytest.param(lambda d: d["hosts"][1]["cells"][0].update(free_mib=10**7),
                 ("hosts[1]", "host 'b'", "cell 0 has 10000000 MiB free of"), id="more-free-than-memory"),
    pytest.param(lambda d: d["hosts"][1].update(cells=[]),
                 ("hosts[1]", "host 'b' has no NUMA cells"), id="host-without-cells"),
    pytest.param(lambda d: d["hosts"][1]["cells"][0].update(memory_mib=0, free_mib=0),
                 ("hosts[1]", "host 'b'", "cells hold no memory"), id="host-without-memory"),
    pytest.param(lambda d: d["vms"][0].update(vnuma=[{"id": 0, "memory_mib": 1024}, {"id": 1, "memory_mib": 1}]),
                 ("vms[0]", "VM 'web-1'", "vNUMA cells hold 1025 MiB, more than its memory_mib 1024"),
                 id="vnuma-cells-hold-more-than-the-vm"),
    pytest.param(lambda d: d["vms"][0].update(memory_mib=0),
                 ("vms[0].memory_mib", "VM 'web-1'", "greater than 0, got 0"), id="vm-without-memory"),
    pytest.param(lambda d: d["vms"][0].update(vcpus=-1),
                 ("vms[0].vcpus", "VM 'web-1'", "greater than 0, got -1"), id="vm-without-vcpus"),
])
def test_bad_input_is_refused_naming_the_field_and_what_is_wrong(mutate: Mutation, words: tuple[str, ...]) -> None:
    with pytest.raises(SnapshotError) as err:
        _parse(mutate)
    for word in words:
        assert word in str(err.value)


def test_cell_ids_need_not_be_contiguous() -> None:
    # libvirt numbers cells as the kernel does: a host may have cells 0 and 2 only
    _parse(lambda d: d["hosts"][1].update(cells=[
        {"id": 0, "memory_mib": 4096, "free_mib": 4096, "cpus": [0, 1]},
        {"id": 2, "memory_mib": 4096, "free_mib": 4096, "cpus": [2, 3]}]))


def test_a_memoryless_cell_beside_others_is_allowed() -> None:
    # CPU-only NUMA nodes exist; only a host with no memory at all is refused
    _parse(lambda d: d["hosts"][1]["cells"].append({"id": 1, "memory_mib": 0, "free_mib": 0, "cpus": [2, 3]}))


def test_vnuma_cells_may_hold_less_than_the_vm() -> None:
    # hot-plugged DIMMs are memory outside the guest cells (the planner spreads it over them)
    _parse(lambda d: d["vms"][0].update(vnuma=[{"id": 0, "memory_mib": 256}, {"id": 1, "memory_mib": 256}]))
