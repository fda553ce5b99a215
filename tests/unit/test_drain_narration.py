"""The run log tells a drain in sentences, not Python dicts (issue 18)."""

from __future__ import annotations

import pytest

from hostmaint.migration.drain import DrainEvent, EventKind
from hostmaint.migration.narrate import describe

GIB = 2**30


@pytest.mark.parametrize("kind, detail, expected", [
    (EventKind.STARTED, {"source": "hv01", "target": "hv03", "memory_mib": 8192, "in_flight": 2, "budget_s": 1200.0,
                         "auto_converge": False, "post_copy": False},
     "app-07: live migration hv01 → hv03 started, 8.0 GiB; 2 in flight, time budget 1200 s"),
    (EventKind.PROGRESS, {"elapsed_s": 2.0, "data_processed": GIB, "data_remaining": 3 * GIB,
                          "dirty_rate_bps": 12 * 2**20, "iterations": 1},
     "app-07: 25% sent (1.0 GiB, 3.0 GiB left), guest dirtying 12 MiB/s, pass 1, about 6 s to go"),
    (EventKind.ESCALATED, {"action": "enable-auto-converge", "reason": "not converging", "elapsed_s": 30.0},
     "app-07: enable-auto-converge after 30.0 s: not converging"),
    (EventKind.FINISHED, {"source": "hv01", "target": "hv03", "seconds": 7.45, "downtime_ms": 30.0,
                          "data_bytes": 8 * GIB, "done": 3, "total": 5, "bytes_moved": 12 * GIB},
     "app-07: moved hv01 → hv03 in 7.5 s, downtime 30 ms, 8.0 GiB sent (3 of 5 done), 12.0 GiB moved so far"),
    (EventKind.RETUNED, {"downtime_limit_ms": 61, "was_ms": 165, "reserve_ms": 200.0},
     "app-07: downtime limit 165 → 61 ms while it runs: switch-overs take longer than reserved (200.0 ms now)"),
    (EventKind.RETUNED, {"downtime_limit_ms": 61, "error": "hv01: no migration of app-07 from hv01 runs here"},
     "app-07: could not lower its downtime limit: hv01: no migration of app-07 from hv01 runs here"),
    (EventKind.FAILED, {"source": "hv01", "target": "hv03", "seconds": 2.0, "error": "target refused",
                        "done": 1, "total": 5},
     "app-07: migration hv01 → hv03 FAILED after 2.0 s: target refused; it still runs on hv01 (1 of 5 done)"),
])
def test_each_drain_event_is_one_sentence(kind: EventKind, detail: dict[str, object], expected: str) -> None:
    line = describe(DrainEvent(at_s=1.0, kind=kind, vm="app-07", detail=detail))
    assert line == expected
    assert "{" not in line and "'" not in line


def test_a_hostile_vm_name_cannot_break_the_line() -> None:
    line = describe(DrainEvent(at_s=0, kind=EventKind.SKIPPED, vm="evil\nFAKE: all good", detail={"source": "hv01"}))
    assert "\n" not in line and "evil\\nFAKE" in line
