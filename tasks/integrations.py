"""Tasks for the operator's world around a host: monitoring gates, the silence lease, hooks.

Thin wrappers of hostmaint.monitoring and hostmaint.hooks (docs/integrations.md). No retries: a
gate waits by itself, a silence that cannot be made is decided by the inventory's ``required``,
and a hook is the operator's command, run once per point.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from hostmaint import hooks, monitoring
from hostmaint.maintenance import RunContext
from hostmaint.monitoring import GatePoint, SilenceLease
from tasks.common import RuntimeRef


@task(name="gate", cache_policy=NO_CACHE, task_run_name="gate {point}")
def gate_host(ref: RuntimeRef, run: RunContext, host: str, point: GatePoint) -> str | None:
    """None when the host may go on; else why monitoring holds it. Before the reboot, a held gate
    keeps the host cordoned and raises StepError."""
    rt = ref.open()
    result = monitoring.gate(rt, run, host, point)
    if result.passed:
        return None
    if point is GatePoint.BEFORE_REBOOT:
        monitoring.hold_reboot(rt, run, host, result)
    return result.reason


@task(name="silence", cache_policy=NO_CACHE)
def open_silence(ref: RuntimeRef, run: RunContext, host: str) -> SilenceLease | None:
    return monitoring.open_silence(ref.open(), run, host)


@task(name="end-silence", cache_policy=NO_CACHE)
def end_silence(ref: RuntimeRef, run: RunContext, host: str, lease: SilenceLease | None) -> None:
    monitoring.end_silence(ref.open(), run, host, lease)


@task(name="hooks", cache_policy=NO_CACHE, task_run_name="hooks {point}")
def run_hooks(ref: RuntimeRef, run: RunContext, host: str, point: hooks.HookPoint) -> int:
    """Run ``host``'s hooks at ``point``; returns how many ran."""
    return len(hooks.run_hooks(ref.open(), run, host, point))
