"""What the libvirt driver does with what a host tells it: power operations on transient domains,
host output it cannot read, sparse NUMA node ids. Fake connections stand in for libvirtd (with
libvirt's semantics where they matter); the lab tests run the same calls against a real one."""

from __future__ import annotations

import libvirt
import pytest

import hostmaint.drivers.libvirt as driver_module
from hostmaint.drivers.libvirt import LibvirtHypervisor
from hostmaint.errors import DriverError, TransientDriverError

URI = "qemu+tcp://10.213.7.11/system"


class NoDomain(libvirt.libvirtError):
    def __init__(self, name: str) -> None:
        super().__init__(f"Domain not found: no domain with matching name '{name}'")
        self._name = name

    def get_error_code(self) -> int:
        return libvirt.VIR_ERR_NO_DOMAIN

    def get_error_domain(self) -> int:
        return libvirt.VIR_FROM_QEMU

    def get_error_message(self) -> str:
        return f"Domain not found: no domain with matching name '{self._name}'"


class PowerDomain:
    """A running domain; a transient one is undefined when it stops, as libvirt does."""

    def __init__(self, conn: PowerConn, name: str, persistent: bool) -> None:
        self.conn, self._name, self.persistent = conn, name, persistent
        self.active = True
        self.calls: list[str] = []

    def name(self) -> str:
        return self._name

    def isActive(self) -> int:
        return int(self.active)

    def isPersistent(self) -> int:
        return int(self.persistent)

    def shutdown(self) -> int:
        self.calls.append("shutdown")
        self.active = False
        if not self.persistent:
            del self.conn.domains[self._name]
        return 0

    def create(self) -> int:
        self.calls.append("create")
        self.active = True
        return 0


class PowerConn:
    def __init__(self) -> None:
        self.domains: dict[str, PowerDomain] = {}

    def setKeepAlive(self, interval: int, count: int) -> None:
        pass

    def isAlive(self) -> bool:
        return True

    def lookupByName(self, name: str) -> PowerDomain:
        if name not in self.domains:
            raise NoDomain(name)
        return self.domains[name]

    def close(self) -> int:
        return 0


def power_driver(monkeypatch: pytest.MonkeyPatch, **persistent: bool) -> tuple[LibvirtHypervisor, PowerConn]:
    conn = PowerConn()
    for name, keeps in persistent.items():
        conn.domains[name] = PowerDomain(conn, name, keeps)
    monkeypatch.setattr(driver_module.libvirt, "open", lambda uri: conn)
    return LibvirtHypervisor({"hv01": URI}, sleep=lambda s: None), conn


def test_a_transient_domain_is_never_shut_down(monkeypatch: pytest.MonkeyPatch) -> None:
    hv, conn = power_driver(monkeypatch, db1=False)
    dom = conn.domains["db1"]
    with pytest.raises(DriverError) as caught:
        hv.shutdown("db1", "hv01", timeout=5)
    err = caught.value
    assert not isinstance(err, TransientDriverError)  # retrying would not make it persistent
    assert err.host == "hv01" and "db1" in str(err) and "transient" in str(err)
    assert "never be started again" in str(err)
    assert dom.calls == [] and dom.active and "db1" in conn.domains  # nothing was sent; it still runs


def test_a_persistent_domain_is_shut_down_and_started_again(monkeypatch: pytest.MonkeyPatch) -> None:
    hv, conn = power_driver(monkeypatch, db1=True)
    hv.shutdown("db1", "hv01", timeout=5)
    assert not conn.domains["db1"].active
    hv.start("db1", "hv01")
    assert conn.domains["db1"].active and conn.domains["db1"].calls == ["shutdown", "create"]


def test_shutting_down_a_stopped_or_absent_domain_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    hv, conn = power_driver(monkeypatch, web1=True)
    conn.domains["web1"].active = False
    hv.shutdown("web1", "hv01", timeout=5)
    hv.shutdown("gone", "hv01", timeout=5)
    assert conn.domains["web1"].calls == []
