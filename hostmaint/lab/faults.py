"""Faults for lab hosts, each with its undo: what the chaos campaign (benchmarks/chaos.py) injects.

Every fault acts on the lab's "hardware" only — the host's veth, its processes, its command
wrappers, its repository file, the operator's known_hosts — never on hostmaint's state. Each
function that breaks something returns an :data:`Undo` that mends exactly that (idempotent), so a
campaign can undo every fault before it re-runs the interrupted work, as an operator would after
fixing the cause.

Also here: what the campaign reads from outside hostmaint — a host's boot id, running kernel,
installed packages, the guests its reboots killed (:func:`reboots`), and its running domains
through its own libvirtd socket (which works while its link is cut).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from hostmaint.lab.host import host_dir, read_status, supervisor_pid
from hostmaint.lab.lab import LabInfo, LabVm, add_guest, remove_guest
from hostmaint.lab.network import LabError, netns_inode, netns_name, pids_in_namespaces, run, veth_name
from hostmaint.lab.packages import newest_kernel, rpm_env
from hostmaint.lab.sshd import descendants

Undo = Callable[[], None]
REBOOT_LOG = "reboots.jsonl"


def libvirt_socket_uri(workdir: Path, host: str) -> str:
    """The host's libvirtd over its Unix socket: reachable from the root namespace even with the link cut."""
    return f"qemu+unix:///system?socket={host_dir(workdir, host) / 'run-libvirt' / 'libvirt-sock'}"


# --- network ---------------------------------------------------------------------------------------


def cut_link(host: str) -> Undo:
    """A network partition: the host's veth on the lab bridge goes down (libvirt, SSH and migrations to
    and from it stall). Guests keep running."""
    link = veth_name(host)
    run(["ip", "link", "set", link, "down"])

    def undo() -> None:
        run(["ip", "link", "set", link, "up"])

    return undo


# --- processes ---------------------------------------------------------------------------------------


def _host_processes(host: str) -> list[tuple[int, list[str]]]:
    inode = netns_inode(netns_name(host))
    if inode is None:
        raise LabError(f"lab host {host}: no network namespace")
    found = []
    for pid in pids_in_namespaces(net_inode=inode):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue  # exited while we looked
        found.append((pid, [a for a in argv if a]))
    return found


def kill_ssh_sessions(workdir: Path, host: str) -> int:
    """SIGKILL every SSH session of the host (sshd's per-connection processes), as a crashing sshd or a
    dropped connection would: the client sees the connection die mid-command; the command itself may
    run on. The listening sshd stays, so the host is reachable again at once. Returns how many died."""
    listener = read_status(workdir, host).get("sshd_pid")
    killed = 0
    for pid, argv in _host_processes(host):
        if pid != listener and argv and argv[0].startswith("sshd"):
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass  # its connection ended on its own meanwhile
    return killed


def host_commands(host: str) -> list[list[str]]:
    """The command lines of every process of the host now."""
    return [argv for _, argv in _host_processes(host)]


# --- reboots -----------------------------------------------------------------------------------------


def _wrapper(workdir: Path, host: str, name: str) -> Path:
    return host_dir(workdir, host) / "bin" / name


def _replace_wrapper(workdir: Path, host: str, name: str, text: str) -> Undo:
    path = _wrapper(workdir, host, name)
    original = path.read_text()
    tmp = path.with_suffix(".chaos")
    tmp.write_text(text)
    tmp.chmod(0o755)
    tmp.replace(path)  # atomic: a command starting now runs one whole script or the other

    def undo() -> None:
        back = path.with_suffix(".chaos")
        back.write_text(original)
        back.chmod(0o755)
        back.replace(path)

    return undo


def _reboot_asking(workdir: Path, host: str, name: str, what: str, **request: object) -> Undo:
    """The host's ``reboot`` asks its supervisor for a reboot with ``request``'s options (see
    :meth:`hostmaint.lab.supervisor.Supervisor.handle`), until the undo."""
    state = host_dir(workdir, host) / "state"
    asked = json.dumps({"action": "reboot", "id": f"chaos-{name}", **request})
    return _replace_wrapper(workdir, host, "reboot", f"""#!/bin/sh
# hostmaint chaos: {what}
printf '%s' '{asked}' > '{state / "request"}.tmp' && mv '{state / "request"}.tmp' '{state / "request"}'
kill -USR1 "$(cat '{state / 'supervisor.pid'}')"
echo "hostmaint lab: rebooting $(/usr/bin/hostname)"
exit 0
""")


def hang_reboot(workdir: Path, host: str, down_seconds: float) -> Undo:
    """The host's next ``reboot`` powers it off for ``down_seconds`` (longer than the inventory's
    reboot timeout: a host that does not come back in time), then boots it as usual."""
    return _reboot_asking(workdir, host, "hang", f"a reboot that stays down for {down_seconds:.0f} s",
                          down_seconds=down_seconds)


def reimage_at_reboot(workdir: Path, host: str) -> Undo:
    """The host comes back from its ``reboot`` with a new SSH host key (reinstalled, or another machine
    on its address): strict host-key checking must refuse it. The undo mends the ``reboot``; the new
    key stays (the operator verifies it and updates known_hosts, :func:`trust_host_key`)."""
    return _reboot_asking(workdir, host, "reimage", "a reboot that comes back with a new host key", new_host_key=True)


def trust_host_key(workdir: Path, known_hosts: Path, host: str, ip: str) -> None:
    """The operator, having verified the key the host presents now out of band, puts it in known_hosts."""
    key = read_status(workdir, host).get("host_key")
    if not isinstance(key, str):
        raise LabError(f"lab host {host}: no sshd running, no host key to trust")
    lines = [f"{ip} {key}" if line.split(" ", 1)[0] == ip else line for line in known_hosts.read_text().splitlines()]
    known_hosts.write_text("\n".join(lines) + "\n")


def soft_reboot(workdir: Path, host: str, down_seconds: float = 3.0) -> Undo:
    """The host's ``reboot`` stops every process and starts its userspace again on the same kernel (as
    ``systemctl soft-reboot`` does): down for ``down_seconds``, back with the same boot id and kernel."""
    return _reboot_asking(workdir, host, "soft", "a reboot that keeps the kernel and its boot id",
                          down_seconds=down_seconds, keep_boot_id=True)


def reboot_without_libvirtd(workdir: Path, host: str) -> Undo:
    """The host comes back from its ``reboot`` without libvirtd (its unit failed at boot). The undo mends
    the ``reboot``; :func:`hostmaint.lab.start_libvirtd` starts the daemon."""
    return _reboot_asking(workdir, host, "no-libvirtd", "a reboot after which libvirtd does not start", libvirtd=False)


def slow_libvirtd_at_reboot(workdir: Path, host: str, seconds: float) -> Undo:
    """The host comes back from its ``reboot`` with sshd first and libvirtd ``seconds`` later (its unit
    takes that long: storage pools and networks to start), as a real boot may order them."""
    return _reboot_asking(workdir, host, "slow-libvirtd", f"a reboot after which libvirtd starts {seconds:g} s late",
                          libvirtd_after_s=seconds)


def change_memory_at_reboot(workdir: Path, host: str, memory_mib: int) -> Undo:
    """The host comes back from its ``reboot`` with ``memory_mib`` of memory (a DIMM failed at POST): its
    NUMA cell is smaller from then on. The undo mends the ``reboot``; the memory stays until a reboot
    asks for another size (:func:`change_memory_at_reboot` again)."""
    return _reboot_asking(workdir, host, "memory", f"a reboot that comes back with {memory_mib} MiB",
                          memory_mib=memory_mib)


def never_reboot_back(workdir: Path, host: str) -> Undo:
    """The host's next ``reboot`` powers it off for good: it does not come back by itself. The undo is
    the operator switching it on (the host boots, as after any reboot) and the ``reboot`` made whole."""
    mend = hang_reboot(workdir, host, 24 * 3600)
    state = host_dir(workdir, host) / "state"

    def undo() -> None:
        mend()
        # pressed while it is down (a press before the supervisor powered it off would be forgotten)
        for _ in range(40):
            if read_status(workdir, host).get("phase") != "down":
                return
            (state / "power-on").touch()
            time.sleep(0.5)

    return undo


def kill_process_tree(pid: int) -> list[int]:
    """kill -9 of a process, every process it started (found through /proc, whatever their group or
    session), and its group; returns the pids killed."""
    tree = [pid, *descendants(pid)]
    killed = []
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
            killed.append(p)
        except ProcessLookupError:
            pass  # it had finished
    kill_process_group(pid)
    return killed


def ignore_reboot(workdir: Path, host: str) -> Undo:
    """The host's ``reboot`` says it reboots, exits 0 and does nothing (a reboot that does not happen)."""
    return _replace_wrapper(workdir, host, "reboot", """#!/bin/sh
# hostmaint chaos: a reboot that does not happen
echo "hostmaint lab: rebooting $(/usr/bin/hostname)"
exit 0
""")


def reboots(workdir: Path, host: str) -> list[dict[str, object]]:
    """Every reboot of the host so far (the supervisor's log): time, old boot id, guests it killed."""
    path = host_dir(workdir, host) / "state" / REBOOT_LOG
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def boot_id(workdir: Path, host: str) -> str:
    return (host_dir(workdir, host) / "state" / "boot_id").read_text().strip()


def running_kernel(workdir: Path, host: str) -> str:
    return (host_dir(workdir, host) / "state" / "running-kernel").read_text().strip()


# --- packages ----------------------------------------------------------------------------------------


def installed_packages(workdir: Path, host: str) -> set[str]:
    """``name-version-release`` of every package in the host's rpm database, read from outside it."""
    d = host_dir(workdir, host)
    proc = subprocess.run(["rpm", "--root", str(d / "root"), "-qa", "--qf", "%{NAME}-%{VERSION}-%{RELEASE}\\n"],
                          capture_output=True, text=True, timeout=60, env=rpm_env(d))
    if proc.returncode != 0:
        raise LabError(f"lab host {host}: rpm -qa failed: {proc.stderr.strip()}")
    return set(proc.stdout.split())


def newest_installed_kernel(workdir: Path, host: str) -> str:
    """The newest kernel-lab in the host's rpm database, spelled as ``uname -r`` spells it."""
    return newest_kernel(host_dir(workdir, host))


def break_repo(workdir: Path, host: str) -> Undo:
    """The host's repository points at a directory that does not exist: dnf fails (a broken mirror)."""
    repo_file = next((host_dir(workdir, host) / "yum.repos.d").glob("*.repo"))
    original = repo_file.read_text()
    broken = "\n".join("baseurl=file:///var/empty/hostmaint-chaos-no-repo" if line.startswith("baseurl=") else line
                       for line in original.splitlines()) + "\n"
    repo_file.write_text(broken)

    def undo() -> None:
        repo_file.write_text(original)

    return undo


def _mount_namespaces(workdir: Path, host: str) -> list[int]:
    """One process per mount namespace of the host where its commands run: the supervisor's (libvirtd,
    and every sshd started after a reboot copies it) and the running sshd's (``ip netns exec`` gives
    sshd a mount namespace of its own, which later mounts in the supervisor's do not reach)."""
    pid = supervisor_pid(workdir, host)
    if pid is None:
        raise LabError(f"lab host {host}: its supervisor is not running")
    pids = [pid]
    sshd = read_status(workdir, host).get("sshd_pid")
    try:
        if isinstance(sshd, int) and os.stat(f"/proc/{sshd}/ns/mnt").st_ino != os.stat(f"/proc/{pid}/ns/mnt").st_ino:
            pids.append(sshd)
    except OSError:
        pass  # sshd is down (a reboot under way): the next one copies the supervisor's namespace
    return pids


def fill_disk(workdir: Path, host: str) -> Undo:
    """The filesystem the host's packages install into is full: rpm's transaction check refuses every
    update ("needs ... more space"). Made, in each of the host's mount namespaces (never the machine's),
    as a full 1 MiB tmpfs holding a copy of what was there, moved over ``/usr/share/hostmaint-lab`` of
    the host's install root; the undo unmounts them, and the untouched original is back."""
    d = host_dir(workdir, host)
    target = d / "root" / "usr" / "share" / "hostmaint-lab"
    stage = d / "chaos-full"
    stage.mkdir(exist_ok=True)
    pids = _mount_namespaces(workdir, host)
    for pid in pids:
        enter = ["nsenter", "-t", str(pid), "-m", "--"]
        run([*enter, "mount", "-t", "tmpfs", "-o", "size=1m", "chaos-full", str(stage)])
        run([*enter, "cp", "-a", f"{target}/.", str(stage)])
        # fill it to the last block; dd's own "No space left" is the point
        run([*enter, "dd", "if=/dev/zero", f"of={stage / 'filler'}", "bs=4k"], check=False)
        run([*enter, "mount", "--move", str(stage), str(target)])

    def undo() -> None:
        # every namespace the fill may have reached by now (a reboot copies it into a new sshd's)
        for pid in {*pids, *_mount_namespaces(workdir, host)}:
            _unmount_all(pid, target)

    return undo


def _unmount_all(pid: int, target: Path) -> None:
    """Unmount every stacked mount at ``target`` in ``pid``'s mount namespace; a busy one lazily."""
    enter = ["nsenter", "-t", str(pid), "-m", "--"]
    for _ in range(8):
        if not _mounted(pid, target):
            return
        if run([*enter, "umount", str(target)], check=False).returncode != 0:
            run([*enter, "umount", "-l", str(target)], check=False)
    if _mounted(pid, target):
        raise LabError(f"process {pid}: the full filesystem over {target} does not unmount")


def _mounted(pid: int, path: Path) -> bool:
    """Whether ``path`` is a mount point in the mount namespace of process ``pid``."""
    try:
        with open(f"/proc/{pid}/mounts") as f:
            return any(line.split()[1] == str(path) for line in f)
    except OSError:
        return False  # the process is gone, and its namespace with it


def leftover_full_disks(workdir: Path, host: str) -> list[str]:
    """Mount points a :func:`fill_disk` left in the host's mount namespaces (there should be none)."""
    found = []
    for pid in _mount_namespaces(workdir, host):
        try:
            with open(f"/proc/{pid}/mounts") as f:
                found += [f"{line.split()[1]} (pid {pid})" for line in f if line.split()[0] == "chaos-full"]
        except OSError:
            continue  # exited while we looked
    return found


# --- identity and guests --------------------------------------------------------------------------------


def change_host_key(known_hosts: Path, ip: str) -> Undo:
    """The operator's known_hosts no longer holds the key the host presents, as after a reinstall or
    an impostor: strict host-key checking must refuse the host. The undo puts the trusted line back."""
    original = known_hosts.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        key = Path(tmp) / "key"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)])
        other = " ".join(key.with_suffix(".pub").read_text().split()[:2])
    lines = [f"{ip} {other}" if line.split(" ", 1)[0] == ip else line for line in original.splitlines()]
    known_hosts.write_text("\n".join(lines) + "\n")

    def undo() -> None:
        known_hosts.write_text(original)

    return undo


def free_mib(workdir: Path, host: str) -> int:
    """Guest memory the host has left (its memory tmpfs, as the host's own /proc/meminfo reports it)."""
    for line in (host_dir(workdir, host) / "state" / "meminfo").read_text().splitlines():
        if line.startswith("MemFree:"):
            return int(line.split()[1]) // 1024
    raise LabError(f"lab host {host}: no MemFree in its meminfo")


def start_guest(info: LabInfo, name: str, host: str, memory_mib: int = 64) -> LabVm:
    """A tenant starts a VM on ``host`` (whatever hostmaint thinks of the host right now)."""
    return add_guest(info, name, host, memory_mib=memory_mib)


def hold_package_lock(workdir: Path, host: str) -> Undo:
    """Another package-manager run (dnf-automatic) holds the host's RPMDB lock: a live process's pid in
    dnf's lock file, which is all dnf checks (``dnf/lock.py``). The undo ends it, as that run would."""
    lock = host_dir(workdir, host) / "root" / "var" / "lib" / "dnf" / "rpmdb_lock.pid"
    lock.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(["sleep", "3600"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    lock.write_text(str(holder.pid))

    def undo() -> None:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
        lock.unlink(missing_ok=True)

    return undo


def stop_guest(workdir: Path, host: str, name: str, how: str = "destroy") -> bool:
    """A tenant's ``virsh destroy`` (``how="managedsave"``: ``virsh managedsave``) of ``name`` on ``host``,
    over the host's own libvirtd socket: it stays defined there, shut off (reason "destroyed", "saved").
    False when it does not run there (moved, or paused for a migration's switch-over: a tenant's stop of a
    copy libvirt is handing over is not this fault)."""
    import libvirt

    conn = libvirt.open(libvirt_socket_uri(workdir, host))
    try:
        try:
            dom = conn.lookupByName(name)
            if dom.state()[0] != libvirt.VIR_DOMAIN_RUNNING:
                return False
            if how == "managedsave":
                dom.managedSave()
            else:
                dom.destroy()
        except libvirt.libvirtError:
            return False  # gone between the look and the stop (its migration ended, or one holds it)
        return True
    finally:
        conn.close()


def start_stopped_guest(workdir: Path, hosts: list[str], name: str) -> str | None:
    """The tenant starts ``name`` again where it is defined and shut off; the host, or None when no host
    of ``hosts`` holds it so (it runs, or was undefined)."""
    import libvirt

    for host in hosts:
        conn = libvirt.open(libvirt_socket_uri(workdir, host))
        try:
            try:
                dom = conn.lookupByName(name)
            except libvirt.libvirtError:
                continue
            if dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF and dom.isPersistent():
                dom.create()
                return host
        finally:
            conn.close()
    return None


def fill_host(info: LabInfo, name: str, host: str, leave_mib: int = 8) -> LabVm | None:
    """A guest that takes all but a little of the host's free memory, so not even a 64 MiB guest fits
    any more (a target filled up behind a plan's back); None when there is not 64 MiB to take. QEMU
    needs a few MiB beyond the guest's size, and a migration arriving meanwhile takes memory too, so a
    size the host refuses is tried again 16 MiB smaller."""
    for attempt in range(4):
        size = free_mib(info.workdir, host) - leave_mib - 16 * attempt
        if size < 64:
            return None
        try:
            return add_guest(info, name, host, memory_mib=size)
        except LabError:
            remove_guest(info, name)  # defined but not started: gone again before the next size
    return None


def kill_process_group(pid: int) -> None:
    """kill -9 of a process and its group (a flow's process dying with the machine under it)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # it had finished
