"""The local KVM lab: ``lab_up``, ``lab_down``, ``lab_status``, ``reboot_host``.

A lab is N "hypervisor hosts" on this machine, each a network namespace on ``10.213.7.0/24``
(a bridge in the root namespace) with its own libvirtd, key-only sshd, hostname, boot id and rpm
package root, plus real QEMU guests spread over them. It writes a hostmaint inventory
(cluster ``lab``) and a known_hosts file. See ``hostmaint/lab/README.md``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict

from hostmaint.lab import network, pki
from hostmaint.lab.guests import (
    GuestSpec,
    define_and_start,
    kvm_usable,
    linux_boot_files,
    linux_xml,
    seabios_xml,
)
from hostmaint.lab.host import (
    HostSpec,
    host_dir,
    prepare_host,
    read_status,
    request,
    start_supervisor,
    stop_host,
    supervisor_pid,
    write_ssh_wrapper,
)
from hostmaint.lab.network import LabError
from hostmaint.lab.packages import build_repo
from hostmaint.lab.sshd import authorize, make_keypair

DEFAULT_WORKDIR = Path("/var/lib/hostmaint-lab")
LOCK_PATH = Path("/run/lock/hostmaint-lab.lock")
CLUSTER = "lab"
SEABIOS_MIB = 64
LINUX_MIB = 256
LINUX_DIRTY_MIB = 128
# The Linux guests' pace. Rewriting as fast as its TCG vCPU goes, one took 41-85 % of a core for 9-58
# MiB/s; paced at 48, 17-33 % for 19-67 (QEMU's readings beside a busy lab: benchmarks/lab_guest_pace.py,
# RESULTS.md "Where nobody had looked, part six"): the suite's lab half took a core from the rest for little.
# Still above every cap a test gives a migration that must not converge (1-16 MiB/s); 0: the unpaced loop.
LINUX_DIRTY_MIB_S = 48


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LabHost(_Frozen):
    name: str
    ip: str
    netns: str
    libvirt_uri: str
    memory_mib: int
    migration_ip: str | None = None  # a TLS lab's: the host's eth1 on the migration network


class LabVm(_Frozen):
    name: str
    host: str
    memory_mib: int
    vcpus: int
    linux: bool = False


class LabInfo(_Frozen):
    """What ``lab_up`` built; also saved as ``WORKDIR/lab.json``."""

    workdir: Path
    inventory_path: Path
    known_hosts_path: Path
    key_path: Path
    hosts: tuple[LabHost, ...]
    vms: tuple[LabVm, ...]
    kvm: bool
    tls: bool = False  # its own PKI, libvirtd on TLS, QEMU migration TLS, a migration network
    room_to_grow: bool = False  # guests defined so they can be grown live (guests.GuestSpec.room_to_grow)

    @property
    def client_pki(self) -> Path:
        """The operator's client certificate directory (the URIs' pkipath) of a TLS lab."""
        return self.workdir / "pki" / "client"

    def plain_uri(self, host: str) -> str:
        """The host's libvirtd over plain TCP (a TLS lab keeps it listening)."""
        return f"qemu+tcp://{self.host(host).ip}/system"

    @property
    def ssh_bin(self) -> Path:
        """Put first on PATH for ``qemu+ssh://`` URIs: an ``ssh`` that checks the lab's host keys
        (hostmaint/lab/host.py ``write_ssh_wrapper``)."""
        return self.workdir / "ssh" / "bin"

    def ssh_uri(self, host: str) -> str:
        """The host's libvirtd over SSH (``qemu+ssh://``; needs :attr:`ssh_bin` first on PATH)."""
        return f"qemu+ssh://root@{self.host(host).ip}/system"

    def host(self, name: str) -> LabHost:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)


class LabHostStatus(_Frozen):
    name: str
    phase: str
    supervisor_alive: bool
    libvirtd_listening: bool
    sshd_listening: bool
    boot_id: str | None = None


class LabStatus(_Frozen):
    """Whether the lab is up, host by host, and anything of the lab's left on the machine."""

    up: bool
    hosts: tuple[LabHostStatus, ...] = ()
    netns: tuple[str, ...] = ()
    links: tuple[str, ...] = ()


def _listening(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=1.0):
            return True
    except OSError:
        return False


def _load_info(workdir: Path) -> LabInfo | None:
    try:
        return LabInfo.model_validate_json((workdir / "lab.json").read_text())
    except (FileNotFoundError, ValueError):
        return None


def _check_shape(hosts: int, vms: int, linux_guests: int, host_memory_mib: int | tuple[int, ...]) -> None:
    """A lab that can be built: 1-200 hosts (the lab's subnet), guests that fit the hosts' memory."""
    if not 1 <= hosts <= 200:
        raise LabError(f"hosts: the lab has 1 to 200 hosts (its subnet's addresses), got {hosts}")
    if vms < 0 or linux_guests < 0:
        raise LabError(f"vms and linux guests: at least 0, got {vms} and {linux_guests}")
    total = sum(host_memory_mib) if isinstance(host_memory_mib, tuple) else host_memory_mib * hosts
    wanted = vms * SEABIOS_MIB + linux_guests * LINUX_MIB
    if wanted > total:
        raise LabError(f"vms: {vms} guests of {SEABIOS_MIB} MiB and {linux_guests} of {LINUX_MIB} MiB need "
                       f"{wanted} MiB, more than the {hosts} hosts' {total} MiB")


def host_specs(hosts: int, memory_mib: int | tuple[int, ...], client_pki: Path | None = None) -> list[HostSpec]:
    """The lab's hosts; with ``client_pki`` (a TLS lab) each also gets a migration-network address."""
    mems = memory_mib if isinstance(memory_mib, tuple) else (memory_mib,) * hosts
    if len(mems) != hosts:
        raise ValueError(f"host_memory_mib has {len(mems)} entries for {hosts} hosts")
    return [HostSpec(name=f"hv{i:02d}", ip=network.host_ip(i), memory_mib=mems[i - 1],
                     migration_ip=network.migration_ip(i) if client_pki else None, client_pki=client_pki)
            for i in range(1, hosts + 1)]


def guest_specs(hosts: list[HostSpec], vms: int, linux_guests: int, room_to_grow: bool = False) -> list[GuestSpec]:
    """vm01..vmNN round-robin over the hosts; Linux guests lnx01.. from the first host on."""
    out = [GuestSpec(name=f"vm{i:02d}", host=hosts[(i - 1) % len(hosts)].name, memory_mib=SEABIOS_MIB,
                     room_to_grow=room_to_grow) for i in range(1, vms + 1)]
    out += [GuestSpec(name=f"lnx{i:02d}", host=hosts[(i - 1) % len(hosts)].name, memory_mib=LINUX_MIB,
                      linux=True, dirty_mib=LINUX_DIRTY_MIB, dirty_mib_s=LINUX_DIRTY_MIB_S, room_to_grow=room_to_grow)
            for i in range(1, linux_guests + 1)]
    return out


def _write_inventory(workdir: Path, specs: list[HostSpec], key: Path, known_hosts: Path, tls: bool) -> Path:
    # A TLS lab migrates with TLS required on its migration network (each host's address discovered in
    # the subnet); a plain lab says so explicitly, since hostmaint's default is TLS required
    migration: dict[str, object] = ({"tls": "required", "network": str(network.MIG_SUBNET)} if tls
                                    else {"tls": "off"})
    data = {
        "version": 1,
        "clusters": [{
            "name": CLUSTER,
            "limits": {"migrations_per_source": 4, "migrations_per_target": 4, "migrations_per_cluster": 8,
                       "max_hosts_in_maintenance": 1, "memory_headroom_pct": 5.0},
            "host_policy": {"package_manager": "dnf", "reboot": "if-needed", "reboot_timeout_s": 120,
                            "update_timeout_s": 300, "min_free_mib": 0},
            "migration": migration,
        }],
        "hosts": [{
            "name": s.name, "cluster": CLUSTER, "libvirt_uri": s.libvirt_uri,
            "ssh": {"address": s.ip, "port": 22, "user": "root", "key": {"file": str(key)},
                    "known_hosts": str(known_hosts), "connect_timeout_s": 5},
        } for s in specs],
    }
    path = workdir / "inventory.yaml"
    path.write_text("# written by `hostmaint lab up`; the lab rewrites it on every up\n"
                    + yaml.safe_dump(data, sort_keys=False))
    return path


def lab_up(hosts: int = 3, vms: int = 6, workdir: Path = DEFAULT_WORKDIR, linux_guests: int = 1,
           host_memory_mib: int | tuple[int, ...] = 1536, tls: bool = False, room_to_grow: bool = False) -> LabInfo:
    """Build the lab (as root). Idempotent: a lab already up as asked is returned as it is.

    ``room_to_grow``: guests defined so they can be grown live (more vCPUs and memory DIMMs than they
    start with, ACPI, a guest NUMA cell; see guests.GuestSpec.room_to_grow). Off by default.

    ``tls``: the lab's own PKI, libvirtd also listening for TLS with client certificates checked, QEMU's
    migration TLS, a migration network, and an inventory with ``qemu+tls://`` URIs and
    ``migration.tls: required`` (plain TCP keeps listening; see hostmaint/lab/README.md).
    A failed up tears down what it made before raising LabError.
    """
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, mounts, libvirtd)")
    _check_shape(hosts, vms, linux_guests, host_memory_mib)  # before the lab already up is torn down
    workdir = Path(workdir).resolve()
    with _machine_lock():
        other = foreign_lab(workdir)
        if other is not None:
            raise LabError(f"another lab is up on this machine (workdir {other}); the lab's names and "
                           f"addresses are fixed, so bring that one down first: hostmaint lab down --workdir {other}")
        existing = _load_info(workdir)
        if existing is not None and len(existing.hosts) == hosts and existing.tls == tls \
                and existing.room_to_grow == room_to_grow and lab_status(workdir).up:
            return existing
        _down(workdir)
        try:
            return _build(hosts, vms, workdir, linux_guests, host_memory_mib, tls, room_to_grow)
        except BaseException:
            _down(workdir)
            raise


@contextmanager
def _machine_lock() -> Iterator[None]:
    """One lab up or down at a time on this machine (they share names and addresses)."""
    LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_PATH, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _supervisors() -> dict[int, Path]:
    """Running lab supervisors on this machine → the workdir of their lab."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"hostmaint.lab.supervisor" in argv and network.alive(int(entry)):
            its_dir = Path(argv[argv.index(b"hostmaint.lab.supervisor") + 1].decode())
            found[int(entry)] = its_dir.parent.parent
    return found


def _net_of(workdir: Path) -> int:
    """The lab net (``HOSTMAINT_LAB_NET``) a workdir's lab was built on; labs older than nets are 0."""
    try:
        return int((workdir / "net").read_text().strip())
    except (OSError, ValueError):
        return 0


def foreign_lab(workdir: Path) -> Path | None:
    """The workdir of a lab other than ``workdir`` that is up on this machine on our net, if any
    (labs on other nets have their own names and addresses and do not get in the way)."""
    workdir = Path(workdir).resolve()
    return next((w for w in _supervisors().values() if w != workdir and _net_of(w) == network.LAB_NET), None)


def _build(hosts: int, vms: int, workdir: Path, linux_guests: int,
           host_memory_mib: int | tuple[int, ...], tls: bool = False, room_to_grow: bool = False) -> LabInfo:
    client_pki = workdir / "pki" / "client" if tls else None
    specs = host_specs(hosts, host_memory_mib, client_pki)
    ca = _make_pki(workdir) if tls else None
    cache = workdir / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    (workdir / "net").write_text(f"{network.LAB_NET}\n")
    for d in ("/run/libvirt", "/var/lib/libvirt", "/var/log/libvirt", "/var/cache/libvirt"):
        Path(d).mkdir(parents=True, exist_ok=True)  # mount points (the libvirt packages' own dirs)
    key, pub = make_keypair(workdir / "ssh")
    authorized = authorize(workdir / "ssh" / "authorized_keys", [pub])
    repo = build_repo(cache / "repo")
    network.ensure_bridge()
    if tls:
        network.ensure_migration_bridge()
    known_lines = []
    for spec in specs:
        network.create_host_netns(spec.name, spec.ip)
        if spec.migration_ip:
            network.add_migration_link(spec.name, spec.migration_ip)
        prepare_host(workdir, spec, repo, authorized, cache, ca)
    with ThreadPoolExecutor(max_workers=len(specs)) as pool:  # hosts boot independently
        statuses = list(pool.map(partial(start_supervisor, workdir), specs))
    for spec, status in zip(specs, statuses, strict=True):
        known_lines.append(f"{spec.ip} {status['host_key']}\n")
    known_hosts = workdir / "known_hosts"
    known_hosts.write_text("".join(known_lines))
    write_ssh_wrapper(workdir / "ssh" / "bin", workdir)
    inventory = _write_inventory(workdir, specs, key, known_hosts, tls)

    kvm = kvm_usable()
    guests = guest_specs(specs, vms, linux_guests, room_to_grow)
    uri = {s.name: s.libvirt_uri for s in specs}
    xml_dir = workdir / "guests"
    xml_dir.mkdir(exist_ok=True)
    boot_files = linux_boot_files(cache) if linux_guests else None

    def start_guests(host: str) -> None:
        for g in guests:
            if g.host != host:
                continue
            xml = (linux_xml(g, *boot_files, console_log=_fresh_console(xml_dir, g.name)) if g.linux and boot_files
                   else seabios_xml(g, kvm))
            define_and_start(uri[g.host], xml, xml_dir / f"{g.name}.xml")

    with ThreadPoolExecutor(max_workers=len(specs)) as pool:
        list(pool.map(start_guests, [s.name for s in specs]))
    info = LabInfo(
        workdir=workdir, inventory_path=inventory, known_hosts_path=known_hosts, key_path=key,
        hosts=tuple(LabHost(name=s.name, ip=s.ip, netns=s.netns, libvirt_uri=s.libvirt_uri,
                            memory_mib=s.memory_mib, migration_ip=s.migration_ip) for s in specs),
        vms=tuple(LabVm(name=g.name, host=g.host, memory_mib=g.memory_mib, vcpus=g.vcpus, linux=g.linux)
                  for g in guests),
        kvm=kvm, tls=tls, room_to_grow=room_to_grow,
    )
    (workdir / "lab.json").write_text(info.model_dump_json(indent=2))
    return info


def _make_pki(workdir: Path) -> pki.Authority:
    """A fresh lab CA and the operator's client certificate, in WORKDIR/pki (made at every up)."""
    pki.check_tools()
    ca = pki.make_ca(workdir / "pki" / "ca", f"hostmaint lab CA (net {network.LAB_NET})")
    client = workdir / "pki" / "client"
    if client.exists():
        shutil.rmtree(client)
    pki.make_operator_client(ca, client)
    return ca


def lab_ca(info: LabInfo) -> pki.Authority:
    """The CA of a TLS lab."""
    if not info.tls:
        raise LabError("this lab was brought up without TLS: it has no CA")
    return pki.Authority(info.workdir / "pki" / "ca" / "ca-cert.pem", info.workdir / "pki" / "ca" / "ca-key.pem")


def reissue_qemu_certs(info: LabInfo, host: str, *, foreign: bool = False) -> None:
    """Give ``host``'s QEMU new migration certificates: from the lab CA, or (``foreign``) from a CA of its
    own that no other host trusts (as a host enrolled in the wrong PKI). QEMU reads them at its next
    migration; libvirtd's own certificates stay."""
    ca = lab_ca(info)
    if foreign:
        ca = pki.make_ca(info.workdir / "pki" / f"foreign-{host}", f"another CA ({host})", organization="elsewhere")
    h = info.host(host)
    addresses = (h.ip,) + ((h.migration_ip,) if h.migration_ip else ())
    pki.install_qemu(ca, host_dir(info.workdir, host) / "etc-libvirt", host, addresses)


def remove_qemu_certs(info: LabInfo, host: str) -> None:
    """Take ``host``'s QEMU migration certificates away: migration TLS is off on that host."""
    pki.remove_qemu(host_dir(info.workdir, host) / "etc-libvirt")


def lab_down(workdir: Path = DEFAULT_WORKDIR) -> None:
    """Remove every process, namespace, veth, bridge and mount the lab made, and nothing else.

    Works from the lab's naming alone (netns ``hmlab-*``, links ``hmlab0``/``hml-*``), so it also
    cleans up after a crashed ``up`` — unless a lab of another workdir is up: then only this
    workdir's own processes and files go. Files under ``WORKDIR/hosts`` go; ``WORKDIR/cache`` stays.
    """
    workdir = Path(workdir).resolve()
    with _machine_lock():
        _down(workdir)


def _down(workdir: Path) -> None:
    hosts_dir = workdir / "hosts"
    if foreign_lab(workdir) is not None:
        # the namespaces, links and bridge are another lab's: only what is ours goes
        network.kill_pids(lambda: [p for p, w in _supervisors().items() if w == workdir])
        if hosts_dir.exists():
            shutil.rmtree(hosts_dir)
        return
    names = {ns[len(network.NETNS_PREFIX):] for ns in network.lab_netns()}
    if hosts_dir.exists():
        names |= {p.name for p in hosts_dir.iterdir() if p.is_dir()}
    for name in sorted(names):
        pid = supervisor_pid(workdir, name)
        if pid is not None:
            # the supervisor is found by its netns too; this also covers one whose netns is gone
            network.kill_pids(partial(_still_alive, pid))
        stop_host(workdir, name)
        network.delete_host_netns(name)
    for link in network.lab_links():
        if link != network.BRIDGE:
            network.delete_link(link)
    network.delete_bridge()
    if hosts_dir.exists():
        shutil.rmtree(hosts_dir)
    for f in ("lab.json", "inventory.yaml", "known_hosts"):
        (workdir / f).unlink(missing_ok=True)
    if (workdir / "pki").exists():
        shutil.rmtree(workdir / "pki")


def _still_alive(pid: int) -> list[int]:
    return [pid] if network.alive(pid) else []


def lab_status(workdir: Path = DEFAULT_WORKDIR) -> LabStatus:
    """The lab's state: per host, supervisor alive, libvirtd and sshd answering, boot id."""
    workdir = Path(workdir).resolve()
    info = _load_info(workdir)
    hosts = []
    for h in info.hosts if info else ():
        status = read_status(workdir, h.name)
        hosts.append(LabHostStatus(
            name=h.name, phase=str(status.get("phase", "absent")),
            supervisor_alive=supervisor_pid(workdir, h.name) is not None,
            libvirtd_listening=_listening(h.ip, 16509), sshd_listening=_listening(h.ip, 22),
            boot_id=str(status["boot_id"]) if status.get("boot_id") else None))
    up = bool(hosts) and all(h.supervisor_alive and h.libvirtd_listening and h.sshd_listening for h in hosts)
    return LabStatus(up=up, hosts=tuple(hosts), netns=tuple(network.lab_netns()),
                     links=tuple(network.lab_links()))


def reboot_host(name: str, down_seconds: float = 3.0, workdir: Path = DEFAULT_WORKDIR,
                timeout: float = 120.0) -> str:
    """"Reboot" a lab host: SIGKILL all its processes (guests too), wait, boot with a new boot id.

    Returns the new boot id once libvirtd and sshd are back. Guests do not come back: in normal
    use the host is drained first.
    """
    workdir = Path(workdir).resolve()
    before = read_status(workdir, name).get("boot_id")
    status = request(workdir, name, "reboot", timeout=timeout + down_seconds, down_seconds=down_seconds)
    if status.get("boot_id") == before:
        raise LabError(f"lab host {name}: boot id unchanged after reboot")
    return str(status["boot_id"])


def kill_libvirtd(name: str, workdir: Path = DEFAULT_WORKDIR) -> None:
    """SIGKILL the host's libvirtd only (its guests keep running), as a crash would."""
    request(Path(workdir).resolve(), name, "kill-libvirtd")


def start_libvirtd(name: str, workdir: Path = DEFAULT_WORKDIR) -> None:
    """Start the host's libvirtd again after ``kill_libvirtd``; it reattaches to running guests."""
    request(Path(workdir).resolve(), name, "start-libvirtd")


def _fresh_console(xml_dir: Path, name: str) -> Path:
    """The guest's console log, emptied: it is appended to (it follows the guest through migrations), so a
    guest of the same name from an earlier lab would otherwise have said "marker written" already."""
    path = xml_dir / f"{name}.console"
    path.unlink(missing_ok=True)
    return path


def add_guest(info: LabInfo, name: str, host: str, memory_mib: int = SEABIOS_MIB, vcpus: int = 1,
              linux: bool = False, dirty_mib: int = LINUX_DIRTY_MIB, marker: str | None = None,
              dirty_mib_s: int = LINUX_DIRTY_MIB_S) -> LabVm:
    """Define and start one more guest on a lab host (tests use it for guests of their own). A Linux
    guest with ``marker`` writes ``hostmaint-marker:<marker>`` 8,192 times into its memory once up;
    it rewrites its ``dirty_mib`` at ``dirty_mib_s`` (0: as fast as it can)."""
    spec = GuestSpec(name=name, host=host, memory_mib=memory_mib, vcpus=vcpus, linux=linux,
                     dirty_mib=dirty_mib if linux else 0, marker=marker, dirty_mib_s=dirty_mib_s if linux else 0)
    xml_dir = info.workdir / "guests"
    xml_dir.mkdir(exist_ok=True)
    xml = (linux_xml(spec, *linux_boot_files(info.workdir / "cache"), console_log=_fresh_console(xml_dir, name))
           if linux else seabios_xml(spec, info.kvm))
    define_and_start(info.host(host).libvirt_uri, xml, xml_dir / f"{name}.xml")
    return LabVm(name=name, host=host, memory_mib=memory_mib, vcpus=vcpus, linux=linux)


def remove_guest(info: LabInfo, name: str) -> None:
    """Destroy and undefine ``name`` wherever it is defined in the lab (no-op where it is not)."""
    for h in info.hosts:
        for argv in (["destroy", name], ["undefine", name]):
            # "domain not found" / "not running" are expected: the guest lives on one host at most
            network.run(["virsh", "-q", "-c", h.libvirt_uri, *argv], check=False, timeout=60)


def info_json(info: LabInfo) -> str:
    return json.dumps(json.loads(info.model_dump_json()), indent=2)
