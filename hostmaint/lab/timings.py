"""Measure the lab: bring-up, one migration, four in parallel, a reboot, teardown.

``python -m hostmaint.lab.timings [WORKDIR]`` (as root) builds a fresh 3-host lab, measures, tears
it down and prints one line per measurement. The numbers go into hostmaint/lab/README.md.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hostmaint.drivers.libvirt import LibvirtHypervisor, MonitorSettings
from hostmaint.inventory import load_inventory
from hostmaint.lab.lab import add_guest, lab_down, lab_up, reboot_host
from hostmaint.models import MigrationOptions


def measure(workdir: Path) -> list[str]:
    lines = []
    lab_down(workdir)
    t = time.monotonic()
    info = lab_up(hosts=3, vms=6, workdir=workdir, linux_guests=1)
    lines.append(f"bring-up, 3 hosts + 6 SeaBIOS + 1 Linux guest: {time.monotonic() - t:.1f} s "
                 f"({'KVM' if info.kvm else 'TCG'})")
    hv = LibvirtHypervisor.from_inventory(load_inventory(info.inventory_path), "lab",
                                        monitor=MonitorSettings(poll_interval_s=0.2))
    try:
        r = hv.migrate("vm01", "hv01", "hv02", MigrationOptions())
        lines.append(f"one migration, 64 MiB SeaBIOS guest: {r.seconds:.1f} s, downtime {r.downtime_ms:.0f} ms, "
                     f"{r.data_bytes / 2**20:.1f} MiB")
        console = workdir / "guests" / "lnx01.console"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and "first pass done" not in console.read_text(errors="replace"):
            time.sleep(0.5)  # measure the Linux guest only once it really rewrites its memory
        r = hv.migrate("lnx01", "hv01", "hv03", MigrationOptions())
        lines.append(f"one migration, 256 MiB TCG Linux guest dirtying 128 MiB: {r.seconds:.1f} s, "
                     f"downtime {r.downtime_ms:.0f} ms, {r.data_bytes / 2**20:.0f} MiB, {r.iterations} passes")
        names = [f"par{i}" for i in range(1, 5)]
        for n in names:
            add_guest(info, n, "hv01")
        t = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda n: hv.migrate(n, "hv01", "hv02" if n in ("par1", "par3") else "hv03",
                                                         MigrationOptions()), names))
        lines.append(f"four in parallel hv01 -> hv02/hv03: {time.monotonic() - t:.1f} s wall; each "
                     + ", ".join(f"{r.seconds:.1f} s/{r.downtime_ms:.0f} ms" for r in results))
        t = time.monotonic()
        reboot_host("hv01", down_seconds=3.0, workdir=workdir)
        lines.append(f"reboot_host hv01 (3 s down): {time.monotonic() - t:.1f} s until libvirtd and sshd answer")
    finally:
        hv.close()
        t = time.monotonic()
        lab_down(workdir)
        lines.append(f"lab down: {time.monotonic() - t:.1f} s")
    return lines


if __name__ == "__main__":
    for line in measure(Path(sys.argv[1] if len(sys.argv) > 1 else "/var/tmp/hostmaint-labtimings")):
        print(line)
