"""The resize planner (hostmaint/resize.py): where a VM's new vCPUs and memory go, or why not."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from hostmaint.drivers.domain_xml import parse_domain
from hostmaint.errors import InputError
from hostmaint.models import Cell, FleetSnapshot, GuestCell, Host, HostState, Limits, Numatune, VirtioMem, Vm
from hostmaint.resize import MemoryMethod, Shortage, parse_size_mib, plan_resize, propose, render_resize


def host(name: str, free: int = 12000, state: HostState = HostState.ACTIVE, cpus: int = 4) -> Host:
    return Host(name=name, cluster="c", state=state, cells=(
        Cell(id=0, memory_mib=16384, free_mib=free, cpus=tuple(range(cpus))),
        Cell(id=1, memory_mib=16384, free_mib=free, cpus=tuple(range(cpus, 2 * cpus)))))


def growable(name: str = "db", on: str = "hv01", **kw: Any) -> Vm:
    fields: dict[str, Any] = dict(name=name, uuid="u-" + name, host=on, memory_mib=2048, vcpus=2, max_vcpus=4,
                                  vnuma=(GuestCell(id=0, memory_mib=2048, vcpus=(0, 1, 2, 3)),),
                                  max_memory_mib=8192, memory_slots=4)
    fields.update(kw)
    return Vm(**fields)


def snap(*vms: Vm, hosts: tuple[Host, ...] | None = None, spare: int = 0) -> FleetSnapshot:
    return FleetSnapshot(cluster="c", taken_at="t", limits=Limits(spare_hosts=spare),
                         hosts=hosts or (host("hv01"), host("hv02")), vms=vms)


def test_pinned_vm_new_vcpus_take_free_cpus_of_the_cell_its_pins_are_in() -> None:
    vm = growable(vcpupin={0: (4,), 1: (5,)})
    plan = plan_resize(snap(vm), "db", vcpus=4)
    assert plan.feasible and plan.migration is None
    assert [(v.vcpu, v.guest_cell, v.host_cell, v.pin) for v in plan.new_vcpus] == [(2, 0, 1, (6,)), (3, 0, 1, (7,))]
    assert plan.vcpus_after == 4 and plan.memory is None


def test_shared_pin_set_is_extended_not_new_cpus() -> None:
    vm = growable(vcpupin={0: (4, 5), 1: (4, 5)})
    plan = plan_resize(snap(vm), "db", vcpus=3)
    assert [v.pin for v in plan.new_vcpus] == [(4, 5)]


def test_memory_grows_as_a_dimm_on_the_guest_node_of_the_new_vcpus_rounded_to_pages() -> None:
    vm = growable(vcpupin={0: (4,), 1: (5,)}, hugepage_kib=0)
    plan = plan_resize(snap(vm), "db", vcpus=3, memory_mib=3073)
    assert plan.feasible
    assert plan.memory is not None
    assert (plan.memory.method, plan.memory.mib, plan.memory.guest_cell, plan.memory.host_cell) == (
        MemoryMethod.DIMM, 1026, 0, 1)
    assert plan.memory_mib_after == 2048 + 1026
    assert any("rounded up" in n for n in plan.notes)


def test_virtio_mem_grows_by_its_requested_size() -> None:
    # <memory> counts the device at its full size: 1 GiB at boot + 4 GiB virtio-mem, 1 GiB of it plugged
    vm = growable(max_memory_mib=None, memory_slots=0, memory_mib=5120,
                  vnuma=(GuestCell(id=0, memory_mib=1024, vcpus=(0, 1)), GuestCell(id=1, memory_mib=1024,
                                                                                     vcpus=(2, 3))),
                  virtio_mem=VirtioMem(node=1, size_mib=4096, requested_mib=1024))
    plan = plan_resize(snap(vm), "db", memory_mib=3072)
    assert plan.feasible and plan.memory is not None
    assert (plan.memory_mib_before, plan.memory_mib_after) == (2048, 3072)
    assert (plan.memory.method, plan.memory.requested_mib, plan.memory.guest_cell) == (MemoryMethod.VIRTIO_MEM,
                                                                                       2048, 1)


def test_a_grow_the_host_cannot_hold_migrates_first_to_the_planners_choice() -> None:
    vm = growable(vcpupin={0: (0,), 1: (1,)}, memory_mib=2048)
    # hv01's cells are nearly full; hv02 has room
    plan = plan_resize(snap(vm, hosts=(host("hv01", free=2500), host("hv02"))), "db", memory_mib=4096, vcpus=4)
    assert plan.feasible, plan.refusals
    assert plan.migration is not None and plan.migration.target == "hv02" and plan.target_host == "hv02"
    assert plan.migration.memory_mib == 2048  # it moves at its current size
    assert set(plan.migration.vcpupin) == {0, 1}
    cell = plan.migration.target_cells[0]
    cell_cpus = set(range(4)) if cell == 0 else set(range(4, 8))
    pinned = [c for v in plan.new_vcpus for c in v.pin] + [c for p in plan.migration.vcpupin.values() for c in p]
    assert len(pinned) == 4 == len(set(pinned)) and set(pinned) <= cell_cpus
    assert "cannot hold it grown" in plan.migration.reason
    assert any("live-migrate to hv02" in line for line in render_resize(plan))


def test_no_host_holds_it_grown_is_refused() -> None:
    vm = growable()
    plan = plan_resize(snap(vm, hosts=(host("hv01", free=2500), host("hv02", free=2500))), "db", memory_mib=8192)
    assert not plan.feasible and not plan.changes and plan.migration is None
    assert "no other host holds it" in plan.refusals[0]


def test_n_plus_one_breaking_grow_is_refused() -> None:
    vm = growable(max_memory_mib=16384)
    plan = plan_resize(snap(vm, hosts=(host("hv01", free=9000), host("hv02", free=9000)), spare=1), "db",
                       memory_mib=9000)
    assert not plan.feasible
    assert plan.refusals[0].startswith("capacity:")


@pytest.mark.parametrize(("kw", "ask", "words"), [
    (dict(max_vcpus=None, vnuma=(GuestCell(id=0, memory_mib=2048, vcpus=(0, 1)),)), dict(vcpus=3),
     "<vcpu current='2'>3</vcpu>"),
    (dict(max_memory_mib=None, memory_slots=0), dict(memory_mib=4096), "without <maxMemory slots>"),
    (dict(memory_slots=1, memory_slots_used=1), dict(memory_mib=4096), "memory slots of <maxMemory> are in use"),
    (dict(max_memory_mib=3072), dict(memory_mib=4096), "raise it to 4096"),
    (dict(vnuma=()), dict(memory_mib=4096), "no guest NUMA topology"),
    (dict(virtio_mem=VirtioMem(node=0, size_mib=1024, requested_mib=1024), max_memory_mib=None, memory_slots=0),
     dict(memory_mib=4096), "larger <target><size>"),
    ({}, dict(memory_mib=1024), "needs the guest's cooperation"),
    (dict(fixed_vcpus=2), dict(vcpus=1), "cannot unplug those live"),
])
def test_no_room_to_grow_is_refused_with_what_to_change(kw: dict[str, Any], ask: dict[str, int], words: str) -> None:
    plan = plan_resize(snap(growable(**kw)), "db", **ask)
    assert not plan.feasible and not plan.changes
    assert words in plan.refusals[0]
    assert any(words in line for line in render_resize(plan))


def test_hot_plugged_vcpus_can_be_taken_offline() -> None:
    plan = plan_resize(snap(growable(vcpus=4, fixed_vcpus=2)), "db", vcpus=2)
    assert plan.feasible and plan.removed_vcpus == (3, 2) and not plan.new_vcpus


def test_a_host_in_maintenance_is_refused() -> None:
    plan = plan_resize(snap(growable(), hosts=(host("hv01", state=HostState.CORDONED), host("hv02"))), "db",
                       vcpus=3)
    assert not plan.feasible and "cordoned" in plan.refusals[0]


def test_numatune_binds_a_floating_vms_growth() -> None:
    vm = growable(numatune=Numatune(mode="strict", nodeset=(1,)))
    plan = plan_resize(snap(vm), "db", vcpus=3, memory_mib=3072)
    assert plan.memory is not None and plan.memory.host_cell == 1 and plan.new_vcpus[0].host_cell == 1


def test_the_plan_is_deterministic() -> None:
    s = snap(growable(vcpupin={0: (0,), 1: (1,)}), hosts=(host("hv01", free=2500), host("hv02"), host("hv03")))
    assert plan_resize(s, "db", vcpus=4, memory_mib=4096) == plan_resize(s, "db", vcpus=4, memory_mib=4096)


@pytest.mark.parametrize(("args", "field"), [
    (dict(vm_name="nope", vcpus=3), "vm:"),
    (dict(vm_name="", vcpus=3), "vm:"),
    (dict(vm_name="db"), "vcpus, memory:"),
    (dict(vm_name="db", vcpus=0), "vcpus:"),
    (dict(vm_name="db", vcpus=True), "vcpus:"),
    (dict(vm_name="db", vcpus=10**9), "vcpus:"),
    (dict(vm_name="db", memory_mib="4G"), "memory:"),
    (dict(vm_name="db", memory_mib=-5), "memory:"),
])
def test_hostile_input_is_an_input_error_naming_the_field(args: dict[str, Any], field: str) -> None:
    name = args.pop("vm_name")
    with pytest.raises(InputError, match=f"^{field}"):
        plan_resize(snap(growable()), name, **args)


@pytest.mark.parametrize(("kw", "words"), [
    (dict(max_memory_mib=1024), "max_memory_mib 1024 is less than"),
    (dict(memory_slots=1, memory_slots_used=2), "memory_slots_used 2"),
    (dict(fixed_vcpus=3), "fixed_vcpus 3"),
    (dict(virtio_mem=VirtioMem(node=0, size_mib=1024, requested_mib=2048)), "requested_mib 2048"),
    (dict(virtio_mem=VirtioMem(node=5, size_mib=1024)), "virtio_mem node 5"),
])
def test_snapshot_refuses_incoherent_room_to_grow(kw: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        growable(**kw)


def test_discovery_reads_room_to_grow_from_the_domain_xml() -> None:
    xml = """<domain><name>a</name><uuid>u</uuid><maxMemory slots='4' unit='KiB'>4194304</maxMemory>
      <memory unit='KiB'>2097152</memory><vcpu current='2'>4</vcpu>
      <vcpus><vcpu id='0' enabled='yes' hotpluggable='no'/><vcpu id='1' enabled='yes' hotpluggable='yes'/>
        <vcpu id='2' enabled='no' hotpluggable='yes'/><vcpu id='3' enabled='no' hotpluggable='yes'/></vcpus>
      <cpu><numa><cell id='0' cpus='0-3' memory='1048576' unit='KiB'/></numa></cpu>
      <devices><memory model='dimm'><target><size unit='KiB'>524288</size><node>0</node></target></memory>
        <memory model='virtio-mem'><target><size unit='GiB'>2</size><node>0</node><block unit='KiB'>2048</block>
          <requested unit='MiB'>512</requested></target></memory></devices></domain>"""
    vm = parse_domain(xml, "hv01")
    assert (vm.max_memory_mib, vm.memory_slots, vm.memory_slots_used, vm.fixed_vcpus) == (4096, 4, 1, 1)
    assert vm.virtio_mem == VirtioMem(node=0, size_mib=2048, requested_mib=512, block_kib=2048)
    plain = parse_domain("<domain><name>b</name><memory unit='KiB'>1048576</memory><vcpu>1</vcpu></domain>", "hv01")
    assert (plain.max_memory_mib, plain.memory_slots, plain.virtio_mem, plain.fixed_vcpus) == (None, 0, None, None)


@pytest.mark.parametrize(("text", "mib"), [("8G", 8192), ("8GiB", 8192), ("512M", 512), ("4096", 4096),
                                           (" 2 gib ", 2048), ("1T", 1048576)])
def test_memory_sizes_as_operators_write_them(text: str, mib: int) -> None:
    assert parse_size_mib(text) == mib


@pytest.mark.parametrize("text", ["", "G", "-1G", "1.5G", "8X", "0", "1e3", "9" * 20, "8G\x1b[2J", "１２G"])
def test_bad_memory_sizes_name_the_field(text: str) -> None:
    with pytest.raises(InputError, match="^memory: "):
        parse_size_mib(text)


def test_a_runbook_proposes_one_vcpu_or_a_quarter_more_memory() -> None:
    vm = growable(memory_mib=3000, vnuma=(GuestCell(id=0, memory_mib=2048, vcpus=(0, 1, 2, 3)),))
    assert propose(vm, Shortage.CPU) == (3, None)
    assert propose(vm, Shortage.MEMORY) == (None, 3840)  # 3750 up to a whole 256 MiB step


def test_names_from_hosts_are_shown_as_data() -> None:
    evil = "db\x1b[2J\x1b]0;pwned\x07"
    plan = plan_resize(snap(growable(name=evil, vcpupin={0: (4,), 1: (5,)})), evil, vcpus=3)
    lines = render_resize(plan)
    assert not any("\x1b" in line or "\x07" in line for line in lines)
    assert lines[0].startswith("resize db")


@pytest.mark.parametrize(("args", "words"), [
    (["--reason", " "], "--reason: say what monitoring saw"),
    (["--reason", "slow", "--kind", "disk"], "--kind: must be cpu or memory"),
    (["--reason", "slow", "--vcpus", "0"], "--vcpus: must be between 1"),
    (["--reason", "slow", "--kind", "memory", "--memory", "lots"], "--memory: 'lots' is not a size"),
])
def test_event_vm_starved_refuses_bad_input_before_sending(args: list[str], words: str) -> None:
    from typer.testing import CliRunner

    from hostmaint_cli.main import app

    result = CliRunner().invoke(app, ["event", "vm-starved", "db", *args, "--api-url", "http://127.0.0.1:9/api"])
    assert result.exit_code == 2 and words in result.output, result.output
