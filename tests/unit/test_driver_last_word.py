"""The driver's last word (policy.last_word): behind the scheduler's ladder, a migration whose data left
stops reaching new lows, or that runs over its budget, is switched to post-copy where allowed, else
aborted. The same stall measure and budget formula as the scheduler's next_action. Table-driven."""

from __future__ import annotations

import pytest

from hostmaint.migration.policy import MIB, Action, Escalation, last_word, migration_budget_s
from hostmaint.models import MigrationOptions, MigrationProgress

GIB = 1024**3
OPTS = MigrationOptions(stall_seconds=10, seconds_per_gib=60, min_budget_seconds=30)


def sample(t: float, remaining: int, total: int = 2 * GIB) -> MigrationProgress:
    return MigrationProgress(vm="vm1", elapsed_s=t, data_total=total, data_processed=total - remaining,
                             data_remaining=remaining)


def budget(history: list[MigrationProgress]) -> float:
    """What the driver's monitor uses: the budget formula on the guest memory the job reports."""
    return migration_budget_s(max((s.data_total for s in history), default=0) / MIB, OPTS)


CONVERGING = [sample(0, 2 * GIB), sample(5, GIB), sample(10, GIB // 2)]
# a dirty guest: each pass the remaining data climbs back up, never below 1 GiB again
FLAT = [sample(0, 2 * GIB), sample(2, GIB), sample(6, GIB + 10), sample(11, GIB + 5), sample(13, GIB + 1)]


@pytest.mark.parametrize(("history", "elapsed", "stuck", "why"), [
    ([], 5.0, False, None),
    ([], 30.0, True, "time budget 30s used up"),  # no samples at all: the budget still holds
    ([sample(0, 0, total=0)], 29.0, False, None),  # setup phase: no data yet, not a stall
    (CONVERGING, 12.0, False, None),
    (CONVERGING, 19.9, False, None),
    (CONVERGING, 20.0, True, "no progress for 10s"),
    (FLAT, 11.9, False, None),
    (FLAT, 12.0, True, "no progress"),
    (CONVERGING, 120.0, True, "time budget 120s used up after 120s"),  # 2 GiB x 60 s/GiB
])
def test_stuck_migrations_are_aborted_or_switched_to_post_copy(history: list[MigrationProgress], elapsed: float,
                                                                stuck: bool, why: str | None) -> None:
    for can_post_copy, action in ((False, Action.ABORT), (True, Action.SWITCH_TO_POST_COPY)):
        decision = last_word(history, elapsed_s=elapsed, budget_s=budget(history), stall_s=OPTS.stall_seconds,
                             can_post_copy=can_post_copy)
        assert decision.action is (action if stuck else Action.CONTINUE)
        if why is not None:
            assert why in decision.reason


def test_the_budget_scales_with_guest_memory_but_never_below_its_floor() -> None:
    assert budget([]) == 30
    assert budget([sample(0, 0, total=GIB // 4)]) == 30
    assert budget([sample(0, 0, total=10 * GIB)]) == 600


def test_in_post_copy_it_runs_to_completion_and_a_failed_switch_is_aborted() -> None:
    kw = {"elapsed_s": 500.0, "budget_s": 30.0, "stall_s": 10.0, "can_post_copy": True}
    assert last_word(FLAT, level=Escalation.POST_COPY, **kw).action is Action.CONTINUE  # type: ignore[arg-type]
    assert last_word(FLAT, level=Escalation.POST_COPY_FAILED, **kw).action is Action.ABORT  # type: ignore[arg-type]


def test_the_stall_period_is_not_cut_to_a_third_of_the_budget() -> None:
    # the scheduler's ladder caps it so auto-converge and post-copy fit in the budget; the driver's last
    # word is one step and must not act before the scheduler's second one (options_for gives it 3x the stall)
    stalled_25s = [sample(0, 2 * GIB), sample(5, GIB), sample(30, GIB + 1)]
    assert last_word(stalled_25s, elapsed_s=30.0, budget_s=66.0, stall_s=180.0).action is Action.CONTINUE
