"""Tasks for the operator's world around a host: monitoring gates, the silence lease, hooks.

Thin wrappers of hostmaint.monitoring and hostmaint.hooks (docs/integrations.md). Each public
function here starts its task only when the inventory configures something for the host, so the
run page of a cluster without integrations shows no empty steps. No retries: a gate waits by
itself, a silence that cannot be made is decided by the inventory's ``required``, and a hook is
the operator's command, run once per point.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from hostmaint import hooks, monitoring
from hostmaint.maintenance import RunContext
from hostmaint.monitoring import GatePoint, SilenceLease, WorkKind
from tasks.common import RuntimeRef


def gate_host(ref: RuntimeRef, run: RunContext, host: str, point: GatePoint,
              kind: WorkKind = WorkKind.MAINTENANCE) -> str | None:
    """None when the host may go on; else why monitoring holds it. Before the reboot, a held gate
    keeps the host cordoned and raises StepError. Gates that do not hold ``kind`` are recorded
    bypassed (an incident's evacuation, by default)."""
    inventory = ref.open().inventory
    settings = inventory.cluster(inventory.host(host).cluster).monitoring
    prometheus = settings.prometheus if settings else None
    if prometheus is None or not any(point in g.at for g in prometheus.gates):
        return None
    return _gate(ref, run, host, point, kind)


@task(name="gate", cache_policy=NO_CACHE, task_run_name="gate {point}")
def _gate(ref: RuntimeRef, run: RunContext, host: str, point: GatePoint,
          kind: WorkKind = WorkKind.MAINTENANCE) -> str | None:
    rt = ref.open()
    result = monitoring.gate(rt, run, host, point, kind=kind)
    if result.passed:
        return None
    if point is GatePoint.BEFORE_REBOOT:
        monitoring.hold_reboot(rt, run, host, result)
    return result.reason


def open_silence(ref: RuntimeRef, run: RunContext, host: str) -> SilenceLease | None:
    """The host's silence lease (adopted from an earlier run when it lives), or None."""
    inventory = ref.open().inventory
    settings = inventory.cluster(inventory.host(host).cluster).monitoring
    if settings is None or settings.alertmanager is None:
        return None
    return _open_silence(ref, run, host)


@task(name="silence", cache_policy=NO_CACHE)
def _open_silence(ref: RuntimeRef, run: RunContext, host: str) -> SilenceLease | None:
    return monitoring.open_silence(ref.open(), run, host)


def open_evacuation_silence(ref: RuntimeRef, run: RunContext, host: str) -> None:
    """Silence an evacuated host's alerts while it is out of service: for the inventory's
    ``evacuation_silence_s``, or until return-host puts it back (nothing when 0 or no Alertmanager)."""
    inventory = ref.open().inventory
    settings = inventory.cluster(inventory.host(host).cluster).monitoring
    if settings is None or settings.alertmanager is None or not settings.alertmanager.evacuation_silence_s:
        return
    _open_evacuation_silence(ref, run, host, settings.alertmanager.evacuation_silence_s)


@task(name="silence", cache_policy=NO_CACHE)
def _open_evacuation_silence(ref: RuntimeRef, run: RunContext, host: str, hold_s: float) -> None:
    lease = monitoring.open_silence(ref.open(), run, host, hold_s=hold_s)
    if lease is not None:
        lease.am.client.close()  # nothing extends it: it ends at its time, or when the host is back


def end_evacuation_silence(ref: RuntimeRef, run: RunContext, host: str) -> None:
    """End the silence an evacuation left on ``host``, now back in service (nothing when none)."""
    inventory = ref.open().inventory
    settings = inventory.cluster(inventory.host(host).cluster).monitoring
    if settings is not None and settings.alertmanager is not None:
        _end_recorded_silence(ref, run, host)


@task(name="end-silence", cache_policy=NO_CACHE)
def _end_recorded_silence(ref: RuntimeRef, run: RunContext, host: str) -> bool:
    return monitoring.end_recorded_silence(ref.open(), run, host)


def end_silence(ref: RuntimeRef, run: RunContext, host: str, lease: SilenceLease | None) -> None:
    """Stop extending and expire ``lease`` (nothing without one)."""
    if lease is not None:
        _end_silence(ref, run, host, lease)


@task(name="end-silence", cache_policy=NO_CACHE)
def _end_silence(ref: RuntimeRef, run: RunContext, host: str, lease: SilenceLease) -> None:
    monitoring.end_silence(ref.open(), run, host, lease)


def run_hooks(ref: RuntimeRef, run: RunContext, host: str, point: hooks.HookPoint, keep_state: bool = False) -> int:
    """Run ``host``'s hooks at ``point``; returns how many ran. ``keep_state``: see hooks.run_hooks."""
    if not ref.open().inventory.hooks_for(host, point.field):
        return 0
    return _run_hooks(ref, run, host, point, keep_state)


@task(name="hooks", cache_policy=NO_CACHE, task_run_name="hooks {point}")
def _run_hooks(ref: RuntimeRef, run: RunContext, host: str, point: hooks.HookPoint, keep_state: bool = False) -> int:
    return len(hooks.run_hooks(ref.open(), run, host, point, keep_state=keep_state))
