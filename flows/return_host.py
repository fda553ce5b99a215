"""return-host: the way back after an evacuation — verify → uncordon → return the VMs (or rebalance).

evacuate-host leaves its host drained, inside a maintenance: ``hostmaint host uncordon`` refuses it,
since only a host verified in its maintenance goes back into service. This flow finishes that
maintenance without patching: the host is proven empty, verified (libvirtd answers, the running
kernel is its boot default, else the newest installed, the host's own checks), VMs the evacuation shut down start again,
and it returns to the state it had before (an operator's cordon stays). Then its VMs come back to it
from wherever they went, or the cluster is levelled, or nothing moves.
"""

from __future__ import annotations

import time
from enum import StrEnum

from prefect import flow, get_run_logger

from flows import locks
from flows.cancel import stand_down_hook, stops_safely
from flows.common import HostOutcome, Moves, WaitSeconds, default_inventory, publish_report, run_context
from flows.rebalance_cluster import rebalance_cluster
from flows.run_display import label_run
from hostmaint.errors import InputError
from hostmaint.hooks import HookPoint
from hostmaint.models import HostState, MigrationResult, StepOutcome, Trigger
from tasks import integrations as ti
from tasks import maintenance as t
from tasks.common import RuntimeRef


class AfterReturn(StrEnum):
    """What moves once the host is back in service."""

    RETURN_VMS = "return-vms"  # each VM the evacuation moved goes back to the host
    REBALANCE = "rebalance"  # level the cluster (returning VMs home first where that levels it)
    NOTHING = "nothing"


@flow(name="return-host", log_prints=True, on_cancellation=[stand_down_hook])
@stops_safely  # Cancel stops it safely: the host keeps a true state, returns in flight stop (flows/cancel.py)
def return_host(host: str, operator: str = "unknown", reason: str = "evacuation over",
                then: AfterReturn = AfterReturn.RETURN_VMS, max_moves: Moves = 10, inventory: str | None = None,
                trigger: Trigger = Trigger.UI, lock_wait_s: WaitSeconds | None = 60) -> HostOutcome:
    """End the evacuation of ``host``: verify it, put it back as it was before, then ``then``.

    A host that is already in service is left alone (skipped), but for the VMs still away from it
    when ``then`` returns them (a return that died after its uncordon). A host in any state but drained (or
    verifying, a return that died half way) is refused before anything changes, naming its state:
    a patch, a failure or an incident's cordon each has its own way back.

    The evacuation's hooks and silence end here (docs/integrations.md): ``post_verify`` hooks run once
    the host is verified (a failure leaves it verifying, with the reason; running this again verifies
    it again), the silence the evacuation left ends once the host is back in service, and
    ``post_maintenance`` hooks run at the end.
    """
    started = time.monotonic()
    ref = RuntimeRef(inventory or default_inventory())
    rt = ref.open()
    run = run_context("return-host", trigger, operator, reason)
    cluster = rt.cluster_of(host)
    label_run("return", ref.inventory, host=host, cluster=cluster)
    logger = get_run_logger()

    def outcome(result: StepOutcome, detail: str, migrations: list[MigrationResult] | None = None) -> HostOutcome:
        return HostOutcome(host=host, outcome=result, state=rt.states.state(host), detail=detail,
                           migrations=migrations or [], simulated=rt.simulated, seconds=time.monotonic() - started)

    migrations: list[MigrationResult] = []
    with locks.host_maintenance(host, cluster, wait_seconds=lock_wait_s, holder=rt.states.get(host).run_id):
        record = rt.states.get(host)
        if record.state is HostState.ACTIVE:
            # back in service already; a return that died after its uncordon left its VMs away
            if then is not AfterReturn.RETURN_VMS or not rt.states.origins(host):
                return outcome(StepOutcome.SKIPPED, f"host {host} is already in service; nothing to return")
            back_to = HostState.ACTIVE
            logger.info("host %s is in service already; returning the VMs still away from it", host)
        else:
            if record.state not in (HostState.DRAINED, HostState.VERIFYING):
                raise InputError(_not_evacuated(host, record.state, record.reason, record.prior_state is not None))
            if record.state is HostState.DRAINED:
                t.confirm_empty(ref, run, host)
            t.verify_host(ref, run, host, None)
            ti.run_hooks(ref, run, host, HookPoint.POST_VERIFY, keep_state=True)  # a Ceph unset noout
            t.start_unmigratable(ref, run, host)
            back_to = t.uncordon_host(ref, run, host)
            logger.info("host %s verified and back to %s", host, back_to.value)
        ti.end_evacuation_silence(ref, run, host)  # back in service: its alerts are news again
        if then is AfterReturn.RETURN_VMS:
            with locks.cluster_migrations(cluster):
                report = t.return_vms(ref, run, host)
            migrations = list(report.results) if report is not None else []
    detail = "in service already" if record.state is HostState.ACTIVE else f"verified, {back_to.value} again"
    if then is AfterReturn.RETURN_VMS:
        detail += f"; {len(migrations)} VM(s) returned"
    elif then is AfterReturn.REBALANCE:
        levelled = rebalance_cluster(cluster=cluster, max_moves=max_moves, operator=operator,
                                     inventory=ref.inventory, trigger=run.trigger)
        migrations = levelled.migrations
        detail += f"; rebalance: {levelled.detail}"
    ti.run_hooks(ref, run, host, HookPoint.POST_MAINTENANCE)  # back in service: a failure is recorded
    result = outcome(StepOutcome.OK, detail, migrations)
    publish_report(f"return {host}", [result])
    return result


def _not_evacuated(host: str, state: HostState, reason: str, in_maintenance: bool) -> str:
    way_back = {
        HostState.CORDONED: (f"'hostmaint host uncordon {host}' returns a host cordoned outside maintenance"
                             if not in_maintenance else
                             f"its maintenance stopped before the drain: run patch-host (or evacuate-host) on {host} "
                             "again to finish it"),
        HostState.FAILED: f"'hostmaint host reset {host}' clears a failed host, then patch-host verifies it",
    }.get(state, f"a maintenance run holds it ({state.value}): let it finish, or run patch-host on {host} again")
    return (f"host {host} is {state.value} ({reason}), not drained by an evacuation: nothing was changed. "
            f"{way_back}")
