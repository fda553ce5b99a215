"""degraded-host runbook: monitoring says a host is degraded → cordon, plan, ask, evacuate.

Started by a ``hostmaint.host.degraded`` event (``POST /api/events`` or
``hostmaint event degraded HOST --reason ...``) through the deployment's trigger.
The event's severity decides whether a human is asked: ``critical`` evacuates at
once, anything else pauses for approval. Either way the host ends cordoned with
the reason, and the approver (or "automatic: ...") is in the audit trail.
"""

from __future__ import annotations

from prefect import flow

from flows.common import HostOutcome
from flows.runbooks.approval import Severity, run_incident

EVENT = "hostmaint.host.degraded"


@flow(name="degraded-host-runbook", log_prints=True)
def degraded_host_runbook(host: str, reason: str = "degraded", severity: str = Severity.WARNING.value,
                          source: str = "monitoring", event_id: str | None = None, inventory: str | None = None,
                          approval_timeout_s: int = 3600, poll_interval_s: int = 10,
                          lock_wait_s: float | None = 300) -> HostOutcome:
    """Cordon the degraded ``host`` and evacuate it, with approval unless ``severity`` is critical."""
    level = Severity.parse(severity)
    automatic = f"severity {level.value}: act at once" if level is Severity.CRITICAL else None
    return run_incident(flow="degraded-host-runbook", host=host, reason=f"degraded: {reason}", source=source,
                        inventory=inventory, automatic=automatic,
                        event={"event": EVENT, "event_id": event_id, "severity": level.value},
                        approval_timeout_s=approval_timeout_s, poll_interval_s=poll_interval_s,
                        lock_wait_s=lock_wait_s)
