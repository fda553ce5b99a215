"""The snapshot a discovery builds while other runs migrate: a VM on two hosts, once or wrongly."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hostmaint.errors import SnapshotError
from hostmaint.fleet import build_snapshot, discover_cluster
from hostmaint.inventory import load_inventory
from hostmaint.models import Cell, HostDiscovery, Vm

INVENTORY = load_inventory(Path(__file__).resolve().parents[2] / "examples" / "inventory.yaml")


def seen(host: str, *vms: str) -> HostDiscovery:
    return HostDiscovery(host=host, cells=(Cell(id=0, memory_mib=65536, free_mib=32768),),
                         vms=tuple(Vm(name=v, uuid=f"u-{v}", host=host, memory_mib=2048, vcpus=1) for v in vms))


def test_a_vm_another_run_migrates_is_in_the_snapshot_once_where_it_runs() -> None:
    found = {"hv01": seen("hv01", "web", "db"), "hv02": seen("hv02", "web"), "hv03": seen("hv03")}
    # pre-copy: the target's copy is paused for the migration, the source's runs
    snap = build_snapshot(INVENTORY, "prod-a", found, moving={"hv02": ("web",)})
    assert [(v.name, v.host) for v in snap.vms] == [("db", "hv01"), ("web", "hv01")]
    # post-copy: the source's copy is the paused one
    snap = build_snapshot(INVENTORY, "prod-a", found, moving={"hv01": ("web",)})
    assert [(v.name, v.host) for v in snap.vms] == [("db", "hv01"), ("web", "hv02")]
    # the switch-over: both paused, the VM is still counted once
    snap = build_snapshot(INVENTORY, "prod-a", found, moving={"hv01": ("web",), "hv02": ("web",)})
    assert [v.name for v in snap.vms] == ["db", "web"]


def test_a_vm_running_on_two_hosts_with_no_migration_is_refused() -> None:
    found = {"hv01": seen("hv01", "web"), "hv02": seen("hv02", "web"), "hv03": seen("hv03")}
    with pytest.raises(SnapshotError, match="web"):
        build_snapshot(INVENTORY, "prod-a", found)
    # a paused copy of another VM changes nothing for this one
    with pytest.raises(SnapshotError, match="web"):
        build_snapshot(INVENTORY, "prod-a", found, moving={"hv02": ("db",)})


def test_two_vms_sharing_a_name_are_told_apart_from_one_vm_running_twice() -> None:
    # virt-install's default names ("centos7.0") meet on two hosts: two VMs, two uuids, one name
    other = HostDiscovery(host="hv02", cells=(Cell(id=0, memory_mib=65536, free_mib=32768),),
                          vms=(Vm(name="web", uuid="u-other", host="hv02", memory_mib=1024, vcpus=1),))
    found = {"hv01": seen("hv01", "web"), "hv02": other, "hv03": seen("hv03")}
    with pytest.raises(SnapshotError, match=r"2 different VMs are named 'web': on hv01 \(uuid u-web\), hv02 "
                                            r"\(uuid u-other\)\. hostmaint knows a VM by its name within a cluster"):
        build_snapshot(INVENTORY, "prod-a", found)
    found = {"hv01": seen("hv01", "web"), "hv02": seen("hv02", "web"), "hv03": seen("hv03")}
    with pytest.raises(SnapshotError, match=r"VM 'web' runs on hv01 and hv02 at once, the same uuid u-web on each"):
        build_snapshot(INVENTORY, "prod-a", found)


class _Flaky:
    """A hypervisor whose first look catches a migration ending between two hosts' answers."""

    def __init__(self) -> None:
        self.looks = 0

    def discover(self, host: str) -> HostDiscovery:
        if host == "hv01":
            self.looks += 1
        moved = self.looks > 1
        vms = {"hv01": () if moved else ("web",), "hv02": ("web",), "hv03": ()}[host]
        return seen(host, *vms)

    def in_migration(self, host: str) -> tuple[str, ...]:
        return ()  # asked after the migration ended: nothing is paused for it any more


def test_a_discovery_torn_by_a_migration_ending_is_made_again() -> None:
    hypervisor = _Flaky()
    snap = discover_cluster(INVENTORY, "prod-a", hypervisor)  # type: ignore[arg-type]
    assert hypervisor.looks == 2
    assert [(v.name, v.host) for v in snap.vms] == [("web", "hv02")]


def _with_overcommit(ratio: float | None) -> object:
    from hostmaint.inventory import parse_inventory

    data = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "inventory.yaml").read_text())
    if ratio is not None:
        data["clusters"][0]["limits"]["memory_overcommit"] = ratio
    return parse_inventory(data)


def test_a_host_that_overcommits_memory_keeps_what_its_limit_allows() -> None:
    # 64 GiB, 80 GiB of guests (ballooned, KSM-shared) and 32 GiB really free
    guests = tuple(Vm(name=f"g{i}", uuid=f"u-g{i}", host="hv01", memory_mib=20480, vcpus=1) for i in range(4))
    found = {"hv01": HostDiscovery(host="hv01", cells=(Cell(id=0, memory_mib=65536, free_mib=32768),), vms=guests),
             "hv02": seen("hv02"), "hv03": seen("hv03")}

    # a cluster that overcommits memory 1.5x may place 96 - 80 = 16 GiB more there, not nothing
    snap = build_snapshot(_with_overcommit(1.5), "prod-a", found)  # type: ignore[arg-type]
    assert snap.host("hv01").cells[0].free_mib == 16384
    # one that says nothing does not overcommit: the guests' memory is taken as promised to them
    snap = build_snapshot(_with_overcommit(None), "prod-a", found)  # type: ignore[arg-type]
    assert snap.host("hv01").cells[0].free_mib == 0
    # and the real free memory stays the cap
    snap = build_snapshot(_with_overcommit(4.0), "prod-a", found)  # type: ignore[arg-type]
    assert snap.host("hv01").cells[0].free_mib == 32768


def test_hugepage_guests_are_not_counted_against_ordinary_memory() -> None:
    from hostmaint.models import HugePages

    # 64 GiB, a 32 GiB pool of 2 MiB pages held by a 32 GiB hugepage guest, 30 GiB ordinary free
    cell = Cell(id=0, memory_mib=65536, free_mib=30720, hugepages=(HugePages(size_kib=2048, total=16384, free=0),))
    guest = Vm(name="big", uuid="u-big", host="hv01", memory_mib=32768, vcpus=1, hugepage_kib=2048)
    found = {"hv01": HostDiscovery(host="hv01", cells=(cell,), vms=(guest,)), "hv02": seen("hv02"),
             "hv03": seen("hv03")}
    snap = build_snapshot(INVENTORY, "prod-a", found)
    assert snap.host("hv01").cells[0].free_mib == 30720
