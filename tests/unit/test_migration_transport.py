"""Migration transport (issue 20): TLS required/preferred/off and the migration network, decided from
what each host's QEMU certificates and addresses are. Certificates are made here with cryptography."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hostmaint.inventory import MigrationTls
from hostmaint.migration.transport import MigrationEnd, TransportPlan, render_refusals
from hostmaint.migration.transport_probe import addresses_in, cert_dir, probe_end
from hostmaint.models import CommandResult, MigrationOptions, Placement

NOW = datetime(2026, 12, 6, 8, 0, tzinfo=UTC)


class Ca:
    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = self._build(self.name, self.key.public_key(), ca=True, sans=())

    def _build(self, subject: x509.Name, public: ec.EllipticCurvePublicKey, *, ca: bool, sans: Sequence[str],
               days: int = 30, start: datetime = NOW - timedelta(days=1)) -> x509.Certificate:
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(self.name).public_key(public)
             .serial_number(x509.random_serial_number()).not_valid_before(start)
             .not_valid_after(start + timedelta(days=days))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ip_address(a)) for a in sans]),
                                critical=False)
        return b.sign(self.key, hashes.SHA256())

    def issue(self, cn: str, sans: Sequence[str] = (), days: int = 30) -> str:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        return self._build(name, key.public_key(), ca=False, sans=sans, days=days).public_bytes(
            serialization.Encoding.PEM).decode()

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()


LAB = Ca("lab CA")
OTHER = Ca("another CA")
KEYS = frozenset({"server-key.pem", "client-key.pem"})


def end(host: str, address: str | None = None, ca: Ca = LAB, *, certs: bool = True, days: int = 30,
        sans: Sequence[str] | None = None) -> MigrationEnd:
    if not certs:
        return MigrationEnd(host=host, address=address)
    names = list(sans) if sans is not None else [address] if address else []
    return MigrationEnd(host=host, address=address, keys=KEYS, certs={
        "ca-cert.pem": ca.pem, "server-cert.pem": ca.issue(host, names, days), "client-cert.pem": ca.issue(host)})


def plan(mode: MigrationTls, *ends: MigrationEnd) -> TransportPlan:
    return TransportPlan(mode=mode, ends={e.host: e for e in ends}, now=NOW)


GOOD = (end("hv01", "10.214.10.11"), end("hv02", "10.214.10.12"), end("hv03", "10.214.10.13"))


@pytest.mark.parametrize(("name", "ends", "refused_host", "says"), [
    ("every host ready", GOOD, None, None),
    ("TLS off on a target", (GOOD[0], GOOD[1], end("hv03", "10.214.10.13", certs=False)), "hv03",
     "no QEMU TLS certificates"),
    ("TLS off on the source", (end("hv01", certs=False), GOOD[1], GOOD[2]), "hv01", "no QEMU TLS certificates"),
    ("a target's certificate from another CA", (GOOD[0], GOOD[1], end("hv03", "10.214.10.13", OTHER)), "hv03",
     "not signed by the CA hv01 trusts"),
    ("an expired certificate", (GOOD[0], end("hv02", "10.214.10.12", days=0), GOOD[2]), "hv02", "expired"),
    ("the server certificate lacks the migration address",
     (GOOD[0], end("hv02", "10.214.10.12", sans=["10.213.10.12"]), GOOD[2]), "hv02",
     "does not name the migration address 10.214.10.12"),
    ("a key file missing", (GOOD[0], GOOD[1], MigrationEnd(host="hv03", certs=GOOD[2].certs,
                                                           keys=frozenset({"client-key.pem"}))),
     "hv03", "missing in /etc/pki/qemu: server-key.pem"),
    ("no address on the migration network",
     (GOOD[0], GOOD[1], MigrationEnd(host="hv03", problems=("no address in the migration network 10.214.10.0/24",),
                                     certs=GOOD[2].certs, keys=KEYS)), "hv03", "no address in the migration network"),
])
def test_required_refuses_naming_the_host_and_what_is_missing(name: str, ends: tuple[MigrationEnd, ...],
                                                               refused_host: str | None, says: str | None) -> None:
    refusals = plan(MigrationTls.REQUIRED, *ends).refusals("hv01", ["hv02", "hv03"])
    if refused_host is None:
        assert refusals == [], name
        return
    assert [r.host for r in refusals] == [refused_host], (name, refusals)
    assert says is not None and says in refusals[0].reason, (name, refusals[0].reason)
    text = render_refusals(refusals)
    assert text.startswith(f"{refused_host}: ") and "to go on:" in text


def test_required_routes_with_tls_on_the_migration_address() -> None:
    route = plan(MigrationTls.REQUIRED, *GOOD).route("hv01", "hv02")
    assert (route.tls, route.address, route.warning) == (True, "10.214.10.12", None)


def test_preferred_falls_back_to_plain_with_a_warning_only_where_a_peer_cannot() -> None:
    p = plan(MigrationTls.PREFERRED, GOOD[0], GOOD[1], end("hv03", "10.214.10.13", OTHER))
    assert p.refusals("hv01", ["hv02", "hv03"]) == []
    good, bad = p.route("hv01", "hv02"), p.route("hv01", "hv03")
    assert (good.tls, good.warning) == (True, None)
    assert bad.tls is False and bad.address == "10.214.10.13"
    assert bad.warning is not None and "fell back to plain TCP" in bad.warning and "hv03" in bad.warning


def test_off_migrates_plain_on_the_migration_network_and_checks_no_certificate() -> None:
    p = plan(MigrationTls.OFF, MigrationEnd(host="hv01", probed_tls=False),
             MigrationEnd(host="hv02", address="10.214.10.12", probed_tls=False))
    assert p.refusals("hv01", ["hv02"]) == []
    assert p.route("hv01", "hv02") == p.route("hv01", "hv02")
    route = p.route("hv01", "hv02")
    assert (route.tls, route.address, route.warning) == (False, "10.214.10.12", None)


def test_a_host_that_could_not_be_read_is_refused_in_every_mode() -> None:
    unread = MigrationEnd(host="hv02", probed_tls=False,
                          problems=("its migration settings cannot be read over SSH: x",))
    for mode in MigrationTls:
        refusals = plan(mode, GOOD[0], unread).refusals("hv01", ["hv02"])
        assert [(r.host, r.reason) for r in refusals] == [("hv02", unread.problems[0])], mode


@pytest.mark.parametrize(("conf", "expected"), [
    ("", "/etc/pki/qemu"),
    ('default_tls_x509_cert_dir = "/etc/libvirt/pki/qemu"\n', "/etc/libvirt/pki/qemu"),
    ('#migrate_tls_x509_cert_dir = "/x"\ndefault_tls_x509_cert_dir = "/d/"\n', "/d"),
    ('default_tls_x509_cert_dir = "/d"\nmigrate_tls_x509_cert_dir = "/m"  # own\n', "/m"),
])
def test_cert_dir_follows_libvirts_precedence(conf: str, expected: str) -> None:
    assert cert_dir(conf) == expected


def test_addresses_are_discovered_in_the_migration_network() -> None:
    out = ("1: lo    inet 127.0.0.1/8 scope host lo\n"
           "2: eth0    inet 10.213.10.11/24 brd 10.213.10.255 scope global eth0\n"
           "3: eth1    inet 10.214.10.11/24 brd 10.214.10.255 scope global eth1\n"
           "3: eth1    inet6 fe80::1/64 scope link\n"
           "4: x    inet not-an-address\n")
    assert addresses_in(out, "10.214.10.0/24") == ["10.214.10.11"]
    assert addresses_in(out, "192.168.0.0/16") == []


def test_probe_reads_public_certificates_and_key_names_only() -> None:
    ends = GOOD[1]
    calls: list[tuple[str, ...]] = []
    d = "/etc/libvirt/pki/qemu"

    def run(host: str, argv: Sequence[str], timeout: float = 60.0) -> CommandResult:
        calls.append(tuple(argv))
        if argv[0] == "ip":
            out = "3: eth1    inet 10.214.10.12/24 scope global eth1\n"
        elif argv[0] == "cat":
            out = f'default_tls_x509_cert_dir = "{d}"\n'
        elif argv[0] == "ls":
            out = "ca-cert.pem\nclient-cert.pem\nclient-key.pem\nserver-cert.pem\nserver-key.pem\n"
        else:
            out = "".join(f"{line}\n" for path in argv[5:] for line in
                          (f"{path}:{x}" for x in ends.certs[path.rsplit("/", 1)[1]].splitlines()))
        return CommandResult(host=host, argv=tuple(argv), exit_code=0, stdout=out)

    class Shell:
        def run(self, host: str, argv: Sequence[str], timeout: float = 60.0) -> CommandResult:
            return run(host, argv, timeout)

        def close(self) -> None:
            pass

    got = probe_end(Shell(), "hv02", tls=True, network="10.214.10.0/24", address=None)
    assert got.address == "10.214.10.12" and got.cert_dir == d and got.keys == KEYS
    assert {k: v.strip() for k, v in got.certs.items()} == {k: v.strip() for k, v in ends.certs.items()}
    assert not any("key" in a for c in calls if c[0] in ("grep", "cat") for a in c[1:]), calls
    assert plan(MigrationTls.REQUIRED, GOOD[0], got).refusals("hv01", ["hv02"]) == []


@pytest.mark.parametrize(("options", "tls", "uri", "listen"), [
    (MigrationOptions(), False, None, None),
    (MigrationOptions(tls=True), True, None, None),
    (MigrationOptions(tls=True, migration_address="10.214.10.12"), True, "tcp://10.214.10.12", "10.214.10.12"),
    (MigrationOptions(migration_address="fd00::12"), False, "tcp://[fd00::12]", "fd00::12"),
])
def test_the_driver_asks_libvirt_for_tls_and_the_migration_address(options: MigrationOptions, tls: bool,
                                                                    uri: str | None, listen: str | None) -> None:
    import libvirt

    from hostmaint.drivers.libvirt.migration import migration_request

    flags, params = migration_request("<domain type='kvm'><name>v</name></domain>", options)
    assert bool(flags & libvirt.VIR_MIGRATE_TLS) is tls
    assert params.get(libvirt.VIR_MIGRATE_PARAM_URI) == uri
    assert params.get(libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS) == listen


def test_a_transient_domain_migrates_without_being_defined_on_the_target() -> None:
    import libvirt

    from hostmaint.drivers.libvirt.migration import migration_request

    both = libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    xml = "<domain type='kvm'><name>v</name></domain>"
    persistent, _ = migration_request(xml, MigrationOptions())
    transient, _ = migration_request(xml, MigrationOptions(), persistent=False)
    assert persistent & both == both
    assert transient & both == 0 and transient & libvirt.VIR_MIGRATE_LIVE
    assert transient | both == persistent


def test_tls_costs_the_simulated_drain_what_the_measurement_says() -> None:
    from hostmaint.migration.policy import SchedulerPolicy, stream_rate
    from hostmaint.migration.simulate import SimParams, simulate_drain
    from hostmaint.models import Limits, Placement

    policy = SchedulerPolicy.fixed(1)
    plain, tls = MigrationOptions(), MigrationOptions(tls=True)
    assert stream_rate(tls, policy, 10_000.0) == pytest.approx(policy.stream_mib_s * policy.tls_stream_factor)
    assert stream_rate(plain, policy, 10_000.0) == policy.stream_mib_s
    placements = [Placement(vm=f"v{i}", source="a", target="b", memory_mib=8192, reason="t") for i in range(3)]
    limits = Limits(migrations_per_source=1, migrations_per_target=1, migrations_per_cluster=1)
    params = SimParams(tls_setup_s=2.0)
    t_plain = simulate_drain(placements, limits, policy=policy, options=plain, params=params).makespan_s
    t_tls = simulate_drain(placements, limits, policy=policy, options=tls, params=params).makespan_s
    # each of the 3 serial migrations: 2 s more set-up and 8 GiB at half the rate
    expected = 3 * (2.0 + 8192 / (policy.stream_mib_s * policy.tls_stream_factor) - 8192 / policy.stream_mib_s)
    assert t_tls - t_plain == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize(("migration", "simulated", "tls", "factor"), [
    ({}, False, True, None),  # the default: required
    ({"tls": "preferred"}, False, True, None),
    ({"tls": "off"}, False, False, None),
    ({"tls_stream_factor": 0.9}, False, True, 0.9),
    ({}, True, False, None),  # a SIMULATED fleet's migrations are never encrypted
])
def test_the_clusters_tls_setting_reaches_the_scheduler_and_the_simulator(
        tmp_path: Path, migration: dict[str, object], simulated: bool, tls: bool, factor: float | None) -> None:
    import yaml

    from hostmaint.inventory import load_inventory
    from hostmaint.maintenance import drain_settings
    from hostmaint.migration.policy import DEFAULT_TLS_STREAM_FACTOR

    doc: dict[str, object] = {
        "version": 1, "clusters": [{"name": "c", "migration": migration}],
        "hosts": [{"name": "h1", "cluster": "c", "libvirt_uri": "qemu+tls://h1/system",
                   "ssh": {"address": "h1", "key": {"agent": True}, "known_hosts": "kh"}}]}
    if simulated:
        doc["simulation"] = {"state_file": "fleet.json"}
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(doc))
    policy, options = drain_settings(load_inventory(path), "c")
    assert options.tls is tls
    assert policy.tls_stream_factor == (factor or DEFAULT_TLS_STREAM_FACTOR)


def test_the_clusters_downtime_limit_and_switch_over_reach_each_migrations_limit(tmp_path: Path) -> None:
    import yaml

    from hostmaint.inventory import load_inventory
    from hostmaint.maintenance import drain_settings
    from hostmaint.migration.policy import MigrationSpec, options_for

    doc = {"version": 1, "clusters": [{"name": "c", "migration": {"downtime_limit_ms": 500, "switchover_ms": 150}}],
           "hosts": [{"name": "h1", "cluster": "c", "libvirt_uri": "qemu+tls://h1/system",
                      "ssh": {"address": "h1", "key": {"agent": True}, "known_hosts": "kh"}}]}
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(doc))
    policy, options = drain_settings(load_inventory(path), "c")
    assert options.downtime_limit_ms == 500 and policy.switchover_ms == 150
    spec = MigrationSpec(Placement(vm="v", source="h1", target="h2", memory_mib=1024), 1024, 0.0)
    # alone at its share: QEMU may plan for what is left after the hosts' switch-over
    assert options_for(spec, options, policy, 600, 600).downtime_limit_ms == 350


class _Hosts:
    """A HostShell over fake hosts: each answers the transport probe from its MigrationEnd."""

    def __init__(self, ends: dict[str, MigrationEnd]) -> None:
        self.ends = ends
        self.asked: set[str] = set()

    def run(self, host: str, argv: Sequence[str], timeout: float = 60.0) -> CommandResult:
        self.asked.add(host)
        end = self.ends[host]
        d = "/etc/pki/qemu"
        if argv[0] == "ip":
            out = f"3: eth1    inet {end.address}/24 scope global eth1\n" if end.address else ""
        elif argv[0] == "cat":
            out = ""
        elif argv[0] == "ls":
            out = "\n".join([*end.certs, *end.keys])
        else:
            out = "".join(f"{path}:{line}\n" for path in argv[5:]
                          for line in end.certs[path.removeprefix(d + "/")].splitlines())
        return CommandResult(host=host, argv=tuple(argv), exit_code=0, stdout=out)

    def close(self) -> None:
        pass


def _runtime(tmp_path: Path, shell: _Hosts, mode: str) -> object:
    import yaml

    from hostmaint.audit import AuditTrail
    from hostmaint.db import open_engine
    from hostmaint.inventory import load_inventory
    from hostmaint.runtime import Runtime
    from hostmaint.state import HostStateStore

    doc = {"version": 1, "clusters": [{"name": "c", "migration": {"tls": mode, "network": "10.214.10.0/24"}}],
           "hosts": [{"name": h, "cluster": "c", "libvirt_uri": f"qemu+tls://{h}/system",
                      "ssh": {"address": h, "key": {"agent": True}, "known_hosts": "kh"}}
                     for h in ("hv01", "hv02", "hv03")]}
    (tmp_path / "inventory.yaml").write_text(yaml.safe_dump(doc))
    engine = open_engine(f"sqlite:///{tmp_path / 'hm.db'}")
    return Runtime(inventory=load_inventory(tmp_path / "inventory.yaml"), inventory_path=str(tmp_path),
                   hypervisor=None, shell=shell, states=HostStateStore(engine),  # type: ignore[arg-type]
                   audit=AuditTrail(engine), simulated=False)


def test_the_precheck_refuses_a_host_without_tls_unless_it_is_cordoned(tmp_path: Path) -> None:
    from hostmaint.errors import StepError
    from hostmaint.maintenance import StepRecord, check_transport

    shell = _Hosts({"hv01": GOOD[0], "hv02": GOOD[1], "hv03": end("hv03", "10.214.10.13", certs=False)})
    rt = _runtime(tmp_path, shell, "required")
    rec = StepRecord()
    with pytest.raises(StepError) as refused:
        check_transport(rt, rec, "hv01")  # type: ignore[arg-type]
    assert "hv03: no QEMU TLS certificates" in str(refused.value) and "nothing changed" in str(refused.value)
    assert rec.details["transport"]["hosts"]["hv03"]["tls"] == ["no QEMU TLS certificates in /etc/pki/qemu "
                                                                 "(migration TLS is off on this host)"]
    # cordoned by its operator, hv03 is no target: the drain may go on without it (and it is not read)
    rt.states.set_aside("hv03", "no certificates yet", None)  # type: ignore[attr-defined]
    shell.asked.clear()
    check_transport(rt, StepRecord(), "hv01")  # type: ignore[arg-type]
    assert shell.asked == {"hv01", "hv02"}
    # preferred: nothing refused, the fallback is decided (and audited) per migration by the drain
    (tmp_path / "preferred").mkdir()
    check_transport(_runtime(tmp_path / "preferred", _Hosts(shell.ends), "preferred"),  # type: ignore[arg-type]
                    StepRecord(), "hv01")


def test_names_from_a_hosts_certificate_are_shown_never_acted_on() -> None:
    forged = Ca("evil\x1b[2J\nhv01: ready")
    p = plan(MigrationTls.REQUIRED, GOOD[0], end("hv02", "10.214.10.12", forged))
    (refusal,) = p.refusals("hv01", ["hv02"])
    assert "\x1b" not in refusal.reason and "\n" not in refusal.reason
    assert "\\x1b[2J" in refusal.reason


@pytest.mark.parametrize(("cluster", "host", "field", "says"), [
    ({"tls": "sometimes"}, {}, "clusters[0].migration.tls", "'required', 'preferred' or 'off'"),
    ({"network": "10.214.0.5/24"}, {}, "clusters[0].migration.network", "host bits set"),
    ({"network": "not-a-net"}, {}, "clusters[0].migration.network", "must be a network"),
    ({"tls_stream_factor": 1.5}, {}, "clusters[0].migration.tls_stream_factor", "less than or equal to 1"),
    ({"switchover_ms": 300}, {}, "clusters[0].migration", "switchover_ms (300) must be below the downtime limit (300"),
    ({"downtime_limit_ms": 100, "switchover_ms": 120}, {}, "clusters[0].migration", "below the downtime limit (100"),
    ({"downtime_limit_ms": 5}, {}, "clusters[0].migration.downtime_limit_ms", "greater than or equal to 10"),
    ({"network": "10.214.0.0/24"}, {"migration_address": "10.9.9.9"}, "hosts[0].migration_address (host h1)",
     "not in its cluster's migration.network 10.214.0.0/24"),
    ({}, {"migration_address": "bad address!"}, "hosts[0].migration_address (host h1)", "IP address or a DNS name"),
    ({}, {"libvirt_uri": "qemu+tls://h1/system?no_verify=1"}, "hosts[0].libvirt_uri (host h1)",
     "no_verify=1 turns off the check"),
    ({}, {"libvirt_uri": "qemu+libssh://root@h1/system?known_hosts_verify=auto"}, "hosts[0].libvirt_uri (host h1)",
     "known_hosts_verify=auto"),
])
def test_bad_migration_settings_are_refused_naming_the_field(cluster: dict[str, object], host: dict[str, object],
                                                              field: str, says: str) -> None:
    from hostmaint.errors import InventoryError
    from hostmaint.inventory import parse_inventory

    doc = {"version": 1, "clusters": [{"name": "c", "migration": cluster}],
           "hosts": [{"name": "h1", "cluster": "c", "libvirt_uri": "qemu+tls://h1/system",
                      "ssh": {"address": "h1", "key": {"agent": True}, "known_hosts": "kh"}, **host}]}
    with pytest.raises(InventoryError) as refused:
        parse_inventory(doc, "inventory.yaml")
    text = str(refused.value)
    assert f"{field}:" in text and says in text, text


def test_a_file_name_with_a_line_break_does_not_pass_for_a_key_file(tmp_path: Path) -> None:
    # `ls -1` prints names as they are: "x<LF>client-key.pem" read as two names, a client key present that
    # is not, and TLS judged ready before the cordon (QEMU would then refuse every migration mid-drain)
    import subprocess

    ends = GOOD[1]
    for name, pem in ends.certs.items():
        (tmp_path / name).write_text(pem)
    (tmp_path / "server-key.pem").write_text("not read")
    (tmp_path / "x\nclient-key.pem").write_text("")

    class Shell:  # the real ls and grep, on this machine: what a host's would print
        def run(self, host: str, argv: Sequence[str], timeout: float = 60.0) -> CommandResult:
            if argv[0] == "cat":
                return CommandResult(host=host, argv=tuple(argv), exit_code=0,
                                     stdout=f'migrate_tls_x509_cert_dir = "{tmp_path}"\n')
            done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
            return CommandResult(host=host, argv=tuple(argv), exit_code=done.returncode, stdout=done.stdout,
                                 stderr=done.stderr)

        def close(self) -> None:
            pass

    got = probe_end(Shell(), "hv02", tls=True, network=None, address=None)
    assert got.keys == frozenset({"server-key.pem"}) and set(got.certs) == set(ends.certs)
    refusals = plan(MigrationTls.REQUIRED, GOOD[0], got).refusals("hv01", ["hv02"])
    assert [r.reason for r in refusals] == [f"QEMU TLS files missing in {tmp_path}: client-key.pem"]


def test_a_server_certificate_whose_names_do_not_parse_is_refused_naming_the_host() -> None:
    # cryptography parses extensions when first asked: a malformed subjectAltName raised a bare ValueError
    # out of the refusals (the precheck crashed naming no host) and out of the routes of a drain
    from cryptography.x509.oid import ExtensionOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hv02")])
    garbled = (x509.CertificateBuilder().subject_name(name).issuer_name(LAB.name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(NOW - timedelta(days=1))
               .not_valid_after(NOW + timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x00garbage"),
                              critical=False)
               .sign(LAB.key, hashes.SHA256())).public_bytes(serialization.Encoding.PEM).decode()
    hv02 = MigrationEnd(host="hv02", address="10.214.10.12", keys=KEYS,
                        certs={**GOOD[1].certs, "server-cert.pem": garbled})
    refusals = plan(MigrationTls.REQUIRED, GOOD[0], hv02).refusals("hv01", ["hv02"])
    assert [r.host for r in refusals] == ["hv02"]
    assert "server-cert.pem does not name the migration address 10.214.10.12" in refusals[0].reason
    assert "cannot be read" in refusals[0].reason
    route = plan(MigrationTls.PREFERRED, GOOD[0], hv02).route("hv01", "hv02")
    assert route.tls is False and route.warning is not None and "hv02" in route.warning
    assert plan(MigrationTls.REQUIRED, GOOD[0], hv02).summary()["hosts"]["hv02"]["tls"] != "ready"  # type: ignore[index]
