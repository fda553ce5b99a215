"""Notifications: Prefect automations that tell people when a hostmaint run fails, when a runbook
waits for approval, and when a patch window ends with its summary (docs/integrations.md).

They send through Prefect's own notification blocks (a custom webhook, Slack, e-mail), named in
the inventory's ``notifications.blocks`` as ``TYPE/NAME``: the URL or token stays in the block.
``hostmaint setup`` calls :func:`ensure_notifications`; it is safe to run again (the automations
are replaced). A block that does not exist is bad input naming the field (exit 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast
from uuid import UUID

from hostmaint.errors import InputError
from hostmaint.inventory import Inventory, NotifyOn, load_inventory

PREFIX = "hostmaint notify: "
# every flow hostmaint runs (flows/), by the names their runs carry
FLOWS = ["patch-host", "patch-window", "evacuate-host", "rebalance-cluster", "return-host", "degraded-host-runbook",
         "hardware-check-failed-runbook", "evacuate-on-request", "patch-on-request", "rebalance-on-request",
         "return-on-request", "resize-vm", "vm-starved-runbook"]
RUN_LINK = "{{ (flow_run|ui_url) or '' }}"  # none when the server has no UI url

# What each notification matches and says. A run's state events are matched on the state's type, not
# the event's name: a run not approved ends Cancelled named "Rejected" (prefect.flow-run.Rejected).
RULES: dict[NotifyOn, dict[str, Any]] = {
    NotifyOn.FAILED: {
        "states": ["FAILED", "CRASHED"], "flows": FLOWS,
        "subject": "hostmaint: {{ flow.name }} {{ flow_run.name }} {{ flow_run.state.name }}",
        "body": ("{{ flow.name }} run {{ flow_run.name }} ended {{ flow_run.state.name }}: "
                 "{{ flow_run.state.message }}\n" + RUN_LINK)},
    NotifyOn.APPROVAL: {
        "states": ["PAUSED"], "flows": FLOWS,
        "subject": "hostmaint: {{ flow_run.name }} waits for approval",
        "body": ("{{ flow.name }} run {{ flow_run.name }} waits for an operator ({{ flow_run.state.name }}): "
                 "review the plan and resume or reject it\n" + RUN_LINK)},
    # flows/notify.py: the window's own event, with its per-host summary (a window that crashes
    # sends none; the failed rule covers it)
    NotifyOn.WINDOW_END: {
        "event": "hostmaint.window.ended",
        "subject": "hostmaint: patch window {{ event.resource.name }} ended ({{ event.payload.failed }} failed)",
        "body": "{{ event.payload.summary }}"},
}


def _block_ids(client: Any, names: list[str]) -> list[UUID]:
    from prefect.exceptions import ObjectNotFound

    ids, problems = [], []
    for i, ref in enumerate(names):
        slug, name = ref.split("/", 1)
        try:
            ids.append(client.read_block_document_by_name(name, block_type_slug=slug).id)
        except ObjectNotFound:
            problems.append(f"notifications.blocks[{i}]: no Prefect block {ref!r} (type {slug}, name {name}); "
                            "create it first (docs/integrations.md)")
    if problems:
        raise InputError("; ".join(problems))
    return ids


def ensure_notifications(inventory: str | Path | Inventory) -> list[str]:
    """Create (or replace) the notification automations the inventory asks for; return their ids.

    Without ``notifications`` in the inventory, hostmaint's notification automations are removed."""
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture

    inv = inventory if isinstance(inventory, Inventory) else load_inventory(inventory)
    settings = inv.notifications
    with get_client(sync_client=True) as client:
        ids = _block_ids(client, settings.blocks) if settings else []
        for old in client.read_automations():
            if old.name.startswith(PREFIX):
                client.delete_automation(old.id)
    made = []
    for on in settings.on if settings else []:
        rule = RULES[on]
        if "event" in rule:
            trigger = EventTrigger(expect={rule["event"]}, match={"prefect.resource.id": "hostmaint.window.*"},
                                   posture=Posture.Reactive, threshold=1)
        else:
            trigger = EventTrigger(
                match={"prefect.resource.id": "prefect.flow-run.*", "prefect.state-type": rule["states"]},
                match_related={"prefect.resource.role": "flow", "prefect.resource.name": rule["flows"]},
                posture=Posture.Reactive, threshold=1)
        actions: list[Any] = [SendNotification(block_document_id=b, subject=rule["subject"], body=rule["body"])
                              for b in ids]
        automation = cast(Automation, Automation(name=f"{PREFIX}{on.value}",
                                                 description=f"hostmaint: notify when {on.value}",
                                                 trigger=trigger, actions=actions).create())
        made.append(str(automation.id))
    return made
