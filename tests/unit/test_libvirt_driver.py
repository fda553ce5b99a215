"""What the libvirt driver does with what a host tells it: power operations on transient domains,
host output it cannot read, sparse NUMA node ids. Fake hosts stand in for libvirtd (with
libvirt's semantics where they matter); the lab tests run the same calls against a real one."""

from __future__ import annotations

import pytest

from hostmaint.drivers.libvirt import LibvirtHypervisor
from hostmaint.errors import DriverError, MigrationError, TransientDriverError
from hostmaint.models import MigrationOptions, Placement
from tests.fakes.libvirtd import CAPS_ONE_CELL, FakeConnector, FakeHost, domain_xml

URI = "qemu+tcp://10.213.7.11/system"


def driver(host: FakeHost) -> LibvirtHypervisor:
    return LibvirtHypervisor({"hv01": URI}, connector=FakeConnector(host), sleep=lambda s: None)


def power_driver(**persistent: bool) -> tuple[LibvirtHypervisor, FakeHost]:
    host = FakeHost()
    for name, keeps in persistent.items():
        host.add(name, persistent=keeps)
    return driver(host), host


def test_a_transient_domain_is_never_shut_down() -> None:
    hv, conn = power_driver(db1=False)
    dom = conn.domains["db1"]
    with pytest.raises(DriverError) as caught:
        hv.shutdown("db1", "hv01", timeout=5)
    err = caught.value
    assert not isinstance(err, TransientDriverError)  # retrying would not make it persistent
    assert err.host == "hv01" and "db1" in str(err) and "transient" in str(err)
    assert "never be started again" in str(err)
    assert dom.calls == [] and dom.active and "db1" in conn.domains  # nothing was sent; it still runs


def test_a_persistent_domain_is_shut_down_and_started_again() -> None:
    hv, conn = power_driver(db1=True)
    hv.shutdown("db1", "hv01", timeout=5)
    assert not conn.domains["db1"].active
    hv.start("db1", "hv01")
    assert conn.domains["db1"].active and conn.domains["db1"].calls == ["shutdown", "create"]


def test_shutting_down_a_stopped_or_absent_domain_is_a_no_op() -> None:
    hv, conn = power_driver(web1=True)
    conn.domains["web1"].active = False
    hv.shutdown("web1", "hv01", timeout=5)
    hv.shutdown("gone", "hv01", timeout=5)
    assert conn.domains["web1"].calls == []


# --- host output the parsers cannot read ------------------------------------------------

def listed(name: str, xml: str, persistent: bool = True) -> tuple[str, str, bool]:
    return name, xml, persistent


def discovery_driver(caps: str, domains: list[tuple[str, str, bool]], free: dict[int, int] | None = None,
                     pages: dict[int, dict[int, int]] | None = None) -> LibvirtHypervisor:
    host = FakeHost(caps=caps, free=free, pages=pages, hostname="hv01.example")
    for name, xml, persistent in domains:
        host.add(name, xml, persistent=persistent)
    return driver(host)


UNREADABLE = [
    # (case, capabilities, domains, the domain named, what the message quotes, the parser's own error)
    ("truncated capabilities", "<capabilities><host><uuid>x</uuid>", [], None,
     "not well-formed XML", "ParseError"),
    ("capabilities with an unknown size unit", CAPS_ONE_CELL.replace("unit='KiB'", "unit='PiB'"), [], None,
     "unknown libvirt size unit 'PiB'", "ValueError"),
    ("a cell id that is no number", CAPS_ONE_CELL.replace("id='0'>", "id='zero'>", 1), [], None,
     "'zero'", "ValueError"),
    ("truncated domain XML", CAPS_ONE_CELL,
     [listed("web1", domain_xml()), listed("db1", "<domain><name>db1</name>")], "db1",
     "not well-formed XML", "ParseError"),
    ("an open cpuset range", CAPS_ONE_CELL,
     [listed("db1", domain_xml("db1", extra="<cputune><vcpupin vcpu='0' cpuset='0-'/></cputune>"))], "db1",
     "invalid literal", "ValueError"),
    ("a pinned vcpu that is a word", CAPS_ONE_CELL,
     [listed("db1", domain_xml("db1", extra="<cputune><vcpupin vcpu='two' cpuset='1'/></cputune>"))], "db1",
     "'two'", "ValueError"),
    ("a domain without a name", CAPS_ONE_CELL, [listed("db1", domain_xml("").replace("<name></name>", ""))],
     "db1", "name: String should have at least 1 character", "ValidationError"),
]


@pytest.mark.parametrize(("case", "caps", "domains", "domain", "quoted", "cause"), UNREADABLE,
                         ids=[c[0] for c in UNREADABLE])
def test_host_output_the_parser_cannot_read_is_a_driver_error_naming_host_and_domain(
        case: str, caps: str, domains: list[tuple[str, str, bool]], domain: str | None, quoted: str,
        cause: str) -> None:
    hv = discovery_driver(caps, domains)
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


def test_a_readable_host_is_discovered() -> None:
    hv = discovery_driver(CAPS_ONE_CELL, [listed("web1", domain_xml())])
    found = hv.discover("hv01")
    assert [v.name for v in found.vms] == ["web1"] and found.hostname == "hv01.example"


def test_a_migration_whose_xml_cannot_be_rewritten_is_refused_before_it_starts() -> None:
    host = FakeHost()
    host.add("db1", "<domain><name>db1</name><cputune>")  # no FakeNetwork: a migration started would fail
    hv = LibvirtHypervisor({"hv01": URI, "hv02": "qemu+tcp://10.213.7.12/system"}, connector=FakeConnector(host),
                           sleep=lambda s: None)
    placement = Placement(vm="db1", source="hv01", target="hv02", target_cells=(0,), vcpupin={0: (1,)})
    with pytest.raises(MigrationError) as caught:
        hv.migrate("db1", "hv01", "hv02", MigrationOptions(placement=placement))
    err = caught.value
    assert (err.host, err.vm, err.target) == ("hv01", "db1", "hv02")
    assert "cannot read the XML of db1" in str(err) and "not well-formed XML" in str(err)
    assert "migrateToURI3" not in host.domains["db1"].calls


# --- sparse NUMA node ids ------------------------------------------------------------------

CAPS_NODES_0_AND_2 = (
    "<capabilities><host><uuid>h</uuid><topology><cells num='2'>"
    "<cell id='0'><memory unit='KiB'>8388608</memory><pages unit='KiB' size='2048'>512</pages>"
    "<cpus num='2'><cpu id='0'/><cpu id='1'/></cpus></cell>"
    "<cell id='2'><memory unit='KiB'>8388608</memory><pages unit='KiB' size='2048'>512</pages>"
    "<cpus num='2'><cpu id='2'/><cpu id='3'/></cpus></cell>"
    "</cells></topology></host></capabilities>")


@pytest.mark.parametrize("node_1", [None, 0], ids=["node 1 absent", "node 1 present, empty"])
def test_free_memory_and_hugepages_are_matched_to_cells_by_node_id(node_1: int | None) -> None:
    free = {0: 4 * 2**30, 2: 6 * 2**30} | ({} if node_1 is None else {1: node_1})
    cells = discovery_driver(CAPS_NODES_0_AND_2, [], free=free, pages={0: {2048: 100}, 2: {2048: 400}}).discover(
        "hv01").cells
    seen = {c.id: (c.free_mib, {hp.size_kib: hp.free for hp in c.hugepages}) for c in cells}
    assert seen == {0: (free[0] // 2**20, {2048: 100}), 2: (free[2] // 2**20, {2048: 400})}


def test_discovery_says_which_domains_are_transient() -> None:
    hv = discovery_driver(CAPS_ONE_CELL, [listed("web1", domain_xml("web1")),
                                          listed("scratch", domain_xml("scratch"), persistent=False)])
    assert {vm.name: vm.persistent for vm in hv.discover("hv01").vms} == {"web1": True, "scratch": False}
