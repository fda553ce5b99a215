"""The drivers' log lines, debug ones included, show commands and what hosts said as data with their
secrets masked (hostmaint.display.command_line / masked / visible): a command carries inventory and
host values (package globs, a hook's URL with its password), and a debug line reaches the worker's
terminal and log files like any other. No host is contacted: the SSH driver gets a fake channel,
the libvirt driver fake hosts."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from hostmaint.drivers.libvirt import LibvirtHypervisor
from hostmaint.drivers.ssh import SshShell
from hostmaint.inventory import SshKey, SshTarget
from tests.fakes.libvirtd import FakeClock, FakeConnector, FakeHost, FakeNetwork

# an sshd banner or a tenant's VM name: a screen clear, a hyperlink, a right-to-left override, a fake line
HOSTILE = "\x1b[2J\x1b]8;;http://evil\x07x\u202e\nhv01: all checks passed"
PASSWORD = "hunter2-s3cret"


class _Channel:
    """A session channel whose command exits 0 at once with no output."""

    def __init__(self) -> None:
        self.commands: list[str] = []
        self.eof_received = True
        self.closed = False
        self.exit_status = 0

    def exec_command(self, command: str) -> None:
        self.commands.append(command)

    def recv_ready(self) -> bool:
        return False

    def recv_stderr_ready(self) -> bool:
        return False

    def exit_status_ready(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True

    def get_transport(self) -> None:
        return None


def _shown_as_data(line: str) -> None:
    assert "\x1b" not in line and "\n" not in line and "\u202e" not in line and "\x07" not in line
    assert "\\x1b[2J" in line and "\\n" in line and "\\u202e" in line


def test_the_ssh_drivers_debug_lines_mask_secrets_and_escape_host_text(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    host = f"hv1{HOSTILE}"
    target = SshTarget(address="192.0.2.10", key=SshKey(agent=True), known_hosts="/nonexistent")
    shell = SshShell({host: target})
    channel = _Channel()
    monkeypatch.setattr(shell, "_open_channel", lambda host, target, timeout: channel)
    argv = ["curl", "-fsS", f"https://svc:{PASSWORD}@repo.corp/{HOSTILE}", "-d", f"token={PASSWORD}"]
    with caplog.at_level(logging.DEBUG, logger="hostmaint.drivers.ssh"):
        res = shell.run(host, argv)
    assert res.argv == tuple(argv) and PASSWORD in channel.commands[0]  # the host still gets the exact command
    lines = [r.getMessage() for r in caplog.records]
    [run] = [line for line in lines if ": run curl " in line]
    assert [line for line in lines if " exited 0 in " in line]
    assert "https://svc:***@repo.corp/" in run and "token=***" in run
    for line in lines:
        assert PASSWORD not in line
        _shown_as_data(line)


def test_a_libvirt_warning_quoting_a_vm_name_in_an_error_is_one_line(caplog: pytest.LogCaptureFixture) -> None:
    # the autostart of a moved VM could not be set: the driver's error names the tenant's VM
    uris = {"hv01": "qemu+tcp://10.213.7.11/system", "hv02": "qemu+tcp://10.213.7.12/system"}
    network = FakeNetwork({uris["hv01"]: FakeHost("hv01"), uris["hv02"]: FakeHost("hv02")})
    clock = FakeClock()
    hv = LibvirtHypervisor(uris, connector=FakeConnector(network), clock=clock, sleep=clock.sleep, wait=clock.wait)
    vm: Any = f"web{HOSTILE}"
    with caplog.at_level(logging.WARNING, logger="hostmaint.drivers.libvirt"):
        hv.migrations._keep_autostart(vm, "hv02")  # not defined there: the flag cannot be set
    [line] = [r.getMessage() for r in caplog.records if "autostart could not be set" in r.getMessage()]
    _shown_as_data(line)
    assert "\\x1b" in line.rsplit("): ", 1)[1]  # the error's text, not only the names before it
