"""CLI output read by a pipe or a log is complete (issue 18): tables are not cut to 80 columns and
messages on stderr are not wrapped mid-sentence. Run as a real process with its output piped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hostmaint.audit import AuditTrail
from hostmaint.db import open_engine
from hostmaint.maintenance import RunContext, audited
from hostmaint.runtime import open_runtime

LONG_REASON = "INC-4711 replace the failed DIMM B2 on the second riser after the vendor's engineer arrives"


def hostmaint(*args: str, db: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | {"HOSTMAINT_DB": str(db)}
    return subprocess.run([sys.executable, "-m", "hostmaint_cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_tables_in_a_pipe_are_not_cut(sim_inventory: Path, hostmaint_db: Path) -> None:
    rt = open_runtime(sim_inventory, fresh=True)
    rt.states.set_aside("hv01", LONG_REASON, "r1")
    operator = "alice.longname@ops.example.com"
    with audited(rt, RunContext(flow="evacuate-on-request", operator=operator, reason=LONG_REASON),
                 "operator-cordon", host="hv01"):
        pass

    status = hostmaint("host", "status", "-i", str(sim_inventory), db=hostmaint_db)
    shown = hostmaint("audit", "show", db=hostmaint_db)

    assert status.returncode == 0, status.stderr
    assert LONG_REASON in status.stdout and "…" not in status.stdout
    assert shown.returncode == 0, shown.stderr
    assert operator in shown.stdout and "evacuate-on-request" in shown.stdout and "…" not in shown.stdout
    assert len(AuditTrail(open_engine()).records()) == 1


def test_an_error_on_stderr_is_one_line(sim_inventory: Path, hostmaint_db: Path) -> None:
    refused = hostmaint("host", "uncordon", "hv99-" + "x" * 60, "-i", str(sim_inventory), db=hostmaint_db)
    assert refused.returncode == 2
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), refused.stderr
