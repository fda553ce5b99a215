"""A long audit trail: what settling earlier moves costs a drain, a return or a rebalance.

Every drain, return and rebalance first settles what dead runs left (``settle_earlier_moves``): it
reads the cluster's migration records. The trail keeps every record of every maintenance, so at a
site of thousands of hosts it grows by hundreds of thousands of records a month. This measures one
call of ``settle_earlier_moves`` on a SIMULATED 4-host cluster whose database holds a synthetic
history of N records (maintenances of 10 clusters' hosts: a ``moves-started`` of 30 moves, its 30
``migrate`` records, and the maintenance's other steps), all spoken for, so the call finds nothing to
do and its time is the reading. The same measurement runs against two checkouts in one run, in fresh
processes, alternating: this one and a baseline (by default the commit before the reads were
filtered in the database), checked out with ``git worktree``. Printed: the p50 wall time of both, the
ratio new ÷ baseline, and peak memory. The history is inserted as rows, chained as ``append`` chains
them (appending 400,000 records one transaction each would take most of the run).

The same trail also measures ``hostmaint audit verify``'s walk (``AuditTrail.verify``): it held every
record in memory; now it streams them.

    .venv/bin/python benchmarks/audit_scale.py [--sizes 10000,100000,400000] [--repeats 3] [--baseline-rev REV]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE_REV = "9f993f8"  # the trail read whole and filtered in Python

# runs in a fresh interpreter with the checkout under test first on sys.path
MEASURE = r"""
import json, sys, time
from pathlib import Path
from hostmaint import maintenance as steps
from hostmaint.runtime import open_runtime
rt = open_runtime(sys.argv[1], fresh=True)
run = steps.RunContext(flow="rebalance-cluster", reason="benchmark")
t0 = time.perf_counter()
if sys.argv[2] == "settle":
    found = len(steps.settle_earlier_moves(rt, run, "demo"))
else:
    report = rt.audit.verify()
    found = 0 if report.ok else 1
wall = time.perf_counter() - t0
# VmHWM, not ru_maxrss: that one counts the parent's pages from before the exec (the history it built)
hwm_kib = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmHWM:"))
print(json.dumps({"wall_s": wall, "found": found, "maxrss_mib": hwm_kib / 1024}))
"""


def build(workdir: Path, records: int) -> tuple[Path, Path]:
    """A simulated demo cluster (its inventory) and a database holding ``records`` synthetic records."""
    sys.path.insert(0, str(ROOT))
    import sqlalchemy as sa

    from hostmaint.audit import GENESIS_HASH, canonical_json, record_hash
    from hostmaint.db import audit_table, open_engine
    from hostmaint.simulated_fleet import demo_packages, demo_snapshot, write_simulated_fleet

    snap = demo_snapshot(4, 12)
    inventory = write_simulated_fleet(workdir / "fleet", snap, demo_packages(snap), time_scale=0.001)
    db = workdir / "hostmaint.db"
    engine = open_engine(f"sqlite:///{db}")
    other = ("cordon", "plan", "update-started", "update", "reboot", "verify", "uncordon")
    rows: list[dict[str, object]] = []
    seq = 0
    prev_hash = GENESIS_HASH
    maintenance = 0
    while seq < records:
        cluster = "demo" if maintenance % 10 == 0 else f"c{maintenance % 10}"
        host, run = f"h{maintenance % 300:03d}", f"run-{maintenance}"
        moves = [{"vm": f"vm-{maintenance}-{i}", "source": host, "target": f"h{(maintenance + i) % 300:03d}"}
                 for i in range(30)]
        batch = [("moves-started", None, {"moves": moves})]
        batch += [("migrate", m["vm"], {"target": m["target"]}) for m in moves]
        batch += [(step, None, {}) for step in other]
        for step, vm, inputs in batch:
            seq += 1
            fields: dict[str, object] = dict(
                seq=seq, time="2026-11-01T00:00:00+00:00", run_id=run, flow="patch-host", trigger="schedule",
                operator="ops", cluster=cluster, host=host, vm=vm, step=step, inputs=inputs, outcome="ok",
                duration_s=1.0, details={"note": "synthetic history"}, prev_hash=prev_hash)
            fields["hash"] = prev_hash = record_hash(fields)
            rows.append({**fields, "inputs": canonical_json(inputs),
                         "details": canonical_json(fields["details"])})
        maintenance += 1
    with engine.begin() as conn:
        for i in range(0, len(rows), 5000):
            conn.execute(sa.insert(audit_table), rows[i:i + 5000])
    engine.dispose()
    return inventory, db


def measure(checkout: Path, inventory: Path, db: Path, what: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(checkout), "HOSTMAINT_DB": str(db)}
    out = subprocess.run([sys.executable, "-c", MEASURE, str(inventory), what], env=env, cwd=checkout,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,400000")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline-rev", default=BASELINE_REV)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="hostmaint-audit-scale-") as tmp:
        base = Path(tmp) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.baseline_rev], cwd=ROOT,
                       check=True, capture_output=True)
        try:
            print(f"baseline {args.baseline_rev}, load average {os.getloadavg()[0]:.1f}")
            print("| records in the trail | measure | baseline s (p50) | now s (p50) | now ÷ baseline | "
                  "baseline peak MiB | now peak MiB |")
            print("|---|---|---|---|---|---|---|")
            for size in (int(s) for s in args.sizes.split(",")):
                work = Path(tmp) / f"n{size}"
                work.mkdir()
                inventory, db = build(work, size)
                for what, label in (("settle", "settle_earlier_moves"), ("verify", "audit verify")):
                    old: list[dict[str, float]] = []
                    new: list[dict[str, float]] = []
                    for _ in range(args.repeats):  # alternating: both sides share the machine's load
                        old.append(measure(base, inventory, db, what))
                        new.append(measure(ROOT, inventory, db, what))
                    # settle: the history is all spoken for; verify: the chain is intact
                    assert {r["found"] for r in old + new} == {0}, (what, old, new)
                    o = statistics.median(r["wall_s"] for r in old)
                    n = statistics.median(r["wall_s"] for r in new)
                    print(f"| {size:,} | {label} | {o:.3f} | {n:.3f} | {n / o:.3f} | "
                          f"{max(r['maxrss_mib'] for r in old):.0f} | {max(r['maxrss_mib'] for r in new):.0f} |",
                          flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False,
                           capture_output=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
