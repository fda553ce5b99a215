"""Connection handling of the libvirt driver, with fake hosts standing in for libvirtd: reconnect
after a dropped connection, clear errors for an unreachable host, no leak per thread, the
capabilities cache. (The lab tests do the same against a real libvirtd that is killed and restarted.)"""

from __future__ import annotations

import threading

import libvirt
import pytest

from hostmaint.drivers.libvirt import ConnectionSettings, LibvirtHypervisor
from hostmaint.errors import DriverError, TransientDriverError
from tests.fakes.libvirtd import FakeClock, FakeConn, FakeConnector, FakeError, FakeHost

URI = "qemu+tcp://10.213.7.11/system"


def driver(connector: FakeConnector, **kw: object) -> LibvirtHypervisor:
    kw.setdefault("sleep", lambda s: None)
    return LibvirtHypervisor({"hv01": URI}, connector=connector, **kw)  # type: ignore[arg-type]


def test_a_dropped_connection_is_reopened_and_the_call_retried() -> None:
    host = FakeHost()
    host.add("vm2")
    host.add("vm1")

    def break_the_first(conn: FakeConn, n: int) -> None:
        if n == 0:  # the first connection breaks, as when libvirtd restarts
            conn.reset()

    connector = FakeConnector(host, on_open=break_the_first)
    assert driver(connector).running_vms("hv01") == ("vm1", "vm2")
    opened = connector.opened
    assert len(opened) == 2 and opened[0].closed and not opened[1].closed


def test_an_unreachable_host_is_transient_and_names_host_and_uri() -> None:
    waits: list[float] = []
    connector = FakeConnector(FakeHost(), refuse=FakeError(
        libvirt.VIR_ERR_SYSTEM_ERROR, "unable to connect to server at '10.213.7.11:16509': Connection refused",
        libvirt.VIR_FROM_RPC))
    hv = driver(connector, connection=ConnectionSettings(retries=3), sleep=waits.append)
    with pytest.raises(TransientDriverError) as caught:
        hv.discover("hv01")
    assert caught.value.host == "hv01" and URI in str(caught.value) and "Connection refused" in str(caught.value)
    assert connector.uris == [URI] * 3 and len(waits) == 2  # retried with back-off, through the injected sleep


def test_a_connection_lost_on_every_try_says_what_was_asked_and_names_its_host_once() -> None:
    host = FakeHost()
    connector = FakeConnector(host, on_open=lambda conn, n: conn.reset())  # every connection breaks
    hv = driver(connector, connection=ConnectionSettings(retries=2))
    with pytest.raises(TransientDriverError) as caught:
        hv.running_vms("hv01")
    text = str(caught.value)
    assert text.startswith("hv01: listing running VMs: connection to ") and URI in text, text
    assert text.count("hv01") == 1 and caught.value.host == "hv01"


def test_other_libvirt_errors_are_driver_errors_not_retried() -> None:
    host = FakeHost()
    host.failures["listAllDomains"] = FakeError(libvirt.VIR_ERR_OPERATION_DENIED, "operation forbidden")
    connector = FakeConnector(host)
    with pytest.raises(DriverError) as caught:
        driver(connector).running_vms("hv01")
    assert not isinstance(caught.value, TransientDriverError)
    assert caught.value.host == "hv01" and URI in str(caught.value) and "operation forbidden" in str(caught.value)
    assert len(connector.opened) == 1


def test_unknown_host_is_named() -> None:
    with pytest.raises(DriverError, match="hv09: unknown host"):
        driver(FakeConnector(FakeHost())).running_vms("hv09")


def test_one_connection_per_thread_closed_when_the_thread_ends() -> None:
    connector = FakeConnector(FakeHost())
    opened = connector.opened
    hv = driver(connector)
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


def caps_host(kib: int) -> FakeHost:
    return FakeHost(caps=CAPS.format(kib=kib), free={0: 1024**3})


def test_capabilities_are_read_once_per_ttl_and_free_memory_every_time() -> None:
    host = caps_host(8 * 1024 * 1024)
    clock = FakeClock()
    hv = driver(FakeConnector(host), clock=clock, connection=ConnectionSettings(capabilities_ttl_s=60))
    assert hv.discover("hv01").cells[0].memory_mib == 8192
    host.caps = CAPS.format(kib=16 * 1024 * 1024)  # the host changed (say, hugepage pools resized)
    clock.now = 59.0
    assert hv.discover("hv01").cells[0].memory_mib == 8192  # within the TTL: the cached topology
    wanted = [c for c in host.calls if c in ("getCapabilities", "getCellsFreeMemory")]
    assert wanted == ["getCapabilities", "getCellsFreeMemory", "getCellsFreeMemory"]  # free memory: always live
    clock.now = 61.0
    assert hv.discover("hv01").cells[0].memory_mib == 16384  # past the TTL: read again


def test_a_lost_connection_forgets_the_capabilities() -> None:
    host = caps_host(8 * 1024 * 1024)
    connector = FakeConnector(host)
    hv = driver(connector, clock=lambda: 0.0)
    hv.discover("hv01")
    host.caps = CAPS.format(kib=16 * 1024 * 1024)
    connector.opened[0].closed = True  # the host rebooted: the connection is dead
    assert hv.discover("hv01").cells[0].memory_mib == 16384
    assert host.calls.count("getCapabilities") == 2 and len(connector.opened) == 2


def test_a_new_connection_forgets_the_capabilities_other_threads_read() -> None:
    host = caps_host(8 * 1024 * 1024)
    connector = FakeConnector(host)
    clock = FakeClock()
    hv = driver(connector, clock=clock, connection=ConnectionSettings(capabilities_ttl_s=60))
    assert hv.discover("hv01").cells[0].memory_mib == 8192
    host.caps = CAPS.format(kib=16 * 1024 * 1024)  # the host rebooted with other memory; this thread has not noticed
    connector.opened[0].closed = True
    clock.now = 30.0  # well within the TTL
    seen: list[int] = []
    worker = threading.Thread(target=lambda: seen.append(hv.discover("hv01").cells[0].memory_mib))
    worker.start()
    worker.join()
    assert seen == [16384]  # its first connection: the topology after the reboot, not the cached one
    assert host.calls.count("getCapabilities") == 2


def test_capabilities_read_before_a_new_connection_opened_are_not_cached() -> None:
    host = caps_host(8 * 1024 * 1024)
    connector = FakeConnector(host)
    hv = driver(connector, clock=lambda: 0.0, connection=ConnectionSettings(capabilities_ttl_s=60))

    def reboot_while_the_answer_travels() -> None:
        if host.calls.count("getCapabilities") == 1:
            # The answer is on its way back when the host reboots and another thread connects anew.
            host.caps = CAPS.format(kib=16 * 1024 * 1024)
            other = threading.Thread(target=hv.running_vms, args=("hv01",))
            other.start()
            other.join()

    host.after["getCapabilities"] = reboot_while_the_answer_travels
    assert hv.discover("hv01").cells[0].memory_mib == 8192  # what that read said
    assert len(connector.opened) == 2
    assert hv.discover("hv01").cells[0].memory_mib == 16384  # but it was not kept for the next discovery
    assert host.calls.count("getCapabilities") == 2
