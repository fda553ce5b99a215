"""degraded-host runbook: monitoring says a host is degraded → cordon, plan, ask, evacuate.

Started by a ``hostmaint.host.degraded`` event (``POST /api/events`` or
``hostmaint event degraded HOST --reason ...``) through the deployment's trigger.
The event's severity decides whether a human is asked: ``critical`` evacuates at
once, anything else pauses for approval. Either way the host ends cordoned with
the reason, and the approver (or "automatic: ...") is in the audit trail. An event
without a reason is refused before the host is touched.
"""

from __future__ import annotations

from prefect import flow
from prefect.client.schemas.objects import State

from flows.common import ApprovalSeconds, HostOutcome, PollSeconds, WaitSeconds
from flows.runbooks.approval import Severity, run_incident
from hostmaint.errors import InputError

EVENT = "hostmaint.host.degraded"


@flow(name="degraded-host-runbook", log_prints=True)
def degraded_host_runbook(host: str, reason: str = "degraded", severity: str = Severity.WARNING.value,
                          source: str = "monitoring", event_id: str | None = None, inventory: str | None = None,
                          approval_timeout_s: ApprovalSeconds = 3600, poll_interval_s: PollSeconds = 10,
                          lock_wait_s: WaitSeconds | None = 300) -> HostOutcome | State:
    """Cordon the degraded ``host`` and evacuate it, with approval unless ``severity`` is critical.

    A blank ``reason`` is refused (InputError) before anything changes.
    """
    if not reason.strip():
        # the trigger renders a payload key the event lacks as "": cordoned "degraded: ", the host would
        # stay out of service with no cause named for whoever has to clear it
        raise InputError(f"{EVENT} for host {host!r} gives no reason: 'reason' is empty (the event's "
                         "payload.reason is missing or blank); refused, nothing was changed. Send the event with "
                         "payload.reason set ('hostmaint event degraded HOST --reason TEXT').")
    level = Severity.parse(severity)
    automatic = f"severity {level.value}: act at once" if level is Severity.CRITICAL else None
    return run_incident(flow="degraded-host-runbook", host=host, reason=f"degraded: {reason}", source=source,
                        inventory=inventory, automatic=automatic,
                        event={"event": EVENT, "event_id": event_id, "severity": level.value},
                        approval_timeout_s=approval_timeout_s, poll_interval_s=poll_interval_s,
                        lock_wait_s=lock_wait_s)
