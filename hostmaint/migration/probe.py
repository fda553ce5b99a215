"""Measured dirty rates for a drain: what the scheduler orders, admits and throttles by."""

from __future__ import annotations

from collections.abc import Sequence

from hostmaint.drivers.base import DirtyRateProbe, Hypervisor
from hostmaint.errors import DriverError

DEFAULT_PROBE_SECONDS = 1.0  # QEMU samples whole seconds; a drain of minutes hardly feels one


def probe_dirty_rates(hypervisor: Hypervisor, hosts: Sequence[str], vms: Sequence[str],
                      seconds: float = DEFAULT_PROBE_SECONDS) -> tuple[dict[str, float], list[str]]:
    """MiB/s for each of ``vms`` on ``hosts``, measured now; and the notes of what could not be.

    A driver that cannot measure, or a host that fails to, leaves those rates unknown (0 to the
    scheduler: it then orders by size and admits by link alone); never a reason to stop a drain.
    """
    if not isinstance(hypervisor, DirtyRateProbe):
        return {}, ["this driver cannot measure dirty rates"]
    wanted = set(vms)
    rates: dict[str, float] = {}
    notes: list[str] = []
    for host in hosts:
        try:
            measured = hypervisor.measure_dirty_rates(host, seconds)
        except DriverError as exc:
            notes.append(f"{host}: dirty rates not measured: {exc}")
            continue
        rates.update({vm: rate for vm, rate in measured.items() if vm in wanted})
    missing = sorted(wanted - set(rates))
    if missing:
        notes.append(f"no dirty rate for {', '.join(missing)}")
    return rates, notes
