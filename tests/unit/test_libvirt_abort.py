"""abortJob can block for minutes (QEMU stuck "cancelling"): the driver resends it from a fresh
connection. Fake connections stand in for libvirtd here; the lab tests abort real migrations."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator

import libvirt
import pytest

import hostmaint.drivers.libvirt as driver_module
from hostmaint.drivers.libvirt import LibvirtHypervisor
from hostmaint.errors import MigrationError


class FakeError(libvirt.libvirtError):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self._code = code
        self._message = message

    def get_error_code(self) -> int:
        return self._code

    def get_error_domain(self) -> int:
        return libvirt.VIR_FROM_QEMU

    def get_error_message(self) -> str:
        return self._message


class FakeDomain:
    def __init__(self, abort: Callable[[], None]) -> None:
        self.abortJob = abort


class FakeConn:
    def __init__(self, abort: Callable[[], None]) -> None:
        self.domain = FakeDomain(abort)
        self.closed = False

    def lookupByName(self, name: str) -> FakeDomain:
        return self.domain

    def setKeepAlive(self, interval: int, count: int) -> None:
        pass

    def isAlive(self) -> bool:
        return True

    def close(self) -> int:
        self.closed = True
        return 0


@pytest.fixture
def release() -> Iterator[threading.Event]:
    gate = threading.Event()
    yield gate
    gate.set()  # let blocked fake aborts finish


def driver(monkeypatch: pytest.MonkeyPatch, aborts: list[Callable[[], None]]) -> tuple[LibvirtHypervisor,
                                                                                       list[FakeConn]]:
    opened: list[FakeConn] = []

    def fake_open(uri: str) -> FakeConn:
        conn = FakeConn(aborts[min(len(opened), len(aborts) - 1)])
        opened.append(conn)
        return conn

    monkeypatch.setattr(driver_module.libvirt, "open", fake_open)
    return LibvirtHypervisor({"hv01": "qemu+tcp://10.213.7.11/system"}, abort_timeout=0.2,
                             abort_attempts=3, sleep=lambda s: None), opened


def test_a_blocked_abort_is_resent_from_a_fresh_connection(monkeypatch: pytest.MonkeyPatch,
                                                          release: threading.Event,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []
    hv, opened = driver(monkeypatch, [lambda: (calls.append("blocked"), release.wait(10)) and None,
                                      lambda: calls.append("done")])
    with caplog.at_level(logging.WARNING, logger="hostmaint.drivers.libvirt"):
        hv.abort("vm1", "hv01")
    assert calls == ["blocked", "done"]
    assert len(opened) == 2 and opened[0] is not opened[1]
    # the operator hears of it, naming the VM and the host, though the abort itself succeeded
    [warning] = [r.getMessage() for r in caplog.records]
    assert "vm1 on hv01" in warning and "blocked" in warning and "resending" in warning


def test_an_abort_that_always_blocks_is_a_migration_error(monkeypatch: pytest.MonkeyPatch,
                                                          release: threading.Event) -> None:
    hv, opened = driver(monkeypatch, [lambda: release.wait(10) and None])
    with pytest.raises(MigrationError) as caught:
        hv.abort("vm1", "hv01")
    assert caught.value.vm == "vm1" and caught.value.host == "hv01"
    assert "3 tries" in str(caught.value) and "blocked" in str(caught.value)
    assert len(opened) == 3


def test_no_running_job_means_nothing_to_abort(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_job() -> None:
        raise FakeError(libvirt.VIR_ERR_OPERATION_INVALID, "Requested operation is not valid: no job is active")

    hv, opened = driver(monkeypatch, [no_job])
    hv.abort("vm1", "hv01")
    assert len(opened) == 1 and opened[0].closed


def test_a_refused_abort_names_vm_and_host(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused() -> None:
        raise FakeError(libvirt.VIR_ERR_OPERATION_FAILED, "cannot abort migration in post-copy mode")

    hv, _ = driver(monkeypatch, [refused])
    with pytest.raises(MigrationError, match="vm1 on hv01: cannot abort migration in post-copy mode"):
        hv.abort("vm1", "hv01")
