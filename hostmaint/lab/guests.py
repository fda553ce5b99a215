"""Lab guests: tiny diskless SeaBIOS VMs and TCG Linux VMs that keep dirtying their memory.

Every guest's RAM is a shared file in its host's ``memory_backing_dir`` (a tmpfs sized as the
host's memory) and is allocated up front, so a host without room refuses a guest or an incoming
migration the way a full hypervisor does. Guests are defined with ``virsh`` (only the driver
imports libvirt).
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from hostmaint.lab.network import LabError, run

KERNEL_CACHE = Path("/var/cache/hostmaint-lab")


@dataclass(frozen=True)
class GuestSpec:
    name: str
    host: str
    memory_mib: int
    vcpus: int = 1
    linux: bool = False
    dirty_mib: int = 0
    # MiB/s it rewrites them at (0: as fast as its vCPU goes, ~50 MiB/s under TCG); a paced guest is a
    # tenant with a steady working set, one that converges on a shared link without being throttled
    dirty_mib_s: int = 0
    marker: str | None = None  # a Linux guest writes "hostmaint-marker:<marker>" 8,192 times into its memory
    # defined with room to grow live (hostmaint vm resize): vCPUs up to vcpus + GROW_VCPUS, memory
    # DIMMs up to GROW_FACTOR times its memory in GROW_SLOTS slots, ACPI and one guest NUMA cell
    room_to_grow: bool = False


GROW_VCPUS = 3
GROW_FACTOR = 4
GROW_SLOTS = 4


def kvm_usable() -> bool:
    """True when /dev/kvm opens: SeaBIOS guests then run under KVM, otherwise TCG."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


_MEMORY = """  <memory unit='MiB'>{memory}</memory>
  <vcpu placement='static'>{vcpus}</vcpu>
  <memoryBacking>
    <source type='file'/>
    <access mode='shared'/>
    <allocation mode='immediate'/>
  </memoryBacking>"""


def _sizes(spec: GuestSpec) -> str:
    """The guest's memory and vCPUs; with room to grow, the maxima and the guest NUMA cell that
    memory and vCPU hot-plug need (and ACPI, without which QEMU offers no hot-plug)."""
    if not spec.room_to_grow:
        return _MEMORY.format(memory=spec.memory_mib, vcpus=spec.vcpus)
    most = spec.vcpus + GROW_VCPUS
    return f"""  <maxMemory slots='{GROW_SLOTS}' unit='MiB'>{spec.memory_mib * GROW_FACTOR}</maxMemory>
  <memory unit='MiB'>{spec.memory_mib}</memory>
  <vcpu placement='static' current='{spec.vcpus}'>{most}</vcpu>
  <memoryBacking>
    <source type='file'/>
    <access mode='shared'/>
    <allocation mode='immediate'/>
  </memoryBacking>
  <features><acpi/><apic/></features>
  <cpu><numa><cell id='0' cpus='0-{most - 1}' memory='{spec.memory_mib}' unit='MiB'/></numa></cpu>"""


def seabios_xml(spec: GuestSpec, kvm: bool) -> str:
    """A guest with no disk and no NIC: SeaBIOS looks for a boot device forever. Starts in 0.4 s."""
    return f"""<domain type='{"kvm" if kvm else "qemu"}'>
  <name>{escape(spec.name)}</name>
{_sizes(spec)}
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='network'/></os>
  <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def linux_xml(spec: GuestSpec, kernel: Path, initrd: Path, console_log: Path | None = None) -> str:
    """A TCG Linux guest (busybox init rewriting ``dirty_mib`` MiB in a loop).

    ``console_log`` gets the serial console; the path is the same on every host, so it follows the
    guest through migrations.
    """
    log = f"<log file='{console_log}' append='on'/>" if console_log else ""
    if spec.marker is not None and not spec.marker.isalnum():
        raise ValueError(f"guest {spec.name}: a marker is letters and digits only, got {spec.marker!r}")
    marker = f" hm_marker={spec.marker}" if spec.marker else ""
    if spec.dirty_mib_s < 0:
        raise ValueError(f"guest {spec.name}: dirty_mib_s must be >= 0, got {spec.dirty_mib_s}")
    pace = f" dirty_mib_s={spec.dirty_mib_s}" if spec.dirty_mib_s else ""
    return f"""<domain type='qemu'>
  <name>{escape(spec.name)}</name>
{_sizes(spec)}
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet dirty_mib={spec.dirty_mib}{pace}{marker}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='usb' model='none'/>
    <serial type='pty'>{log}<target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <memballoon model='none'/>
  </devices>
</domain>
"""


# Non-zero data: QEMU sends zero pages as tiny markers, so rewriting zeros would dirty nothing
# that costs bandwidth. Two different 8 MiB blocks of random bytes take turns over the N MiB:
# rewriting the same bytes dirties pages for migration, but QEMU's page-sampling dirty-rate
# measurement (a hash of page contents) would see nothing change.
_INIT = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /tmp /bin
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox --install -s /bin
mib=$(sed -n 's/.*dirty_mib=\\([0-9]*\\).*/\\1/p' /proc/cmdline)
mib=${mib:-0}
pace=$(sed -n 's/.*dirty_mib_s=\\([0-9]*\\).*/\\1/p' /proc/cmdline)
mkdir -p /mem
# the initramfs root is a tmpfs limited to half the RAM: the dirtied memory gets its own
mount -t tmpfs -o size=$((mib + 4))m tmpfs /mem
dd if=/dev/urandom of=/src0 bs=1M count=8 2>/dev/null
dd if=/dev/urandom of=/src1 bs=1M count=8 2>/dev/null
echo "hostmaint-lab guest: userspace up, rewriting ${mib} MiB in a loop"
seed=$(sed -n 's/.*hm_marker=\\([A-Za-z0-9]*\\).*/\\1/p' /proc/cmdline)
if [ -n "$seed" ]; then
  # a known text in the guest's memory, for tests that look for it on the wire; built here, so that the
  # command line (and the domain XML) holds only the seed, never the text itself
  yes "hostmaint-marker:$seed" | head -n 8192 > /tmp/marker
  echo "hostmaint-lab guest: marker written"
fi
turn=0
while true; do
  # what the guest itself sees of its CPUs and memory, said again whenever it changes (live resize)
  blocks=$(ls /sys/devices/system/memory | grep -c '^memory')
  now="cpus present $(cat /sys/devices/system/cpu/present), memory blocks $blocks"
  [ "$now" = "$seen" ] || { seen=$now; echo "hostmaint-lab guest: $now"; }
  if [ "$mib" -gt 0 ]; then
    i=0
    while [ $i -lt $mib ]; do
      dd if=/src$turn of=/mem/dirty bs=1M count=8 seek=$i conv=notrunc 2>/dev/null
      i=$((i + 8))
      # paced: 8 MiB per 8/pace seconds (the dd's own time is small beside it)
      [ -n "$pace" ] && usleep $((8000000 / pace))
    done
    turn=$((1 - turn))
    [ -n "$said" ] || { said=1; echo "hostmaint-lab guest: first pass done, $(du -m /mem/dirty | cut -f1) MiB"; }
  else
    sleep 1
  fi
done
"""


def linux_boot_files(cache: Path) -> tuple[Path, Path]:
    """The Debian cloud kernel (unpacked, not installed) and a busybox initramfs, built once."""
    out = cache / "linux"
    kernel = next(iter(sorted(out.glob("boot/vmlinuz-*"))), None)
    if kernel is None:
        debs = sorted(glob.glob(str(KERNEL_CACHE / "linux-image-*-cloud-amd64_*.deb")))
        if not debs:
            KERNEL_CACHE.mkdir(parents=True, exist_ok=True)
            depends = run(["apt-cache", "depends", "linux-image-cloud-amd64"]).stdout
            names = [ln.split()[-1] for ln in depends.splitlines() if "Depends: linux-image-" in ln]
            if not names:
                raise LabError("no Debian cloud kernel package found (run scripts/install-system.sh)")
            subprocess.run(["apt-get", "download", "-qq", names[0]], cwd=KERNEL_CACHE, check=True,
                           capture_output=True, timeout=300)
            debs = sorted(glob.glob(str(KERNEL_CACHE / "linux-image-*-cloud-amd64_*.deb")))
        run(["dpkg-deb", "-x", debs[-1], str(out)], timeout=120)
        kernel = next(iter(sorted(out.glob("boot/vmlinuz-*"))))
    # named by its init script: a lab built before the script changed must not boot the old one
    digest = hashlib.sha256(_INIT.encode()).hexdigest()[:12]
    initrd = cache / "linux" / f"initramfs-{digest}.cpio"
    if not initrd.exists():
        stage = cache / "initramfs-root"
        if stage.exists():
            shutil.rmtree(stage)
        (stage / "bin").mkdir(parents=True)
        (stage / "dev").mkdir()
        shutil.copy2("/bin/busybox", stage / "bin" / "busybox")
        (stage / "init").write_text(_INIT)
        (stage / "init").chmod(0o755)
        os.mknod(stage / "dev" / "console", 0o600 | 0o020000, os.makedev(5, 1))
        names = sorted(str(p.relative_to(stage)) for p in stage.rglob("*"))
        with open(initrd.with_suffix(".tmp"), "wb") as f:
            subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], input="\n".join(names).encode(),
                           stdout=f, cwd=stage, check=True)
        initrd.with_suffix(".tmp").replace(initrd)
        shutil.rmtree(stage)
    return kernel, initrd


def define_and_start(uri: str, xml: str, xml_path: Path) -> None:
    """Define a persistent guest on the host at ``uri`` and start it."""
    xml_path.write_text(xml)
    name = xml_path.stem
    run(["virsh", "-q", "-c", uri, "define", str(xml_path)], timeout=60)
    run(["virsh", "-q", "-c", uri, "start", name], timeout=120)
