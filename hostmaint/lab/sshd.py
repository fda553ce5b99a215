"""A key-only OpenSSH server for the lab and the tests: one per lab host, on loopback or in a lab netns.

Each server has its own host key, config, pid file and log under a work directory; it
accepts public keys only (no passwords, no PAM) so the SSH driver is exercised exactly as
against a real host with strict host keys. Nothing here ever listens on an address outside
loopback or a network namespace the lab created.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "ssh-keygen"
PRIVSEP_DIR = Path("/run/sshd")  # sshd refuses to start without its privilege separation directory


class SshdError(RuntimeError):
    """The lab sshd could not be started; the message carries the tail of its log."""


def make_keypair(directory: Path, name: str = "id_ed25519",
                 comment: str = "hostmaint-lab") -> tuple[Path, Path]:
    """Create (or reuse) an unencrypted ed25519 key pair; returns (private, public) paths."""
    directory.mkdir(parents=True, exist_ok=True)
    private = directory / name
    public = directory / f"{name}.pub"
    if not private.exists():
        subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(private)],
                       check=True, capture_output=True)
    private.chmod(0o600)
    return private, public


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _free_port(address: str) -> int:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def _host_entry(address: str, port: int) -> str:
    """known_hosts spelling of a host: bare for port 22, ``[addr]:port`` otherwise."""
    return address if port == 22 else f"[{address}]:{port}"


@dataclass
class SshdHandle:
    """A running lab sshd. ``host_key_pub`` is ``ssh-ed25519 AAAA...`` (no comment)."""

    address: str
    port: int
    host_key_pub: str
    pid: int
    log_path: Path
    config_path: Path
    netns: str | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def known_hosts_line(self) -> str:
        """The known_hosts line for this server, e.g. ``[127.0.0.1]:2222 ssh-ed25519 AAAA...``."""
        return f"{_host_entry(self.address, self.port)} {self.host_key_pub}"

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server and every open session, abruptly, like a host going down. Safe to call twice.

        Each connection is served by its own sshd process in its own session (sshd calls setsid),
        so the listener's process group is not enough: its descendants are signalled too, which is
        what "the host went down" means in the lab.
        """
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        # Freeze the listener first: a connection it accepted between our look at its children
        # and its death would otherwise survive the "shutdown" as an orphan.
        _signal_all([proc.pid], signal.SIGSTOP)
        children = descendants(proc.pid)
        _signal_all([proc.pid], signal.SIGKILL)
        _signal_all(children, signal.SIGTERM)
        proc.wait(timeout=timeout)
        deadline = time.monotonic() + timeout
        while any(_exists(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.02)
        _signal_all([pid for pid in children if _exists(pid)], signal.SIGKILL)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> SshdHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, found through /proc (parents first)."""
    parent_of: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited while we looked
        # the command name is in parentheses and may hold spaces: the ppid follows the last ')'
        parent_of[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: list[int] = []
    frontier = [pid]
    while frontier:
        current = frontier.pop()
        kids = [p for p, pp in parent_of.items() if pp == current]
        found.extend(kids)
        frontier.extend(kids)
    return found


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_all(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            continue  # already gone: that is the goal


def _config(*, address: str, port: int, host_key: Path, pid_file: Path, authorized_keys: Path,
            env: Mapping[str, str]) -> str:
    listen = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    lines = [
        f"ListenAddress {listen}",
        f"HostKey {host_key}",
        f"PidFile {pid_file}",
        f"AuthorizedKeysFile {authorized_keys}",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "PermitRootLogin prohibit-password",
        "StrictModes no",  # the work directory's permissions are the test's, not a real home's
        "LogLevel VERBOSE",
        "AllowTcpForwarding no",
        "AllowAgentForwarding no",
        "X11Forwarding no",
        "PrintMotd no",
        "PermitUserEnvironment no",
        "MaxStartups 64:30:128",  # parallel tasks open several connections at once
        "Subsystem sftp internal-sftp",
    ]
    if env:
        lines.append("SetEnv " + " ".join(f"{k}={v}" for k, v in env.items()))
    return "\n".join(lines) + "\n"


def start_sshd(workdir: Path, *, authorized_keys: Path, address: str = "127.0.0.1", port: int = 0,
               netns: str | None = None, extra_env: Mapping[str, str] | None = None,
               home: Path | None = None, ready_timeout: float = 10.0) -> SshdHandle:
    """Start a key-only sshd and wait until it listens.

    ``port=0`` picks a free port on loopback, or 22 inside a netns (its own port space).
    ``netns`` runs it via ``ip netns exec``; without one the address must be loopback.
    ``extra_env`` (and ``home`` as HOME) are set in every session, e.g. a PATH with lab wrappers.
    """
    if netns is None and not _is_loopback(address):
        raise ValueError(f"lab sshd outside a lab netns must listen on loopback, got {address!r}")
    workdir.mkdir(parents=True, exist_ok=True)
    PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    host_key = workdir / "ssh_host_ed25519_key"
    if not host_key.exists():
        subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(host_key)],
                       check=True, capture_output=True)
    host_key.chmod(0o600)
    host_key_pub = " ".join(Path(f"{host_key}.pub").read_text().split()[:2])
    env = dict(extra_env or {})
    if home is not None:
        env["HOME"] = str(home)

    attempts = 5 if port == 0 and netns is None else 1  # a picked port can be taken before sshd binds it
    last_error = ""
    for _ in range(attempts):
        chosen = port or (22 if netns else _free_port(address))
        cfg = workdir / f"sshd_config.{chosen}"
        log = workdir / f"sshd.{chosen}.log"
        pid_file = workdir / f"sshd.{chosen}.pid"
        cfg.write_text(_config(address=address, port=chosen, host_key=host_key, pid_file=pid_file,
                               authorized_keys=authorized_keys.resolve(), env=env))
        check = subprocess.run([SSHD, "-t", "-f", str(cfg)], capture_output=True, text=True)
        if check.returncode != 0:
            raise SshdError(f"sshd config {cfg} rejected: {check.stderr.strip()}")
        log.write_text("")
        argv = [SSHD, "-D", "-f", str(cfg), "-E", str(log)]
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        handle = SshdHandle(address=address, port=chosen, host_key_pub=host_key_pub, pid=proc.pid,
                            log_path=log, config_path=cfg, netns=netns, _proc=proc)
        if _wait_listening(handle, ready_timeout):
            return handle
        last_error = handle.log_tail()
        handle.stop()
    raise SshdError(f"sshd on {address}:{port or 'auto'} did not start: {last_error}")


def _wait_listening(handle: SshdHandle, timeout: float) -> bool:
    # sshd logs "Server listening on ADDR port N." once bound; that works inside a netns too,
    # where this process could not connect to probe.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not handle.alive():
            return False
        try:
            if "Server listening on" in handle.log_path.read_text(errors="replace"):
                return True
        except OSError:
            pass  # the log appears a moment after the process
        time.sleep(0.02)
    return False


def write_known_hosts(path: Path, handles: Iterable[SshdHandle]) -> Path:
    """Write a known_hosts file holding exactly these servers' host keys."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(h.known_hosts_line() + "\n" for h in handles))
    return path


def authorize(authorized_keys: Path, public_keys: Iterable[Path]) -> Path:
    """Write an authorized_keys file from public key files."""
    authorized_keys.parent.mkdir(parents=True, exist_ok=True)
    authorized_keys.write_text("".join(p.read_text().strip() + "\n" for p in public_keys))
    return authorized_keys
