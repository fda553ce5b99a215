"""The lab's own small PKI: a CA and per-host certificates for libvirtd and QEMU, made with ``openssl``.

Made at ``lab up`` when the lab runs with TLS (``lab_up(tls=True)``), in ``WORKDIR/pki``:

- ``ca/``: the lab CA (``ca-cert.pem``, ``ca-key.pem``; the key never leaves this directory);
- ``client/``: the operator's client certificate (``cacert.pem``, ``clientcert.pem``,
  ``clientkey.pem``), named by every lab libvirt URI as ``?pkipath=WORKDIR/pki/client``.

Each host gets, inside its private ``/etc/libvirt`` (``hosts/hvNN/etc-libvirt``):

- ``pki/libvirt/``: libvirtd's ``cacert.pem``, ``servercert.pem``, ``serverkey.pem`` and the host's own
  client certificate ``clientcert.pem``, ``clientkey.pem``; the host's supervisor bind-mounts this
  directory over ``WORKDIR/pki/client`` in the host's mount namespace, so the same ``pkipath`` names
  the operator's certificate in the root namespace and the host's own when its libvirtd opens the
  peer-to-peer connection of a migration (as ``/etc/pki/libvirt`` does on a real machine);
- ``pki/qemu/``: QEMU's ``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem``, ``client-cert.pem``,
  ``client-key.pem`` (qemu.conf ``default_tls_x509_cert_dir``).

A host's server certificate names every address it is reached on (management and migration IPs,
its name): libvirt's client and QEMU's migration both check the name they dialled against it.
ECDSA P-256 keys, 30 days: cheap to make (about 15 ms a certificate) and never reused across ups.
"""

from __future__ import annotations

import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from hostmaint.lab.network import LabError, run

ORGANIZATION = "hostmaint lab"
DAYS = 30
# libvirtd admits clients whose certificate, signed by its CA, carries this DN (virt-pki-query-dn order)
ALLOWED_DN = f"O={ORGANIZATION},CN=*"

LIBVIRT_DIR = Path("pki/libvirt")  # under the host's etc-libvirt, i.e. /etc/libvirt/pki/libvirt on the host
QEMU_DIR = Path("pki/qemu")
QEMU_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem")


@dataclass(frozen=True)
class Authority:
    """A CA on disk: its certificate and key."""

    cert: Path
    key: Path


def make_ca(directory: Path, name: str, organization: str = ORGANIZATION) -> Authority:
    """A new self-signed CA in ``directory`` (replacing one that was there)."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True, mode=0o700)
    ca = Authority(directory / "ca-cert.pem", directory / "ca-key.pem")
    run(["openssl", "req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(ca.key), "-out", str(ca.cert), "-days", str(DAYS),
         "-subj", f"/O={organization}/CN={name}",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
    ca.key.chmod(0o600)
    return ca


def issue(ca: Authority, cert: Path, key: Path, common_name: str, *, server: bool,
          addresses: tuple[str, ...] = (), names: tuple[str, ...] = (),
          organization: str = ORGANIZATION) -> None:
    """A certificate for ``common_name`` signed by ``ca``: a server's (``serverAuth``) or a client's
    (``clientAuth``), with the IP ``addresses`` and DNS ``names`` as subjectAltName."""
    work = cert.parent / f".{cert.name}.work"
    work.mkdir(parents=True, exist_ok=True)
    try:
        csr = work / "req.csr"
        run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", f"/O={organization}/CN={common_name}"])
        key.chmod(0o600)
        san = ",".join([*(f"IP:{a}" for a in addresses), *(f"DNS:{n}" for n in names)])
        ext = ["basicConstraints=critical,CA:FALSE",
               # libvirt's TLS context refuses a certificate whose critical key usage lacks either
               "keyUsage=critical,digitalSignature,keyEncipherment",
               f"extendedKeyUsage={'serverAuth' if server else 'clientAuth'}"]
        if san:
            ext.append(f"subjectAltName={san}")
        (work / "ext.cnf").write_text("\n".join(ext) + "\n")
        run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
             "-set_serial", f"0x{secrets.token_hex(8)}", "-days", str(DAYS), "-extfile", str(work / "ext.cnf"),
             "-out", str(cert)])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def make_operator_client(ca: Authority, directory: Path) -> Path:
    """The operator's client certificate (what hostmaint connects to the lab's libvirtds with)."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ca.cert, directory / "cacert.pem")
    issue(ca, directory / "clientcert.pem", directory / "clientkey.pem", "hostmaint-operator", server=False)
    return directory


def install_host(ca: Authority, etc_libvirt: Path, name: str, addresses: tuple[str, ...]) -> None:
    """Certificates for host ``name`` (reached on ``addresses``) into its private /etc/libvirt, for libvirtd
    (server and the host's own client) and for QEMU's migration TLS (the same pair, QEMU's file names)."""
    lv = etc_libvirt / LIBVIRT_DIR
    qemu = etc_libvirt / QEMU_DIR
    for d in (lv, qemu):
        d.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ca.cert, lv / "cacert.pem")
    issue(ca, lv / "servercert.pem", lv / "serverkey.pem", name, server=True, addresses=addresses, names=(name,))
    issue(ca, lv / "clientcert.pem", lv / "clientkey.pem", name, server=False, addresses=addresses, names=(name,))
    install_qemu(ca, etc_libvirt, name, addresses)


def install_qemu(ca: Authority, etc_libvirt: Path, name: str, addresses: tuple[str, ...]) -> None:
    """QEMU's migration certificates for host ``name`` signed by ``ca`` (replacing what was there).
    QEMU reads them at each migration, so a change needs no restart."""
    qemu = etc_libvirt / QEMU_DIR
    qemu.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ca.cert, qemu / "ca-cert.pem")
    issue(ca, qemu / "server-cert.pem", qemu / "server-key.pem", name, server=True, addresses=addresses,
          names=(name,))
    issue(ca, qemu / "client-cert.pem", qemu / "client-key.pem", name, server=False, addresses=addresses,
          names=(name,))


def remove_qemu(etc_libvirt: Path) -> None:
    """Take QEMU's migration certificates away (the directory stays, empty): TLS off on that host."""
    for f in QEMU_FILES:
        (etc_libvirt / QEMU_DIR / f).unlink(missing_ok=True)


def check_tools() -> None:
    """The lab's PKI needs ``openssl`` (scripts/install-system.sh installs it)."""
    if shutil.which("openssl") is None:
        raise LabError("openssl not found: the lab's TLS mode needs it (run scripts/install-system.sh)")
