"""Helpers of the Prefect deployment tests: simulated fleets, flows on a thread, paused runs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hostmaint.drivers.memory import SimulatedFleet
from hostmaint.simulated_fleet import demo_packages, demo_snapshot, write_simulated_fleet

ALL_VMS = frozenset(v.name for v in demo_snapshot(4, 12).vms)


def make_fleet(workdir: Path, *, time_scale: float = 0.001) -> Path:
    """A SIMULATED 4-host, 12-VM cluster 'demo'; returns the inventory path."""
    snap = demo_snapshot(4, 12)
    return write_simulated_fleet(workdir, snap, demo_packages(snap), time_scale=time_scale)


def where(inventory: Path) -> dict[str, list[str]]:
    """vm -> the hosts it runs on, from the simulated fleet's state file."""
    fleet = SimulatedFleet.load(inventory.parent / "fleet-state.json")
    out: dict[str, list[str]] = {}
    for host, vms in fleet.running.items():
        for vm in vms:
            out.setdefault(vm, []).append(host)
    return out


def lost(inventory: Path) -> list[str]:
    return SimulatedFleet.load(inventory.parent / "fleet-state.json").lost


@dataclass
class Background:
    """A flow called on a thread: its result or exception once it ends."""

    thread: threading.Thread
    result: Any = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def join(self, timeout: float = 120.0) -> Any:
        assert self.done.wait(timeout), "the flow did not finish in time"
        if self.error is not None:
            raise self.error
        return self.result


def in_background(fn: Callable[..., Any], **kwargs: Any) -> Background:
    """Call flow ``fn(**kwargs)`` on a thread (a paused flow blocks its caller)."""
    box = Background(thread=threading.Thread(daemon=True, target=lambda: None))

    def run() -> None:
        try:
            box.result = fn(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the test by join()
            box.error = exc
        finally:
            box.done.set()

    box.thread = threading.Thread(target=run, daemon=True)
    box.thread.start()
    return box


def wait_paused(flow_name: str, timeout: float = 60.0, box: Background | None = None) -> Any:
    """The newest Paused run of ``flow_name`` (waits for it)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterStateName
    from prefect.client.schemas.sorting import FlowRunSort

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            if box is not None and box.done.is_set():
                box.join(0)
                raise AssertionError(f"{flow_name} ended without pausing: {box.result}")
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                flow_run_filter=FlowRunFilter(state={"name": FlowRunFilterStateName(any_=["Paused"])}),
                sort=FlowRunSort.START_TIME_DESC, limit=1)
            if runs:
                return runs[0]
            time.sleep(0.3)
    raise AssertionError(f"no paused run of {flow_name} within {timeout}s")
