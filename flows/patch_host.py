"""patch-host: evacuate → update → reboot when needed → verify → uncordon → return the VMs.

Re-running after a crash continues from the host's recorded state: a drained
host is not drained again, a host found rebooting is waited for and verified.
A plan refused before anything moved (N+1, a VM that fits nowhere) puts the host
back as it was: the run fails, the host is not left cordoned.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger

from flows import locks
from flows.cancel import stand_down_hook, stops_safely
from flows.common import HostOutcome, default_inventory, publish_report, run_context
from flows.draining import drain_planned
from flows.run_display import label_run, publish_plan
from hostmaint.cancel import RunCancelled
from hostmaint.errors import HostmaintError, PlanError
from hostmaint.hooks import HookPoint
from hostmaint.models import EvacuationPlan, HostState, MigrationResult, StepOutcome, Trigger
from hostmaint.monitoring import GatePoint, SilenceLease
from hostmaint.placement import render_plan
from hostmaint.placement.exact import DEFAULT_BUDGET
from tasks import integrations as ti
from tasks import maintenance as t
from tasks.common import RuntimeRef

BEFORE_DRAINED = (HostState.ACTIVE, HostState.CORDONED, HostState.DRAINING)


@flow(name="patch-host", log_prints=True, on_cancellation=[stand_down_hook])
@stops_safely  # Cancel stops it safely, cordoned "cancelled by X": flows/cancel.py
def patch_host(host: str, operator: str = "unknown", reason: str = "patch", dry_run: bool = False,
               inventory: str | None = None, trigger: Trigger = Trigger.UI, window_id: str | None = None,
               return_vms: bool = True, avoid: list[str] | None = None,
               lock_wait_s: float | None = 60, hosts_at_once: int = 1,
               exact_budget: float = DEFAULT_BUDGET) -> HostOutcome:
    """Take one host through maintenance end to end; the host is never rebooted with a VM on it.

    The run holds ``host:<host>`` and a ``maintenance:<cluster>`` slot throughout (flows/locks.py).
    patch-window sets ``window_id``, ``avoid`` (hosts due later) and ``hosts_at_once`` (how many
    hosts it runs at once: when their drains could not all hold a set-up slot of the cluster's
    migration limit, this one holds none, so more of them drain side by side).
    """
    started = time.monotonic()
    ref = RuntimeRef(inventory or default_inventory(), exact_budget=exact_budget)
    rt = ref.open()
    run = run_context("patch-host", trigger, operator, reason, window_id)
    cluster = rt.cluster_of(host)
    label_run("patch", ref.inventory, host=host, cluster=cluster, dry_run=dry_run)
    logger = get_run_logger()

    def outcome(result: StepOutcome, detail: str, **kw: object) -> HostOutcome:
        return HostOutcome(host=host, outcome=result, state=rt.states.state(host).value, detail=detail,
                           simulated=rt.simulated, seconds=time.monotonic() - started, **kw)  # type: ignore[arg-type]

    if window_id and host in rt.states.patched_in(window_id):
        return outcome(StepOutcome.SKIPPED, f"already patched in window {window_id}")
    if dry_run:
        preview = t.plan_evacuation(ref, run, host, avoid or [], dry_run=True, focus=True)
        logger.info("dry run, nothing changes:\n%s", render_plan(preview))
        return outcome(StepOutcome.DRY_RUN, render_plan(preview))

    with locks.host_maintenance(host, cluster, wait_seconds=lock_wait_s, holder=rt.states.get(host).run_id):
        migrations: list[MigrationResult] = []
        rebooted = False
        changed = 0
        plan: EvacuationPlan | None = None
        stopped: list[str] = []
        shut_off: list[str] = []
        refused = False  # the plan was refused before anything moved
        lease: SilenceLease | None = None  # the host's Alertmanager silence, extended while this run lives
        try:
            state = rt.states.state(host)
            if state in (HostState.ACTIVE, HostState.CORDONED):
                try:
                    t.precheck_host(ref, run, host)  # SSH, package manager, space: before anything moves
                    held = ti.gate_host(ref, run, host, GatePoint.BEFORE_DRAIN)  # alerts firing: not now
                    if held:
                        return outcome(StepOutcome.SKIPPED, held)
                    lease = ti.open_silence(ref, run, host)
                except HostmaintError:
                    refused = True
                    raise
            else:
                lease = ti.open_silence(ref, run, host)  # adopts the one the earlier run recorded
            if state in BEFORE_DRAINED or state is HostState.FAILED:
                # a failed host is refused here, with how to clear it, before anything else runs
                t.cordon_host(ref, run, host)
            # One discovery, after the cordon and before anything moves, is both the list of VMs the
            # invariants expect and the plan's view of the cluster (the plan used to discover again).
            snapshot = t.discover(ref, cluster)
            # migrations an earlier run started and never recorded (it died while they ran)
            t.record_found_moves(ref, run, host, snapshot)
            # VMs an earlier run shut down on this host are expected too: stopped until it is verified
            stopped = rt.states.stopped_on(host)
            expected = [v.name for v in snapshot.vms]
            expected += [vm for vm in stopped if vm not in expected]
            # a run that died after its drain, before it shut down the VMs whose policy says so,
            # left them on the drained host: this run plans for them again, or could never go on
            leftover = state is HostState.DRAINED and any(v.host == host for v in snapshot.vms)
            if state in BEFORE_DRAINED or leftover:
                try:
                    # Hosts another drain fills right now come last, so this drain can run beside it;
                    # focused on few hosts, so the next drains can too (the VMs return home after the
                    # patch, or a window rebalances at its end)
                    busy = locks.busy_targets([h.name for h in rt.inventory.hosts_of(cluster)])
                    plan = t.plan_evacuation(ref, run, host, avoid or [], snapshot=snapshot, busy=busy, focus=True)
                    logger.info("plan:\n%s", render_plan(plan))
                    publish_plan(plan, host)
                    # once a drain will happen: a refused plan puts the host back with nothing left set
                    # (a Ceph noout no post hook would clear). A failure keeps it cordoned, nothing moved
                    ti.run_hooks(ref, run, host, HookPoint.PRE_DRAIN)
                    plan, report = drain_planned(ref, run, plan, snapshot, avoid or [], focus=True,
                                                 hosts_at_once=hosts_at_once)
                    migrations += report.results
                except PlanError as exc:
                    # Refused before anything moved (N+1, a VM that fits nowhere): when nothing of the
                    # host was moved yet, it goes back to how it was (left cordoned, every refusal in a
                    # window would take one more host out of placement and make the next refusal
                    # likelier). When an earlier run moved some of its VMs, it never was back in service:
                    # it stays cordoned, unpatched, with the reason and the VMs that are away.
                    t.end_unstarted(ref, run, host, str(exc), snapshot)
                    refused = True
                    raise
                t.check_invariants(ref, cluster, expected, stopped)
                stopped = sorted({*stopped, *t.stop_unmigratable(ref, run, plan)})
                state = HostState.DRAINED
            if state is HostState.DRAINED:
                # Also the gate for a host found drained by an earlier run: proven empty again now.
                t.confirm_empty(ref, run, host)
            cells = None
            if state in (HostState.DRAINED, HostState.PATCHING):
                cells = t.host_cells(ref, host)
                diff, decision = t.update_host(ref, run, host)
                changed = len(diff.installed) + len(diff.upgraded) + len(diff.removed)
                t.check_invariants(ref, cluster, expected, stopped)
                if decision.needed:
                    ti.gate_host(ref, run, host, GatePoint.BEFORE_REBOOT)  # held: stays cordoned, not rebooted
                    ti.run_hooks(ref, run, host, HookPoint.PRE_REBOOT)
                    t.reboot_host(ref, run, host)
                    rebooted = True
                state = HostState.VERIFYING
            if state is HostState.REBOOTING:
                # an earlier run died while the host rebooted: prove the reboot happened (or do it)
                t.resume_reboot(ref, run, host)
                rebooted = True
            if state in (HostState.REBOOTING, HostState.VERIFYING):
                t.verify_host(ref, run, host, cells)
                ti.run_hooks(ref, run, host, HookPoint.POST_VERIFY)
            # its own shut-down VMs start before the uncordon: a run that dies between the two then
            # finds the host verifying (verified again, then uncordoned), never active with them down
            t.start_unmigratable(ref, run, host, plan)
            stopped = []
            shut_off = t.report_shut_off(ref, run, host)
            t.uncordon_host(ref, run, host)
            if window_id:
                # patched and back in service: a window run again skips it from here on (what is left,
                # returning VMs and the last check, is not worth a second maintenance)
                rt.states.mark_patched(window_id, host, run.run_id)
            if return_vms:
                with locks.cluster_migrations(cluster):
                    returned = t.return_vms(ref, run, host)
                if returned is not None:
                    migrations += returned.results
            t.check_invariants(ref, cluster, expected, stopped)
            ti.run_hooks(ref, run, host, HookPoint.POST_MAINTENANCE)  # back in service: a failure is recorded
        except HostmaintError as exc:
            cancelled = isinstance(exc, RunCancelled)  # stopped safely, not failed: flows/cancel.py
            if rt.states.state(host) is HostState.ACTIVE and not refused and not cancelled:
                t.mark_failed(ref, run, host, str(exc))
            result = outcome(StepOutcome.ABORTED if cancelled else StepOutcome.FAILED, str(exc),
                             migrations=migrations, rebooted=rebooted,
                             packages_changed=changed)
            publish_report(f"patch {host}", [result])
            raise
        finally:
            ti.end_silence(ref, run, host, lease)  # expired now; if this never runs, it lapses by itself
        detail = f"{changed} package change(s)" + ("; rebooted" if rebooted else "")
        if shut_off:
            detail += f"; shut-off VMs left defined on it: {', '.join(shut_off)}"
        result = outcome(StepOutcome.OK, detail, migrations=migrations, rebooted=rebooted, packages_changed=changed)
        publish_report(f"patch {host}", [result])
        return result
