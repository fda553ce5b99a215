"""Ctrl-C on a command that runs a flow (patch, evacuate, window run ...) stops it as a Cancel does.

Before, Ctrl-C raised KeyboardInterrupt wherever the run was (or, after a plan, killed the process:
test_placement_exact.py): no stand-down, the host left `draining`, the Prefect run left Running; a
run cancelled from the UI or `hostmaint run cancel` ended the command with a traceback. No flow runs
here: a function stands in for it, registering its Cancellation as a hostmaint flow does.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.exceptions import CancelledRun

from hostmaint.cancel import RunCancelled
from hostmaint.maintenance import RunContext
from hostmaint.models import HostState
from hostmaint_cli.runs import _run_flow
from tasks import cancellation
from tasks.common import RuntimeRef
from tasks.maintenance import cordon_host


class OldInterrupt(Exception):
    """What a Ctrl-C does if nothing but the test's own handler catches it (it must not reach pytest)."""


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(cancellation, "cancelled_on_server", lambda run_id, held=None: None)  # no Prefect server here

    def interrupted(signum: int, frame: object) -> None:
        raise OldInterrupt

    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)  # the handler runs in this thread at the next bytecode


def test_the_first_ctrl_c_cancels_the_run_and_the_command_says_so_in_one_line() -> None:
    seen = {}

    def patch_host(**kwargs: object) -> None:
        with cancellation.watching("run-1") as cancel:
            _ctrl_c()
            seen["by"] = cancel.by if cancel.is_set() else None
            raise CancelledRun(f"{cancel.reason}; stopped safely")  # what the flow's call raises once it stood down

    with pytest.raises(RunCancelled, match=r"cancelled by alice \(Ctrl-C\); stopped safely.*run the same command"):
        _run_flow(patch_host, operator="alice")
    assert seen == {"by": "alice (Ctrl-C)"}
    assert signal.getsignal(signal.SIGINT).__name__ == "interrupted"  # the command's handler is gone again


def test_a_second_ctrl_c_or_one_before_the_run_began_interrupts_at_once() -> None:
    def twice(**kwargs: object) -> None:
        with cancellation.watching("run-2"):
            _ctrl_c()
            _ctrl_c()

    with pytest.raises(KeyboardInterrupt):
        _run_flow(twice, operator="alice")

    with pytest.raises(KeyboardInterrupt):
        _run_flow(lambda **kwargs: _ctrl_c(), operator="alice")


def test_a_run_stopped_before_its_cordon_leaves_the_host_in_service(sim_inventory: Path) -> None:
    ref = RuntimeRef(str(sim_inventory))
    run = RunContext(run_id="run-3", operator="alice")
    with cancellation.watching(run.run_id) as cancel:
        cancel.cancel("alice (Ctrl-C)")
        with pytest.raises(RunCancelled):
            cordon_host.fn(ref, run, "hv01")
    assert ref.open().states.get("hv01").state is HostState.ACTIVE


def test_cancelling_with_the_server_down_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # 'hostmaint run cancel RUN' with the server down ended in an httpx.ConnectError traceback
    import httpx
    from typer.testing import CliRunner

    import flows.cancel
    from hostmaint_cli.main import app

    def refused(*args: object, **kwargs: object) -> str:
        raise httpx.ConnectError("[Errno 111] Connection refused")

    monkeypatch.setattr(flows.cancel, "request_cancel", refused)
    result = CliRunner().invoke(app, ["run", "cancel", "233ff7b9-4baa-4dae-8203-a396ccd36479"])
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and "cannot reach the Prefect server" in said and "nothing was asked to stop" in said
    assert result.exception is None or isinstance(result.exception, SystemExit)
