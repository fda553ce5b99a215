"""Orchestration overhead of a patch-host flow: wall time minus the time the hosts themselves took.

Host time is the union of the intervals spent inside driver calls (libvirt, SSH) and inside the
reboot wait (the host is rebooting, hostmaint only polls). Whatever is left — Prefect task and
flow bookkeeping, planning, audit writes, state transitions — is hostmaint's overhead, printed as
a share of the flow's wall time (the target is under 5 %).

The overhead is then broken down, measured: timers wrap the drivers, the audit trail, the state
store, the lock context managers (and each Prefect ``concurrency`` acquisition inside them), the
artifacts, every task's call and its body, and the flow's body. Each instant of the run is given to
the most specific thing that was busy then (host > audit > state > locks > artifacts > hostmaint
code in a task > Prefect task-run bookkeeping > flow body outside tasks > Prefect flow start and finish),
so the rows add up to the wall time, also when the drain's threads overlap.

    .venv/bin/python benchmarks/overhead.py              # on the real lab (root), 3 hosts
    .venv/bin/python benchmarks/overhead.py --simulated  # on the SIMULATED fleet (says so)
    .venv/bin/python benchmarks/overhead.py --hosts hv02,hv01,hv03   # one run per host, in order

Prints tables; not a test.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import statistics
import tempfile
import threading
import time
import typing
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

Span = tuple[float, float]

# what an instant is attributed to, most specific first
HOST = "host: libvirt, SSH, reboot wait"
AUDIT = "audit records (hash chain, SQLite)"
STATE = "host state / origins (SQLite)"
LOCKS = "locks: acquire + release (Prefect global concurrency)"
ARTIFACTS = "artifacts (markdown, table, progress)"
CORE = "hostmaint code in tasks (planning, drain scheduler, models)"
TASK = "Prefect task-run bookkeeping (call minus body)"
FLOW_BODY = "flow body outside tasks (runtime, run context, logs)"
FLOW_START = "Prefect flow start (call until the flow body runs)"
FLOW_END = "Prefect flow finish (flow body returned until the call returns)"
ORDER = (HOST, AUDIT, STATE, LOCKS, ARTIFACTS, CORE, TASK, FLOW_BODY, FLOW_START, FLOW_END)


# --- interval arithmetic ---------------------------------------------------------------


def merged(spans: list[Span]) -> list[Span]:
    """The union of ``spans`` as sorted, disjoint intervals."""
    out: list[Span] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def length(spans: list[Span]) -> float:
    return sum(e - s for s, e in spans)


def minus(a: list[Span], b: list[Span]) -> list[Span]:
    """``a`` without ``b`` (both merged)."""
    out: list[Span] = []
    j = 0
    for s, e in a:
        while j < len(b) and b[j][1] <= s:
            j += 1
        k, cur = j, s
        while k < len(b) and b[k][0] < e:
            if b[k][0] > cur:
                out.append((cur, b[k][0]))
            cur = max(cur, b[k][1])
            k += 1
        if cur < e:
            out.append((cur, e))
    return out


def intersect(a: list[Span], b: list[Span]) -> list[Span]:
    return minus(a, minus(a, b))


# --- recording -------------------------------------------------------------------------


@dataclass
class Timeline:
    """Labelled intervals from any thread: (category, name) -> spans."""

    spans: dict[tuple[str, str], list[Span]] = field(default_factory=lambda: defaultdict(list))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, category: str, name: str, start: float, end: float) -> None:
        with self.lock:
            self.spans[(category, name)].append((start, end))

    @contextmanager
    def span(self, category: str, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.add(category, name, start, time.monotonic())

    def timed(self, category: str, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self.span(category, name):
                return fn(*args, **kwargs)
        if not hasattr(fn, "__code__"):
            return wrapper  # a Task object: nothing of it is copied onto the wrapper
        # Prefect binds and validates parameters by the signature; give the wrapper the function's
        # own, with its string annotations resolved in the function's module, not this one
        functools.update_wrapper(wrapper, fn)
        del wrapper.__wrapped__  # type: ignore[attr-defined]
        wrapper.__signature__ = inspect.signature(fn, eval_str=True)  # type: ignore[attr-defined]
        wrapper.__annotations__ = typing.get_type_hints(fn)
        return wrapper

    def timed_cm(self, category: str, name: Callable[..., str], cm: Callable[..., Any]) -> Callable[..., Any]:
        """A context manager factory whose entering and leaving are timed (the block itself is not)."""
        @contextmanager
        @functools.wraps(cm)
        def wrapper(*args: Any, **kwargs: Any) -> Iterator[Any]:
            label = name(*args, **kwargs)
            start = time.monotonic()
            with cm(*args, **kwargs) as value:
                self.add(category, f"{label} acquire", start, time.monotonic())
                try:
                    yield value
                finally:
                    left = time.monotonic()
            self.add(category, f"{label} release", left, time.monotonic())
        return wrapper

    def union(self, category: str, name: str | None = None) -> list[Span]:
        return merged([s for (c, n), spans in self.spans.items() if c == category and name in (None, n)
                       for s in spans])

    def names(self, category: str) -> list[str]:
        return sorted({n for c, n in self.spans if c == category})

    def count(self, category: str, name: str) -> int:
        return len(self.spans.get((category, name), []))


class Timed:
    """A driver whose public methods are timed as host time, named ``<label>.<method>``."""

    def __init__(self, inner: Any, timeline: Timeline, label: str) -> None:
        self._inner = inner
        self._timeline = timeline
        self._label = label

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if callable(value) and not name.startswith("_"):
            return self._timeline.timed(HOST, f"{self._label}.{name}", value)
        return value


def instrument(timeline: Timeline, rt: Any) -> Callable[[], None]:
    """Put timers around everything the breakdown names; returns a function that takes them off."""
    from prefect import Task

    import flows.patch_host as flow_module
    import tasks.common as task_common
    import tasks.maintenance as task_module
    from flows import locks
    from hostmaint import maintenance

    undo: list[Callable[[], None]] = []

    def patch(obj: Any, attr: str, value: Any) -> None:
        original = getattr(obj, attr)
        setattr(obj, attr, value)
        undo.append(lambda: setattr(obj, attr, original))

    label = "simulated" if rt.simulated else "libvirt"
    patch(rt, "hypervisor", Timed(rt.hypervisor, timeline, label))
    patch(rt, "shell", Timed(rt.shell, timeline, "simulated-shell" if rt.simulated else "ssh"))
    patch(maintenance.patching, "reboot_and_wait",
          timeline.timed(HOST, "reboot wait", maintenance.patching.reboot_and_wait))
    patch(rt, "audit", _Wrapped(rt.audit, timeline, AUDIT, "audit"))
    patch(rt, "states", _Wrapped(rt.states, timeline, STATE, "states"))
    acquire, release = locks._acquire, locks._release  # one server request each (plus retries)

    def timed_acquire(names: list[str], *args: Any, **kwargs: Any) -> Any:
        with timeline.span(LOCKS, f"request {','.join(names)}"):
            return acquire(names, *args, **kwargs)

    patch(locks, "_acquire", timed_acquire)
    patch(locks, "_release", timeline.timed(LOCKS, "release request", release))
    patch(locks, "host_maintenance", timeline.timed_cm(LOCKS, lambda *a, **k: "host_maintenance",
                                                       locks.host_maintenance))
    patch(locks, "cluster_migrations", timeline.timed_cm(LOCKS, lambda *a, **k: "cluster_migrations",
                                                         locks.cluster_migrations))
    patch(locks, "drain_slots", timeline.timed_cm(LOCKS, lambda *a, **k: "drain_slots", locks.drain_slots))
    patch(flow_module, "publish_report", timeline.timed(ARTIFACTS, "report", flow_module.publish_report))
    for name in ("create_progress_artifact", "update_progress_artifact"):
        patch(task_common, name, timeline.timed(ARTIFACTS, name, getattr(task_common, name)))
    for attr, value in list(vars(task_module).items()):
        if isinstance(value, Task):
            patch(value, "fn", timeline.timed(CORE, value.name, value.fn))
            patch(task_module, attr, timeline.timed(TASK, value.name, value))
    flow = flow_module.patch_host
    patch(flow, "fn", timeline.timed(FLOW_BODY, "patch-host", flow.fn))

    def restore() -> None:
        for step in reversed(undo):
            step()
    return restore


def instrument_api(timeline: Timeline) -> Callable[[], None]:
    """Count the Prefect API requests of the run: per endpoint, attempts, 503 answers, seconds incl. retries.

    The Prefect client retries a 503 (the server's SQLite was busy) after ~2 s; this is where that shows.
    """
    import httpx
    from prefect.client.base import PrefectHttpxAsyncClient, PrefectHttpxSyncClient

    originals = (httpx.AsyncClient.send, httpx.Client.send, PrefectHttpxAsyncClient.send,
                 PrefectHttpxSyncClient.send)
    inner_async, inner_sync, outer_async, outer_sync = originals

    def key(request: httpx.Request) -> str:
        parts = [p if not _looks_like_id(p) else "{id}" for p in request.url.path.split("/")]
        return f"{request.method} {'/'.join(parts).removeprefix('/api')}"

    def count(request: httpx.Request, status: int, start: float) -> None:
        timeline.add("api-attempt", f"{key(request)} {status}", start, time.monotonic())

    async def a_inner(self: Any, request: httpx.Request, *a: Any, **k: Any) -> Any:
        start = time.monotonic()
        response = await inner_async(self, request, *a, **k)
        count(request, response.status_code, start)
        return response

    def s_inner(self: Any, request: httpx.Request, *a: Any, **k: Any) -> Any:
        start = time.monotonic()
        response = inner_sync(self, request, *a, **k)
        count(request, response.status_code, start)
        return response

    async def a_outer(self: Any, request: httpx.Request, *a: Any, **k: Any) -> Any:
        start = time.monotonic()
        try:
            return await outer_async(self, request, *a, **k)
        finally:
            timeline.add("api", key(request), start, time.monotonic())

    def s_outer(self: Any, request: httpx.Request, *a: Any, **k: Any) -> Any:
        start = time.monotonic()
        try:
            return outer_sync(self, request, *a, **k)
        finally:
            timeline.add("api", key(request), start, time.monotonic())

    httpx.AsyncClient.send, httpx.Client.send = a_inner, s_inner  # type: ignore[method-assign]
    PrefectHttpxAsyncClient.send, PrefectHttpxSyncClient.send = a_outer, s_outer  # type: ignore[method-assign]

    def restore() -> None:
        (httpx.AsyncClient.send, httpx.Client.send, PrefectHttpxAsyncClient.send,  # type: ignore[method-assign]
         PrefectHttpxSyncClient.send) = originals
    return restore


def _looks_like_id(part: str) -> bool:
    return len(part) == 36 and part.count("-") == 4


class _Wrapped:
    """Every public method of ``inner`` timed under ``category`` as ``<label>.<method>``."""

    def __init__(self, inner: Any, timeline: Timeline, category: str, label: str) -> None:
        self._inner, self._timeline, self._category, self._label = inner, timeline, category, label

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if callable(value) and not name.startswith("_"):
            return self._timeline.timed(self._category, f"{self._label}.{name}", value)
        return value


# --- one run ------------------------------------------------------------------------------


@dataclass
class Run:
    """One measured patch-host run: its wall time and the timeline of what was busy when."""

    host: str
    wall: Span
    timeline: Timeline
    migrations: int
    rebooted: bool

    @property
    def wall_s(self) -> float:
        return self.wall[1] - self.wall[0]

    @property
    def host_s(self) -> float:
        return length(self.timeline.union(HOST))

    @property
    def overhead_s(self) -> float:
        return self.wall_s - self.host_s

    def exclusive(self) -> dict[str, float]:
        """Seconds per category, each instant counted once, for the most specific thing busy then."""
        tl = self.timeline
        taken: list[Span] = []
        out = {}
        body = tl.union(FLOW_BODY) or [(self.wall[1], self.wall[1])]
        outside = {FLOW_START: [(self.wall[0], body[0][0])], FLOW_END: [(body[-1][1], self.wall[1])]}
        for category in ORDER:
            spans = outside.get(category) or tl.union(category)
            spans = intersect(spans, [self.wall])
            mine = minus(spans, taken)
            out[category] = length(mine)
            taken = merged(taken + spans)
        return out

    def per_task(self) -> list[tuple[str, int, float, float, float, float, float]]:
        """(task, runs, call s, host s, audit+state s, core s, bookkeeping s) per task name."""
        tl = self.timeline
        host = tl.union(HOST)
        db = merged(tl.union(AUDIT) + tl.union(STATE))
        rows = []
        for name in tl.names(TASK):
            call, body = tl.union(TASK, name), tl.union(CORE, name)
            in_host = intersect(body, host)
            in_db = minus(intersect(body, db), host)
            rows.append((name, tl.count(TASK, name), length(call), length(in_host), length(in_db),
                         length(body) - length(in_host) - length(in_db), length(call) - length(body)))
        return rows

    def per_name(self, category: str) -> list[tuple[str, int, float]]:
        tl = self.timeline
        return [(n, tl.count(category, n), length(tl.union(category, n))) for n in tl.names(category)]


def measure(inventory: Path, host: str) -> Run:
    """Run patch-host on ``host`` once with every timer in place."""
    from flows.patch_host import patch_host
    from hostmaint.models import Trigger
    from hostmaint.runtime import open_runtime

    rt = open_runtime(inventory)
    timeline = Timeline()
    restore = instrument(timeline, rt)
    restore_api = instrument_api(timeline)
    try:
        start = time.monotonic()
        result = patch_host(host=host, operator="bench", reason="overhead benchmark", inventory=str(inventory),
                            trigger=Trigger.TEST)
        end = time.monotonic()
    finally:
        restore_api()
        restore()
    return Run(host=host, wall=(start, end), timeline=timeline, migrations=len(result.migrations),
               rebooted=result.rebooted)


# --- printing --------------------------------------------------------------------------------


def report(label: str, runs: list[Run]) -> None:
    print(f"\npatch-host on the {label}; one row per run, in order")
    print("| run | host | wall s | host time s (libvirt, SSH, reboot wait) | overhead s | overhead share | "
          "migrations | rebooted |")
    print("|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(runs, 1):
        print(f"| {i} | {r.host} | {r.wall_s:.2f} | {r.host_s:.2f} | {r.overhead_s:.2f} | "
              f"{r.overhead_s / r.wall_s:.1%} | {r.migrations} | {'yes' if r.rebooted else 'no'} |")
    if len(runs) > 1:
        print(f"| median | | {statistics.median(r.wall_s for r in runs):.2f} | "
              f"{statistics.median(r.host_s for r in runs):.2f} | "
              f"{statistics.median(r.overhead_s for r in runs):.2f} | "
              f"{statistics.median(r.overhead_s / r.wall_s for r in runs):.1%} | | |")

    print("\nwhere the wall time goes (s; each instant counted once, most specific first)")
    print("| part | " + " | ".join(f"run {i}" for i in range(1, len(runs) + 1)) + " |")
    print("|---|" + "---|" * len(runs))
    parts = [r.exclusive() for r in runs]
    for category in ORDER:
        print(f"| {category} | " + " | ".join(f"{p[category]:.2f}" for p in parts) + " |")
    print("| **overhead (all but host)** | "
          + " | ".join(f"**{sum(v for k, v in p.items() if k != HOST):.2f}**" for p in parts) + " |")

    last = runs[-1]
    print(f"\nper task, run {len(runs)} ({last.host}): s")
    print("| task | runs | call | host inside | audit+state inside | hostmaint code | Prefect bookkeeping |")
    print("|---|---|---|---|---|---|---|")
    for name, n, call, host, db, core, book in last.per_task():
        print(f"| {name} | {n} | {call:.3f} | {host:.3f} | {db:.3f} | {core:.3f} | {book:.3f} |")

    print(f"\nPrefect API requests through the Prefect client, run {len(runs)} (the run's events go over a "
          "websocket; lock requests are sent once each by flows/locks.py and show under locks): a 503 means the "
          "server's SQLite was busy, and the Prefect client then sleeps ~2 s before it asks again")
    print("| request | n | 503s | s until the 503s came back | s incl. retries |")
    print("|---|---|---|---|---|")
    for name, n, secs in last.per_name("api"):
        busy = last.timeline.spans.get(("api-attempt", f"{name} 503"), [])
        print(f"| {name} | {n} | {len(busy)} | {sum(e - s for s, e in busy):.3f} | {secs:.3f} |")
    print("\n503 answers per run (all requests, lock requests included):")
    for i, r in enumerate(runs, 1):
        busy = sorted((n.removesuffix(" 503"), len(spans)) for (c, n), spans in r.timeline.spans.items()
                      if c == "api-attempt" and n.endswith(" 503"))
        print(f"- run {i}: " + (", ".join(f"{n} x{k}" for n, k in busy) or "none"))

    for title, category in (("locks", LOCKS), ("audit", AUDIT), ("state store", STATE), ("host calls", HOST),
                            ("artifacts", ARTIFACTS)):
        print(f"\n{title}, run {len(runs)} ({last.host}): calls, s (union of each name's intervals)")
        print("| call | n | s |")
        print("|---|---|---|")
        for name, n, secs in last.per_name(category):
            print(f"| {name} | {n} | {secs:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulated", action="store_true", help="the SIMULATED fleet instead of the lab")
    parser.add_argument("--hosts", default="hv02,hv01,hv03",
                        help="patch these hosts one after another, one measured run each (default: %(default)s)")
    args = parser.parse_args()
    hosts = [h for h in args.hosts.split(",") if h]
    from prefect.testing.utilities import prefect_test_harness

    from flows.locks import ensure_limits

    with tempfile.TemporaryDirectory() as tmp, prefect_test_harness(server_startup_timeout=120):
        os.environ["HOSTMAINT_DB"] = str(Path(tmp) / "bench.db")
        if args.simulated:
            from hostmaint.simulated_fleet import demo_packages, demo_snapshot, write_simulated_fleet

            snap = demo_snapshot(4, 12)
            # migrations take a fifth of their modelled seconds, so the run stays short
            inventory = write_simulated_fleet(Path(tmp) / "sim", snap, demo_packages(snap), time_scale=0.2)
            label = "SIMULATED fleet (4 hosts, 12 VMs)"
            ensure_limits(inventory)
            runs = [measure(inventory, h) for h in hosts]
        else:
            from hostmaint.lab import lab_down, lab_up

            workdir = Path("/var/tmp/hostmaint-lab-overhead")
            info = lab_up(hosts=3, vms=6, workdir=workdir, linux_guests=1)
            try:
                label = "real lab (3 hosts, 6 SeaBIOS + 1 Linux guest)"
                ensure_limits(info.inventory_path)
                runs = [measure(info.inventory_path, h) for h in hosts]
            finally:
                from hostmaint.runtime import close_all

                close_all()
                lab_down(workdir)
    report(label, runs)


if __name__ == "__main__":
    main()
