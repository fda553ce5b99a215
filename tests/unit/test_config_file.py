"""Files operators write, and snapshots, are read strictly: non-UTF-8 bytes and keys given twice are
refused with exit 2, naming the file and the place, by every command that reads them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hostmaint.cli import app
from hostmaint.config_file import parse_json, parse_yaml, read_text
from hostmaint.errors import FileFormatError, InputError, InventoryError, SnapshotError
from hostmaint.fleet import dump_snapshot, load_snapshot
from hostmaint.inventory import load_inventory
from hostmaint.simulated_fleet import demo_snapshot

runner = CliRunner()
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "inventory.yaml"


@pytest.mark.parametrize(("text", "problem"), [
    ("a: 1\nb: 2\na: 3\n", "top level: key 'a' is given twice, at line 1, column 1 and at line 3, column 1"),
    ("clusters:\n  - name: x\n    limits: {}\n    host_policy: {}\n    limits: {max_hosts_in_maintenance: 2}\n",
     "clusters[0]: key 'limits' is given twice, at line 3, column 5 and at line 5, column 5"),
    ("x:\n  y:\n    z: 1\n    z: 2\n", "x.y: key 'z' is given twice, at line 3"),
    ("{a: 1, 'a': 2}", "key 'a' is given twice"),  # quoting does not make it another key
    ("1: a\n0x1: b\n", "key 1 is given twice"),  # nor does another spelling of the same number
])
def test_a_key_given_twice_is_refused_naming_it_its_path_and_both_lines(text: str, problem: str) -> None:
    with pytest.raises(FileFormatError) as info:
        parse_yaml(text, "f.yaml")
    assert str(info.value).startswith("f.yaml: ") and problem in str(info.value)


@pytest.mark.parametrize("text", [
    "a: 1\nb: 2\n",
    "base: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 3\n",  # a merge key overrides, as YAML defines
    "a: [1, 1, 1]\nb: {c: 1}\nd: {c: 1}\n",  # the same key in two mappings
    "",
])
def test_yaml_without_repeated_keys_loads_as_before(text: str) -> None:
    import yaml

    assert parse_yaml(text, "f.yaml") == yaml.safe_load(text)


def test_a_recursive_alias_does_not_loop_the_check() -> None:
    data = parse_yaml("r: &r [*r]\n", "f.yaml")
    assert data["r"][0] is data["r"]


@pytest.mark.parametrize(("data", "problem"), [
    (b"name: caf\xe9\n", "not UTF-8: byte 0xe9 at line 1, column 10 (byte offset 9)"),
    (b"a: 1\nb: ok\n  c: \xff\xfe\n", "not UTF-8: byte 0xff at line 3, column 6 (byte offset 16)"),
])
def test_bytes_that_are_not_utf8_are_named_with_their_line(tmp_path: Path, data: bytes, problem: str) -> None:
    path = tmp_path / "f.yaml"
    path.write_bytes(data)
    with pytest.raises(FileFormatError) as info:
        read_text(path)
    assert str(info.value) == f"{path}: {problem}; save the file as UTF-8"


def test_a_bom_and_a_control_character() -> None:
    assert parse_yaml("\ufeffa: 1\n", "f") == {"a": 1}
    with pytest.raises(FileFormatError, match=r"f: character U\+0000 is not allowed in YAML, at line 2, column 4"):
        parse_yaml("a: 1\nb: \x00\n", "f")


def test_json_with_a_key_given_twice_or_broken_is_refused() -> None:
    with pytest.raises(FileFormatError, match="s.json: key 'vms' is given twice in one object"):
        parse_json('{"vms": [], "vms": [1]}', "s.json")
    with pytest.raises(FileFormatError, match="s.json: not JSON: Expecting value at line 1, column 7"):
        parse_json('{"a": }', "s.json")


# --- through the product -------------------------------------------------------------------------------


def test_inventory_with_a_second_limits_block_is_refused_with_exit_2(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    assert "  - name: prod-a\n" in text
    path = tmp_path / "inventory.yaml"
    path.write_text(text.replace("  - name: prod-a\n", "  - name: prod-a\n    limits: {max_hosts_in_maintenance: 9}\n",
                                 1))
    with pytest.raises(InventoryError) as info:
        load_inventory(path)
    assert "clusters[0]: key 'limits' is given twice" in str(info.value)
    result = runner.invoke(app, ["inventory", "check", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    said = " ".join(result.output.split())
    assert str(path) in said and "key 'limits' is given twice, at line" in said


def test_inventory_with_latin1_bytes_is_refused_with_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "inventory.yaml"
    path.write_bytes(EXAMPLE.read_bytes().replace(b"cpu_group: icelake", b"cpu_group: ic\xe9lake", 1))
    result = runner.invoke(app, ["inventory", "check", str(path)])
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert f"{path}: not UTF-8: byte 0xe9 at line" in said and "Traceback" not in result.output


@pytest.mark.parametrize(("data", "problem"), [
    (b'{"cluster": "d\xe9mo"}', "not UTF-8: byte 0xe9 at line 1, column 15"),
    (b'{"cluster": "demo", "cluster": "prod"}', "key 'cluster' is given twice in one object"),
    (b'{"cluster": ', "not JSON"),
])
def test_a_bad_snapshot_file_is_exit_2_naming_the_file(tmp_path: Path, data: bytes, problem: str) -> None:
    path = tmp_path / "snap.json"
    path.write_bytes(data)
    with pytest.raises(SnapshotError, match=problem):
        load_snapshot(path)
    for command in (["plan", "drain", "hv01"], ["plan", "window", "demo"], ["simulate", "window", "demo"]):
        result = runner.invoke(app, [*command, "--snapshot", str(path)])
        assert result.exit_code == 2, (command, result.output)
        assert str(path) in " ".join(result.output.split()) and "Traceback" not in result.output


def test_dirty_rates_that_are_not_utf8_are_exit_2(tmp_path: Path) -> None:
    snap = tmp_path / "snap.json"
    snap.write_text(dump_snapshot(demo_snapshot(4, 12)))
    rates = tmp_path / "rates.json"
    rates.write_bytes(b'{"db-1": 1.0, "app-\xff": 2}')
    result = runner.invoke(app, ["simulate", "window", "demo", "--snapshot", str(snap), "--dirty-rates", str(rates)])
    assert result.exit_code == 2 and "not UTF-8: byte 0xff" in result.output, result.output
    rates.write_text(json.dumps({"db-1": 1.0}).replace("}", ', "db-1": 2.0}'))
    twice = runner.invoke(app, ["simulate", "window", "demo", "--snapshot", str(snap), "--dirty-rates", str(rates)])
    assert twice.exit_code == 2 and "key 'db-1' is given twice" in twice.output, twice.output


@pytest.mark.parametrize(("data", "problem"), [
    (b"default:\n  timezone: UTC\n  timezone: Asia/Tokyo\n", "default: key 'timezone' is given twice"),
    (b"default:\n  timezone: Asia/T\xf4kyo\n", "not UTF-8: byte 0xf4 at line 2"),
    (b"default: [\n", "malformed YAML at line 2"),
    (b"- a\n- b\n", "top level: must be a mapping"),
])
def test_windows_yaml_is_read_strictly(tmp_path: Path, data: bytes, problem: str) -> None:
    from hostmaint.window_schedule import load_windows

    path = tmp_path / "windows.yaml"
    path.write_bytes(data)
    with pytest.raises(InputError) as info:
        load_windows(path)
    assert str(info.value).startswith(f"{path}: ") and problem in str(info.value)


@pytest.mark.parametrize(("text", "problem"), [
    (None, "cannot read: No such file or directory"),
    ("default:\n  rrule: FREQ=DAILY\n  rrule: FREQ=WEEKLY\n", "default: key 'rrule' is given twice"),
    ("default:\n  rrule: FREQ=DAILY\n  timezone: Mars/Base\n  windw_minutes: 3\n",
     "default.timezone: unknown timezone 'Mars/Base' (use an IANA name such as Asia/Tokyo); "
     "default.windw_minutes: unknown field"),
    ("default: {rrule: FREQ=DAILY}\nclusters:\n  prod-a: {max_hosts_in_parallel: 0}\n",
     "clusters.prod-a.max_hosts_in_parallel: Input should be greater than or equal to 1"),
    ("default: {rrule: FREQ=DAILY}\nclusters:\n  prod-z: {}\n", "'prod-z': no cluster of the inventory"),
    ("default: {rrule: 'FREQ=MONTHLY;BYDAY=+2TU', timezone: UTC, exclude: [2026-12-09]}\n",
     "default: exclude 2026-12-09: no patch window falls on that date"),
])
def test_inventory_check_checks_windows_yaml_as_setup_reads_it(tmp_path: Path, text: str | None, problem: str) -> None:
    windows = tmp_path / "windows.yaml"
    if text is not None:
        windows.write_text(text)
    result = runner.invoke(app, ["inventory", "check", "--no-files", "--windows", str(windows), str(EXAMPLE)])
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert said.startswith(f"error: {windows}: ") and problem in said and "Traceback" not in said, said


def test_inventory_check_accepts_the_shipped_windows_yaml() -> None:
    shipped = EXAMPLE.parents[1] / "deployments" / "windows.yaml"
    result = runner.invoke(app, ["inventory", "check", "--no-files", "--windows", str(shipped), str(EXAMPLE)])
    assert result.exit_code == 0, result.output


def test_inventory_check_says_which_windows_the_clocks_skip(tmp_path: Path) -> None:
    windows = tmp_path / "windows.yaml"
    windows.write_text("default: {rrule: 'FREQ=WEEKLY;BYDAY=SU;BYHOUR=2;BYMINUTE=30', timezone: Europe/Berlin}\n"
                       "clusters:\n  prod-a: {timezone: Asia/Tokyo}\n")
    result = runner.invoke(app, ["inventory", "check", "--no-files", "--windows", str(windows), str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    # the last Sunday of March at 02:30 does not exist in Berlin; Tokyo has no DST
    assert "default: " in said and "fall in the hour the clocks skip in Europe/Berlin" in said, said
    assert re.search(r"\d{4}-03-\d\d 02:30 opens at 03:30", said), said
    assert "prod-a" not in said.split("host(s)")[1], said
