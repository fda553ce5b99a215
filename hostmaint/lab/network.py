"""The lab's private network: one bridge in the root namespace, one network namespace per host.

Addresses come only from ``LAB_SUBNET``; every name the lab creates starts with ``hmlab`` (netns,
bridge) or ``hml-`` (root-side veth ends), so teardown removes exactly what the lab made.

``HOSTMAINT_LAB_NET=N`` (0-9, default 0) gives a lab its own names and subnet (``hmlabN``,
``hmlabN-*``, ``hmlN-*``, ``10.213.(7+N).0/24``), so labs of different nets can be up side by side
(parallel test sessions on one machine); net 0 keeps the historical names.

A TLS lab also has a migration network: bridge ``hmlabNm`` (no address in the root namespace), each
host's ``eth1`` on ``10.214.(7+N).0/24`` via veth ``hmlN-hvNN-m``.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from hostmaint.errors import HostmaintError


def _lab_net() -> int:
    raw = os.environ.get("HOSTMAINT_LAB_NET", "0").strip() or "0"
    if not raw.isdigit() or not 0 <= int(raw) <= 9:
        raise ValueError(f"HOSTMAINT_LAB_NET must be a number 0-9, got {raw!r}")
    return int(raw)


LAB_NET = _lab_net()
LAB_SUBNET = ipaddress.IPv4Network(f"10.213.{7 + LAB_NET}.0/24")
BRIDGE = f"hmlab{LAB_NET}"
BRIDGE_IP = LAB_SUBNET.network_address + 1
NETNS_PREFIX = "hmlab-" if LAB_NET == 0 else f"hmlab{LAB_NET}-"
VETH_PREFIX = "hml-" if LAB_NET == 0 else f"hml{LAB_NET}-"
# The migration network (a TLS lab's): a second bridge without an address in the root namespace (memory
# pages travel host to host, never through this namespace), on a subnet no other net's can collide with
MIG_SUBNET = ipaddress.IPv4Network(f"10.214.{7 + LAB_NET}.0/24")
MIG_BRIDGE = f"hmlab{LAB_NET}m"
MIG_IFACE = "eth1"  # a host's migration interface inside its namespace
NETNS_DIR = Path("/run/netns")


class LabError(HostmaintError):
    """The lab could not be brought up or torn down; the message says which step and why."""


def host_ip(index: int) -> str:
    """Address of lab host ``index`` (1-based): .11, .12, ..."""
    if not 1 <= index <= 200:
        raise ValueError(f"lab host index must be 1-200, got {index}")
    return str(LAB_SUBNET.network_address + 10 + index)


def migration_ip(index: int) -> str:
    """Migration-network address of lab host ``index`` (1-based): .11, .12, ... of MIG_SUBNET."""
    if not 1 <= index <= 200:
        raise ValueError(f"lab host index must be 1-200, got {index}")
    return str(MIG_SUBNET.network_address + 10 + index)


def netns_name(host: str) -> str:
    return f"{NETNS_PREFIX}{host}"


def veth_name(host: str) -> str:
    name = f"{VETH_PREFIX}{host}"
    if len(name) > 15:
        raise ValueError(f"lab host name {host!r} too long for an interface name")
    return name


def migration_veth_name(host: str) -> str:
    """The root-side end of the host's migration link (on MIG_BRIDGE): ``hml3-hv01-m``."""
    name = f"{VETH_PREFIX}{host}-m"
    if len(name) > 15:
        raise ValueError(f"lab host name {host!r} too long for an interface name")
    return name


def run(argv: list[str], *, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run a command (argv list); on failure raise LabError with its stderr."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def links() -> list[str]:
    """Names of the root namespace's network links."""
    out = run(["ip", "-o", "link", "show"]).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


def lab_links() -> list[str]:
    return [n for n in links() if n in (BRIDGE, MIG_BRIDGE) or n.startswith(VETH_PREFIX)]


def lab_netns() -> list[str]:
    out = run(["ip", "netns", "list"]).stdout
    names = [line.split()[0] for line in out.splitlines() if line.split()]
    return [n for n in names if n.startswith(NETNS_PREFIX)]


def ensure_bridge() -> None:
    """Create the lab bridge with the root namespace's lab address (no-op when present)."""
    if BRIDGE not in links():
        run(["ip", "link", "add", BRIDGE, "type", "bridge"])
    addrs = run(["ip", "-o", "-4", "addr", "show", "dev", BRIDGE]).stdout
    if f"{BRIDGE_IP}/" not in addrs:
        run(["ip", "addr", "add", f"{BRIDGE_IP}/{LAB_SUBNET.prefixlen}", "dev", BRIDGE])
    run(["ip", "link", "set", BRIDGE, "up"])


def create_host_netns(host: str, ip: str) -> str:
    """A network namespace for ``host`` with ``eth0`` = ``ip`` on the lab bridge; returns its name."""
    ns = netns_name(host)
    veth = veth_name(host)
    if ns in lab_netns():
        delete_host_netns(host)
    run(["ip", "netns", "add", ns])
    run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
    run(["ip", "link", "set", veth, "master", BRIDGE])
    run(["ip", "link", "set", veth, "up"])
    run(["ip", "-n", ns, "addr", "add", f"{ip}/{LAB_SUBNET.prefixlen}", "dev", "eth0"])
    run(["ip", "-n", ns, "link", "set", "eth0", "up"])
    run(["ip", "-n", ns, "link", "set", "lo", "up"])
    return ns


def ensure_migration_bridge() -> None:
    """Create the migration bridge (no-op when present). It has no address: the root namespace is not on
    the migration network."""
    if MIG_BRIDGE not in links():
        run(["ip", "link", "add", MIG_BRIDGE, "type", "bridge"])
    run(["ip", "link", "set", MIG_BRIDGE, "up"])


def add_migration_link(host: str, ip: str) -> None:
    """Give ``host``'s namespace ``eth1`` = ``ip`` on the migration bridge."""
    ns = netns_name(host)
    veth = migration_veth_name(host)
    run(["ip", "link", "add", veth, "type", "veth", "peer", "name", MIG_IFACE, "netns", ns])
    run(["ip", "link", "set", veth, "master", MIG_BRIDGE])
    run(["ip", "link", "set", veth, "up"])
    run(["ip", "-n", ns, "addr", "add", f"{ip}/{MIG_SUBNET.prefixlen}", "dev", MIG_IFACE])
    run(["ip", "-n", ns, "link", "set", MIG_IFACE, "up"])


def interface_bytes(host: str) -> dict[str, tuple[int, int]]:
    """Bytes (received, sent) per interface of ``host``'s namespace, from the kernel's counters."""
    out: dict[str, tuple[int, int]] = {}
    ns_net = Path("/run/netns") / netns_name(host)
    if not ns_net.exists():
        raise LabError(f"lab host {host}: no network namespace")
    text = run(["ip", "netns", "exec", netns_name(host), "cat", "/proc/net/dev"]).stdout
    for line in text.splitlines()[2:]:
        name, _, fields = line.partition(":")
        values = fields.split()
        if len(values) >= 9:
            out[name.strip()] = (int(values[0]), int(values[8]))
    return out


def limit_egress(host: str, mib_s: float | None, queue_ms: int = 100) -> None:
    """Make lab host ``host``'s link send at most ``mib_s`` MiB/s (a token bucket on its ``eth0``), like a
    slower NIC; None removes the limit. The veth pair is otherwise as fast as the machine's CPUs.
    ``queue_ms``: how long a packet may wait in the bucket's queue (a NIC's ring holds far less than
    the default: data queued there when a VM pauses lengthens its pause)."""
    ns = netns_name(host)
    if mib_s is None:
        run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "eth0", "root"], check=False)
        return
    if mib_s <= 0:
        raise ValueError(f"egress limit of {host}: must be > 0 MiB/s, got {mib_s}")
    bits = int(mib_s * 8 * 1024 * 1024)
    # burst: a few ms of traffic and above a 64 KiB GSO segment, or the bucket itself caps the rate
    burst = max(256 * 1024, bits // 8 // 200)
    run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf",
         "rate", f"{bits}bit", "burst", str(burst), "latency", f"{queue_ms}ms"])


def delete_host_netns(host: str) -> None:
    """Kill every process of the namespace, then delete it (its veth pair goes with it)."""
    ns = netns_name(host)
    kill_netns_processes(ns)
    if ns in lab_netns():
        proc = run(["ip", "netns", "del", ns], check=False)
        if proc.returncode != 0 and ns in lab_netns():
            raise LabError(f"cannot delete network namespace {ns}: {proc.stderr.strip()}")
    delete_link(veth_name(host))
    delete_link(migration_veth_name(host))


def delete_link(name: str, timeout: float = 5.0) -> None:
    """Delete a root-namespace link and wait until it is gone.

    A veth whose peer's namespace was just deleted disappears on its own a moment later, so
    "Cannot find device" from our own delete is success, not an error.
    """
    deadline = time.monotonic() + timeout
    while name in links():
        proc = run(["ip", "link", "del", name], check=False)
        if proc.returncode != 0 and name in links() and time.monotonic() > deadline:
            raise LabError(f"cannot delete link {name}: {proc.stderr.strip()}")
        time.sleep(0.05)


def delete_bridge() -> None:
    delete_link(MIG_BRIDGE)
    delete_link(BRIDGE)


def _ns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def pids_in_namespaces(net_inode: int | None = None, mnt_inode: int | None = None,
                       exclude: Iterable[int] = ()) -> list[int]:
    """PIDs whose network or mount namespace is the given one.

    Both are needed: libvirt gives each QEMU its own mount namespace, so only the network
    namespace finds a guest; a process that left the netns would be found by the mount one.
    """
    skip = set(exclude)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid in skip:
            continue
        net = _ns_inode(f"/proc/{pid}/ns/net")
        mnt = _ns_inode(f"/proc/{pid}/ns/mnt")
        if (net_inode is not None and net == net_inode) or (mnt_inode is not None and mnt == mnt_inode):
            found.append(pid)
    return found


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, killed but not yet reaped, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def netns_inode(ns: str) -> int | None:
    return _ns_inode(str(NETNS_DIR / ns))


def kill_pids(find: Callable[[], list[int]], timeout: float = 10.0) -> None:
    """SIGKILL what ``find`` returns until it returns nothing (new children may appear meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = find()
        if not pids:
            return
        if time.monotonic() > deadline:
            raise LabError(f"processes survive SIGKILL: {pids}")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # already gone: that is the goal
        time.sleep(0.05)


def kill_netns_processes(ns: str, exclude: Iterable[int] = ()) -> None:
    """SIGKILL every process inside network namespace ``ns``."""
    inode = netns_inode(ns)
    if inode is None:
        return
    excluded = tuple(exclude)
    kill_pids(lambda: pids_in_namespaces(net_inode=inode, exclude=excluded))
