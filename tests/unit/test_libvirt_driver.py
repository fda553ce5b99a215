"""What the libvirt driver does with what a host tells it: power operations on transient domains,
host output it cannot read, sparse NUMA node ids. Fake connections stand in for libvirtd (with
libvirt's semantics where they matter); the lab tests run the same calls against a real one."""

from __future__ import annotations

import libvirt
import pytest

import hostmaint.drivers.libvirt as driver_module
from hostmaint.drivers.libvirt import LibvirtHypervisor
from hostmaint.errors import DriverError, MigrationError, TransientDriverError
from hostmaint.models import MigrationOptions, Placement

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


# --- host output the parsers cannot read ------------------------------------------------

CAPS_ONE_CELL = ("<capabilities><host><uuid>4c4c4544-0000-0000-0000-000000000001</uuid><topology><cells num='1'>"
                 "<cell id='0'><memory unit='KiB'>8388608</memory><cpus num='2'><cpu id='0'/><cpu id='1'/></cpus>"
                 "</cell></cells></topology></host></capabilities>")


def domain_xml(name: str = "web1", *, extra: str = "") -> str:
    return (f"<domain type='kvm'><name>{name}</name><uuid>uuid-{name}</uuid><memory unit='KiB'>1048576</memory>"
            f"<vcpu>2</vcpu>{extra}</domain>")


class ListedDomain:
    def __init__(self, name: str, xml: str, persistent: bool = True) -> None:
        self._name, self.xml, self.persistent = name, xml, persistent

    def name(self) -> str:
        return self._name

    def isPersistent(self) -> int:
        return int(self.persistent)

    def XMLDesc(self, flags: int) -> str:
        return self.xml

    def info(self) -> list[int]:
        return [libvirt.VIR_DOMAIN_RUNNING, 1048576, 1048576, 2, 0]


class DiscoveryConn:
    """Answers discovery: capabilities, free memory and pages by NUMA node id, running domains."""

    def __init__(self, caps: str, domains: list[ListedDomain], free: dict[int, int] | None = None,
                 pages: dict[int, dict[int, int]] | None = None) -> None:
        self.caps, self.domains = caps, domains
        self.free = free if free is not None else {0: 2**30}
        self.pages = pages or {}

    def setKeepAlive(self, interval: int, count: int) -> None:
        pass

    def isAlive(self) -> bool:
        return True

    def getCapabilities(self) -> str:
        return self.caps

    def getCellsFreeMemory(self, start: int, n: int) -> list[int]:
        # libvirt reads nodes start .. start+n-1 by id, and fails on a node the host does not have
        missing = [i for i in range(start, start + n) if i not in self.free]
        if missing:
            raise libvirt.libvirtError(f"Failed to query memory for NUMA node {missing[0]}")
        return [self.free[i] for i in range(start, start + n)]

    def getFreePages(self, sizes: list[int], start: int, n: int) -> dict[int, dict[int, int]]:
        if any(i not in self.free for i in range(start, start + n)):
            raise libvirt.libvirtError("no such NUMA node")
        return {i: {s: self.pages.get(i, {}).get(s, 0) for s in sizes} for i in range(start, start + n)}

    def listAllDomains(self, flags: int) -> list[ListedDomain]:
        return self.domains

    def getHostname(self) -> str:
        return "hv01.example"

    def close(self) -> int:
        return 0


def discovery_driver(monkeypatch: pytest.MonkeyPatch, conn: DiscoveryConn) -> LibvirtHypervisor:
    monkeypatch.setattr(driver_module.libvirt, "open", lambda uri: conn)
    return LibvirtHypervisor({"hv01": URI}, sleep=lambda s: None)


UNREADABLE = [
    # (case, capabilities, domains, the domain named, what the message quotes, the parser's own error)
    ("truncated capabilities", "<capabilities><host><uuid>x</uuid>", [], None,
     "not well-formed XML", "ParseError"),
    ("capabilities with an unknown size unit", CAPS_ONE_CELL.replace("unit='KiB'", "unit='PiB'"), [], None,
     "unknown libvirt size unit 'PiB'", "ValueError"),
    ("a cell id that is no number", CAPS_ONE_CELL.replace("id='0'>", "id='zero'>", 1), [], None,
     "'zero'", "ValueError"),
    ("truncated domain XML", CAPS_ONE_CELL,
     [ListedDomain("web1", domain_xml()), ListedDomain("db1", "<domain><name>db1</name>")], "db1",
     "not well-formed XML", "ParseError"),
    ("an open cpuset range", CAPS_ONE_CELL,
     [ListedDomain("db1", domain_xml("db1", extra="<cputune><vcpupin vcpu='0' cpuset='0-'/></cputune>"))], "db1",
     "invalid literal", "ValueError"),
    ("a pinned vcpu that is a word", CAPS_ONE_CELL,
     [ListedDomain("db1", domain_xml("db1", extra="<cputune><vcpupin vcpu='two' cpuset='1'/></cputune>"))], "db1",
     "'two'", "ValueError"),
    ("a domain without a name", CAPS_ONE_CELL, [ListedDomain("db1", domain_xml("").replace("<name></name>", ""))],
     "db1", "name: String should have at least 1 character", "ValidationError"),
]


@pytest.mark.parametrize(("case", "caps", "domains", "domain", "quoted", "cause"), UNREADABLE,
                         ids=[c[0] for c in UNREADABLE])
def test_host_output_the_parser_cannot_read_is_a_driver_error_naming_host_and_domain(
        monkeypatch: pytest.MonkeyPatch, case: str, caps: str, domains: list[ListedDomain], domain: str | None,
        quoted: str, cause: str) -> None:
    hv = discovery_driver(monkeypatch, DiscoveryConn(caps, domains))
    with pytest.raises(DriverError) as caught:
        hv.discover("hv01")
    err = caught.value
    assert not isinstance(err, TransientDriverError)  # the same output would come back: not retried
    assert err.host == "hv01" and str(err).startswith("hv01: ")
    assert quoted in str(err)
    assert "\n" not in str(err)  # one line, fit for a log and a run's state
    if domain is not None:
        assert f"domain {domain}:" in str(err)
    else:
        assert "capabilities" in str(err) and URI in str(err)
    assert type(err.__cause__).__name__ == cause  # the parser's error stays attached for debugging


def test_a_readable_host_is_discovered(monkeypatch: pytest.MonkeyPatch) -> None:
    hv = discovery_driver(monkeypatch, DiscoveryConn(CAPS_ONE_CELL, [ListedDomain("web1", domain_xml())]))
    found = hv.discover("hv01")
    assert [v.name for v in found.vms] == ["web1"] and found.hostname == "hv01.example"


class SourceDomain:
    def __init__(self, xml: str) -> None:
        self.xml = xml

    def isActive(self) -> int:
        return 1

    def XMLDesc(self, flags: int) -> str:
        return self.xml

    def migrateToURI3(self, uri: str, params: dict[str, object], flags: int) -> None:
        raise AssertionError("a migration was started from XML the driver could not read")


class MigrationConn(DiscoveryConn):
    def __init__(self, domain: SourceDomain) -> None:
        super().__init__(CAPS_ONE_CELL, [])
        self.domain = domain

    def lookupByName(self, name: str) -> SourceDomain:
        return self.domain


def test_a_migration_whose_xml_cannot_be_rewritten_is_refused_before_it_starts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    conn = MigrationConn(SourceDomain("<domain><name>db1</name><cputune>"))
    monkeypatch.setattr(driver_module.libvirt, "open", lambda uri: conn)
    hv = LibvirtHypervisor({"hv01": URI, "hv02": "qemu+tcp://10.213.7.12/system"}, sleep=lambda s: None)
    placement = Placement(vm="db1", source="hv01", target="hv02", target_cells=(0,), vcpupin={0: (1,)})
    with pytest.raises(MigrationError) as caught:
        hv.migrate("db1", "hv01", "hv02", MigrationOptions(placement=placement))
    err = caught.value
    assert (err.host, err.vm, err.target) == ("hv01", "db1", "hv02")
    assert "cannot read the XML of db1" in str(err) and "not well-formed XML" in str(err)


# --- sparse NUMA node ids ------------------------------------------------------------------

CAPS_NODES_0_AND_2 = (
    "<capabilities><host><uuid>h</uuid><topology><cells num='2'>"
    "<cell id='0'><memory unit='KiB'>8388608</memory><pages unit='KiB' size='2048'>512</pages>"
    "<cpus num='2'><cpu id='0'/><cpu id='1'/></cpus></cell>"
    "<cell id='2'><memory unit='KiB'>8388608</memory><pages unit='KiB' size='2048'>512</pages>"
    "<cpus num='2'><cpu id='2'/><cpu id='3'/></cpus></cell>"
    "</cells></topology></host></capabilities>")


@pytest.mark.parametrize("node_1", [None, 0], ids=["node 1 absent", "node 1 present, empty"])
def test_free_memory_and_hugepages_are_matched_to_cells_by_node_id(monkeypatch: pytest.MonkeyPatch,
                                                                    node_1: int | None) -> None:
    free = {0: 4 * 2**30, 2: 6 * 2**30} | ({} if node_1 is None else {1: node_1})
    conn = DiscoveryConn(CAPS_NODES_0_AND_2, [], free=free, pages={0: {2048: 100}, 2: {2048: 400}})
    cells = discovery_driver(monkeypatch, conn).discover("hv01").cells
    seen = {c.id: (c.free_mib, {hp.size_kib: hp.free for hp in c.hugepages}) for c in cells}
    assert seen == {0: (free[0] // 2**20, {2048: 100}), 2: (free[2] // 2**20, {2048: 400})}


def test_discovery_says_which_domains_are_transient(monkeypatch: pytest.MonkeyPatch) -> None:
    hv = discovery_driver(monkeypatch, DiscoveryConn(CAPS_ONE_CELL, [
        ListedDomain("web1", domain_xml("web1")), ListedDomain("scratch", domain_xml("scratch"), persistent=False)]))
    assert {vm.name: vm.persistent for vm in hv.discover("hv01").vms} == {"web1": True, "scratch": False}
