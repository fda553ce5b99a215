"""patch-window: roll patch-host through a cluster, N hosts at a time, inside the window.

It never starts a host that cannot finish before the window ends, nor one more host
than N+1 allows at that moment (it waits for a host in maintenance to finish), stops
starting hosts once failures exceed the limit, and skips hosts already patched in this
window when run again. VMs evacuate onto hosts patched earlier in the window, so
each VM moves about once; a final rebalance levels the cluster with few moves.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prefect import flow, get_run_logger, runtime, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import CancelledRun
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from flows import notify
from flows.cancel import stand_down_hook, stops_safely
from flows.common import (
    ExactBudget,
    FailedHosts,
    HostOutcome,
    HostsAtOnce,
    Moves,
    WindowMinutes,
    WithinPct,
    default_inventory,
    publish_report,
    run_context,
)
from flows.patch_host import patch_host
from flows.rebalance_cluster import rebalance_locked
from flows.run_display import label_run
from hostmaint.cancel import RunCancelled
from hostmaint.display import visible
from hostmaint.errors import LockHeldError, StepError
from hostmaint.maintenance import RunContext, audited, link_figures
from hostmaint.models import HostState, Step, StepOutcome, Trigger
from hostmaint.placement.exact import DEFAULT_BUDGET
from hostmaint.runtime import Runtime
from hostmaint.window import (
    HostHold,
    WindowClock,
    estimate_host_seconds,
    host_budget_s,
    hosts_held,
    left_rebooting,
    operator_hold,
    unfinished_first,
    window_held,
    window_left,
    window_order,
)
from tasks import cancellation
from tasks import maintenance as t
from tasks.common import RuntimeRef


@task(name="patch-host-in-window", cache_policy=NO_CACHE)  # untagged: see tasks/maintenance.py
def patch_one(host: str, inventory: str, operator: str, window_id: str, trigger: Trigger,
              avoid: list[str], hosts_at_once: int = 1, exact_budget: float = DEFAULT_BUDGET) -> HostOutcome:
    # A failed host is an outcome of the window, not an exception that kills it.
    try:
        return patch_host(host=host, operator=operator, reason=f"patch window {window_id}", inventory=inventory,
                          trigger=trigger, window_id=window_id, return_vms=False, avoid=avoid,
                          hosts_at_once=hosts_at_once, exact_budget=exact_budget)
    except CancelledRun as exc:
        # cancelled (with its window, or on its own): it stood its host down, cordoned with who did it
        state = RuntimeRef(inventory).open().states.state(host)
        return HostOutcome(host=host, outcome=StepOutcome.ABORTED, state=state, detail=str(exc))
    except LockHeldError as exc:
        # Another run (an evacuation, a runbook) holds the host: not a failure of this host.
        state = RuntimeRef(inventory).open().states.state(host)
        return HostOutcome(host=host, outcome=StepOutcome.SKIPPED, state=state, detail=f"not started: {exc}")
    except Exception as exc:  # noqa: BLE001 - recorded per host; the audit has the details
        state = RuntimeRef(inventory).open().states.state(host)
        return HostOutcome(host=host, outcome=StepOutcome.FAILED, state=state, detail=str(exc))


def _record_window(rt: Runtime, run: RunContext, cluster: str, window_id: str, outcomes: list[HostOutcome]) -> None:
    """The window's own audit record: what came of each host, failed when one did. A host's run can fail
    before any step of its own is recorded (the Prefect server gone as it starts): this names it."""
    with audited(rt, run, Step.WINDOW, cluster=cluster, inputs={"window_id": window_id}) as rec:
        rec.details["hosts"] = [{"host": o.host, "outcome": o.outcome.value, "detail": o.detail} for o in outcomes]
        if any(o.outcome is StepOutcome.FAILED for o in outcomes):
            rec.outcome = StepOutcome.FAILED


def _holds(rt: Runtime, hosts: list[str]) -> dict[str, HostHold | None]:
    """Each host's hold, if an operator took it out of service (hostmaint/window.py decides)."""
    holds: dict[str, HostHold | None] = {}
    for host in hosts:
        record = rt.states.get(host)
        holds[host] = None if record.state is HostState.ACTIVE else operator_hold(
            record, rt.states.history(host), rt.audit.records(host=host))
    return holds


def _leave_alone(rt: Runtime, run: RunContext, hold: HostHold, window_id: str, named: bool) -> None:
    """The audit record of a host the window leaves alone, with the operator's reason for taking it out."""
    with audited(rt, run, Step.WINDOW, host=hold.host, inputs={"window_id": window_id, "named": named}) as rec:
        rec.outcome = StepOutcome.SKIPPED
        rec.details.update({"left_alone": hold.held.value, "reason": hold.reason, "by": hold.by,
                            "flow": hold.flow, "since": hold.since.isoformat()})


def _finished(running: dict[PrefectFuture[HostOutcome], str]) -> list[PrefectFuture[HostOutcome]]:
    """The hosts' runs that have finished, waiting (Prefect's ``as_completed``) until one has."""
    first = next(as_completed(list(running)))
    return [first, *(f for f in running if f is not first and f.state.is_final())]


def _scheduled_start() -> datetime:
    """When this run was scheduled to start (now, for a run started by hand or outside Prefect)."""
    scheduled = runtime.flow_run.scheduled_start_time
    return datetime.fromtimestamp(scheduled.timestamp(), UTC) if scheduled else datetime.now(UTC)


def _default_window_id(cluster: str) -> str:
    return f"{cluster}:{_scheduled_start().date().isoformat()}"


# Prefect 3.9 types the flow's runner as TaskRunner[PrefectFuture[Any]] and infers ThreadPoolTaskRunner[Never]
@flow(name="patch-window", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=16),  # type: ignore[arg-type]
      on_cancellation=[stand_down_hook])
@stops_safely  # Cancel: no host starts, those running stop safely (flows/cancel.py)
def patch_window(cluster: str, max_hosts_in_parallel: HostsAtOnce = 1, window_end: datetime | None = None,
                 window_minutes: WindowMinutes | None = None, max_failed_hosts: FailedHosts = 0,
                 hosts: list[str] | None = None, window_id: str | None = None, operator: str = "scheduler",
                 inventory: str | None = None, trigger: Trigger = Trigger.SCHEDULE,
                 rebalance_moves: Moves | None = None, rebalance_within_pct: WithinPct = 10.0,
                 exact_budget: ExactBudget = DEFAULT_BUDGET) -> list[HostOutcome]:
    """Patch the hosts of ``cluster`` (or only ``hosts``) inside one maintenance window.

    At the end, when every host was patched, a rebalance levels the cluster until each host's memory
    use is within ``rebalance_within_pct`` points of the cluster's, with at most ``rebalance_moves``
    migrations (None: as many as that takes; 0: no rebalance). A rolling window leaves its last hosts
    empty, and a fixed handful of moves does not level a cluster of dozens of hosts. It levels
    rather than sending VMs home: the window moved each VM about once on purpose. The VMs' origins stay
    recorded, so an on-demand rebalance-cluster (origin returns first) can still bring them back.

    Args:
        cluster: The cluster to patch, as named in the inventory.
        max_hosts_in_parallel: Hosts in maintenance at once; never more than the cluster's
            limits.max_hosts_in_maintenance.
        window_end: No host starts that could not finish before this time (a time without an offset is
            UTC). Empty: window_minutes from the scheduled start, or no end.
        window_minutes: The window's length from its scheduled start (a run started by hand: from now);
            used when window_end is empty. Empty with no window_end: the window never ends.
        max_failed_hosts: Stop starting hosts once more than this many failed (0: stop at the first).
        hosts: Only these hosts (empty: every host of the cluster). A host an operator evacuated or
            cordoned is left alone even when named here.
        window_id: Resume the window with this id (its log says 'window <id>: N host(s) to patch'): hosts
            it already patched are skipped. Empty: <cluster>:<scheduled start date, UTC>.
        operator: Who runs this window; recorded in the audit trail. A run started from the UI is
            recorded under the name typed here ('unknown' if empty).
        inventory: Inventory file on the worker. Empty: the worker's $HOSTMAINT_INVENTORY.
        trigger: Leave as it is: the run's record on the server says what started it (schedule, UI, event).
        rebalance_moves: At most this many migrations to level the cluster at the end (empty: as many as
            levelling takes; 0: no rebalance).
        rebalance_within_pct: The closing rebalance stops once every host is within this many points of
            the cluster's memory utilisation.
        exact_budget: Deterministic seconds the planner's exact stage (CP-SAT) may spend on each plan
            (0: greedy only); raise it when a plan says its refusal is not proven.
    """
    logger = get_run_logger()
    inv_path = inventory or default_inventory()
    ref = RuntimeRef(inv_path, exact_budget=exact_budget)
    rt = ref.open()
    window_id = window_id or _default_window_id(cluster)
    run = run_context("patch-window", trigger, operator, f"window {window_id}", window_id)
    limits = rt.inventory.cluster(cluster).limits
    label_run("patch window", inv_path, cluster=cluster)
    parallel = max(1, min(max_hosts_in_parallel, limits.max_hosts_in_maintenance))
    if window_end is None and window_minutes is not None:
        # from the window's scheduled start, not from when this run got going: a run that starts late
        # (a worker was down) or is retried after a crash must not get a whole new window
        window_end = _scheduled_start() + timedelta(minutes=window_minutes)
    if window_end is not None and window_end.tzinfo is None:
        window_end = window_end.replace(tzinfo=UTC)  # a time without an offset is UTC, as the CLI says
    clock = WindowClock(end=window_end)
    snapshot = t.discover(ref, cluster)
    done = rt.states.patched_in(window_id)
    # a host a killed run left rebooting is missing from the discovery; it is finished first
    rebooting = left_rebooting([h.name for h in rt.inventory.hosts_of(cluster)], snapshot, rt.states.all(), hosts)
    others = [h for h in hosts if h not in rebooting] if hosts else None
    order, left_out = window_order(snapshot, others) if others is None or others else ([], [])
    order = rebooting + order
    due = [h for h in order if h not in done]
    # hosts an operator took out on purpose (evacuated, cordoned with a reason) stay out: reported, not patched
    pending, held = hosts_held(due, _holds(rt, due))
    pending = unfinished_first(pending, {h: rt.states.get(h) for h in pending})
    outcomes = [HostOutcome(host=h, outcome=StepOutcome.SKIPPED, state=rt.states.state(h),
                            detail=f"already patched in window {window_id}", simulated=rt.simulated)
                for h in order if h in done]
    outcomes += [HostOutcome(host=h, outcome=StepOutcome.SKIPPED, state=rt.states.state(h),
                             detail="left out of the window: a VM's policy is skip-host", simulated=rt.simulated)
                 for h in left_out]
    for hold in held:
        _leave_alone(rt, run, hold, window_id, named=hold.host in (hosts or []))
        logger.warning("window %s: %s %s", window_id, hold.host, visible(hold.detail()))
    outcomes += [HostOutcome(host=hold.host, outcome=StepOutcome.SKIPPED, state=rt.states.state(hold.host),
                             detail=hold.detail(), simulated=rt.simulated) for hold in held]
    order += left_out
    logger.info("window %s: %d host(s) to patch, %d already done, %d left alone, %d at a time",
                window_id, len(pending), len(done), len(held), parallel)
    links = link_figures(rt.inventory, rt.states, cluster)  # measured by earlier drains where the inventory gives none
    running: dict[PrefectFuture[HostOutcome], str] = {}  # each host's patch-host run, side by side
    failures = 0
    durations: list[float] = []
    started: list[str] = []
    waiting_for_room: str | None = None  # refused room; asked again once a host in maintenance finishes
    cancel = cancellation.for_run(run.run_id)
    stopped = cancel.is_set if cancel is not None else (lambda: False)
    while True:
        while pending and len(running) < parallel and failures <= max_failed_hosts and not stopped():
            host = pending[0]
            # its own estimate, or longer once a host of this window took longer: never less
            needed = host_budget_s(estimate_host_seconds(
                snapshot, host, rt.inventory, links[host].mib_s if host in links else None), durations)
            if not clock.fits(needed):
                logger.warning("window %s ends before %s could finish (~%.0fs): not started", window_id,
                               host, needed)
                break
            if running:
                # N hosts at a time is an upper bound: one more starts only while the rest of the
                # cluster can still take every VM and lose a host (N+1). Otherwise it would be
                # refused by its own plan, after a cordon, as a failure of the window.
                if waiting_for_room == host:
                    break
                room = t.room_in_window(ref, cluster, sorted(running.values()), host)
                if not room.ok:
                    logger.info("window %s: %s waits until a host in maintenance finishes: %s", window_id,
                                host, room.reason)
                    waiting_for_room = host
                    break
            waiting_for_room = None
            pending.pop(0)
            # due later, and those started a moment ago that may not be cordoned yet: a plan made now
            # must not send VMs to a host about to go into maintenance (it would wait for its drain)
            avoid = [h for h in (*running.values(), *pending) if h != host]
            started.append(host)
            running[patch_one.submit(host, inv_path, operator, window_id, trigger, avoid, parallel)] = host
        if not running:
            break
        for fut in _finished(running):
            host = running.pop(fut)
            result = fut.result()
            outcomes.append(result)
            durations.append(result.seconds)
            waiting_for_room = None  # room may have come back
            if result.outcome is StepOutcome.FAILED:
                failures += 1
                logger.error("host %s failed: %s", host, visible(result.detail))
    left = list(pending)
    for host in pending:
        reason = ("window cancelled" if stopped() else "failure limit reached" if failures > max_failed_hosts
                  else "window would end before it finished")
        outcomes.append(HostOutcome(host=host, outcome=StepOutcome.SKIPPED, state=rt.states.state(host),
                                    detail=f"not started: {reason}", simulated=rt.simulated))
    if failures <= max_failed_hosts and rebalance_moves != 0 and not pending and not stopped():
        remaining = clock.remaining()
        if remaining is not None and remaining <= 0:
            # the window is the time the operator allowed for moving VMs: levelling is no reason to overrun it
            logger.warning("window %s has ended: the cluster is not rebalanced (run rebalance-cluster later)",
                           window_id)
        else:
            within = rebalance_within_pct / 100
            now = t.discover(ref, cluster)
            plan = t.plan_rebalance_task(ref, cluster, rebalance_moves, prefer_origin=False, within=within,
                                         snapshot=now)
            before, after = plan.spread_before, plan.spread_after
            if before is not None and after is not None:
                logger.info("window %s: rebalance of %d move(s); the fullest host goes from %.2f to %.2f × "
                            "the cluster's mean", window_id, len(plan.moves), before.host_max_mean,
                            after.host_max_mean)
            rebalance_locked(ref, run, plan, now, rebalance_moves, prefer_origin=False, within=within)
    outcomes.sort(key=lambda o: order.index(o.host) if o.host in order else len(order))
    _record_window(rt, run, cluster, window_id, outcomes)
    publish_report(f"patch window {window_id}", outcomes, key=None)
    notify.window_ended(window_id, cluster, outcomes)  # the window-end notification (docs/integrations.md)
    if cancel is not None and cancel.is_set():
        raise RunCancelled(f"window {window_id} {cancel.reason}: {len(started)} host(s) started, {len(left)} not")
    if left or held:
        summary = " ".join([*([window_left(window_id, cluster, left, started, failures > max_failed_hosts, clock)]
                              if left else []),
                            *([window_held(window_id, cluster, held, started)] if held else [])])
        if not started:
            # nothing was done: the run (and the CLI) must not end as if the window had done its work
            raise StepError(summary, None, Step.WINDOW)
        logger.warning("%s", visible(summary))  # the holds' reasons: an operator's or an incident's text
    return outcomes
