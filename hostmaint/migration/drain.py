"""The drain executor: run an evacuation plan's live migrations, bounded, watched and escalated.

``drain(plan, hypervisor, limits)`` is what the ``drain`` task calls. It runs the plan's placements
in a thread pool and never has more in flight than ``limits`` allow per source, per target and per
cluster; the memory of a migration in flight counts against its target from its first byte (a
hugepage-backed VM's against the target's free hugepages of its size, as the planner placed it). The
:class:`SchedulerPolicy` decides the order, whether the next migration may start now (fill the source
link, keep the summed dirty rate well below it) and the escalation of a stalled one
(auto-converge → post-copy where allowed → abort).

Per VM, like a Watcher action: precondition (``locate``: a VM already off its source is a SKIPPED
result, which is how a re-run after a crash resumes) → execute (``migrate``) → verify (the driver
confirms the target; after a failure ``locate`` confirms the VM is still on its source). A
``MigrationError`` is a FAILED (or ABORTED) result and the others go on, unless the policy says stop
on the first failure. Results come back together in a :class:`DrainReport`, with every decision
as a :class:`DrainEvent` (also streamed to ``on_event`` for the audit record and progress artifacts).
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from hostmaint.drivers.base import STOPPED_OUTSIDE_REASONS, Hypervisor, MigrationStates, ShutOffReasons
from hostmaint.errors import DriverError, MigrationNotStarted
from hostmaint.migration.control import DowntimeRetune, MigrationControl
from hostmaint.migration.links import LinkMeter, LinkObservation
from hostmaint.migration.policy import (
    MIB,
    QEMU_DOWNTIME_LIMIT_MS,
    Action,
    Escalation,
    Load,
    MigrationSpec,
    ProgressTrack,
    SchedulerPolicy,
    about_to_finish,
    admission_order,
    admission_refusal,
    expected_dirty_mib_s,
    learned_switchover_ms,
    link_of,
    long_poles,
    migration_budget_s,
    next_action,
    options_for,
    order_placements,
    planning_share,
    pole_cap_mib_s,
    retuned_downtime_ms,
    seconds_left,
    stream_rate,
    switchover_share,
    throttling,
)
from hostmaint.models import (
    EvacuationPlan,
    Limits,
    MigrationOptions,
    MigrationProgress,
    MigrationResult,
    StepOutcome,
)

if TYPE_CHECKING:
    from hostmaint.migration.transport import Route


class EventKind(StrEnum):
    STARTED = "started"
    PROGRESS = "progress"
    ESCALATED = "escalated"
    FINISHED = "finished"
    FAILED = "failed"
    ABORTED = "aborted"
    SKIPPED = "skipped"
    RETUNED = "retuned"  # a running migration's downtime limit changed (the reserve was learned)


@dataclass(frozen=True)
class DrainEvent:
    """One thing the drain did or decided, ``at_s`` seconds after it started."""

    at_s: float
    kind: EventKind
    vm: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DrainReport:
    """Every migration's result (plan order), every event, the wall time, the peak concurrency and
    what was seen of each source's link (for :func:`~hostmaint.migration.links.estimate_link`)."""

    results: tuple[MigrationResult, ...]
    events: tuple[DrainEvent, ...]
    seconds: float
    max_concurrency: int
    links: tuple[LinkObservation, ...] = ()
    # the switch-over reserve at the drain's end: above the policy's when a pause outgrew the limit
    switchover_ms: float | None = None
    # targets that left service while the drain ran (``target_usable`` said why): nothing more was sent there
    withdrawn: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when every VM of the plan is off its source (moved now or before)."""
        return not self.failed

    @property
    def concurrency(self) -> tuple[tuple[float, int], ...]:
        """Migrations in flight over time: (seconds since start, in flight) at every start and end."""
        return tuple((e.at_s, int(e.detail["in_flight"])) for e in self.events if "in_flight" in e.detail)

    @property
    def decisions(self) -> tuple[dict[str, Any], ...]:
        """What the scheduler decided for each VM beyond starting it (escalations, aborts, skips,
        failures), for the audit record: the per-VM progress samples are left to the run's log."""
        return tuple({"at_s": round(e.at_s, 3), "kind": e.kind.value, "vm": e.vm, **e.detail}
                     for e in self.events
                     if e.kind in (EventKind.ESCALATED, EventKind.ABORTED, EventKind.FAILED, EventKind.SKIPPED,
                                   EventKind.RETUNED))

    @property
    def failed(self) -> tuple[MigrationResult, ...]:
        """The results whose VM is not known to be off its source: failed, aborted, never started, or
        unknown (where it runs could not be told when its migration failed)."""
        return tuple(r for r in self.results if r.outcome not in (StepOutcome.OK, StepOutcome.SKIPPED))

    def summary(self) -> str:
        """One line for a run's outcome: the VMs moved, and those stopped outside hostmaint instead."""
        moved = sum(r.outcome is StepOutcome.OK for r in self.results)
        stopped = [f"{r.vm} ({r.stopped_outside})" for r in self.results if r.stopped_outside is not None]
        return f"{moved} VM(s) moved" + (f"; stopped outside hostmaint, not moved: {', '.join(stopped)}"
                                         if stopped else "")


@dataclass
class _Flight:
    """A migration that was admitted: its state while it runs. ``lock`` guards the escalation fields."""

    spec: MigrationSpec
    rate: float
    options: MigrationOptions
    started_at: float
    budget_s: float
    level: Escalation = Escalation.NONE
    level_since_s: float = 0.0
    progress: ProgressTrack = field(default_factory=ProgressTrack)
    abort_reason: str | None = None
    released: bool = False  # handed its link share on while finishing
    reserve_ms: float = 0.0  # the switch-over reserve its downtime limit was set with
    share_mib_s: float = 0.0  # the link share it counts on at its switch-over (:func:`switchover_share`)
    escalated: bool = False  # its limit raised by escalation: its pause is long by choice, not learned from
    last_progress_event: float = -1e18
    lock: threading.Lock = field(default_factory=threading.Lock)
    # (seconds since the drain started, bytes processed) while it sends memory: the link meter's input
    sent: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=16))


def drain(plan: EvacuationPlan, hypervisor: Hypervisor, limits: Limits, *,
          options: MigrationOptions = MigrationOptions(),
          policy: SchedulerPolicy | None = None,
          bandwidth_mib_s: Mapping[str, float] | None = None,
          vm_memory_mib: Mapping[str, int] | None = None,
          dirty_rate: Mapping[str, float] | None = None,
          target_free_mib: Mapping[str, int] | None = None,
          vm_hugepage_kib: Mapping[str, int] | None = None,
          target_free_hugepages: Mapping[str, Mapping[int, int]] | None = None,
          on_event: Callable[[DrainEvent], None] | None = None,
          cancel: threading.Event | None = None,
          clock: Callable[[], float] = time.monotonic,
          poll_s: float = 0.05,
          route: Callable[[str, str], Route] | None = None,
          target_usable: Callable[[str], str | None] | None = None) -> DrainReport:
    """Live-migrate every placement of ``plan``; return all results and decisions together.

    ``bandwidth_mib_s`` is each host's link (default: the policy's), ``vm_memory_mib`` and
    ``dirty_rate`` (MiB/s) what is known of each VM (memory falls back to the placement's),
    ``target_free_mib`` the ordinary memory each target has free before the drain: a migration in
    flight counts against it. A VM in ``vm_hugepage_kib`` (its page size in KiB) is backed by
    hugepages and counts against its target's free pages of that size in ``target_free_hugepages``
    (host -> page size KiB -> free pages) instead. ``cancel``, once set, stops admitting, aborts
    what runs (except post-copy) and reports the rest as ABORTED. ``policy`` defaults to the
    adaptive one. ``route`` says how each (source, target) migration travels (TLS, migration
    address: :meth:`hostmaint.migration.transport.TransportPlan.route`); None: as ``options`` say.
    ``target_usable(host)`` is asked as each migration starts: a reason (the host was cordoned, went
    into maintenance) means it no longer takes VMs, and that migration is not started (FAILED, the
    target in ``report.withdrawn``): a plan's targets were in service when it was made, not forever.
    Never raises for a failed migration; its VM stays on its source and its result says why.
    """
    run = _Drain(plan, hypervisor, limits, options, policy or SchedulerPolicy(), bandwidth_mib_s or {},
                 vm_memory_mib or {}, dirty_rate or {}, vm_hugepage_kib or {}, target_free_mib,
                 target_free_hugepages, on_event, cancel, clock)
    run.route = route
    run.target_usable = target_usable
    return run.execute(poll_s)


class _Drain:
    """One drain's bookkeeping. The main thread admits and collects; workers migrate."""

    def __init__(self, plan: EvacuationPlan, hypervisor: Hypervisor, limits: Limits,
                 options: MigrationOptions, policy: SchedulerPolicy, bandwidth: Mapping[str, float],
                 memory: Mapping[str, int], dirty: Mapping[str, float], hugepage_kib: Mapping[str, int],
                 target_free_mib: Mapping[str, int] | None,
                 target_free_hugepages: Mapping[str, Mapping[int, int]] | None,
                 on_event: Callable[[DrainEvent], None] | None, cancel: threading.Event | None,
                 clock: Callable[[], float]) -> None:
        self.plan = plan
        self.hv = hypervisor
        self.control = hypervisor if isinstance(hypervisor, MigrationControl) else None
        self.retune = hypervisor if isinstance(hypervisor, DowntimeRetune) else None
        self.limits = limits
        self.options = options
        self.policy = policy
        self.bandwidth = bandwidth
        self.target_free_mib = target_free_mib
        self.target_free_hugepages = target_free_hugepages
        self.on_event = on_event
        self.cancel = cancel
        self.clock = clock
        self.t0 = clock()
        self.specs = [MigrationSpec(p, memory.get(p.vm, p.memory_mib), float(dirty.get(p.vm, 0.0)),
                                    hugepage_kib.get(p.vm, 0))
                      for p in plan.placements]
        self.links = {s.source: link_of(s.source, bandwidth, policy) for s in self.specs}
        # per source, the VM that decides the drain's length, kept at its whole stream (:func:`long_poles`)
        self.poles = long_poles(self.specs, self.links,
                                {src: stream_rate(options, policy, link) for src, link in self.links.items()}, policy,
                                options)
        self.lock = threading.Lock()  # guards events, results, counters
        self.events: list[DrainEvent] = []
        self.results: dict[str, MigrationResult] = {}
        self.bytes_moved = 0
        self.load = Load()
        self.max_concurrency = 0
        self.stop_reason: str | None = None
        self.meter = LinkMeter()
        self.route: Callable[[str, str], Route] | None = None
        self.target_usable: Callable[[str], str | None] | None = None
        self.withdrawn: set[str] = set()  # targets target_usable refused; guarded by lock

    # --- events -------------------------------------------------------------

    def emit(self, kind: EventKind, vm: str, **detail: Any) -> None:
        with self.lock:
            event = DrainEvent(round(self.clock() - self.t0, 3), kind, vm, detail)
            self.events.append(event)
            if self.on_event is not None:
                self.on_event(event)

    # --- main loop ----------------------------------------------------------

    def execute(self, poll_s: float) -> DrainReport:
        rates = {src: stream_rate(self.options, self.policy, link) for src, link in self.links.items()}
        pending = order_placements(self.specs, self.policy.order, self.links, rates)
        flights: dict[Future[MigrationResult], _Flight] = {}
        workers = max(1, min(len(self.specs), self.limits.migrations_per_cluster))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="drain") as pool:
            while pending or flights:
                if self.cancel is not None and self.cancel.is_set() and self.stop_reason is None:
                    self.stop_reason = "drain cancelled"
                    for flight in flights.values():
                        self.request_abort(flight, "drain cancelled")
                refusals: dict[str, str] = {}
                if self.stop_reason is None:
                    for spec in self.staggered(pending, flights.values()):
                        refusal = self.admit(spec, pool, flights)
                        if refusal is None:
                            pending.remove(spec)
                        else:
                            refusals[spec.vm] = refusal
                if not flights:
                    # Nothing runs and nothing may start: what is left can never move in this drain.
                    for spec in pending:
                        why = self.stop_reason or f"cannot start: {refusals.get(spec.vm, 'not admitted')}"
                        outcome = StepOutcome.ABORTED if self.stop_reason else StepOutcome.FAILED
                        self.record(MigrationResult(vm=spec.vm, source=spec.source, target=spec.target,
                                                    outcome=outcome, error=why))
                    pending = []
                    break
                done, _ = wait(list(flights), timeout=poll_s, return_when=FIRST_COMPLETED)
                for fut in done:
                    flight = flights.pop(fut)
                    result = fut.result()  # a bug in a driver surfaces here, never silently
                    self.load.remove(flight.spec, flight.rate, landed=result.outcome is StepOutcome.OK,
                                     released=flight.released)
                    self.record(result, flight)
                    self.learn_switchover(flight, result, flights.values())
                    if (self.policy.stop_on_first_failure and self.stop_reason is None
                            and result.outcome in (StepOutcome.FAILED, StepOutcome.ABORTED)):
                        self.stop_reason = f"stopped after {result.vm} did not move"
                for flight in flights.values():
                    self.watch(flight)
                    self.release_if_finishing(flight)
                self.measure_links(flights.values())
        ordered = tuple(self.results[s.vm] for s in self.specs)
        seconds = round(self.clock() - self.t0, 3)
        return DrainReport(ordered, tuple(self.events), seconds, self.max_concurrency, self.meter.observations(),
                           self.policy.switchover_ms, tuple(sorted(self.withdrawn)))

    def measure_links(self, flights: Iterable[_Flight]) -> None:
        """Show the link meter every source's migrations that are sending memory right now."""
        now = self.clock() - self.t0
        sending: dict[str, list[tuple[float, list[tuple[float, int]]]]] = {}
        for flight in flights:
            with flight.lock:
                samples = list(flight.sent)
            last = flight.progress.last
            # a migration with no fresh sample is finishing or stuck: what it sends is not known
            if not samples or last is None or last.data_remaining == 0 or now - samples[-1][0] > 1.5:
                continue
            sending.setdefault(flight.spec.source, []).append((flight.rate, samples))
        for source, entries in sending.items():
            self.meter.observe(source, entries)

    def staggered(self, pending: list[MigrationSpec], flights: Iterable[_Flight]) -> list[MigrationSpec]:
        """``pending`` in the order admission tries them now (:func:`admission_order`, as the simulator)."""
        if not self.policy.adaptive or not pending:
            return list(pending)
        shares = {src: planning_share(link, stream_rate(self.options, self.policy, link))
                  for src, link in self.links.items()}
        now = self.clock()
        ends: dict[str, list[float]] = {}
        for flight in flights:
            if flight.released:
                continue
            last = flight.progress.last
            source = flight.spec.source
            ends.setdefault(source, []).append(seconds_left(
                flight.spec, shares[source], self.policy,
                remaining_mib=None if last is None else last.data_remaining / MIB, elapsed_s=now - flight.started_at))
        return admission_order(pending, ends, shares, self.policy)

    def admit(self, spec: MigrationSpec, pool: ThreadPoolExecutor,
              flights: dict[Future[MigrationResult], _Flight]) -> str | None:
        link = self.links[spec.source]
        rate = stream_rate(self.options, self.policy, link)
        policy = throttling(self.policy, spec.source not in self.poles)
        refusal = admission_refusal(spec, self.load, self.limits, policy, link_mib_s=link,
                                    rate_mib_s=rate, target_free_mib=self.target_free_mib, options=self.options,
                                    target_free_hugepages=self.target_free_hugepages)
        if refusal is not None:
            return refusal
        sending = {f.spec.vm for f in flights.values() if not f.released}
        cap = pole_cap_mib_s(spec, self.poles, sending, link, rate, self.limits)
        share = switchover_share(link, rate, self.limits, self.policy)
        opts = options_for(spec, self.options, policy, rate, share, cap)
        stream = rate
        rate = stream_rate(opts, self.policy, link)  # within its cap, if it got one
        if self.route is not None:
            way = self.route(spec.source, spec.target)
            opts = opts.model_copy(update={"tls": way.tls, "migration_address": way.address})
        flight = _Flight(spec, rate, opts, self.clock(), migration_budget_s(spec.memory_mib, self.options),
                         reserve_ms=self.policy.switchover_ms, share_mib_s=share)
        if opts.auto_converge:
            flight.level = Escalation.AUTO_CONVERGE  # on from the start: the next step is post-copy
        self.load.add(spec, rate, expected_dirty_mib_s(spec, policy, stream, self.options))
        self.max_concurrency = max(self.max_concurrency, self.load.total)
        self.emit(EventKind.STARTED, spec.vm, source=spec.source, target=spec.target,
                  memory_mib=spec.memory_mib, dirty_mib_s=spec.dirty_mib_s, in_flight=self.load.total,
                  on_source=self.load.per_source[spec.source], on_target=self.load.per_target[spec.target],
                  auto_converge=opts.auto_converge, auto_converge_initial_pct=opts.auto_converge_initial_pct,
                  post_copy=opts.post_copy, downtime_limit_ms=opts.downtime_limit_ms,
                  bandwidth_mib_s=opts.bandwidth_mib_s,
                  switchover_reserve_ms=round(self.policy.switchover_ms, 1),
                  budget_s=round(flight.budget_s, 1))
        # The caller's context follows the migration onto its thread (a fresh copy each: a context can be
        # entered by one thread at a time), so the caller's logging sees whose run a record belongs to.
        flights[pool.submit(contextvars.copy_context().run, self.migrate_one, flight)] = flight
        return None

    def learn_switchover(self, flight: _Flight, result: MigrationResult, running: Iterable[_Flight]) -> None:
        """Reserve more for the next switch-overs when this one paused longer than the configured limit,
        and lower the limits of the ``running`` migrations to match."""
        if (result.outcome is not StepOutcome.OK or result.downtime_ms is None or flight.escalated
                or not (self.policy.adaptive and self.policy.downtime_aware and self.policy.learn_switchover)):
            return
        configured = self.options.downtime_limit_ms or QEMU_DOWNTIME_LIMIT_MS
        before = self.policy.switchover_ms
        # the policy in force carries the reserve: every later admission's limit is set from it
        self.policy = replace(self.policy, switchover_ms=learned_switchover_ms(
            before, flight.reserve_ms, flight.options.downtime_limit_ms, result.downtime_ms, configured))
        if self.policy.switchover_ms > before:
            for other in running:
                self.retune_downtime(other, configured)

    def retune_downtime(self, flight: _Flight, configured_ms: float) -> None:
        """Set a running migration's downtime limit from the reserve learned since it started: the
        migrations in flight when a pause outgrew the limit would otherwise pause as long. One raised
        by escalation, or switched to post-copy, keeps its own."""
        if self.retune is None:
            return
        with flight.lock:
            was = flight.options.downtime_limit_ms
            limit = retuned_downtime_ms(was, configured_ms, flight.rate, flight.share_mib_s, self.policy)
            if (limit is None or flight.escalated or flight.level is not Escalation.NONE
                    or flight.abort_reason is not None):
                return
            flight.options = flight.options.model_copy(update={"downtime_limit_ms": limit})
            flight.reserve_ms = self.policy.switchover_ms
        spec = flight.spec
        retune = self.retune

        def call() -> None:
            try:
                retune.set_downtime_limit(spec.vm, spec.source, limit)
            except DriverError as exc:
                self.emit(EventKind.RETUNED, spec.vm, downtime_limit_ms=limit, error=str(exc))

        self.emit(EventKind.RETUNED, spec.vm, downtime_limit_ms=limit, was_ms=was,
                  reserve_ms=round(self.policy.switchover_ms, 1))
        # on its own thread, as an abort: a source's libvirtd that hangs must not hold the scheduler
        threading.Thread(target=contextvars.copy_context().run, args=(call,), name=f"retune-{spec.vm}",
                         daemon=True).start()

    def record(self, result: MigrationResult, flight: _Flight | None = None) -> None:
        kind = {StepOutcome.OK: EventKind.FINISHED, StepOutcome.SKIPPED: EventKind.SKIPPED,
                StepOutcome.ABORTED: EventKind.ABORTED}.get(result.outcome, EventKind.FAILED)
        with self.lock:
            self.results[result.vm] = result
            self.bytes_moved += result.data_bytes
            done, moved = len(self.results), self.bytes_moved
        self.emit(kind, result.vm, source=result.source, target=result.target, outcome=str(result.outcome),
                  seconds=result.seconds, downtime_ms=result.downtime_ms, data_bytes=result.data_bytes,
                  error=result.error, in_flight=self.load.total, done=done, total=len(self.specs),
                  bytes_moved=moved, escalation=flight.level.name.lower() if flight else None)

    # --- one migration (worker thread) --------------------------------------

    def migrate_one(self, flight: _Flight) -> MigrationResult:
        spec = flight.spec
        why = self.target_usable(spec.target) if self.target_usable is not None else None
        if why is not None:
            with self.lock:
                self.withdrawn.add(spec.target)
            return self.result(spec, StepOutcome.FAILED, f"not started: {spec.target} {why}, since the plan was "
                               "made; it did not move")
        try:
            where = self.hv.locate(spec.vm)
        except DriverError as exc:
            return self.result(spec, StepOutcome.FAILED, f"cannot locate before migrating: {exc}")
        if spec.source not in where:
            # The world already changed (a re-run after a crash, or an operator moved it): nothing to do.
            if not where and (stopped := self.stopped_outside(spec)) is not None:
                return self.result(spec, StepOutcome.SKIPPED, f"stopped outside hostmaint before its migration: "
                                   f"shut off on {spec.source} ({stopped}); nothing to move", stopped=stopped)
            found = ", ".join(where) or "nowhere"
            return self.result(spec, StepOutcome.SKIPPED, f"not on {spec.source} (found on {found})")
        try:
            result = self.hv.migrate(spec.vm, spec.source, spec.target, flight.options,
                                     lambda sample: self.on_progress(flight, sample))
        except DriverError as exc:  # MigrationError, or the connection dropped mid-way
            return self.after_failure(flight, exc)
        return result

    def after_failure(self, flight: _Flight, exc: DriverError) -> MigrationResult:
        spec = flight.spec
        seconds = round(self.clock() - flight.started_at, 3)
        if isinstance(exc, MigrationNotStarted):
            # never asked of libvirt: whatever answers now, the VM did not move
            return self.result(spec, StepOutcome.FAILED, f"{exc}; it did not move", seconds)
        try:
            where = self.hv.locate(spec.vm)
        except DriverError as exc2:
            # Not found on the hosts that answer: it may run on the one that does not (the target's
            # libvirtd died after the switch-over), so whether it moved cannot be known now; the next
            # run's discovery settles it (migration-found, or its origin cleared).
            return self.result(spec, StepOutcome.UNKNOWN, f"{exc}; whether it moved is unknown, it cannot be "
                               f"located: {exc2}", seconds)
        if tuple(where) == (spec.target,):
            if self.paused_for_migration(spec):
                # only the failed migration's own copy, not torn down yet: it never ran there
                return self.result(spec, StepOutcome.UNKNOWN, f"{exc}; whether it moved is unknown: its copy on "
                                   f"{spec.target} is paused by the migration", seconds)
            # It landed despite the error (e.g. the confirmation timed out): that is a success.
            return self.result(spec, StepOutcome.OK, f"reported {exc!s}, but runs on {spec.target}", seconds)
        if not where and (stopped := self.stopped_outside(spec)) is not None:
            # its tenant stopped it while it moved (libvirt fails the migration): not ours to move any more
            return self.result(spec, StepOutcome.SKIPPED, f"stopped outside hostmaint during its migration: shut "
                               f"off on {spec.source} ({stopped}); it did not move (libvirt reported: {exc})",
                               seconds, stopped=stopped)
        if not where:
            # running nowhere (every host answered): mid switch-over, or lost; not a known failure
            return self.result(spec, StepOutcome.UNKNOWN, f"{exc}; whether it moved is unknown: it runs on no "
                               "host right now", seconds)
        if spec.source not in where:
            return self.result(spec, StepOutcome.FAILED, f"{exc}; VM now on {', '.join(where)}", seconds)
        if flight.abort_reason is not None:
            return self.result(spec, StepOutcome.ABORTED, f"aborted: {flight.abort_reason}", seconds)
        return self.result(spec, StepOutcome.FAILED, str(exc), seconds)

    def paused_for_migration(self, spec: MigrationSpec) -> bool:
        """Whether ``spec.vm`` on its target is only the copy a live migration keeps paused there (drivers
        that can tell, :class:`MigrationStates`; one that cannot answer now: no)."""
        if not isinstance(self.hv, MigrationStates):
            return False
        try:
            return spec.vm in self.hv.in_migration(spec.target)
        except DriverError:
            return False

    def stopped_outside(self, spec: MigrationSpec) -> str | None:
        """libvirt's reason when ``spec.vm``, running nowhere, is shut off on its source by its guest or
        a tenant (``STOPPED_OUTSIDE_REASONS``); None otherwise, or when the source cannot say."""
        if not isinstance(self.hv, ShutOffReasons):
            return None
        try:
            reason = self.hv.shut_off_reasons(spec.source).get(spec.vm)
        except DriverError:
            return None
        return reason if reason in STOPPED_OUTSIDE_REASONS else None

    @staticmethod
    def result(spec: MigrationSpec, outcome: StepOutcome, error: str | None,
               seconds: float = 0.0, stopped: str | None = None) -> MigrationResult:
        return MigrationResult(vm=spec.vm, source=spec.source, target=spec.target, outcome=outcome,
                               seconds=seconds, error=error, stopped_outside=stopped)

    def on_progress(self, flight: _Flight, sample: MigrationProgress) -> None:
        """Called by the driver for every progress sample: record it and escalate if it stalls."""
        flight.progress.observe(sample)
        now = self.clock()
        if sample.data_processed > 0:
            with flight.lock:
                flight.sent.append((now - self.t0, sample.data_processed))
        if now - flight.last_progress_event >= self.policy.progress_event_s:
            flight.last_progress_event = now
            self.emit(EventKind.PROGRESS, sample.vm, elapsed_s=sample.elapsed_s,
                      data_processed=sample.data_processed, data_remaining=sample.data_remaining,
                      dirty_rate_bps=sample.dirty_rate_bps, iterations=sample.iterations)
        self.escalate(flight, sample.elapsed_s)

    def escalate(self, flight: _Flight, elapsed_s: float) -> None:
        with flight.lock:
            if flight.abort_reason is not None:
                return
            decision = next_action(
                flight.progress.history, budget_s=flight.budget_s, stall_s=self.options.stall_seconds,
                level=flight.level, level_since_s=flight.level_since_s,
                can_auto_converge=self.policy.auto_converge and self.control is not None,
                can_post_copy=flight.options.post_copy and self.control is not None,
                elapsed_s=elapsed_s)
            if decision.action is Action.CONTINUE:
                return
            if decision.action is Action.ABORT:
                flight.abort_reason = decision.reason
            else:
                flight.level = (Escalation.AUTO_CONVERGE if decision.action is Action.ENABLE_AUTO_CONVERGE
                                else Escalation.POST_COPY)
                flight.level_since_s = elapsed_s
                flight.escalated = True
        spec = flight.spec
        self.emit(EventKind.ESCALATED, spec.vm, action=str(decision.action), reason=decision.reason,
                  elapsed_s=round(elapsed_s, 3))
        if decision.action is Action.ABORT:
            self.call_abort(flight)
            return
        assert self.control is not None
        try:
            if decision.action is Action.ENABLE_AUTO_CONVERGE:
                self.control.enable_auto_converge(spec.vm, spec.source)
            else:
                self.control.start_post_copy(spec.vm, spec.source)
        except DriverError as exc:
            self.emit(EventKind.ESCALATED, spec.vm, action=str(decision.action), error=str(exc))
            if decision.action is Action.ENABLE_AUTO_CONVERGE:
                return  # it did not take; its level still counts, so the next stall goes one further
            # Post-copy did not take: the migration is still pre-copy, so "never abort in post-copy" must
            # not hold it (it would escape its budget and a cancel, which is held off during the switch).
            # The policy aborts it, decided now rather than at the next sample: it is stalled, and a
            # stalled driver may send none until the watchdog's budget runs out.
            with flight.lock:
                flight.level = Escalation.POST_COPY_FAILED
                flight.level_since_s = elapsed_s
            self.escalate(flight, elapsed_s)

    def request_abort(self, flight: _Flight, reason: str) -> None:
        with flight.lock:
            if flight.abort_reason is not None or flight.level is Escalation.POST_COPY:
                return
            flight.abort_reason = reason
        self.emit(EventKind.ESCALATED, flight.spec.vm, action=str(Action.ABORT), reason=reason)
        self.call_abort(flight)

    def call_abort(self, flight: _Flight) -> None:
        def abort() -> None:
            try:
                self.hv.abort(flight.spec.vm, flight.spec.source)
            except DriverError as exc:
                self.emit(EventKind.ESCALATED, flight.spec.vm, action=str(Action.ABORT), error=str(exc))

        # Always on its own thread: an abort can block (QEMU stuck "cancelling"), and neither the
        # scheduler nor the driver's progress loop (which called us) may wait for it.
        threading.Thread(target=contextvars.copy_context().run, args=(abort,), name=f"abort-{flight.spec.vm}",
                         daemon=True).start()

    def release_if_finishing(self, flight: _Flight) -> None:
        last = flight.progress.last
        if (flight.released or last is None or last.data_processed == 0
                or not about_to_finish(last.data_remaining, flight.rate, self.policy)):
            return
        flight.released = True
        self.load.release(flight.spec, flight.rate)

    def watch(self, flight: _Flight) -> None:
        """Watchdog for drivers that report no progress: the time budget holds without samples too."""
        elapsed = self.clock() - flight.started_at
        if elapsed >= flight.budget_s:
            self.escalate(flight, elapsed)
