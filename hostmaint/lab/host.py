"""One lab host seen from the root namespace: its directory, configs, supervisor and requests.

A host lives in ``WORKDIR/hosts/NAME``; :mod:`hostmaint.lab.supervisor` runs inside its
namespaces. Everything here only writes files under that directory and talks to the supervisor.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from hostmaint.lab import pki
from hostmaint.lab.network import LabError, alive, kill_netns_processes, netns_name
from hostmaint.lab.packages import prepare_host_packages, write_wrappers

HOST_UUID_NAMESPACE = uuid.UUID("5b0c8d5e-6f43-4c1e-9a55-1d6a8f1f0a70")
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the directory holding the hostmaint package


@dataclass(frozen=True)
class HostSpec:
    """What the lab makes of one host."""

    name: str
    ip: str
    memory_mib: int
    # a TLS lab's host: its migration-network address, and the operator's client certificate directory
    # (what libvirt URIs name as pkipath; the host sees its own client certificate there)
    migration_ip: str | None = None
    client_pki: Path | None = None

    @property
    def netns(self) -> str:
        return netns_name(self.name)

    @property
    def tls(self) -> bool:
        return self.client_pki is not None

    @property
    def libvirt_uri(self) -> str:
        if self.client_pki is not None:
            return f"qemu+tls://{self.ip}/system?pkipath={self.client_pki}"
        return f"qemu+tcp://{self.ip}/system"

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every address the host is reached on: what its server certificates must name."""
        return (self.ip,) + ((self.migration_ip,) if self.migration_ip else ())

    @property
    def host_uuid(self) -> str:
        # unique per host, or libvirt refuses migration as "to the same host"; stable across ups
        return str(uuid.uuid5(HOST_UUID_NAMESPACE, self.name))


def host_dir(workdir: Path, name: str) -> Path:
    return workdir / "hosts" / name


def _libvirtd_conf(spec: HostSpec) -> str:
    # A TLS lab's libvirtd listens for TLS (16514, client certificates checked) and still for plain TCP
    # (16509): tests that are not about TLS keep the fast, simple qemu+tcp URIs
    tls = [
        "listen_tls = 1",
        'auth_tls = "none"',  # the client certificate, checked against the CA and the DN list, is the credential
        f'ca_file = "/etc/libvirt/{pki.LIBVIRT_DIR}/cacert.pem"',
        f'cert_file = "/etc/libvirt/{pki.LIBVIRT_DIR}/servercert.pem"',
        f'key_file = "/etc/libvirt/{pki.LIBVIRT_DIR}/serverkey.pem"',
        "tls_no_verify_certificate = 0",
        f'tls_allowed_dn_list = ["{pki.ALLOWED_DN}"]',
    ] if spec.tls else ["listen_tls = 0"]
    return "\n".join([
        *tls,
        "listen_tcp = 1",
        f'listen_addr = "{spec.ip}"',
        'auth_tcp = "none"',
        'auth_unix_rw = "none"',
        'auth_unix_ro = "none"',
        f'host_uuid = "{spec.host_uuid}"',
        'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"',
        "max_clients = 200",
        "max_workers = 40",
        "",
    ])


def _qemu_conf(spec: HostSpec, ram_dir: Path) -> str:
    return "\n".join([
        'user = "root"',
        'group = "root"',
        "dynamic_ownership = 0",
        "remember_owner = 0",
        'security_driver = "none"',
        "cgroup_controllers = [ ]",
        f'migration_address = "{spec.ip}"',
        f'migration_host = "{spec.ip}"',
        f'memory_backing_dir = "{ram_dir}"',
        'stdio_handler = "file"',  # no virtlogd in the lab
        # migration TLS: QEMU's certificates, both ends checked; not forced (plain migrations stay
        # possible: the lab measures both, and migration.tls: preferred falls back to plain)
        *([f'default_tls_x509_cert_dir = "/etc/libvirt/{pki.QEMU_DIR}"', "default_tls_x509_verify = 1",
           "migrate_tls_x509_verify = 1"] if spec.tls else []),
        "",
    ])


def prepare_host(workdir: Path, spec: HostSpec, repo: Path, authorized_keys: Path, cache: Path,
                 ca: pki.Authority | None = None) -> Path:
    """Write the host's directory: configs, certificates (with ``ca``: a TLS lab), package root, command
    wrappers. Returns the directory."""
    d = host_dir(workdir, spec.name)
    if d.exists():
        shutil.rmtree(d)
    for sub in ("etc-libvirt", "run-libvirt", "var-lib-libvirt", "var-log-libvirt", "home", "state", "sshd"):
        (d / sub).mkdir(parents=True)
    # QEMU's capability probe takes seconds the first time: keep each host's cache across ups
    host_cache = cache / "libvirt-cache" / spec.name
    host_cache.mkdir(parents=True, exist_ok=True)
    (d / "var-cache-libvirt").symlink_to(host_cache, target_is_directory=True)
    (d / "etc-libvirt" / "libvirtd.conf").write_text(_libvirtd_conf(spec))
    (d / "etc-libvirt" / "qemu.conf").write_text(_qemu_conf(spec, d / "ram"))
    if spec.tls:
        if ca is None:
            raise LabError(f"lab host {spec.name}: a TLS host needs the lab CA")
        pki.install_host(ca, d / "etc-libvirt", spec.name, spec.addresses)
    (d / "host.json").write_text(json.dumps({
        "name": spec.name, "hostname": spec.name, "ip": spec.ip, "netns": spec.netns,
        "memory_mib": spec.memory_mib, "authorized_keys": str(authorized_keys),
        # the host's own client certificate, seen where the lab's URIs name the operator's (pkipath)
        "binds": ({str(d / "etc-libvirt" / pki.LIBVIRT_DIR): str(spec.client_pki)} if spec.client_pki else {}),
    }))
    prepare_host_packages(d, repo)
    write_wrappers(d, repo, d / "state" / "request")
    write_ssh_wrapper(d / "bin", workdir)
    return d


def write_ssh_wrapper(bin_dir: Path, workdir: Path) -> Path:
    """An ``ssh`` first on PATH that plays root's ``~/.ssh/config`` for the lab: the lab's known_hosts and
    key, host keys strictly checked. libvirt's ``qemu+ssh://`` transport runs ``ssh`` from PATH and checks
    host keys against ``~/.ssh/known_hosts``, which the lab may not write (root's home is the machine's).
    Used by each host's libvirtd (the host's ``bin`` is its ``/usr/local/sbin``) and, with ``bin_dir`` first
    on PATH, by the operator's side (:attr:`hostmaint.lab.LabInfo.ssh_bin`)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / "ssh"
    path.write_text(f"""#!/bin/sh
# hostmaint lab: root's ssh config for the lab (its known_hosts and key; unknown or changed host keys refused)
exec /usr/bin/ssh -o UserKnownHostsFile='{workdir / "known_hosts"}' -o StrictHostKeyChecking=yes \\
    -o IdentityFile='{workdir / "ssh" / "id_ed25519"}' -o IdentitiesOnly=yes -o BatchMode=yes "$@"
""")
    path.chmod(0o755)
    return path


def start_supervisor(workdir: Path, spec: HostSpec, timeout: float = 90.0) -> dict[str, object]:
    """Start the host's supervisor inside its namespaces and wait until it has booted."""
    d = host_dir(workdir, spec.name)
    env = dict(os.environ, PYTHONPATH=str(PACKAGE_ROOT))
    log = open(d / "supervisor.stdout", "ab")
    # setsid --fork: the supervisor is nobody's child here, so no zombie is left in the caller
    subprocess.run(["setsid", "--fork", "ip", "netns", "exec", spec.netns, "unshare", "--mount", "--uts",
                    "--propagation", "private", sys.executable, "-m", "hostmaint.lab.supervisor", str(d)],
                   stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, check=True)
    log.close()
    return wait_for_phase(workdir, spec.name, ("up",), timeout=timeout)


def read_status(workdir: Path, name: str) -> dict[str, object]:
    try:
        return dict(json.loads((host_dir(workdir, name) / "state" / "status.json").read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def wait_for_phase(workdir: Path, name: str, phases: tuple[str, ...], timeout: float,
                   request_id: str | None = None) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    status: dict[str, object] = {}
    while time.monotonic() < deadline:
        status = read_status(workdir, name)
        phase = str(status.get("phase", ""))
        if phase.startswith("failed"):
            raise LabError(f"lab host {name}: {phase} (see {host_dir(workdir, name) / 'supervisor.log'})")
        if phase in phases and (request_id is None or status.get("last_request") == request_id):
            return status
        time.sleep(0.05)
    raise LabError(f"lab host {name}: not {'/'.join(phases)} after {timeout:.0f} s (status {status})")


def supervisor_pid(workdir: Path, name: str) -> int | None:
    """The host's running supervisor, or None. A stale pid file never names another process."""
    d = host_dir(workdir, name)
    try:
        pid = int((d / "state" / "supervisor.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    if b"hostmaint.lab.supervisor" not in cmdline or str(d).encode() not in cmdline or not alive(pid):
        return None
    return pid


def request(workdir: Path, name: str, action: str, wait_phase: tuple[str, ...] = ("up",),
            timeout: float = 60.0, **params: object) -> dict[str, object]:
    """Ask the host's supervisor to do ``action`` and wait until it has."""
    pid = supervisor_pid(workdir, name)
    if pid is None:
        raise LabError(f"lab host {name}: its supervisor is not running")
    request_id = uuid.uuid4().hex
    path = host_dir(workdir, name) / "state" / "request"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"action": action, "id": request_id, **params}))
    tmp.replace(path)
    os.kill(pid, signal.SIGUSR1)  # wakes it at once
    return wait_for_phase(workdir, name, wait_phase, timeout, request_id=request_id)


def stop_host(workdir: Path, spec_name: str) -> None:
    """Kill every process of the host (supervisor included); its mounts die with its namespace."""
    kill_netns_processes(netns_name(spec_name))
