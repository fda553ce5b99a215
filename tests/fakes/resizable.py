"""A fake libvirt domain that can be grown live: vCPU hot-plug, pins, DIMM and virtio-mem, each on its
live and/or persistent definition as the flags say, with libvirt's refusals where the driver relies on
them (more vCPUs than ``<vcpu>``'s maximum, a DIMM without ``<maxMemory>`` or a free slot, a DIMM on a
guest node the domain lacks). ``fail`` maps a method name to the error its next call raises."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import libvirt

from hostmaint.drivers.domain_xml import format_cpuset, to_kib
from tests.fakes.libvirtd import FakeDomain, FakeError, FakeHost


def growable_xml(name: str = "db", *, vcpus: int = 2, most: int = 4, memory_mib: int = 2048, slots: int = 4,
                 max_mib: int = 8192, pins: dict[int, int] | None = None, virtio_mem: str = "") -> str:
    pin = "".join(f"<vcpupin vcpu='{v}' cpuset='{c}'/>" for v, c in sorted((pins or {}).items()))
    maxmem = f"<maxMemory slots='{slots}' unit='MiB'>{max_mib}</maxMemory>" if slots else ""
    return (f"<domain type='kvm'><name>{name}</name><uuid>uuid-{name}</uuid>{maxmem}"
            f"<memory unit='MiB'>{memory_mib}</memory><vcpu current='{vcpus}'>{most}</vcpu>"
            f"<cputune>{pin}</cputune><cpu><numa><cell id='0' cpus='0-{most - 1}' memory='{memory_mib}' "
            f"unit='MiB'/></numa></cpu><devices>{virtio_mem}</devices></domain>")


class ResizableDomain(FakeDomain):
    """A domain whose live and persistent XML change as libvirt's would under hot-plug."""

    def __init__(self, host: FakeHost, name: str, xml: str, **kw: Any) -> None:
        super().__init__(host, name, xml, **kw)
        self.config = xml
        self.fail: dict[str, libvirt.libvirtError] = {}
        vcpu = ET.fromstring(xml).find("vcpu")
        self.vcpus = int(vcpu.get("current") or (vcpu.text or "1")) if vcpu is not None else 1

    def XMLDesc(self, flags: int) -> str:
        return self.config if flags & libvirt.VIR_DOMAIN_XML_INACTIVE else self.xml

    def _edit(self, flags: int, change: Any) -> None:
        # LIVE and CONFIG are checked before either changes, as libvirt does
        targets = []
        if flags & libvirt.VIR_DOMAIN_AFFECT_LIVE:
            targets.append("xml")
        if flags & libvirt.VIR_DOMAIN_AFFECT_CONFIG:
            if not self.persistent:
                raise FakeError(libvirt.VIR_ERR_OPERATION_INVALID, "cannot change persistent config of a "
                                                                   "transient domain")
            targets.append("config")
        roots = {t: ET.fromstring(getattr(self, t)) for t in targets}
        for root in roots.values():
            change(root)
        for t, root in roots.items():
            setattr(self, t, ET.tostring(root, encoding="unicode"))

    def _maybe_fail(self, method: str) -> None:
        self.calls.append(method)
        if method in self.fail:
            raise self.fail.pop(method)

    def setVcpusFlags(self, count: int, flags: int) -> int:
        self._maybe_fail("setVcpusFlags")

        def change(root: ET.Element) -> None:
            vcpu = root.find("vcpu")
            assert vcpu is not None
            if count > int(vcpu.text or "1"):
                raise FakeError(libvirt.VIR_ERR_INVALID_ARG, f"requested vcpus is greater than max allowable "
                                                             f"vcpus for the domain: {count} > {vcpu.text}")
            vcpu.set("current", str(count))

        self._edit(flags, change)
        if flags & libvirt.VIR_DOMAIN_AFFECT_LIVE:
            self.vcpus = count
        return 0

    def pinVcpuFlags(self, vcpu: int, cpumap: tuple[bool, ...], flags: int) -> int:
        self._maybe_fail("pinVcpuFlags")

        def change(root: ET.Element) -> None:
            cputune = root.find("cputune")
            if cputune is None:
                cputune = ET.SubElement(root, "cputune")
            for old in cputune.findall("vcpupin"):
                if old.get("vcpu") == str(vcpu):
                    cputune.remove(old)
            cputune.append(ET.Element("vcpupin", {"vcpu": str(vcpu), "cpuset": format_cpuset(
                [i for i, on in enumerate(cpumap) if on])}))

        self._edit(flags, change)
        return 0

    def attachDeviceFlags(self, xml: str, flags: int) -> int:
        self._maybe_fail("attachDeviceFlags")
        dev = ET.fromstring(xml)
        size = dev.find("target/size")
        assert size is not None
        kib = to_kib(size.text, size.get("unit"))
        node = int(dev.findtext("target/node") or "0")

        def change(root: ET.Element) -> None:
            most = root.find("maxMemory")
            if most is None:
                raise FakeError(libvirt.VIR_ERR_OPERATION_INVALID, "cannot use/hotplug a memory device when "
                                                                   "domain 'maxMemory' is not defined")
            used = len([d for d in root.findall("devices/memory") if d.get("model") == "dimm"])
            if used >= int(most.get("slots", "0")):
                raise FakeError(libvirt.VIR_ERR_OPERATION_INVALID, "no free memory device slot available")
            if node not in {int(c.get("id", "0")) for c in root.findall("cpu/numa/cell")}:
                raise FakeError(libvirt.VIR_ERR_INVALID_ARG, f"can't add memory backend for guest node '{node}' "
                                                             f"as the guest has only 1 NUMA nodes configured")
            mem = root.find("memory")
            assert mem is not None
            mem.text = str(to_kib(mem.text, mem.get("unit")) + kib)
            mem.set("unit", "KiB")
            devices = root.find("devices")
            assert devices is not None
            devices.append(dev)

        self._edit(flags, change)
        return 0

    def updateDeviceFlags(self, xml: str, flags: int) -> int:
        self._maybe_fail("updateDeviceFlags")
        new = ET.fromstring(xml)
        req = new.find("target/requested")
        assert req is not None and new.find("target/current") is None

        def change(root: ET.Element) -> None:
            dev = next(d for d in root.findall("devices/memory") if d.get("model") == "virtio-mem")
            target = dev.find("target")
            assert target is not None
            old = target.find("requested")
            if old is not None:
                target.remove(old)
            target.append(req)

        self._edit(flags, change)
        return 0


def add_resizable(host: FakeHost, name: str, xml: str, **kw: Any) -> ResizableDomain:
    dom = ResizableDomain(host, name, xml, **kw)
    host.domains[name] = dom
    return dom
