"""What-if simulator: how long a drain, or a whole maintenance window, will take. Pure and deterministic.

A discrete-event fluid model of live migration, driven by the very policy the drain executor uses
(:mod:`hostmaint.migration.policy`: order, admission, escalation):

* **links**: every host has one link (``SimParams.link_mib_s``, MiB/s) shared by the migrations
  leaving it and, separately, by those arriving; each migration is also capped by its streams
  (``SchedulerPolicy.stream_mib_s`` × ``MigrationOptions.parallel_connections``). Rates are max-min
  fair (progressive filling) and change only at events.
* **pre-copy**: round 1 sends the VM's memory M; each later round sends what the guest dirtied during
  the previous one (dirty rate D, at most M). With a steady rate b that sums to M / (b − D). When a
  round would fit in the downtime limit the VM pauses and the rest is sent (stop-and-copy: that is the
  downtime; the limit is the migration's own, as the scheduler set it, else the configured one: the
  options', or ``SimParams.downtime_limit_ms`` standing for QEMU's).
  With D ≥ b rounds never shrink: the migration does not converge.
* **auto-converge** throttles the guest's vCPUs like QEMU: 20 % first, +10 % per round while the round
  dirtied more than half of what it sent, up to 99 %; D becomes D × (1 − throttle).
* **post-copy**: the VM resumes on the target after a short switch-over; what is still dirty is sent
  once, never again.
* **set-up**: each migration first spends ``setup_s`` (connection, device state, confirmation) without
  using the link: the per-migration overhead, fitted on lab drains.
* **escalation**: every ``sample_s`` a running pre-copy migration produces a progress sample and
  :func:`~hostmaint.migration.policy.next_action` decides, as it would at night.

:func:`simulate_drain` estimates one drain; :func:`simulate_window` a rolling window of many hosts,
as many at once as N+1 capacity (and ``Limits.max_hosts_in_maintenance``) allows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from hostmaint.migration.policy import (
    DEFAULT_LINK_MIB_S,
    DEFAULT_SETUP_S,
    MIB,
    Action,
    Escalation,
    Load,
    MigrationSpec,
    ProgressTrack,
    SchedulerPolicy,
    about_to_finish,
    admission_order,
    admission_refusal,
    drains_side_by_side,
    expected_dirty_mib_s,
    learned_switchover_ms,
    long_poles,
    migration_budget_s,
    next_action,
    options_for,
    order_placements,
    planning_share,
    pole_cap_mib_s,
    retuned_downtime_ms,
    seconds_left,
    slots_per_drain,
    stream_rate,
    switchover_share,
    throttling,
)
from hostmaint.models import (
    EvacuationPlan,
    FleetSnapshot,
    HostState,
    Limits,
    MigrationOptions,
    MigrationProgress,
    Placement,
    StepOutcome,
    WindowPlan,
)
from hostmaint.placement.evacuate import BUSY, DUE, PREFERRED
from hostmaint.placement.rebalance import plan_rebalance

EPS = 1e-9


@dataclass(frozen=True)
class SimParams:
    """The physical side of the model. Defaults: 10 GbE, QEMU's 300 ms downtime limit."""

    link_mib_s: Mapping[str, float] = field(default_factory=dict)  # per host; else default_link_mib_s
    default_link_mib_s: float = DEFAULT_LINK_MIB_S
    downtime_limit_ms: float = 300.0
    setup_s: float = DEFAULT_SETUP_S  # per migration, without the link (lab: 1.9-2.2 s wall vs 0.7 s in QEMU)
    switchover_ms: float = 30.0  # device state and the final handshake
    sample_s: float = 1.0  # how often the executor looks at progress
    ac_initial: float = 0.2
    ac_step: float = 0.1
    ac_max: float = 0.99
    controls: bool = True  # the driver can escalate a running migration (MigrationControl)
    tls_setup_s: float = 1.3  # more per TLS migration: QEMU's TLS handshakes (lab: benchmarks/drain.py --lab)

    def link(self, host: str) -> float:
        return float(self.link_mib_s.get(host, self.default_link_mib_s))

    def setup(self, options: MigrationOptions) -> float:
        """A migration's set-up with these options (TLS adds its handshakes)."""
        return self.setup_s + (self.tls_setup_s if options.tls else 0.0)


class Phase(StrEnum):
    PENDING = "pending"
    SETUP = "setup"
    PRECOPY = "pre-copy"
    STOPCOPY = "stop-and-copy"
    POSTCOPY = "post-copy"
    DONE = "done"


@dataclass(frozen=True)
class SimMigration:
    """How one simulated migration went."""

    vm: str
    source: str
    target: str
    memory_mib: int
    dirty_mib_s: float
    outcome: StepOutcome
    start_s: float
    end_s: float
    sent_mib: float
    downtime_ms: float | None
    rounds: int
    escalation: Escalation
    reason: str = ""
    # the guest's vCPU time lost to auto-converge while it moved: the throttle integrated over its pre-copy
    throttled_s: float = 0.0

    @property
    def seconds(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True)
class DrainEstimate:
    """A simulated drain: every migration, the makespan and the floors it is measured against."""

    migrations: tuple[SimMigration, ...]
    makespan_s: float
    link_floor_s: float  # Σ memory ÷ link, on the busiest link
    vm_floor_s: float  # the slowest single VM with the link to itself: setup + M / (b − D)
    max_concurrency: int
    # what no schedule that moves every VM beats (:func:`valid_drain_floor_s`); 0 when not computed
    valid_floor_s: float = 0.0

    @property
    def lower_bound_s(self) -> float:
        return max(self.link_floor_s, self.vm_floor_s)

    @property
    def ratio(self) -> float:
        """Makespan ÷ lower bound (1.0 is the physical floor)."""
        return self.makespan_s / self.lower_bound_s if self.lower_bound_s > 0 else 1.0

    @property
    def valid_ratio(self) -> float:
        """Makespan ÷ the proven floor (:attr:`valid_floor_s`)."""
        return self.makespan_s / self.valid_floor_s if self.valid_floor_s > 0 else 1.0

    @property
    def memory_mib(self) -> int:
        return sum(m.memory_mib for m in self.migrations)

    @property
    def sent_mib(self) -> float:
        return sum(m.sent_mib for m in self.migrations)

    @property
    def throttled_s(self) -> float:
        """Guest-seconds of vCPU time lost to auto-converge (:attr:`SimMigration.throttled_s`), summed."""
        return sum(m.throttled_s for m in self.migrations)

    @property
    def not_moved(self) -> tuple[SimMigration, ...]:
        """Migrations that ended with the VM on its source (aborted or never admitted)."""
        return tuple(m for m in self.migrations if m.outcome is not StepOutcome.OK)

    def downtime_percentile_ms(self, pct: float) -> float:
        times = sorted(m.downtime_ms for m in self.migrations if m.downtime_ms is not None)
        if not times:
            return 0.0
        return times[min(len(times) - 1, max(0, math.ceil(pct / 100 * len(times)) - 1))]


@dataclass(frozen=True)
class HostEstimate:
    """One host of a simulated window."""

    host: str
    start_s: float
    drained_s: float
    end_s: float
    migrations: int
    outcome: StepOutcome  # FAILED: a VM did not move, the host is not patched
    drain_start_s: float = -1.0  # when its drain got its turn (at or after start_s)


@dataclass(frozen=True)
class WindowEstimate:
    """A simulated maintenance window: when each host is done, the makespan and its yardsticks."""

    cluster: str
    hosts: tuple[HostEstimate, ...]
    makespan_s: float
    parallel: int  # hosts in maintenance at once (N+1 and the inventory limit)
    serial_s: float  # the same hosts one at a time, same drains
    lower_bound_s: float  # max(Σ per-host time ÷ parallel, the longest host)
    migrations: tuple[SimMigration, ...] = ()
    # also counts whole hosts: of the m·parallel+1 longest hosts some slot runs m+1 one after another
    wave_bound_s: float = 0.0
    # every VM's last move off a host due in the window comes after the first patch (:attr:`first_patch_s`)
    # and before its source's patch: the longer of Σ memory ÷ the k fastest sources and Σ each VM's
    # floor ÷ the cluster's migration slots, then one patch (:func:`window_floor_bound`)
    drain_bound_s: float = 0.0
    # how many drains the flows' shares of the cluster's slots fit side by side (not a bound: a
    # schedule holding fewer slots per drain runs more)
    drains_at_once: int = 1
    # When every active host is due, a VM's last move must land on a patched host, and the first one
    # is back no sooner than the quickest host's floor drain and its patch
    first_patch_s: float = 0.0
    # the hosts' own floor drains and patches in the k maintenance slots: the slowest alone, Σ ÷ k, or
    # whole hosts (of the m·k + 1 longest some slot holds m + 1)
    host_floor_s: float = 0.0
    # the levelling rebalance the window runs after its last host (patch-window), when it still has time
    rebalance_moves: int = 0
    rebalance_s: float = 0.0
    # window_slot_bound's (whole hosts per slot, the first wave's VMs moving twice), when asked; else 0
    slot_bound_s: float = 0.0

    @property
    def total_s(self) -> float:
        """The window with its closing rebalance: patching (:attr:`makespan_s`), then levelling."""
        return self.makespan_s + self.rebalance_s

    @property
    def ratio(self) -> float:
        """Makespan ÷ (Σ per-host time ÷ parallel)."""
        return self.makespan_s / self.lower_bound_s if self.lower_bound_s > 0 else 1.0

    @property
    def wave_ratio(self) -> float:
        """Makespan ÷ the bound that also knows hosts are indivisible (30 hosts, 12 at once: 3 waves)."""
        bound = max(self.lower_bound_s, self.wave_bound_s)
        return self.makespan_s / bound if bound > 0 else 1.0

    @property
    def bound_s(self) -> float:
        """The window's lower bound, proven for every schedule within the limits (:attr:`valid_bound_s`).
        :attr:`lower_bound_s` and :attr:`wave_bound_s` are yardsticks from our own simulated drains,
        which a faster drain could beat, so they are not part of it."""
        return self.valid_bound_s

    @property
    def valid_bound_s(self) -> float:
        """The bound proven for every schedule within the limits (:func:`window_floor_bound`): the
        first patch, then every VM's last move off a due host, then one patch; or one host alone;
        and :func:`~hostmaint.migration.window_bound.window_slot_bound`'s when it was asked for."""
        return max(self.first_patch_s + self.drain_bound_s, self.host_floor_s, self.slot_bound_s)

    @property
    def valid_ratio(self) -> float:
        """Makespan ÷ :attr:`valid_bound_s`."""
        return self.makespan_s / self.valid_bound_s if self.valid_bound_s > 0 else 1.0

    @property
    def bound_ratio(self) -> float:
        """Makespan ÷ :attr:`bound_s`."""
        return self.makespan_s / self.bound_s if self.bound_s > 0 else 1.0

    def fits(self, window_s: float) -> bool:
        """True when the window ends within ``window_s`` and every host was patched."""
        return self.makespan_s <= window_s and all(h.outcome is StepOutcome.OK for h in self.hosts)

    def describe(self) -> str:
        """A few lines for an operator: duration, parallelism, the yardsticks, hosts that would fail."""
        failed = [h.host for h in self.hosts if h.outcome is not StepOutcome.OK]
        unmoved = sum(1 for m in self.migrations if m.outcome is not StepOutcome.OK)
        lines = [f"cluster {self.cluster}: {len(self.hosts)} hosts, {self.parallel} at once (N+1), "
                 f"estimated {self.makespan_s / 3600:.2f} h",
                 f"  serial would take {self.serial_s / 3600:.2f} h; lower bound "
                 f"{self.bound_s / 3600:.2f} h",
                 f"  {len(self.migrations)} migrations, {unmoved} not moved"]
        if self.rebalance_moves:
            lines.append(f"  then a rebalance of {self.rebalance_moves} moves, {self.rebalance_s / 60:.1f} min "
                         f"(skipped when the window has ended): {self.total_s / 3600:.2f} h in all")
        if failed:
            lines.append(f"  hosts left unpatched (a VM could not move): {', '.join(failed)}")
        return "\n".join(lines)


# --- the engine ------------------------------------------------------------------------


@dataclass
class _Mig:
    spec: MigrationSpec
    host_job: str | None = None
    phase: Phase = Phase.PENDING
    options: MigrationOptions | None = None
    cap: float = 0.0  # its streams' ceiling
    rate: float = 0.0  # allocated now
    admit_rate: float = 0.0  # what admission counted for it
    budget_s: float = 0.0
    start: float = 0.0
    setup_end: float = 0.0
    left: float = 0.0  # MiB left in this round / phase
    dirty_acc: float = 0.0  # MiB dirtied since the round began
    round_sent: float = 0.0
    rounds: int = 0
    sent: float = 0.0
    throttle: float = 0.0
    throttled_s: float = 0.0  # throttle × seconds while it dirtied (pre-copy)
    # what the guest really dirties, where the scheduler was told otherwise (spec.dirty_mib_s); None: the same
    true_dirty: float | None = None
    level: Escalation = Escalation.NONE
    level_since: float = 0.0
    reserve_ms: float = 0.0  # the switch-over reserve its downtime limit was set with
    share: float = 0.0  # the link share it counts on at its switch-over (:func:`switchover_share`)
    released: bool = False
    stop_start: float = 0.0
    downtime_ms: float | None = None
    outcome: StepOutcome | None = None
    reason: str = ""
    end: float = 0.0
    track: ProgressTrack = field(default_factory=ProgressTrack)

    @property
    def dirty(self) -> float:
        rate = self.spec.dirty_mib_s if self.true_dirty is None else self.true_dirty
        return rate * (1.0 - self.throttle)


def _allocate(flows: Sequence[_Mig], params: SimParams) -> None:
    """Max-min fair rates: each flow capped by its streams, each link shared out and in."""
    for m in flows:
        m.rate = 0.0
    capacity: dict[tuple[str, str], float] = {}
    for m in flows:
        capacity[("out", m.spec.source)] = params.link(m.spec.source)
        capacity[("in", m.spec.target)] = params.link(m.spec.target)
    active = list(flows)
    while active:
        users: dict[tuple[str, str], int] = {}
        for m in active:
            for key in (("out", m.spec.source), ("in", m.spec.target)):
                users[key] = users.get(key, 0) + 1
        step = min(capacity[k] / n for k, n in users.items())
        step = min(step, min(m.cap - m.rate for m in active))
        for m in active:
            m.rate += step
            capacity[("out", m.spec.source)] -= step
            capacity[("in", m.spec.target)] -= step
        full = {k for k in users if capacity[k] <= EPS * max(1.0, params.default_link_mib_s)}
        active = [m for m in active if m.cap - m.rate > EPS and ("out", m.spec.source) not in full
                  and ("in", m.spec.target) not in full]


class _Engine:
    """Runs migrations (and, for windows, host jobs) in simulated time."""

    def __init__(self, limits: Limits, policy: SchedulerPolicy, options: MigrationOptions,
                 params: SimParams, target_free_mib: Mapping[str, int] | None,
                 source_slots: Mapping[str, int] | None = None) -> None:
        self.limits = limits
        # a window's single-host drains each run within their share of the cluster's slots, the
        # shares together within the cluster's limit
        self.source_limits = {
            h: limits.model_copy(update={"migrations_per_source": min(n, limits.migrations_per_source)})
            for h, n in (source_slots or {}).items()}
        self.policy = policy
        self.options = options
        self.params = params
        # the configured downtime limit: the options', else QEMU's as the model has it (the executor's is QEMU's)
        self.configured = options if options.downtime_limit_ms is not None else options.model_copy(
            update={"downtime_limit_ms": max(1, round(params.downtime_limit_ms))})
        self.target_free_mib = dict(target_free_mib) if target_free_mib is not None else None
        self.t = 0.0
        self.load = Load()
        self.pending: list[_Mig] = []
        self.running: list[_Mig] = []
        self.done: list[_Mig] = []
        self.max_concurrency = 0
        # per source, the VM that decides its drain's length, kept at its whole stream (:func:`long_poles`)
        self.poles: dict[str, str] = {}
        self.next_sample = params.sample_s
        self.changed = True  # something happened that admission should look at

    def hold(self, source: str, slots: int) -> None:
        """A drain of ``source`` begins holding ``slots`` of the cluster's slots (its share)."""
        self.source_limits[source] = self.limits.model_copy(
            update={"migrations_per_source": min(slots, self.limits.migrations_per_source)})

    # admission, exactly as the executor does it
    def admit(self) -> None:
        if not self.changed:
            return  # nothing ended, released or arrived since the last try: same answer
        self.changed = False
        self.pending = self.staggered(self.pending)
        admitted: list[_Mig] = []
        # In plan order, hosts in the order they entered maintenance: the first host's drain gets the
        # shared slots first, so it finishes and goes to patching while the next ones still drain
        # (spreading slots evenly over hosts measured slower: all would patch at once, links idle).
        for m in self.pending:
            link = self.params.link(m.spec.source)
            rate = stream_rate(self.options, self.policy, link)
            limits = self.source_limits.get(m.spec.source, self.limits)
            policy = throttling(self.policy, m.spec.source not in self.poles)  # cached: asked per VM
            if admission_refusal(m.spec, self.load, limits, policy, link_mib_s=link,
                                 rate_mib_s=rate, target_free_mib=self.target_free_mib,
                                 options=self.options) is not None:
                continue
            admitted.append(m)
            sending = {r.spec.vm for r in self.running if not r.released}
            cap = pole_cap_mib_s(m.spec, self.poles, sending, link, rate, limits)
            share = switchover_share(link, rate, limits, self.policy)
            m.options = options_for(m.spec, self.configured, policy, rate, share, cap)
            sends = stream_rate(m.options, self.policy, link)  # within its cap, if it got one
            m.reserve_ms = self.policy.switchover_ms
            m.share = share
            m.cap = sends
            m.admit_rate = sends
            m.budget_s = migration_budget_s(m.spec.memory_mib, self.options)
            m.start = self.t
            m.setup_end = self.t + self.params.setup(m.options)
            m.phase = Phase.SETUP
            if m.options.auto_converge:
                m.level = Escalation.AUTO_CONVERGE
                m.throttle = self._ac_initial(m) if m.spec.dirty_mib_s > 0 else 0.0
            self.load.add(m.spec, sends, expected_dirty_mib_s(m.spec, policy, rate, self.options))
            self.max_concurrency = max(self.max_concurrency, self.load.total)
            self.running.append(m)
        if admitted:
            taken = {id(m) for m in admitted}
            self.pending = [m for m in self.pending if id(m) not in taken]

    def staggered(self, pending: list[_Mig]) -> list[_Mig]:
        """``pending`` in the order admission tries them now (:func:`admission_order`, as the executor)."""
        if not self.policy.adaptive or not pending:
            return pending
        shares: dict[str, float] = {}
        ends: dict[str, list[float]] = {}
        for m in pending:
            link = self.params.link(m.spec.source)
            shares[m.spec.source] = planning_share(link, stream_rate(self.options, self.policy, link))
        for m in self.running:
            if m.released or m.spec.source not in shares:
                continue
            remaining = None if m.phase is Phase.SETUP else m.left + m.dirty_acc
            ends.setdefault(m.spec.source, []).append(seconds_left(
                m.spec, shares[m.spec.source], self.policy, remaining_mib=remaining, elapsed_s=self.t - m.start))
        by_spec = {id(m.spec): m for m in pending}
        return [by_spec[id(s)] for s in admission_order([m.spec for m in pending], ends, shares, self.policy)]

    def _ac_initial(self, m: _Mig) -> float:
        pct = m.options.auto_converge_initial_pct if m.options is not None else None
        # QEMU refuses an initial throttle above its maximum: the model caps it the same way
        return self.params.ac_initial if pct is None else min(self.params.ac_max, pct / 100)

    def _ac_step(self, m: _Mig) -> float:
        pct = m.options.auto_converge_increment_pct if m.options is not None else None
        return self.params.ac_step if pct is None else pct / 100

    def finish(self, m: _Mig, outcome: StepOutcome, reason: str = "") -> None:
        m.phase = Phase.DONE
        m.outcome = outcome
        m.reason = reason
        m.end = self.t
        m.rate = 0.0
        self.running.remove(m)
        self.done.append(m)
        self.changed = True
        self.load.remove(m.spec, m.admit_rate, landed=outcome is StepOutcome.OK, released=m.released)

    def fail_pending(self, why: str) -> None:
        for m in self.pending:
            m.phase, m.outcome, m.reason, m.start, m.end = Phase.DONE, StepOutcome.FAILED, why, self.t, self.t
            self.done.append(m)
        self.pending = []

    def step(self, horizon: float = math.inf) -> bool:
        """Advance to the next event (at most to ``horizon``). False when nothing is running."""
        if not self.running:
            return False
        if self.next_sample <= self.t:  # time jumped over an idle stretch
            self.next_sample = self.t + self.params.sample_s
        flows = [m for m in self.running if m.phase in (Phase.PRECOPY, Phase.STOPCOPY, Phase.POSTCOPY)]
        _allocate(flows, self.params)
        when = min(horizon, self.next_sample)
        for m in self.running:
            if m.phase is Phase.SETUP:
                when = min(when, m.setup_end)
            elif m.rate > 0:
                when = min(when, self.t + m.left / m.rate)
        dt = max(0.0, when - self.t)
        for m in flows:
            sent = min(m.left, m.rate * dt)
            m.left -= sent
            m.sent += sent
            m.round_sent += sent
            if m.phase is Phase.PRECOPY:
                m.dirty_acc = min(float(m.spec.memory_mib), m.dirty_acc + m.dirty * dt)
                m.throttled_s += m.throttle * dt
        self.t = when
        for m in list(self.running):
            tol = EPS * max(1.0, m.rate)
            if m.phase is Phase.SETUP and m.setup_end <= self.t + EPS:
                m.phase, m.left, m.rounds = Phase.PRECOPY, float(m.spec.memory_mib), 1
            elif m.phase is Phase.PRECOPY and m.left <= tol:
                self.end_round(m)
            elif m.phase is Phase.STOPCOPY and m.left <= tol:
                m.downtime_ms = (self.t - m.stop_start) * 1000 + self.params.switchover_ms
                if self.policy.adaptive and self.policy.downtime_aware and self.policy.learn_switchover:
                    assert self.configured.downtime_limit_ms is not None
                    before = self.policy.switchover_ms
                    self.policy = replace(self.policy, switchover_ms=learned_switchover_ms(
                        before, m.reserve_ms, m.options.downtime_limit_ms if m.options else None,
                        m.downtime_ms, self.configured.downtime_limit_ms))
                    if self.policy.switchover_ms > before:
                        self.retune(self.configured.downtime_limit_ms)
                self.finish(m, StepOutcome.OK)
            elif m.phase is Phase.POSTCOPY and m.left <= tol:
                self.finish(m, StepOutcome.OK)
        if self.t >= self.next_sample - EPS:
            self.next_sample = self.t + self.params.sample_s
            for m in list(self.running):
                if m.phase is Phase.PRECOPY:
                    self.sample(m)
        for m in self.running:
            if (not m.released and m.phase in (Phase.PRECOPY, Phase.STOPCOPY, Phase.POSTCOPY)
                    and about_to_finish(int((m.left + m.dirty_acc) * MIB), m.admit_rate, self.policy)):
                m.released = True
                self.load.release(m.spec, m.admit_rate)
                self.changed = True
        return True

    def retune(self, configured_ms: float) -> None:
        """The executor's :meth:`_Drain.retune_downtime`: the migrations still in pre-copy (not escalated)
        get their downtime limit from the reserve just learned."""
        for r in self.running:
            if r.phase not in (Phase.SETUP, Phase.PRECOPY) or r.level is not Escalation.NONE or r.options is None:
                continue
            limit = retuned_downtime_ms(r.options.downtime_limit_ms, configured_ms, r.cap, r.share, self.policy)
            if limit is not None:
                r.options = r.options.model_copy(update={"downtime_limit_ms": limit})
                r.reserve_ms = self.policy.switchover_ms

    def end_round(self, m: _Mig) -> None:
        nxt = m.dirty_acc
        assert m.options is not None and m.options.downtime_limit_ms is not None
        # QEMU's rule: switch over once what is left fits the limit at the rate it measures now
        if nxt <= m.rate * m.options.downtime_limit_ms / 1000:
            m.phase, m.left, m.stop_start = Phase.STOPCOPY, nxt, self.t
            if nxt <= EPS:
                m.downtime_ms = self.params.switchover_ms
                self.finish(m, StepOutcome.OK)
            return
        if m.level >= Escalation.AUTO_CONVERGE and m.dirty_acc > 0.5 * m.round_sent:
            m.throttle = min(self.params.ac_max, max(self._ac_initial(m), m.throttle + self._ac_step(m)))
        m.left, m.dirty_acc, m.round_sent = nxt, 0.0, 0.0
        m.rounds += 1

    def sample(self, m: _Mig) -> None:
        assert m.options is not None
        elapsed = self.t - m.start
        m.track.observe(MigrationProgress(
            vm=m.spec.vm, elapsed_s=elapsed, data_total=m.spec.memory_mib * MIB,
            data_processed=int(m.sent * MIB), data_remaining=int((m.left + m.dirty_acc) * MIB),
            dirty_rate_bps=int(m.dirty * MIB), iterations=m.rounds))
        decision = next_action(m.track.history, budget_s=m.budget_s, stall_s=self.options.stall_seconds,
                               level=m.level, level_since_s=m.level_since,
                               can_auto_converge=self.policy.auto_converge and self.params.controls,
                               can_post_copy=m.options.post_copy and self.params.controls)
        if decision.action is Action.ENABLE_AUTO_CONVERGE:
            m.level, m.level_since = Escalation.AUTO_CONVERGE, elapsed
            m.throttle = max(m.throttle, self._ac_initial(m))
        elif decision.action is Action.SWITCH_TO_POST_COPY:
            m.level, m.level_since = Escalation.POST_COPY, elapsed
            m.phase, m.left, m.dirty_acc = Phase.POSTCOPY, m.left + m.dirty_acc, 0.0
            m.downtime_ms = self.params.switchover_ms
        elif decision.action is Action.ABORT:
            self.finish(m, StepOutcome.ABORTED, decision.reason)

    def result(self, m: _Mig) -> SimMigration:
        assert m.outcome is not None
        return SimMigration(vm=m.spec.vm, source=m.spec.source, target=m.spec.target,
                            memory_mib=m.spec.memory_mib, dirty_mib_s=m.spec.dirty_mib_s, outcome=m.outcome,
                            start_s=round(m.start, 6), end_s=round(m.end, 6), sent_mib=round(m.sent, 3),
                            downtime_ms=None if m.downtime_ms is None else round(m.downtime_ms, 3),
                            rounds=m.rounds, escalation=m.level, reason=m.reason,
                            throttled_s=round(m.throttled_s, 6))


def _specs(placements: Sequence[Placement], vm_memory_mib: Mapping[str, int] | None,
           dirty_rate: Mapping[str, float] | None) -> list[MigrationSpec]:
    memory, dirty = vm_memory_mib or {}, dirty_rate or {}
    return [MigrationSpec(p, memory.get(p.vm, p.memory_mib), float(dirty.get(p.vm, 0.0))) for p in placements]


def vm_floor_s(spec: MigrationSpec, options: MigrationOptions, policy: SchedulerPolicy,
               params: SimParams) -> float:
    """The fastest one VM can move with the links to itself: set-up + M / (b − D), or M / b post-copy."""
    b = min(stream_rate(options, policy, params.link(spec.source)), params.link(spec.target))
    if spec.dirty_mib_s < b:
        return params.setup(options) + spec.memory_mib / (b - spec.dirty_mib_s)
    return params.setup(options) + spec.memory_mib / b


def link_floor_s(specs: Sequence[MigrationSpec], params: SimParams) -> float:
    """Σ memory ÷ bandwidth on the busiest link, out or in: no drain beats it."""
    out: dict[str, float] = {}
    into: dict[str, float] = {}
    for s in specs:
        out[s.source] = out.get(s.source, 0.0) + s.memory_mib
        into[s.target] = into.get(s.target, 0.0) + s.memory_mib
    loads = [mib / params.link(h) for h, mib in out.items()] + [mib / params.link(h) for h, mib in into.items()]
    return max(loads, default=0.0)


def valid_drain_floor_s(specs: Sequence[MigrationSpec], options: MigrationOptions, policy: SchedulerPolicy,
                        params: SimParams) -> float:
    """A floor no drain of ``specs`` that moves every VM beats in this model, whatever its order, limits or
    escalation: the larger of

    * one set-up + Σ memory ÷ bandwidth on the busiest link (out or in): every migration spends its set-up
      (``params.setup``) sending nothing, so no byte crosses a link before the first set-up ends, and a
      VM that lands has sent at least its memory (round 1 is all of it; a switch to post-copy sends what
      round 1 had left), each over its source's link and its target's, at most at their bandwidth;
    * the largest set-up + M ÷ b of one VM (b: its stream, at most either link): its own bytes, on its own.

    Tighter than :attr:`DrainEstimate.lower_bound_s` by the set-up on the link term; its VM term leaves
    the dirty rate out (M ÷ b, not M ÷ (b − D)), since a throttled guest dirties less than D."""
    if not specs:
        return 0.0
    setup = params.setup(options)
    one = max(setup + s.memory_mib / min(stream_rate(options, policy, params.link(s.source)), params.link(s.target))
              for s in specs)
    return max(setup + link_floor_s(specs, params), one)


def simulate_drain(plan: EvacuationPlan | Sequence[Placement], limits: Limits, *,
                   policy: SchedulerPolicy | None = None, options: MigrationOptions = MigrationOptions(),
                   vm_memory_mib: Mapping[str, int] | None = None, dirty_rate: Mapping[str, float] | None = None,
                   target_free_mib: Mapping[str, int] | None = None,
                   params: SimParams = SimParams(),
                   true_dirty_rate: Mapping[str, float] | None = None) -> DrainEstimate:
    """Simulate draining ``plan`` as :func:`hostmaint.migration.drain` would run it. Pure.

    ``dirty_rate`` is MiB/s per VM (0 when unknown): what the scheduler is told, and what the guests dirty
    unless ``true_dirty_rate`` says otherwise (an estimate's error: the scheduler decides on ``dirty_rate``,
    the guests dirty at their true rate). The same arguments always give the same estimate.
    """
    policy = policy or SchedulerPolicy()
    placements = plan.placements if isinstance(plan, EvacuationPlan) else tuple(plan)
    specs = _specs(placements, vm_memory_mib, dirty_rate)
    engine = _Engine(limits, policy, options, params, target_free_mib)
    links = {s.source: params.link(s.source) for s in specs}
    rates = {src: stream_rate(options, policy, link) for src, link in links.items()}
    truth = true_dirty_rate or {}
    engine.pending = [_Mig(s, true_dirty=truth.get(s.vm)) for s in order_placements(specs, policy.order, links, rates)]
    engine.poles = long_poles(specs, links, rates, policy, options)
    while engine.pending or engine.running:
        engine.admit()
        if not engine.running:
            engine.fail_pending("cannot start: never admissible (limits or target memory)")
            break
        engine.step()
    by_vm = {m.spec.vm: engine.result(m) for m in engine.done}
    results = tuple(by_vm[s.vm] for s in specs)
    floor = max((vm_floor_s(s, options, policy, params) for s in specs), default=0.0)
    # floored to the microsecond, so rounding never lifts it past what it proves
    valid = math.floor(valid_drain_floor_s(specs, options, policy, params) * 1e6) / 1e6
    return DrainEstimate(results, round(engine.t, 6), round(link_floor_s(specs, params), 6), round(floor, 6),
                         engine.max_concurrency, valid)


# --- windows ---------------------------------------------------------------------------


def parallel_capacity(snapshot: FleetSnapshot, hosts: Sequence[str], *, spare_hosts: int = 1) -> int:
    """How many of ``hosts`` may be in maintenance at once while the rest still hold every VM and
    survive losing their ``spare_hosts`` largest hosts (memory, after reservations and headroom);
    at most ``limits.max_hosts_in_maintenance``, at least 1."""
    usable = {h.name: (h.memory_mib - h.reserved_memory_mib) * (1 - snapshot.limits.memory_headroom_pct / 100)
              for h in snapshot.hosts if h.state is HostState.ACTIVE or h.name in hosts}
    load = sum(v.memory_mib for v in snapshot.vms if v.host in usable)
    out_first = sorted(hosts, key=lambda n: -usable.get(n, 0.0))  # the worst case: the largest are out
    best = 1
    for k in range(1, min(len(hosts), snapshot.limits.max_hosts_in_maintenance) + 1):
        rest = sorted((c for n, c in usable.items() if n not in out_first[:k]), reverse=True)
        if load <= sum(rest[spare_hosts:]):
            best = k
        else:
            break
    return best


@dataclass
class _HostJob:
    name: str
    migs: list[_Mig]
    start: float = -1.0
    drain_start: float = -1.0
    drained: float = -1.0
    end: float = -1.0
    failed: bool = False


@dataclass(frozen=True)
class WindowFloor:
    """A lower bound on a window's makespan, valid for every schedule within the limits
    (:func:`window_floor_bound`), and its parts."""

    first_patch_s: float  # P: no VM's last move off a due host starts before the first host is patched
    escape_link_s: float  # Σ memory ÷ the k fastest sources' rates
    escape_slots_s: float  # Σ each VM's slot time (set-up + memory ÷ its stream − look-ahead) ÷ the slots
    patch_s: float  # the last such move's source is patched after it
    host_s: float  # the slowest host alone: its floor drain and its patch
    maintenance_s: float = 0.0  # Σ each host's floor drain and patch ÷ k, or whole hosts in k slots

    @property
    def escape_s(self) -> float:
        return max(self.escape_link_s, self.escape_slots_s)

    @property
    def total_s(self) -> float:
        return max(self.first_patch_s + self.escape_s + self.patch_s, self.host_s, self.maintenance_s)


def window_floor_bound(snapshot: FleetSnapshot, names: Sequence[str], k: int, *, patch_s: float,
                       policy: SchedulerPolicy | None = None, options: MigrationOptions = MigrationOptions(),
                       params: SimParams = SimParams()) -> WindowFloor:
    """No schedule of the window over ``names`` (at most ``k`` hosts in maintenance) ends sooner. Pure.

    The proof (benchmarks/RESULTS.md, "The night against its bound") assumes what the model and the
    flows have: a VM leaves a host only while that host is in maintenance (its drain); a migration
    holds one of the cluster's slots from its set-up until what it has left to send fits the policy's
    look-ahead (the adaptive policy then lets the next one set up), and sends the VM's whole memory
    at most at its stream's rate (pre-copy sends it at least once, post-copy too; dirty pages and
    throttling only add or are left out); a host sends at most at its link and per-source slots;
    no VM lands on a host in maintenance or not yet verified; a host is patched empty.

    * A VM's *escape* is its last move off a host due in the window. It lands on a host that will
      not be patched later (else it would move again), i.e. one patched already or not due.
    * When every active host is due, the first host is patched no sooner than ``P`` = the quickest
      host's floor drain (its own VMs are on it when it is cordoned) + ``patch_s``; so no escape
      starts before ``P``.
    * Every VM of a due host escapes once: its slot time (set-up + memory ÷ stream) within the
      cluster's slots, its memory within the sending rate of at most ``k`` sources (hosts in
      maintenance) at once.
    * The last escape's source is due, so it is patched after it: ``patch_s`` more.
    * Besides, every host holds one of the ``k`` maintenance slots while it drains (its own VMs at
      least) and patches: the slowest alone; Σ over hosts ÷ ``k``; and of the ``m·k + 1`` longest,
      some slot holds ``m + 1`` one after another.
    """
    policy = policy or SchedulerPolicy()
    limits = snapshot.limits
    due = set(names)
    setup = params.setup(options)
    into = max((params.link(h.name) for h in snapshot.hosts), default=params.default_link_mib_s)

    def stream(host: str) -> float:
        return stream_rate(options, policy, min(params.link(host), into))

    def send_rate(host: str) -> float:  # what one source can push: its link, its slots' streams
        if policy.adaptive:  # a migration about to finish frees its slot for the next one's set-up
            return params.link(host)
        return min(params.link(host), stream(host) * min(limits.migrations_per_source, limits.migrations_per_cluster))

    # the slot a migration holds: from its set-up until its rest fits the look-ahead (then the next begins)
    ahead = policy.lookahead_s if policy.adaptive else 0.0

    own: dict[str, list[int]] = {n: [] for n in names}
    for v in snapshot.vms:
        if v.host in due:
            own[v.host].append(v.memory_mib)

    def drain_floor(host: str) -> float:
        sizes = own[host]
        if not sizes:
            return 0.0
        return setup + max(sum(sizes) / send_rate(host), max(sizes) / stream(host))

    drains = [drain_floor(n) for n in names]
    outside = any(h.state is HostState.ACTIVE and h.name not in due for h in snapshot.hosts)
    first = 0.0 if outside or not drains else min(drains) + patch_s
    memory = sum(sum(sizes) for sizes in own.values())
    sources = sorted((send_rate(n) for n in names), reverse=True)[:max(1, min(k, len(names)))]
    link_s = memory / sum(sources) if sources else 0.0
    slots_s = sum(setup + max(0.0, m / stream(h) - ahead) for h, sizes in own.items() for m in sizes) / max(
        limits.migrations_per_cluster, 1)
    last = patch_s if memory else 0.0
    host_s = max(drains, default=0.0) + patch_s if names else 0.0
    each = sorted((d + patch_s for d in drains), reverse=True)
    slots = max(1, min(k, len(each)))
    held = max([sum(each) / slots] + [(m + 1) * each[m * slots] for m in range(math.ceil(len(each) / slots))],
               default=0.0)
    return WindowFloor(first_patch_s=first, escape_link_s=link_s, escape_slots_s=slots_s, patch_s=last, host_s=host_s,
                       maintenance_s=held)


def simulate_window(snapshot: FleetSnapshot, window: WindowPlan | Sequence[str], *,
                    policy: SchedulerPolicy | None = None, options: MigrationOptions = MigrationOptions(),
                    dirty_rate: Mapping[str, float] | None = None, params: SimParams = SimParams(),
                    patch_s: float = 600.0, parallel: int | None = None, spare_hosts: int = 1,
                    just_in_time: bool = False, drains_at_once: int | None = None,
                    focus: bool = True, rebalance_within: float | None = 0.10,
                    absorbers: Sequence[str] = (), yardsticks: bool = True,
                    slot_bound: bool = False) -> WindowEstimate:
    """Simulate a rolling window over ``snapshot``'s cluster: drain, patch (``patch_s``: update, reboot,
    verify) and return each host, ``parallel`` hosts at once (default: what N+1 capacity allows).

    ``drains_at_once``: how many hosts of the cluster may drain at the same time. ``None`` is what
    the flows allow: each drain holds its source's share of the cluster's migration slots (what its
    link can use, :func:`slots_per_drain`) and drains start while their shares fit the cluster's
    limit, onto disjoint targets (a host waits while its VMs could only go where another drain
    sends). 1 is one drain at a time per cluster. Hosts in maintenance not draining patch, or wait,
    cordoned.

    With a :class:`WindowPlan` its placements are used, and a host starts only when the hosts its VMs
    go to are not in maintenance (and those that send VMs to it are done sending). With a list of
    hosts each host's VMs are placed when its drain begins (as the flows re-plan a plan whose targets
    another drain took), largest first, ranked as the planner ranks them: patched hosts before hosts
    due later, busy hosts last, and with ``focus`` (the flows' patches) the drain's few focus hosts
    first within each; most free memory stands in for the balance objective. Also
    simulates the same hosts one at a time (``serial_s``), and each host alone (the lower bounds).

    ``absorbers``: hosts due later that drains prefer among the hosts due (focused drains only): the
    ones a planned window leaves slack for, so the VMs that must move twice lengthen no critical host.

    ``slot_bound``: also compute the tighter lower bound of
    :func:`~hostmaint.migration.window_bound.window_slot_bound` (an LP: seconds at 30 hosts) into
    ``bound_s``.

    ``yardsticks``: False skips the runs behind ``serial_s``, ``lower_bound_s`` and ``wave_bound_s``
    (the same hosts one at a time, and each alone: twice the window's own work), which are then 0.

    ``rebalance_within``: after the last host, the window's levelling rebalance (patch-window's
    ``rebalance_within_pct`` ÷ 100; None: none) is planned on the cluster as the window leaves it and
    simulated holding the cluster's whole migration limit (``rebalance_moves``, ``rebalance_s``; the
    makespan and the bounds are the patching alone). Pure and deterministic.
    """
    if not 0 <= patch_s < math.inf:  # a NaN patch never let the clock reach the window's end
        raise ValueError(f"patch_s: a finite number of seconds >= 0, got {patch_s}")
    if dirty_rate is not None and (bad := [vm for vm, r in dirty_rate.items() if not 0 <= r < math.inf]):
        raise ValueError(f"dirty_rate: a finite number of MiB/s >= 0 for every VM, not for {', '.join(sorted(bad))}")
    policy = policy or SchedulerPolicy()
    names = list(window.order) if isinstance(window, WindowPlan) else list(window)
    k = parallel if parallel is not None else parallel_capacity(snapshot, names, spare_hosts=spare_hosts)
    settings = _WindowSettings(policy, options, dirty_rate, params, patch_s, just_in_time, drains_at_once, focus,
                               frozenset(absorbers))
    run = _WindowScheduler(snapshot, window, names, k, settings).run()
    serial: WindowRun = ((), (), 0.0)
    solo: list[HostEstimate] = []
    if yardsticks:
        serial = run if k == 1 else _WindowScheduler(snapshot, window, names, 1, settings).run()
        # each host as it takes alone, from the window's start: every VM moves once (in a window, a VM
        # that lands on a host due later moves again, which only adds time)
        solo = [_WindowScheduler(snapshot, [n], [n], 1, settings).run()[0][0] for n in names]
    per_host = sorted((h.end_s - h.start_s for h in solo), reverse=True)
    bound = max(sum(per_host) / max(k, 1), max(per_host, default=0.0))
    waves = max(((m + 1) * per_host[m * k] for m in range(math.ceil(len(per_host) / k))), default=0.0)
    # the drains of a cluster, at most so many at a time (the smallest shares: the most), then one patch
    at_once = drains_at_once if drains_at_once is not None else max(
        (drains_side_by_side(snapshot.limits, policy, options, params.link(n), k) for n in names), default=1)
    floor = window_floor_bound(snapshot, names, k, patch_s=patch_s, policy=policy, options=options, params=params)
    tight = 0.0
    if slot_bound:
        from hostmaint.migration.window_bound import window_slot_bound  # it builds on this module

        tight = window_slot_bound(snapshot, names, k, patch_s=patch_s, policy=policy, options=options,
                                  params=params).bound_s
    hosts, migs, makespan = run
    moves: tuple[Placement, ...] = ()
    levelling = 0.0
    if rebalance_within is not None and all(h.outcome is StepOutcome.OK for h in hosts):
        # as patch-window: only when every host was patched, level rather than return home
        plan = plan_rebalance(window_end_snapshot(snapshot, migs), None, prefer_origin=False,
                              within=rebalance_within)
        moves = tuple(m.placement for m in plan.moves)
        if moves:
            levelling = simulate_drain(moves, snapshot.limits, policy=policy, options=options,
                                       dirty_rate=dirty_rate, params=params).makespan_s
    return WindowEstimate(cluster=snapshot.cluster, hosts=hosts, makespan_s=round(makespan, 3), parallel=k,
                          serial_s=round(serial[2], 3), lower_bound_s=round(bound, 3), migrations=migs,
                          wave_bound_s=round(waves, 3), drain_bound_s=round(floor.escape_s + floor.patch_s, 3),
                          drains_at_once=at_once, first_patch_s=round(floor.first_patch_s, 3),
                          host_floor_s=round(max(floor.host_s, floor.maintenance_s), 3),
                          rebalance_moves=len(moves), rebalance_s=round(levelling, 3),
                          slot_bound_s=math.floor(tight * 1000) / 1000)  # never rounded up past the proof


def window_end_snapshot(snapshot: FleetSnapshot, migrations: Sequence[SimMigration]) -> FleetSnapshot:
    """``snapshot`` as a simulated window leaves it: each VM where its last completed move put it, and
    each host's free memory changed by what left and arrived (spread over its cells by size, as the
    simulator does not place VMs in cells)."""
    where = {v.name: v.host for v in snapshot.vms}
    for m in sorted(migrations, key=lambda m: (m.end_s, m.vm)):
        if m.outcome is StepOutcome.OK:
            where[m.vm] = m.target
    delta = dict.fromkeys((h.name for h in snapshot.hosts), 0)
    for v in snapshot.vms:
        delta[v.host] += v.memory_mib
        delta[where[v.name]] -= v.memory_mib
    hosts = []
    for h in snapshot.hosts:
        size = h.memory_mib or 1
        cells = tuple(c.model_copy(update={"free_mib": max(0, c.free_mib + delta[h.name] * c.memory_mib // size)})
                      for c in h.cells)
        hosts.append(h.model_copy(update={"cells": cells}))
    vms = tuple(v.model_copy(update={"host": where[v.name]}) for v in snapshot.vms)
    return snapshot.model_copy(update={"hosts": tuple(hosts), "vms": vms})


@dataclass(frozen=True)
class _WindowSettings:
    """What stays the same across the runs of one :func:`simulate_window` (the window, serial, each host alone)."""

    policy: SchedulerPolicy
    options: MigrationOptions
    dirty_rate: Mapping[str, float] | None
    params: SimParams
    patch_s: float
    just_in_time: bool
    drains_at_once: int | None
    focus: bool
    absorbers: frozenset[str] = frozenset()


WindowRun = tuple[tuple[HostEstimate, ...], tuple[SimMigration, ...], float]


class _WindowScheduler:
    """One simulated run of a window: hosts enter maintenance (at most ``k`` at once), drain when the
    cluster's migration slots and their targets allow, patch, and leave; the engine moves the VMs.

    Each pass of :meth:`run` settles what finished, begins the drains that may begin, starts the
    hosts that may start, then lets the engine run to the next event.
    """

    # a host whose targets cannot be placed yet holds up the drains queued behind it
    first_come_first_served = True

    def __init__(self, snapshot: FleetSnapshot, window: WindowPlan | Sequence[str], names: list[str], k: int,
                 settings: _WindowSettings) -> None:
        self.names = names
        self.k = k
        self.settings = settings
        self.limits = limits = snapshot.limits
        self.free: dict[str, float] = {}
        for h in snapshot.hosts:
            self.free[h.name] = (h.memory_mib - h.reserved_memory_mib) * (1 - limits.memory_headroom_pct / 100)
        self.memory = {v.name: v.memory_mib for v in snapshot.vms}
        self.location = {v.name: v.host for v in snapshot.vms}
        for v in snapshot.vms:
            self.free[v.host] -= v.memory_mib
        self.planned: dict[str, list[Placement]] = {}
        if isinstance(window, WindowPlan):
            self.planned = {s.host: list(s.evacuation.placements) for s in window.steps}
        params = settings.params
        # each drain holds its share of the cluster's slots: what its link can use, without the set-up
        # slot when the window's hosts at once (or more waiting now) could not all have one (as the flows)
        self.share = {n: slots_per_drain({n: params.link(n)}, limits, settings.policy, settings.options)
                      for n in names}
        # The engine checks target memory from the free memory it is given; admission counts in-flight.
        self.engine = _Engine(limits, settings.policy, settings.options, params,
                              {n: int(f) for n, f in self.free.items()}, self.share)
        self.jobs = {n: _HostJob(n, []) for n in names}
        self.active = {h.name for h in snapshot.hosts if h.state is HostState.ACTIVE}
        self.order_idx = {n: i for i, n in enumerate(names)}
        self.waiting = list(names)
        self.in_maint: list[str] = []
        self.drain_queue: list[str] = []  # in maintenance, waiting for its turn to drain
        self.draining: set[str] = set()
        self.planned_targets: dict[str, list[Placement]] = {}
        self.patched: set[str] = set()
        self.timers: dict[str, float] = {}  # when each host drained (or failed to) leaves maintenance
        self.at_most_at_once = min(limits.migrations_per_source, limits.migrations_per_cluster)

    def run(self) -> WindowRun:
        """Run the window to its end: each host's estimate, every migration, the makespan."""
        engine = self.engine
        while self.waiting or self.in_maint:
            self._settle()
            self._begin_drains()
            self._start_hosts()
            engine.admit()
            horizon = min([*self.timers.values(), *self._wake_at()], default=math.inf)
            if not engine.running:
                if engine.pending:
                    engine.fail_pending("cannot start: never admissible (limits or target memory)")
                    continue
                if horizon == math.inf:
                    self._nothing_to_wait_for()
                    continue
                engine.t = max(engine.t, horizon)
                continue
            engine.step(horizon)
        return self._result()

    # --- hosts entering maintenance -----------------------------------------------------

    def _start_hosts(self) -> None:
        # Hosts that get a maintenance slot at the same moment all cordon before any of them plans (the
        # window submits their runs together; a plan comes after its host's cordon), so none of them
        # plans onto another: that one would wait for the drain before it could cordon.
        started = False
        for name in list(self.waiting):
            if len(self.in_maint) >= self.k:
                break
            if self.settings.just_in_time and self.engine.load.total >= self.limits.migrations_per_cluster:
                break  # every migration slot is taken: another host would only wait, cordoned
            if not self._can_start(name):
                continue
            self.waiting.remove(name)
            self.in_maint.append(name)
            self.jobs[name].start = self.engine.t
            self.drain_queue.append(name)
            started = True
        if started:
            self._begin_drains()

    def _can_start(self, name: str) -> bool:
        if not self.planned:
            return True
        targets = self._targets_of(name)
        if targets & set(self.in_maint):
            return False
        for t in targets:  # onto an earlier host only once it is patched
            if self.order_idx.get(t, len(self.names)) < self.order_idx[name] and t not in self.patched:
                return False
        # every earlier host that sends VMs here must be done sending
        return all(self.jobs[o].drained >= 0 for o in self.names[:self.order_idx[name]]
                   if name in self._targets_of(o))

    def _targets_of(self, name: str) -> set[str]:
        return {p.target for p in self.planned.get(name, [])}

    def _wake_at(self) -> list[float]:
        """Moments beyond the maintenance timers at which a pass must look again (none here)."""
        return []

    def _nothing_to_wait_for(self) -> None:
        """Nothing runs and no timer is due: the hosts still waiting can never start."""
        if self.waiting and not self.in_maint:
            self._give_up_waiting()

    def _give_up_waiting(self) -> None:
        """The hosts still waiting with nothing left to wait for: their dependencies can never be met."""
        for name in self.waiting:
            job = self.jobs[name]
            job.start = job.drained = job.end = self.engine.t
            job.failed = True
        self.waiting.clear()

    # --- drains ------------------------------------------------------------------------------

    def _begin_drains(self) -> None:
        for name in list(self.drain_queue):
            if not self._room_to_drain(name):
                return  # the cluster's slots go to the hosts in the order they entered
            busy = {p.target for d in self.draining for p in self.planned_targets.get(d, [])}
            if name in busy:
                # another drain is still sending VMs here: as the flows' host_maintenance waits for the
                # host's inbound lock, it holds its maintenance slot and cordons once that drain is done
                # (then its own drain takes those VMs along); the hosts after it go on
                continue
            placements = self._place(name, busy)
            if placements is None:
                if self.first_come_first_served:
                    return  # the next host waits behind it
                continue
            self.share[name] = self._share_now(name)  # counted while it is still in the queue
            self.drain_queue.remove(name)
            self._begin_drain(name, placements)

    def _room_to_drain(self, name: str) -> bool:
        if not self.draining:
            return True
        if self.settings.drains_at_once is not None:
            return len(self.draining) < self.settings.drains_at_once
        return sum(self.share[d] for d in self.draining) + self._share_now(name) <= self.limits.migrations_per_cluster

    def _share_now(self, name: str) -> int:
        settings = self.settings
        if settings.drains_at_once is not None:
            return self.share[name]
        return slots_per_drain({name: settings.params.link(name)}, self.limits, settings.policy, settings.options,
                               max(self.k, len(self.draining) + len(self.drain_queue)))

    def _begin_drain(self, name: str, placements: list[Placement]) -> None:
        """``name``'s drain takes its share of the slots and hands its migrations to the engine."""
        engine, params = self.engine, self.settings.params
        engine.hold(name, self.share[name])
        self.draining.add(name)
        self.planned_targets[name] = placements
        job = self.jobs[name]
        job.drain_start = engine.t
        placed = {p.vm for p in placements}
        unplaced = [v for v, h in self.location.items() if h == name and v not in placed]
        job.failed = bool(unplaced) and not self.planned
        specs = _specs(placements, self.memory, self.settings.dirty_rate)
        links = {s.source: params.link(s.source) for s in specs}
        rates = {src: stream_rate(self.settings.options, self.settings.policy, link) for src, link in links.items()}
        job.migs = [_Mig(s, host_job=name) for s in order_placements(specs, self.settings.policy.order, links, rates)]
        engine.pending.extend(job.migs)
        engine.changed = True
        engine.admit()  # its migrations take their slots before the next host is considered
        if not job.migs:
            job.drained = engine.t
            self.draining.discard(name)
            self.timers[name] = engine.t + (0.0 if job.failed else self.settings.patch_s)

    def _place(self, name: str, busy: set[str]) -> list[Placement] | None:
        """Where ``name``'s VMs go; None when one can only go to a host another drain fills now (it
        waits for that drain, as the flows wait for the target's inbound lock).

        As the planner ranks targets (``placement.evacuate``): not due for maintenance (patched, or
        outside the window) before due, busy last; with ``focus``, the drain's few focus hosts
        (emptiest first, as many as hold it) before the rest of their kind. Most free memory
        stands in for the planner's balance objective."""
        if self.planned:
            return self.planned.get(name, [])
        free, memory = self.free, self.memory
        out: list[Placement] = []
        vms = sorted((v for v, h in self.location.items() if h == name), key=lambda v: (-memory[v], v))
        candidates = [h for h in sorted(self.active) if h not in self.in_maint and h != name]
        due = {h for h in candidates if h in self.order_idx and h not in self.patched}
        chosen = self._focus_hosts(name, vms, candidates, due, busy) if self.settings.focus else set()
        for vm in vms:
            fitting = [h for h in candidates if free[h] >= memory[vm]]
            if not fitting:
                continue  # left on the host: the drain of this host fails
            best = max(fitting, key=lambda h: (-self._rank(h, busy, due, chosen), free[h], h))
            if best in busy:
                for p in out:
                    free[p.target] += p.memory_mib
                return None
            free[best] -= memory[vm]
            out.append(Placement(vm=vm, source=name, target=best, memory_mib=memory[vm], reason="simulated"))
        return out

    def _focus_hosts(self, name: str, vms: list[str], candidates: list[str], due: set[str],
                     busy: set[str]) -> set[str]:
        """The drain's focus hosts: not due first, emptiest first, as many as hold its VMs (at least
        enough targets for the slots the drain will hold, as the planner's ``focus_hosts``)."""
        at_least = math.ceil(min(self.at_most_at_once, max(1, self._share_now(name)))
                             / self.limits.migrations_per_target)
        need, room = sum(self.memory[v] for v in vms), 0.0
        chosen: set[str] = set()
        prefer = self.settings.absorbers
        for h in sorted((c for c in candidates if c not in busy),
                        key=lambda c: (c in due, c in due and c not in prefer, -self.free[c], c)):
            if room >= need and len(chosen) >= at_least:
                break
            if self.free[h] > 0:
                chosen.add(h)
                room += self.free[h]
        return chosen

    def _rank(self, host: str, busy: set[str], due: set[str], chosen: set[str]) -> int:
        if host in busy:
            return BUSY
        base = DUE if host in due else PREFERRED
        return base + 1 if self.settings.focus and host not in chosen else base

    # --- hosts leaving maintenance ----------------------------------------------------------

    def _settle(self) -> None:
        for name in list(self.in_maint):
            job = self.jobs[name]
            if job.drained < 0 and job.migs and all(m.phase is Phase.DONE for m in job.migs):
                self._end_drain(job)
            if name in self.timers and self.timers[name] <= self.engine.t + EPS:
                del self.timers[name]
                self.in_maint.remove(name)
                job.end = self.engine.t
                if not job.failed:
                    self.patched.add(name)

    def _end_drain(self, job: _HostJob) -> None:
        """Every migration of ``job``'s drain is over: the VMs that moved are on their targets."""
        job.drained = self.engine.t
        self.draining.discard(job.name)
        for m in job.migs:
            if m.outcome is StepOutcome.OK:
                self.location[m.spec.vm] = m.spec.target
                self.free[m.spec.source] += m.spec.memory_mib
            elif not self.planned:
                self.free[m.spec.target] += m.spec.memory_mib
        job.failed = job.failed or any(m.outcome is not StepOutcome.OK for m in job.migs)
        # a host with a VM left on it is not rebooted: it stays cordoned, the window goes on
        self.timers[job.name] = self.engine.t + (0.0 if job.failed else self.settings.patch_s)

    def _result(self) -> WindowRun:
        jobs = self.jobs.values()
        hosts = tuple(HostEstimate(host=j.name, start_s=round(j.start, 3), drained_s=round(j.drained, 3),
                                   end_s=round(j.end, 3), migrations=len(j.migs),
                                   outcome=StepOutcome.FAILED if j.failed else StepOutcome.OK,
                                   drain_start_s=round(j.drain_start, 3))
                      for j in jobs)
        migs = tuple(self.engine.result(m) for m in self.engine.done)
        return hosts, migs, max((j.end for j in jobs), default=0.0)
