"""A flow that only reports what run_context records; deployed by test_prefect_operator_view.py."""

from __future__ import annotations

from prefect import flow

from flows.common import run_context
from hostmaint.models import Trigger


@flow(name="issue18-provenance")
def provenance(operator: str = "scheduler", trigger: Trigger = Trigger.SCHEDULE) -> dict[str, str]:
    """Return the trigger and operator this run would write into the audit trail."""
    run = run_context("issue18-provenance", trigger, operator, "test")
    return {"trigger": run.trigger.value, "operator": run.operator}
