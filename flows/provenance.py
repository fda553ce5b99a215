"""Who or what really started a run, from the Prefect server's record of it.

A flow is told its trigger by its caller, and the patch window's default is ``schedule``: started
by hand from the UI ("Custom run") it was recorded as a scheduled run by the scheduler. The server
knows better for a deployment's run: the scheduler marks its runs ``auto_scheduled`` (created by a
``SCHEDULE``), an automation (the runbooks' event triggers) its own (``AUTOMATION``); anything
else was asked for through the UI or its API. A run that is no deployment's (a subflow, a call
from the CLI or a test) keeps what its caller said.
"""

from __future__ import annotations

import logging

import httpx
from prefect import runtime
from prefect.exceptions import PrefectException

from hostmaint.models import Trigger

log = logging.getLogger(__name__)


def started_by(claimed: Trigger) -> Trigger:
    """The trigger of the current flow run as the server recorded it; ``claimed`` when it cannot say."""
    run_id = runtime.flow_run.id
    if not run_id:
        return claimed
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(run_id)
    except (PrefectException, httpx.HTTPError, OSError) as exc:
        log.warning("could not read flow run %s to see what started it (recording %s): %s", run_id,
                    claimed.value, exc)
        return claimed
    if run.deployment_id is None:
        return claimed
    creator = run.created_by.type if run.created_by else None
    if run.auto_scheduled or creator == "SCHEDULE":
        return Trigger.SCHEDULE
    if creator == "AUTOMATION":
        return Trigger.EVENT
    return Trigger.UI
