"""Two evacuations of one cluster, the second started while the first drains: what the simulated
fleet's test (tests/flows) and the real lab's (tests/lab) of side-by-side drains share."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from hostmaint.audit import AuditRecord
from hostmaint.models import HostState, Trigger


def evacuate_side_by_side(rt: Any, inventory: Path, first: str, second: str, *,
                          once_first_drains: Callable[[], None] | None = None, wait_s: float = 120) -> dict[str, Any]:
    """Evacuate ``first`` in a thread; once it drains (and ``once_first_drains`` ran), ``second`` here.
    Returns each host's outcome."""
    from flows.evacuate_host import evacuate_host

    results: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: results.update({first: evacuate_host(
        host=first, operator="ann", inventory=str(inventory), trigger=Trigger.TEST)}))
    thread.start()
    deadline = time.monotonic() + wait_s
    while rt.states.state(first) is not HostState.DRAINING and time.monotonic() < deadline:
        time.sleep(0.05)
    if once_first_drains is not None:
        once_first_drains()
    results[second] = evacuate_host(host=second, operator="bob", inventory=str(inventory), trigger=Trigger.TEST)
    thread.join(wait_s * 2)
    return results


def assert_drained_at_once_onto_different_hosts(records: Sequence[AuditRecord], a: str, b: str) -> None:
    """The drains of ``a`` and ``b`` overlapped in time and sent VMs to no host in common."""
    def span(r: AuditRecord) -> tuple[datetime, datetime]:
        end = datetime.fromisoformat(r.time)
        return end - timedelta(seconds=r.duration_s), end

    drains = {r.host: span(r) for r in records if r.step == "drain"}
    (a_start, a_end), (b_start, b_end) = drains[a], drains[b]
    assert a_start < b_end and b_start < a_end, drains  # the second drain did not wait for the first
    targets = {h: {r.inputs["target"] for r in records if r.step == "migrate" and r.host == h} for h in (a, b)}
    assert targets[a] and targets[b] and not targets[a] & targets[b], targets
