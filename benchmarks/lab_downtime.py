"""Downtime per migration on the real lab, several migrations in flight on one shared link (issue 22 item 1).

Not a test: builds a 3-host lab (root), puts Linux guests that rewrite their memory on hv01, shapes
hv01's link to a slow NIC (a token bucket: the migrations really share it), and drains hv01 to hv02
and hv03 with our executor and the real libvirt driver, in four modes, alternating, same lab, same
run; the guests come home with fixed 2 between drains. Downtime is libvirt's own (the completed
job's ``downtime``), per migration.

  .venv/bin/python benchmarks/lab_downtime.py                 # 3 rounds, 400 Mbit/s, 6 guests
  .venv/bin/python benchmarks/lab_downtime.py --rounds 2 --mbit 800 --stream 40 --limit 200

Modes: fixed 2 (QEMU's own limit), ours with QEMU's limit for every migration (before the downtime
rule), ours with each migration's limit from its link share and the model's 30 ms reserved for the
switch-over, ours with the reserve raised within a drain after a pause over the limit, ours as the flows
run it (each drain also starts from what the earlier drains of that mode learned, through the state
functions the flows use, on a state database of this run's own), and ours with the reserve set in the
inventory (``migration.switchover_ms``). HOSTMAINT_LAB_NET picks the lab net (default 2); the lab comes
down at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("HOSTMAINT_LAB_NET", "2")

from hostmaint.lab.network import LAB_NET  # noqa: E402
from hostmaint.migration.policy import QEMU_DOWNTIME_LIMIT_MS, SchedulerPolicy  # noqa: E402
from hostmaint.models import EvacuationPlan, Limits, MigrationOptions, Placement, StepOutcome  # noqa: E402

WORKDIR = Path(f"/var/tmp/hostmaint-lab-downtime-net{LAB_NET}")
MIB_PER_MBIT = 1 / 8 / 1.048576
# the flows' way: each drain starts from what the cluster's last drains learned (hostmaint.maintenance)
CARRIED = "ours now, starting from what the earlier drains learned (as the flows run it)"
LIMITS = Limits(migrations_per_source=3, migrations_per_target=4, migrations_per_cluster=8)


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f} (1 min) / {five:.1f} (5 min)"


def modes(link: float, stream: float, switchover_ms: float, limit_ms: int) -> dict[str, SchedulerPolicy]:
    """The policies compared, each told the link and the stream as the lab has them."""
    def ours(**kw: object) -> SchedulerPolicy:
        return SchedulerPolicy(stream_mib_s=stream, default_link_mib_s=link, **kw)  # type: ignore[arg-type]

    return {
        f"fixed 2 (QEMU's limit {limit_ms} ms)": SchedulerPolicy.fixed(2),
        f"ours, QEMU's limit {limit_ms} ms for every migration (before)": ours(downtime_aware=False),
        "ours, limit per migration, 30 ms reserved": ours(learn_switchover=False),
        "ours now (reserve learned in the drain)": ours(learn_switchover=True),
        CARRIED: ours(),
        f"ours now, migration.switchover_ms: {switchover_ms:g} in the inventory": ours(switchover_ms=switchover_ms),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--guests", type=int, default=6, help="Linux guests of 256 MiB on hv01")
    ap.add_argument("--mbit", type=float, default=400.0, help="hv01's link, Mbit/s")
    ap.add_argument("--queue-ms", type=int, default=20, help="the shaper's queue (a NIC ring's worth)")
    ap.add_argument("--stream", type=float, default=25.0, help="MiB/s one migration is taken to push")
    ap.add_argument("--dirty", type=int, default=4, help="MiB/s each guest rewrites (0: as fast as it can)")
    ap.add_argument("--switchover", type=float, default=150.0, help="the inventory's migration.switchover_ms row")
    ap.add_argument("--limit", type=int, default=None,
                    help="the configured downtime limit, ms (migration.downtime_limit_ms; default QEMU's 300)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (the lab)", file=sys.stderr)
        return 2

    from hostmaint.db import open_engine
    from hostmaint.drivers.libvirt import LibvirtHypervisor
    from hostmaint.lab import lab_down, lab_up
    from hostmaint.lab.lab import add_guest
    from hostmaint.lab.network import limit_egress
    from hostmaint.maintenance import keep_switchover, switchover_start_ms
    from hostmaint.migration import EventKind, drain
    from hostmaint.migration.probe import probe_dirty_rates
    from hostmaint.state import HostStateStore

    link = args.mbit * MIB_PER_MBIT
    options = MigrationOptions(downtime_limit_ms=args.limit)  # the fixed anchors get it as QEMU's limit
    policies = modes(link, args.stream, args.switchover, args.limit or QEMU_DOWNTIME_LIMIT_MS)
    home_mib = 256 * args.guests + 512
    state_db = Path(f"{WORKDIR}-state.db")  # this run's own: what earlier runs learned must not count
    for leftover in (state_db, Path(f"{state_db}-wal"), Path(f"{state_db}-shm")):
        leftover.unlink(missing_ok=True)
    states = HostStateStore(open_engine(f"sqlite:///{state_db}"))
    info = lab_up(hosts=3, vms=0, workdir=WORKDIR, linux_guests=0, host_memory_mib=(home_mib, home_mib, home_mib))
    hv = LibvirtHypervisor({h.name: info.plain_uri(h.name) for h in info.hosts})
    guests = [f"dt{i + 1}" for i in range(args.guests)]
    load_before = _load()
    try:
        for name in guests:
            add_guest(info, name, "hv01", memory_mib=256, linux=True, dirty_mib_s=args.dirty)
        time.sleep(20)  # the guests boot and start rewriting their memory
        limit_egress("hv01", link, queue_ms=args.queue_ms)

        def plan(moves: Sequence[tuple[str, str, str]]) -> EvacuationPlan:
            return EvacuationPlan(cluster="lab", hosts=tuple(sorted({s for _, s, _ in moves})),
                                  snapshot_digest="benchmark", placements=tuple(
                                      Placement(vm=vm, source=s, target=t, memory_mib=256, reason="benchmark")
                                      for vm, s, t in moves))

        away = [(vm, "hv01", "hv02" if i % 2 == 0 else "hv03") for i, vm in enumerate(guests)]

        def home() -> None:
            where = {vm: hv.locate(vm) for vm in guests}
            back = [(vm, w[0], "hv01") for vm, w in where.items() if w and w[0] != "hv01"]
            if back:
                report = drain(plan(back), hv, LIMITS, policy=SchedulerPolicy.fixed(2))
                assert report.ok, report.failed

        rows: dict[str, list[tuple[float, bool]]] = {m: [] for m in policies}
        seconds: dict[str, list[float]] = {m: [] for m in policies}
        in_flight: dict[str, int] = {m: 0 for m in policies}
        reserves: dict[str, list[float]] = {m: [] for m in policies}
        retuned: dict[str, int] = {m: 0 for m in policies}  # migrations whose limit the drain lowered in flight
        lost = 0
        outcomes: dict[str, list[str]] = {m: [] for m in policies}
        names = list(policies)
        # a warm-up drain, not counted: the first migrations after an up are slower (QEMU start-up, connections)
        drain(plan(away), hv, LIMITS, policy=SchedulerPolicy.fixed(2))
        home()
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]  # each mode in each position in turn
            for mode in order:
                rates, _ = probe_dirty_rates(hv, ["hv01"], guests, seconds=1)
                policy = policies[mode]
                if mode == CARRIED:
                    policy = replace(policy, switchover_ms=switchover_start_ms(
                        states, "lab", policy.switchover_ms, options.downtime_limit_ms or QEMU_DOWNTIME_LIMIT_MS))
                report = drain(plan(away), hv, LIMITS, policy=policy, dirty_rate=rates, options=options,
                               bandwidth_mib_s={"hv01": link})
                if mode == CARRIED:
                    keep_switchover(states, "lab", policy, report, None)
                lost += sum(1 for x in report.results if hv.locate(x.vm) not in ((x.source,), (x.target,)))
                home()
                raised = {e.vm for e in report.events if e.kind is EventKind.ESCALATED}
                lowered = {e.vm for e in report.events if e.kind is EventKind.RETUNED and "error" not in e.detail}
                for x in report.results:
                    if x.outcome is StepOutcome.OK and x.downtime_ms is not None:
                        rows[mode].append((x.downtime_ms, x.vm in raised))
                        retuned[mode] += x.vm in lowered
                outcomes[mode] += [f"{x.vm} {x.outcome.value}: {x.error}" for x in report.results
                                   if x.outcome is not StepOutcome.OK]
                seconds[mode].append(report.seconds)
                in_flight[mode] = max(in_flight[mode], report.max_concurrency)
                reserves[mode] += [float(e.detail["switchover_reserve_ms"]) for e in report.events
                                   if e.kind is EventKind.STARTED and "switchover_reserve_ms" in e.detail]
    finally:
        limit_egress("hv01", None)
        load_after = _load()
        lab_down(WORKDIR)

    limit = args.limit or QEMU_DOWNTIME_LIMIT_MS
    print(f"Measured by `.venv/bin/python benchmarks/lab_downtime.py --rounds {args.rounds} --guests {args.guests} "
          f"--mbit {args.mbit:g} --queue-ms {args.queue_ms}"
          f"{f' --limit {args.limit}' if args.limit else ''}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"lab net {LAB_NET}; load {load_before} before, {load_after} after.")
    print()
    print(f"hv01's link shaped to {args.mbit:g} Mbit/s ({link:.1f} MiB/s, queue {args.queue_ms} ms); "
          f"{args.guests} × 256 MiB Linux guests (TCG) rewriting 128 MiB at "
          f"{f'{args.dirty} MiB/s' if args.dirty else 'full speed'}; drained to hv02/hv03 within "
          f"{LIMITS.migrations_per_source} per source; the policy's stream {args.stream:g} MiB/s; limit {limit} ms.")
    print()
    print("| mode | downtime ms (each; * = escalated, its limit raised by choice) | p50 | max | over "
          f"{limit} ms (not escalated) | in flight at most | drain s (mean) | reserve ms at start "
          "| limits lowered in flight |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in names:
        pauses = rows[mode]
        plain = [p for p, esc in pauses if not esc]
        each = ", ".join(f"{p:.0f}{'*' if esc else ''}" for p, esc in pauses)
        over = sum(1 for p in plain if p > limit)
        p50 = statistics.median(p for p, _ in pauses) if pauses else float("nan")
        top = max((p for p, _ in pauses), default=float("nan"))
        mean_s = statistics.mean(seconds[mode]) if seconds[mode] else float("nan")
        learns = policies[mode].adaptive and policies[mode].downtime_aware and policies[mode].learn_switchover
        span = (f"{min(reserves[mode]):.0f}-{max(reserves[mode]):.0f}" if reserves[mode] and learns else "-")
        print(f"| {mode} | {each} | {p50:.0f} | {top:.0f} | {over} of {len(plain)} | {in_flight[mode]} "
              f"| {mean_s:.1f} | {span} | {retuned[mode] if learns else '-'} |")
    print()
    for mode in names:
        if outcomes[mode]:
            print(f"- {mode}: did not move: {'; '.join(outcomes[mode])}")
    print(f"VMs lost (running on neither or both hosts after a drain): {lost}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
