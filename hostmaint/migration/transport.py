"""How a live migration travels: encrypted or not (QEMU's TLS) and on which network. Pure decisions.

A cluster's ``migration.tls`` (required / preferred / off) and migration network meet what each host
has (:class:`MigrationEnd`, read from the host by :mod:`hostmaint.migration.transport_probe`): QEMU's
TLS certificates and the address it receives migrations on. From these:

- :func:`host_problems` — what one host lacks (no certificates, an expired or unreadable one, a server
  certificate that does not name the address it is dialled on, no address on the migration network);
- :func:`pair_problem` — what a source and a target lack together (a certificate the other's CA did not
  sign: each QEMU checks the other's);
- :class:`TransportPlan` — per migration a :class:`Route` (TLS or not, which address, and a warning when
  ``preferred`` fell back to plain), and :meth:`TransportPlan.refusals`: under ``required`` every host
  that cannot take part, with what is missing, before anything moves.

The certificate checks follow what QEMU enforces with ``*_tls_x509_verify = 1``, so a refusal here
is one QEMU would make mid-drain, said before the cordon and naming the host.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from hostmaint.display import visible
from hostmaint.inventory import MigrationTls

# QEMU's file names in its certificate directory (qemu.conf *_tls_x509_cert_dir)
CA_CERT = "ca-cert.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"
QEMU_FILES = (CA_CERT, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY)


@dataclass(frozen=True)
class MigrationEnd:
    """What one host offers a migration, as read from it.

    ``certs``: the public certificates found in QEMU's directory (file name → PEM); ``keys``: the key
    files present (their content is never read). ``address``: where it receives migrations (None: its
    management address). ``problems``: what reading the host found wrong (no address on the migration
    network, a directory it could not read)."""

    host: str
    cert_dir: str = "/etc/pki/qemu"
    certs: Mapping[str, str] = field(default_factory=dict)
    keys: frozenset[str] = frozenset()
    address: str | None = None
    problems: tuple[str, ...] = ()
    probed_tls: bool = True  # False: TLS was not looked at (migration.tls: off)


@dataclass(frozen=True)
class Route:
    """How one migration travels."""

    source: str
    target: str
    tls: bool
    address: str | None  # the target's migration address (None: its management address)
    warning: str | None = None  # preferred fell back to plain: why


@dataclass(frozen=True)
class Refusal:
    """A host that cannot take part in a migration as its cluster asks, and what is missing."""

    host: str
    reason: str
    hint: str


def _load(pem: str) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        return None


def _dn(cert: x509.Certificate, issuer: bool = False) -> str:
    # a certificate's names come from the host: shown, never acted on (a control character stays visible)
    return visible((cert.issuer if issuer else cert.subject).rfc4514_string())


def _names(cert: x509.Certificate) -> tuple[set[str], set[str]] | None:
    """(IP addresses, DNS names) the certificate's subjectAltName holds; None when its extensions do not
    parse (cryptography reads them when first asked, and raises ValueError then)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set(), set()
    except ValueError:
        return None
    return ({str(ip) for ip in san.get_values_for_type(x509.IPAddress)},
            {d.lower() for d in san.get_values_for_type(x509.DNSName)})


def _names_address(cert: x509.Certificate, address: str) -> bool:
    found = _names(cert)
    if found is None:
        return False
    ips, dns = found
    try:
        return str(ipaddress.ip_address(address)) in ips
    except ValueError:
        return address.lower() in dns or any(d.startswith("*.") and address.lower().partition(".")[2] == d[2:]
                                             for d in dns)


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def tls_problems(end: MigrationEnd, now: datetime) -> list[str]:
    """What keeps ``end``'s QEMU from TLS migrations on its own: missing, unreadable or expired files,
    a server certificate that does not name the address it is dialled on."""
    where = visible(end.cert_dir)  # read from the host's qemu.conf
    missing = [f for f in (CA_CERT, SERVER_CERT, CLIENT_CERT) if f not in end.certs]
    missing += [f for f in (SERVER_KEY, CLIENT_KEY) if f not in end.keys]
    if len(missing) == len(QEMU_FILES):
        return [f"no QEMU TLS certificates in {where} (migration TLS is off on this host)"]
    if missing:
        return [f"QEMU TLS files missing in {where}: {', '.join(missing)}"]
    problems = []
    for name in (CA_CERT, SERVER_CERT, CLIENT_CERT):
        cert = _load(end.certs[name])
        if cert is None:
            problems.append(f"{where}/{name} is not a PEM certificate")
            continue
        if cert.not_valid_after_utc <= now:
            problems.append(f"{where}/{name} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
        elif cert.not_valid_before_utc > now:
            problems.append(f"{where}/{name} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    if problems:
        return problems
    ca, server, client = (_load(end.certs[n]) for n in (CA_CERT, SERVER_CERT, CLIENT_CERT))
    assert ca is not None and server is not None and client is not None  # loaded above
    for name, cert in ((SERVER_CERT, server), (CLIENT_CERT, client)):
        if not _signed_by(cert, ca):
            problems.append(f"{where}/{name} (issuer {_dn(cert, issuer=True)}) is not signed by the host's own "
                            f"{CA_CERT} ({_dn(ca)})")
    if end.address is not None and not _names_address(server, end.address):
        found = _names(server)
        names = ("its extensions cannot be read" if found is None else
                 f"it names {visible(', '.join(sorted(found[0] | found[1]))) or 'no address'}")
        problems.append(f"{where}/{SERVER_CERT} does not name the migration address {end.address} "
                        f"({names}): the source's QEMU would refuse it")
    return problems


def pair_problem(source: MigrationEnd, target: MigrationEnd) -> str | None:
    """Why ``source``'s and ``target``'s QEMUs would not accept each other (each checks the other's
    certificate against its own CA); None when they would. Both must be free of :func:`tls_problems`."""
    src_ca, dst_ca = _load(source.certs[CA_CERT]), _load(target.certs[CA_CERT])
    server, client = _load(target.certs[SERVER_CERT]), _load(source.certs[CLIENT_CERT])
    assert src_ca is not None and dst_ca is not None and server is not None and client is not None
    if not _signed_by(server, src_ca):
        return (f"{target.host}'s QEMU server certificate (issuer {_dn(server, issuer=True)}) is not signed by "
                f"the CA {source.host} trusts ({_dn(src_ca)})")
    if not _signed_by(client, dst_ca):
        return (f"{source.host}'s QEMU client certificate (issuer {_dn(client, issuer=True)}) is not signed by "
                f"the CA {target.host} trusts ({_dn(dst_ca)})")
    return None


_TLS_HINT = ("install QEMU's certificates from the cluster's CA on it (docs/inventory.md#migration-tls-and-network), "
             "cordon it so it is no migration target, or set the cluster's migration.tls: preferred to let its "
             "migrations fall back to plain TCP (recorded in the audit)")
_NET_HINT = ("give the host an address in the cluster's migration.network, or set its migration_address in the "
             "inventory")


@dataclass(frozen=True)
class TransportPlan:
    """A cluster's migration transport for one drain: its TLS mode and what each host offers."""

    mode: MigrationTls
    ends: Mapping[str, MigrationEnd]
    now: datetime

    def _tls(self, host: str) -> list[str]:
        end = self.ends.get(host)
        if end is None:
            return ["not checked"]
        if not end.probed_tls:
            # could not be read (its problems say why), or not looked at
            return list(end.problems) or ["TLS not checked (migration.tls: off)"]
        return tls_problems(end, self.now)

    def address(self, host: str) -> str | None:
        end = self.ends.get(host)
        return end.address if end is not None else None

    def refusals(self, source: str, targets: Iterable[str]) -> list[Refusal]:
        """Under ``required``, every host of a drain of ``source`` onto ``targets`` that cannot take part
        with TLS, and what is missing; in every mode, a host without its address on the migration
        network (its migrations would cross the management network) or that could not be read.
        Empty: the drain may go on."""
        required = self.mode is MigrationTls.REQUIRED
        hosts = [source, *[t for t in dict.fromkeys(targets) if t != source]]
        broken = {h: self._tls(h) if required else [] for h in hosts}
        refusals: list[Refusal] = []
        for host in hosts:
            end = self.ends.get(host)
            found = end.problems if end is not None else ("not checked",)
            refusals += [Refusal(host, p, _NET_HINT if p in found else _TLS_HINT)
                         for p in dict.fromkeys([*found, *broken[host]])]
        if required and not broken[source]:
            for target in hosts[1:]:
                pair = None if broken[target] else pair_problem(self.ends[source], self.ends[target])
                if pair is not None:
                    refusals.append(Refusal(target, pair, _TLS_HINT))
        return refusals

    def summary(self) -> dict[str, object]:
        """What the audit record keeps: the mode and, per host, its migration address and TLS readiness."""
        hosts: dict[str, object] = {}
        for host, end in sorted(self.ends.items()):
            tls = (tls_problems(end, self.now) or "ready") if end.probed_tls else "not checked"
            hosts[host] = {"address": end.address, "tls": tls, **({"problems": list(end.problems)} if end.problems
                                                                  else {})}
        return {"tls": self.mode.value, "hosts": hosts}

    def route(self, source: str, target: str) -> Route:
        """How a migration from ``source`` to ``target`` travels. Under ``required`` a pair that cannot
        use TLS still gets ``tls=True``: libvirt then refuses it, the VM stays on its source
        (:meth:`refusals` is what keeps that from happening)."""
        address = self.address(target)
        if self.mode is MigrationTls.OFF:
            return Route(source, target, tls=False, address=address)
        if self.mode is MigrationTls.REQUIRED:
            return Route(source, target, tls=True, address=address)
        problems = [f"{source}: {p}" for p in self._tls(source)] + [f"{target}: {p}" for p in self._tls(target)]
        if not problems:
            pair = pair_problem(self.ends[source], self.ends[target])
            problems = [pair] if pair is not None else []
        if problems:
            return Route(source, target, tls=False, address=address,
                         warning="migration.tls: preferred fell back to plain TCP (the guest's memory crosses the "
                                 "network unencrypted): " + "; ".join(problems))
        return Route(source, target, tls=True, address=address)


def render_refusals(refusals: Iterable[Refusal]) -> str:
    """One line per refusal, grouped by host, with what to do once at the end."""
    lines = [f"{r.host}: {r.reason}" for r in refusals]
    hints = list(dict.fromkeys(r.hint for r in refusals))
    return "; ".join(lines) + ("; to go on: " + " / ".join(hints) if hints else "")


def network_name(address: str | None, network: str | None) -> str:
    """What ``host status`` shows: the migration address and network, or the management network."""
    if address is None:
        return "management network" + (f" (no address found in {network})" if network else "")
    return f"{address}" + (f" on {network}" if network else " (migration_address)")
