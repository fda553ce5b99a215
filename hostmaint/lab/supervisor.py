"""The "hardware" of one lab host: runs inside the host's network, mount and UTS namespaces.

Started by :mod:`hostmaint.lab.host` as
``ip netns exec NS unshare --mount --uts --propagation private python -m hostmaint.lab.supervisor DIR``.
It gives the host its private directories and hostname, "boots" it (new boot id, libvirtd, sshd),
and serves requests written to ``DIR/state/request`` (signalled with SIGUSR1): ``reboot`` kills every
process of the host — found by network *and* mount namespace, since libvirt gives each QEMU its own
mount namespace — waits, and boots again; ``kill-libvirtd`` / ``start-libvirtd`` let tests break and
mend one daemon; ``stop`` kills everything and exits. It writes ``DIR/state/status.json``.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from hostmaint.lab.network import LabError, kill_pids, pids_in_namespaces
from hostmaint.lab.packages import boot_default_kernel
from hostmaint.lab.sshd import SshdHandle, start_sshd

LIBVIRTD = "/usr/sbin/libvirtd"
LIBVIRT_PORT = 16509
PR_SET_CHILD_SUBREAPER = 36
SESSION_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# host_dir sub-directory -> where the host sees it
PRIVATE_DIRS = {
    "etc-libvirt": "/etc/libvirt",
    "run-libvirt": "/run/libvirt",
    "var-lib-libvirt": "/var/lib/libvirt",
    "var-log-libvirt": "/var/log/libvirt",
    "var-cache-libvirt": "/var/cache/libvirt",
    "bin": "/usr/local/sbin",
}
BOOT_ID = "/proc/sys/kernel/random/boot_id"


def _log(host_dir: Path, message: str) -> None:
    with open(host_dir / "supervisor.log", "a") as f:
        f.write(f"{time.strftime('%H:%M:%S')} {message}\n")


def _mount(argv: list[str]) -> None:
    subprocess.run(["mount", *argv], check=True, capture_output=True, text=True)


class MemoryView:
    """What the host's processes read as its memory: the size and free space of its RAM tmpfs.

    libvirt takes a host's and its NUMA cells' memory from ``/proc/meminfo`` and
    ``/sys/devices/system/node/nodeN/meminfo``; every lab host would otherwise report the whole
    machine's (and all of them the same free memory). Files with the lab host's numbers are
    bind-mounted over those, in this mount namespace only, and rewritten in place with fixed-width
    numbers (a reader never sees a half-written file) as guests come and go.
    """

    WIDTH = 12

    def __init__(self, state: Path, ram: Path, memory_mib: int) -> None:
        self.state = state
        self.ram = ram
        self.total_kib = memory_mib * 1024
        self.nodes = sorted(int(p.name[4:]) for p in Path("/sys/devices/system/node").glob("node[0-9]*"))
        self.files: dict[Path, Path] = {}  # our file -> what it covers

    def install(self) -> None:
        self.files[self.state / "meminfo"] = Path("/proc/meminfo")
        for node in self.nodes:
            self.files[self.state / f"node{node}-meminfo"] = Path(f"/sys/devices/system/node/node{node}/meminfo")
        self.refresh()
        for ours, target in self.files.items():
            _mount(["--bind", str(ours), str(target)])

    def _free_kib(self) -> int:
        st = os.statvfs(self.ram)
        return min(self.total_kib, st.f_bavail * st.f_frsize // 1024)

    def _render(self, target: Path, free: int) -> bytes:
        w = self.WIDTH
        if target == Path("/proc/meminfo"):
            rows = [("MemTotal", self.total_kib), ("MemFree", free), ("MemAvailable", free), ("Buffers", 0),
                    ("Cached", 0), ("SwapCached", 0), ("SwapTotal", 0), ("SwapFree", 0)]
            return "".join(f"{k + ':':<16}{v:>{w}} kB\n" for k, v in rows).encode()
        node = int(target.parent.name[4:])
        share = len(self.nodes) or 1
        total, node_free = self.total_kib // share, free // share
        rows = [("MemTotal", total), ("MemFree", node_free), ("MemUsed", total - node_free)]
        return "".join(f"Node {node} {k + ':':<10}{v:>{w}} kB\n" for k, v in rows).encode()

    def refresh(self) -> None:
        free = self._free_kib()
        for ours, target in self.files.items():
            data = self._render(target, free)
            # same length every time: overwrite in place, never truncate (the bind mount holds the inode)
            with open(ours, "r+b" if ours.exists() else "wb") as f:
                f.write(data)


class Supervisor:
    """One lab host's lifecycle. ``config`` is ``DIR/host.json`` written by hostmaint.lab.host."""

    def __init__(self, host_dir: Path) -> None:
        self.dir = host_dir
        self.config = json.loads((host_dir / "host.json").read_text())
        self.state = host_dir / "state"
        self.libvirtd: subprocess.Popen[bytes] | None = None
        self.sshd: SshdHandle | None = None
        self.boot_count = 0
        self.status: dict[str, object] = {}
        self.memory_view = MemoryView(self.state, self.dir / "ram", int(self.config["memory_mib"]))

    # --- set-up, once -------------------------------------------------------------

    def enter(self) -> None:
        """Private mounts and hostname. Only this mount namespace sees them; they die with it."""
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        socket.sethostname(self.config["hostname"])
        for sub, target in PRIVATE_DIRS.items():
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
            _mount(["--bind", str(self.dir / sub), target])
        # the host knows its own name (sudo, libvirtd look it up): from this file, never by asking a DNS
        # server the namespace has no route to
        for source, target in dict(self.config.get("binds", {})).items():
            _mount(["--bind", source, target])
        hosts = self.dir / "etc-hosts"
        hosts.write_text(f"127.0.0.1 localhost\n{self.config['ip']} {self.config['hostname']}\n")
        _mount(["--bind", str(hosts), "/etc/hosts"])
        (self.state / "boot_id").write_text(str(uuid.uuid4()) + "\n")
        _mount(["--bind", str(self.state / "boot_id"), BOOT_ID])
        ram = self.dir / "ram"
        ram.mkdir(exist_ok=True)
        # guests' RAM is a file here: this tmpfs's size is the host's memory, as the guests see it
        _mount(["-t", "tmpfs", "-o", f"size={self.config['memory_mib']}m,mode=0755", "tmpfs", str(ram)])
        self.memory_view.install()
        (self.state / "supervisor.pid").write_text(f"{os.getpid()}\n")

    # --- boot and shutdown -----------------------------------------------------------

    def boot(self, new_boot: bool = True, libvirtd: bool = True) -> None:
        """Power on: fresh boot id, empty RAM, the boot default kernel (grubby's), libvirtd and sshd.

        ``new_boot=False``: userspace starts again on the same kernel (a soft reboot): boot id and running
        kernel stay. ``libvirtd=False``: libvirtd does not start (its unit failed at boot)."""
        self._write_status("booting")
        for entry in (self.dir / "ram").iterdir():
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        if new_boot:
            # rewrite in place: the bind mount over /proc/.../boot_id points at this inode
            (self.state / "boot_id").write_text(str(uuid.uuid4()) + "\n")
            (self.state / "running-kernel").write_text(boot_default_kernel(self.dir) + "\n")
            (self.state / "booted-at").write_text(f"{time.time()}\n")
        self.memory_view.refresh()
        if libvirtd:
            self.start_libvirtd()
        else:
            _log(self.dir, "libvirtd not started at this boot")
        self.sshd = start_sshd(self.dir / "sshd", authorized_keys=Path(self.config["authorized_keys"]),
                               address=self.config["ip"], port=22, netns=self.config["netns"],
                               extra_env={"PATH": SESSION_PATH}, home=self.dir / "home")
        self.boot_count += 1
        self._write_status("up")
        _log(self.dir, f"booted #{self.boot_count}, boot id {self.boot_id()}")

    def start_libvirtd(self) -> None:
        log = open(self.dir / "var-log-libvirt" / "libvirtd.stdout", "ab")
        self.libvirtd = subprocess.Popen(
            [LIBVIRTD, "--listen", "--config", str(self.dir / "etc-libvirt" / "libvirtd.conf"),
             "--pid-file", str(self.state / "libvirtd.pid")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.libvirtd.poll() is not None:
                raise RuntimeError(f"libvirtd exited with {self.libvirtd.returncode}; see {log.name}")
            try:
                with socket.create_connection((self.config["ip"], LIBVIRT_PORT), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("libvirtd did not listen within 60 s")

    def _change_hardware(self, request: dict[str, object]) -> None:
        """What a reboot request changes while the host is off (lab faults): ``new_host_key`` (the host
        was reinstalled: sshd makes a new key at boot), ``memory_mib`` (a DIMM lost or added: the host's
        and its NUMA cell's memory from this boot on)."""
        if request.get("new_host_key"):
            for key in (self.dir / "sshd").glob("ssh_host_*"):
                key.unlink()
            _log(self.dir, "host key removed: sshd makes a new one at boot")
        if request.get("memory_mib") is not None:
            mib = int(str(request["memory_mib"]))
            self.memory_view.total_kib = mib * 1024
            _mount(["-o", f"remount,size={mib}m", str(self.dir / "ram")])
            _log(self.dir, f"memory is {mib} MiB from this boot on")

    def kill_libvirtd(self) -> None:
        if self.libvirtd is not None and self.libvirtd.poll() is None:
            self.libvirtd.kill()
            self.libvirtd.wait()

    def power_off(self) -> None:
        """SIGKILL every process of this host except the supervisor itself."""
        net = os.stat("/proc/self/ns/net").st_ino
        mnt = os.stat("/proc/self/ns/mnt").st_ino
        me = os.getpid()
        kill_pids(lambda: pids_in_namespaces(net_inode=net, mnt_inode=mnt, exclude=(me,)))
        self._reap()
        self.libvirtd = None
        self.sshd = None

    def running_guests(self) -> list[str]:
        """Names of the QEMU guests running on this host now (from /proc, not from libvirt)."""
        net = os.stat("/proc/self/ns/net").st_ino
        names = []
        for pid in pids_in_namespaces(net_inode=net):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue  # exited while we looked
            if argv and "qemu-system" in argv[0] and "-name" in argv:
                spec = argv[argv.index("-name") + 1]
                names += [part[len("guest="):] for part in spec.split(",") if part.startswith("guest=")]
        return sorted(names)

    def _log_reboot(self) -> None:
        # what the power cut kills, written down by the "hardware": the chaos campaign's outside
        # proof that no host rebooted with a guest on it
        entry = {"at": time.time(), "boot_id": self.boot_id(), "guests_killed": self.running_guests()}
        with open(self.state / "reboots.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")

    # --- the request loop -----------------------------------------------------------

    def serve(self) -> None:
        """Serve requests until asked to stop. Signals only wake the loop; the request file says what."""
        stop = []
        signal.signal(signal.SIGUSR1, lambda *_: None)
        signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
        while True:
            self._reap()
            self.memory_view.refresh()
            if stop:
                self.handle({"action": "stop"})
            request = self._take_request()
            if request is not None:
                self.handle(request)
            time.sleep(0.1)

    def handle(self, request: dict[str, object]) -> None:
        action = request.get("action")
        _log(self.dir, f"request {request}")
        if action == "reboot":
            self._write_status("down", request)
            # let the caller's session (e.g. `ssh host reboot`) read its exit status first
            time.sleep(float(request.get("delay_seconds", 0.3)))  # type: ignore[arg-type]
            self._log_reboot()
            self.power_off()
            self._stay_down(float(request.get("down_seconds", 3.0)))  # type: ignore[arg-type]
            self._change_hardware(request)
            late = request.get("libvirtd_after_s")
            self.boot(new_boot=not request.get("keep_boot_id"),
                      libvirtd=late is None and request.get("libvirtd", True) is not False)
            if late is not None:
                # libvirtd comes up after sshd (its unit is slow: storage pools, networks to start)
                time.sleep(float(str(late)))
                self.start_libvirtd()
                _log(self.dir, f"libvirtd started {late} s after sshd")
        elif action == "kill-libvirtd":
            self.kill_libvirtd()
        elif action == "start-libvirtd":
            if self.libvirtd is None or self.libvirtd.poll() is not None:
                self.start_libvirtd()
        elif action == "stop":
            self.power_off()
            self._write_status("stopped", request)
            sys.exit(0)
        self._write_status("up", request)

    def _stay_down(self, seconds: float) -> None:
        """Powered off for ``seconds``, or until someone presses the power button (``state/power-on``:
        a host that would never come back by itself, switched on by its operator)."""
        button = self.state / "power-on"
        button.unlink(missing_ok=True)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not button.exists():
            time.sleep(0.1)
        button.unlink(missing_ok=True)

    def _take_request(self) -> dict[str, object] | None:
        path = self.state / "request"
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            return None
        path.unlink()
        if text.startswith("{"):
            return dict(json.loads(text))
        return {"action": text or "reboot", "id": f"local-{time.time()}"}

    def _reap(self) -> None:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    def boot_id(self) -> str:
        return (self.state / "boot_id").read_text().strip()

    def _write_status(self, phase: str, request: dict[str, object] | None = None) -> None:
        if request is not None and request.get("id"):
            self.status["last_request"] = request["id"]
        self.status.update(phase=phase, boot_id=self.boot_id() if (self.state / "boot_id").exists() else None,
                           boot_count=self.boot_count, supervisor_pid=os.getpid(),
                           libvirtd_pid=self.libvirtd.pid if self.libvirtd else None,
                           sshd_pid=self.sshd.pid if self.sshd else None,
                           host_key=self.sshd.host_key_pub if self.sshd else None, at=time.time())
        tmp = self.state / "status.json.tmp"
        tmp.write_text(json.dumps(self.status))
        tmp.replace(self.state / "status.json")


def main(argv: list[str]) -> int:
    host_dir = Path(argv[1])
    supervisor = Supervisor(host_dir)
    try:
        supervisor.enter()
        supervisor.boot()
    except (OSError, RuntimeError, ValueError, KeyError, subprocess.SubprocessError, LabError) as exc:
        # report why the host failed to come up, then leave no process behind
        _log(host_dir, f"boot failed: {exc!r}")
        supervisor._write_status(f"failed: {exc}")
        supervisor.power_off()
        return 1
    supervisor.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
