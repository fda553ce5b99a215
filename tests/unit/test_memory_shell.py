"""The simulated RHEL shell answers like the real tools, and refuses what they would refuse."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from hostmaint.drivers.base import HostShell
from hostmaint.drivers.memory_shell import SimHostPackages, SimulatedShell
from hostmaint.errors import TransientDriverError
from hostmaint.patching import RPM_QUERYFORMAT


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make() -> tuple[SimulatedShell, SimHostPackages, Clock]:
    state = SimHostPackages(installed={"kernel-core": "5.14.0-1.el9", "bash": "5.1-1.el9", "glibc": "1:2.34-1"},
                            available={"kernel-core": "5.14.0-2.el9", "glibc": "1:2.34-2", "extra": "1.0-1"},
                            security=["glibc"], reboot_delay_s=30)
    clock = Clock()
    return SimulatedShell({"h": state}, clock=clock), state, clock


def test_it_is_a_host_shell() -> None:
    shell, _, _ = make()
    assert isinstance(shell, HostShell)


def test_check_update_exits_100_with_updates_and_0_without() -> None:
    shell, state, _ = make()
    res = shell.run("h", ["dnf", "-q", "check-update", "--refresh"])
    assert res.exit_code == 100
    assert [ln.split()[:2] for ln in res.stdout.splitlines()] == [
        ["extra.x86_64", "1.0-1"], ["glibc.x86_64", "1:2.34-2"], ["kernel-core.x86_64", "5.14.0-2.el9"]]
    assert shell.run("h", ["dnf", "-q", "check-update", "--exclude=kernel*", "--exclude=glibc",
                           "--exclude=extra"]).exit_code == 0
    only_security = shell.run("h", ["yum", "check-update", "--security"])
    assert only_security.exit_code == 100 and "glibc.x86_64" in only_security.stdout
    assert "kernel" not in only_security.stdout
    state.repo_error = "Curl error (6): Couldn't resolve host name"
    bad = shell.run("h", ["dnf", "check-update", "--refresh"])
    assert bad.exit_code == 1 and "Couldn't resolve host name" in bad.stderr


def test_wrong_command_lines_are_refused_like_the_real_tools() -> None:
    shell, state, _ = make()
    assert shell.run("h", ["dnf", "--bogus", "update"]).exit_code == 2
    no_yes = shell.run("h", ["dnf", "update"])
    assert no_yes.exit_code == 1 and "Operation aborted" in no_yes.stderr
    assert state.installed["glibc"] == "1:2.34-1"
    assert shell.run("h", ["dnf", "frobnicate"]).exit_code == 1
    assert shell.run("h", ["rpm", "-qa"]).exit_code == 1
    missing = shell.run("h", ["no-such-tool", "--x"])
    assert missing.exit_code == 127 and "command not found" in missing.stderr


def test_rpm_queryformat_and_kernels_after_update() -> None:
    shell, state, _ = make()
    res = shell.run("h", ["rpm", "-qa", "--qf", RPM_QUERYFORMAT])
    assert res.stdout.splitlines() == ["bash.x86_64\t0:5.1-1.el9", "glibc.x86_64\t1:2.34-1",
                                       "kernel-core.x86_64\t0:5.14.0-1.el9"]
    assert shell.run("h", ["dnf", "-y", "update"]).exit_code == 0
    kernels = shell.run("h", ["rpm", "-q", "--qf", r"%{VERSION}-%{RELEASE}.%{ARCH}\n", "kernel-core", "kernel"])
    assert kernels.exit_code == 1  # one of the two names is not installed, as rpm reports it
    assert kernels.stdout.splitlines() == ["5.14.0-1.el9.x86_64", "5.14.0-2.el9.x86_64",
                                           "package kernel is not installed"]
    provided = shell.run("h", ["rpm", "-q", "--whatprovides", "--qf", r"%{NAME}-%{VERSION}\n", "kernel", "nope"])
    assert provided.exit_code == 1
    assert provided.stdout.splitlines() == ["kernel-core-5.14.0", "kernel-core-5.14.0", "no package provides nope"]
    assert state.installed["extra"] == "1.0-1" and state.available == {}


def test_install_only_limit_keeps_three_kernels() -> None:
    shell, state, _ = make()
    for n in range(2, 6):
        state.available["kernel-core"] = f"5.14.0-{n}.el9"
        shell.run("h", ["dnf", "-y", "update"])
    assert state.versions("kernel-core") == ["5.14.0-3.el9", "5.14.0-4.el9", "5.14.0-5.el9"]


def test_reboot_goes_down_then_comes_back_with_a_new_boot_id_on_the_newest_kernel() -> None:
    shell, state, clock = make()
    old = shell.run("h", ["cat", "/proc/sys/kernel/random/boot_id"]).stdout.strip()
    shell.run("h", ["dnf", "-y", "update"])
    assert shell.run("h", ["needs-restarting", "-r"]).exit_code == 1
    with pytest.raises(TransientDriverError, match="simulated reboot"):
        shell.run("h", ["reboot"])
    clock.now = 29.9
    with pytest.raises(TransientDriverError, match="down"):
        shell.run("h", ["uname", "-r"])
    clock.now = 30.0
    assert shell.run("h", ["uname", "-r"]).stdout == "5.14.0-2.el9.x86_64\n"
    new = shell.run("h", ["cat", "/proc/sys/kernel/random/boot_id"]).stdout.strip()
    assert new and new != old
    assert shell.run("h", ["needs-restarting", "-r"]).exit_code == 0


def test_never_returns() -> None:
    shell, state, clock = make()
    state.never_returns = True
    with pytest.raises(TransientDriverError):
        shell.run("h", ["reboot"])
    clock.now = 1e9
    with pytest.raises(TransientDriverError):
        shell.run("h", ["true"])


def test_df_systemd_and_scripted_checks() -> None:
    shell, state, _ = make()
    df = shell.run("h", ["df", "-Pm", "/var"])
    assert df.exit_code == 0 and df.stdout.splitlines()[1].split()[3] == "20000"
    del state.free_mib["/boot"]
    assert "No such file" in shell.run("h", ["df", "-Pm", "/boot"]).stderr
    state.failed_units = ["kdump.service"]
    assert "kdump.service loaded failed" in shell.run("h", ["systemctl", "--failed", "--no-legend", "--plain"]).stdout
    state.commands["/opt/check --deep 'a b'"] = [2, "", "broken\n"]
    res = shell.run("h", ["/opt/check", "--deep", "a b"])
    assert (res.exit_code, res.stderr) == (2, "broken\n")
    state.has_systemd = False
    assert shell.run("h", ["test", "-d", "/run/systemd/system"]).exit_code == 1


def test_state_survives_a_json_round_trip() -> None:
    shell, state, _ = make()
    shell.run("h", ["dnf", "-y", "update"])
    back = SimHostPackages(**json.loads(json.dumps(asdict(state))))
    assert back == state
