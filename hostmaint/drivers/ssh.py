"""The SSH HostShell: paramiko, key authentication, strict host keys. The only module importing paramiko.

How paramiko's failures become hostmaint errors (translated here, once)::

    a known_hosts file that cannot be read, or a line of it
        that does not parse (named by its line number)     -> HostKeyError      (never retried)
    BadHostKeyException, a host missing from known_hosts,
        a key marked @revoked                              -> HostKeyError      (never retried)
    AuthenticationException, an address that cannot be
        resolved at all (ValueError)                       -> DriverError       (never retried)
    refused / unreachable / timeout / EOFError /
        SSHException while connecting or opening a channel -> retried, then TransientDriverError
    connection lost after the command was sent             -> TransientDriverError (not retried:
                                                              the command may have run)
    the command outlived its timeout                       -> CommandError "timed out after Ns"
    the command ran and exited non-zero                    -> a CommandResult, never an exception

known_hosts is read here, not by paramiko's loader, which raises an untranslated InvalidHostKey for
a corrupt line and cannot read OpenSSH's markers. Host keys are only ever *taken away* from what a
plain line grants: ``@revoked`` lines are honoured (that key is refused for every host, whatever the
line's host pattern), ``@cert-authority`` lines grant nothing (paramiko cannot check host
certificates, so the host's own key line is still required; an unknown-host error points at the CA
lines), and a line that does not parse is an error naming the file and line, never skipped, since it
may be the very host's key. A key type paramiko does not know is skipped: it cannot grant anything.

Commands are argv lists; each element is quoted with ``shlex.quote`` so the remote shell sees
exactly one literal word per element. Key material is never logged, put in an exception or a
result: a key from a secret block is parsed straight into a paramiko key object. Every log line
shows its names and commands through :mod:`hostmaint.display` (secrets masked, escapes visible):
a command carries inventory and host values (package globs, paths, a hook's token), and debug
lines reach the worker's terminal and log files like any other.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import select
import shlex
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import paramiko
from paramiko.hostkeys import HostKeyEntry, InvalidHostKey
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from hostmaint.display import command_line, masked, visible
from hostmaint.errors import CommandError, DriverError, HostKeyError, TransientDriverError
from hostmaint.inventory import Inventory, SshTarget
from hostmaint.models import CommandResult

log = logging.getLogger(__name__)

KeyLoader = Callable[[str], str]  # secret block name -> private key text (OpenSSH/PEM)
_KEY_TYPES: tuple[type[paramiko.PKey], ...] = (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey)
_READ_CHUNK = 65536
_MAX_OUTPUT = 64 * 1024 * 1024  # a runaway command must not eat the worker's memory


def fingerprint(key: paramiko.PKey) -> str:
    """``SHA256:...`` as ``ssh-keygen -l`` prints it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _host_label(target: SshTarget) -> str:
    return target.address if target.port == 22 else f"[{target.address}]:{target.port}"


def _parse_key(text: str, source: str, host: str) -> paramiko.PKey:
    """A private key from its text. Errors name the source, never the text."""
    for kind in _KEY_TYPES:
        try:
            return kind.from_private_key(io.StringIO(text))
        except (paramiko.SSHException, ValueError, IndexError, AssertionError):
            # not this key type, encrypted, or corrupt: paramiko's parsers raise IndexError and
            # AssertionError on a damaged key (found by corrupting keys), not only SSHException
            continue
    raise DriverError(f"{source} does not hold an unencrypted ed25519, ECDSA or RSA private key "
                      "(use ssh-agent for a key with a passphrase)", host)


def _require_agent_keys(host: str) -> None:
    """An agent without keys (or no agent at all) is a setup error, not worth a retry."""
    try:
        agent = paramiko.Agent()
    except (paramiko.SSHException, EOFError, OSError) as exc:
        # the agent socket may exist and still hang up or refuse: a setup problem all the same
        raise DriverError(f"ssh-agent not usable: {type(exc).__name__}: {exc}", host) from exc
    try:
        if not agent.get_keys():
            raise DriverError("key source is ssh-agent, but no agent with keys answers on SSH_AUTH_SOCK", host)
    finally:
        agent.close()


def _key_id(key: paramiko.PKey) -> tuple[str, bytes]:
    return key.get_name(), key.asbytes()


@dataclass(frozen=True)
class _KnownHosts:
    """A known_hosts file as this driver reads it (see the module docstring for the rules)."""

    path: str
    trusted: tuple[tuple[str, paramiko.PKey], ...]  # (host name or hashed name, key), file order
    revoked: Mapping[tuple[str, bytes], int]  # (key type, key blob) -> line number of its @revoked line
    ca_lines: tuple[int, ...]  # @cert-authority lines, which grant nothing here

    def fill(self, keys: paramiko.HostKeys) -> None:
        """Put the trusted keys into paramiko's table; the first line for a host and key type wins."""
        for name, key in self.trusted:
            known = keys.lookup(name)
            # paramiko compares only the first key of a type; add() would let a later line replace it
            if known is None or key.get_name() not in known:
                keys.add(name, key.get_name(), key)

    def revoked_line(self, key: paramiko.PKey) -> int | None:
        return self.revoked.get(_key_id(key))

    def ca_hint(self) -> str:
        if not self.ca_lines:
            return ""
        lines = ", ".join(str(n) for n in self.ca_lines)
        return (f"; {self.path} line(s) {lines} are @cert-authority lines, which hostmaint does not use "
                "(host certificates cannot be checked): add the host's own key")


def _known_hosts_entry(fields: list[str], lineno: int, path: str, host: str) -> HostKeyEntry | None:
    """One ``hosts key-type base64-key [comment]`` line; None for a key type paramiko does not know."""
    if len(fields) < 3:
        raise HostKeyError(f"{path} line {lineno}: not a known_hosts entry (expected 'hosts key-type key'); "
                           "fix or remove the line", host)
    try:
        # one space between fields: paramiko's parser splits on every single blank
        return HostKeyEntry.from_line(" ".join(fields[:3]), lineno)
    except InvalidHostKey as exc:
        raise HostKeyError(f"{path} line {lineno}: the {fields[1]} key is not valid base64; "
                           "fix or remove the line", host) from exc
    except (paramiko.SSHException, ValueError) as exc:
        # a blob that decodes but is no key of its type (paramiko: SSHException; PyNaCl: ValueError)
        raise HostKeyError(f"{path} line {lineno}: the {fields[1]} key does not decode as one; "
                           "fix or remove the line", host) from exc


def _load_known_hosts(path: str, host: str) -> _KnownHosts:
    """Read and check the whole file; any line that does not parse is an error naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise HostKeyError(f"known_hosts file {path} cannot be read: {exc.strerror}", host) from exc
    except UnicodeDecodeError as exc:
        raise HostKeyError(f"known_hosts file {path} is not text: byte {exc.start} is not UTF-8", host) from exc
    trusted: list[tuple[str, paramiko.PKey]] = []
    revoked: dict[tuple[str, bytes], int] = {}
    ca_lines: list[int] = []
    for lineno, raw in enumerate(text.split("\n"), 1):
        fields = raw.split()
        if not fields or fields[0].startswith("#"):
            continue
        marker = fields.pop(0) if fields[0].startswith("@") else ""
        if marker == "@cert-authority":
            ca_lines.append(lineno)
            continue
        if marker not in ("", "@revoked"):
            raise HostKeyError(f"{path} line {lineno}: unknown marker {marker[:40]!r} "
                               "(OpenSSH knows @cert-authority and @revoked); fix or remove the line", host)
        entry = _known_hosts_entry(fields, lineno, path, host)
        if entry is None:
            continue  # a key type paramiko cannot use: it can neither grant nor be offered
        if marker == "@revoked":
            revoked.setdefault(_key_id(entry.key), lineno)
        else:
            trusted.extend((name, entry.key) for name in entry.hostnames)
    # A revoked key is dropped from every host, so offering it is refused like any unknown key.
    kept = tuple((name, key) for name, key in trusted if _key_id(key) not in revoked)
    return _KnownHosts(path, kept, revoked, tuple(ca_lines))


def known_hosts_problem(target: SshTarget) -> str | None:
    """Why this driver could not verify ``target``'s host key from its known_hosts file, or None.

    The file is read as a connection reads it: a line that does not parse is named, and the host
    (``address``, or ``[address]:port`` off port 22) must have a key there, else every connection is
    refused. For ``hostmaint inventory check``; nothing is contacted.
    """
    try:
        known = _load_known_hosts(target.known_hosts, target.address)
    except HostKeyError as exc:
        return str(exc).removeprefix(f"{target.address}: ")
    keys = paramiko.HostKeys()
    known.fill(keys)
    label = _host_label(target)
    if keys.lookup(label) is None:
        return (f"{target.known_hosts} has no key for {label}, so every connection would be refused: add the "
                f"host's key, verified out of band{known.ca_hint()}")
    return None


class _UnknownHostKey(paramiko.SSHException):
    def __init__(self, hostname: str, key: paramiko.PKey) -> None:
        self.hostname = hostname
        self.key = key
        super().__init__(f"{hostname} not in known_hosts")


class _RejectUnknown(paramiko.RejectPolicy):
    """RejectPolicy that keeps the offered key, so the error can name its fingerprint."""

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> NoReturn:
        raise _UnknownHostKey(hostname, key)


def _host_key_error(exc: paramiko.BadHostKeyException | _UnknownHostKey, known: _KnownHosts, label: str,
                    host: str) -> HostKeyError:
    """Why the offered host key was refused: revoked, changed, or unknown."""
    offered = f"{exc.key.get_name()} {fingerprint(exc.key)}"
    revoked = known.revoked_line(exc.key)
    if revoked is not None:
        return HostKeyError(f"host key for {label} is REVOKED: offered {offered}, marked @revoked in "
                            f"{known.path} line {revoked}; refusing to connect", host)
    if isinstance(exc, paramiko.BadHostKeyException):
        return HostKeyError(
            f"host key for {label} CHANGED: offered {offered}, {known.path} has {fingerprint(exc.expected_key)}; "
            "refusing to connect (if the host was reinstalled, verify the new key out of band and update "
            "known_hosts)", host)
    return HostKeyError(
        f"host key for {label} is not in {known.path}: offered {offered}; refusing to connect "
        f"(verify it out of band and add it to known_hosts){known.ca_hint()}", host)


class _Retry(Exception):
    """A transient failure before the command ran: safe to try again."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


@dataclass
class _Conn:
    client: paramiko.SSHClient

    def alive(self) -> bool:
        transport = self.client.get_transport()
        return transport is not None and transport.is_active()


class SshShell:
    """``HostShell`` over SSH: one reused connection per host, strict host keys, argv only.

    ``targets`` maps host name → ``SshTarget`` (from the inventory). ``key_loader`` resolves a
    ``secret_block`` key source to the key text (the Prefect layer passes one reading the Secret
    block; the core never imports Prefect). Connecting is retried ``retries`` times with
    exponential backoff from ``backoff_s``; ``sleep`` and ``clock`` are injectable.
    """

    def __init__(self, targets: Mapping[str, SshTarget], *, key_loader: KeyLoader | None = None,
                 retries: int = 4, backoff_s: float = 0.5, max_backoff_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 keepalive_s: int = 15) -> None:
        self.targets = dict(targets)
        self._key_loader = key_loader
        self._retries = max(1, retries)
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._clock = clock
        self._sleep = sleep
        self._keepalive_s = keepalive_s
        self._conns: dict[str, _Conn] = {}
        self._locks: dict[str, threading.RLock] = {}
        self._locks_guard = threading.Lock()
        self._keys: dict[str, paramiko.PKey] = {}  # parsed secret-block keys, by block name

    @classmethod
    def from_inventory(cls, inv: Inventory, cluster: str | None = None, **kwargs: Any) -> SshShell:
        """A shell for every host of the inventory (or of one cluster)."""
        hosts = inv.hosts_of(cluster) if cluster is not None else inv.hosts
        return cls({h.name: h.ssh for h in hosts}, **kwargs)

    # --- HostShell -------------------------------------------------------------------

    def run(self, host: str, argv: Sequence[str], timeout: float = 60.0) -> CommandResult:
        """Run ``argv`` on ``host``; see the module docstring for what is raised when."""
        target = self._target(host)
        if not argv:
            raise ValueError("empty argv")
        words = list(argv)
        if target.sudo and target.user != "root":
            words = ["sudo", "-n", "--", *words]
        command = shlex.join(words)
        channel = self._open_channel(host, target, min(timeout, target.connect_timeout_s))
        start = self._clock()  # the timeout is the command's own; connecting has its own budget
        log.debug("%s: run %s (timeout %gs)", visible(host), command_line(words), timeout)
        try:
            channel.exec_command(command)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            self._drop(host, channel.get_transport())
            raise TransientDriverError(f"connection lost starting {words[0]}: {type(exc).__name__}",
                                       host) from exc
        try:
            out, err, code = self._collect(host, channel, start, timeout)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            # a read or select on the channel failed under us: the connection is gone, the command may have run
            self._drop(host, channel.get_transport())
            raise TransientDriverError(f"connection lost while the command ran (it may have run): "
                                       f"{type(exc).__name__}", host) from exc
        finally:
            self._close_channel(host, channel)
        seconds = self._clock() - start
        log.debug("%s: %s exited %d in %.2fs", visible(host), masked(words[0]), code, seconds)
        return CommandResult(host=host, argv=tuple(argv), exit_code=code, stdout=out, stderr=err,
                             seconds=round(seconds, 3))

    def close(self) -> None:
        """Drop every connection."""
        for host in list(self._conns):
            self._drop(host)

    def disconnect(self, host: str) -> None:
        """Drop the connection to one host (the next command reconnects)."""
        self._drop(host)

    # --- connections -------------------------------------------------------------------

    def _target(self, host: str) -> SshTarget:
        try:
            return self.targets[host]
        except KeyError:
            raise DriverError("no SSH target for this host in the inventory", host) from None

    def _lock(self, host: str) -> threading.RLock:
        with self._locks_guard:
            return self._locks.setdefault(host, threading.RLock())

    def _drop(self, host: str, transport: paramiko.Transport | None = None) -> None:
        """Close the host's connection; with ``transport``, only if it is still that one (not a newer)."""
        with self._lock(host):
            conn = self._conns.get(host)
            if conn is None or (transport is not None and conn.client.get_transport() is not transport):
                return
            del self._conns[host]
        conn.client.close()

    def _open_channel(self, host: str, target: SshTarget, timeout: float) -> paramiko.Channel:
        """A session channel on the host's connection, (re)connecting with retries as needed."""
        retrying = Retrying(
            stop=stop_after_attempt(self._retries),
            wait=wait_exponential(multiplier=self._backoff_s, max=self._max_backoff_s),
            retry=retry_if_exception_type(_Retry),
            sleep=self._sleep,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    conn = self._connection(host, target)
                    try:
                        transport = conn.client.get_transport()
                        if transport is None:
                            raise _Retry("no transport")
                        return transport.open_session(timeout=timeout)
                    except (paramiko.SSHException, EOFError, OSError) as exc:
                        # the reused connection died under us: the command has not run, try afresh
                        self._drop(host, transport)
                        raise _Retry(f"opening a channel failed: {type(exc).__name__}: {exc}") from exc
        except _Retry as exc:
            raise TransientDriverError(f"unreachable after {self._retries} attempt(s): {exc}", host) from exc
        raise AssertionError("unreachable")  # Retrying either returns or re-raises

    def _connection(self, host: str, target: SshTarget) -> _Conn:
        with self._lock(host):
            conn = self._conns.get(host)
            if conn is not None and conn.alive():
                return conn
            if conn is not None:
                self._drop(host)  # dead: close it before replacing it
            conn = _Conn(self._connect(host, target))
            self._conns[host] = conn
            return conn

    def _connect(self, host: str, target: SshTarget) -> paramiko.SSHClient:
        known = _load_known_hosts(target.known_hosts, host)
        client = paramiko.SSHClient()
        # the table is filled in place (not load_host_keys), so paramiko never writes the file back
        known.fill(client.get_host_keys())
        client.set_missing_host_key_policy(_RejectUnknown())
        auth: dict[str, Any] = {"allow_agent": False, "look_for_keys": False}
        if target.key.agent:
            _require_agent_keys(host)
            auth["allow_agent"] = True
        elif target.key.file is not None:
            auth["pkey"] = self._file_key(host, target.key.file)
        else:
            auth["pkey"] = self._secret_key(host, target.key.secret_block or "")
        label = _host_label(target)
        try:
            client.connect(target.address, port=target.port, username=target.user,
                           timeout=target.connect_timeout_s, banner_timeout=target.connect_timeout_s,
                           auth_timeout=target.connect_timeout_s, **auth)
        except (paramiko.BadHostKeyException, _UnknownHostKey) as exc:
            client.close()
            raise _host_key_error(exc, known, label, host) from None
        except paramiko.AuthenticationException as exc:
            client.close()
            raise DriverError(f"authentication as {target.user}@{label} failed with the key from "
                              f"{self._key_source(target)}: {exc}", host) from None
        except (paramiko.SSHException, EOFError, OSError) as exc:
            # NoValidConnectionsError (refused), socket.timeout, a banner that never came, a reset
            client.close()
            raise _Retry(f"connect to {label}: {type(exc).__name__}: {exc}") from exc
        except ValueError as exc:
            # an address the resolver cannot even encode (an IDNA label over 63 characters, a NUL byte)
            # or a malformed value met in the handshake: no retry changes either
            client.close()
            raise DriverError(f"connect to {label} failed: {type(exc).__name__}: {exc}", host) from exc
        transport = client.get_transport()
        if transport is not None and self._keepalive_s:
            transport.set_keepalive(self._keepalive_s)
        log.debug("%s: connected to %s as %s", visible(host), visible(label), visible(target.user))
        return client

    @staticmethod
    def _key_source(target: SshTarget) -> str:
        if target.key.agent:
            return "ssh-agent"
        if target.key.file is not None:
            return f"file {target.key.file}"
        return f"secret block {target.key.secret_block}"

    def _secret_key(self, host: str, block: str) -> paramiko.PKey:
        cached = self._keys.get(block)
        if cached is not None:
            return cached
        if self._key_loader is None:
            raise DriverError(f"the SSH key is in secret block {block!r} but no key loader was given", host)
        failure = ""
        text = ""
        try:
            text = self._key_loader(block)
        except Exception as exc:
            # Whatever the injected loader raises, only its type is kept, and the error is raised outside
            # this block so it carries no __context__: the loader's message might quote the secret.
            failure = type(exc).__name__
        if failure:
            raise DriverError(f"could not load the SSH key from secret block {block!r}: {failure}", host)
        key = _parse_key(text, f"secret block {block!r}", host)
        self._keys[block] = key
        return key

    @staticmethod
    def _file_key(host: str, path: str) -> paramiko.PKey:
        """The key file, read at each connect (it may be rotated); a bad file is an error, not retried."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise DriverError(f"cannot read SSH key file {path}: {exc.strerror}", host) from None
        text = data.decode("utf-8", errors="replace")
        # A key file is ASCII; undecodable bytes are replaced rather than raised, since a
        # UnicodeDecodeError would carry the file's bytes (key material) in it: the key parser then
        # refuses the text like any other damaged key.
        return _parse_key(text, f"key file {path}", host)

    # --- reading a command's output -----------------------------------------------------

    def _collect(self, host: str, channel: paramiko.Channel, start: float,
                 timeout: float) -> tuple[str, str, int]:
        """Read stdout/stderr until the command ends; the exit code is -1 when it died by a signal."""
        out, err = bytearray(), bytearray()
        deadline = start + timeout
        while True:
            while channel.recv_ready():
                out += channel.recv(_READ_CHUNK)
            while channel.recv_stderr_ready():
                err += channel.recv_stderr(_READ_CHUNK)
            if len(out) + len(err) > _MAX_OUTPUT:
                self._drop(host, channel.get_transport())
                raise CommandError(f"output exceeded {_MAX_OUTPUT // (1024 * 1024)} MiB", host)
            finished = channel.exit_status_ready() and (channel.eof_received or channel.closed)
            if finished and not channel.recv_ready() and not channel.recv_stderr_ready():
                break
            if channel.closed:
                continue  # closed with data still buffered: drain it first
            now = self._clock()
            if now >= deadline:
                # The host may have vanished without a FIN, leaving a half-dead connection: keep it
                # only if it still answers, so commands of other threads on it are not cut off.
                if not self._answers(channel):
                    self._drop(host, channel.get_transport())
                raise CommandError(f"timed out after {timeout:g}s", host)
            select.select([channel], [], [], min(0.2, deadline - now))
        code = channel.exit_status
        if code == -1 and not self._transport_alive(channel):
            # no exit status and the connection is gone: lost, not finished (it may have run)
            self._drop(host, channel.get_transport())
            raise TransientDriverError("connection lost while the command ran (it may have run)", host)
        return out.decode("utf-8", errors="replace"), err.decode("utf-8", errors="replace"), code

    def _close_channel(self, host: str, channel: paramiko.Channel) -> None:
        """Close a finished channel. Failing to, the connection under it is broken: drop it so the
        next command reconnects. The command's outcome is already known (or already raised), so a
        close failure must not replace it."""
        try:
            channel.close()
        except (paramiko.SSHException, EOFError, OSError) as exc:
            log.debug("%s: closing a channel failed (%s); dropping the connection", visible(host),
                      type(exc).__name__)
            self._drop(host, channel.get_transport())

    @staticmethod
    def _answers(channel: paramiko.Channel, timeout: float = 3.0) -> bool:
        """Does the connection under ``channel`` still answer (a new channel opens)?"""
        transport = channel.get_transport()
        if transport is None or not transport.is_active():
            return False
        try:
            transport.open_session(timeout=timeout).close()
        except (paramiko.SSHException, EOFError, OSError):
            return False
        return True

    @staticmethod
    def _transport_alive(channel: paramiko.Channel) -> bool:
        transport = channel.get_transport()
        return transport is not None and transport.is_active()


