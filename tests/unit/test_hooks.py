"""Hooks: argv lists run on the host (through a HostShell) or the worker, recorded, and a failing
pre-hook stopping the host safely."""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from hostmaint.errors import StepError
from hostmaint.hooks import HookPoint, run_hooks
from hostmaint.inventory import Hooks
from hostmaint.maintenance import RunContext
from hostmaint.models import CommandResult, HostState, StepOutcome
from hostmaint.runtime import Runtime, open_runtime


class PosixShell:
    """A HostShell that does what the SSH driver does with an argv: ``shlex.join`` it into one
    command line for a POSIX shell (here the local ``sh -c``, there the remote login shell)."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.lines: list[str] = []

    def run(self, host: str, argv: Sequence[str], timeout: float = 60.0) -> CommandResult:
        line = shlex.join(argv)
        self.lines.append(line)
        done = subprocess.run(["sh", "-c", line], capture_output=True, text=True, timeout=timeout, cwd=self.cwd,
                              check=False)
        return CommandResult(host=host, argv=tuple(argv), exit_code=done.returncode, stdout=done.stdout,
                             stderr=done.stderr)

    def close(self) -> None:
        pass


def _with_hooks(rt: Runtime, *, cluster: dict[str, Any] | None = None, host: tuple[str, dict[str, Any]] | None = None,
                shell: Any = None) -> Runtime:
    clusters = [rt.inventory.clusters[0].model_copy(update={"hooks": Hooks.model_validate(cluster or {})})]
    hosts = [h.model_copy(update={"hooks": Hooks.model_validate(host[1])}) if host and h.name == host[0] else h
             for h in rt.inventory.hosts]
    inv = rt.inventory.model_copy(update={"clusters": clusters, "hosts": hosts})
    return dataclasses.replace(rt, inventory=inv, shell=shell or rt.shell)


@pytest.fixture
def rt(sim_inventory: Path) -> Runtime:
    return open_runtime(sim_inventory, fresh=True)


HOSTILE = ["$$(touch pwned-1)", "; touch pwned-2", "`touch pwned-3`", "a b\nc", "'\"", "--flag=$$HOME", "*"]


def test_on_host_hook_args_reach_the_command_as_written(rt: Runtime, tmp_path: Path) -> None:
    shell = PosixShell(tmp_path)
    rt = _with_hooks(rt, cluster={"pre_drain": [{"name": "show", "argv": ["printf", "[%s]\\n", *HOSTILE, "$host"]}]},
                     shell=shell)
    runs = run_hooks(rt, RunContext(), "hv01", HookPoint.PRE_DRAIN)
    assert runs[0].ok
    expected = [a.replace("$$", "$") for a in HOSTILE] + ["hv01"]
    assert runs[0].stdout == "".join(f"[{a}]\n" for a in expected)
    assert not list(tmp_path.glob("pwned-*")), "an argument ran as a command"
    rec = [r for r in rt.audit.records(host="hv01") if r.step == "hook"][-1]
    assert rec.inputs["argv"][-1] == "hv01" and rec.inputs["point"] == "pre-drain"
    assert rec.details["exit_code"] == 0 and "[; touch pwned-2]" in rec.details["stdout"]


def test_a_failing_pre_drain_hook_keeps_the_host_cordoned_with_its_reason(rt: Runtime, tmp_path: Path) -> None:
    shell = PosixShell(tmp_path)
    rt = _with_hooks(rt, cluster={"pre_drain": [
        {"name": "ceph-noout", "argv": ["sh", "-c", "echo 'noout refused' >&2; exit 3"]},
        {"name": "after", "argv": ["touch", "after-ran"]}]}, shell=shell)
    run = RunContext()
    rt.states.begin_maintenance("hv02", run.run_id, "patch")  # cordoned, as the flow does first
    with pytest.raises(StepError, match="pre-drain hook ceph-noout failed \\(exit 3: noout refused\\)"):
        run_hooks(rt, run, "hv02", HookPoint.PRE_DRAIN)
    record = rt.states.get("hv02")
    assert record.state is HostState.CORDONED and "ceph-noout" in record.reason
    assert not (tmp_path / "after-ran").exists()
    rec = [r for r in rt.audit.records(host="hv02") if r.step == "hook"][-1]
    assert rec.outcome is StepOutcome.FAILED and rec.details["exit_code"] == 3


def test_worker_hook_runs_without_a_shell_with_names_in_env_and_output_redacted(rt: Runtime) -> None:
    script = "import os; print(os.environ['HOSTMAINT_HOST'], os.environ['HOSTMAINT_HOOK'], 'password=hunter2')"
    rt = _with_hooks(rt, host=("hv03", {"post_verify": [
        {"name": "cmdb", "on": "worker", "argv": [subprocess.sys.executable, "-c", script]}]}))  # type: ignore[attr-defined]
    runs = run_hooks(rt, RunContext(), "hv03", HookPoint.POST_VERIFY)
    assert runs[0].ok and "hv03 post-verify" in runs[0].stdout
    assert "hunter2" not in runs[0].stdout
    rec = [r for r in rt.audit.records(host="hv03") if r.step == "hook"][-1]
    assert "hunter2" not in str(rec.details)


def test_a_failing_post_maintenance_hook_is_recorded_and_the_rest_run(rt: Runtime) -> None:
    rt = _with_hooks(rt, cluster={"post_maintenance": [
        {"name": "missing", "on": "worker", "argv": ["/nonexistent/hostmaint-hook"]},
        {"name": "ok", "on": "worker", "argv": ["true"]}]})
    runs = run_hooks(rt, RunContext(), "hv04", HookPoint.POST_MAINTENANCE)
    assert [r.ok for r in runs] == [False, True]
    assert rt.states.state("hv04") is HostState.ACTIVE
    outcomes = [r.outcome for r in rt.audit.records(host="hv04") if r.step == "hook"]
    assert outcomes == [StepOutcome.FAILED, StepOutcome.OK]


def test_cluster_hooks_run_before_the_hosts_own(rt: Runtime) -> None:
    rt = _with_hooks(rt, cluster={"pre_reboot": [{"name": "c", "on": "worker", "argv": ["true"]}]},
                     host=("hv01", {"pre_reboot": [{"name": "h", "on": "worker", "argv": ["true"]}]}))
    assert [r.name for r in run_hooks(rt, RunContext(), "hv01", HookPoint.PRE_REBOOT)] == ["c", "h"]
    assert [r.name for r in run_hooks(rt, RunContext(), "hv02", HookPoint.PRE_REBOOT)] == ["c"]


def test_inventory_check_refuses_a_shell_string_hook_with_exit_2(sim_inventory: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from hostmaint.cli import app

    data = yaml.safe_load(sim_inventory.read_text())
    data["hosts"][0]["hooks"] = {"pre_reboot": [{"name": "noout", "argv": "ceph osd set noout"}]}
    data["clusters"][0]["monitoring"] = {"alertmanager": {"url": "http://am:9093", "lease_s": 0,
                                                          "matchers": [{"name": "instance", "value": "$host"}]}}
    sim_inventory.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["inventory", "check", str(sim_inventory)])
    assert result.exit_code == 2, result.output
    assert "hosts[0].hooks.pre_reboot[0].argv (host hv01)" in result.output
    assert "clusters[0].monitoring.alertmanager.lease_s" in result.output


BANNER = 'unreachable after 1 attempt(s): SSHException: Indecipherable protocol version "\x1b[2J\x1b]8;;http://evil\x07'


class _Refusing:
    """A HostShell whose connection fails as paramiko's does when the host's sshd sends a banner of its choosing."""

    def run(self, host: str, argv: Sequence[str], timeout: float = 60.0) -> CommandResult:
        from hostmaint.errors import TransientDriverError
        raise TransientDriverError(f'{BANNER}\nhv04: post-maintenance hook ok"', host)

    def close(self) -> None:
        pass


def test_a_hook_that_could_not_reach_its_host_is_logged_as_one_line_of_data(
        rt: Runtime, caplog: pytest.LogCaptureFixture) -> None:
    rt = _with_hooks(rt, cluster={"post_maintenance": [{"name": "lb", "on": "host", "argv": ["true"]}]},
                     shell=_Refusing())
    with caplog.at_level("WARNING", logger="hostmaint"):
        [run] = run_hooks(rt, RunContext(), "hv04", HookPoint.POST_MAINTENANCE)
    assert not run.ok and run.error is not None and "\x1b" in run.error  # the audit keeps the exact text
    [line] = [r.getMessage() for r in caplog.records if "hook lb failed" in r.getMessage()]
    assert "\x1b" not in line and "\n" not in line and "\\x1b[2J" in line


def test_hook_output_is_redacted_before_its_end_is_kept(rt: Runtime) -> None:
    # the kept end (OUTPUT_KEPT characters) began inside a URL's user part, where the password no longer
    # looked like one: it reached the audit record whole
    from hostmaint.hooks import OUTPUT_KEPT
    secret = "https://deploy:hunter2@repo.example/x"
    kept = len("ploy:hunter2@repo.example/x")  # of the secret line, what the end keeps
    script = f"print({secret!r}); print('y' * {OUTPUT_KEPT - kept - 2})"
    rt = _with_hooks(rt, cluster={"post_verify": [{"name": "out", "on": "worker",
                                                   "argv": [sys.executable, "-c", script]}]})
    [run] = run_hooks(rt, RunContext(), "hv03", HookPoint.POST_VERIFY)
    assert run.ok and "hunter2" not in run.stdout
    rec = [r for r in rt.audit.records(host="hv03") if r.step == "hook"][-1]
    assert "hunter2" not in str(rec.details)
