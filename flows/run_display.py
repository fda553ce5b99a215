"""How a run shows in the Prefect UI: a name that says what it does and to what, tags to filter on,
and a state of its own when a human said no.

Prefect names runs with random words ("huge-snail") and ends every run that returns as green
*Completed*: in the runs list an evacuation of hv01 looked like a rejected one of hv03. Each flow
calls :func:`label_run` once it knows its host or cluster; the runbooks end a rejection with
:func:`rejected`.
"""

from __future__ import annotations

import logging
from uuid import UUID

import httpx
from prefect import runtime
from prefect.client.schemas.objects import State
from prefect.exceptions import CancelledRun
from prefect.states import Cancelled

from flows.common import HostOutcome, publish_report
from hostmaint.display import visible
from hostmaint.models import EvacuationPlan
from tasks.common import RuntimeRef, root_run_id

log = logging.getLogger(__name__)

REJECTED = "Rejected"  # the state's name in the UI (of type Cancelled: grey, not green)
SIMULATED_TAG = "simulated"


def run_name(action: str, target: str, *, dry_run: bool = False, simulated: bool = False) -> str:
    """``evacuate hv01``, ``patch window demo (dry run, simulated)``."""
    notes = [note for note, on in (("dry run", dry_run), ("simulated", simulated)) if on]
    return f"{action} {target}" + (f" ({', '.join(notes)})" if notes else "")


def run_tags(host: str | None, cluster: str | None, simulated: bool) -> list[str]:
    """``host:<name>``, ``cluster:<name>`` and ``simulated`` as they apply."""
    tags = [f"host:{host}"] if host else []
    tags += [f"cluster:{cluster}"] if cluster else []
    return tags + ([SIMULATED_TAG] if simulated else [])


def label_run(action: str, inventory: str, *, host: str | None = None, cluster: str | None = None,
              dry_run: bool = False) -> None:
    """Name the current flow run after ``action`` and its host (else cluster), and tag it with both.

    The cluster of ``host`` comes from the inventory, and a SIMULATED inventory marks the name and
    the tags. Outside a flow run it does nothing. The labels are a view: if the server cannot take
    them the run goes on (logged), since a name is not worth failing maintenance for.
    """
    run_id = runtime.flow_run.id
    if not run_id:
        return
    rt = RuntimeRef(inventory).open()
    known = {h.name: h.cluster for h in rt.inventory.hosts}
    cluster = cluster or (known.get(host) if host else None)
    target = host or cluster or "?"
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectException

    name = run_name(action, target, dry_run=dry_run, simulated=rt.simulated)
    try:
        with get_client(sync_client=True) as client:
            tags = client.read_flow_run(run_id).tags
            new = [t for t in run_tags(host, cluster, rt.simulated) if t not in tags]
            client.update_flow_run(run_id, name=name, tags=[*tags, *new])
    except (PrefectException, httpx.HTTPError, OSError) as exc:
        log.warning("could not name run %s %r: %s", run_id, action, exc)
        return
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is not None and context.flow_run is not None:
        context.flow_run.name = name  # this process's log lines name the run as the UI does (as flow_run_name would)


class PlanRejected(CancelledRun):
    """A run ended because its plan was not approved; ``outcome`` says what was left as it was.

    What calling such a flow directly raises (``return_state=True`` gives the *Rejected* state).
    """

    def __init__(self, outcome: HostOutcome) -> None:
        super().__init__(outcome.detail)
        self.outcome = outcome


def rejected(outcome: HostOutcome) -> State:
    """The final state of a run whose plan a human (or the approval timeout) did not approve:
    of type Cancelled, named *Rejected*, the outcome's detail as its message."""
    return Cancelled(name=REJECTED, message=outcome.detail, data=PlanRejected(outcome))


def running_again_after_pause_timeout() -> None:
    """Mark the current run Running again after its pause for approval timed out.

    The server keeps such a run Paused and turns whatever final state it then reports into Failed
    ("The flow was ... and never resumed"); but the run goes on (it records that nobody approved and
    leaves the host as the runbook says), and it should end *Rejected* like any "no". Forced: the
    server refuses every other way out of an expired pause.
    """
    run_id = runtime.flow_run.id
    if not run_id:
        return
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, Running(message="no answer in time: treated as not approved"),
                                  force=True)


def plan_rows(plan: EvacuationPlan) -> list[dict[str, object]]:
    """The plan as table rows: one per VM (moved, blocked, or handled by its policy), with why."""
    rows: list[dict[str, object]] = [
        {"vm": visible(p.vm), "from": visible(p.source), "to": visible(p.target),
         "cells": ",".join(map(str, p.target_cells)) or "-", "NUMA": "local" if p.numa_local else "spread",
         "memory MiB": p.memory_mib, "why": visible(p.reason)} for p in plan.placements]
    rows += [{"vm": visible(b.vm), "from": visible(b.host), "to": "BLOCKED", "cells": "-", "NUMA": "-",
              "memory MiB": "", "why": visible(f"{b.constraint}: {b.reason}" + (f"; {b.hint}" if b.hint else ""))}
             for b in plan.blocked]
    rows += [{"vm": visible(a.vm), "from": visible(a.host), "to": a.action.value, "cells": "-", "NUMA": "-",
              "memory MiB": "", "why": visible(a.reason)} for a in plan.vm_actions]
    return rows


def publish_plan(plan: EvacuationPlan, host: str) -> None:
    """The plan as a table artifact on this run and, for a subflow, on the run the operator opened.

    A form's run (evacuate-on-request) or a runbook hands the work to a subflow; the UI links to the
    parent, so the plan is shown there too rather than one click away.
    """
    from prefect.artifacts import TableArtifact, create_table_artifact

    rows = plan_rows(plan)
    description = f"plan for {host}: {len(plan.placements)} move(s), {len(plan.blocked)} blocked"
    create_table_artifact(rows, key=f"plan-table-{_slug(host)}", description=description)
    root = _root_run()
    if root is not None:
        TableArtifact(table=rows, description=description, flow_run_id=root).create()


def _slug(name: str) -> str:
    # an artifact key: lowercase letters, digits and dashes
    return "".join(c if c.isascii() and c.isalnum() else "-" for c in name.lower())


def _root_run() -> UUID | None:
    """The run at the top of this one's tree, when this run is a subflow of it."""
    run_id, root = runtime.flow_run.id, root_run_id()
    return UUID(str(root)) if root and str(root) != str(run_id) else None


def shown_here(title: str, outcome: HostOutcome) -> HostOutcome:
    """Publish a subflow's outcome as this run's summary too, and return it: the UI sends whoever
    submitted a form (or opens a runbook) to this run, which held only three log lines."""
    publish_report(title, [outcome])
    return outcome
