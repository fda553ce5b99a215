"""patch-host with the operator's world around it: monitoring gates, silences and hooks wired in
(docs/integrations.md). The servers themselves are proven in tests/unit/test_monitoring.py."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from flows.patch_host import patch_host
from hostmaint.errors import StepError
from hostmaint.models import HostState, StepOutcome, Trigger
from hostmaint.runtime import open_runtime
from tests.monitoring_servers import ALERTMANAGER, MISSING, PROMETHEUS, Servers, running_servers


def _edit_inventory(path: Path, cluster: dict[str, Any] | None = None, hosts: dict[str, dict[str, Any]] | None = None
                    ) -> None:
    data = yaml.safe_load(path.read_text())
    data["clusters"][0].update(cluster or {})
    for h in data["hosts"]:
        h.update((hosts or {}).get(h["name"], {}))
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_a_failing_pre_drain_hook_leaves_the_host_cordoned_and_nothing_moved(sim_inventory: Path) -> None:
    # the simulated host has no such command: it exits 127, as a real host would
    _edit_inventory(sim_inventory, hosts={"hv02": {"hooks": {"pre_drain": [
        {"name": "lb-drain", "argv": ["lb-drain", "--host", "$host"]}]}}})
    rt = open_runtime(sim_inventory, fresh=True)
    before = set(rt.hypervisor.running_vms("hv02"))
    with pytest.raises(StepError, match="pre-drain hook lb-drain failed"):
        patch_host(host="hv02", operator="alice", inventory=str(sim_inventory), trigger=Trigger.TEST)
    rt = open_runtime(sim_inventory, fresh=True)
    record = rt.states.get("hv02")
    assert record.state is HostState.CORDONED and "lb-drain" in record.reason
    assert set(rt.hypervisor.running_vms("hv02")) == before and before
    assert not [r for r in rt.audit.records(host="hv02") if r.step in ("drain", "migrate", "update")]


def test_a_held_gate_skips_the_host_before_anything_changes(sim_inventory: Path) -> None:
    dead = _dead_url()
    _edit_inventory(sim_inventory, cluster={"monitoring": {"prometheus": {
        "url": dead, "required": True, "on_hold": "skip",
        "gates": [{"name": "storage", "query": 'ALERTS{alertstate="firing", cluster="$cluster"}'}]}}})
    result = patch_host(host="hv01", operator="alice", inventory=str(sim_inventory), trigger=Trigger.TEST)
    assert result.outcome is StepOutcome.SKIPPED and dead in result.detail
    rt = open_runtime(sim_inventory, fresh=True)
    assert rt.states.state("hv01") is HostState.ACTIVE
    steps = [r.step for r in rt.audit.records(host="hv01")]
    assert "gate" in steps and "cordon" not in steps


def test_unreachable_monitoring_not_required_does_not_block_and_hooks_run(sim_inventory: Path) -> None:
    dead = _dead_url()
    _edit_inventory(sim_inventory, cluster={
        "monitoring": {"prometheus": {"url": dead, "gates": [{"name": "host", "query": 'ALERTS{instance="$host"}'}]},
                       "alertmanager": {"url": dead, "matchers": [{"name": "instance", "value": "$host"}]}},
        "hooks": {"post_maintenance": [{"name": "note", "on": "worker", "argv": ["true"]}]}})
    result = patch_host(host="hv03", operator="alice", inventory=str(sim_inventory), trigger=Trigger.TEST)
    assert result.outcome is StepOutcome.OK
    rt = open_runtime(sim_inventory, fresh=True)
    recs = {r.step: r for r in rt.audit.records(host="hv03")}
    assert recs["silence"].outcome is StepOutcome.SKIPPED and dead in recs["silence"].details["error"]
    assert recs["gate"].details["checks"][0]["verdict"] == "unreachable"
    assert recs["hook"].inputs["point"] == "post-maintenance" and recs["hook"].outcome is StepOutcome.OK


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    if not PROMETHEUS or not ALERTMANAGER:
        pytest.skip(MISSING)
    with running_servers(tmp_path_factory.mktemp("monitoring")) as s:
        yield s


def test_a_reboot_held_by_storage_alerts_stays_cordoned_and_its_silence_ends(servers: Servers,
                                                                             sim_inventory: Path) -> None:
    # StorageDegraded fires for cluster demo; hv02 needs a reboot (a kernel update)
    _edit_inventory(sim_inventory, cluster={"monitoring": {
        "prometheus": {"url": servers.prometheus, "on_hold": "skip", "gates": [
            {"name": "storage", "query": 'ALERTS{alertstate="firing", cluster="$cluster"}', "at": ["before-reboot"]}]},
        "alertmanager": {"url": servers.alertmanager, "matchers": [{"name": "instance", "value": "$host"}],
                         "lease_s": 60}}})
    rt = open_runtime(sim_inventory, fresh=True)
    boot_before = patching_boot_id(rt, "hv02")
    with pytest.raises(StepError, match="not rebooted, held by monitoring: .*StorageDegraded"):
        patch_host(host="hv02", operator="alice", inventory=str(sim_inventory), trigger=Trigger.TEST)
    rt = open_runtime(sim_inventory, fresh=True)
    record = rt.states.get("hv02")
    assert record.state is HostState.CORDONED and "StorageDegraded" in record.reason
    assert rt.hypervisor.running_vms("hv02") == ()  # drained, its VMs run elsewhere
    assert patching_boot_id(rt, "hv02") == boot_before  # never rebooted
    recs = [r for r in rt.audit.records(host="hv02")]
    sid = next(r.details["silence_id"] for r in recs if r.step == "silence")
    end = next(r for r in recs if r.step == "silence-end")
    assert end.details["silence_id"] == sid and end.details["expired"] is True
    state = httpx.get(f"{servers.alertmanager}/api/v2/silence/{sid}").json()["status"]["state"]
    assert state == "expired"
    assert [r.step for r in recs].index("silence") < [r.step for r in recs].index("cordon")


def patching_boot_id(rt: Any, host: str) -> str:
    from hostmaint.patching import read_boot_id

    return read_boot_id(rt.shell, host)
