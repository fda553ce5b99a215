"""Inventory loading: the example is valid; every bad input is refused with the field named."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from hostmaint.cli import app
from hostmaint.errors import InventoryError
from hostmaint.inventory import load_inventory, parse_inventory
from hostmaint.models import RebootPolicy

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "inventory.yaml"
runner = CliRunner()


def example() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE.read_text())


def test_example_loads_and_resolves_policy_overrides() -> None:
    inv = load_inventory(EXAMPLE)
    assert [c.name for c in inv.clusters] == ["prod-a", "lab-b"]
    assert inv.policy_for("hv02").reboot is RebootPolicy.ALWAYS  # host override
    assert inv.policy_for("hv01").reboot is RebootPolicy.IF_NEEDED  # cluster default
    assert inv.policy_for("hv01").excludes == ["kernel-rt*", "qemu-kvm*"]
    assert inv.vm_policy("prod-a", "db-7").anti_affinity == "databases"  # type: ignore[union-attr]
    assert inv.vm_policy("prod-a", "web-1", ("gpu",)).migratable is False  # type: ignore[union-attr]
    assert Path(inv.host("hv01").ssh.known_hosts).is_absolute()
    assert inv.shared_storage_for("hv01") == ("/mnt/nfs/images/", "/dev/disk/by-id/dm-uuid-mpath-")
    assert inv.shared_storage_for("old01") == ()  # lab-b declares none: every file or block disk is local


def test_a_host_override_of_verify_checks_keeps_them_checks() -> None:
    doc = example()
    doc["hosts"][0]["policy"] = {"verify": [{"name": "mounted", "argv": ["test", "-e", "/srv"]}]}
    policy = parse_inventory(doc).policy_for("hv01")
    assert [c.name for c in policy.verify] == ["mounted"]
    assert policy.verify[0].argv == ["test", "-e", "/srv"]
    assert policy.excludes == ["kernel-rt*", "qemu-kvm*"]  # not overridden: inherited


def test_cli_check_accepts_the_example() -> None:
    # the example names key and known_hosts files that exist only at a real site
    result = runner.invoke(app, ["inventory", "check", "--no-files", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output and "not checked" in result.output


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        node: Any = doc
        parts = path.split(".")
        for part in parts[:-1]:
            node = node[int(part)] if part.isdigit() else node[part]
        last = parts[-1]
        node[int(last) if last.isdigit() else last] = value
    return change


def _append_duplicate_host(doc: dict[str, Any]) -> None:
    doc["hosts"].append(copy.deepcopy(doc["hosts"][0]))


BAD: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("bad port", _set("hosts.3.ssh.port", 0), "hosts[3].ssh.port (host old01): must be 1-65535, got 0"),
    ("port wrong type", _set("hosts.0.ssh.port", "twenty-two"), "hosts[0].ssh.port (host hv01)"),
    ("port yes", _set("hosts.0.ssh.port", True), "hosts[0].ssh.port (host hv01)"),  # YAML's yes, not port 1
    ("unknown format version", _set("version", 99), "version"),
    ("unknown key", _set("hosts.1.colour", "blue"), "hosts[1].colour (host hv02): unknown field"),
    ("duplicate host", _append_duplicate_host, "hosts[4].name (host hv01): duplicate host"),
    # one machine under two names: a patch of hv02 would drain hv02 and reboot hv01, its VMs and all
    ("ssh address of another host", _set("hosts.1.ssh.address", "HV01.example.internal"),
     "hosts[1].ssh.address (host hv02): HV01.example.internal port 22 is also hosts[0]'s (host hv01)"),
    ("libvirt uri of another host", _set("hosts.2.libvirt_uri", "qemu+ssh://root@hv01.example.internal/system"),
     "hosts[2].libvirt_uri (host hv03): qemu+ssh://root@hv01.example.internal/system reaches "
     "hv01.example.internal, as hosts[0]'s (host hv01) does"),
    ("one machine's declared names for two hosts",
     lambda d: [h.update(machine_names={"ssh": "node7", "libvirt": "node7.mgmt"}) for h in d["hosts"][:2]],
     "hosts[1].machine_names.ssh (host hv02): node7 is also hosts[0]'s (host hv01)"),
    ("declared machine name every unnamed machine has", _set("hosts.0.machine_names",
                                                             {"ssh": "localhost", "libvirt": "hv01"}),
     "hosts[0].machine_names.ssh (host hv01)"),
    ("negative limit", _set("clusters.0.limits.migrations_per_source", -1),
     "clusters[0].limits.migrations_per_source"),
    ("unknown cluster", _set("hosts.2.cluster", "prod-z"), "hosts[2].cluster (host hv03): unknown cluster 'prod-z'"),
    ("bad reboot policy", _set("clusters.0.host_policy.reboot", "sometimes"), "clusters[0].host_policy.reboot"),
    ("shell in exclude", _set("clusters.0.host_policy.excludes", ["kernel; rm -rf /"]),
     "clusters[0].host_policy.excludes"),
    ("command substitution in exclude", _set("clusters.1.host_policy.excludes", ["$(id)"]),
     "clusters[1].host_policy.excludes"),
    ("backtick in host override exclude", _set("hosts.0.policy", {"excludes": ["`id`"]}),
     "hosts[0].policy.excludes (host hv01)"),
    ("newline in exclude", _set("clusters.0.host_policy.excludes", ["a\nb"]), "clusters[0].host_policy.excludes"),
    ("verify check is a string", _set("clusters.0.host_policy.verify.0.argv", "systemctl is-active libvirtd"),
     "clusters[0].host_policy.verify[0].argv"),
    ("missing libvirt uri", lambda d: d["hosts"][1].pop("libvirt_uri"),
     "hosts[1].libvirt_uri (host hv02): required field is missing"),
    ("two key sources", _set("hosts.0.ssh.key", {"file": "k", "agent": True}), "hosts[0].ssh.key (host hv01)"),
    ("headroom out of range", _set("clusters.0.limits.memory_headroom_pct", 120),
     "clusters[0].limits.memory_headroom_pct"),
    ("hosts not a list", _set("hosts", {"hv01": {}}), "hosts:"),
    ("zero stall period", _set("clusters.0.migration", {"stall_seconds": 0}), "clusters[0].migration.stall_seconds"),
    ("upfront throttle over 99", _set("clusters.0.migration", {"max_upfront_throttle_pct": 100}),
     "clusters[0].migration.max_upfront_throttle_pct"),
    ("relative shared storage path", _set("clusters.1.shared_storage", ["images"]),
     "clusters[1].shared_storage: [0] 'images' is not an absolute path"),
    ("empty shared storage path", _set("clusters.0.shared_storage", [""]), "clusters[0].shared_storage: [0] is empty"),
    ("unknown migration setting", _set("clusters.0.migration", {"post_copy": True}),
     "clusters[0].migration.post_copy"),
    # a stall period of .inf would never escalate a stalled migration; nan compares false with everything
    ("infinite stall period", _set("clusters.0.migration", {"stall_seconds": float("inf")}),
     "clusters[0].migration.stall_seconds"),
    ("infinite time budget", _set("clusters.0.migration", {"seconds_per_gib": float("inf")}),
     "clusters[0].migration.seconds_per_gib"),
    ("nan reboot timeout override", _set("hosts.0.policy", {"reboot_timeout_s": float("nan")}),
     "hosts[0].policy.reboot_timeout_s (host hv01)"),
    # past anything real: libvirt would refuse the cap mid-drain, the planner's sums would leave 64 bits
    ("migration bandwidth past any link", _set("clusters.0.migration", {"bandwidth_mib_s": 2**63}),
     "clusters[0].migration.bandwidth_mib_s"),
    ("link speed past any link", _set("hosts.1.link_bandwidth_mib_s", 10**30),
     "hosts[1].link_bandwidth_mib_s (host hv02)"),
    ("reserved memory past an exbibyte", _set("hosts.2.reserved_memory_mib", 2**64),
     "hosts[2].reserved_memory_mib (host hv03)"),
]


@pytest.mark.parametrize("name,change,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_inventory_is_refused_naming_the_field(tmp_path: Path, name: str,
                                                   change: Callable[[dict[str, Any]], None], expected: str) -> None:
    doc = example()
    change(doc)
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(InventoryError) as info:
        load_inventory(path)
    assert expected in str(info.value)
    assert str(path) in str(info.value)
    result = runner.invoke(app, ["inventory", "check", str(path)])
    assert result.exit_code == 2
    assert expected in " ".join(result.output.split()) or expected in result.output


def test_malformed_yaml_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "inventory.yaml"
    path.write_text("clusters:\n  - name: a\n hosts: [\n")
    result = runner.invoke(app, ["inventory", "check", str(path)])
    assert result.exit_code == 2
    assert "malformed YAML at line 3" in " ".join(result.output.split())


def test_missing_file_is_bad_input(tmp_path: Path) -> None:
    result = runner.invoke(app, ["inventory", "check", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "cannot read" in result.output


def test_every_problem_is_reported_at_once() -> None:
    doc = example()
    doc["hosts"][0]["ssh"]["port"] = 70000
    doc["hosts"][1]["bogus"] = 1
    with pytest.raises(InventoryError) as info:
        parse_inventory(doc, "x.yaml")
    assert len(info.value.problems) == 2


def test_migration_settings_reach_the_drain_scheduler(tmp_path: Path) -> None:
    from hostmaint.maintenance import drain_settings

    doc = example()
    doc["clusters"][0]["migration"] = {"allow_post_copy": True, "max_upfront_throttle_pct": 60,
                                       "parallel_connections": 4, "stall_seconds": 20}
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(doc))
    inv = load_inventory(path)
    policy, options = drain_settings(inv, doc["clusters"][0]["name"])
    assert (policy.allow_post_copy, policy.auto_converge_max_initial_pct) == (True, 60)
    assert (options.parallel_connections, options.stall_seconds) == (4, 20)
    other, other_options = drain_settings(inv, doc["clusters"][1]["name"])  # no section: the defaults
    assert not other.allow_post_copy and other_options.stall_seconds == 60


# a private key as an operator might paste it by mistake (not a real key: only its shape matters)
PEM = ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAAB\n"
       "QyNTUxOQAAACBOxkcDCXXXgSRDH63acR/7txWbAB0ROVR1zL5AdXKh\n-----END OPENSSH PRIVATE KEY-----\n")
KEY_BODY = ("b3BlbnNzaC1rZXktdjEAAAAABG5vbmUA", "QyNTUxOQAAACBOxkcDCXXX")

PASTED: list[tuple[str, Callable[[dict[str, Any]], None], str, str]] = [
    ("key itself as ssh.key", _set("hosts.0.ssh.key", PEM), "hosts[0].ssh.key (host hv01)",
     "Input should be a valid dictionary"),
    ("key as the key file's path", _set("hosts.0.ssh.key", {"file": PEM}), "hosts[0].ssh.key.file (host hv01)",
     "holds a private key, not the path of one"),
    ("key as the secret block's name", _set("hosts.0.ssh.key", {"secret_block": PEM}),
     "hosts[0].ssh.key.secret_block (host hv01)", "holds a private key, not the name of the Secret block"),
    ("key as agent", _set("hosts.0.ssh.key", {"agent": PEM}), "hosts[0].ssh.key.agent (host hv01)",
     "valid boolean"),
    ("key in an exclude", _set("clusters.0.host_policy.excludes", [PEM]), "clusters[0].host_policy.excludes",
     "not a package name"),
]


@pytest.mark.parametrize("name,change,field,what", PASTED, ids=[p[0] for p in PASTED])
def test_a_pasted_private_key_is_never_echoed(tmp_path: Path, name: str, change: Callable[[dict[str, Any]], None],
                                              field: str, what: str) -> None:
    doc = example()
    change(doc)
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.dump(doc, default_style=None))  # the key as a YAML block, as it was pasted
    result = runner.invoke(app, ["inventory", "check", str(path)])
    assert result.exit_code == 2
    said = " ".join(result.output.split())
    assert field in said and what in said
    for body in KEY_BODY:
        assert body not in result.output
    assert "BEGIN OPENSSH" not in result.output


def test_credential_settings_and_passwords_are_not_echoed() -> None:
    doc = example()
    doc["hosts"][0]["ssh"]["key"] = {"file": 1234}
    doc["hosts"][1]["ssh"]["key"] = {"secret_block": "Prod SSH key"}
    doc["hosts"][2]["libvirt_uri"] = "https://admin:Hunter2pw@hv03/system"
    with pytest.raises(InventoryError) as info:
        parse_inventory(doc, "x.yaml")
    problems = info.value.problems
    assert problems[0] == ("hosts[0].ssh.key.file (host hv01): Input should be a valid string"
                           " (the value is not shown: it is a credential setting)")
    assert problems[1].startswith("hosts[1].ssh.key.secret_block (host hv02): must be a Prefect block name")
    assert "Prod SSH key" not in problems[1]
    assert problems[2].startswith("hosts[2].libvirt_uri (host hv03): String should match pattern")
    assert "Hunter2pw" not in str(info.value)
    # a value that is no secret is still shown: it helps to see what was wrong
    doc = example()
    doc["hosts"][0]["ssh"]["port"] = "twenty-two"
    with pytest.raises(InventoryError, match="got 'twenty-two'"):
        parse_inventory(doc, "x.yaml")


def test_hosts_behind_one_address_on_their_own_ports_and_host_less_uris_are_not_one_machine() -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    for i, h in enumerate(doc["hosts"]):
        h["ssh"]["address"] = "jump.example.internal"  # one NAT address, a port per host
        h["ssh"]["port"] = 2200 + i
        h["libvirt_uri"] = "test:///default"  # no host to compare
    inv = parse_inventory(doc)
    assert len({(h.ssh.address, h.ssh.port) for h in inv.hosts}) == len(inv.hosts)


@pytest.mark.parametrize("kind,typo,hint", [
    ("host", "hv1", "did you mean 'hv01'?"),
    ("host", "HV01", "did you mean 'hv01'?"),
    ("host", "db99", ""),
    ("cluster", "dmeo", "did you mean 'demo'?"),
])
def test_an_unknown_name_says_what_it_likely_meant_and_what_there_is(kind: str, typo: str, hint: str,
                                                                       sim_inventory: Path) -> None:
    # `hostmaint patch hv1` said only "unknown host 'hv1'": the operator had to open the inventory
    inv = load_inventory(sim_inventory)
    with pytest.raises(KeyError) as info:
        inv.host(typo) if kind == "host" else inv.cluster(typo)
    message = str(info.value.args[0])
    assert message.startswith(f"unknown {kind} {typo!r}")
    assert (hint in message) if hint else "did you mean" not in message
    assert ("hv01, hv02, hv03, hv04" if kind == "host" else "clusters: demo") in message
