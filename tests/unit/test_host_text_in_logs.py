"""The core's log lines (forwarded to the run's log in the Prefect UI, and the worker's terminal) show
what hosts said as data: an error quoting a host (an SSH banner, libvirt's message naming a tenant's VM,
a Prometheus answer) or a check's detail stays one line, its escapes visible (hostmaint.display.visible).
The audit record keeps the exact text. SIMULATED fleet."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from hostmaint import maintenance as steps
from hostmaint import patching
from hostmaint.errors import DriverError
from hostmaint.models import HostState
from hostmaint.runtime import Runtime, open_runtime

# what a host can make an error say: paramiko quotes the banner an sshd sends, libvirt the name a tenant chose
SAID = 'Indecipherable protocol version "\x1b[2J\x1b]8;;http://evil\x07x\u202e"\nhv01: all checks passed'


@pytest.fixture
def rt(sim_inventory: Path) -> Runtime:
    return open_runtime(sim_inventory, fresh=True)


def _lines(caplog: pytest.LogCaptureFixture, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if needle in r.getMessage()]


def _shown_as_data(line: str) -> None:
    assert "\x1b" not in line and "\n" not in line and "\u202e" not in line
    assert "\\x1b[2J" in line and "\\n" in line and "\\u202e" in line


def test_a_verify_warning_quoting_the_host_is_one_line(rt: Runtime, caplog: pytest.LogCaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    report = patching.VerifyReport(host="hv01", ok=True, checks=(
        patching.CheckResult(name="kernel", ok=True, warning=True, detail=f"newer kernel: {SAID}"),))
    monkeypatch.setattr(patching, "verify_host", lambda *a, **k: report)
    run = steps.RunContext(flow="patch-host", reason="patch")
    rt.states.begin_maintenance("hv01", run.run_id, "patch")
    for to in (HostState.DRAINING, HostState.DRAINED):
        rt.states.transition("hv01", to, to.value, run.run_id)
    with caplog.at_level("WARNING", logger="hostmaint"):
        steps.verify(rt, run, "hv01", None)
    [line] = _lines(caplog, "newer kernel")
    _shown_as_data(line)


class _Failing:
    """The simulated hypervisor, whose migration states cannot be read: the error quotes the host."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def in_migration(self, host: str) -> tuple[str, ...]:
        raise DriverError(SAID, host)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_an_error_quoting_a_host_is_logged_as_one_line(rt: Runtime, caplog: pytest.LogCaptureFixture) -> None:
    rt = dataclasses.replace(rt, hypervisor=_Failing(rt.hypervisor))
    with caplog.at_level("WARNING", logger="hostmaint"):
        assert steps._abort_outgoing(rt, "hv01") == []
    [line] = _lines(caplog, "cannot list its migrations")
    _shown_as_data(line)


def test_a_replan_names_the_vms_that_arrived_as_data(rt: Runtime, caplog: pytest.LogCaptureFixture) -> None:
    # a tenant's VM that landed on a target while the plan waited is named in the re-plan's log line
    from hostmaint.placement import plan_evacuation

    planned_on = steps.snapshot(rt, "demo")
    plan = plan_evacuation(planned_on, ["hv01"])
    target = plan.placements[0].target
    newcomer = planned_on.vms[0].model_copy(update={"name": "web\x1b[2J\nhv01: drained, all VMs moved",
                                                    "host": target, "anti_affinity": None})
    now = planned_on.model_copy(update={"vms": (*planned_on.vms, newcomer)})
    with caplog.at_level("INFO", logger="hostmaint"):
        steps.replan(rt, steps.RunContext(flow="evacuate-host", reason="test"), plan, planned_on, now)
    [line] = _lines(caplog, "the plan changed while it waited")
    head, plan_rows = line.split(" re-planned:\n")  # the plan below it is rendered escaped, one row a line
    assert "\x1b" not in line and "\n" not in head and "web\\x1b[2J\\nhv01: drained" in head
