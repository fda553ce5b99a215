"""libvirt XML parsing and the destination-XML rewrite (pure, no libvirt needed)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from hostmaint.drivers.domain_xml import (
    format_cpuset,
    parse_capabilities,
    parse_cpuset,
    parse_domain,
    rewrite_for_target,
    to_kib,
    with_free_memory,
)
from hostmaint.models import Cell, FleetSnapshot, Host, Limits, MigrationOptions, Numatune, Placement, Vm
from hostmaint.placement import plan_evacuation

CAPS = """<capabilities><host><uuid>11111111-2222-3333-4444-555555555555</uuid>
<topology><cells num='2'>
 <cell id='0'><memory unit='KiB'>16777216</memory>
  <pages unit='KiB' size='4'>4194304</pages><pages unit='KiB' size='2048'>512</pages>
  <pages unit='KiB' size='1048576'>2</pages>
  <cpus num='2'><cpu id='0'/><cpu id='2'/></cpus></cell>
 <cell id='1'><memory unit='KiB'>8388608</memory>
  <pages unit='KiB' size='4'>2097152</pages><pages unit='KiB' size='2048'>0</pages>
  <cpus num='2'><cpu id='3'/><cpu id='1'/></cpus></cell>
</cells></topology></host></capabilities>"""

PINNED = """<domain type='kvm'><name>db01</name><uuid>abcd</uuid>
<memory unit='GiB'>4</memory><vcpu placement='static' current='3'>4</vcpu>
<memoryBacking><hugepages><page size='1' unit='G'/></hugepages></memoryBacking>
<cputune><vcpupin vcpu='0' cpuset='2'/><vcpupin vcpu='1' cpuset='3-4'/><emulatorpin cpuset='0-1'/></cputune>
<numatune><memory mode='strict' nodeset='1'/><memnode cellid='0' mode='strict' nodeset='1'/>
 <memnode cellid='1' mode='strict' nodeset='1'/></numatune>
<cpu><numa><cell id='0' cpus='0-1' memory='2' unit='GiB'/><cell id='1' cpus='2-3' memory='2097152'/></numa></cpu>
<devices>
 <disk type='file' device='disk'><source file='/var/lib/libvirt/images/db01.qcow2'/><target dev='vda'/></disk>
 <disk type='network' device='disk'><source protocol='rbd' name='pool/db01-data'/><target dev='vdb'/></disk>
 <disk type='file' device='cdrom'><source file='/iso/install.iso'/><target dev='sda'/><readonly/></disk>
 <hostdev mode='subsystem' type='pci'><source><address domain='0x0000' bus='0x3b' slot='0x00' function='0x1'/>
 </source></hostdev>
</devices></domain>"""

PLAIN = """<domain type='kvm'><name>web01</name><uuid>u1</uuid><memory unit='KiB'>65536</memory>
<vcpu>2</vcpu><devices><disk type='file' device='disk'><source file='/nfs/web01.img'/><target dev='vda'/></disk>
</devices></domain>"""


@pytest.mark.parametrize(("spec", "cpus"), [
    ("", ()), ("3", (3,)), ("0-3", (0, 1, 2, 3)), ("0-3,^2,8", (0, 1, 3, 8)), ("4,1-2", (1, 2, 4)),
])
def test_cpuset_round_trip(spec: str, cpus: tuple[int, ...]) -> None:
    assert parse_cpuset(spec) == cpus
    assert parse_cpuset(format_cpuset(cpus)) == cpus


@pytest.mark.parametrize(("value", "unit", "kib"), [
    ("64", "MiB", 65536), ("4", "GiB", 4194304), ("2048", None, 2048), ("1", "G", 1048576), ("", "KiB", 0),
])
def test_sizes_in_kib(value: str, unit: str | None, kib: int) -> None:
    assert to_kib(value, unit) == kib


def test_capabilities_give_cells_cpus_and_hugepage_pools() -> None:
    caps = parse_capabilities(CAPS)
    assert caps.host_uuid == "11111111-2222-3333-4444-555555555555"
    assert [(c.id, c.memory_mib, c.cpus) for c in caps.cells] == [(0, 16384, (0, 2)), (1, 8192, (1, 3))]
    assert [(p.size_kib, p.total) for p in caps.cells[0].hugepages] == [(2048, 512), (1048576, 2)]
    cells = with_free_memory(caps, [8 * 2**30, 1 * 2**30], {0: {2048: 100, 1048576: 1}, 1: {2048: 0}})
    assert [c.free_mib for c in cells] == [8192, 1024]
    assert [(p.size_kib, p.free) for p in cells[0].hugepages] == [(2048, 100), (1048576, 1)]


def test_hugepage_pool_sizes_honour_their_unit() -> None:
    caps = parse_capabilities(CAPS.replace("unit='KiB' size='2048'", "unit='MiB' size='2'")
                              .replace("unit='KiB' size='1048576'", "unit='GiB' size='1'"))
    assert [(p.size_kib, p.total) for p in caps.cells[0].hugepages] == [(2048, 512), (1048576, 2)]
    assert [p.size_kib for p in caps.cells[1].hugepages] == [2048]


def test_pinned_vm_with_passthrough_and_local_disk() -> None:
    vm = parse_domain(PINNED, "hv01", vcpus_live=3)
    assert (vm.name, vm.host, vm.memory_mib, vm.vcpus) == ("db01", "hv01", 4096, 3)
    assert vm.vcpupin == {0: (2,), 1: (3, 4)} and vm.emulatorpin == (0, 1)
    assert vm.numatune == Numatune(mode="strict", nodeset=(1,))
    assert [(c.id, c.memory_mib, c.vcpus) for c in vm.vnuma] == [(0, 2048, (0, 1)), (1, 2048, (2, 3))]
    assert vm.hugepage_kib == 1048576
    assert not vm.migratable
    reason = vm.not_migratable_reason or ""
    assert "host device passthrough (pci 0000:3b:00.1)" in reason
    assert "local disk vda" in reason
    assert "vdb" not in reason and "sda" not in reason  # network disk and read-only cdrom do not block


BARE_HUGEPAGES = """<domain type='kvm'><name>hp01</name><uuid>u6</uuid><memory unit='GiB'>4</memory>
<vcpu>2</vcpu><memoryBacking><hugepages/></memoryBacking></domain>"""


def test_bare_hugepages_use_the_hosts_default_page_size() -> None:
    # no <page>: libvirt uses the host's default size; the x86-64 default is assumed unless told
    assert parse_domain(BARE_HUGEPAGES, "hv01").hugepage_kib == 2048
    assert parse_domain(BARE_HUGEPAGES, "hv01", default_hugepage_kib=1048576).hugepage_kib == 1048576
    assert parse_domain(PLAIN, "hv01", default_hugepage_kib=1048576).hugepage_kib == 0


def test_disks_on_shared_storage_do_not_block() -> None:
    assert not parse_domain(PLAIN, "hv02").migratable
    vm = parse_domain(PLAIN, "hv02", shared_storage_prefixes=("/nfs/",))
    assert vm.migratable and vm.not_migratable_reason is None
    assert (vm.memory_mib, vm.vcpus) == (64, 2)


def test_rewrite_for_target_replaces_pinning_and_numa() -> None:
    placement = Placement(vm="db01", source="hv01", target="hv02", target_cells=(0, 1),
                          vcpupin={0: (5,), 1: (6, 7), 2: (8,)}, emulatorpin=(9,), numatune_nodeset=(0, 1))
    root = ET.fromstring(rewrite_for_target(PINNED, placement))
    pins = {p.get("vcpu"): p.get("cpuset") for p in root.findall("cputune/vcpupin")}
    assert pins == {"0": "5", "1": "6-7", "2": "8"}
    assert root.find("cputune/emulatorpin").get("cpuset") == "9"  # type: ignore[union-attr]
    assert root.find("numatune/memory").get("nodeset") == "0-1"  # type: ignore[union-attr]
    assert [m.get("nodeset") for m in root.findall("numatune/memnode")] == ["0", "1"]
    # what the placement does not mention stays as it was
    assert root.findtext("name") == "db01" and root.find("devices/hostdev") is not None


def test_rewrite_adds_cputune_where_there_was_none() -> None:
    placement = Placement(vm="web01", source="a", target="b", vcpupin={0: (1,)}, numatune_nodeset=(0,))
    root = ET.fromstring(rewrite_for_target(PLAIN, placement))
    assert root.find("cputune/vcpupin").get("cpuset") == "1"  # type: ignore[union-attr]
    assert root.find("numatune/memory").get("nodeset") == "0"  # type: ignore[union-attr]


EMULATOR_ONLY = """<domain type='kvm'><name>emu01</name><uuid>u2</uuid><memory unit='GiB'>4</memory>
<vcpu>2</vcpu><cputune><emulatorpin cpuset='6-7'/></cputune></domain>"""


def _emulator_only_placement() -> Placement:
    """The planner's placement of a VM that pins only its emulator threads (6-7 on its host) onto a
    host where 6 and 7 are another VM's pinned vCPUs."""
    gib = 1024
    cells = (Cell(id=0, memory_mib=64 * gib, free_mib=60 * gib, cpus=(0, 1, 2, 3)),
             Cell(id=1, memory_mib=64 * gib, free_mib=60 * gib, cpus=(4, 5, 6, 7)))
    snap = FleetSnapshot(cluster="c", taken_at="t", limits=Limits(spare_hosts=0), hosts=(
        Host(name="src", cluster="c", cells=cells), Host(name="dst", cluster="c", cells=cells)), vms=(
        parse_domain(EMULATOR_ONLY, "src"),
        Vm(name="p", uuid="2", host="dst", memory_mib=4 * gib, vcpus=2, vcpupin={0: (6,), 1: (7,)})))
    [placement] = plan_evacuation(snap, ["src"]).placements
    return placement


def test_emulator_pinning_alone_is_rewritten_for_the_target() -> None:
    placement = _emulator_only_placement()
    assert placement.emulatorpin and not set(placement.emulatorpin) & {6, 7}
    root = ET.fromstring(rewrite_for_target(EMULATOR_ONLY, placement))
    assert root.find("cputune/emulatorpin").get("cpuset") == format_cpuset(placement.emulatorpin)  # type: ignore[union-attr]
    assert root.findall("cputune/vcpupin") == []  # none before, none invented


def test_the_driver_sends_the_rewritten_emulator_pinning_as_destination_xml() -> None:
    libvirt = pytest.importorskip("libvirt")
    from hostmaint.drivers.libvirt.migration import migration_request

    placement = _emulator_only_placement()
    _, params = migration_request(EMULATOR_ONLY, MigrationOptions(placement=placement))
    for key in (libvirt.VIR_MIGRATE_PARAM_DEST_XML, libvirt.VIR_MIGRATE_PARAM_PERSIST_XML):
        sent = ET.fromstring(params[key])
        assert sent.find("cputune/emulatorpin").get("cpuset") == format_cpuset(placement.emulatorpin)  # type: ignore[union-attr]


CPUSET_ONLY = """<domain type='kvm'><name>set01</name><uuid>u3</uuid><memory unit='GiB'>4</memory>
<vcpu placement='static' cpuset='2-3'>2</vcpu></domain>"""


def test_a_vcpu_cpuset_is_pinning() -> None:
    vm = parse_domain(CPUSET_ONLY, "hv01")
    assert vm.vcpu_cpuset == (2, 3) and vm.pinned
    assert (vm.vcpupin, vm.emulatorpin) == ({}, ())  # the XML has neither: none invented


def test_a_vcpu_cpuset_numad_places_is_not_pinning() -> None:
    # placement='auto': libvirt ignores the cpuset and numad chooses on whichever host runs the VM
    vm = parse_domain(CPUSET_ONLY.replace("'static'", "'auto'"), "hv01")
    assert vm.vcpu_cpuset == () and not vm.pinned


def test_the_vcpu_cpuset_is_rewritten_to_the_target_cpus() -> None:
    placement = Placement(vm="set01", source="hv01", target="hv02", target_cells=(1,),
                          vcpu_cpuset=(10, 11), emulatorpin=(10, 11))
    root = ET.fromstring(rewrite_for_target(CPUSET_ONLY, placement))
    assert root.find("vcpu").get("cpuset") == "10-11"  # type: ignore[union-attr]
    assert root.findtext("vcpu") == "2" and root.find("vcpu").get("placement") == "static"  # type: ignore[union-attr]
    assert root.find("cputune/emulatorpin").get("cpuset") == "10-11"  # type: ignore[union-attr]
    assert root.findall("cputune/vcpupin") == []


def _cpuset_only_placement() -> Placement:
    """The planner's placement of a VM bound by <vcpu cpuset='2-3'> alone onto a host where 2 and
    3 are another VM's."""
    gib = 1024
    cells = (Cell(id=0, memory_mib=64 * gib, free_mib=60 * gib, cpus=(0, 1, 2, 3)),
             Cell(id=1, memory_mib=64 * gib, free_mib=0, cpus=(4, 5, 6, 7)))
    snap = FleetSnapshot(cluster="c", taken_at="t", limits=Limits(spare_hosts=0), hosts=(
        Host(name="src", cluster="c", cells=cells), Host(name="dst", cluster="c", cells=cells)), vms=(
        parse_domain(CPUSET_ONLY, "src"),
        Vm(name="p", uuid="2", host="dst", memory_mib=4 * gib, vcpus=2, vcpupin={0: (2,), 1: (3,)})))
    [placement] = plan_evacuation(snap, ["src"]).placements
    return placement


def test_the_driver_sends_the_rewritten_vcpu_cpuset_as_destination_xml() -> None:
    libvirt = pytest.importorskip("libvirt")
    from hostmaint.drivers.libvirt.migration import migration_request

    placement = _cpuset_only_placement()
    assert placement.vcpu_cpuset == (0, 1)  # cell 0's free CPUs: 2 and 3 are "p"'s on dst
    _, params = migration_request(CPUSET_ONLY, MigrationOptions(placement=placement))
    for key in (libvirt.VIR_MIGRATE_PARAM_DEST_XML, libvirt.VIR_MIGRATE_PARAM_PERSIST_XML):
        sent = ET.fromstring(params[key])
        assert sent.find("vcpu").get("cpuset") == "0-1"  # type: ignore[union-attr]
        assert sent.find("cputune/emulatorpin").get("cpuset") == "0-1"  # type: ignore[union-attr]


IOTHREADS = """<domain type='kvm'><name>io01</name><uuid>u4</uuid><memory unit='GiB'>4</memory>
<vcpu>2</vcpu><iothreads>2</iothreads>
<cputune><vcpupin vcpu='0' cpuset='2'/><vcpupin vcpu='1' cpuset='3'/><emulatorpin cpuset='4'/>
 <iothreadpin iothread='1' cpuset='5'/><iothreadpin iothread='2' cpuset='5-6'/></cputune></domain>"""


def test_iothread_pinning_is_parsed_as_pinning() -> None:
    vm = parse_domain(IOTHREADS, "hv01")
    assert vm.iothreadpin == {1: (5,), 2: (5, 6)}
    alone = parse_domain(IOTHREADS.replace("<vcpupin vcpu='0' cpuset='2'/><vcpupin vcpu='1' cpuset='3'/>"
                                           "<emulatorpin cpuset='4'/>", ""), "hv01")
    assert alone.pinned and (alone.vcpupin, alone.emulatorpin) == ({}, ())


def test_iothread_pinning_is_rewritten_to_the_target_cpus() -> None:
    placement = Placement(vm="io01", source="hv01", target="hv02", target_cells=(1,),
                          vcpupin={0: (10,), 1: (11,)}, emulatorpin=(12,), iothreadpin={1: (13,), 2: (13, 14)})
    root = ET.fromstring(rewrite_for_target(IOTHREADS, placement))
    pins = {p.get("iothread"): p.get("cpuset") for p in root.findall("cputune/iothreadpin")}
    assert pins == {"1": "13", "2": "13-14"}
    assert [el.tag for el in root.find("cputune")] == [  # type: ignore[union-attr]
        "vcpupin", "vcpupin", "emulatorpin", "iothreadpin", "iothreadpin"]


def _iothread_placement() -> Placement:
    """The planner's placement of IOTHREADS (CPUs 2-6) onto a host where 2-3 are another VM's."""
    gib = 1024
    cells = (Cell(id=0, memory_mib=64 * gib, free_mib=60 * gib, cpus=tuple(range(8))),)
    snap = FleetSnapshot(cluster="c", taken_at="t", limits=Limits(spare_hosts=0), hosts=(
        Host(name="src", cluster="c", cells=cells), Host(name="dst", cluster="c", cells=cells)), vms=(
        parse_domain(IOTHREADS, "src"),
        Vm(name="p", uuid="2", host="dst", memory_mib=4 * gib, vcpus=2, vcpupin={0: (2,), 1: (3,)})))
    [placement] = plan_evacuation(snap, ["src"]).placements
    return placement


def test_the_planner_maps_iothread_pins_with_the_other_pins_and_the_driver_sends_them() -> None:
    placement = _iothread_placement()
    # old 2,3,4,5,6 -> the free 0,1,4,5,6 in order: 5 -> 5, 6 -> 6, never the 2-3 "p" holds
    assert placement.vcpupin == {0: (0,), 1: (1,)} and placement.emulatorpin == (4,)
    assert placement.iothreadpin == {1: (5,), 2: (5, 6)}
    libvirt = pytest.importorskip("libvirt")
    from hostmaint.drivers.libvirt.migration import migration_request

    _, params = migration_request(IOTHREADS, MigrationOptions(placement=placement))
    sent = ET.fromstring(params[libvirt.VIR_MIGRATE_PARAM_DEST_XML])
    assert {p.get("iothread"): p.get("cpuset") for p in sent.findall("cputune/iothreadpin")} == {
        "1": "5", "2": "5-6"}


def test_a_placement_that_pins_only_iothreads_still_rewrites_the_domain() -> None:
    assert Placement(vm="v", source="a", target="b", iothreadpin={1: (3,)}).rewrites_domain
    assert Placement(vm="v", source="a", target="b", numatune_nodeset=(0,)).rewrites_domain
    assert not Placement(vm="v", source="a", target="b", target_cells=(0,)).rewrites_domain


MEMNODES = """<domain type='kvm'><name>mn01</name><uuid>u5</uuid><memory unit='GiB'>2</memory><vcpu>2</vcpu>
<cpu><numa><cell id='0' cpus='0' memory='1' unit='GiB'/><cell id='1' cpus='1' memory='1' unit='GiB'/></numa></cpu>
<numatune><memnode cellid='1' mode='preferred' nodeset='1'/><memnode cellid='0' mode='strict' nodeset='0'/>
</numatune></domain>"""


def test_a_numatune_of_memnodes_alone_is_numatune() -> None:
    vm = parse_domain(MEMNODES, "hv01")
    assert vm.numatune == Numatune(mode="strict", nodeset=(0, 1))  # guest cell 0's mode, every node named


def test_memnodes_are_rewritten_to_their_guest_cells_target_and_no_memory_binding_is_invented() -> None:
    placement = Placement(vm="mn01", source="hv01", target="hv02", target_cells=(3, 2), numatune_nodeset=(2, 3))
    root = ET.fromstring(rewrite_for_target(MEMNODES, placement))
    nodes = {m.get("cellid"): (m.get("mode"), m.get("nodeset")) for m in root.findall("numatune/memnode")}
    # guest cell 0 -> target cell 3, guest cell 1 -> 2, whatever order the memnodes are listed in
    assert nodes == {"0": ("strict", "3"), "1": ("preferred", "2")}
    assert root.find("numatune/memory") is None


def test_the_planner_binds_a_memnode_only_vm_to_its_target_cells_and_the_driver_sends_it() -> None:
    gib = 1024
    cells = tuple(Cell(id=i, memory_mib=64 * gib, free_mib=60 * gib, cpus=(2 * i, 2 * i + 1)) for i in range(2))
    snap = FleetSnapshot(cluster="c", taken_at="t", limits=Limits(spare_hosts=0), hosts=(
        Host(name="src", cluster="c", cells=cells), Host(name="dst", cluster="c", cells=cells)),
        vms=(parse_domain(MEMNODES, "src"),))
    [placement] = plan_evacuation(snap, ["src"]).placements
    assert placement.numatune_nodeset == tuple(sorted(placement.target_cells))
    libvirt = pytest.importorskip("libvirt")
    from hostmaint.drivers.libvirt.migration import migration_request

    _, params = migration_request(MEMNODES, MigrationOptions(placement=placement))
    sent = ET.fromstring(params[libvirt.VIR_MIGRATE_PARAM_DEST_XML])
    assert {m.get("cellid"): m.get("nodeset") for m in sent.findall("numatune/memnode")} == {
        str(g): str(t) for g, t in enumerate(placement.target_cells)}


@pytest.mark.parametrize("numatune", [
    "<memory mode='bogus' nodeset='0'/>",
    "<memnode cellid='0' mode='strict' nodeset='0'/><memnode cellid='1' mode='bogus' nodeset='1'/>",
])
def test_an_unknown_numatune_mode_is_refused_naming_the_vm(numatune: str) -> None:
    xml = MEMNODES.split("<numatune>")[0] + f"<numatune>{numatune}</numatune></domain>"
    with pytest.raises(ValueError, match=r"domain 'mn01': <numatune> .*mode 'bogus'"):
        parse_domain(xml, "hv01")


def test_a_snapshot_vm_with_an_unknown_numatune_mode_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match="VM 'db': numatune mode 'bogus'"):
        Vm(name="db", uuid="u", host="h", memory_mib=1, vcpus=1, numatune=Numatune(mode="bogus"))
    for mode in ("strict", "preferred", "interleave", "restrictive"):
        assert parse_domain(MEMNODES.replace("mode='preferred'", f"mode='{mode}'"), "hv01").numatune


def test_the_driver_sends_a_destination_xml_for_a_vm_that_pins_only_its_iothreads() -> None:
    libvirt = pytest.importorskip("libvirt")
    from hostmaint.drivers.libvirt.migration import migration_request

    placement = Placement(vm="io01", source="src", target="dst", iothreadpin={1: (7,), 2: (7,)})
    _, params = migration_request(IOTHREADS, MigrationOptions(placement=placement))
    sent = ET.fromstring(params[libvirt.VIR_MIGRATE_PARAM_DEST_XML])
    assert {p.get("iothread"): p.get("cpuset") for p in sent.findall("cputune/iothreadpin")} == {"1": "7", "2": "7"}
