"""patch-host: evacuate → update → reboot when needed → verify → uncordon → return the VMs.

The runbook is :data:`hostmaint.resume.RUNBOOK`; :class:`HostPatch` has one method per step, and the
flow walks the steps :func:`hostmaint.resume.remaining_steps` leaves for the host: all of them on a
host in service, the rest of them on one an earlier run left half way (drained, rebooting, ...).
A plan refused before anything moved (N+1, a VM that fits nowhere) puts the host back as it was:
the run fails, the host is not left cordoned.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prefect import flow, get_run_logger

from flows import locks
from flows.cancel import stand_down_hook, stops_safely
from flows.common import (
    ExactBudget,
    HostOutcome,
    HostsAtOnce,
    WaitSeconds,
    default_inventory,
    publish_report,
    run_context,
)
from flows.draining import drain_planned
from flows.run_display import label_run, publish_plan
from hostmaint.cancel import RunCancelled
from hostmaint.errors import HostmaintError, PlanError
from hostmaint.hooks import HookPoint
from hostmaint.maintenance import RunContext
from hostmaint.models import Cell, EvacuationPlan, FleetSnapshot, HostState, MigrationResult, Step, StepOutcome, Trigger
from hostmaint.monitoring import GatePoint, SilenceLease
from hostmaint.placement import render_plan
from hostmaint.placement.exact import DEFAULT_BUDGET
from hostmaint.resume import BEFORE_CORDON, drain_due, remaining_steps
from tasks import integrations as ti
from tasks import maintenance as t
from tasks.common import RuntimeRef


@dataclass
class HostPatch:
    """One run's patch of ``host``: a method per step of the runbook, and what the steps learn on the way.

    A step returns why the host is skipped (a gate held it before anything changed), else None."""

    ref: RuntimeRef
    run: RunContext
    host: str
    cluster: str
    avoid: list[str]
    hosts_at_once: int = 1
    window_id: str | None = None
    return_home: bool = True
    lease: SilenceLease | None = None  # the host's Alertmanager silence, extended while this run lives
    snapshot: FleetSnapshot | None = None
    plan: EvacuationPlan | None = None
    expected: list[str] = field(default_factory=list)  # every VM that must run once (or stay stopped)
    stopped: list[str] = field(default_factory=list)  # shut down by maintenance, until the host is verified
    shut_off: list[str] = field(default_factory=list)
    cells: tuple[Cell, ...] | None = None  # the NUMA cells before the update, for verify
    migrations: list[MigrationResult] = field(default_factory=list)
    packages_changed: int = 0
    reboot_due: bool = True  # until the update or the proof of an issued reboot says otherwise
    rebooted: bool = False
    refused: bool = False  # refused before anything of the host changed

    def step(self, step: Step) -> str | None:
        """Do ``step``; a failure before the cordon (or a refused plan) changed nothing of the host."""
        steps: dict[Step, Callable[[], str | None]] = {
            Step.PRECHECK: self.precheck, Step.GATE: self.gate, Step.SILENCE: self.silence,
            Step.CORDON: self.cordon, Step.DISCOVER: self.discover, Step.DRAIN: self.drain,
            Step.CONFIRM_EMPTY: self.confirm_empty, Step.UPDATE: self.update, Step.PROVE_REBOOT: self.prove_reboot,
            Step.REBOOT: self.reboot, Step.VERIFY: self.verify, Step.START_VM: self.start_vms,
            Step.UNCORDON: self.uncordon, Step.RETURN_VMS: self.return_vms,
        }
        try:
            return steps[step]()
        except HostmaintError:
            self.refused = self.refused or step in BEFORE_CORDON
            raise

    def precheck(self) -> None:
        t.precheck_host(self.ref, self.run, self.host)  # SSH, package manager, space: before anything moves

    def gate(self) -> str | None:
        return ti.gate_host(self.ref, self.run, self.host, GatePoint.BEFORE_DRAIN)  # alerts firing: not now

    def silence(self) -> None:
        self.lease = ti.open_silence(self.ref, self.run, self.host)  # adopts the one an earlier run recorded

    def cordon(self) -> None:
        t.cordon_host(self.ref, self.run, self.host)  # a failed host is refused here, with how to clear it

    def discover(self) -> None:
        # One discovery, after the cordon and before anything moves: both the VMs the invariants expect
        # and the plan's view of the cluster
        self.snapshot = t.discover(self.ref, self.cluster)
        # migrations an earlier run started and never recorded (it died while they ran)
        t.record_found_moves(self.ref, self.run, self.host, self.snapshot)
        # VMs an earlier run shut down on this host are expected too: stopped until it is verified
        self.stopped = self.ref.open().states.stopped_on(self.host)
        self.expected = [v.name for v in self.snapshot.vms]
        self.expected += [vm for vm in self.stopped if vm not in self.expected]

    def drain(self) -> None:
        assert self.snapshot is not None
        rt = self.ref.open()
        # a run that died after its drain, before it shut down the VMs whose policy says so, left them
        # on the drained host: this run plans for them again, or could never go on
        if not drain_due(rt.states.state(self.host), any(v.host == self.host for v in self.snapshot.vms)):
            return
        try:
            # Hosts another drain fills right now come last, so this drain can run beside it; focused on
            # few hosts, so the next drains can too (the VMs return home after the patch, or a window
            # rebalances at its end)
            busy = locks.busy_targets([h.name for h in rt.inventory.hosts_of(self.cluster)])
            plan = t.plan_evacuation(self.ref, self.run, self.host, self.avoid, snapshot=self.snapshot, busy=busy,
                                     focus=True)
            get_run_logger().info("plan:\n%s", render_plan(plan))
            publish_plan(plan, self.host)
            # once a drain will happen: a refused plan puts the host back with nothing left set (a Ceph
            # noout no post hook would clear). A failure keeps it cordoned, nothing moved
            ti.run_hooks(self.ref, self.run, self.host, HookPoint.PRE_DRAIN)
            plan, report = drain_planned(self.ref, self.run, plan, self.snapshot, self.avoid, focus=True,
                                         hosts_at_once=self.hosts_at_once)
            self.plan = plan
            self.migrations += report.results
        except PlanError as exc:
            # Refused before anything moved (N+1, a VM that fits nowhere): when nothing of the host was
            # moved yet, it goes back to how it was (left cordoned, every refusal in a window would take
            # one more host out of placement and make the next refusal likelier). When an earlier run
            # moved some of its VMs, it never was back in service: it stays cordoned, unpatched, with the
            # reason and the VMs that are away. A refusal can also come from the drain's re-plan after some
            # of its migrations ran (a target lost mid-drain): what moved is judged from where the VMs run
            # now, never from the discovery made before the drain (chaos round 1727215996)
            t.end_unstarted(self.ref, self.run, self.host, str(exc))
            self.refused = True
            raise
        t.check_invariants(self.ref, self.cluster, self.expected, self.stopped, run=self.run)
        self.stopped = sorted({*self.stopped, *t.stop_unmigratable(self.ref, self.run, plan)})

    def confirm_empty(self) -> None:
        # also the gate for a host found drained by an earlier run: proven empty again now
        t.confirm_empty(self.ref, self.run, self.host)

    def update(self) -> None:
        self.cells = t.host_cells(self.ref, self.host)
        diff, decision = t.update_host(self.ref, self.run, self.host)
        self.packages_changed = len(diff.installed) + len(diff.upgraded) + len(diff.removed)
        t.check_invariants(self.ref, self.cluster, self.expected, self.stopped, run=self.run)
        self.reboot_due = decision.needed

    def prove_reboot(self) -> None:
        # an earlier run died while the host rebooted: a new boot proves it; else it is rebooted as now
        self.rebooted = t.prove_reboot(self.ref, self.run, self.host) is not None
        self.reboot_due = not self.rebooted

    def reboot(self) -> None:
        if not self.reboot_due:
            return
        ti.gate_host(self.ref, self.run, self.host, GatePoint.BEFORE_REBOOT)  # held: stays out, not rebooted
        ti.run_hooks(self.ref, self.run, self.host, HookPoint.PRE_REBOOT)
        t.reboot_host(self.ref, self.run, self.host)
        self.rebooted = True

    def verify(self) -> None:
        t.verify_host(self.ref, self.run, self.host, self.cells)
        ti.run_hooks(self.ref, self.run, self.host, HookPoint.POST_VERIFY)

    def start_vms(self) -> None:
        # its own shut-down VMs start before the uncordon: a run that dies between the two then finds
        # the host verifying (verified again, then uncordoned), never active with them down
        t.start_unmigratable(self.ref, self.run, self.host, self.plan)
        self.stopped = []
        self.shut_off = t.report_shut_off(self.ref, self.run, self.host)

    def uncordon(self) -> None:
        t.uncordon_host(self.ref, self.run, self.host)
        if self.window_id:
            # patched and back in service: a window run again skips it from here on (what is left,
            # returning VMs and the last check, is not worth a second maintenance)
            self.ref.open().states.mark_patched(self.window_id, self.host, self.run.run_id)

    def return_vms(self) -> None:
        if self.return_home:
            with locks.cluster_migrations(self.cluster):
                returned = t.return_vms(self.ref, self.run, self.host)
            if returned is not None:
                self.migrations += returned.results
        t.check_invariants(self.ref, self.cluster, self.expected, self.stopped, run=self.run)
        ti.run_hooks(self.ref, self.run, self.host, HookPoint.POST_MAINTENANCE)  # in service: a failure is recorded


@flow(name="patch-host", log_prints=True, on_cancellation=[stand_down_hook])
@stops_safely  # Cancel stops it safely, cordoned "cancelled by X": flows/cancel.py
def patch_host(host: str, operator: str = "unknown", reason: str = "patch", dry_run: bool = False,
               inventory: str | None = None, trigger: Trigger = Trigger.UI, window_id: str | None = None,
               return_vms: bool = True, avoid: list[str] | None = None,
               lock_wait_s: WaitSeconds | None = 60, hosts_at_once: HostsAtOnce = 1,
               exact_budget: ExactBudget = DEFAULT_BUDGET) -> HostOutcome:
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
    work = HostPatch(ref, run, host, cluster, avoid or [], hosts_at_once, window_id, return_vms)

    def outcome(result: StepOutcome, detail: str) -> HostOutcome:
        return HostOutcome(host=host, outcome=result, state=rt.states.state(host), detail=detail,
                           simulated=rt.simulated, seconds=time.monotonic() - started, migrations=work.migrations,
                           rebooted=work.rebooted, packages_changed=work.packages_changed)

    if window_id and host in rt.states.patched_in(window_id):
        return outcome(StepOutcome.SKIPPED, f"already patched in window {window_id}")
    if dry_run:
        preview = t.plan_evacuation(ref, run, host, avoid or [], dry_run=True, focus=True)
        get_run_logger().info("dry run, nothing changes:\n%s", render_plan(preview))
        return outcome(StepOutcome.DRY_RUN, render_plan(preview))

    with locks.host_maintenance(host, cluster, wait_seconds=lock_wait_s, holder=rt.states.get(host).run_id):
        try:
            for step in remaining_steps(rt.states.get(host), rt.audit.records(host=host)):
                held = work.step(step)
                if held:
                    return outcome(StepOutcome.SKIPPED, held)
        except HostmaintError as exc:
            cancelled = isinstance(exc, RunCancelled)  # stopped safely, not failed: flows/cancel.py
            if rt.states.state(host) is HostState.ACTIVE and not work.refused and not cancelled:
                t.mark_failed(ref, run, host, str(exc))
            result = outcome(StepOutcome.ABORTED if cancelled else StepOutcome.FAILED, str(exc))
            publish_report(f"patch {host}", [result])
            raise
        finally:
            ti.end_silence(ref, run, host, work.lease)  # expired now; if this never runs, it lapses by itself
        detail = f"{work.packages_changed} package change(s)" + ("; rebooted" if work.rebooted else "")
        stopped = [f"{m.vm} ({m.stopped_outside})" for m in work.migrations if m.stopped_outside is not None]
        if stopped:  # by their guest or a tenant, while it drained: told, never started again by us
            detail += f"; stopped outside hostmaint during its drain: {', '.join(stopped)}"
        if work.shut_off:
            detail += f"; shut-off VMs left defined on it: {', '.join(work.shut_off)}"
        result = outcome(StepOutcome.OK, detail)
        publish_report(f"patch {host}", [result])
        return result
