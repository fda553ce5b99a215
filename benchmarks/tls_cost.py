"""What migration TLS costs (issue 20): the same lab drains, TLS on and off, alternating, in one run.

Not a test: prints a markdown table. Called by ``benchmarks/drain.py --lab`` on its lab (the "TLS
on/off" rows), or alone on a 2-host TLS lab of its own (root):

  HOSTMAINT_LAB_NET=3 .venv/bin/python benchmarks/tls_cost.py [--rounds 3]

Both modes send the memory on the migration network to the target's migration address; they differ
only in ``VIR_MIGRATE_TLS``. Per round: a serial drain (one at a time: each migration's own stream
rate) and a drain of two at a time, TLS off then on (then on then off the next round); the guests go
back in plain TCP between drains. The ratio of stream rates is what the what-if simulator and the drain
scheduler take as TLS's cost (``SchedulerPolicy.tls_stream_factor``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hostmaint.migration import drain  # noqa: E402
from hostmaint.migration.policy import MIB, SchedulerPolicy  # noqa: E402
from hostmaint.migration.transport import Route  # noqa: E402
from hostmaint.models import EvacuationPlan, Limits, MigrationResult, Placement, StepOutcome  # noqa: E402

WORKDIR = Path("/var/tmp/hostmaint-tls-bench")


def _plan(guests: Sequence[str], memory: dict[str, int], src: str, dst: str) -> EvacuationPlan:
    return EvacuationPlan(cluster="lab", hosts=(src,), snapshot_digest="benchmark", placements=tuple(
        Placement(vm=vm, source=src, target=dst, memory_mib=memory[vm], reason="benchmark") for vm in guests))


def _fit(results: Sequence[MigrationResult], big_mib: float = 32.0) -> tuple[float, float]:
    """(set-up s, stream MiB/s) of a serial drain: QEMU skips zero pages, so a near-empty guest's time is
    the per-migration set-up; a guest that sends a lot streams at (MiB sent) ÷ (its time − set-up)."""
    ok = [r for r in results if r.outcome is StepOutcome.OK and r.seconds > 0]
    small = [r.seconds for r in ok if r.data_bytes / MIB < big_mib]
    setup = statistics.median(small) if small else 0.0
    rates = [r.data_bytes / MIB / (r.seconds - setup) for r in ok
             if r.data_bytes / MIB >= big_mib and r.seconds > setup]
    return setup, statistics.median(rates) if rates else float("nan")


def tls_rows(info: object, hv: object, guests: Sequence[str], memory: dict[str, int],
             rounds: int = 2) -> tuple[list[str], float, float]:
    """Drain ``guests`` hv01 → hv02 with TLS off and on, alternating; the table lines, the measured
    stream-rate factor (TLS ÷ plain) and the extra set-up seconds of a TLS migration. ``info`` is a TLS
    lab's LabInfo, ``hv`` a LibvirtHypervisor."""
    mig = {h.name: h.migration_ip for h in info.hosts}  # type: ignore[attr-defined]
    limits = Limits(migrations_per_source=8, migrations_per_target=8, migrations_per_cluster=8)

    def route(tls: bool) -> Callable[[str, str], Route]:
        return lambda s, t: Route(s, t, tls=tls, address=mig[t])

    def back() -> None:
        report = drain(_plan(guests, memory, "hv02", "hv01"), hv, limits, policy=SchedulerPolicy.fixed(2),  # type: ignore[arg-type]
                       route=route(False))
        assert report.ok, report.failed

    wall: dict[str, list[float]] = {f"{mode}, {tls}": [] for mode in ("serial", "2 at a time")
                                    for tls in ("TLS off", "TLS on")}
    streams: dict[str, list[float]] = {"TLS off": [], "TLS on": []}
    setups: dict[str, list[float]] = {"TLS off": [], "TLS on": []}
    downtime: dict[str, list[float]] = {"TLS off": [], "TLS on": []}
    lost = 0
    for i in range(rounds):
        for tls in ((False, True) if i % 2 == 0 else (True, False)):
            name = "TLS on" if tls else "TLS off"
            for mode, policy in (("serial", SchedulerPolicy.fixed(1)), ("2 at a time", SchedulerPolicy.fixed(2))):
                started = time.monotonic()
                report = drain(_plan(guests, memory, "hv01", "hv02"), hv, limits, policy=policy,  # type: ignore[arg-type]
                               route=route(tls))
                wall[f"{mode}, {name}"].append(time.monotonic() - started)
                assert all(r.tls is tls for r in report.results if r.outcome is StepOutcome.OK), report.results
                lost += sum(1 for r in report.results
                            if hv.locate(r.vm) not in ((r.source,), (r.target,)))  # type: ignore[attr-defined]
                if mode == "serial":
                    setup, stream = _fit(report.results)
                    setups[name].append(setup)
                    streams[name].append(stream)
                    downtime[name] += [r.downtime_ms for r in report.results if r.downtime_ms is not None]
                back()
    plain = statistics.mean(wall["serial, TLS off"])
    factor = statistics.median(streams["TLS on"]) / statistics.median(streams["TLS off"])
    extra_setup = statistics.median(setups["TLS on"]) - statistics.median(setups["TLS off"])
    lines = ["| mode | wall s (each round) | mean s | ÷ serial, TLS off | set-up s / stream MiB/s (serial) | "
             "downtime ms (median) |", "|---|---|---|---|---|---|"]
    for name, times in wall.items():
        tls = name.split(", ")[1]
        serial = name.startswith("serial")
        fit = ", ".join(f"{a:.1f} / {b:.0f}" for a, b in zip(setups[tls], streams[tls], strict=True)) if serial else ""
        down = f"{statistics.median(downtime[tls]):.0f}" if serial and downtime[tls] else ""
        lines.append(f"| {name} | {', '.join(f'{t:.1f}' for t in times)} | {statistics.mean(times):.1f} | "
                     f"{statistics.mean(times) / plain:.2f} | {fit} | {down} |")
    lines += ["", f"- TLS's cost, from the serial passes: a stream runs at **{factor:.2f}×** the plain rate (guests "
                  f"sending ≥ 32 MiB, after the set-up a near-empty guest takes) and a migration's set-up takes "
                  f"**{extra_setup:+.1f} s** (TLS handshakes of QEMU's connection). VMs lost (running on neither or "
                  f"both hosts): {lost}."]
    return lines, factor, extra_setup


def main(argv: Sequence[str] | None = None) -> int:
    from hostmaint.drivers.libvirt import LibvirtHypervisor, MonitorSettings
    from hostmaint.lab import lab_down, lab_up
    from hostmaint.lab.lab import add_guest
    from hostmaint.lab.network import LAB_NET

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    workdir = Path(f"{WORKDIR}-net{LAB_NET}")
    info = lab_up(hosts=2, vms=4, workdir=workdir, linux_guests=0, tls=True, host_memory_mib=2048)
    hv = LibvirtHypervisor({h.name: info.plain_uri(h.name) for h in info.hosts},
                           monitor=MonitorSettings(poll_interval_s=0.2))
    try:
        for i in (1, 2):
            add_guest(info, f"lnx{i:02d}", "hv01", memory_mib=256, linux=True, dirty_mib=32, dirty_mib_s=0)
        memory = {v.name: v.memory_mib for v in info.vms} | {"lnx01": 256, "lnx02": 256}
        guests = sorted(vm for vm in hv.running_vms("hv01"))
        deadline = time.monotonic() + 240
        for g in ("lnx01", "lnx02"):  # measured once their memory holds data, not zero pages
            console = workdir / "guests" / f"{g}.console"
            while "first pass done" not in console.read_text(errors="replace"):
                if time.monotonic() > deadline:
                    raise SystemExit(f"{g} did not start rewriting its memory")
                time.sleep(0.5)
        lines, _, _ = tls_rows(info, hv, guests, memory, args.rounds)
    finally:
        hv.close()
        lab_down(workdir)
    print(f"2-host TLS lab (KVM: {info.kvm}), hv01 → hv02: {', '.join(guests)}; "
          f"{args.rounds} rounds, modes alternating, same lab, same run.\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
