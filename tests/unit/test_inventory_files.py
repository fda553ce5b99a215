"""``hostmaint inventory check`` checks the files an inventory names, as SSH would need them here.

A known_hosts or key file that does not exist, cannot be read, or (known_hosts) does not hold a
host's key makes SSH to that host impossible: an error (exit 2) naming the field, the hosts and the
file. ``--no-files`` checks the inventory alone. Loading the inventory for any other command does
not look at the files, as before.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paramiko
import pytest
import yaml
from typer.testing import CliRunner

from hostmaint.cli import app
from hostmaint.inventory import load_inventory

runner = CliRunner()
HOST_KEY = paramiko.ECDSAKey.generate()
OTHER_KEY = paramiko.ECDSAKey.generate()


def _line(name: str, key: paramiko.PKey = HOST_KEY) -> str:
    return f"{name} {key.get_name()} {key.get_base64()}\n"


def _site(tmp_path: Path) -> Path:
    """A valid site: three hosts (one on port 2222, one known by a hashed name), their keys, a key file."""
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "id").write_text("a key file (its content is SSH's to judge)\n")
    hashed = paramiko.HostKeys.hash_host("hv02.example")
    (tmp_path / "known_hosts").write_text("# site keys\n" + _line("hv01.example") + _line(hashed)
                                          + _line("[hv03.example]:2222"))
    doc = {"clusters": [{"name": "c"}], "hosts": [
        {"name": name, "cluster": "c", "libvirt_uri": f"qemu+tcp://{name}/system",
         "ssh": {"address": f"{name}.example", "port": port, "key": key, "known_hosts": "known_hosts"}}
        for name, port, key in (("hv01", 22, {"file": "keys/id"}), ("hv02", 22, {"agent": True}),
                                ("hv03", 2222, {"file": "keys/id"}))]}
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _check(path: Path, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["inventory", "check", *args, str(path)])
    assert "Traceback" not in result.output
    return result.exit_code, " ".join(result.output.split())


def test_a_site_whose_files_are_all_there_is_valid(tmp_path: Path) -> None:
    code, said = _check(_site(tmp_path))
    assert code == 0, said
    assert said.endswith("valid — 1 cluster(s), 3 host(s)")


def _remove(name: str) -> Callable[[Path], None]:
    return lambda site: (site / name).unlink()


def _write(name: str, text: str) -> Callable[[Path], None]:
    return lambda site: (site / name).write_text(text)


def _directory(name: str) -> Callable[[Path], None]:
    def change(site: Path) -> None:
        (site / name).unlink()
        (site / name).mkdir()
    return change


def _fifo(name: str) -> Callable[[Path], None]:
    def change(site: Path) -> None:
        (site / name).unlink()
        os.mkfifo(site / name)
    return change


CASES: list[tuple[str, Callable[[Path], None], list[str]]] = [
    ("known_hosts missing", _remove("known_hosts"),
     ["hosts[0].ssh.known_hosts (hosts hv01, hv02, hv03): {site}/known_hosts does not exist: no host key can be "
      "verified, so SSH is impossible"]),
    ("key file missing", _remove("keys/id"),
     ["hosts[0].ssh.key.file (hosts hv01, hv03): {site}/keys/id does not exist: the SSH key cannot be loaded"]),
    ("known_hosts a directory", _directory("known_hosts"), ["{site}/known_hosts is a directory, not a file"]),
    ("key file a fifo (never opened: it would block)", _fifo("keys/id"), ["{site}/keys/id is not a regular file"]),
    ("a host without a key", _write("known_hosts", _line("hv01.example") + _line("[hv03.example]:2222")),
     ["hosts[1].ssh.known_hosts (host hv02): {site}/known_hosts has no key for hv02.example, so every connection "
      "would be refused"]),
    ("port 2222 needs its [host]:port entry", _write("known_hosts", _line("hv01.example") + _line("hv02.example")
                                                     + _line("hv03.example")),
     ["(host hv03): {site}/known_hosts has no key for [hv03.example]:2222"]),
    ("a line that does not parse, said once", _write("known_hosts", _line("hv01.example") + "hv02.example junk\n"),
     ["hosts[0].ssh.known_hosts (hosts hv01, hv02, hv03): {site}/known_hosts line 2: not a known_hosts entry"]),
    ("only a revoked key", _write("known_hosts", _line("hv01.example") + _line("hv02.example")
                                  + _line("[hv03.example]:2222") + "@revoked * " + _line("", HOST_KEY).lstrip()),
     ["(host hv01): {site}/known_hosts has no key for hv01.example", "(host hv03): {site}/known_hosts has no key "
      "for [hv03.example]:2222"]),
]


@pytest.mark.parametrize(("name", "change", "expected"), CASES, ids=[c[0] for c in CASES])
def test_a_file_ssh_could_not_use_is_an_error_naming_field_hosts_and_file(
        tmp_path: Path, name: str, change: Callable[[Path], None], expected: list[str]) -> None:
    path = _site(tmp_path)
    change(tmp_path)
    code, said = _check(path)
    assert code == 2, said
    assert said.startswith(f"error: {path}")
    for part in expected:
        assert part.format(site=tmp_path) in said, (part, said)
    # the inventory alone is still valid, and loading it for other commands does not look at the files
    assert _check(path, "--no-files")[0] == 0
    assert [h.name for h in load_inventory(path).hosts] == ["hv01", "hv02", "hv03"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_key_file_is_named(tmp_path: Path) -> None:
    path = _site(tmp_path)
    (tmp_path / "keys" / "id").chmod(0)
    code, said = _check(path)
    assert code == 2 and f"{tmp_path}/keys/id cannot be read: Permission denied" in said


def test_a_simulated_fleet_needs_its_state_file_not_host_keys(tmp_path: Path) -> None:
    from hostmaint.simulated_fleet import demo_packages, demo_snapshot, write_simulated_fleet

    snap = demo_snapshot(4, 12)
    path = write_simulated_fleet(tmp_path, snap, demo_packages(snap))
    assert _check(path)[0] == 0  # its known_hosts holds no keys: nothing is contacted
    (tmp_path / "fleet-state.json").unlink()
    code, said = _check(path)
    assert code == 2 and f"simulation.state_file: {tmp_path}/fleet-state.json does not exist" in said


def test_the_lab_inventory_shape_is_valid(tmp_path: Path) -> None:
    """The lab writes absolute paths and one ``address key`` line per host: what check must accept."""
    doc: dict[str, Any] = yaml.safe_load(_site(tmp_path).read_text())
    for host in doc["hosts"]:
        host["ssh"].update(port=22, known_hosts=str(tmp_path / "known_hosts"), key={"file": str(tmp_path / "keys/id")})
    (tmp_path / "known_hosts").write_text("".join(_line(h["ssh"]["address"]) for h in doc["hosts"]))
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(doc))
    code, said = _check(path)
    assert code == 0, said
