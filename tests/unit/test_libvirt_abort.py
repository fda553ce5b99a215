"""abortJob can block for minutes (QEMU stuck "cancelling"): the driver resends it from a fresh
connection. Fake hosts stand in for libvirtd here; the lab tests abort real migrations."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator

import libvirt
import pytest

from hostmaint.drivers.libvirt import LibvirtHypervisor, MonitorSettings
from hostmaint.errors import MigrationError
from tests.fakes.libvirtd import FakeConnector, FakeError, FakeHost


@pytest.fixture
def release() -> Iterator[threading.Event]:
    gate = threading.Event()
    yield gate
    gate.set()  # let blocked fake aborts finish


def driver(aborts: list[Callable[[], None]]) -> tuple[LibvirtHypervisor, FakeConnector]:
    """A driver whose hv01 runs vm1; its n-th abortJob does ``aborts[n]`` (the last one repeats)."""
    host = FakeHost()
    host.add("vm1").aborts = aborts
    connector = FakeConnector(host)
    return LibvirtHypervisor({"hv01": "qemu+tcp://10.213.7.11/system"}, connector=connector,
                             monitor=MonitorSettings(abort_timeout_s=0.2, abort_attempts=3),
                             sleep=lambda s: None), connector


def test_a_blocked_abort_is_resent_from_a_fresh_connection(release: threading.Event,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []
    hv, connector = driver([lambda: (calls.append("blocked"), release.wait(10)) and None,
                            lambda: calls.append("done")])
    with caplog.at_level(logging.WARNING, logger="hostmaint.drivers.libvirt"):
        hv.abort("vm1", "hv01")
    assert calls == ["blocked", "done"]
    opened = connector.opened
    assert len(opened) == 2 and opened[0] is not opened[1]
    # the operator hears of it, naming the VM and the host, though the abort itself succeeded
    [warning] = [r.getMessage() for r in caplog.records]
    assert "vm1 on hv01" in warning and "blocked" in warning and "resending" in warning


def test_an_abort_that_always_blocks_is_a_migration_error(release: threading.Event) -> None:
    hv, connector = driver([lambda: release.wait(10) and None])
    with pytest.raises(MigrationError) as caught:
        hv.abort("vm1", "hv01")
    assert caught.value.vm == "vm1" and caught.value.host == "hv01"
    assert "3 tries" in str(caught.value) and "blocked" in str(caught.value)
    assert len(connector.opened) == 3


def test_no_running_job_means_nothing_to_abort() -> None:
    hv, connector = driver([])  # the fake domain has no job: libvirt says "no job is active"
    hv.abort("vm1", "hv01")
    assert len(connector.opened) == 1 and connector.opened[0].closed


def test_a_refused_abort_names_vm_and_host() -> None:
    def refused() -> None:
        raise FakeError(libvirt.VIR_ERR_OPERATION_FAILED, "cannot abort migration in post-copy mode")

    hv, _ = driver([refused])
    with pytest.raises(MigrationError, match="vm1 on hv01: cannot abort migration in post-copy mode"):
        hv.abort("vm1", "hv01")
