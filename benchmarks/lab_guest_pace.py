"""What a lab Linux guest costs the machine, paced or as fast as its vCPU goes (root; the real lab).

Not a test: builds a 2-host lab with no guests of its own, adds Linux guests that rewrite their 128 MiB,
one per pace asked (0: the unpaced loop), alternating hosts, lets them boot, then reads over the same
seconds each guest's QEMU CPU time (``/proc``'s utime + stime) and its dirty rate as QEMU measures it
(the libvirt driver's ``measure_dirty_rates``, what the scheduler sees). The suite's lab runs beside the
rest of the tests on two cores: a guest's CPU is taken from them.

  .venv/bin/python benchmarks/lab_guest_pace.py                # paces 0 and 48 (the lab's default)
  .venv/bin/python benchmarks/lab_guest_pace.py --paces 0 32 48 64 --seconds 20

HOSTMAINT_LAB_NET picks the lab net (default 3); the lab comes down at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("HOSTMAINT_LAB_NET", "3")

from hostmaint.lab.network import LAB_NET  # noqa: E402

WORKDIR = Path(f"/var/tmp/hostmaint-lab-pace-net{LAB_NET}")
BOOT_S = 45  # a TCG Linux guest boots in ~20-40 s beside a busy lab


def _qemu_cpu_s() -> dict[str, float]:
    """guest name -> CPU seconds its QEMU process has used so far."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if not args or not args[0].endswith(b"qemu-system-x86_64"):
            continue
        named = [a.decode() for a in args if a.startswith(b"guest=")]
        if not named:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[named[0].split("=", 1)[1].split(",", 1)[0]] = (int(fields[11]) + int(fields[12])) / tick
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--paces", type=int, nargs="+", default=[0, 48], help="MiB/s per guest; 0 = unpaced")
    ap.add_argument("--seconds", type=float, default=15.0, help="how long CPU and dirty rates are read")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("the lab needs root")

    from hostmaint.drivers.libvirt import LibvirtHypervisor
    from hostmaint.inventory import load_inventory
    from hostmaint.lab.lab import add_guest, lab_down, lab_up

    lab_down(WORKDIR)
    info = lab_up(hosts=2, vms=0, workdir=WORKDIR, linux_guests=0, host_memory_mib=1024)
    try:
        names = {}
        for i, pace in enumerate(args.paces):
            name = f"pace{i}-{pace:03d}"
            add_guest(info, name, ("hv01", "hv02")[i % 2], memory_mib=256, linux=True, dirty_mib_s=pace)
            names[name] = pace
        time.sleep(BOOT_S)
        hv = LibvirtHypervisor.from_inventory(load_inventory(info.inventory_path), "lab")
        load = os.getloadavg()[0]
        before, started = _qemu_cpu_s(), time.monotonic()
        rates: dict[str, list[float]] = {name: [] for name in names}
        while time.monotonic() - started < args.seconds:
            for host in ("hv01", "hv02"):
                for vm, rate in hv.measure_dirty_rates(host, seconds=2).items():
                    rates.setdefault(vm, []).append(rate)
        after, took = _qemu_cpu_s(), time.monotonic() - started
        hv.close()
    finally:
        lab_down(WORKDIR)
    print(f"lab Linux guests (128 MiB rewritten in a loop), {took:.0f} s read; load average at start {load:.1f} "
          f"on {os.cpu_count()} CPUs")
    print("| guest | pace MiB/s | QEMU CPU, % of a core | dirty rate MiB/s (QEMU, each 2 s reading) | "
          "MiB/s dirtied per % of a core |")
    print("|---|---|---|---|---|")
    for name, pace in names.items():
        cpu = 100 * (after.get(name, 0.0) - before.get(name, 0.0)) / took
        seen = rates.get(name, [])
        mean = sum(seen) / len(seen) if seen else 0.0
        print(f"| {name} | {pace or 'unpaced'} | {cpu:.0f} | {', '.join(f'{r:g}' for r in seen)} (mean {mean:.1f}) | "
              f"{mean / cpu if cpu else 0.0:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
