"""The event a patch window sends when it ends, with its per-host summary: what the notification
automation ``hostmaint notify: window-end`` (deployments/notifications.py) says to people."""

from __future__ import annotations

from collections.abc import Sequence

from prefect.events import emit_event

from flows.common import HostOutcome
from hostmaint.display import visible
from hostmaint.models import StepOutcome

WINDOW_ENDED = "hostmaint.window.ended"
MAX_SUMMARY = 3000  # characters: chat systems cut long messages anyway


def window_summary(window_id: str, cluster: str, outcomes: Sequence[HostOutcome]) -> str:
    """One line per host after a count per outcome; host text escaped (it is data, not markup)."""
    counts = {o: sum(1 for h in outcomes if h.outcome is o) for o in StepOutcome}
    tally = ", ".join(f"{n} {o.value}" for o, n in counts.items() if n) or "no host was started"
    lines = [f"patch window {visible(window_id)} on {visible(cluster)}: {tally}"]
    lines += [f"- {visible(h.host)}: {h.outcome.value} ({h.state}) {visible(h.detail)[:300]}" for h in outcomes]
    text = "\n".join(lines)
    return text if len(text) <= MAX_SUMMARY else text[:MAX_SUMMARY - 20] + "\n... (see the report)"


def window_ended(window_id: str, cluster: str, outcomes: Sequence[HostOutcome]) -> None:
    """Emit ``hostmaint.window.ended`` for this window with its summary."""
    failed = sum(1 for h in outcomes if h.outcome is StepOutcome.FAILED)
    emit_event(WINDOW_ENDED, resource={"prefect.resource.id": f"hostmaint.window.{window_id}",
                                       "prefect.resource.name": window_id, "hostmaint.cluster": cluster},
               payload={"summary": window_summary(window_id, cluster, outcomes), "failed": failed,
                        "hosts": len(outcomes)})
