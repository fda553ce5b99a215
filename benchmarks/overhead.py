"""Orchestration overhead of a patch-host flow: wall time minus the time the hosts themselves took.

Host time is the union of the intervals spent inside driver calls (libvirt, SSH) and inside the
reboot wait (the host is rebooting, hostmaint only polls). Whatever is left — Prefect task and
flow bookkeeping, planning, audit writes, state transitions — is hostmaint's overhead, printed as
a share of the flow's wall time (the target is under 5 %).

    .venv/bin/python benchmarks/overhead.py            # on the real lab (root), 3 hosts
    .venv/bin/python benchmarks/overhead.py --simulated  # on the SIMULATED fleet (says so)

Prints a table; not a test.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


class Intervals:
    """Time intervals from several threads; their union is the time something was busy."""

    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] = []
        self.lock = threading.Lock()

    def timed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.monotonic()
            try:
                return fn(*args, **kwargs)
            finally:
                with self.lock:
                    self.spans.append((start, time.monotonic()))
        return wrapper

    def union(self) -> float:
        total, end = 0.0, float("-inf")
        for s, e in sorted(self.spans):
            if e <= end:
                continue
            total += e - max(s, end)
            end = e
        return total


class Timed:
    """A driver whose public methods are timed into ``intervals``."""

    def __init__(self, inner: Any, intervals: Intervals) -> None:
        self._inner = inner
        self._intervals = intervals

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        return self._intervals.timed(value) if callable(value) and not name.startswith("_") else value


def measure(inventory: Path, host: str) -> dict[str, float]:
    from flows.locks import ensure_limits
    from flows.patch_host import patch_host
    from hostmaint import maintenance
    from hostmaint.models import Trigger
    from hostmaint.runtime import open_runtime

    ensure_limits(inventory)
    rt = open_runtime(inventory, fresh=True)
    intervals = Intervals()
    rt.hypervisor = Timed(rt.hypervisor, intervals)  # type: ignore[assignment]
    rt.shell = Timed(rt.shell, intervals)  # type: ignore[assignment]
    original = maintenance.patching.reboot_and_wait
    maintenance.patching.reboot_and_wait = intervals.timed(original)  # type: ignore[attr-defined]
    try:
        start = time.monotonic()
        result = patch_host(host=host, operator="bench", reason="overhead benchmark", inventory=str(inventory),
                            trigger=Trigger.TEST)
        wall = time.monotonic() - start
    finally:
        maintenance.patching.reboot_and_wait = original  # type: ignore[attr-defined]
    busy = intervals.union()
    return {"wall_s": wall, "host_s": busy, "overhead_s": wall - busy, "share": (wall - busy) / wall,
            "migrations": float(len(result.migrations)), "rebooted": float(result.rebooted)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulated", action="store_true", help="the SIMULATED fleet instead of the lab")
    args = parser.parse_args()
    from prefect.testing.utilities import prefect_test_harness

    with tempfile.TemporaryDirectory() as tmp, prefect_test_harness(server_startup_timeout=120):
        os.environ["HOSTMAINT_DB"] = str(Path(tmp) / "bench.db")
        if args.simulated:
            from hostmaint.simulation import demo_packages, demo_snapshot, write_simulated_fleet

            snap = demo_snapshot(4, 12)
            # migrations take a fifth of their modelled seconds, so the run stays short
            inventory = write_simulated_fleet(Path(tmp) / "sim", snap, demo_packages(snap), time_scale=0.2)
            label, host = "SIMULATED fleet (4 hosts, 12 VMs)", "hv02"
            row = measure(inventory, host)
        else:
            from hostmaint.lab import lab_down, lab_up

            workdir = Path("/var/tmp/hostmaint-lab-overhead")
            info = lab_up(hosts=3, vms=6, workdir=workdir, linux_guests=1)
            try:
                label, host = "real lab (3 hosts, 6 SeaBIOS + 1 Linux guest)", "hv02"
                row = measure(info.inventory_path, host)
            finally:
                from hostmaint.runtime import close_all

                close_all()
                lab_down(workdir)
    print(f"\npatch-host {host} on the {label}")
    print("| wall s | host time s (libvirt, SSH, reboot wait) | overhead s | overhead share | migrations | rebooted |")
    print("|---|---|---|---|---|---|")
    print(f"| {row['wall_s']:.1f} | {row['host_s']:.1f} | {row['overhead_s']:.1f} | {row['share']:.1%} | "
          f"{int(row['migrations'])} | {'yes' if row['rebooted'] else 'no'} |")


if __name__ == "__main__":
    main()
