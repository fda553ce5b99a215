"""The SSH driver against a REAL OpenSSH server on 127.0.0.1 (started by hostmaint.lab.sshd).

Key auth, strict host keys (wrong and unknown keys refused, with the offered fingerprint),
exit codes and output, timeouts, retried connects, one reused connection, argv quoting
(shell syntax arrives as literal text, nothing runs), and no key material in logs or errors.
"""

from __future__ import annotations

import base64
import logging
import os
import random
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hostmaint.drivers.ssh import SshShell
from hostmaint.errors import CommandError, DriverError, HostKeyError, TransientDriverError
from hostmaint.inventory import SshKey, SshTarget, parse_inventory
from hostmaint.lab.sshd import SshdHandle, authorize, make_keypair, start_sshd, write_known_hosts

pytestmark = pytest.mark.skipif(
    not (Path("/usr/sbin/sshd").exists() and shutil.which("ssh-keygen") and os.geteuid() == 0),
    reason="needs OpenSSH's sshd and root (the server runs as root on loopback)",
)


@dataclass
class Lab:
    tmp: Path
    key: Path
    pub: Path
    authorized: Path
    sshd: SshdHandle
    known_hosts: Path

    def target(self, **changes: object) -> SshTarget:
        base: dict[str, object] = {"address": "127.0.0.1", "port": self.sshd.port, "key": SshKey(file=str(self.key)),
                                   "known_hosts": str(self.known_hosts), "connect_timeout_s": 5.0}
        base.update(changes)
        return SshTarget(**base)  # type: ignore[arg-type]

    def shell(self, **kwargs: object) -> SshShell:
        kwargs.setdefault("sleep", lambda s: None)  # retries without real waiting unless a test wants them
        return SshShell({"hv1": self.target()}, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    tmp = tmp_path_factory.mktemp("ssh")
    key, pub = make_keypair(tmp / "client")
    authorized = authorize(tmp / "authorized_keys", [pub])
    sshd = start_sshd(tmp / "server", authorized_keys=authorized)
    known = write_known_hosts(tmp / "known_hosts", [sshd])
    yield Lab(tmp, key, pub, authorized, sshd, known)
    sshd.stop()


def server_fingerprint(lab: Lab) -> str:
    out = subprocess.run(["ssh-keygen", "-lf", str(lab.tmp / "server" / "ssh_host_ed25519_key.pub")],
                         capture_output=True, text=True, check=True).stdout
    return out.split()[1]


def accepted_logins(sshd: SshdHandle) -> int:
    return sshd.log_path.read_text().count("Accepted publickey")


# --- basics ---------------------------------------------------------------------------------------


def test_key_auth_and_exit_code_stdout_stderr_come_back(lab: Lab) -> None:
    shell = lab.shell()
    try:
        res = shell.run("hv1", ["sh", "-c", "echo to-out; echo to-err >&2; exit 3"])
        assert (res.exit_code, res.stdout, res.stderr) == (3, "to-out\n", "to-err\n")
        assert res.argv == ("sh", "-c", "echo to-out; echo to-err >&2; exit 3") and res.host == "hv1"
        assert shell.run("hv1", ["id", "-u"]).stdout == "0\n"
        big = shell.run("hv1", ["head", "-c", "300000", "/dev/zero"])
        assert len(big.stdout) == 300000 and big.exit_code == 0
    finally:
        shell.close()


def test_one_connection_is_reused_across_commands(lab: Lab) -> None:
    shell = lab.shell()
    before = accepted_logins(lab.sshd)
    try:
        for _ in range(4):
            assert shell.run("hv1", ["true"]).exit_code == 0
    finally:
        shell.close()
    assert accepted_logins(lab.sshd) - before == 1


def test_timeout_fires_and_the_shell_recovers(lab: Lab) -> None:
    shell = lab.shell()
    try:
        with pytest.raises(CommandError, match=r"hv1: timed out after 0\.5s"):
            shell.run("hv1", ["sleep", "30"], timeout=0.5)
        assert shell.run("hv1", ["echo", "still here"]).stdout == "still here\n"
    finally:
        shell.close()


def test_a_command_killed_by_a_signal_is_a_result_not_a_lost_connection(lab: Lab) -> None:
    shell = lab.shell()
    try:
        res = shell.run("hv1", ["sh", "-c", "kill -9 $$"])
        assert res.exit_code == -1
    finally:
        shell.close()


def test_from_inventory_builds_targets_for_a_cluster(lab: Lab) -> None:
    def host(name: str, cluster: str, address: str) -> dict[str, object]:
        return {"name": name, "cluster": cluster, "libvirt_uri": "qemu:///system",
                "ssh": {"address": address, "port": lab.sshd.port, "key": {"file": str(lab.key)},
                        "known_hosts": str(lab.known_hosts)}}
    inv = parse_inventory({"clusters": [{"name": "a"}, {"name": "b"}],
                           "hosts": [host("hv1", "a", "127.0.0.1"), host("hv2", "b", "127.0.0.2")]})
    shell = SshShell.from_inventory(inv, cluster="a")
    try:
        assert set(shell.targets) == {"hv1"}
        assert shell.run("hv1", ["true"]).exit_code == 0
        with pytest.raises(DriverError, match="no SSH target"):
            shell.run("hv2", ["true"])
    finally:
        shell.close()


# --- host keys -----------------------------------------------------------------------------------


def test_changed_host_key_is_refused_with_fingerprint_and_not_retried(lab: Lab, tmp_path: Path) -> None:
    _, other_pub = make_keypair(tmp_path / "other", "host_key")
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[127.0.0.1]:{lab.sshd.port} {' '.join(other_pub.read_text().split()[:2])}\n")
    sleeps: list[float] = []
    shell = SshShell({"hv1": lab.target(known_hosts=str(wrong))}, sleep=sleeps.append)
    with pytest.raises(HostKeyError) as err:
        shell.run("hv1", ["touch", str(tmp_path / "ran")])
    text = str(err.value)
    assert text.startswith("hv1: host key for [127.0.0.1]:") and "CHANGED" in text
    assert server_fingerprint(lab) in text and "SHA256:" in text
    assert sleeps == []  # never retried
    assert not (tmp_path / "ran").exists()


def test_unknown_host_is_refused_with_the_offered_fingerprint(lab: Lab, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text(f"[127.0.0.1]:1 {lab.sshd.host_key_pub}\n")  # right key, other port: still unknown
    sleeps: list[float] = []
    shell = SshShell({"hv1": lab.target(known_hosts=str(empty))}, sleep=sleeps.append)
    with pytest.raises(HostKeyError) as err:
        shell.run("hv1", ["true"])
    assert f"is not in {empty}" in str(err.value) and server_fingerprint(lab) in str(err.value)
    assert "ssh-ed25519" in str(err.value)
    assert sleeps == []


def test_missing_known_hosts_file_is_a_host_key_error(lab: Lab, tmp_path: Path) -> None:
    shell = SshShell({"hv1": lab.target(known_hosts=str(tmp_path / "nope"))})
    with pytest.raises(HostKeyError, match="cannot be read"):
        shell.run("hv1", ["true"])


def known_hosts_with(lab: Lab, tmp_path: Path, *lines: str) -> SshShell:
    """A shell whose known_hosts holds exactly ``lines``; ``sleeps`` records any retry."""
    path = tmp_path / "known_hosts"
    path.write_text("".join(f"{line}\n" for line in lines))
    return SshShell({"hv1": lab.target(known_hosts=str(path))}, sleep=lambda s: pytest.fail("retried"))


@pytest.mark.parametrize(("bad_line", "expected"), [
    ("127.0.0.1 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI!!!notbase64", "the ssh-ed25519 key is not valid base64"),
    ("127.0.0.1 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAA2FiYw==", "the ssh-ed25519 key does not decode"),
    ("127.0.0.1 ssh-ed25519", "not a known_hosts entry"),
    ("@marker-from-the-future 127.0.0.1 ssh-ed25519 AAAA", "unknown marker '@marker-from-the-future'"),
])
def test_a_known_hosts_line_that_does_not_parse_is_a_host_key_error_naming_file_and_line(
        lab: Lab, tmp_path: Path, bad_line: str, expected: str) -> None:
    # The host's own (good) key is on line 1: a corrupt line elsewhere still refuses, since it may be
    # the line an operator meant for this host, and nothing on the host runs.
    shell = known_hosts_with(lab, tmp_path, lab.sshd.known_hosts_line(), "# a comment", bad_line)
    with pytest.raises(HostKeyError) as err:
        shell.run("hv1", ["touch", str(tmp_path / "ran")])
    assert str(err.value).startswith(f"hv1: {tmp_path / 'known_hosts'} line 3: {expected}")
    assert "fix or remove the line" in str(err.value)
    assert not (tmp_path / "ran").exists()


def test_cert_authority_lines_grant_nothing_and_the_hosts_own_key_is_still_required(
        lab: Lab, tmp_path: Path) -> None:
    ca_line = f"@cert-authority * {lab.sshd.host_key_pub}"  # even the server's own key, as a CA, lets nobody in
    shell = known_hosts_with(lab, tmp_path, ca_line)
    with pytest.raises(HostKeyError) as err:
        shell.run("hv1", ["touch", str(tmp_path / "ran")])
    text = str(err.value)
    assert f"is not in {tmp_path / 'known_hosts'}" in text and server_fingerprint(lab) in text
    assert "line(s) 1 are @cert-authority lines" in text and "add the host's own key" in text
    assert not (tmp_path / "ran").exists()

    shell = known_hosts_with(lab, tmp_path, ca_line, lab.sshd.known_hosts_line())
    try:
        assert shell.run("hv1", ["echo", "in"]).stdout == "in\n"
    finally:
        shell.close()


def test_a_revoked_host_key_is_refused_even_when_a_line_trusts_it(lab: Lab, tmp_path: Path) -> None:
    # OpenSSH: "@revoked ... must not ever be accepted"; the revoked line's host pattern does not matter.
    shell = known_hosts_with(lab, tmp_path, lab.sshd.known_hosts_line(), f"@revoked old-name {lab.sshd.host_key_pub}")
    with pytest.raises(HostKeyError) as err:
        shell.run("hv1", ["touch", str(tmp_path / "ran")])
    text = str(err.value)
    assert "REVOKED" in text and f"{tmp_path / 'known_hosts'} line 2" in text and server_fingerprint(lab) in text
    assert not (tmp_path / "ran").exists()
    # a revoked key of another host changes nothing for this one
    _, other_pub = make_keypair(tmp_path / "other", "host_key")
    shell = known_hosts_with(lab, tmp_path, f"@revoked * {' '.join(other_pub.read_text().split()[:2])}",
                             lab.sshd.known_hosts_line())
    try:
        assert shell.run("hv1", ["true"]).exit_code == 0
    finally:
        shell.close()


def test_unauthorized_key_is_an_error_not_retried(lab: Lab, tmp_path: Path) -> None:
    stranger, _ = make_keypair(tmp_path / "stranger")
    sleeps: list[float] = []
    shell = SshShell({"hv1": lab.target(key=SshKey(file=str(stranger)))}, sleep=sleeps.append)
    with pytest.raises(DriverError, match="authentication as root@") as err:
        shell.run("hv1", ["true"])
    assert not isinstance(err.value, TransientDriverError)
    assert sleeps == []


def test_an_address_the_resolver_cannot_encode_is_an_error_not_retried(lab: Lab) -> None:
    # socket.getaddrinfo raises UnicodeError (a ValueError) for a label over 63 characters
    address = "a" * 70 + ".example"
    shell = SshShell({"hv1": lab.target(address=address)}, sleep=lambda s: pytest.fail("retried"))
    with pytest.raises(DriverError, match=rf"hv1: connect to \[{address}\]:\d+ failed: UnicodeError") as err:
        shell.run("hv1", ["true"])
    assert not isinstance(err.value, TransientDriverError)


# --- transient failures ------------------------------------------------------------------------------


def test_connect_refused_then_sshd_comes_up_is_retried(lab: Lab, tmp_path: Path) -> None:
    # The first connect is refused; tenacity's backoff sleep brings the server up; the retry succeeds.
    first = start_sshd(tmp_path / "late", authorized_keys=lab.authorized)
    port = first.port
    first.stop()
    known = write_known_hosts(tmp_path / "known_hosts", [first])
    servers: list[SshdHandle] = []

    def sleep(seconds: float) -> None:
        if not servers:
            servers.append(start_sshd(tmp_path / "late", authorized_keys=lab.authorized, port=port))

    shell = SshShell({"hv1": lab.target(port=port, known_hosts=str(known))}, sleep=sleep, retries=3)
    try:
        assert shell.run("hv1", ["echo", "up"]).stdout == "up\n"
        assert len(servers) == 1
    finally:
        shell.close()
        for s in servers:
            s.stop()


def test_unreachable_after_all_retries_is_transient(lab: Lab, tmp_path: Path) -> None:
    gone = start_sshd(tmp_path / "gone", authorized_keys=lab.authorized)
    gone.stop()
    sleeps: list[float] = []
    shell = SshShell({"hv1": lab.target(port=gone.port)}, sleep=sleeps.append, retries=3, backoff_s=0.5)
    with pytest.raises(TransientDriverError, match="unreachable after 3 attempt"):
        shell.run("hv1", ["true"])
    assert len(sleeps) == 2 and sleeps[0] < sleeps[1]  # exponential backoff between the three attempts


def test_server_restart_drops_the_connection_and_the_next_command_reconnects(lab: Lab, tmp_path: Path) -> None:
    server = start_sshd(tmp_path / "restart", authorized_keys=lab.authorized)
    known = write_known_hosts(tmp_path / "known_hosts", [server])
    shell = SshShell({"hv1": lab.target(port=server.port, known_hosts=str(known))}, sleep=lambda s: None)
    try:
        assert shell.run("hv1", ["true"]).exit_code == 0
        server.stop()  # kills the open session too, like a reboot
        with pytest.raises(TransientDriverError):
            shell.run("hv1", ["true"])
        server = start_sshd(tmp_path / "restart", authorized_keys=lab.authorized, port=server.port)
        assert shell.run("hv1", ["echo", "back"]).stdout == "back\n"
    finally:
        shell.close()
        server.stop()


def test_connection_lost_while_the_command_runs_is_transient(lab: Lab, tmp_path: Path) -> None:
    server = start_sshd(tmp_path / "drop", authorized_keys=lab.authorized)
    known = write_known_hosts(tmp_path / "known_hosts", [server])
    shell = SshShell({"hv1": lab.target(port=server.port, known_hosts=str(known))}, sleep=lambda s: None,
                     retries=1)
    stopper = threading.Timer(0.5, server.stop)  # the host goes down while the command runs
    try:
        stopper.start()
        with pytest.raises(TransientDriverError, match="connection lost while the command ran"):
            shell.run("hv1", ["sleep", "10"], timeout=20)
    finally:
        stopper.join()
        shell.close()
        server.stop()


def test_a_channel_failing_mid_read_is_transient_and_a_failing_close_does_not_hide_it(
        lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    # A socket error while reading, then another while closing: what comes out is the read's, translated.
    class BrokenChannel:
        def exec_command(self, command: str) -> None:
            pass

        def recv_ready(self) -> bool:
            raise OSError(9, "Bad file descriptor")

        def close(self) -> None:
            raise EOFError()

        def get_transport(self) -> None:
            return None

    shell = lab.shell()
    monkeypatch.setattr(shell, "_open_channel", lambda host, target, timeout: BrokenChannel())
    with pytest.raises(TransientDriverError, match="hv1: connection lost while the command ran .*OSError"):
        shell.run("hv1", ["true"])


# --- injection ----------------------------------------------------------------------------------------


def test_argv_elements_reach_the_host_as_single_literal_arguments(lab: Lab, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    nasty = [
        f"; touch {marker}",
        f"$(touch {marker})",
        f"`touch {marker}`",
        f"a b  c && touch {marker}",
        f"line1\nline2\ntouch {marker}",
        f"' ; touch {marker}; '",
        f'" ; touch {marker}; "',
        f"| touch {marker}",
        "*",
        "$HOME ${PATH} ~",
        "-n",
        "",
        "tab\there\\back",
    ]
    shell = lab.shell()
    try:
        for arg in nasty:
            res = shell.run("hv1", ["printf", "%s", arg])
            assert res.exit_code == 0 and res.stdout == arg, arg
        # and each stays exactly one argument
        res = shell.run("hv1", ["sh", "-c", 'printf "%s|" "$#"; for a; do printf "[%s]" "$a"; done', "sh", *nasty])
        assert res.stdout == f"{len(nasty)}|" + "".join(f"[{a}]" for a in nasty)
    finally:
        shell.close()
    assert not marker.exists()


# --- secrets ----------------------------------------------------------------------------------------------


def test_key_from_a_secret_block_via_the_injected_loader(lab: Lab) -> None:
    asked: list[str] = []

    def loader(block: str) -> str:
        asked.append(block)
        return lab.key.read_text()

    shell = SshShell({"hv1": lab.target(key=SshKey(secret_block="hv-ssh-key"))}, key_loader=loader)
    try:
        assert shell.run("hv1", ["echo", "ok"]).stdout == "ok\n"
        shell.disconnect("hv1")
        assert shell.run("hv1", ["echo", "ok"]).stdout == "ok\n"
        assert asked == ["hv-ssh-key"]  # parsed once, kept as a key object
    finally:
        shell.close()


def test_no_key_material_in_logs_or_errors(lab: Lab, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    secret = lab.key.read_text()
    body = [ln for ln in secret.splitlines() if ln and not ln.startswith("-----")]
    assert body and all(len(ln) > 20 for ln in body[:-1])

    def leaky_loader(block: str) -> str:
        raise RuntimeError(f"vault said no, here is the key anyway: {secret}")

    texts: list[str] = []
    caplog.set_level(logging.DEBUG, logger="paramiko")
    caplog.set_level(logging.DEBUG, logger="hostmaint")
    good = SshShell({"hv1": lab.target(key=SshKey(secret_block="blk"))}, key_loader=lambda b: secret)
    try:
        texts.append(repr(good.run("hv1", ["echo", "hello"])))
        with pytest.raises(CommandError) as err:
            good.run("hv1", ["sleep", "5"], timeout=0.3)
        texts.append(str(err.value))
    finally:
        good.close()
    _, other_pub = make_keypair(tmp_path / "other", "hk")
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[127.0.0.1]:{lab.sshd.port} {' '.join(other_pub.read_text().split()[:2])}\n")
    failures: list[tuple[SshShell, type[Exception]]] = [
        (SshShell({"hv1": lab.target(key=SshKey(secret_block="blk"))}, key_loader=leaky_loader), DriverError),
        (SshShell({"hv1": lab.target(key=SshKey(secret_block="blk"))}, key_loader=lambda b: "garbage"),
         DriverError),
        (SshShell({"hv1": lab.target(key=SshKey(secret_block="blk"), known_hosts=str(wrong))},
                  key_loader=lambda b: secret), HostKeyError),
    ]
    for shell, kind in failures:
        with pytest.raises(kind) as err:
            shell.run("hv1", ["true"])
        texts.append(str(err.value))
        texts.append(repr(err.value.__cause__) + repr(err.value.__context__))
        shell.close()
    assert "vault said no" not in " ".join(texts)  # the loader's message is dropped, only its type kept
    texts.extend(r.getMessage() for r in caplog.records)
    texts.extend(str(r.exc_info[1]) for r in caplog.records if r.exc_info)
    assert any("connected to" in t for t in texts)  # the debug log was really captured
    joined = "\n".join(texts)
    for line in body:
        assert line not in joined
    assert secret not in joined


# --- agent, threads, a reboot seen through a real connection ---------------------------------------------


def test_key_from_ssh_agent(lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if sock.exists():
                break
            threading.Event().wait(0.02)
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        subprocess.run(["ssh-add", "-q", str(lab.key)], env=env, check=True, capture_output=True)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        shell = SshShell({"hv1": lab.target(key=SshKey(agent=True))})
        try:
            assert shell.run("hv1", ["echo", "via agent"]).stdout == "via agent\n"
        finally:
            shell.close()
    finally:
        agent.terminate()
        agent.wait(timeout=5)


def test_parallel_commands_share_one_connection(lab: Lab) -> None:
    shell = lab.shell()
    before = accepted_logins(lab.sshd)
    results: list[str] = []
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results.append(shell.run("hv1", ["sh", "-c", f"sleep 0.2; echo {i}"]).stdout.strip())
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    finally:
        shell.close()
    assert errors == []
    assert sorted(results) == [str(i) for i in range(6)]
    assert accepted_logins(lab.sshd) - before == 1


def test_reboot_and_wait_through_a_real_connection_drop(lab: Lab, tmp_path: Path) -> None:
    """``reboot`` drops the session, the server is gone a moment, then back with a new boot id."""
    from hostmaint import patching
    from hostmaint.inventory import HostPolicy

    bindir, boot = tmp_path / "bin", tmp_path / "boot_id"
    bindir.mkdir()
    boot.write_text("11111111-1111-1111-1111-111111111111\n")
    requested = tmp_path / "reboot-requested"
    (bindir / "cat").write_text(f'#!/bin/sh\n[ "$1" = /proc/sys/kernel/random/boot_id ] && exec /bin/cat {boot}\n'
                                'exec /bin/cat "$@"\n')
    (bindir / "reboot").write_text(f"#!/bin/sh\ntouch {requested}\nsleep 30\n")  # killed by the "shutdown"
    for w in bindir.iterdir():
        w.chmod(0o755)
    env = {"PATH": f"{bindir}:/usr/sbin:/usr/bin:/sbin:/bin"}
    servers = [start_sshd(tmp_path / "srv", authorized_keys=lab.authorized, extra_env=env)]
    port = servers[0].port
    known = write_known_hosts(tmp_path / "known_hosts", servers)

    def host_side() -> None:
        for _ in range(500):
            if requested.exists():
                break
            threading.Event().wait(0.02)
        servers[0].stop()  # down: sessions and listener gone
        boot.write_text("22222222-2222-2222-2222-222222222222\n")
        threading.Event().wait(1.0)
        servers.append(start_sshd(tmp_path / "srv", authorized_keys=lab.authorized, extra_env=env, port=port))

    shell = SshShell({"hv1": lab.target(port=port, known_hosts=str(known))}, retries=2, backoff_s=0.1)
    machine = threading.Thread(target=host_side)
    machine.start()
    try:
        result = patching.reboot_and_wait(shell, "hv1", HostPolicy(reboot_timeout_s=60), poll_s=0.2)
    finally:
        machine.join(timeout=30)
        shell.close()
        for s in servers:
            s.stop()
    assert result.old_boot_id == "11111111-1111-1111-1111-111111111111"
    assert result.new_boot_id == "22222222-2222-2222-2222-222222222222"
    assert result.down_after_s is not None and result.back_after_s >= 1.0


def test_a_timeout_does_not_cut_off_other_commands_on_the_same_connection(lab: Lab) -> None:
    shell = lab.shell()
    before = accepted_logins(lab.sshd)
    other: list[str] = []
    try:
        shell.run("hv1", ["true"])
        worker = threading.Thread(target=lambda: other.append(
            shell.run("hv1", ["sh", "-c", "sleep 1.5; echo done"], timeout=20).stdout))
        worker.start()
        with pytest.raises(CommandError, match="timed out"):
            shell.run("hv1", ["sleep", "10"], timeout=0.3)
        worker.join(timeout=30)
    finally:
        shell.close()
    assert other == ["done\n"]
    assert accepted_logins(lab.sshd) - before == 1  # the live connection was kept


@pytest.mark.parametrize("kind", ["rsa", "ecdsa"])
def test_rsa_and_ecdsa_key_files_work(lab: Lab, tmp_path: Path, kind: str) -> None:
    key = tmp_path / f"id_{kind}"
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(key)], check=True)
    authorized = authorize(tmp_path / "ak", [Path(f"{key}.pub")])
    server = start_sshd(tmp_path / "srv", authorized_keys=authorized)
    known = write_known_hosts(tmp_path / "known_hosts", [server])
    shell = SshShell({"hv1": lab.target(port=server.port, known_hosts=str(known), key=SshKey(file=str(key)))})
    try:
        assert shell.run("hv1", ["echo", kind]).stdout == f"{kind}\n"
    finally:
        shell.close()
        server.stop()


def test_agent_without_keys_is_an_error_not_retried(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    sleeps: list[float] = []
    shell = SshShell({"hv1": lab.target(key=SshKey(agent=True))}, sleep=sleeps.append)
    with pytest.raises(DriverError, match="no agent with keys") as err:
        shell.run("hv1", ["true"])
    assert not isinstance(err.value, TransientDriverError) and sleeps == []


def test_bad_key_files_are_errors_not_retried(lab: Lab, tmp_path: Path) -> None:
    encrypted = tmp_path / "id_enc"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "a passphrase", "-f", str(encrypted)], check=True)
    cases = [(str(tmp_path / "missing"), "cannot read SSH key file"),
             (str(lab.pub), "does not hold an unencrypted"),
             (str(encrypted), "use ssh-agent for a key with a passphrase")]
    for path, expected in cases:
        sleeps: list[float] = []
        shell = SshShell({"hv1": lab.target(key=SshKey(file=path))}, sleep=sleeps.append)
        with pytest.raises(DriverError, match=expected) as err:
            shell.run("hv1", ["true"])
        assert not isinstance(err.value, TransientDriverError) and sleeps == []


def test_a_damaged_key_file_is_a_driver_error_whatever_paramiko_raises(lab: Lab, tmp_path: Path) -> None:
    # paramiko's parsers raise IndexError or AssertionError (not SSHException) on many damaged keys:
    # every cut of a good key, some flipped bytes, and a binary file must all come out as DriverError.
    lines = lab.key.read_text().splitlines()
    blob = base64.b64decode("".join(lines[1:-1]))
    rng = random.Random(0)
    damaged = [blob[:n] for n in range(len(blob))]
    for _ in range(40):
        flipped = bytearray(blob)
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        damaged.append(bytes(flipped))
    bad = tmp_path / "id_bad"
    refused = 0
    for data in damaged:
        bad.write_text(f"{lines[0]}\n{base64.b64encode(data).decode()}\n{lines[-1]}\n")
        shell = SshShell({"hv1": lab.target(key=SshKey(file=str(bad)))}, sleep=lambda s: pytest.fail("retried"))
        try:
            shell.run("hv1", ["true"])
        except DriverError as exc:
            assert not isinstance(exc, TransientDriverError)
            assert f"key file {bad} does not hold an unencrypted" in str(exc)
            refused += 1
        else:
            shell.close()  # a flipped bit in the comment or padding can leave the key whole
    assert refused >= len(blob)  # at least every cut was refused
    bad.write_bytes(b"\xff\xfe" + blob)
    with pytest.raises(DriverError, match="does not hold an unencrypted"):
        SshShell({"hv1": lab.target(key=SshKey(file=str(bad)))}).run("hv1", ["true"])


def test_inventory_check_argv_from_yaml_reaches_the_host_literally(lab: Lab, tmp_path: Path) -> None:
    """A verify check written in the inventory, with shell syntax in an argument, runs nothing extra."""
    import yaml

    from hostmaint import patching
    from hostmaint.models import Cell, HostDiscovery

    marker = tmp_path / "pwned"
    nasty = f"x; touch {marker} $(touch {marker}) `touch {marker}`\nnext line"
    inventory = {
        "clusters": [{"name": "c", "host_policy": {"verify": [
            {"name": "literal", "argv": ["test", nasty, "=", nasty]},
            {"name": "one-arg", "argv": ["sh", "-c", 'test "$#" -eq 1 && test "$1" = "$0"', nasty, nasty]},
        ]}}],
        "hosts": [{"name": "hv1", "cluster": "c", "libvirt_uri": "qemu:///system",
                   "ssh": {"address": "127.0.0.1", "port": lab.sshd.port, "key": {"file": str(lab.key)},
                           "known_hosts": str(lab.known_hosts)}}],
    }
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(inventory))
    from hostmaint.inventory import load_inventory
    inv = load_inventory(path)

    class Hv:
        def running_vms(self, host: str) -> tuple[str, ...]:
            return ()

        def discover(self, host: str) -> HostDiscovery:
            return HostDiscovery(host=host, cells=(Cell(id=0, memory_mib=1, free_mib=1),))

    shell = SshShell.from_inventory(inv)
    try:
        report = patching.verify_host(shell, Hv(), "hv1", inv.policy_for("hv1"), cells_before=None)
    finally:
        shell.close()
    checks = {c.name: c for c in report.checks}
    assert checks["literal"].ok and checks["one-arg"].ok, report.reason()
    assert not marker.exists()
