"""The migration policy: which VM moves next, whether it may start now, and what to do when it stalls.

Everything here is pure and shared by the real executor (``hostmaint.migration.drain``) and the
what-if simulator (``hostmaint.migration.simulate``), so the simulator measures the very policy
that runs at night.

Three decisions:

* **order** (:func:`order_placements`): ours moves large, low-dirty VMs first and high-dirty VMs
  last. Large first keeps the link busy to the end (no lone big straggler); high-dirty last lets
  them run with the link to themselves, when their pre-copy rounds shrink fastest.
* **admission** (:func:`admission_refusal`): the inventory limits are hard upper bounds; inside
  them the adaptive policy starts just enough migrations to fill the source link and no more: a
  newcomer must add more link bandwidth than it dirties, and every migration sharing the link must
  keep its dirty rate well below its share (so the summed dirty rate stays well below the link).
* **downtime** (:func:`switchover_share`, :func:`downtime_limit_ms`): QEMU switches over when what is
  left fits its downtime limit at the rate it measures now, but on a full link a newcomer can take
  part of that rate during the final pause. The adaptive policy sets each migration's own limit from
  the share of the link it can count on at its switch-over, so the whole pause fits the configured one.
* **escalation** (:func:`next_action`): when a migration stops making progress, enable
  auto-converge, then switch to post-copy where allowed, then abort; a time budget per GiB caps
  every migration. Abort is the safe end state (the VM keeps running on its source); a migration
  already in post-copy is never aborted, because the VM then runs on the target, but one whose
  switch to post-copy failed is still pre-copy, and is aborted.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum, StrEnum

from hostmaint.models import QEMU_DOWNTIME_LIMIT_MS, Limits, MigrationOptions, MigrationProgress, Placement
from hostmaint.placement.ledger import pages_for

MIB = 1024 * 1024
DEFAULT_LINK_MIB_S = 1100.0  # ~10 GbE after protocol overhead; the inventory's default too
DEFAULT_STREAM_MIB_S = 600.0  # what one QEMU migration connection pushes (~5 Gbit/s, CPU bound)
# A TLS connection's rate ÷ a plain one's: QEMU encrypts in its migration thread. Measured on the lab
# (benchmarks/drain.py --lab, TLS rows: 0.33; tls_cost.py alone: 0.50; lab notes: 250-360 vs 1000-1600 MB/s;
# 2 shared cores, TCG guests): hosts with AES-NI and free cores lose less, so the inventory's
# migration.tls_stream_factor overrides it
DEFAULT_TLS_STREAM_FACTOR = 0.35
# what a migration takes before it sends (connection, device state, confirmation), fitted on lab drains
DEFAULT_SETUP_S = 1.5


class Order(StrEnum):
    """The order in which pending migrations are offered to admission."""

    PLAN = "plan"  # as the evacuation plan lists them
    LARGEST_FIRST = "largest-first"
    SMALLEST_FIRST = "smallest-first"
    LOW_DIRTY_FIRST = "low-dirty-first"
    ADAPTIVE = "adaptive"  # large and low-dirty first, high-dirty last
    LONGEST_FIRST = "longest-first"  # longest expected migration first: M / (b - D), dirty-aware


class Action(StrEnum):
    """What to do with a running migration after looking at its progress."""

    CONTINUE = "continue"
    ENABLE_AUTO_CONVERGE = "enable-auto-converge"
    SWITCH_TO_POST_COPY = "switch-to-post-copy"
    ABORT = "abort"


class Escalation(IntEnum):
    """How far a migration has been escalated; only ever goes up."""

    NONE = 0
    AUTO_CONVERGE = 1
    POST_COPY = 2
    # the switch to post-copy was asked for and did not take: still pre-copy, so abort is all that is left
    POST_COPY_FAILED = 3


@dataclass(frozen=True)
class Decision:
    """An action and the reason for it (the reason goes to the audit record)."""

    action: Action
    reason: str


@dataclass(frozen=True)
class SchedulerPolicy:
    """How a drain orders, admits and escalates migrations. The inventory's ``Limits`` always bound it.

    ``max_per_source`` set and ``adaptive`` off gives the anchors' fixed limits (Nova 1, oVirt 2);
    neither set gives "unbounded" (only the inventory limits); ``adaptive`` is ours.
    """

    name: str = "adaptive"
    order: Order = Order.LONGEST_FIRST
    adaptive: bool = True
    max_per_source: int | None = None
    # admission: each running migration's dirty rate must stay below this part of its link share
    dirty_fraction: float = 0.7
    # a VM whose dirty rate is at least this share of its stream starts with auto-converge on (chosen on
    # the simulated drains: with 0.3 the worst seeds came 3-5 % closer to the floor than with 0.5)
    auto_converge_upfront_fraction: float = 0.3
    # ... and its throttle starts where its dirty rate falls to this share of the stream (adaptive only), so
    # it converges in a few rounds: pre-copy re-sends D / (b - D) of its memory, and on a full link those
    # bytes are the drain's time. A harder throttle for a shorter migration; never above
    # auto_converge_max_initial_pct, the guest slow-down the operator accepts upfront.
    auto_converge_target_fraction: float = 0.1
    auto_converge_max_initial_pct: int = 90
    # ... and on a source whose drain its link decides (no long pole: :func:`long_poles`), where every re-sent
    # byte is the drain's time, from this share of the stream down to this one (:func:`throttling`; adaptive only)
    link_bound_upfront_fraction: float = 0.2
    link_bound_target_fraction: float = 0.05
    stream_mib_s: float = DEFAULT_STREAM_MIB_S  # per connection; times options.parallel_connections
    tls_stream_factor: float = DEFAULT_TLS_STREAM_FACTOR  # a TLS connection's share of stream_mib_s
    default_link_mib_s: float = DEFAULT_LINK_MIB_S
    # escalation
    auto_converge: bool = True
    allow_post_copy: bool = False  # post-copy loses the VM if the network fails mid-way: opt in
    stop_on_first_failure: bool = False
    progress_event_s: float = 5.0  # at most one progress event per VM this often
    # a migration with less than this many seconds of data left hands its link share on (set-up overlap)
    lookahead_s: float = 2.0
    # what a migration takes before it sends: the adaptive policy staggers expected ends by it (:func:`admission_order`)
    setup_s: float = DEFAULT_SETUP_S
    # a newcomer whose expected end falls within this of a running migration's waits for the next one in order
    # that does not, when there is one (adaptive only; 0: plain order)
    stagger_s: float = 0.75
    # a VM whose own transfer outlasts its source's whole memory over the link decides the drain: while it
    # sends, the others from its source start capped, so it keeps its whole stream (:func:`long_poles`)
    long_pole_first: bool = True
    # a drain holds one set-up slot per this many streams that fill its link, at least one (:func:`setup_slots`)
    streams_per_setup_slot: int = 3
    # each migration's downtime limit from the link share it can count on at its switch-over (adaptive only)
    downtime_aware: bool = True
    # the part of the pause QEMU's limit leaves out (device state, the final handshake): the sim's figure
    switchover_ms: float = 30.0
    # ... raised within a drain when a pause outgrows the limit (learned_switchover_ms)
    learn_switchover: bool = True

    @classmethod
    def fixed(cls, per_source: int, order: Order = Order.PLAN, **kw: object) -> SchedulerPolicy:
        """The anchors' policy: a fixed number of migrations per source (Nova 1, oVirt/KubeVirt 2)."""
        return cls(name=f"fixed{per_source}", order=order, adaptive=False, max_per_source=per_source,
                   **kw)  # type: ignore[arg-type]

    @classmethod
    def unbounded(cls, order: Order = Order.PLAN, **kw: object) -> SchedulerPolicy:
        """Everything at once, bounded only by the inventory limits."""
        return cls(name="unbounded", order=order, adaptive=False, **kw)  # type: ignore[arg-type]


@dataclass(frozen=True)
class MigrationSpec:
    """What the scheduler knows about one pending migration."""

    placement: Placement
    memory_mib: int
    dirty_mib_s: float  # 0 when unknown
    hugepage_kib: int = 0  # the size of the hugepages backing its memory; 0 = ordinary memory

    @property
    def pages(self) -> int:
        """The hugepages it takes on its target (0 for ordinary memory): whole pages, as the planner
        charges them."""
        return pages_for(self.memory_mib, self.hugepage_kib) if self.hugepage_kib else 0

    @property
    def vm(self) -> str:
        return self.placement.vm

    @property
    def source(self) -> str:
        return self.placement.source

    @property
    def target(self) -> str:
        return self.placement.target


@dataclass
class Load:
    """The migrations running at one moment, summed the ways admission needs them."""

    total: int = 0
    per_source: dict[str, int] = field(default_factory=dict)
    per_target: dict[str, int] = field(default_factory=dict)
    # memory committed per host: in flight or landed onto it, minus what has left it
    target_mib: dict[str, int] = field(default_factory=dict)
    # the same for hugepage-backed VMs, in pages per (host, page size KiB): such a VM takes pages of its
    # size from the host's pool, not ordinary memory (the planner's rule), and gives them back there
    target_pages: dict[tuple[str, int], int] = field(default_factory=dict)
    source_rate: dict[str, float] = field(default_factory=dict)  # expected MiB/s leaving each source
    # the dirty rates of each source's migrations still using its link, by VM (after any upfront throttle)
    source_dirty: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, spec: MigrationSpec, rate: float, dirty_mib_s: float | None = None) -> None:
        """Count a migration that starts; ``dirty_mib_s`` is its expected dirty rate (default: the VM's)."""
        self.total += 1
        self.per_source[spec.source] = self.per_source.get(spec.source, 0) + 1
        self.per_target[spec.target] = self.per_target.get(spec.target, 0) + 1
        self.commit(spec.target, spec, 1)
        self.source_rate[spec.source] = self.source_rate.get(spec.source, 0.0) + rate
        self.source_dirty.setdefault(spec.source, {})[spec.vm] = (
            spec.dirty_mib_s if dirty_mib_s is None else dirty_mib_s)

    def release(self, spec: MigrationSpec, rate: float) -> None:
        """A migration about to finish gives its link share to the next one early, so the next one's
        set-up overlaps its last seconds. It still counts against the limits until it ends."""
        self.source_rate[spec.source] -= rate
        del self.source_dirty[spec.source][spec.vm]

    def remove(self, spec: MigrationSpec, rate: float, *, landed: bool, released: bool = False) -> None:
        """Uncount a migration that ended; a landed VM keeps its memory on the target."""
        self.total -= 1
        self.per_source[spec.source] -= 1
        self.per_target[spec.target] -= 1
        if landed:
            # the VM left its source: that memory is free for whatever migrates onto the source
            self.commit(spec.source, spec, -1)
        else:
            self.commit(spec.target, spec, -1)
        if not released:
            self.release(spec, rate)

    def commit(self, host: str, spec: MigrationSpec, sign: int) -> None:
        """Count (``sign`` 1) or uncount (-1) ``spec``'s memory on ``host``, in the pool it draws from."""
        if spec.hugepage_kib:
            key = (host, spec.hugepage_kib)
            self.target_pages[key] = self.target_pages.get(key, 0) + sign * spec.pages
        else:
            self.target_mib[host] = self.target_mib.get(host, 0) + sign * spec.memory_mib


def about_to_finish(remaining_bytes: int, rate_mib_s: float, policy: SchedulerPolicy) -> bool:
    """True when a migration's remaining data will be sent within the policy's look-ahead."""
    return policy.adaptive and rate_mib_s > 0 and remaining_bytes / MIB / rate_mib_s <= policy.lookahead_s


def link_of(host: str, bandwidth_mib_s: Mapping[str, float] | None, policy: SchedulerPolicy) -> float:
    """A host's link bandwidth in MiB/s: measured or from the inventory, else the policy's default."""
    if bandwidth_mib_s and host in bandwidth_mib_s:
        return float(bandwidth_mib_s[host])
    return policy.default_link_mib_s


def stream_rate(options: MigrationOptions, policy: SchedulerPolicy, link_mib_s: float) -> float:
    """What one migration can push on its own: its connections' cap (less under TLS), a bandwidth limit,
    the link."""
    rate = policy.stream_mib_s * options.parallel_connections
    if options.tls:
        rate *= policy.tls_stream_factor
    if options.bandwidth_mib_s is not None:
        rate = min(rate, float(options.bandwidth_mib_s))
    return min(rate, link_mib_s)


def slots_per_drain(links_mib_s: Mapping[str, float], limits: Limits, policy: SchedulerPolicy,
                    options: MigrationOptions, drains_waiting: int = 1) -> int:
    """The share of the cluster's migration slots a drain of these sources holds (source: its link).

    What the drain can use, at most what its sources may send at once and at most the whole limit.
    The adaptive policy fills a source's link and no more: enough streams to fill it, and set-up slots
    for the next migrations while others finish (:func:`about_to_finish`, :func:`setup_slots`). Holding
    more would only keep slots from the drains beside it (10 GbE, 600 MiB/s streams: 3 of a source's 8;
    25 GbE: 5 streams and 2 set-up slots). The fixed policies hold their fixed number; unbounded holds
    the inventory's.

    ``drains_waiting``: the drains of the cluster that want slots now, this one included. When they
    cannot all have the set-up slot, none takes it: the cluster's slots then move more data side by
    side (16 slots on 10 GbE: 8 drains at once instead of 5) than they save in set-ups inside one.
    """
    per_source = lean = 0
    for link in links_mib_s.values():
        if policy.adaptive:
            streams = streams_to_fill(link, stream_rate(options, policy, link))
            per_source += min(limits.migrations_per_source, streams + setup_slots(streams, policy))
            lean += min(limits.migrations_per_source, streams)
        else:
            fixed = min(limits.migrations_per_source, policy.max_per_source or limits.migrations_per_source)
            per_source += fixed
            lean += fixed
    full = max(1, min(limits.migrations_per_cluster, per_source))
    if drains_waiting > 1 and drains_waiting * full > limits.migrations_per_cluster:
        return max(1, min(limits.migrations_per_cluster, lean))
    return full


def setup_slots(streams: int, policy: SchedulerPolicy) -> int:
    """How many migrations a drain may have setting up beside the ``streams`` that fill its link: one per
    ``policy.streams_per_setup_slot`` streams, at least one.

    A migration hands its link share on when it has ``lookahead_s`` left and holds its slot until it ends,
    while its successor sets up. A drain's last VMs are its smallest (longest first): on 25 GbE five
    streams of 2 GiB VMs hand over about once a second, and one set-up slot serves one hand-over per
    set-up (1.5 s): the others wait, their streams idle (the benchmark's "link a stream short while VMs
    wait"). On 10 GbE two streams hand over rarely enough for one."""
    return max(1, math.ceil(streams / max(1, policy.streams_per_setup_slot)))


def drain_limits(limits: Limits, share: int) -> Limits:
    """The limits a drain holding ``share`` of the cluster's migration slots runs within."""
    return limits.model_copy(update={"migrations_per_cluster": max(1, min(share, limits.migrations_per_cluster))})


def drains_side_by_side(limits: Limits, policy: SchedulerPolicy, options: MigrationOptions,
                        link_mib_s: float | None = None, drains_waiting: int = 1) -> int:
    """How many single-host drains of a cluster fit side by side on links of ``link_mib_s`` (default:
    the policy's), with ``drains_waiting`` wanting slots. On 10 GbE with 8 per source a lone drain
    holds 3 slots; with more drains waiting than 16 per cluster fit at 3, each holds 2, and 8 fit."""
    link = policy.default_link_mib_s if link_mib_s is None else link_mib_s
    return max(1, limits.migrations_per_cluster // slots_per_drain({"": link}, limits, policy, options,
                                                                   drains_waiting))


def streams_to_fill(link_mib_s: float, rate_mib_s: float) -> int:
    """How many streams of ``rate_mib_s`` fill a link of ``link_mib_s`` (rounded first: 1100 ÷ 550 is 2)."""
    return math.ceil(round(link_mib_s / rate_mib_s, 6))


def switchover_share(link_mib_s: float, rate_mib_s: float, limits: Limits, policy: SchedulerPolicy) -> float:
    """The link share a migration can count on during its final pause: the link split among as many as
    may be sending from its source then (the streams that fill it, and each migration in a set-up slot
    whose set-up overlapped the last seconds: :func:`about_to_finish`, :func:`setup_slots`), within the
    inventory's per-source and cluster limits."""
    if rate_mib_s <= 0:
        return 0.0
    streams = streams_to_fill(link_mib_s, rate_mib_s)
    senders = max(1, min(limits.migrations_per_source, limits.migrations_per_cluster,
                         streams + setup_slots(streams, policy)))
    return min(rate_mib_s, link_mib_s / senders)


def downtime_limit_ms(limit_ms: float, rate_mib_s: float, share_mib_s: float, policy: SchedulerPolicy) -> int:
    """QEMU's downtime limit for one migration, so that its whole pause fits ``limit_ms``.

    QEMU switches over once what is left fits its limit at the rate it measures (at most the stream's
    ``rate_mib_s``); the rest is then sent at ``share_mib_s`` or more, and the switch-over itself adds
    ``policy.switchover_ms`` (the drain raises it when it learns more: :func:`learned_switchover_ms`).
    Scaling the limit by share ÷ rate keeps the sum within ``limit_ms``."""
    if rate_mib_s <= 0:
        return max(1, int(limit_ms))
    usable = max(1.0, limit_ms - policy.switchover_ms)
    return max(1, math.floor(usable * min(1.0, share_mib_s / rate_mib_s)))


def retuned_downtime_ms(current_ms: int | None, configured_ms: float, rate_mib_s: float, share_mib_s: float,
                        policy: SchedulerPolicy) -> int | None:
    """The lower downtime limit a running migration gets once the drain's reserve (``policy``) has risen
    (:func:`downtime_limit_ms` from it), or None when it keeps ``current_ms``: QEMU's own limit (None),
    no share known to scale by, or a limit already as low. The executor sets it on the running job; the
    simulator follows. A migration escalated or in post-copy is left out by the caller."""
    if current_ms is None or share_mib_s <= 0:
        return None
    limit = downtime_limit_ms(configured_ms, rate_mib_s, share_mib_s, policy)
    return limit if limit < current_ms else None


def learned_switchover_ms(reserve_ms: float, used_ms: float, set_ms: float | None, pause_ms: float,
                          limit_ms: float) -> float:
    """The switch-over reserve for the drain's next migrations, after one that was started with
    ``used_ms`` reserved and QEMU's limit ``set_ms``, and paused ``pause_ms`` against a configured
    ``limit_ms``.

    The reserve is what the whole pause takes beyond QEMU's own limit (device state, the handshake, on
    slow or busy hosts far more than the model's 30 ms). A pause over the limit shows the reserve was
    short; by how much is not known (what QEMU still sent in the pause is not reported), so the reserve
    rises to the larger reading: the overshoot on top of the reserve that migration used (not the
    current one: migrations in flight together would otherwise each add the same shortfall), or the
    pause less the QEMU limit it ran with (as if QEMU sent nothing more than it planned for: a
    migration whose limit is scaled less by its link share would otherwise overshoot again). It never
    falls within a drain (a pause under the limit says nothing about the next one's switch-over), and
    it keeps a tenth of the limit for QEMU's own part, so a migration can still converge."""
    if pause_ms <= limit_ms:
        return reserve_ms
    short = used_ms + pause_ms - limit_ms
    if set_ms is not None:
        short = max(short, pause_ms - set_ms)
    return max(reserve_ms, min(short, 0.9 * limit_ms))


def expected_seconds(spec: MigrationSpec, rate_mib_s: float) -> float:
    """A migration's expected time with ``rate_mib_s`` to itself: M / (b − D) while it converges.

    A VM dirtying near or above its bandwidth is carried by auto-converge or post-copy; their net rate
    is taken as a quarter of the bandwidth (a rough figure: it only ranks VMs, it promises nothing).
    """
    return spec.memory_mib / max(rate_mib_s - spec.dirty_mib_s, 0.25 * rate_mib_s)


def planning_share(link_mib_s: float, rate_mib_s: float) -> float:
    """The rate one migration can count on while its source's link is full: the link split among the
    streams that fill it, at most its own stream's rate."""
    if rate_mib_s <= 0:
        return 0.0
    return min(rate_mib_s, link_mib_s / streams_to_fill(link_mib_s, rate_mib_s))


def seconds_left(spec: MigrationSpec, share_mib_s: float, policy: SchedulerPolicy, *,
                 remaining_mib: float | None, elapsed_s: float) -> float:
    """When a running migration is expected to end: ``remaining_mib`` ÷ its share once it reports data
    (what is left, dirtied pages included), else the rest of its set-up and its whole expected time."""
    if remaining_mib is None:
        return max(0.0, policy.setup_s - elapsed_s) + expected_seconds(spec, share_mib_s)
    return remaining_mib / share_mib_s if share_mib_s > 0 else math.inf


def long_poles(specs: Sequence[MigrationSpec], links_mib_s: Mapping[str, float], rates_mib_s: Mapping[str, float],
               policy: SchedulerPolicy, options: MigrationOptions | None = None) -> dict[str, str]:
    """Per source, the VM that alone decides how long its drain takes, where one does (source -> VM).

    That is the longest migration (:func:`expected_seconds` at its stream's rate, at the dirty rate it will
    have once started: :func:`expected_dirty_mib_s`, so a VM throttled upfront is not taken for one that
    re-sends for minutes) when it takes at least as long as the source's whole memory over its link:
    however the others are packed, the drain ends when it does. Shared fairly, it gets a fifth of a
    25 GbE link (580 MiB/s with 600 MiB/s streams), not its stream, and ends that much later; so while
    it sends, the others start capped (:func:`pole_cap_mib_s`). Adaptive only; a source of one VM has none.
    """
    if not (policy.adaptive and policy.long_pole_first):
        return {}
    by_source: dict[str, list[MigrationSpec]] = {}
    for spec in specs:
        by_source.setdefault(spec.source, []).append(spec)
    poles: dict[str, str] = {}
    for source, group in by_source.items():
        rate = rates_mib_s.get(source, policy.stream_mib_s)
        link = links_mib_s.get(source, policy.default_link_mib_s)
        if len(group) < 2 or rate <= 0 or link <= 0:
            continue
        started = [replace(s, dirty_mib_s=expected_dirty_mib_s(s, policy, rate, options)) for s in group]
        longest = max(started, key=lambda s: expected_seconds(s, rate))
        if expected_seconds(longest, rate) >= sum(s.memory_mib for s in group) / link:
            poles[source] = longest.vm
    return poles


def pole_cap_mib_s(spec: MigrationSpec, poles: Mapping[str, str], sending: Collection[str], link_mib_s: float,
                   rate_mib_s: float, limits: Limits) -> int | None:
    """The bandwidth cap ``spec`` starts with: while its source's long pole (:func:`long_poles`) is among
    ``sending`` (the VMs still holding their link share) and is not ``spec``, the link less the pole's
    stream, split among the streams that fill the rest (25 GbE, 600 MiB/s streams: 2300 ÷ 4 = 575 MiB/s),
    so the pole keeps its whole stream while the link stays full. None: no cap (no pole sending, the
    pole's stream fills the link alone, or the drain may not run enough streams to fill the link
    (``limits``), so the pole has its whole stream anyway)."""
    pole = poles.get(spec.source)
    if pole is None or pole == spec.vm or pole not in sending:
        return None
    rest = link_mib_s - rate_mib_s
    if rest <= 0 or rate_mib_s <= 0:
        return None
    if streams_to_fill(link_mib_s, rate_mib_s) > min(limits.migrations_per_source, limits.migrations_per_cluster):
        return None
    return max(1, math.floor(rest / streams_to_fill(rest, rate_mib_s)))


def admission_order(pending: Sequence[MigrationSpec], ends_s: Mapping[str, Sequence[float]],
                    shares_mib_s: Mapping[str, float], policy: SchedulerPolicy) -> list[MigrationSpec]:
    """``pending`` (in :func:`order_placements`' order) as admission should try them now.

    Two migrations that end together both want their successor's set-up at once, and a drain holds one
    set-up slot (:func:`slots_per_drain`): the second successor waits for a slot and the link runs a
    stream short for a set-up (on 25 GbE most of the drain's time above the floor). So per source, the
    first pending migration whose expected end (``policy.setup_s`` + :func:`expected_seconds` at its
    share) lies at least ``policy.stagger_s`` from every one in ``ends_s`` (seconds until each running
    migration of that source still holding its link share ends: :func:`seconds_left`) goes first, in the
    place of that source's first; the others keep their order. When none does, the order is unchanged.
    The fixed policies keep their order."""
    if not policy.adaptive or policy.stagger_s <= 0 or not pending:
        return list(pending)
    chosen: dict[str, MigrationSpec] = {}
    for spec in pending:
        source = spec.source
        if source in chosen:
            continue
        ends = ends_s.get(source, ())
        share = shares_mib_s.get(source, 0.0)
        if not ends or share <= 0:
            chosen[source] = spec
            continue
        for cand in pending:
            if cand.source != source:
                continue
            end = policy.setup_s + expected_seconds(cand, share)
            if all(abs(end - e) >= policy.stagger_s for e in ends):
                chosen[source] = cand
                break
        else:
            chosen[source] = spec
    out: list[MigrationSpec] = []
    placed: set[str] = set()
    for spec in pending:
        first = chosen[spec.source]
        if spec.source not in placed:
            placed.add(spec.source)
            out.append(first)
        if spec is not first:
            out.append(spec)
    return out


def order_placements(specs: Sequence[MigrationSpec], order: Order,
                     link_mib_s: Mapping[str, float] | None = None,
                     rate_mib_s: Mapping[str, float] | None = None) -> list[MigrationSpec]:
    """Pending migrations in the order admission sees them. Stable, so equal keys keep plan order.

    ``rate_mib_s`` is what one migration from each source can push (for LONGEST_FIRST)."""
    if order is Order.PLAN:
        return list(specs)
    if order is Order.LONGEST_FIRST:
        rates = rate_mib_s or {}
        return sorted(specs, key=lambda s: -expected_seconds(s, rates.get(s.source, DEFAULT_STREAM_MIB_S)))
    if order is Order.LARGEST_FIRST:
        return sorted(specs, key=lambda s: -s.memory_mib)
    if order is Order.SMALLEST_FIRST:
        return sorted(specs, key=lambda s: s.memory_mib)
    if order is Order.LOW_DIRTY_FIRST:
        return sorted(specs, key=lambda s: s.dirty_mib_s)

    def band(spec: MigrationSpec) -> int:
        # Dirty rate as a share of the source link, in coarse bands: inside a band size decides,
        # so a large VM is not pushed behind a tiny one over a few MiB/s of difference.
        link = (link_mib_s or {}).get(spec.source, DEFAULT_LINK_MIB_S)
        share = spec.dirty_mib_s / link if link > 0 else 1.0
        return 0 if share < 0.05 else 1 if share < 0.2 else 2 if share < 0.5 else 3

    return sorted(specs, key=lambda s: (band(s), -s.memory_mib))


def admission_refusal(spec: MigrationSpec, load: Load, limits: Limits, policy: SchedulerPolicy, *,
                      link_mib_s: float, rate_mib_s: float,
                      target_free_mib: Mapping[str, int] | None = None,
                      options: MigrationOptions | None = None,
                      target_free_hugepages: Mapping[str, Mapping[int, int]] | None = None) -> str | None:
    """Why ``spec`` may not start now, or None when it may. Hard limits first, then the policy.

    ``target_free_mib`` is each target's free ordinary memory before the drain, ``target_free_hugepages``
    its free hugepages per page size (KiB); a host missing from one is not checked against it.
    """
    on_source = load.per_source.get(spec.source, 0)
    if load.total >= limits.migrations_per_cluster:
        return f"cluster limit {limits.migrations_per_cluster} reached"
    if on_source >= limits.migrations_per_source:
        return f"source {spec.source} at its limit {limits.migrations_per_source}"
    if load.per_target.get(spec.target, 0) >= limits.migrations_per_target:
        return f"target {spec.target} at its limit {limits.migrations_per_target}"
    if spec.hugepage_kib:
        # Libvirt's free memory excludes the hugepage pool: such a VM is judged by the free pages of its
        # size alone, as the planner placed it, and never by ordinary memory it does not use.
        if target_free_hugepages is not None and spec.target in target_free_hugepages:
            free = target_free_hugepages[spec.target].get(spec.hugepage_kib, 0)
            taken = load.target_pages.get((spec.target, spec.hugepage_kib), 0)
            if taken + spec.pages > free:
                return (f"target {spec.target} {spec.hugepage_kib} KiB hugepages: {taken} pages committed + "
                        f"{spec.pages} pages > {free} free")
    elif target_free_mib is not None and spec.target in target_free_mib:
        committed = load.target_mib.get(spec.target, 0)
        if committed + spec.memory_mib > target_free_mib[spec.target]:
            return (f"target {spec.target} memory: {committed} MiB committed + {spec.memory_mib} MiB "
                    f"> {target_free_mib[spec.target]} MiB free")
    if policy.max_per_source is not None and on_source >= policy.max_per_source:
        return f"policy {policy.name}: {policy.max_per_source} per source"
    sharing = list(load.source_dirty.get(spec.source, {}).values())  # migrations still using the link
    if not policy.adaptive or not sharing:
        return None  # one migration always runs, or a source would wait forever
    running_rate = load.source_rate.get(spec.source, 0.0)
    if running_rate >= link_mib_s * 0.999:
        return f"source link {spec.source} full ({running_rate:.0f}/{link_mib_s:.0f} MiB/s)"
    # what it will get once running: links are shared fairly, so its share, not the leftover
    n = len(sharing)
    gets = min(rate_mib_s, link_mib_s / (n + 1))
    dirty = expected_dirty_mib_s(spec, policy, rate_mib_s, options)
    if dirty >= policy.dirty_fraction * gets:
        return (f"would get {gets:.0f} MiB/s of {spec.source}'s link but dirties {dirty:.0f} MiB/s: "
                f"waits for more of the link")
    # When the newcomer makes the link the bottleneck, every migration's share shrinks. None that
    # converges comfortably now (dirty rate below dirty_fraction of its share) may be pushed past
    # that line, or its pre-copy rounds stop shrinking and its final pause grows. While the link has
    # room nobody's share changes; a VM already past the line relies on auto-converge either way.
    share_before = min(rate_mib_s, link_mib_s / n)
    share = min(rate_mib_s, link_mib_s / (n + 1))
    line_before, line = policy.dirty_fraction * share_before, policy.dirty_fraction * share
    pushed = [d for d in [*sharing, dirty] if line < d <= line_before]
    if pushed:
        return (f"a dirty rate of {max(pushed):.0f} MiB/s would pass {policy.dirty_fraction:.0%} of the "
                f"{share:.0f} MiB/s share each of {n + 1} migrations gets from {spec.source}")
    return None


def migration_budget_s(memory_mib: float, options: MigrationOptions) -> float:
    """The time a migration may take before it is aborted: seconds per GiB, with a floor."""
    return max(options.min_budget_seconds, options.seconds_per_gib * memory_mib / 1024)


# The driver has its own last word (:func:`last_word`: no progress for stall_seconds, or over budget). The
# scheduler escalates first: auto-converge at one stall period, post-copy or abort at two. The driver gets
# three, and a tenth more budget, so its rule only acts when the scheduler could not (it is wedged or gone).
DRIVER_STALL_FACTOR = 3.0
DRIVER_BUDGET_FACTOR = 1.1


QEMU_THROTTLE_INITIAL_PCT = 20


@functools.lru_cache(maxsize=64)  # admission asks it for every pending VM at every pass
def throttling(policy: SchedulerPolicy, link_bound: bool) -> SchedulerPolicy:
    """The policy a source's migrations are admitted and throttled by: ``policy``, and for the adaptive one on
    a source whose drain its link decides (``link_bound``: it has no long pole, :func:`long_poles`) the upfront
    throttle from ``link_bound_upfront_fraction`` of a stream down to ``link_bound_target_fraction``.

    Pre-copy re-sends D ÷ (b − D) of a VM's memory; on a full link each of those bytes is the drain's time,
    wherever in the drain it is sent. Where one VM decides the drain, the others' re-sends fit beside it and
    buy nothing, so they keep the plain rule. The depth stays within ``auto_converge_max_initial_pct``."""
    if not (policy.adaptive and link_bound):
        return policy
    up = min(policy.auto_converge_upfront_fraction, policy.link_bound_upfront_fraction)
    to = min(policy.auto_converge_target_fraction, policy.link_bound_target_fraction)
    if up == policy.auto_converge_upfront_fraction and to == policy.auto_converge_target_fraction:
        return policy
    return replace(policy, auto_converge_upfront_fraction=up, auto_converge_target_fraction=to)


def initial_throttle_pct(dirty_mib_s: float, rate_mib_s: float, policy: SchedulerPolicy) -> int:
    """The vCPU throttle that brings a guest's dirty rate down to ``auto_converge_target_fraction`` of
    its stream: at least QEMU's own 20 %, at most the policy's ``auto_converge_max_initial_pct``."""
    if dirty_mib_s <= 0 or rate_mib_s <= 0:
        return QEMU_THROTTLE_INITIAL_PCT
    needed = math.ceil(round(100 * (1 - policy.auto_converge_target_fraction * rate_mib_s / dirty_mib_s), 6))
    ceiling = max(QEMU_THROTTLE_INITIAL_PCT, policy.auto_converge_max_initial_pct)
    return min(ceiling, max(QEMU_THROTTLE_INITIAL_PCT, needed))


def upfront_throttle_pct(spec: MigrationSpec, policy: SchedulerPolicy, rate_mib_s: float,
                         options: MigrationOptions | None = None) -> int | None:
    """The vCPU throttle a migration starts with, or None when it starts unthrottled (or at QEMU's
    own 20 %: the fixed policies). Upfront for a VM dirtying ``auto_converge_upfront_fraction`` of its
    stream; an operator's ``auto_converge_initial_pct`` wins over the computed one."""
    upfront = policy.auto_converge and spec.dirty_mib_s >= policy.auto_converge_upfront_fraction * rate_mib_s
    if not (upfront and policy.adaptive):
        return None
    explicit = options.auto_converge_initial_pct if options is not None else None
    return explicit if explicit is not None else initial_throttle_pct(spec.dirty_mib_s, rate_mib_s, policy)


def expected_dirty_mib_s(spec: MigrationSpec, policy: SchedulerPolicy, rate_mib_s: float,
                         options: MigrationOptions | None = None) -> float:
    """The dirty rate a migration will see once started: the VM's, lowered by its upfront throttle."""
    pct = upfront_throttle_pct(spec, policy, rate_mib_s, options)
    return spec.dirty_mib_s if pct is None else spec.dirty_mib_s * (1 - pct / 100)


def options_for(spec: MigrationSpec, options: MigrationOptions, policy: SchedulerPolicy,
                rate_mib_s: float, share_mib_s: float | None = None,
                cap_mib_s: int | None = None) -> MigrationOptions:
    """The options the driver gets for one migration: its placement, post-copy capability, upfront
    auto-converge for a VM dirtying a large part of its stream, the driver's own stall/budget rule
    set behind the scheduler's (the scheduler keeps using ``options`` as given), and for the adaptive
    policy its own downtime limit from ``share_mib_s``, the link share it can count on at its
    switch-over (:func:`switchover_share`; None: the configured limit as it is). ``cap_mib_s`` is a
    bandwidth cap of its own (:func:`pole_cap_mib_s`; libvirt's migration bandwidth), within the
    configured one."""
    upfront = policy.auto_converge and spec.dirty_mib_s >= policy.auto_converge_upfront_fraction * rate_mib_s
    pct = upfront_throttle_pct(spec, policy, rate_mib_s, options)
    bandwidth = options.bandwidth_mib_s
    if cap_mib_s is not None:
        bandwidth = cap_mib_s if bandwidth is None else min(bandwidth, cap_mib_s)
    downtime = options.downtime_limit_ms
    if policy.adaptive and policy.downtime_aware and share_mib_s is not None:
        configured = QEMU_DOWNTIME_LIMIT_MS if downtime is None else downtime
        sends = rate_mib_s if bandwidth is None else min(rate_mib_s, float(bandwidth))
        downtime = downtime_limit_ms(configured, sends, share_mib_s, policy)
    return options.model_copy(update={
        "bandwidth_mib_s": bandwidth,
        "downtime_limit_ms": downtime,
        "placement": spec.placement,
        "auto_converge": options.auto_converge or upfront,
        "auto_converge_initial_pct": pct if pct is not None else options.auto_converge_initial_pct,
        # post-copy can only be switched to when the migration started post-copy capable
        "post_copy": options.post_copy or policy.allow_post_copy,
        "stall_seconds": options.stall_seconds * DRIVER_STALL_FACTOR,
        "seconds_per_gib": options.seconds_per_gib * DRIVER_BUDGET_FACTOR,
        "min_budget_seconds": options.min_budget_seconds * DRIVER_BUDGET_FACTOR,
    })


def _started(sample: MigrationProgress) -> bool:
    # libvirt reports a job before it has data: all zeros, and a "remaining" of 0 is no low at all
    return sample.data_total > 0


def stalled_for_s(history: Sequence[MigrationProgress]) -> float:
    """Seconds since ``data_remaining`` last reached a new low (0 before the job reports data)."""
    started = [s for s in history if _started(s)]
    if not started:
        return 0.0
    low = math.inf
    low_at = started[0].elapsed_s
    for sample in started:
        if sample.data_remaining < low:
            low, low_at = sample.data_remaining, sample.elapsed_s
    return history[-1].elapsed_s - low_at


class ProgressTrack:
    """The progress history :func:`next_action` needs, in constant space: the first sample at the
    lowest ``data_remaining`` so far, and the latest sample. Hours of samples cost nothing."""

    def __init__(self) -> None:
        self.low: MigrationProgress | None = None
        self.last: MigrationProgress | None = None

    def observe(self, sample: MigrationProgress) -> None:
        if not _started(sample):
            return  # no data yet: says nothing about progress
        if self.low is None or sample.data_remaining < self.low.data_remaining:
            self.low = sample
        self.last = sample

    @property
    def history(self) -> tuple[MigrationProgress, ...]:
        if self.low is None or self.last is None:
            return ()
        return (self.low,) if self.low is self.last else (self.low, self.last)


def next_action(history: Sequence[MigrationProgress], *, budget_s: float, stall_s: float,
                level: Escalation = Escalation.NONE, level_since_s: float = 0.0,
                can_auto_converge: bool = True, can_post_copy: bool = False,
                elapsed_s: float | None = None) -> Decision:
    """The next step for a running migration, from its progress so far. Pure.

    ``history`` holds its progress samples (oldest first); ``level`` is how far it has been
    escalated and ``level_since_s`` when (so an escalation gets ``stall_s`` to show an effect).
    ``elapsed_s`` overrides the last sample's time (a watchdog with no fresh sample).

    The stall period is at most a third of the budget, so the whole ladder (auto-converge, then
    post-copy or abort) fits inside it: with the defaults (60 s stall, 60 s budget floor) a VM under
    410 MiB was aborted by its budget before auto-converge was ever tried.
    """
    stall_s = min(stall_s, budget_s / 3)
    now = elapsed_s if elapsed_s is not None else (history[-1].elapsed_s if history else 0.0)
    if level is Escalation.POST_COPY:
        return Decision(Action.CONTINUE, "in post-copy: runs to completion, an abort would lose the VM")
    if level is Escalation.POST_COPY_FAILED:
        # It still runs pre-copy and stalled: nothing is left to try, and waiting for another stall period
        # only holds the target's memory and a slot. Abort is the safe end: the VM stays on its source.
        return Decision(Action.ABORT, "the switch to post-copy failed; the VM stays on its source")
    if now >= budget_s:
        return Decision(Action.ABORT, _over_budget(budget_s, now))
    if not history:
        return Decision(Action.CONTINUE, "no progress sample yet")
    stalled = _stalled_s(history, now, level_since_s)
    if stalled < stall_s:
        return Decision(Action.CONTINUE, "progressing")
    why = f"no progress for {stalled:.0f}s"
    if level < Escalation.AUTO_CONVERGE and can_auto_converge:
        return Decision(Action.ENABLE_AUTO_CONVERGE, why)
    if can_post_copy:
        return Decision(Action.SWITCH_TO_POST_COPY, why)
    return Decision(Action.ABORT, why + ("" if can_auto_converge else "; auto-converge unavailable")
                    + "; post-copy not allowed")


def last_word(history: Sequence[MigrationProgress], *, elapsed_s: float, budget_s: float, stall_s: float,
              level: Escalation = Escalation.NONE, can_post_copy: bool = False) -> Decision:
    """The driver's own rule, behind the scheduler's :func:`next_action`. Pure.

    Once a migration is over ``budget_s`` or its data left has reached no new low for ``stall_s``, it
    is switched to post-copy where it may be (``can_post_copy``, not tried yet), else aborted; in
    post-copy it runs to completion, and one whose switch failed (``POST_COPY_FAILED``) is aborted.
    The same budget and stall measure as :func:`next_action`, without its ladder: auto-converge is the
    scheduler's step, and the stall period is not capped to a third of the budget (that cap only makes
    the ladder fit in it). Over budget a migration that may use post-copy is switched, not aborted: it
    then lands on its target instead of starting over later (the lab pins this).
    """
    if level is Escalation.POST_COPY:
        return Decision(Action.CONTINUE, "in post-copy: runs to completion, an abort would lose the VM")
    if elapsed_s >= budget_s:
        why = _over_budget(budget_s, elapsed_s)
    else:
        # before the job reports data there is no low to miss: libvirt's first samples are all zeros
        stalled = _stalled_s(history, elapsed_s, 0.0) if any(_started(s) for s in history) else 0.0
        if stalled < stall_s:
            return Decision(Action.CONTINUE, "progressing")
        why = f"no progress for {stalled:.0f}s"
    if can_post_copy and level < Escalation.POST_COPY:
        return Decision(Action.SWITCH_TO_POST_COPY, why)
    return Decision(Action.ABORT, why)


def _over_budget(budget_s: float, now: float) -> str:
    return f"time budget {budget_s:.0f}s used up after {now:.0f}s"


def _stalled_s(history: Sequence[MigrationProgress], now: float, since_s: float) -> float:
    """Seconds without a new low of data left at ``now``, counted from ``since_s`` at the earliest."""
    return min(stalled_for_s(history) + (now - history[-1].elapsed_s), now - since_s)
