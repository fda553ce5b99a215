"""The pure migration policy: escalation (next_action), admission and order. Table-driven."""

from __future__ import annotations

import math

import pytest

from hostmaint.migration.policy import (
    Action,
    Escalation,
    Load,
    MigrationSpec,
    Order,
    ProgressTrack,
    SchedulerPolicy,
    admission_order,
    admission_refusal,
    downtime_limit_ms,
    drain_limits,
    drains_side_by_side,
    expected_dirty_mib_s,
    initial_throttle_pct,
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
    setup_slots,
    slots_per_drain,
    stalled_for_s,
    stream_rate,
    switchover_share,
    throttling,
    upfront_throttle_pct,
)
from hostmaint.models import Limits, MigrationOptions, MigrationProgress, Placement

GIB = 1024**3


def samples(*points: tuple[float, int]) -> list[MigrationProgress]:
    return [MigrationProgress(vm="v", elapsed_s=t, data_total=1000, data_remaining=r) for t, r in points]


FALLING = samples((0, 900), (10, 700), (20, 500), (30, 300))
FLAT = samples((0, 900), (10, 500), (20, 600), (30, 550), (80, 700))  # last new low at 10 s


@pytest.mark.parametrize(("history", "level", "since", "ac", "pc", "budget", "expected"), [
    ([], Escalation.NONE, 0, True, True, 100, Action.CONTINUE),
    (FALLING, Escalation.NONE, 0, True, True, 100, Action.CONTINUE),
    (FLAT, Escalation.NONE, 0, True, True, 1000, Action.ENABLE_AUTO_CONVERGE),
    (FLAT, Escalation.NONE, 0, False, True, 1000, Action.SWITCH_TO_POST_COPY),
    (FLAT, Escalation.NONE, 0, False, False, 1000, Action.ABORT),
    (FLAT, Escalation.AUTO_CONVERGE, 0, True, True, 1000, Action.SWITCH_TO_POST_COPY),
    (FLAT, Escalation.AUTO_CONVERGE, 0, True, False, 1000, Action.ABORT),
    # an escalation gets stall_s to show an effect before the next one
    (FLAT, Escalation.AUTO_CONVERGE, 50, True, True, 1000, Action.CONTINUE),
    # the budget ends every pre-copy migration, progressing or not
    (FALLING, Escalation.NONE, 0, True, True, 30, Action.ABORT),
    # post-copy is never aborted: the VM already runs on the target
    (FLAT, Escalation.POST_COPY, 0, True, True, 10, Action.CONTINUE),
    # a switch to post-copy that failed leaves it pre-copy with nothing left to try: abort, at once
    (FLAT, Escalation.POST_COPY_FAILED, 80, True, True, 1000, Action.ABORT),
    (FALLING, Escalation.POST_COPY_FAILED, 30, True, True, 1000, Action.ABORT),
])
def test_next_action(history, level, since, ac, pc, budget, expected) -> None:
    decision = next_action(history, budget_s=budget, stall_s=60, level=level, level_since_s=since,
                           can_auto_converge=ac, can_post_copy=pc)
    assert decision.action is expected, decision.reason
    assert decision.reason


def test_watchdog_time_counts_as_stall_time_without_new_samples() -> None:
    history = samples((0, 900), (10, 500))
    assert next_action(history, budget_s=1000, stall_s=60, elapsed_s=30).action is Action.CONTINUE
    assert next_action(history, budget_s=1000, stall_s=60, elapsed_s=75).action is Action.ENABLE_AUTO_CONVERGE


def test_the_whole_ladder_fits_a_short_budget() -> None:
    """A 256 MiB VM has the 60 s budget floor; with a 60 s stall period it used to be aborted by the
    budget before auto-converge was tried. The stall period shrinks to a third of the budget."""
    history = samples((0, 900), (10, 500), (25, 600), (31, 550))  # last new low at 10 s
    assert next_action(history, budget_s=60, stall_s=60, elapsed_s=29).action is Action.CONTINUE
    assert next_action(history, budget_s=60, stall_s=60, elapsed_s=31).action is Action.ENABLE_AUTO_CONVERGE
    ladder = next_action(history, budget_s=60, stall_s=60, level=Escalation.AUTO_CONVERGE, level_since_s=31,
                         can_post_copy=True, elapsed_s=52)
    assert ladder.action is Action.SWITCH_TO_POST_COPY  # 21 s after auto-converge, still no new low
    # a long budget keeps the operator's stall period
    assert next_action(history, budget_s=1000, stall_s=60, elapsed_s=31).action is Action.CONTINUE


def test_samples_before_the_job_reports_data_are_no_progress_low() -> None:
    # libvirt's first jobStats of a migration: a job, but all zeros. Seen on the lab: without this
    # rule the zero "remaining" was the low and the migration was escalated after stall_s regardless.
    history = [MigrationProgress(vm="v", elapsed_s=0.5)] + samples((1, 900), (3, 800), (5, 700))
    assert stalled_for_s(history) == 0
    track = ProgressTrack()
    for s in history:
        track.observe(s)
    assert next_action(track.history, budget_s=100, stall_s=4).action is Action.CONTINUE
    only_zero = ProgressTrack()
    only_zero.observe(MigrationProgress(vm="v", elapsed_s=9.0))
    assert only_zero.history == ()


def test_progress_track_keeps_the_answer_of_the_full_history() -> None:
    track = ProgressTrack()
    for s in FLAT:
        track.observe(s)
    assert stalled_for_s(track.history) == stalled_for_s(FLAT) == 70


def test_budget_is_per_gib_with_a_floor() -> None:
    opts = MigrationOptions(seconds_per_gib=150, min_budget_seconds=60)
    assert migration_budget_s(64 * 1024, opts) == 9600
    assert migration_budget_s(100, opts) == 60


def spec(vm: str, mib: int, dirty: float = 0.0, source: str = "s", target: str = "t") -> MigrationSpec:
    return MigrationSpec(Placement(vm=vm, source=source, target=target, memory_mib=mib), mib, dirty)


def loaded(*running: tuple[MigrationSpec, float] | tuple[MigrationSpec, float, float]) -> Load:
    load = Load()
    for s, rate, *dirty in running:
        load.add(s, rate, *dirty)
    return load


BIG = Limits(migrations_per_source=16, migrations_per_target=16, migrations_per_cluster=64)


@pytest.mark.parametrize(("running", "candidate", "policy", "limits", "refused"), [
    ((), spec("a", 1024), SchedulerPolicy(), BIG, None),
    # the first migration of a source always starts, however dirty
    ((), spec("a", 1024, dirty=5000), SchedulerPolicy(), BIG, None),
    # fill the link: 600 + 600 >= 1100 -> a third waits
    ([(spec("x", 1), 600.0)], spec("a", 1024), SchedulerPolicy(), BIG, None),
    ([(spec("x", 1), 600.0), (spec("y", 1), 600.0)], spec("a", 1024), SchedulerPolicy(), BIG, "link"),
    # sharing the link, every dirty rate must stay below 70 % of the 550 MiB/s share (385)
    ([(spec("x", 1, dirty=350), 600.0)], spec("a", 1024, dirty=350), SchedulerPolicy(), BIG, None),
    ([(spec("x", 1, dirty=400), 600.0)], spec("a", 1024, dirty=10), SchedulerPolicy(), BIG, "dirty rate of 400"),
    ([(spec("x", 1, dirty=10), 600.0)], spec("a", 1024, dirty=400), SchedulerPolicy(auto_converge=False), BIG,
     "would get 550 MiB/s of s's link but dirties 400"),
    # ... unless the newcomer starts throttled: 400 MiB/s at 85 % is 60, well inside its share
    ([(spec("x", 1, dirty=10), 600.0)], spec("a", 1024, dirty=400), SchedulerPolicy(), BIG, None),
    # a running VM counts with the dirty rate it was admitted with (after its upfront throttle)
    ([(spec("x", 1, dirty=400), 600.0, 180.0)], spec("a", 1024, dirty=10), SchedulerPolicy(), BIG, None),
    # a newcomer is judged by the fair share it will get (550), not by the 100 MiB/s the link has left:
    # judged by the leftover, a dirty VM waited behind every smaller one and became the drain's tail
    ([(spec("x", 1), 1000.0)], spec("a", 1024, dirty=150), SchedulerPolicy(), BIG, None),
    ([(spec("x", 1), 1000.0)], spec("a", 1024, dirty=390), SchedulerPolicy(auto_converge=False), BIG,
     "would get 550"),
    # fixed policies ignore link and dirty rate, and stop at their number
    ([(spec("x", 1, dirty=400), 600.0), (spec("y", 1), 600.0)], spec("a", 1, dirty=900),
     SchedulerPolicy.unbounded(), BIG, None),
    ([(spec("x", 1), 600.0)], spec("a", 1), SchedulerPolicy.fixed(1), BIG, "policy fixed1"),
    # the inventory limits bound every policy
    ([(spec("x", 1), 1.0)], spec("a", 1), SchedulerPolicy.unbounded(), Limits(migrations_per_source=1), "source"),
    ([(spec("x", 1, source="o"), 1.0)], spec("a", 1), SchedulerPolicy.unbounded(),
     Limits(migrations_per_target=1), "target"),
    ([(spec("x", 1, source="o", target="p"), 1.0)], spec("a", 1), SchedulerPolicy.unbounded(),
     Limits(migrations_per_cluster=1), "cluster"),
])
def test_admission(running, candidate, policy, limits, refused) -> None:
    why = admission_refusal(candidate, loaded(*running), limits, policy, link_mib_s=1100.0, rate_mib_s=600.0)
    if refused is None:
        assert why is None
    else:
        assert why is not None and refused in why


def test_admission_counts_in_flight_memory_on_the_target_and_frees_it_on_the_source() -> None:
    load = loaded((spec("x", 3000), 1.0))
    free = {"t": 4000, "s": 0}
    why = admission_refusal(spec("a", 2000), load, BIG, SchedulerPolicy.unbounded(), link_mib_s=1100,
                            rate_mib_s=600, target_free_mib=free)
    assert why is not None and "memory" in why
    load.remove(spec("x", 3000), 1.0, landed=False)  # aborted: the target gets its memory back
    assert admission_refusal(spec("a", 2000), load, BIG, SchedulerPolicy.unbounded(), link_mib_s=1100,
                             rate_mib_s=600, target_free_mib=free) is None
    # a VM that left "t" frees room on it for a migration onto "t"
    load2 = loaded((spec("y", 2500, source="t", target="u"), 1.0))
    load2.remove(spec("y", 2500, source="t", target="u"), 1.0, landed=True)
    assert admission_refusal(spec("b", 6000), load2, BIG, SchedulerPolicy.unbounded(), link_mib_s=1100,
                             rate_mib_s=600, target_free_mib=free) is None


GIB_PAGE_KIB = 1024 * 1024


def test_admission_counts_hugepage_vms_against_the_free_pages_of_their_size() -> None:
    def hp(vm: str, gib: int, source: str = "s", target: str = "t", page_kib: int = GIB_PAGE_KIB) -> MigrationSpec:
        return MigrationSpec(Placement(vm=vm, source=source, target=target, memory_mib=gib * 1024), gib * 1024,
                             0.0, page_kib)

    def refusal(candidate: MigrationSpec, load: Load) -> str | None:
        return admission_refusal(candidate, load, BIG, SchedulerPolicy.unbounded(), link_mib_s=1100,
                                 rate_mib_s=600, target_free_mib={"t": 28 * 1024, "s": 0},
                                 target_free_hugepages={"t": {GIB_PAGE_KIB: 40, 2048: 4096}, "s": {}})

    # 28 GiB of ordinary memory free, 40 free 1 GiB pages: a 32 GiB hugepage VM is judged by the pages
    assert refusal(hp("a", 32), Load()) is None
    assert refusal(spec("plain", 32 * 1024), Load()) is not None  # the same VM on ordinary memory is not
    # in flight, its pages are committed: a second one does not fit the 8 pages left ...
    load = loaded((hp("a", 32), 1.0))
    why = refusal(hp("b", 32), load)
    assert why is not None and "1048576 KiB hugepages: 32 pages committed + 32 pages > 40 free" in why
    # ... while other page sizes and ordinary memory are other pools, untouched by it
    assert refusal(hp("c", 8, page_kib=2048), load) is None
    assert refusal(spec("plain", 20 * 1024), load) is None
    # a host without a pool of that size has no page for it
    assert refusal(hp("d", 1, target="s"), Load()) is not None
    # aborted: the target gets its pages back; landed: they stay there, and the source gets them back
    load.remove(hp("a", 32), 1.0, landed=False)
    assert refusal(hp("b", 32), load) is None
    load.add(hp("a", 32), 1.0)
    load.remove(hp("a", 32), 1.0, landed=True)
    assert refusal(hp("b", 32), load) is not None
    assert load.target_pages[("s", GIB_PAGE_KIB)] == -32 and load.target_mib.get("t", 0) == 0


def test_orders() -> None:
    specs = [spec("small", 512), spec("hot", 8192, dirty=600), spec("big", 4096, dirty=10),
             spec("warm", 16384, dirty=150)]
    names = lambda order: [s.vm for s in order_placements(specs, order)]  # noqa: E731
    assert names(Order.PLAN) == ["small", "hot", "big", "warm"]
    assert names(Order.LARGEST_FIRST) == ["warm", "hot", "big", "small"]
    assert names(Order.SMALLEST_FIRST) == ["small", "big", "hot", "warm"]
    assert names(Order.LOW_DIRTY_FIRST) == ["small", "big", "warm", "hot"]
    assert names(Order.ADAPTIVE) == ["big", "small", "warm", "hot"]


def test_a_newcomer_that_would_end_with_a_running_migration_waits_for_one_that_does_not() -> None:
    # 600 MiB/s each; a running migration ends in 8.9 s. A 4 GiB newcomer would end in 1.5 + 6.8 s: both
    # would want their successor's set-up at once. A 2 GiB one (1.5 + 3.4 s) goes first instead.
    policy = SchedulerPolicy()
    four, two, other = spec("four", 4096), spec("two", 2048), spec("elsewhere", 4096, source="s2")
    names = lambda pending, ends: [s.vm for s in admission_order(  # noqa: E731
        pending, ends, {"s": 600.0, "s2": 600.0}, policy)]
    assert names([four, two], {"s": [8.9]}) == ["two", "four"]
    assert names([four, two], {"s": [20.0]}) == ["four", "two"]  # far apart: the order stands
    assert names([four, two], {}) == ["four", "two"]  # nothing running
    assert names([four, two], {"s": [8.9, 4.6]}) == ["four", "two"]  # none fits: the order stands
    # per source, in the place of that source's first: another source's migration keeps its turn
    assert names([other, four, two], {"s": [8.9]}) == ["elsewhere", "two", "four"]
    assert names([four, other, two], {"s": [8.9], "s2": [8.5]}) == ["two", "four", "elsewhere"]
    fixed = [s.vm for s in admission_order([four, two], {"s": [8.9]}, {"s": 600.0}, SchedulerPolicy.fixed(2))]
    assert fixed == ["four", "two"]
    off = [s.vm for s in admission_order([four, two], {"s": [8.9]}, {"s": 600.0}, SchedulerPolicy(stagger_s=0))]
    assert off == ["four", "two"]


def test_a_vm_that_outlasts_its_sources_memory_over_the_link_is_the_drains_long_pole() -> None:
    # 25 GbE, 600 MiB/s streams: 64 GiB alone takes 109 s, all 76 GiB over the link 27 s
    policy = SchedulerPolicy()
    big, small = spec("big", 65536, dirty=2.0), [spec(f"s{i}", 2048) for i in range(6)]
    links, rates = {"s": 2900.0}, {"s": 600.0}
    assert long_poles([*small, big], links, rates, policy) == {"s": "big"}
    # with enough beside it the link decides: no pole (396 GiB over the link: 140 s)
    many = [*small, big, *(spec(f"m{i}", 16384) for i in range(20))]
    assert long_poles(many, links, rates, policy) == {}
    # the longest is by expected time at the dirty rate it will have: a 56 GiB VM dirtying 170 MiB/s (under
    # the upfront throttle's 30 %) outlasts an idle 64 GiB one; a 48 GiB one at 400 MiB/s starts throttled
    # to 60 MiB/s and does not (unthrottled it would take 246 s)
    warm, hot = spec("warm", 57344, dirty=170.0), spec("hot", 49152, dirty=400.0)
    assert long_poles([*small, big, warm], links, rates, policy) == {"s": "warm"}
    assert long_poles([*small, big, hot], links, rates, policy) == {"s": "big"}
    # one VM alone, the fixed anchors, the rule off: none
    assert long_poles([big], links, rates, policy) == {}
    assert long_poles([*small, big], links, rates, SchedulerPolicy.fixed(2)) == {}
    assert long_poles([*small, big], links, rates, SchedulerPolicy(long_pole_first=False)) == {}


def test_migrations_started_beside_a_sending_long_pole_leave_it_its_whole_stream() -> None:
    poles = {"s": "big"}
    small = spec("s0", 2048)
    seven = Limits(migrations_per_source=7, migrations_per_cluster=7)
    # 2900 MiB/s less the pole's 600, over the 4 streams that fill the rest: the pole keeps 600, not 580
    assert pole_cap_mib_s(small, poles, {"big", "s1"}, 2900.0, 600.0, seven) == 575
    assert pole_cap_mib_s(small, poles, {"s1"}, 2900.0, 600.0, seven) is None  # the pole ended or handed it on
    assert pole_cap_mib_s(spec("big", 65536), poles, {"big"}, 2900.0, 600.0, seven) is None  # not the pole itself
    assert pole_cap_mib_s(spec("x", 2048, source="s2"), poles, {"big"}, 2900.0, 600.0, seven) is None
    assert pole_cap_mib_s(small, poles, {"big"}, 600.0, 600.0, seven) is None  # the pole's stream is the link
    # a drain that may not run the five streams that fill the link leaves the pole its stream anyway; so do
    # streams capped far below the link (8 MiB/s each: the cap would only slow the others)
    four = Limits(migrations_per_source=4, migrations_per_cluster=7)
    assert pole_cap_mib_s(small, poles, {"big"}, 2900.0, 600.0, four) is None
    assert pole_cap_mib_s(small, poles, {"big"}, 1100.0, 8.0, seven) is None
    # the cap goes to the driver as the migration's bandwidth, within a configured one, and its downtime
    # limit is scaled from what it will send (575), not from the stream's 600
    opts = options_for(small, MigrationOptions(), SchedulerPolicy(), 600.0, 2900.0 / 6, 575)
    assert opts.bandwidth_mib_s == 575
    assert opts.downtime_limit_ms == math.floor(270 * (2900 / 6) / 575)
    assert options_for(small, MigrationOptions(bandwidth_mib_s=500), SchedulerPolicy(), 500.0, None,
                       575).bandwidth_mib_s == 500
    assert options_for(small, MigrationOptions(), SchedulerPolicy(), 600.0).bandwidth_mib_s is None


def test_where_the_link_decides_the_drain_a_moderately_dirty_vm_starts_throttled_deeper() -> None:
    # 130 MiB/s on a 600 MiB/s stream (22 %): it would re-send 28 % of its memory, the drain's time on a full
    # link. Where the link decides the drain it starts at the throttle that brings it to 5 % of the stream;
    # beside a long pole its re-sends fit in the pole's time, so the plain rule (from 30 %) leaves it alone.
    policy = SchedulerPolicy()
    warm = spec("warm", 8192, dirty=130.0)
    linked = throttling(policy, link_bound=True)
    assert upfront_throttle_pct(warm, linked, 600.0) == 77  # 130 × 0.23 = 30 MiB/s = 5 % of 600
    assert expected_dirty_mib_s(warm, linked, 600.0) == pytest.approx(130 * 0.23)
    assert options_for(warm, MigrationOptions(), linked, 600.0).auto_converge_initial_pct == 77
    assert upfront_throttle_pct(warm, throttling(policy, link_bound=False), 600.0) is None
    assert throttling(policy, link_bound=False) is policy
    # a VM dirtying 30 % or more is throttled either way, deeper where the link decides
    hot = spec("hot", 8192, dirty=300.0)
    assert upfront_throttle_pct(hot, policy, 600.0) == 80  # to 10 % of the stream
    assert upfront_throttle_pct(hot, linked, 600.0) == 90  # to 5 %, held at the 90 % ceiling
    # the fixed anchors are never changed; the rule can be set back to the plain one
    assert throttling(SchedulerPolicy.fixed(2), link_bound=True) == SchedulerPolicy.fixed(2)
    plain = SchedulerPolicy(link_bound_upfront_fraction=0.3, link_bound_target_fraction=0.1)
    assert throttling(plain, link_bound=True) is plain


def test_a_running_migrations_end_comes_from_what_it_has_left() -> None:
    policy = SchedulerPolicy()
    one = spec("one", 6000)
    assert seconds_left(one, 600, policy, remaining_mib=1200, elapsed_s=30) == pytest.approx(2.0)
    # no data yet: the rest of its set-up, then all of it
    assert seconds_left(one, 600, policy, remaining_mib=None, elapsed_s=0.5) == pytest.approx(1.0 + 10.0)
    assert seconds_left(one, 600, policy, remaining_mib=None, elapsed_s=9.0) == pytest.approx(10.0)
    assert planning_share(2900, 600) == pytest.approx(580)  # five streams fill 25 GbE
    assert planning_share(1100, 600) == pytest.approx(550)
    assert planning_share(1100, 1100) == pytest.approx(1100)


def test_stream_rate_and_options() -> None:
    policy = SchedulerPolicy()
    assert stream_rate(MigrationOptions(), policy, 1100) == 600
    assert stream_rate(MigrationOptions(parallel_connections=4), policy, 1100) == 1100
    assert stream_rate(MigrationOptions(bandwidth_mib_s=52), policy, 1100) == 52
    s = spec("a", 1024, dirty=400)
    opts = options_for(s, MigrationOptions(), SchedulerPolicy(allow_post_copy=True), 600)
    assert opts.placement == s.placement and opts.auto_converge and opts.post_copy
    calm = options_for(spec("b", 1024, dirty=10), MigrationOptions(), policy, 600)
    assert not calm.auto_converge and not calm.post_copy


@pytest.mark.parametrize(("dirty", "rate", "expected"), [
    (0.0, 600.0, 20),      # nothing known: QEMU's own start
    (300.0, 600.0, 80),    # 300 -> 60 = 0.1 x 600 needs 80 %
    (400.0, 600.0, 85),
    (5000.0, 600.0, 90),   # never more than the policy accepts upfront
    (70.0, 600.0, 20),     # never less than QEMU's 20 %
])
def test_initial_throttle_brings_the_dirty_rate_under_the_target_share(dirty, rate, expected) -> None:
    assert initial_throttle_pct(dirty, rate, SchedulerPolicy()) == expected


def test_upfront_throttle_reaches_the_driver_only_for_adaptive_policies() -> None:
    hot = spec("hot", 4096, dirty=400)
    ours = options_for(hot, MigrationOptions(), SchedulerPolicy(), 600)
    assert ours.auto_converge and ours.auto_converge_initial_pct == 85
    assert expected_dirty_mib_s(hot, SchedulerPolicy(), 600) == pytest.approx(60)
    fixed = options_for(hot, MigrationOptions(), SchedulerPolicy.fixed(2), 600)
    assert fixed.auto_converge and fixed.auto_converge_initial_pct is None  # QEMU's 20 %, like the anchors
    assert expected_dirty_mib_s(hot, SchedulerPolicy.fixed(2), 600) == 400
    calm = spec("calm", 4096, dirty=50)
    assert options_for(calm, MigrationOptions(), SchedulerPolicy(), 600).auto_converge_initial_pct is None
    # an operator's explicit setting wins
    mine = options_for(hot, MigrationOptions(auto_converge_initial_pct=30), SchedulerPolicy(), 600)
    assert mine.auto_converge_initial_pct == 30
    assert expected_dirty_mib_s(hot, SchedulerPolicy(), 600, MigrationOptions(auto_converge_initial_pct=30)) \
        == pytest.approx(280)  # admission counts it at the throttle it will really run with


def test_the_drivers_own_abort_rule_comes_after_the_schedulers_escalation() -> None:
    base = MigrationOptions(stall_seconds=60, seconds_per_gib=150, min_budget_seconds=60)
    driver = options_for(spec("a", 4096), base, SchedulerPolicy(), 600)
    # the scheduler escalates at 60 s without progress and decides post-copy/abort at 120 s
    assert driver.stall_seconds > 2 * base.stall_seconds
    assert migration_budget_s(4096, driver) > migration_budget_s(4096, base)


# --- a drain's share of the cluster's migration slots -----------------------------------------


@pytest.mark.parametrize(("link", "options", "per_source", "expected"), [
    (1100.0, MigrationOptions(), 8, 3),  # two 600 MiB/s streams fill 10 GbE, one more sets up
    (2900.0, MigrationOptions(), 8, 7),  # 25 GbE: five streams, two set-up slots (one per three streams)
    (2900.0, MigrationOptions(parallel_connections=4), 8, 3),  # 25 GbE, 4 connections: two streams, one more
    (6000.0, MigrationOptions(), 16, 14),  # ten streams, four set-up slots
    (2900.0, MigrationOptions(), 4, 4),  # never more than the source may send
    (1100.0, MigrationOptions(parallel_connections=4), 8, 2),  # one migration fills the link
    (1100.0, MigrationOptions(bandwidth_mib_s=100), 8, 8),  # slow streams: every slot the source has
    (64.0, MigrationOptions(), 8, 2),  # a slow link: one stream fills it
    (1200.0, MigrationOptions(), 8, 3),  # exactly two streams fill it, and one more
])
def test_a_drain_holds_the_slots_its_link_can_use(link: float, options: MigrationOptions, per_source: int,
                                                  expected: int) -> None:
    limits = Limits(migrations_per_source=per_source, migrations_per_cluster=64)
    assert slots_per_drain({"hv01": link}, limits, SchedulerPolicy(), options) == expected


def test_a_drain_holds_a_set_up_slot_per_three_streams_that_fill_its_link() -> None:
    # on 25 GbE five streams of small VMs hand over about once a second, one set-up slot one per 1.5 s
    assert [setup_slots(n, SchedulerPolicy()) for n in (1, 2, 3, 4, 5, 6, 7)] == [1, 1, 1, 2, 2, 2, 3]
    assert setup_slots(5, SchedulerPolicy(streams_per_setup_slot=99)) == 1  # the one slot of before
    one = SchedulerPolicy(streams_per_setup_slot=99)
    assert slots_per_drain({"hv01": 2900.0}, Limits(migrations_per_source=8, migrations_per_cluster=64), one,
                           MigrationOptions()) == 6


def test_fixed_and_unbounded_drains_hold_what_they_may_run() -> None:
    limits = Limits(migrations_per_source=8, migrations_per_cluster=16)
    links = {"hv01": 1100.0}
    assert slots_per_drain(links, limits, SchedulerPolicy.fixed(2), MigrationOptions()) == 2
    assert slots_per_drain(links, limits, SchedulerPolicy.unbounded(), MigrationOptions()) == 8


def test_a_drain_of_several_hosts_holds_each_ones_share_within_the_cluster() -> None:
    limits = Limits(migrations_per_source=8, migrations_per_cluster=16)
    two = {"hv01": 1100.0, "hv02": 2900.0}
    # 10 GbE: two streams and a set-up slot; 25 GbE: five streams and two set-up slots
    assert slots_per_drain(two, limits, SchedulerPolicy(), MigrationOptions()) == 3 + 7
    many = {f"hv{i:02d}": 1100.0 for i in range(8)}
    assert slots_per_drain(many, limits, SchedulerPolicy(), MigrationOptions()) == 16  # the whole limit


def test_how_many_drains_fit_side_by_side() -> None:
    options, policy = MigrationOptions(), SchedulerPolicy()
    assert drains_side_by_side(Limits(migrations_per_source=8, migrations_per_cluster=16), policy, options) == 5
    assert drains_side_by_side(Limits(migrations_per_source=2, migrations_per_cluster=8), policy, options) == 4
    assert drains_side_by_side(Limits(migrations_per_source=8, migrations_per_cluster=2), policy, options) == 1
    assert drains_side_by_side(Limits(migrations_per_source=8, migrations_per_cluster=16), policy, options,
                               link_mib_s=64.0) == 8


@pytest.mark.parametrize(("waiting", "expected"), [(1, 3), (5, 3), (6, 2), (8, 2), (30, 2)])
def test_drains_that_cannot_all_have_a_set_up_slot_hold_none(waiting: int, expected: int) -> None:
    # 16 per cluster, 10 GbE: 5 drains of 3 fit; from 6 waiting each holds the 2 that fill its link
    limits = Limits(migrations_per_source=8, migrations_per_cluster=16)
    policy, options = SchedulerPolicy(), MigrationOptions()
    assert slots_per_drain({"hv01": 1100.0}, limits, policy, options, drains_waiting=waiting) == expected
    assert drains_side_by_side(limits, policy, options, drains_waiting=waiting) == 16 // expected
    # fixed limits have no set-up slot to give up; a source allowed one stream keeps it
    assert slots_per_drain({"hv01": 1100.0}, limits, SchedulerPolicy.fixed(2), options, drains_waiting=waiting) == 2
    one = Limits(migrations_per_source=1, migrations_per_cluster=16)
    assert slots_per_drain({"hv01": 1100.0}, one, policy, options, drains_waiting=waiting) == 1


def test_a_drains_limits_are_its_share_of_the_cluster() -> None:
    limits = Limits(migrations_per_source=8, migrations_per_cluster=16)
    assert drain_limits(limits, 3).migrations_per_cluster == 3
    assert drain_limits(limits, 40).migrations_per_cluster == 16
    assert drain_limits(limits, 0).migrations_per_cluster == 1
    assert drain_limits(limits, 3).migrations_per_source == 8


# --- downtime at the switch-over -------------------------------------------------------


@pytest.mark.parametrize(("link", "rate", "share"), [
    (1100, 600, 1100 / 3),  # 10 GbE, one stream: two fill the link, a third's set-up overlaps their end
    (1100, 1100, 550),  # 10 GbE, multi-connection: one fills it, the next joins while it finishes
    (2750, 600, 2750 / 7),  # 25 GbE, one stream: five fill it, and two set-up slots' (one per three)
])
def test_the_share_at_the_switch_over_counts_the_migrations_whose_set_up_overlaps_it(
        link: float, rate: float, share: float) -> None:
    assert switchover_share(link, rate, Limits(migrations_per_source=8), SchedulerPolicy()) == pytest.approx(share)


def test_the_share_at_the_switch_over_is_never_below_what_the_limits_allow_to_send() -> None:
    # a fixed 2 per source cannot put a third on the link: each gets half of it
    assert switchover_share(1100, 600, Limits(migrations_per_source=2), SchedulerPolicy()) == pytest.approx(550)
    assert switchover_share(1100, 600, Limits(migrations_per_source=1), SchedulerPolicy()) == 600


def test_a_migration_that_will_share_the_link_at_its_switch_over_plans_a_shorter_pause() -> None:
    # QEMU decides at up to 600 MiB/s; the last data goes at 367: 300 ms planned would pause 490 ms + 30
    policy = SchedulerPolicy()
    planned = downtime_limit_ms(300, 600, 1100 / 3, policy)
    assert planned == 165
    assert planned / 1000 * 600 / (1100 / 3) * 1000 + policy.switchover_ms <= 300
    assert downtime_limit_ms(300, 550, 550, policy) == 270  # alone at its share: only the switch-over's part


def test_the_switch_over_reserve_rises_by_what_a_pause_over_the_limit_shows_was_short() -> None:
    # started with 30 ms reserved and QEMU's limit 250 (the share it counted on was 250 ÷ 270 of its
    # rate), it paused 373 against 300: 73 ms over on top of 30, or 123 beyond what QEMU planned for
    assert learned_switchover_ms(30, 30, 250, 373, 300) == 123
    assert learned_switchover_ms(30, 30, 171, 373, 300) == 202
    assert learned_switchover_ms(30, 100, 50, 310, 300) == 260  # 100 + 10 or 310 − 50: the larger
    # a second migration started with the old reserve and overshooting less adds nothing on top
    assert learned_switchover_ms(202, 30, 171, 350, 300) == 202
    # one started with the raised reserve and still over: it rises from that reserve
    assert learned_switchover_ms(202, 202, 60, 320, 300) == 260
    # a pause within the limit never lowers it, and QEMU keeps a tenth of the limit to converge with
    assert learned_switchover_ms(143, 30, 171, 120, 300) == 143
    assert learned_switchover_ms(30, 30, 171, 5000, 300) == 270
    assert downtime_limit_ms(300, 600, 600, SchedulerPolicy(switchover_ms=270)) == 30


def test_adaptive_options_carry_a_downtime_limit_that_fits_the_configured_pause() -> None:
    spec = MigrationSpec(Placement(vm="v", source="s", target="t", memory_mib=4096), 4096, 10.0)
    ours = options_for(spec, MigrationOptions(), SchedulerPolicy(), 600, 1100 / 3)
    assert ours.downtime_limit_ms == 165  # from QEMU's 300 ms
    configured = options_for(spec, MigrationOptions(downtime_limit_ms=500), SchedulerPolicy(), 600, 1100 / 3)
    assert configured.downtime_limit_ms == math.floor(470 * 1100 / 3 / 600)
    # the fixed anchors and a policy that opts out leave the configured limit alone
    assert options_for(spec, MigrationOptions(), SchedulerPolicy.fixed(2), 600, 1100 / 3).downtime_limit_ms is None
    off = SchedulerPolicy(downtime_aware=False)
    assert options_for(spec, MigrationOptions(), off, 600, 1100 / 3).downtime_limit_ms is None


def test_a_running_migration_is_retuned_only_to_a_lower_limit_it_can_be_scaled_to() -> None:
    learned = SchedulerPolicy(switchover_ms=200.0)
    # 10 GbE single-stream: 100 ms beside the reserve, scaled by its share at the switch-over
    assert retuned_downtime_ms(165, 300, 600, 1100 / 3, learned) == 61
    assert retuned_downtime_ms(50, 300, 600, 1100 / 3, learned) is None  # already lower
    assert retuned_downtime_ms(None, 300, 600, 1100 / 3, learned) is None  # QEMU's own limit: not ours
    assert retuned_downtime_ms(165, 300, 600, 0.0, learned) is None  # no share: it would be 1 ms
