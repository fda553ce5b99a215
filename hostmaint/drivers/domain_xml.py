"""libvirt XML → hostmaint models, and the destination XML a placement needs. Pure: no libvirt import.

The libvirt driver feeds these the strings it reads (``getCapabilities``, ``XMLDesc``); tests feed
them fixtures.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hostmaint.models import NUMATUNE_MODES, Cell, GuestCell, HugePages, Numatune, Placement, VirtioMem, Vm

_UNIT_KIB = {"b": 1 / 1024, "bytes": 1 / 1024, "k": 1, "kib": 1, "kb": 1000 / 1024, "m": 1024, "mib": 1024,
             "mb": 1000 * 1000 / 1024, "g": 1024**2, "gib": 1024**2, "gb": 1000**3 / 1024, "t": 1024**3,
             "tib": 1024**3}


def to_kib(value: str | None, unit: str | None, default_unit: str = "KiB") -> int:
    """A libvirt size with its unit attribute, in KiB."""
    if value is None or not value.strip():
        return 0
    factor = _UNIT_KIB.get((unit or default_unit).lower())
    if factor is None:
        raise ValueError(f"unknown libvirt size unit {unit!r}")
    return int(int(value.strip()) * factor)


def parse_cpuset(spec: str | None) -> tuple[int, ...]:
    """libvirt cpuset syntax (``0-3,^2,8``) → sorted CPU ids."""
    if not spec:
        return ()
    include: set[int] = set()
    exclude: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        target = exclude if part.startswith("^") else include
        part = part.lstrip("^")
        if "-" in part:
            lo, hi = part.split("-", 1)
            target.update(range(int(lo), int(hi) + 1))
        else:
            target.add(int(part))
    return tuple(sorted(include - exclude))


def format_cpuset(cpus: Sequence[int]) -> str:
    """CPU ids → compact libvirt cpuset (``0-3,8``)."""
    ids = sorted(set(cpus))
    ranges: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        ranges.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(ranges)


# The page size of a bare <hugepages/>: libvirt then backs the guest with the host kernel's default
# hugepage size (Hugepagesize in /proc/meminfo). Neither the capabilities nor the snapshot say which
# size that is, so the x86-64 kernel's default (2 MiB, unless booted with default_hugepagesz=) is
# assumed; a caller that knows the host's passes ``default_hugepage_kib``.
DEFAULT_HUGEPAGE_KIB = 2048


@dataclass(frozen=True)
class HostCapabilities:
    """What the capabilities XML says about the host (free memory comes from other calls)."""

    host_uuid: str
    cells: tuple[Cell, ...]  # free_mib = 0 and hugepage free = 0 until filled in


def parse_capabilities(xml: str) -> HostCapabilities:
    """NUMA cells (memory, CPUs, hugepage pools) and the host UUID from ``getCapabilities()``."""
    root = ET.fromstring(xml)
    host_uuid = (root.findtext("host/uuid") or "").strip()
    cells = []
    for cell in root.findall("host/topology/cells/cell"):
        mem = cell.find("memory")
        # the size has a unit like any libvirt size (KiB in practice, but MiB is valid XML)
        pages = tuple(
            HugePages(size_kib=to_kib(p.get("size"), p.get("unit")), total=int((p.text or "0").strip()), free=0)
            for p in cell.findall("pages")
            if to_kib(p.get("size"), p.get("unit")) > 4  # 4 KiB are ordinary pages, not a hugepage pool
        )
        cells.append(Cell(
            id=int(cell.get("id", "0")),
            memory_mib=to_kib(mem.text if mem is not None else None, mem.get("unit") if mem is not None else None)
            // 1024,
            free_mib=0,
            cpus=tuple(sorted(int(c.get("id", "0")) for c in cell.findall("cpus/cpu"))),
            hugepages=pages,
        ))
    return HostCapabilities(host_uuid=host_uuid, cells=tuple(cells))


def with_free_memory(caps: HostCapabilities, free_bytes: Sequence[int],
                     free_pages: Mapping[int, Mapping[int, int]]) -> tuple[Cell, ...]:
    """Cells with ``getCellsFreeMemory`` and ``getFreePages`` results filled in."""
    out = []
    for i, cell in enumerate(caps.cells):
        free_mib = free_bytes[i] // (1024 * 1024) if i < len(free_bytes) else 0
        pages = tuple(
            hp.model_copy(update={"free": int(free_pages.get(cell.id, {}).get(hp.size_kib, 0))})
            for hp in cell.hugepages
        )
        out.append(cell.model_copy(update={"free_mib": free_mib, "hugepages": pages}))
    return tuple(out)


def _blocking_devices(devices: ET.Element | None, shared_prefixes: Sequence[str]) -> list[str]:
    """Why the domain's devices prevent live migration, one reason per device."""
    if devices is None:
        return []
    reasons = []
    for hostdev in devices.findall("hostdev"):
        addr = hostdev.find("source/address")
        where = ""
        if addr is not None and addr.get("bus") is not None:
            where = " " + ":".join(a.removeprefix("0x") for a in (addr.get("domain", "0x0000"), addr.get("bus", ""),
                                                                    addr.get("slot", ""))) \
                + "." + addr.get("function", "0x0").removeprefix("0x")
        reasons.append(f"host device passthrough ({hostdev.get('type', 'pci')}{where})")
    for disk in devices.findall("disk"):
        if disk.get("device", "disk") not in ("disk", "lun"):
            continue  # cdrom/floppy: media, not storage that must follow the VM
        if disk.get("type") == "network":
            continue  # network storage (rbd, iscsi, nbd, ...) is shared by definition
        if disk.find("shareable") is not None or disk.find("readonly") is not None:
            continue
        source = disk.find("source")
        path = None
        if source is not None:
            path = source.get("file") or source.get("dev") or source.get("volume") or source.get("dir")
        if path and any(path.startswith(p) for p in shared_prefixes):
            continue
        target = disk.find("target")
        name = target.get("dev") if target is not None else "?"
        reasons.append(f"local disk {name} ({path or 'no source'}) without shared storage")
    return reasons


def parse_domain(xml: str, host: str, *, vcpus_live: int | None = None,
                 shared_storage_prefixes: Sequence[str] = (),
                 default_hugepage_kib: int = DEFAULT_HUGEPAGE_KIB) -> Vm:
    """A running domain's XML (``XMLDesc(0)``) → Vm as discovered (no inventory policy yet).

    ``default_hugepage_kib`` is the host's default hugepage size, what a ``<hugepages/>`` naming no
    ``<page>`` is backed by (see :data:`DEFAULT_HUGEPAGE_KIB` for what is assumed without it).
    """
    root = ET.fromstring(xml)
    name = root.findtext("name") or ""
    mem = root.find("memory")
    memory_kib = to_kib(mem.text if mem is not None else None, mem.get("unit") if mem is not None else None)
    vcpu = root.find("vcpu")
    vcpus = vcpus_live or (int(vcpu.get("current") or (vcpu.text or "1").strip()) if vcpu is not None else 1)
    # pins and guest cells may name vCPUs that are offline now (current < maximum)
    most = int((vcpu.text or "1").strip()) if vcpu is not None else 1

    vnuma = tuple(
        GuestCell(id=int(c.get("id", str(i))),
                  memory_mib=max(1, to_kib(c.get("memory"), c.get("unit")) // 1024),
                  vcpus=parse_cpuset(c.get("cpus")))
        for i, c in enumerate(root.findall("cpu/numa/cell"))
    )
    vcpupin = {int(p.get("vcpu", "0")): parse_cpuset(p.get("cpuset")) for p in root.findall("cputune/vcpupin")}
    emulator = root.find("cputune/emulatorpin")
    emulatorpin = parse_cpuset(emulator.get("cpuset")) if emulator is not None else ()
    iothreadpin = {int(p.get("iothread", "0")): parse_cpuset(p.get("cpuset"))
                   for p in root.findall("cputune/iothreadpin")}
    # <vcpu cpuset> binds every vCPU without its own vcpupin, and the emulator threads without an
    # emulatorpin, to those host CPUs: pinning as much as vcpupin is. With placement='auto' libvirt
    # ignores it (numad chooses on whichever host the VM runs), so then it pins nothing.
    vcpu_cpuset: tuple[int, ...] = ()
    if vcpu is not None and vcpu.get("placement", "static") != "auto":
        vcpu_cpuset = parse_cpuset(vcpu.get("cpuset"))
    numa_mem = root.find("numatune/memory")
    memnodes = sorted(root.findall("numatune/memnode"), key=lambda m: int(m.get("cellid", "0")))
    for el in ([numa_mem] if numa_mem is not None else []) + memnodes:
        # refused here, not planned: libvirt would refuse the destination XML mid-drain
        if el.get("mode", "strict") not in NUMATUNE_MODES:
            where = f"<memnode cellid='{el.get('cellid')}'>" if el.tag == "memnode" else "<memory>"
            raise ValueError(f"domain {name!r}: <numatune> {where} mode {el.get('mode')!r} is not one of "
                             f"{', '.join(NUMATUNE_MODES)}")
    numatune = None
    if numa_mem is not None:
        numatune = Numatune(mode=numa_mem.get("mode", "strict"), nodeset=parse_cpuset(numa_mem.get("nodeset")))
    elif memnodes:
        # Guest cells bound one by one with no <memory> binding the whole: the memory is as bound
        # to the source's nodes as with one, so it is numatune all the same (the nodes they name,
        # the first guest cell's mode), and the placement rewrites the memnodes to the target's.
        nodes: set[int] = set()
        for memnode in memnodes:
            nodes.update(parse_cpuset(memnode.get("nodeset")))
        numatune = Numatune(mode=memnodes[0].get("mode", "strict"), nodeset=tuple(sorted(nodes)))
    hugepage_kib = 0
    hugepages = root.find("memoryBacking/hugepages")
    if hugepages is not None:
        page = hugepages.find("page")
        hugepage_kib = to_kib(page.get("size"), page.get("unit")) if page is not None else default_hugepage_kib

    reasons = _blocking_devices(root.find("devices"), shared_storage_prefixes)
    room = _room_to_grow(root)
    return Vm(
        name=name, uuid=(root.findtext("uuid") or "").strip(), host=host,
        memory_mib=max(1, memory_kib // 1024), vcpus=max(1, vcpus), max_vcpus=most if most > max(1, vcpus) else None,
        vnuma=vnuma, vcpupin=vcpupin,
        emulatorpin=emulatorpin, vcpu_cpuset=vcpu_cpuset, iothreadpin=iothreadpin,
        numatune=numatune, hugepage_kib=hugepage_kib,
        migratable=not reasons, not_migratable_reason="; ".join(reasons) or None, **room,
    )


def _size_mib(el: ET.Element | None) -> int:
    return to_kib(el.text, el.get("unit")) // 1024 if el is not None else 0


def _room_to_grow(root: ET.Element) -> dict[str, Any]:
    """What a live resize may use: ``<maxMemory slots>``, DIMMs in those slots, a virtio-mem device,
    and the vCPUs present since boot (``<vcpus><vcpu hotpluggable='no' enabled='yes'>``)."""
    out: dict[str, Any] = {}
    most = root.find("maxMemory")
    if most is not None and most.text and most.text.strip():
        out["max_memory_mib"] = _size_mib(most)
        out["memory_slots"] = int(most.get("slots", "0"))
    devices = root.findall("devices/memory")
    out["memory_slots_used"] = sum(1 for d in devices if d.get("model") in ("dimm", "nvdimm"))
    vmem = next((d for d in devices if d.get("model") == "virtio-mem"), None)
    if vmem is not None:
        block = vmem.find("target/block")
        out["virtio_mem"] = VirtioMem(node=int((vmem.findtext("target/node") or "0").strip()),
                                      size_mib=_size_mib(vmem.find("target/size")),
                                      requested_mib=_size_mib(vmem.find("target/requested")),
                                      block_kib=to_kib(block.text, block.get("unit")) if block is not None else 2048)
    fixed = [v for v in root.findall("vcpus/vcpu") if v.get("enabled") == "yes" and v.get("hotpluggable") == "no"]
    if root.find("vcpus") is not None and fixed:
        out["fixed_vcpus"] = len(fixed)
    return out


def rewrite_for_target(xml: str, placement: Placement) -> str:
    """The domain XML with the target's pinning and NUMA binding from ``placement``.

    ``vcpupin`` replaces every ``<vcpupin>``; ``emulatorpin`` replaces ``<emulatorpin>``;
    ``iothreadpin`` replaces every ``<iothreadpin>``; ``vcpu_cpuset`` replaces ``<vcpu cpuset>``;
    ``numatune_nodeset`` replaces ``<numatune><memory nodeset>`` and the ``<memnode>`` cells
    (the guest cell with the i-th lowest id → target_cells[i] when the placement names one target
    cell per guest cell, else the whole nodeset); a numatune of memnodes alone gets no ``<memory>``,
    which would bind the memory outside the guest cells too.
    Anything the placement leaves empty is left as it is.
    """
    root = ET.fromstring(xml)
    vcpu_el = root.find("vcpu")
    if placement.vcpu_cpuset and vcpu_el is not None:
        vcpu_el.set("cpuset", format_cpuset(placement.vcpu_cpuset))
    if placement.vcpupin or placement.emulatorpin or placement.iothreadpin:
        cputune = root.find("cputune")
        if cputune is None:
            cputune = ET.SubElement(root, "cputune")
        if placement.vcpupin:
            for old in cputune.findall("vcpupin"):
                cputune.remove(old)
            for i, (vcpu, cpus) in enumerate(sorted(placement.vcpupin.items())):
                el = ET.Element("vcpupin", {"vcpu": str(vcpu), "cpuset": format_cpuset(cpus)})
                cputune.insert(i, el)
        if placement.emulatorpin:
            emu = cputune.find("emulatorpin")
            if emu is None:
                emu = ET.SubElement(cputune, "emulatorpin")
            emu.set("cpuset", format_cpuset(placement.emulatorpin))
        if placement.iothreadpin:
            for old in cputune.findall("iothreadpin"):
                cputune.remove(old)
            # after the vcpupins and emulatorpin, where libvirt writes them
            at = max((i + 1 for i, el in enumerate(cputune) if el.tag in ("vcpupin", "emulatorpin")), default=0)
            for i, (thread, cpus) in enumerate(sorted(placement.iothreadpin.items())):
                cputune.insert(at + i, ET.Element("iothreadpin", {"iothread": str(thread),
                                                                   "cpuset": format_cpuset(cpus)}))
    if placement.numatune_nodeset is not None:
        numatune = root.find("numatune")
        if numatune is None:
            numatune = ET.SubElement(root, "numatune")
        memory = numatune.find("memory")
        memnodes = numatune.findall("memnode")
        if memory is None and not memnodes:
            memory = ET.Element("memory", {"mode": "strict"})
            numatune.insert(0, memory)
        if memory is not None:
            memory.set("nodeset", format_cpuset(placement.numatune_nodeset))
        # target_cells is in guest-cell order (ascending id), as the planner maps vNUMA cells
        guest_ids = sorted(int(c.get("id", str(i))) for i, c in enumerate(root.findall("cpu/numa/cell")))
        one_each = len(placement.target_cells) == len(guest_ids)
        for memnode in memnodes:
            cellid = int(memnode.get("cellid", "0"))
            if one_each and cellid in guest_ids:
                memnode.set("nodeset", str(placement.target_cells[guest_ids.index(cellid)]))
            else:
                memnode.set("nodeset", format_cpuset(placement.numatune_nodeset))
    return ET.tostring(root, encoding="unicode")
