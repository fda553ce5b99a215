"""Shared storage: the cluster's ``shared_storage`` is validated, matches whole path components, and
reaches the libvirt driver that open_runtime builds (with fake hosts standing in for libvirtd),
so a VM whose disks are on it is discovered migratable and one with a local disk is not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

import hostmaint.runtime as runtime_module
from hostmaint.drivers.domain_xml import parse_domain
from hostmaint.errors import InventoryError
from hostmaint.inventory import parse_inventory, shared_storage_prefix
from hostmaint.runtime import open_runtime
from tests.fakes.libvirtd import FakeConnector, FakeHost


def _host(name: str, cluster: str) -> dict[str, Any]:
    return {"name": name, "cluster": cluster, "libvirt_uri": f"qemu+tcp://{name}/system",
            "ssh": {"address": name, "key": {"agent": True}, "known_hosts": "known_hosts"}}


def inventory(shared: dict[str, list[str]]) -> dict[str, Any]:
    """One host per cluster, hv-<cluster>; ``shared`` gives the clusters and their shared_storage."""
    clusters = [{"name": name, "shared_storage": paths} if paths else {"name": name} for name, paths in shared.items()]
    return {"version": 1, "clusters": clusters, "hosts": [_host(f"hv-{name}", name) for name in shared]}


BAD: list[tuple[str, Any, str]] = [
    ("empty string", ["/mnt/nfs", ""], "[1] is empty"),
    ("relative", ["mnt/nfs"], "[0] 'mnt/nfs' is not an absolute path"),
    ("dot dot", ["/mnt/nfs/../local"], "'..' component"),
    ("dot", ["/mnt/./nfs"], "'.' or '..' component"),
    ("double slash", ["/mnt//nfs"], "empty path component"),
    ("line break", ["/mnt/nfs\n/var"], "line break"),
    ("star inside", ["/mnt/*/images"], "one * at the end"),
    ("question mark", ["/mnt/nfs?"], "one * at the end"),
    ("every disk", ["/"], "every disk"),
    ("every disk by pattern", ["/*"], "every disk"),
    ("not a list", "/mnt/nfs", "Input should be a valid list"),
    ("not a string", [5], "[0]"),
]


@pytest.mark.parametrize("name,value,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_shared_storage_is_refused_naming_the_field(name: str, value: Any, expected: str) -> None:
    doc = inventory({"prod": ["/mnt/nfs"], "lab": []})
    doc["clusters"][1]["shared_storage"] = value
    with pytest.raises(InventoryError) as info:
        parse_inventory(doc, "inv.yaml")
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith("clusters[1].shared_storage")
    assert expected in info.value.problems[0]


def test_shared_storage_is_a_cluster_setting_only() -> None:
    doc = inventory({"prod": ["/mnt/nfs"]})
    doc["hosts"][0]["shared_storage"] = ["/mnt/nfs"]
    with pytest.raises(InventoryError, match=r"hosts\[0\]\.shared_storage \(host hv-prod\): unknown field"):
        parse_inventory(doc)


@pytest.mark.parametrize("entry,prefix", [
    ("/mnt/nfs", "/mnt/nfs/"),
    ("/mnt/nfs/", "/mnt/nfs/"),
    ("/dev/disk/by-id/dm-uuid-mpath-*", "/dev/disk/by-id/dm-uuid-mpath-"),
    ("/srv/vm images", "/srv/vm images/"),
])
def test_an_entry_becomes_the_prefix_the_driver_matches(entry: str, prefix: str) -> None:
    assert shared_storage_prefix(entry) == prefix


DISK = ("<domain><name>{name}</name><uuid>u-{name}</uuid><memory unit='KiB'>1048576</memory><vcpu>1</vcpu>"
        "<devices><disk type='{kind}' device='disk'><source {attr}='{path}'/><target dev='vda'/></disk>"
        "</devices></domain>")


def domain(name: str, path: str) -> str:
    kind, attr = ("block", "dev") if path.startswith("/dev/") else ("file", "file")
    return DISK.format(name=name, kind=kind, attr=attr, path=path)


@pytest.mark.parametrize("path,shared", [
    ("/mnt/nfs/images/web-1.qcow2", True),
    ("/mnt/nfs/images/sub/dir/web-1.raw", True),
    ("/mnt/nfs/images-local/web-1.qcow2", False),  # a name that begins like the shared directory
    ("/mnt/nfs/web-1.qcow2", False),  # above it
    ("/var/lib/libvirt/images/web-1.qcow2", False),
    ("/dev/disk/by-id/dm-uuid-mpath-3600a0b80001234", True),
    ("/dev/disk/by-id/wwn-0x5000c500a1b2c3d4", False),
])
def test_a_disk_is_shared_only_under_a_whole_path_component(path: str, shared: bool) -> None:
    inv = parse_inventory(inventory({"prod": ["/mnt/nfs/images", "/dev/disk/by-id/dm-uuid-mpath-*"]}))
    vm = parse_domain(domain("web-1", path), "hv-prod", shared_storage_prefixes=inv.shared_storage_for("hv-prod"))
    assert vm.migratable is shared, vm.not_migratable_reason


# --- the runtime's driver, over fake libvirt hosts ----------------------------------------------------

CAPS = ("<capabilities><host><uuid>h</uuid><topology><cells num='1'><cell id='0'>"
        "<memory unit='KiB'>8388608</memory><cpus num='2'><cpu id='0'/><cpu id='1'/></cpus>"
        "</cell></cells></topology></host></capabilities>")


def runtime_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, doc: dict[str, Any],
                 domains: dict[str, list[str]]) -> runtime_module.Runtime:
    hosts = {}
    for uri, xmls in domains.items():
        host = hosts[uri] = FakeHost(uri, caps=CAPS, free={0: 4 * 2**30})
        for xml in xmls:
            host.add(parse_domain(xml, "any").name, xml)
    monkeypatch.setattr(runtime_module, "_cache", {})  # nothing built here outlives the test
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(doc))
    rt = open_runtime(path, str(tmp_path / "hostmaint.db"), libvirt_connector=FakeConnector(hosts), fresh=True)
    assert not rt.simulated
    return rt


def migratable(rt: runtime_module.Runtime, host: str) -> dict[str, bool]:
    try:
        return {vm.name: vm.migratable for vm in rt.hypervisor.discover(host).vms}
    finally:
        rt.hypervisor.close()  # type: ignore[attr-defined]


def test_the_runtime_driver_counts_the_clusters_shared_storage(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    doc = inventory({"prod": ["/mnt/nfs/images", "/dev/disk/by-id/dm-uuid-mpath-*"]})
    domains = {"qemu+tcp://hv-prod/system": [domain("on-nfs", "/mnt/nfs/images/a.qcow2"),
                                             domain("on-lun", "/dev/disk/by-id/dm-uuid-mpath-36001"),
                                             domain("beside-nfs", "/mnt/nfs/images-local/b.qcow2"),
                                             domain("local", "/var/lib/libvirt/images/c.qcow2")]}
    rt = runtime_over(tmp_path, monkeypatch, doc, domains)
    assert migratable(rt, "hv-prod") == {"on-nfs": True, "on-lun": True, "beside-nfs": False, "local": False}


def test_a_path_is_shared_only_on_the_hosts_of_the_cluster_that_declares_it(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # the path that is NFS on prod may be a local disk on lab: each host gets its own cluster's list
    doc = inventory({"prod": ["/mnt/nfs/images", "/srv/gfs2"], "lab": ["/srv/gfs2/vms"]})
    domains = {"qemu+tcp://hv-prod/system": [domain("on-nfs", "/mnt/nfs/images/a.qcow2"),
                                             domain("beside-vms", "/srv/gfs2/other/c.qcow2")],
               "qemu+tcp://hv-lab/system": [domain("lab-on-nfs", "/mnt/nfs/images/a.qcow2"),
                                            domain("lab-on-gfs2", "/srv/gfs2/vms/b.qcow2"),
                                            domain("lab-beside-vms", "/srv/gfs2/other/c.qcow2")]}
    rt = runtime_over(tmp_path, monkeypatch, doc, domains)
    assert migratable(rt, "hv-prod") == {"on-nfs": True, "beside-vms": True}
    assert migratable(rt, "hv-lab") == {"lab-on-nfs": False, "lab-on-gfs2": True, "lab-beside-vms": False}
