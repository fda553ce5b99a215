"""One task per maintenance step. Retries only on I/O steps, only for transient errors."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from hostmaint import maintenance as steps
from hostmaint import patching
from hostmaint.maintenance import RunContext
from hostmaint.migration import DrainReport
from hostmaint.models import CapacityCheck, Cell, EvacuationPlan, FleetSnapshot, HostState, RebalancePlan, Step
from hostmaint.placement import plan_rebalance
from hostmaint.state import HostRecord
from hostmaint.window import room_for
from tasks import cancellation
from tasks.common import IO_RETRIES, RuntimeRef, drain_logger

# No task tags: Prefect turns every tag of a task run into a tag-concurrency lookup on the server
# (an increment-with-lease request, cached 5 s) before the task starts. hostmaint's safety locks
# are the global limits in flows/locks.py, not tag limits; the flow runs keep their tags
# (deployments/), so runs still filter by "hostmaint" in the UI.


@task(name="cordon", cache_policy=NO_CACHE)
def cordon_host(ref: RuntimeRef, run: RunContext, host: str) -> HostRecord:
    cancellation.check(run.run_id, host, Step.CORDON)  # a run stopped while it waited for its lock takes nothing
    return steps.cordon(ref.open(), run, host)


@task(name="discover", cache_policy=NO_CACHE, **IO_RETRIES)
def discover(ref: RuntimeRef, cluster: str) -> FleetSnapshot:
    return steps.snapshot(ref.open(), cluster)


@task(name="room-in-window", cache_policy=NO_CACHE, **IO_RETRIES)
def room_in_window(ref: RuntimeRef, cluster: str, in_maintenance: list[str], host: str) -> CapacityCheck:
    return room_for(steps.snapshot(ref.open(), cluster), in_maintenance, host)


@task(name="plan-evacuation", cache_policy=NO_CACHE, **IO_RETRIES)
def plan_evacuation(ref: RuntimeRef, run: RunContext, host: str, avoid: list[str] | None = None,
                    dry_run: bool = False, snapshot: FleetSnapshot | None = None, busy: list[str] | None = None,
                    focus: bool = False) -> EvacuationPlan:
    return steps.plan_drain(ref.open(), run, host, avoid=avoid or [], busy=busy or [], focus=focus,
                            dry_run=dry_run, snap=snapshot, exact_budget=ref.exact_budget)


@task(name="recheck-plan", cache_policy=NO_CACHE, **IO_RETRIES)
def recheck_plan(ref: RuntimeRef, run: RunContext, plan: EvacuationPlan, planned_on: FleetSnapshot,
                 avoid: list[str] | None = None, focus: bool = False,
                 unreachable: list[str] | None = None) -> tuple[EvacuationPlan, FleetSnapshot]:
    return steps.recheck_plan(ref.open(), run, plan, planned_on, avoid=avoid or [], focus=focus,
                              exact_budget=ref.exact_budget, unreachable=unreachable or [])


@task(name="retarget-plan", cache_policy=NO_CACHE, **IO_RETRIES)
def retarget_plan(ref: RuntimeRef, run: RunContext, plan: EvacuationPlan, now: FleetSnapshot, busy: list[str],
                  avoid: list[str] | None = None, focus: bool = False) -> EvacuationPlan:
    return steps.retarget(ref.open(), run, plan, now, busy, avoid=avoid or [], focus=focus,
                          exact_budget=ref.exact_budget)


@task(name="drain", cache_policy=NO_CACHE)
def drain_host(ref: RuntimeRef, run: RunContext, plan: EvacuationPlan, now: FleetSnapshot | None = None,
               cluster_slots: int | None = None) -> DrainReport:
    # No Prefect retry: a failed migration is already retried or aborted by the drain
    # scheduler; re-running the whole drain is the operator's call (re-run the flow).
    # A cancel (SIGTERM, or the run's state) stops it safely: tasks/cancellation.py
    cancellation.check(run.run_id, plan.hosts[0] if plan.hosts else None, Step.DRAIN)
    with cancellation.graceful():
        return steps.drain_host(ref.open(), run, plan, now=now, cluster_slots=cluster_slots,
                                on_event=drain_logger(len(plan.placements)), cancel=cancellation.for_run(run.run_id))


@task(name="stop-unmigratable", cache_policy=NO_CACHE, **IO_RETRIES)
def stop_unmigratable(ref: RuntimeRef, run: RunContext, plan: EvacuationPlan) -> list[str]:
    cancellation.check(run.run_id, plan.hosts[0] if plan.hosts else None, Step.SHUTDOWN_VM)
    return steps.stop_unmigratable(ref.open(), run, plan)


@task(name="start-unmigratable", cache_policy=NO_CACHE, **IO_RETRIES)
def start_unmigratable(ref: RuntimeRef, run: RunContext, host: str,
                       plan: EvacuationPlan | None = None) -> list[str]:
    return steps.start_unmigratable(ref.open(), run, host, plan)


@task(name="shut-off-vms", cache_policy=NO_CACHE, **IO_RETRIES)
def report_shut_off(ref: RuntimeRef, run: RunContext, host: str) -> list[str]:
    return steps.report_shut_off(ref.open(), run, host)


@task(name="confirm-empty", cache_policy=NO_CACHE, **IO_RETRIES)
def confirm_empty(ref: RuntimeRef, run: RunContext, host: str) -> None:
    steps.confirm_empty(ref.open(), run, host)


@task(name="cells-before", cache_policy=NO_CACHE, **IO_RETRIES)
def host_cells(ref: RuntimeRef, host: str) -> tuple[Cell, ...]:
    return ref.open().hypervisor.discover(host).cells


@task(name="update", cache_policy=NO_CACHE)
def update_host(ref: RuntimeRef, run: RunContext, host: str) -> tuple[patching.PackageDiff, patching.RebootDecision]:
    cancellation.check(run.run_id, host, Step.UPDATE)
    return steps.patch(ref.open(), run, host)


@task(name="reboot", cache_policy=NO_CACHE)
def reboot_host(ref: RuntimeRef, run: RunContext, host: str) -> patching.RebootResult:
    cancellation.check(run.run_id, host, Step.REBOOT)
    return steps.reboot(ref.open(), run, host)


@task(name="precheck", cache_policy=NO_CACHE, **IO_RETRIES)
def precheck_host(ref: RuntimeRef, run: RunContext, host: str) -> patching.Preflight:
    return steps.precheck(ref.open(), run, host)


@task(name="precheck-transport", cache_policy=NO_CACHE, **IO_RETRIES)
def precheck_transport(ref: RuntimeRef, run: RunContext, host: str) -> None:
    steps.precheck_transport(ref.open(), run, host)


@task(name="prove-reboot", cache_policy=NO_CACHE)
def prove_reboot(ref: RuntimeRef, run: RunContext, host: str) -> patching.RebootResult | None:
    return steps.prove_reboot(ref.open(), run, host)


@task(name="verify", cache_policy=NO_CACHE, **IO_RETRIES)
def verify_host(ref: RuntimeRef, run: RunContext, host: str, cells_before: tuple[Cell, ...] | None) -> None:
    steps.verify(ref.open(), run, host, cells_before)


@task(name="uncordon", cache_policy=NO_CACHE)
def uncordon_host(ref: RuntimeRef, run: RunContext, host: str) -> HostState:
    cancellation.check(run.run_id, host, Step.UNCORDON)
    return steps.uncordon(ref.open(), run, host)


@task(name="record-found-moves", cache_policy=NO_CACHE)
def record_found_moves(ref: RuntimeRef, run: RunContext, host: str, snapshot: FleetSnapshot) -> list[str]:
    return steps.record_found_moves(ref.open(), run, host, snapshot)


@task(name="end-unstarted", cache_policy=NO_CACHE)
def end_unstarted(ref: RuntimeRef, run: RunContext, host: str, why: str) -> HostState:
    return steps.end_unstarted(ref.open(), run, host, why)


@task(name="return-vms", cache_policy=NO_CACHE, **IO_RETRIES)
def return_vms(ref: RuntimeRef, run: RunContext, host: str) -> DrainReport | None:
    # a cancel stops the moves safely, as a drain's (tasks/cancellation.py)
    cancellation.check(run.run_id, host, Step.RETURN_VMS)
    with cancellation.graceful():
        return steps.return_vms(ref.open(), run, host, on_event=drain_logger(),
                                cancel=cancellation.for_run(run.run_id))


@task(name="plan-rebalance", cache_policy=NO_CACHE, **IO_RETRIES)
def plan_rebalance_task(ref: RuntimeRef, cluster: str, max_moves: int | None, prefer_origin: bool = True,
                        within: float | None = None, snapshot: FleetSnapshot | None = None) -> RebalancePlan:
    return plan_rebalance(snapshot or steps.snapshot(ref.open(), cluster), max_moves, prefer_origin=prefer_origin,
                          within=within, exact_budget=ref.exact_budget)


@task(name="recheck-rebalance", cache_policy=NO_CACHE, **IO_RETRIES)
def recheck_rebalance(ref: RuntimeRef, run: RunContext, plan: RebalancePlan, planned_on: FleetSnapshot,
                      max_moves: int | None, prefer_origin: bool = True,
                      within: float | None = None) -> tuple[RebalancePlan, FleetSnapshot]:
    return steps.recheck_rebalance(ref.open(), run, plan, planned_on, max_moves=max_moves,
                                   prefer_origin=prefer_origin, within=within, exact_budget=ref.exact_budget)


@task(name="rebalance", cache_policy=NO_CACHE)
def rebalance(ref: RuntimeRef, run: RunContext, plan: RebalancePlan) -> DrainReport | None:
    cancellation.check(run.run_id, None, Step.REBALANCE)
    with cancellation.graceful():
        return steps.rebalance(ref.open(), run, plan, on_event=drain_logger(), cancel=cancellation.for_run(run.run_id))


@task(name="check-invariants", cache_policy=NO_CACHE, **IO_RETRIES)
def check_invariants(ref: RuntimeRef, cluster: str, expected: list[str], stopped: list[str] | None = None,
                     run: RunContext | None = None) -> dict[str, str]:
    return steps.check_invariants(ref.open(), cluster, expected, stopped=stopped or [], run=run)


@task(name="mark-failed", cache_policy=NO_CACHE)
def mark_failed(ref: RuntimeRef, run: RunContext, host: str, reason: str) -> None:
    steps.fail_host(ref.open(), run, host, reason)
