"""Read from a host, over its ``HostShell``, what its migrations can use (:class:`MigrationEnd`).

Three or four commands, argv lists only: ``cat /etc/libvirt/qemu.conf`` (where QEMU's certificates
are: ``migrate_tls_x509_cert_dir``, else ``default_tls_x509_cert_dir``, else ``/etc/pki/qemu``),
``ls -1 -b`` of that directory (which key files exist: a key is never read), ``grep -H`` of the public
certificates, and ``ip -o addr show`` when the host's address on the migration network is to be
discovered. What the host answers is data: a path from qemu.conf only ever becomes one argv element.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from hostmaint.drivers.base import HostShell
from hostmaint.errors import DriverError
from hostmaint.inventory import Inventory, MigrationTls
from hostmaint.migration.transport import (
    CA_CERT,
    CLIENT_CERT,
    QEMU_FILES,
    SERVER_CERT,
    MigrationEnd,
    TransportPlan,
)

QEMU_CONF = "/etc/libvirt/qemu.conf"
DEFAULT_CERT_DIR = "/etc/pki/qemu"
_SETTING = re.compile(r'^\s*(migrate_tls_x509_cert_dir|default_tls_x509_cert_dir)\s*=\s*"([^"]*)"\s*(#.*)?$')


def cert_dir(qemu_conf: str) -> str:
    """QEMU's migration certificate directory as qemu.conf sets it (libvirt's own precedence)."""
    found: dict[str, str] = {}
    for line in qemu_conf.splitlines():
        m = _SETTING.match(line)
        if m:
            found[m.group(1)] = m.group(2)
    path = found.get("migrate_tls_x509_cert_dir") or found.get("default_tls_x509_cert_dir") or DEFAULT_CERT_DIR
    return path.rstrip("/") or "/"


def _safe_path(path: str) -> bool:
    return path.startswith("/") and not any(c in path for c in "\0\n\r") and ".." not in path.split("/")


def addresses_in(ip_output: str, network: str) -> list[str]:
    """The addresses of ``ip -o addr show`` output that lie in ``network``, sorted."""
    net = ipaddress.ip_network(network)
    found = set()
    for line in ip_output.splitlines():
        words = line.split()
        for i, word in enumerate(words[:-1]):
            if word in ("inet", "inet6"):
                try:
                    address = ipaddress.ip_interface(words[i + 1]).ip
                except ValueError:
                    continue  # not an address: host output is data
                if address in net:
                    found.add(address)
    return [str(a) for a in sorted(found)]


def probe_end(shell: HostShell, host: str, *, tls: bool, network: str | None,
              address: str | None, timeout: float = 30.0) -> MigrationEnd:
    """What ``host`` offers migrations: QEMU's certificates (when ``tls``) and its migration address —
    ``address`` when the inventory names it, else discovered in ``network``, else None (management)."""
    problems: list[str] = []
    if address is None and network is not None:
        out = shell.run(host, ["ip", "-o", "addr", "show"], timeout=timeout)
        found = addresses_in(out.stdout, network) if out.exit_code == 0 else []
        if out.exit_code != 0:
            problems.append(f"cannot list its addresses (ip -o addr show exited {out.exit_code})")
        elif not found:
            problems.append(f"no address in the migration network {network}")
        else:
            address = found[0]  # several (a floating address beside the host's own): the lowest, every time
    if not tls:
        return MigrationEnd(host=host, address=address, problems=tuple(problems), probed_tls=False)
    conf = shell.run(host, ["cat", QEMU_CONF], timeout=timeout)
    directory = cert_dir(conf.stdout) if conf.exit_code == 0 else DEFAULT_CERT_DIR
    if not _safe_path(directory):
        return MigrationEnd(host=host, cert_dir="(unusable path in qemu.conf)", address=address,
                            problems=tuple(problems))
    # -b: a name holding a line break or a space is printed escaped, one name a line, so a file named
    # "x<LF>client-key.pem" cannot pass for the key file it is not
    listing = shell.run(host, ["ls", "-1", "-b", "--", directory], timeout=timeout)
    present = set(listing.stdout.splitlines()) & set(QEMU_FILES) if listing.exit_code == 0 else set()
    certs: dict[str, str] = {}
    wanted = [f for f in (CA_CERT, SERVER_CERT, CLIENT_CERT) if f in present]
    if wanted:
        paths = {f"{directory}/{f}": f for f in wanted}
        out = shell.run(host, ["grep", "-s", "-H", "", "--", *paths], timeout=timeout)
        lines: dict[str, list[str]] = {}
        for line in out.stdout.splitlines():
            for path, name in paths.items():
                if line.startswith(path + ":"):
                    lines.setdefault(name, []).append(line[len(path) + 1:])
                    break
        certs = {name: "\n".join(text) + "\n" for name, text in lines.items()}
    keys = frozenset(f for f in present if f.endswith("-key.pem"))
    return MigrationEnd(host=host, cert_dir=directory, certs=certs, keys=keys, address=address,
                        problems=tuple(problems))


def probe_cluster(shell: HostShell, inventory: Inventory, hosts: Sequence[str],
                  workers: int = 8) -> dict[str, MigrationEnd]:
    """:func:`probe_end` for each of ``hosts`` (of one cluster), a few at a time."""
    def one(host: str) -> MigrationEnd:
        entry = inventory.host(host)
        m = inventory.cluster(entry.cluster).migration
        tls = m.tls is not MigrationTls.OFF
        if not tls and (m.network is None or entry.migration_address is not None):
            return MigrationEnd(host=host, address=entry.migration_address, probed_tls=False)  # nothing to read
        try:
            return probe_end(shell, host, tls=tls, network=m.network, address=entry.migration_address)
        except DriverError as exc:
            # cannot be checked is not "fine": under required it is refused like a host without certificates
            return MigrationEnd(host=host, address=entry.migration_address, probed_tls=False,
                                problems=(f"its migration settings cannot be read over SSH: {exc}",))

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(hosts)))) as pool:
        return dict(zip(hosts, pool.map(one, hosts), strict=True))


def needs_reading(inventory: Inventory, cluster: str) -> bool:
    """Whether ``cluster``'s migrations depend on anything read from its hosts (TLS, or a migration
    network to find addresses in); with neither, a migration travels as libvirt picks, as before."""
    m = inventory.cluster(cluster).migration
    return m.tls is not MigrationTls.OFF or m.network is not None or any(
        h.migration_address is not None for h in inventory.hosts_of(cluster))


def read_transport(shell: HostShell, inventory: Inventory, cluster: str, hosts: Sequence[str],
                   now: datetime | None = None) -> TransportPlan:
    """The transport plan of ``cluster``'s migrations among ``hosts``, read from the hosts now; certificates
    are judged valid at ``now`` (default: the current time)."""
    return TransportPlan(mode=inventory.cluster(cluster).migration.tls,
                         ends=probe_cluster(shell, inventory, list(dict.fromkeys(hosts))),
                         now=now or datetime.now(UTC))
