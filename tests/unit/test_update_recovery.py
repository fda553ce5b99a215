"""What an update changed is recorded even when the connection drops while it runs, and again while
the next run reads it back (issue 15 c): core steps on a SIMULATED fleet, no Prefect."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hostmaint import maintenance as steps
from hostmaint.drivers.memory import SimulatedFleet
from hostmaint.errors import HostmaintError, TransientDriverError
from hostmaint.models import HostState, StepOutcome
from hostmaint.runtime import open_runtime


class _Drops:
    """The sim fleet's shell, where the connection to ``host`` drops once while a command whose argv
    holds ``word`` runs: the command completes on the host, the caller never hears how it ended."""

    def __init__(self, real: Any, host: str, word: str) -> None:
        self.real, self.host, self.word, self.dropped = real, host, word, False

    def run(self, host: str, argv: Any, timeout: float = 60.0) -> Any:
        result = self.real.run(host, argv, timeout)
        if host == self.host and self.word in argv and not self.dropped:
            self.dropped = True
            raise TransientDriverError("connection lost while the command ran (it may have run)", host)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def _drained(rt: Any, run: steps.RunContext, host: str, to: str) -> None:
    """``host`` cordoned and empty, its VMs on ``to``, as a drain leaves it."""
    fleet = rt.hypervisor
    assert isinstance(fleet, SimulatedFleet)
    steps.cordon(rt, run, host)
    for vm in sorted(fleet.running[host]):
        fleet.running[host].discard(vm)
        fleet.running[to].add(vm)
    fleet.save()
    rt.states.transition(host, HostState.DRAINING, "draining", run.run_id)
    rt.states.transition(host, HostState.DRAINED, "drained", run.run_id)


def test_a_recovery_that_itself_lost_the_connection_is_tried_again(sim_inventory: Path) -> None:
    rt = open_runtime(sim_inventory, fresh=True)
    real_shell = rt.shell
    first = steps.RunContext(flow="patch-host", reason="patch")
    _drained(rt, first, "hv01", "hv02")
    rt.shell = _Drops(real_shell, "hv01", "update")
    with pytest.raises(HostmaintError, match="outcome is unknown"):
        steps.patch(rt, first, "hv01")
    assert rt.states.state("hv01") is HostState.PATCHING

    # the next run loses the connection while it reads the packages back
    second = steps.RunContext(flow="patch-host", reason="patch")
    rt.shell = _Drops(real_shell, "hv01", "-qa")
    with pytest.raises(HostmaintError):
        steps.recover_lost_update(rt, second, "hv01")
    [failed] = [r for r in rt.audit.records(host="hv01") if r.step == "update-recovered"]
    assert failed.outcome is StepOutcome.FAILED

    # so the one after still owes the record of what the lost update changed
    rt.shell = real_shell
    third = steps.RunContext(flow="patch-host", reason="patch")
    diff = steps.recover_lost_update(rt, third, "hv01")
    assert diff is not None and [c.package.split(".")[0] for c in diff.upgraded] == ["openssl"]
    recorded = [r for r in rt.audit.records(host="hv01") if r.step == "update-recovered"]
    assert [r.outcome for r in recorded] == [StepOutcome.FAILED, StepOutcome.OK]
    # and, recorded once, it is not recorded again
    assert steps.recover_lost_update(rt, steps.RunContext(flow="patch-host"), "hv01") is None


class _FailsAfterUpdating:
    """The sim fleet's shell, where ``dnf update`` on ``host`` changes packages and then exits 1 (a
    scriptlet failed, the disk filled mid-transaction): a failed update that did change the host."""

    def __init__(self, real: Any, host: str) -> None:
        self.real, self.host = real, host

    def run(self, host: str, argv: Any, timeout: float = 60.0) -> Any:
        result = self.real.run(host, argv, timeout)
        if host == self.host and "update" in argv:
            return result.model_copy(update={"exit_code": 1, "stderr": "error: %post(openssl) scriptlet failed"})
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_a_failed_update_records_what_it_changed_all_the_same(sim_inventory: Path) -> None:
    rt = open_runtime(sim_inventory, fresh=True)
    run = steps.RunContext(flow="patch-host", reason="patch")
    _drained(rt, run, "hv01", "hv02")
    rt.shell = _FailsAfterUpdating(rt.shell, "hv01")
    with pytest.raises(HostmaintError, match="update failed"):
        steps.patch(rt, run, "hv01")

    [update] = [r for r in rt.audit.records(host="hv01") if r.step == "update"]
    assert update.outcome is StepOutcome.FAILED
    assert [c["package"].split(".")[0] for c in update.details["package_diff"]["upgraded"]] == ["openssl"]
    assert rt.states.state("hv01") is HostState.FAILED
    # recorded once: the next run has nothing to recover
    assert steps.recover_lost_update(rt, steps.RunContext(flow="patch-host"), "hv01") is None


def test_a_failed_update_whose_changes_cannot_be_read_is_recovered_by_the_next_run(sim_inventory: Path) -> None:
    rt = open_runtime(sim_inventory, fresh=True)
    real_shell = rt.shell
    run = steps.RunContext(flow="patch-host", reason="patch")
    _drained(rt, run, "hv01", "hv02")
    failing = _FailsAfterUpdating(real_shell, "hv01")
    rt.shell = failing
    reads = {"n": 0}

    def run_cmd(host: str, argv: Any, timeout: float = 60.0) -> Any:
        if host == "hv01" and "-qa" in argv:
            reads["n"] += 1
            if reads["n"] > 1:  # the list before the update reads; the one after it does not
                return real_shell.run(host, argv, timeout).model_copy(update={"exit_code": 1, "stdout": ""})
        return _FailsAfterUpdating.run(failing, host, argv, timeout)

    failing.run = run_cmd  # type: ignore[method-assign]
    with pytest.raises(HostmaintError, match="update failed"):
        steps.patch(rt, run, "hv01")
    [update] = [r for r in rt.audit.records(host="hv01") if r.step == "update"]
    assert update.outcome is StepOutcome.FAILED and "package_diff" not in update.details

    rt.shell = real_shell
    diff = steps.recover_lost_update(rt, steps.RunContext(flow="patch-host"), "hv01")
    assert diff is not None and [c.package.split(".")[0] for c in diff.upgraded] == ["openssl"]
