"""A drain told in sentences: one line per event for the run's log.

The log is a view of the drain for whoever watches a run (the audit trail keeps the record); it used
to show each event as a Python dict. Names come from hosts and are shown with
:func:`~hostmaint.display.visible`, so a VM name cannot break or fake a line.
"""

from __future__ import annotations

from typing import Any

from hostmaint.display import visible
from hostmaint.migration.drain import DrainEvent, EventKind

GIB = 2**30


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _eta(d: dict[str, Any]) -> str:
    sent, left, elapsed = d.get("data_processed") or 0, d.get("data_remaining") or 0, d.get("elapsed_s") or 0
    if not sent or not elapsed:
        return ""
    return f", about {left / (sent / elapsed):.0f} s to go"


def describe(event: DrainEvent) -> str:
    """One sentence for ``event``: what happened to which VM, between which hosts, how far the drain is."""
    d = event.detail
    vm = visible(event.vm)
    route = f"{visible(str(d.get('source', '?')))} → {visible(str(d.get('target', '?')))}"
    count = f" ({d['done']} of {d['total']} done)" if "done" in d and "total" in d else ""
    if event.kind is EventKind.STARTED:
        extras = [name for name, on in (("auto-converge", d.get("auto_converge")), ("post-copy", d.get("post_copy")))
                  if on]
        return (f"{vm}: live migration {route} started, {d.get('memory_mib', 0) / 1024:.1f} GiB; "
                f"{d.get('in_flight', 0)} in flight, time budget {d.get('budget_s', 0):.0f} s"
                + (f", {' and '.join(extras)} on" if extras else ""))
    if event.kind is EventKind.PROGRESS:
        sent, left = d.get("data_processed") or 0, d.get("data_remaining") or 0
        total = sent + left
        pct = f"{100 * sent / total:.0f}% " if total else ""
        return (f"{vm}: {pct}sent ({_gib(sent)}, {_gib(left)} left), guest dirtying "
                f"{(d.get('dirty_rate_bps') or 0) / 2**20:.0f} MiB/s, pass {d.get('iterations') or 0}{_eta(d)}")
    if event.kind is EventKind.ESCALATED:
        action = visible(str(d.get("action", "?")))
        if d.get("error"):
            return f"{vm}: could not {action}: {visible(str(d['error']))}"
        at = f" after {d['elapsed_s']:.1f} s" if "elapsed_s" in d else ""
        return f"{vm}: {action}{at}: {visible(str(d.get('reason', '')))}"
    if event.kind is EventKind.RETUNED:
        if d.get("error"):
            return f"{vm}: could not lower its downtime limit: {visible(str(d['error']))}"
        return (f"{vm}: downtime limit {d.get('was_ms', '?')} → {d.get('downtime_limit_ms', '?')} ms while it runs: "
                f"switch-overs take longer than reserved ({d.get('reserve_ms', '?')} ms now)")
    if event.kind is EventKind.FINISHED:
        return (f"{vm}: moved {route} in {d.get('seconds', 0):.1f} s, downtime {d.get('downtime_ms') or 0:.0f} ms, "
                f"{_gib(d.get('data_bytes') or 0)} sent{count}, {_gib(d.get('bytes_moved') or 0)} moved so far")
    if event.kind is EventKind.SKIPPED:
        return f"{vm}: not on {visible(str(d.get('source', '?')))} any more, nothing to move{count}"
    verb = "aborted" if event.kind is EventKind.ABORTED else "FAILED"
    why = f": {visible(str(d['error']))}" if d.get("error") else ""
    return (f"{vm}: migration {route} {verb} after {d.get('seconds', 0):.1f} s{why}; it still runs on "
            f"{visible(str(d.get('source', '?')))}{count}")
