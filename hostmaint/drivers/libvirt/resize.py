"""Growing a running guest: vCPU hot-plug with its pins, memory hot-plug (a DIMM, or virtio-mem's
requested size), each live and in the persistent definition, and what the guest has now.

Every change is made with ``VIR_DOMAIN_AFFECT_LIVE | VIR_DOMAIN_AFFECT_CONFIG``: the guest gets it
now and keeps it at its next restart. A transient domain has no persistent definition: its
changes are live only. What libvirt refuses is ``DriverError`` naming the host and the call.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence

import libvirt

from hostmaint.drivers.base import GuestSize
from hostmaint.drivers.domain_xml import format_cpuset, parse_cpuset, to_kib
from hostmaint.drivers.libvirt.connections import Connections, lookup
from hostmaint.errors import DriverError


def _flags(dom: libvirt.virDomain) -> int:
    flags = int(libvirt.VIR_DOMAIN_AFFECT_LIVE)
    if dom.isPersistent():
        flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
    return flags


def size_from_xml(xml: str) -> GuestSize:
    """A domain XML's vCPUs, memory, pins and memory devices."""
    root = ET.fromstring(xml)
    vcpu = root.find("vcpu")
    most = int((vcpu.text or "1").strip()) if vcpu is not None else 1
    online = int(vcpu.get("current") or most) if vcpu is not None else 1
    mem = root.find("memory")
    memory_kib = to_kib(mem.text if mem is not None else None, mem.get("unit") if mem is not None else None)
    pins = {int(p.get("vcpu", "0")): parse_cpuset(p.get("cpuset")) for p in root.findall("cputune/vcpupin")}
    dimms: list[tuple[int, int]] = []
    requested: int | None = None
    vmem_mib = 0
    for dev in root.findall("devices/memory"):
        size = dev.find("target/size")
        size_kib = to_kib(size.text, size.get("unit")) if size is not None else 0
        node = int((dev.findtext("target/node") or "0").strip())
        if dev.get("model") == "dimm":
            dimms.append((size_kib // 1024, node))
        elif dev.get("model") == "virtio-mem":
            req = dev.find("target/requested")
            requested = to_kib(req.text, req.get("unit")) // 1024 if req is not None else 0
            vmem_mib = size_kib // 1024
    return GuestSize(vcpus=online, max_vcpus=most, memory_mib=memory_kib // 1024, vcpupin=pins,
                     dimms=tuple(dimms), virtio_mem_requested_mib=requested,
                     virtio_mem_size_mib=vmem_mib)


def dimm_xml(mib: int, node: int, page_kib: int = 0) -> str:
    """A ``<memory model='dimm'>`` device for ``attachDeviceFlags``."""
    dev = ET.Element("memory", {"model": "dimm"})
    if page_kib:
        source = ET.SubElement(dev, "source")
        ET.SubElement(source, "pagesize", {"unit": "KiB"}).text = str(page_kib)
    target = ET.SubElement(dev, "target")
    ET.SubElement(target, "size", {"unit": "MiB"}).text = str(mib)
    ET.SubElement(target, "node").text = str(node)
    return ET.tostring(dev, encoding="unicode")


def cpumap(cpus: Sequence[int]) -> tuple[bool, ...]:
    """libvirt's CPU map for ``pinVcpuFlags``: a flag per host CPU up to the highest chosen (the
    binding leaves the CPUs past the tuple's end out)."""
    chosen = set(cpus)
    return tuple(i in chosen for i in range(max(chosen, default=-1) + 1))


class Resizes:
    """Hot-plug on the hosts of ``connections``."""

    def __init__(self, connections: Connections) -> None:
        self._connections = connections

    def _domain(self, conn: libvirt.virConnect, vm: str, host: str) -> libvirt.virDomain:
        dom = lookup(conn, vm)
        if dom is None or not dom.isActive():
            raise DriverError(f"{vm} is not running on {host}", host)
        return dom

    def guest_size(self, vm: str, host: str, *, persistent: bool = False) -> GuestSize:
        """What ``vm`` has now (or, ``persistent``, what its definition gives it at a restart)."""
        def read(conn: libvirt.virConnect) -> GuestSize:
            dom = self._domain(conn, vm, host)
            flags = libvirt.VIR_DOMAIN_XML_INACTIVE if persistent and dom.isPersistent() else 0
            return size_from_xml(dom.XMLDesc(flags))

        return self._connections.call(host, f"reading the size of {vm}", read)

    def set_vcpus(self, vm: str, host: str, count: int) -> None:
        """``setVcpusFlags(count, LIVE | CONFIG)``: hot-plug (or unplug) vCPUs up to ``count``."""
        def plug(conn: libvirt.virConnect) -> None:
            dom = self._domain(conn, vm, host)
            dom.setVcpusFlags(count, _flags(dom))

        self._connections.call(host, f"setting {vm} to {count} vCPUs", plug)

    def pin_vcpus(self, vm: str, host: str, pins: Mapping[int, Sequence[int]]) -> None:
        """``pinVcpuFlags`` per vCPU, LIVE | CONFIG."""
        def pin(conn: libvirt.virConnect) -> None:
            dom = self._domain(conn, vm, host)
            for vcpu, cpus in sorted(pins.items()):
                dom.pinVcpuFlags(vcpu, cpumap(cpus), _flags(dom))

        what = ", ".join(f"vCPU {v} -> {format_cpuset(c)}" for v, c in sorted(pins.items()))
        self._connections.call(host, f"pinning {vm} ({what})", pin)

    def add_dimm(self, vm: str, host: str, mib: int, node: int, page_kib: int = 0) -> None:
        """``attachDeviceFlags`` of a DIMM on guest node ``node``, LIVE | CONFIG."""
        xml = dimm_xml(mib, node, page_kib)

        def attach(conn: libvirt.virConnect) -> None:
            dom = self._domain(conn, vm, host)
            dom.attachDeviceFlags(xml, _flags(dom))

        self._connections.call(host, f"adding a {mib} MiB DIMM on guest node {node} to {vm}", attach)

    def set_virtio_mem(self, vm: str, host: str, requested_mib: int) -> None:
        """``updateDeviceFlags`` of the virtio-mem device with a new ``<requested>`` size, LIVE | CONFIG."""
        def update(conn: libvirt.virConnect) -> None:
            dom = self._domain(conn, vm, host)
            root = ET.fromstring(dom.XMLDesc(0))
            dev = next((d for d in root.findall("devices/memory") if d.get("model") == "virtio-mem"), None)
            if dev is None:
                raise DriverError(f"{vm} has no virtio-mem device", host)
            target = dev.find("target")
            if target is None:
                raise DriverError(f"{vm}'s virtio-mem device has no <target>", host)
            req = target.find("requested")
            if req is None:
                req = ET.SubElement(target, "requested")
            req.set("unit", "MiB")
            req.text = str(requested_mib)
            for runtime in target.findall("current"):  # read-only: libvirt refuses an update naming it
                target.remove(runtime)
            dom.updateDeviceFlags(ET.tostring(dev, encoding="unicode"), _flags(dom))

        self._connections.call(host, f"setting {vm}'s virtio-mem to {requested_mib} MiB", update)
