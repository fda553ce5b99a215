"""Connection handling of the libvirt driver, with fake connections standing in for libvirtd:
reconnect after a dropped connection, clear errors for an unreachable host, no leak per thread.
(The lab tests do the same against a real libvirtd that is killed and restarted.)"""

from __future__ import annotations

import threading
from collections.abc import Callable

import libvirt
import pytest

import hostmaint.drivers.libvirt as driver_module
from hostmaint.drivers.libvirt import LibvirtHypervisor
from hostmaint.errors import DriverError, TransientDriverError

URI = "qemu+tcp://10.213.7.11/system"


class FakeError(libvirt.libvirtError):
    def __init__(self, code: int, domain: int, message: str) -> None:
        super().__init__(message)
        self._code, self._domain, self._message = code, domain, message

    def get_error_code(self) -> int:
        return self._code

    def get_error_domain(self) -> int:
        return self._domain

    def get_error_message(self) -> str:
        return self._message


class FakeDomain:
    def __init__(self, name: str) -> None:
        self._name = name

    def name(self) -> str:
        return self._name


class FakeConn:
    def __init__(self, list_domains: Callable[[], list[FakeDomain]]) -> None:
        self.list_domains = list_domains
        self.closed = False

    def setKeepAlive(self, interval: int, count: int) -> None:
        pass

    def isAlive(self) -> bool:
        return not self.closed

    def listAllDomains(self, flags: int) -> list[FakeDomain]:
        return self.list_domains()

    def close(self) -> int:
        self.closed = True
        return 0


def install(monkeypatch: pytest.MonkeyPatch, make: Callable[[int], FakeConn]) -> list[FakeConn]:
    opened: list[FakeConn] = []

    def fake_open(uri: str) -> FakeConn:
        conn = make(len(opened))
        opened.append(conn)
        return conn

    monkeypatch.setattr(driver_module.libvirt, "open", fake_open)
    return opened


def test_a_dropped_connection_is_reopened_and_the_call_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    def make(n: int) -> FakeConn:
        def listing() -> list[FakeDomain]:
            if n == 0:  # the first connection breaks, as when libvirtd restarts
                raise FakeError(libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC,
                                "Cannot recv data: Connection reset by peer")
            return [FakeDomain("vm2"), FakeDomain("vm1")]
        return FakeConn(listing)

    opened = install(monkeypatch, make)
    hv = LibvirtHypervisor({"hv01": URI}, sleep=lambda s: None)
    assert hv.running_vms("hv01") == ("vm1", "vm2")
    assert len(opened) == 2 and opened[0].closed and not opened[1].closed


def test_an_unreachable_host_is_transient_and_names_host_and_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    attempts: list[str] = []
    waits: list[float] = []

    def refuse(uri: str) -> FakeConn:
        attempts.append(uri)
        raise FakeError(libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC,
                        "unable to connect to server at '10.213.7.11:16509': Connection refused")

    monkeypatch.setattr(driver_module.libvirt, "open", refuse)
    hv = LibvirtHypervisor({"hv01": URI}, connect_retries=3, sleep=waits.append)
    with pytest.raises(TransientDriverError) as caught:
        hv.discover("hv01")
    assert caught.value.host == "hv01" and URI in str(caught.value) and "Connection refused" in str(caught.value)
    assert attempts == [URI] * 3 and len(waits) == 2  # retried with back-off, through the injected sleep


def test_other_libvirt_errors_are_driver_errors_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    def make(n: int) -> FakeConn:
        def listing() -> list[FakeDomain]:
            raise FakeError(libvirt.VIR_ERR_OPERATION_DENIED, libvirt.VIR_FROM_QEMU, "operation forbidden")
        return FakeConn(listing)

    opened = install(monkeypatch, make)
    hv = LibvirtHypervisor({"hv01": URI}, sleep=lambda s: None)
    with pytest.raises(DriverError) as caught:
        hv.running_vms("hv01")
    assert not isinstance(caught.value, TransientDriverError)
    assert caught.value.host == "hv01" and URI in str(caught.value) and "operation forbidden" in str(caught.value)
    assert len(opened) == 1


def test_unknown_host_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, lambda n: FakeConn(list))
    with pytest.raises(DriverError, match="hv09: unknown host"):
        LibvirtHypervisor({"hv01": URI}).running_vms("hv09")


def test_one_connection_per_thread_closed_when_the_thread_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    opened = install(monkeypatch, lambda n: FakeConn(list))
    hv = LibvirtHypervisor({"hv01": URI})
    hv.running_vms("hv01")
    hv.running_vms("hv01")
    assert len(opened) == 1  # reused within a thread
    barrier = threading.Barrier(4)

    def work() -> None:
        hv.running_vms("hv01")
        barrier.wait(5)  # all four alive at once: four connections

    workers = [threading.Thread(target=work) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(opened) == 5 and not any(c.closed for c in opened)
    # the next connection opened closes those of the threads that ended, not the main thread's
    late = threading.Thread(target=hv.running_vms, args=("hv01",))
    late.start()
    late.join()
    assert [c.closed for c in opened] == [False, True, True, True, True, False]
    hv.close()
    assert all(c.closed for c in opened)


CAPS = """<capabilities><host><uuid>4c4c4544-0000-0000-0000-000000000001</uuid><topology><cells num='1'>
<cell id='0'><memory unit='KiB'>{kib}</memory><pages unit='KiB' size='4'>0</pages>
<cpus num='2'><cpu id='0'/><cpu id='1'/></cpus></cell></cells></topology></host></capabilities>"""


class CapsConn(FakeConn):
    """A connection that answers discovery; counts getCapabilities and reports the memory it is told."""

    def __init__(self, host_kib: list[int], calls: list[str]) -> None:
        super().__init__(list)
        self.host_kib, self.calls = host_kib, calls

    def getCapabilities(self) -> str:
        self.calls.append("caps")
        return CAPS.format(kib=self.host_kib[0])

    def getCellsFreeMemory(self, start: int, n: int) -> list[int]:
        self.calls.append("free")
        return [1024 * 1024 * 1024] * n

    def getHostname(self) -> str:
        return "hv01"


def test_capabilities_are_read_once_per_ttl_and_free_memory_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    host_kib = [8 * 1024 * 1024]
    install(monkeypatch, lambda n: CapsConn(host_kib, calls))
    now = [0.0]
    hv = LibvirtHypervisor({"hv01": URI}, clock=lambda: now[0], sleep=lambda s: None, capabilities_ttl_s=60)
    assert hv.discover("hv01").cells[0].memory_mib == 8192
    host_kib[0] = 16 * 1024 * 1024  # the host changed (say, hugepage pools resized)
    now[0] = 59.0
    assert hv.discover("hv01").cells[0].memory_mib == 8192  # within the TTL: the cached topology
    assert calls == ["caps", "free", "free"]  # free memory is always read live
    now[0] = 61.0
    assert hv.discover("hv01").cells[0].memory_mib == 16384  # past the TTL: read again


def test_a_lost_connection_forgets_the_capabilities(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    host_kib = [8 * 1024 * 1024]
    opened = install(monkeypatch, lambda n: CapsConn(host_kib, calls))
    hv = LibvirtHypervisor({"hv01": URI}, clock=lambda: 0.0, sleep=lambda s: None)
    hv.discover("hv01")
    host_kib[0] = 16 * 1024 * 1024
    opened[0].closed = True  # the host rebooted: the connection is dead
    assert hv.discover("hv01").cells[0].memory_mib == 16384
    assert calls.count("caps") == 2 and len(opened) == 2


def test_a_new_connection_forgets_the_capabilities_other_threads_read(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    host_kib = [8 * 1024 * 1024]
    opened = install(monkeypatch, lambda n: CapsConn(host_kib, calls))
    now = [0.0]
    hv = LibvirtHypervisor({"hv01": URI}, clock=lambda: now[0], sleep=lambda s: None, capabilities_ttl_s=60)
    assert hv.discover("hv01").cells[0].memory_mib == 8192
    host_kib[0] = 16 * 1024 * 1024  # the host rebooted with other memory; this thread has not noticed yet
    opened[0].closed = True
    now[0] = 30.0  # well within the TTL
    seen: list[int] = []
    worker = threading.Thread(target=lambda: seen.append(hv.discover("hv01").cells[0].memory_mib))
    worker.start()
    worker.join()
    assert seen == [16384]  # its first connection: the topology after the reboot, not the cached one
    assert calls.count("caps") == 2


def test_capabilities_read_before_a_new_connection_opened_are_not_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    host_kib = [8 * 1024 * 1024]
    hv: LibvirtHypervisor | None = None

    class RacingConn(CapsConn):
        def getCapabilities(self) -> str:
            answer = super().getCapabilities()
            if calls.count("caps") == 1:
                # The answer is on its way back when the host reboots and another thread connects anew.
                host_kib[0] = 16 * 1024 * 1024
                assert hv is not None
                other = threading.Thread(target=hv.running_vms, args=("hv01",))
                other.start()
                other.join()
            return answer

    opened = install(monkeypatch, lambda n: RacingConn(host_kib, calls))
    hv = LibvirtHypervisor({"hv01": URI}, clock=lambda: 0.0, sleep=lambda s: None, capabilities_ttl_s=60)
    assert hv.discover("hv01").cells[0].memory_mib == 8192  # what that read said
    assert len(opened) == 2
    assert hv.discover("hv01").cells[0].memory_mib == 16384  # but it was not kept for the next discovery
    assert calls.count("caps") == 2
