"""Snapshot input that cannot be true is refused on load, naming the field and the host or VM.

One table: each row changes one thing of a valid snapshot into something no host or domain can
report, and names the words the error must hold. Beside it, what looks odd but is real life (an
over-committed host, vCPUs hot-plugged later, an empty hugepage pool) still loads. Then the CLI:
``hostmaint plan drain`` on such a file exits 2 and changes nothing.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from hostmaint.cli import app
from hostmaint.errors import InputError, SnapshotError
from hostmaint.fleet import load_snapshot, parse_snapshot

GIB_PAGE = 1024 * 1024
BASE: dict[str, Any] = {
    "cluster": "c", "taken_at": "t",
    "hosts": [
        {"name": "hv1", "cluster": "c", "cells": [
            {"id": 0, "memory_mib": 65536, "free_mib": 16384, "cpus": [0, 1, 2, 3],
             "hugepages": [{"size_kib": GIB_PAGE, "total": 16, "free": 8},
                           {"size_kib": 2048, "total": 512, "free": 512}]},
            {"id": 1, "memory_mib": 65536, "free_mib": 30000, "cpus": [4, 5, 6, 7]}]},
        {"name": "hv2", "cluster": "c", "cells": [
            {"id": 0, "memory_mib": 65536, "free_mib": 60000, "cpus": [0, 1, 2, 3],
             "hugepages": [{"size_kib": GIB_PAGE, "total": 16, "free": 16}]}]},
    ],
    "vms": [
        # a pinned, vNUMA, 1 GiB-hugepage guest: every field a check below looks at
        {"name": "db-1", "uuid": "u1", "host": "hv1", "memory_mib": 8192, "vcpus": 2,
         "vnuma": [{"id": 0, "memory_mib": 4096, "vcpus": [0]}, {"id": 1, "memory_mib": 4096, "vcpus": [1]}],
         "vcpupin": {"0": [0], "1": [4]}, "emulatorpin": [1], "iothreadpin": {"1": [1]}, "vcpu_cpuset": [0, 4],
         "numatune": {"mode": "strict", "nodeset": [0, 1]}, "hugepage_kib": GIB_PAGE},
        {"name": "web-1", "uuid": "u2", "host": "hv2", "memory_mib": 2048, "vcpus": 1},
    ],
}

Mutation = Callable[[dict[str, Any]], object]


def _data(mutate: Mutation) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    mutate(data)
    return data


def _parse(mutate: Mutation) -> None:
    parse_snapshot(json.dumps(_data(mutate)), "snap.json")


def _db(d: dict[str, Any]) -> dict[str, Any]:
    return d["vms"][0]  # type: ignore[no-any-return]


def _pool(d: dict[str, Any]) -> dict[str, Any]:
    return d["hosts"][0]["cells"][0]["hugepages"][0]  # type: ignore[no-any-return]


def test_the_base_snapshot_is_valid() -> None:
    _parse(lambda d: None)


CANNOT_BE_TRUE = [
    # hugepage pools: the kernel keeps one pool per page size, a power of two, inside the cell
    pytest.param(lambda d: _pool(d).update(free=17),
                 ("hosts[0]", "host 'hv1'", "cell 0", "1048576 KiB", "17 pages free of a pool of 16"),
                 id="more-free-hugepages-than-the-pool"),
    pytest.param(lambda d: _pool(d).update(size_kib=3000),
                 ("hosts[0]", "host 'hv1'", "cell 0", "3000 KiB", "not a power of two"), id="page-size-not-power-of-2"),
    pytest.param(lambda d: d["hosts"][1]["cells"][0]["hugepages"].append({"size_kib": GIB_PAGE, "total": 2, "free": 1}),
                 ("hosts[1]", "host 'hv2'", "cell 0", "listed twice"), id="one-page-size-listed-twice"),
    pytest.param(lambda d: _pool(d).update(total=65, free=8),
                 ("hosts[0]", "host 'hv1'", "cell 0", "pools hold 67584 MiB", "memory_mib 65536"),
                 id="pool-larger-than-the-cell"),
    pytest.param(lambda d: _pool(d).update(free=-1),
                 ("hosts[0].cells[0].hugepages[0].free", "host 'hv1'", "greater than or equal to 0"),
                 id="negative-free-pages"),
    # cells and CPUs
    pytest.param(lambda d: d["hosts"][1]["cells"][0].update(cpus=[-1, 0]),
                 ("hosts[1]", "host 'hv2'", "cell 0 lists CPU -1"), id="negative-cpu-id"),
    pytest.param(lambda d: d["hosts"][1]["cells"][0].update(free_mib=70000),
                 ("hosts[1]", "host 'hv2'", "cell 0 has 70000 MiB free of 65536"), id="more-free-than-the-cell"),
    pytest.param(lambda d: d["hosts"][1]["cells"][0].update(memory_mib=-1),
                 ("hosts[1].cells[0].memory_mib", "host 'hv2'", "greater than or equal to 0"),
                 id="negative-cell-memory"),
    pytest.param(lambda d: d["hosts"][1].update(reserved_memory_mib=-4096),
                 ("hosts[1].reserved_memory_mib", "host 'hv2'", "greater than or equal to 0"),
                 id="negative-reserved-memory"),
    # pins to CPUs the host does not have, in every field that pins
    pytest.param(lambda d: _db(d)["vcpupin"].update({"1": [99]}),
                 ("vms[0].vcpupin", "VM 'db-1'", "CPU(s) 99", "host 'hv1' does not have"), id="vcpupin-to-absent-cpu"),
    pytest.param(lambda d: _db(d).update(emulatorpin=[8]),
                 ("vms[0].emulatorpin", "VM 'db-1'", "CPU(s) 8", "host 'hv1'"), id="emulatorpin-to-absent-cpu"),
    pytest.param(lambda d: _db(d).update(iothreadpin={"1": [1, 12]}),
                 ("vms[0].iothreadpin", "VM 'db-1'", "CPU(s) 12", "host 'hv1'"), id="iothreadpin-to-absent-cpu"),
    pytest.param(lambda d: _db(d).update(vcpu_cpuset=[0, 4, 64]),
                 ("vms[0].vcpu_cpuset", "VM 'db-1'", "CPU(s) 64", "host 'hv1'"), id="vcpu-cpuset-with-absent-cpu"),
    pytest.param(lambda d: _db(d).update(emulatorpin=[-2]),
                 ("vms[0].emulatorpin", "VM 'db-1'", "CPU(s) -2"), id="pin-to-negative-cpu"),
    pytest.param(lambda d: _db(d).update(numatune={"mode": "strict", "nodeset": [0, 3]}),
                 ("vms[0].numatune", "VM 'db-1'", "NUMA node(s) 3", "host 'hv1' does not have"),
                 id="numatune-to-absent-node"),
    # vCPUs the VM does not have
    pytest.param(lambda d: _db(d)["vnuma"][1].update(vcpus=[1, 2]),
                 ("vms[0]", "VM 'db-1'", "vnuma guest cell 1 names vCPU 2", "has 2 vCPU(s) (0-1"),
                 id="guest-cell-names-absent-vcpu"),
    pytest.param(lambda d: _db(d)["vcpupin"].update({"5": [1]}),
                 ("vms[0]", "VM 'db-1'", "vcpupin names vCPU 5"), id="vcpupin-of-absent-vcpu"),
    pytest.param(lambda d: _db(d).update(vcpus=4, max_vcpus=3),
                 ("vms[0]", "VM 'db-1'", "max_vcpus 3 is less than the 4 vCPUs"), id="fewer-max-than-running-vcpus"),
    pytest.param(lambda d: _db(d)["vnuma"][1].update(vcpus=[0, 1]),
                 ("vms[0]", "VM 'db-1'", "vCPU 0 is listed in guest cells 0 and 1"), id="vcpu-in-two-guest-cells"),
    pytest.param(lambda d: _db(d)["vnuma"][1].update(id=0),
                 ("vms[0]", "VM 'db-1'", "guest cell id 0 is listed twice"), id="guest-cell-id-twice"),
    pytest.param(lambda d: _db(d).update(iothreadpin={"0": [1]}),
                 ("vms[0]", "VM 'db-1'", "I/O thread 0"), id="iothread-id-zero"),
    # hugepage backing the host cannot give
    pytest.param(lambda d: d["vms"][1].update(hugepage_kib=2048),
                 ("vms[1].hugepage_kib", "VM 'web-1'", "2048 KiB", "host 'hv2' lists no pool of that size"),
                 id="vm-hugepage-size-with-no-pool"),
    pytest.param(lambda d: _db(d).update(hugepage_kib=1000),
                 ("vms[0]", "VM 'db-1'", "hugepage_kib 1000 is not a power of two"), id="vm-page-size-not-power-of-2"),
    pytest.param(lambda d: d["vms"][1].update(hugepage_kib=-2048),
                 ("vms[1].hugepage_kib", "VM 'web-1'", "greater than or equal to 0"), id="negative-vm-page-size"),
    # where VMs run
    pytest.param(lambda d: d["vms"].append({**d["vms"][1], "host": "hv1", "uuid": "u3"}),
                 ("vms[2].name", "VM 'web-1' runs more than once"), id="one-vm-name-on-two-hosts"),
    pytest.param(lambda d: d["vms"][1].update(host="hv9"),
                 ("vms[1].host", "VM 'web-1' is on unknown host 'hv9'"), id="vm-on-a-host-not-in-the-snapshot"),
    pytest.param(lambda d: d["vms"][1].update(memory_mib=-1),
                 ("vms[1].memory_mib", "VM 'web-1'", "greater than 0, got -1"), id="negative-vm-memory"),
    pytest.param(lambda d: _db(d)["vnuma"][0].update(memory_mib=-4096),
                 ("vms[0].vnuma[0].memory_mib", "VM 'db-1'", "greater than 0"), id="negative-guest-cell-memory"),
    # more than any machine has: past these bounds the planner's exact stage would leave 64 bits
    pytest.param(lambda d: d["hosts"][1]["cells"][0].update(memory_mib=10**30, free_mib=10**30),
                 ("hosts[1].cells[0].memory_mib", "host 'hv2'", "less than or equal to 1099511627776"),
                 id="cell-memory-past-an-exbibyte"),
    pytest.param(lambda d: d["hosts"][1].update(reserved_memory_mib=2**63),
                 ("hosts[1].reserved_memory_mib", "host 'hv2'", "less than or equal to 1099511627776"),
                 id="reserved-memory-past-an-exbibyte"),
    pytest.param(lambda d: d["vms"][1].update(memory_mib=2**63),
                 ("vms[1].memory_mib", "VM 'web-1'", "at most 1099511627776, got 9223372036854775808"),
                 id="vm-memory-past-an-exbibyte"),
    pytest.param(lambda d: d["vms"][1].update(vcpus=2**40),
                 ("vms[1].vcpus", "VM 'web-1'", "at most 1048576"), id="vm-vcpus-past-any-machine"),
    pytest.param(lambda d: _pool(d).update(total=2**64, free=8),
                 ("hosts[0].cells[0].hugepages[0].total", "host 'hv1'", "less than or equal to"),
                 id="hugepage-pool-past-any-machine"),
    pytest.param(lambda d: _db(d)["vnuma"][0].update(memory_mib=2**50),
                 ("vms[0].vnuma[0].memory_mib", "VM 'db-1'", "less than or equal to 1099511627776"),
                 id="guest-cell-memory-past-an-exbibyte"),
    # sizes are strict integers: JSON's true was read as 1 vCPU, "2048" and 2048.0 as numbers
    pytest.param(lambda d: d["vms"][1].update(vcpus=True),
                 ("vms[1].vcpus", "VM 'web-1'", "valid integer"), id="vcpus-true"),
    pytest.param(lambda d: d["vms"][1].update(memory_mib="2048"),
                 ("vms[1].memory_mib", "VM 'web-1'", "valid integer"), id="vm-memory-a-string"),
    pytest.param(lambda d: d["hosts"][1]["cells"][0].update(free_mib=60000.0),
                 ("hosts[1].cells[0].free_mib", "host 'hv2'", "valid integer"), id="cell-free-a-float"),
    # the words pydantic has for its models, for hosts, cells and VMs too (slotted dataclasses)
    pytest.param(lambda d: d["hosts"][1]["cells"][0].update(colour="red"),
                 ("hosts[1].cells[0].colour", "host 'hv2'", "Extra inputs are not permitted"), id="unknown-cell-field"),
    pytest.param(lambda d: d["vms"][1].update(colour="red"),
                 ("vms[1].colour", "VM 'web-1'", "Extra inputs are not permitted"), id="unknown-vm-field"),
    pytest.param(lambda d: d["hosts"].append(5),
                 ("hosts[2]", "Input should be a valid dictionary or instance of Host"), id="a-host-not-an-object"),
    pytest.param(lambda d: d["vms"].append([1]),
                 ("vms[2]", "Input should be a valid dictionary or instance of Vm"), id="a-vm-not-an-object"),
]


@pytest.mark.parametrize(("mutate", "words"), CANNOT_BE_TRUE)
def test_input_that_cannot_be_true_is_refused_naming_the_field_and_the_host_or_vm(
        mutate: Mutation, words: tuple[str, ...]) -> None:
    with pytest.raises(SnapshotError) as err:
        _parse(mutate)
    message = str(err.value)
    assert isinstance(err.value, InputError) and message.startswith("snap.json: ")
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("mutate", [
    # more vCPUs than the host's CPUs × overcommit, and more memory than its cells: over-commitment
    pytest.param(lambda d: d["vms"][1].update(vcpus=64, memory_mib=200_000), id="over-committed-host"),
    # <vcpu current='2'>4</vcpu>: pins and guest cells name the offline vCPUs too
    pytest.param(lambda d: (_db(d).update(max_vcpus=4), _db(d)["vnuma"][1].update(vcpus=[1, 2, 3]),
                            _db(d)["vcpupin"].update({"3": [5]})), id="hot-pluggable-vcpus"),
    pytest.param(lambda d: _pool(d).update(total=0, free=0), id="an-empty-pool-still-names-its-size"),
    pytest.param(lambda d: d["hosts"][1]["cells"][0].update(hugepages=[]), id="a-host-with-no-pools"),
    # two VMs pinned to one CPU: libvirt allows it (and the planner counts the CPU once)
    pytest.param(lambda d: d["vms"].append({"name": "db-2", "uuid": "u4", "host": "hv1", "memory_mib": 1024,
                                            "vcpus": 1, "vcpupin": {"0": [0]}}), id="shared-pinned-cpu"),
    # the planner keeps targets inside the source's cluster, so a snapshot may hold another's host
    pytest.param(lambda d: d["hosts"][1].update(cluster="other"), id="a-host-of-another-cluster"),
])
def test_what_is_odd_but_real_still_loads(mutate: Mutation) -> None:
    _parse(mutate)


def test_plan_drain_on_a_snapshot_that_cannot_be_true_exits_2_naming_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    text = json.dumps(_data(lambda d: _db(d)["vcpupin"].update({"1": [99]})))
    bad.write_text(text)
    result = CliRunner().invoke(app, ["plan", "drain", "hv1", "--snapshot", str(bad)])
    assert result.exit_code == 2, result.output
    assert "vms[0].vcpupin" in result.output and "VM 'db-1'" in result.output and "CPU(s) 99" in result.output
    assert bad.read_text() == text  # nothing changed
    good = tmp_path / "good.json"
    good.write_text(json.dumps(BASE))
    load_snapshot(good)  # the same file without the bad pin loads


def test_a_fleet_at_the_bounds_is_planned_with_the_exact_stage_not_an_overflow(tmp_path: Path) -> None:
    # cells of an exbibyte and a VM of half of one: every sum CP-SAT is given stays within 64 bits
    # (a cell of 10^30 MiB, before the bounds, ended in a TypeError from OR-Tools)
    from hostmaint.models import MIB_BOUND

    def huge(d: dict[str, Any]) -> None:
        for host in d["hosts"]:
            for cell in host["cells"]:
                cell.update(memory_mib=MIB_BOUND, free_mib=MIB_BOUND)
        d["vms"][1].update(memory_mib=MIB_BOUND // 2)
        d["limits"] = {"spare_hosts": 0}  # two hosts: N+1 would refuse any drain

    path = tmp_path / "huge.json"
    path.write_text(json.dumps(_data(huge)))
    result = CliRunner().invoke(app, ["plan", "drain", "hv2", "--snapshot", str(path), "--json"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    [placement] = plan["placements"]
    assert (placement["vm"], placement["target"]) == ("web-1", "hv1")
    assert "exact stage" in plan["proof_note"], plan["proof_note"]
