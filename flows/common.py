"""What the flows share: run identity, the inventory parameter, and the artifacts a run ends with."""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from typing import Annotated

from prefect import runtime
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, Field

from flows.provenance import started_by
from hostmaint.display import markdown_code, markdown_text, visible
from hostmaint.maintenance import RunContext
from hostmaint.models import HostState, MigrationResult, StepOutcome, Trigger
from hostmaint.window_schedule import HOSTS_AT_ONCE_MAX, WINDOW_MINUTES_MAX

# The flows' own numbers, bounded where they are declared: Prefect checks a run's parameters against
# them before the flow's body starts (a bad one fails the run with nothing changed, naming it) and the
# UI's run form shows them as its minimum and maximum. No inf or nan: a window of .inf minutes or a
# lock wait of nan would never end, and a negative count was quietly read as another.
ExactBudget = Annotated[float, Field(
    ge=0, le=600, allow_inf_nan=False, title="Exact planning budget",
    description="Deterministic seconds (about a second of CPU each) the planner's exact stage (CP-SAT) may spend "
                "proving the plan best or a drain impossible. 0: greedy only. Raise it when a plan says it "
                "found no placement within its budget.")]
HostsAtOnce = Annotated[int, Field(ge=1, le=HOSTS_AT_ONCE_MAX)]
FailedHosts = Annotated[int, Field(ge=0)]
Moves = Annotated[int, Field(ge=0)]  # a budget past the VMs plans as one of every VM (placement/rebalance.py)
WaitSeconds = Annotated[float, Field(ge=0, le=7 * 24 * 3600, allow_inf_nan=False)]  # a lock's, at most a week
WindowMinutes = Annotated[float, Field(gt=0, le=WINDOW_MINUTES_MAX, allow_inf_nan=False)]  # at most a week
WithinPct = Annotated[float, Field(ge=0, lt=100, allow_inf_nan=False)]
ApprovalSeconds = Annotated[int, Field(ge=1, le=30 * 24 * 3600)]  # at most 30 days
PollSeconds = Annotated[int, Field(ge=1, le=3600)]


def default_inventory() -> str:
    """The inventory a flow uses when none is given: $HOSTMAINT_INVENTORY, else ./inventory.yaml."""
    return os.environ.get("HOSTMAINT_INVENTORY", "inventory.yaml")


def run_context(flow: str, trigger: Trigger | str, operator: str, reason: str,
                window_id: str | None = None) -> RunContext:
    """Identify this run for the audit trail: the Prefect flow run id when there is one, and what
    started it as the server recorded it (flows/provenance.py), else ``trigger``."""
    run_id = runtime.flow_run.id or str(uuid.uuid4())
    return RunContext(run_id=str(run_id), flow=flow, trigger=started_by(Trigger(trigger)),
                      operator=operator or "unknown",
                      reason=reason, window_id=window_id)


class HostOutcome(BaseModel):
    """How maintenance of one host ended; what a flow returns and reports."""

    host: str
    outcome: StepOutcome
    state: HostState | None = None  # None: the run is not one host's (a rebalance's cluster)
    detail: str = ""
    migrations: list[MigrationResult] = Field(default_factory=list)
    rebooted: bool = False
    packages_changed: int = 0
    simulated: bool = False
    seconds: float = 0.0


def publish_report(title: str, outcomes: Sequence[HostOutcome], *, key: str | None = None) -> None:
    """End a run with a markdown summary per host and a table of every migration.

    Host names, states and details are data (a detail quotes host output): escaped, they cannot end
    a cell or a row, nor open a link, HTML or code in the UI (:func:`~hostmaint.display.markdown_text`).
    """
    sim = any(o.simulated for o in outcomes)
    lines = [f"# {markdown_text(title)}", ""]
    if sim:
        lines += ["> **SIMULATED fleet** — no real host was touched.", ""]
    lines += ["| host | outcome | state | rebooted | packages | seconds | detail |",
              "|---|---|---|---|---|---|---|"]
    in_full = []  # a multi-line detail (a dry run's plan) is shown whole below the table, not cut in a cell
    for o in outcomes:
        first, _, rest = o.detail.partition("\n")
        shown = first[:200] + (" (in full below)" if rest or len(first) > 200 else "")
        lines.append(f"| {markdown_text(o.host)} | {o.outcome.value} | {markdown_text(o.state or '-')} | "
                     f"{'yes' if o.rebooted else 'no'} | {o.packages_changed} | {o.seconds:.1f} | "
                     f"{markdown_text(shown)} |")
        if shown != first:
            in_full += ["", f"## {markdown_text(o.host)}", "", markdown_code(o.detail)]
    create_markdown_artifact("\n".join(lines + in_full), key=key, description=title)
    # the UI shows a table artifact's values as text: only what would not show needs escaping
    rows = [{"vm": visible(m.vm), "from": visible(m.source), "to": visible(m.target), "seconds": round(m.seconds, 2),
             "downtime_ms": m.downtime_ms, "outcome": m.outcome.value}
            for o in outcomes for m in o.migrations]
    if rows:
        create_table_artifact(rows, key=f"{key}-migrations" if key else None, description="migrations")
