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


# --- evacuations and incident runbooks ------------------------------------------------------------------


def test_a_planned_evacuation_honours_the_gate_an_incident_goes_on_and_records_why(sim_inventory: Path) -> None:
    from flows.evacuate_host import evacuate_host
    from flows.runbooks.degraded_host import degraded_host_runbook

    dead = _dead_url()  # required and not answering: the gate holds whatever it is asked for
    _edit_inventory(sim_inventory, cluster={"monitoring": {"prometheus": {
        "url": dead, "required": True, "on_hold": "skip",
        "gates": [{"name": "no-alerts", "query": 'ALERTS{alertstate="firing", instance="$host"}'}]}}})
    rt = open_runtime(sim_inventory, fresh=True)
    before = set(rt.hypervisor.running_vms("hv01"))
    planned = evacuate_host(host="hv01", operator="alice", reason="rack move", inventory=str(sim_inventory),
                            trigger=Trigger.TEST)
    assert planned.outcome is StepOutcome.SKIPPED and dead in planned.detail
    rt = open_runtime(sim_inventory, fresh=True)
    assert rt.states.state("hv01") is HostState.ACTIVE and set(rt.hypervisor.running_vms("hv01")) == before
    steps = [r.step for r in rt.audit.records(host="hv01")]
    assert "gate" in steps and not {"cordon", "silence", "drain", "migrate"} & set(steps), steps

    # the same host failing: the incident runbook evacuates it at once (critical), gates bypassed
    result = degraded_host_runbook(host="hv01", reason="ECC errors", severity="critical",
                                   inventory=str(sim_inventory))
    assert result.outcome is StepOutcome.OK  # type: ignore[union-attr]
    rt = open_runtime(sim_inventory, fresh=True)
    assert rt.hypervisor.running_vms("hv01") == () and rt.states.state("hv01") is HostState.CORDONED
    (bypass,) = [r for r in rt.audit.records(host="hv01") if r.step == "gate" and r.inputs["kind"] == "incident"]
    assert bypass.outcome is StepOutcome.OK
    assert bypass.details["checks"][0]["verdict"] == "bypassed"
    assert "incident evacuation" in bypass.details["checks"][0]["reason"]


def test_an_evacuation_runs_its_pre_drain_hooks_and_a_failing_one_stops_it_safely(sim_inventory: Path,
                                                                                 tmp_path: Path) -> None:
    from flows.evacuate_host import evacuate_host

    marker = tmp_path / "lb-drained"
    _edit_inventory(sim_inventory, cluster={"hooks": {"pre_drain": [
        {"name": "lb-drain", "on": "worker", "argv": ["touch", f"{marker}-$host"]}]}},
        hosts={"hv02": {"hooks": {"pre_drain": [{"name": "ceph-noout", "argv": ["ceph", "osd", "set", "noout"]}]}}})
    rt = open_runtime(sim_inventory, fresh=True)
    before = set(rt.hypervisor.running_vms("hv02"))
    # the simulated host has no ceph: it exits 127, as a real host without it would
    with pytest.raises(StepError, match="pre-drain hook ceph-noout failed"):
        evacuate_host(host="hv02", operator="alice", reason="disk swap", inventory=str(sim_inventory),
                      trigger=Trigger.TEST)
    rt = open_runtime(sim_inventory, fresh=True)
    record = rt.states.get("hv02")
    assert record.state is HostState.CORDONED and "ceph-noout" in record.reason
    assert set(rt.hypervisor.running_vms("hv02")) == before
    assert not [r for r in rt.audit.records(host="hv02") if r.step in ("drain", "migrate")]
    assert (tmp_path / "lb-drained-hv02").exists()  # the cluster's hook ran first
    # a host without the failing hook is evacuated after its pre-drain hook
    evacuate_host(host="hv03", operator="alice", reason="disk swap", inventory=str(sim_inventory),
                  trigger=Trigger.TEST)
    rt = open_runtime(sim_inventory, fresh=True)
    assert rt.hypervisor.running_vms("hv03") == () and (tmp_path / "lb-drained-hv03").exists()
    steps = [r.step for r in rt.audit.records(host="hv03")]
    assert steps.index("hook") < steps.index("drain")


def test_an_evacuated_host_stays_silenced_until_return_host_verifies_it_and_runs_its_hooks(
        servers: Servers, sim_inventory: Path, tmp_path: Path) -> None:
    from flows.evacuate_host import evacuate_host
    from flows.return_host import AfterReturn, return_host

    hooks = {"post_verify": [{"name": "unset-noout", "on": "worker", "argv": ["false"]}],
             "post_maintenance": [{"name": "cmdb", "on": "worker", "argv": ["touch", f"{tmp_path}/cmdb-$host"]}]}
    _edit_inventory(sim_inventory, cluster={"hooks": hooks, "monitoring": {"alertmanager": {
        "url": servers.alertmanager, "matchers": [{"name": "instance", "value": "$host"}],
        "lease_s": 60, "evacuation_silence_s": 7200}}})
    evacuate_host(host="hv04", operator="alice", reason="PSU swap", inventory=str(sim_inventory),
                  trigger=Trigger.TEST)
    rt = open_runtime(sim_inventory, fresh=True)
    sid = next(r.details["silence_id"] for r in rt.audit.records(host="hv04") if r.step == "silence")
    assert not [r for r in rt.audit.records(host="hv04") if r.step == "silence-end"]

    def state() -> str:
        return str(httpx.get(f"{servers.alertmanager}/api/v2/silence/{sid}").json()["status"]["state"])

    assert state() == "active"  # the run ended; the host is out of service and silenced
    # its post-verify hook fails: the host stays verifying with the reason, still out and silenced
    with pytest.raises(StepError, match="post-verify hook unset-noout failed"):
        return_host(host="hv04", operator="bob", then=AfterReturn.NOTHING, inventory=str(sim_inventory),
                    trigger=Trigger.TEST)
    rt = open_runtime(sim_inventory, fresh=True)
    record = rt.states.get("hv04")
    assert record.state is HostState.VERIFYING and "unset-noout" in record.reason
    assert state() == "active" and not (tmp_path / "cmdb-hv04").exists()
    # fixed, the return is run again: verified again, back in service, the silence ended, hooks ran
    hooks["post_verify"][0]["argv"] = ["true"]
    _edit_inventory(sim_inventory, cluster={"hooks": hooks})
    open_runtime(sim_inventory, fresh=True)  # this process's runs read the inventory as edited
    result = return_host(host="hv04", operator="bob", inventory=str(sim_inventory), trigger=Trigger.TEST)
    assert result.outcome is StepOutcome.OK
    rt = open_runtime(sim_inventory, fresh=True)
    assert rt.states.state("hv04") is HostState.ACTIVE and rt.hypervisor.running_vms("hv04")
    assert state() == "expired" and (tmp_path / "cmdb-hv04").exists()
    records = [r for r in rt.audit.records(host="hv04")]
    (ended,) = [r for r in records if r.step == "silence-end"]
    assert ended.details["silence_id"] == sid and ended.details["expired"] is True
    assert [(r.inputs["hook"], r.outcome) for r in records if r.step == "hook"] == [
        ("unset-noout", StepOutcome.FAILED), ("unset-noout", StepOutcome.OK), ("cmdb", StepOutcome.OK)]
