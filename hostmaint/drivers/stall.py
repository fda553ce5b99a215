"""When to give up on a live migration: the driver's own stall rule. Pure, no libvirt.

A migration *progresses* while the data it still has to send reaches new lows. It is *stalled*
when that has not happened for ``options.stall_seconds``, and *over budget* after
``max(options.min_budget_seconds, options.seconds_per_gib * GiB of guest memory)``. Either means
abort: the VM keeps running on its source. (The drain scheduler in ``hostmaint.migration`` escalates
earlier — auto-converge, post-copy — and uses this rule only as the last word.)
"""

from __future__ import annotations

from collections.abc import Sequence

from hostmaint.models import MigrationOptions, MigrationProgress

GIB = 1024**3


def time_budget(progress_history: Sequence[MigrationProgress], options: MigrationOptions) -> float:
    """Seconds a migration may take, scaled by the guest memory it reports (data_total)."""
    total = max((p.data_total for p in progress_history), default=0)
    return max(options.min_budget_seconds, options.seconds_per_gib * total / GIB)


def last_progress_at(progress_history: Sequence[MigrationProgress]) -> float | None:
    """Elapsed time of the last sample that set a new low of data remaining (None before any)."""
    best: int | None = None
    at: float | None = None
    for p in progress_history:
        if p.data_total <= 0:
            continue  # the job has not really started: no data yet
        if best is None or p.data_remaining < best:
            best, at = p.data_remaining, p.elapsed_s
    return at


def stall_reason(progress_history: Sequence[MigrationProgress], elapsed: float,
                 options: MigrationOptions) -> str | None:
    """Why the migration should be aborted now, or None to let it run."""
    budget = time_budget(progress_history, options)
    if elapsed >= budget:
        return f"over its time budget: {elapsed:.1f}s >= {budget:.1f}s"
    since = last_progress_at(progress_history)
    if since is not None and elapsed - since >= options.stall_seconds:
        return f"no progress for {elapsed - since:.1f}s (stall limit {options.stall_seconds:g}s)"
    return None


def stall_decision(progress_history: Sequence[MigrationProgress], elapsed: float,
                   options: MigrationOptions) -> bool:
    """True when a running migration must be aborted (stalled or over budget)."""
    return stall_reason(progress_history, elapsed, options) is not None
