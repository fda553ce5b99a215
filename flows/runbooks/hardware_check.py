"""hardware-check-failed runbook: cordon at once, evacuate with approval, leave it cordoned with the reason.

Started by a ``hostmaint.host.hardware-check-failed`` event (or
``hostmaint event hardware-failed HOST --check ...``). Unlike a degraded host
there is no severity that skips the human: the plan always waits for approval,
and the host stays cordoned (reason: the failed check) until an operator clears it.
An event that names no check is refused before the host is touched.
"""

from __future__ import annotations

from prefect import flow
from prefect.client.schemas.objects import State

from flows.common import ApprovalSeconds, HostOutcome, PollSeconds, WaitSeconds
from flows.runbooks.approval import run_incident
from hostmaint.errors import InputError

EVENT = "hostmaint.host.hardware-check-failed"


@flow(name="hardware-check-failed-runbook", log_prints=True)
def hardware_check_failed_runbook(host: str, check: str, detail: str = "", source: str = "monitoring",
                                  event_id: str | None = None, inventory: str | None = None,
                                  approval_timeout_s: ApprovalSeconds = 3600, poll_interval_s: PollSeconds = 10,
                                  lock_wait_s: WaitSeconds | None = 300) -> HostOutcome | State:
    """Cordon ``host`` because hardware ``check`` failed; evacuate it once someone approves.

    A blank ``check`` is refused (InputError) before anything changes.
    """
    if not check.strip():
        # the trigger renders a payload key the event lacks as "": cordoned "hardware check failed: ", the host
        # would stay out of service with no failure named for whoever has to clear it
        raise InputError(f"{EVENT} for host {host!r} names no failed check: 'check' is empty (the event's "
                         "payload.check is missing or blank); refused, nothing was changed. Send the event with "
                         "payload.check set ('hostmaint event hardware-failed HOST --check NAME').")
    reason = f"hardware check failed: {check}" + (f": {detail}" if detail else "")
    return run_incident(flow="hardware-check-failed-runbook", host=host, reason=reason, source=source,
                        inventory=inventory, automatic=None,
                        event={"event": EVENT, "event_id": event_id, "check": check},
                        approval_timeout_s=approval_timeout_s, poll_interval_s=poll_interval_s,
                        lock_wait_s=lock_wait_s)
