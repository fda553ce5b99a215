"""The libvirt driver's stall rule: abort when the data left stops reaching new lows, or over budget."""

from __future__ import annotations

import pytest

from hostmaint.drivers.stall import last_progress_at, stall_decision, stall_reason, time_budget
from hostmaint.models import MigrationOptions, MigrationProgress

GIB = 1024**3
OPTS = MigrationOptions(stall_seconds=10, seconds_per_gib=60, min_budget_seconds=30)


def sample(t: float, remaining: int, total: int = 2 * GIB) -> MigrationProgress:
    return MigrationProgress(vm="vm1", elapsed_s=t, data_total=total, data_processed=total - remaining,
                             data_remaining=remaining)


CONVERGING = [sample(0, 2 * GIB), sample(5, GIB), sample(10, GIB // 2)]
# a dirty guest: each pass the remaining data climbs back up, never below 1 GiB again
FLAT = [sample(0, 2 * GIB), sample(2, GIB), sample(6, GIB + 10), sample(11, GIB + 5), sample(13, GIB + 1)]


@pytest.mark.parametrize(("history", "elapsed", "abort", "why"), [
    ([], 5.0, False, None),
    ([], 30.0, True, "time budget"),  # no samples at all: the budget still holds
    ([sample(0, 0, total=0)], 29.0, False, None),  # setup phase: no data yet, not a stall
    (CONVERGING, 12.0, False, None),
    (CONVERGING, 19.9, False, None),
    (CONVERGING, 20.0, True, "no progress for 10.0s"),
    (FLAT, 11.9, False, None),
    (FLAT, 12.0, True, "no progress"),
    (CONVERGING, 120.0, True, "time budget: 120.0s >= 120.0s"),  # 2 GiB x 60 s/GiB
])
def test_stall_rule(history: list[MigrationProgress], elapsed: float, abort: bool, why: str | None) -> None:
    assert stall_decision(history, elapsed, OPTS) is abort
    reason = stall_reason(history, elapsed, OPTS)
    assert (reason is None) is (not abort)
    if why is not None:
        assert reason is not None and why in reason


def test_budget_scales_with_guest_memory_but_never_below_minimum() -> None:
    assert time_budget([], OPTS) == 30
    assert time_budget([sample(0, 0, total=GIB // 4)], OPTS) == 30
    assert time_budget([sample(0, 0, total=10 * GIB)], OPTS) == 600


def test_last_progress_is_the_last_new_low() -> None:
    assert last_progress_at(FLAT) == 2
    assert last_progress_at(CONVERGING) == 10
    assert last_progress_at([]) is None
