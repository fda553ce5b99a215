"""What an operator sees in the Prefect UI and the audit trail (issue 18), on a SIMULATED fleet.

Deployments served on the simulated fleet say so; setup and serve leave one set of automations;
runs are named and tagged after their action and host; a rejected approval is its own state;
the audit names who really started a run; forms refuse unknown hosts and clusters before a run exists.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from prefect_support import make_fleet

from deployments.serve import SIMULATED_TAG, build_deployments, simulated_site


def test_deployments_served_on_a_simulated_fleet_say_so(tmp_path: Path) -> None:
    deps = build_deployments(make_fleet(tmp_path / "sim"))
    assert deps
    for dep in deps:
        assert SIMULATED_TAG in dep.tags, dep.name
        assert dep.description and dep.description.startswith("SIMULATED"), dep.name


def test_deployments_of_a_real_inventory_do_not_say_simulated(tmp_path: Path) -> None:
    inventory = make_fleet(tmp_path / "real")
    data = yaml.safe_load(inventory.read_text())
    del data["simulation"]
    for h in data["hosts"]:
        h["libvirt_uri"] = f"qemu+ssh://root@{h['name']}/system"
    inventory.write_text(yaml.safe_dump(data))
    for dep in build_deployments(inventory):
        assert SIMULATED_TAG not in dep.tags
        assert "SIMULATED" not in (dep.description or "")


def test_the_simulated_site_has_its_own_database_and_the_speed_asked_for(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOSTMAINT_DB", str(tmp_path / "production.db"))
    inventory = simulated_site(tmp_path / "site", time_scale=0.3)
    data = yaml.safe_load(inventory.read_text())
    assert data["simulation"]["time_scale"] == 0.3
    assert os.environ["HOSTMAINT_DB"] == str((tmp_path / "site" / "hostmaint.db").resolve())


# --- setup and serve agree on one set of automations ------------------------------------------------------


def _serve_registration(inventory: Path) -> None:
    """What 'hostmaint serve' does before it blocks: its preparation, then each deployment applied
    without a work pool (prefect's Runner.add_deployment)."""
    from deployments.serve import prepare_to_serve

    for dep in prepare_to_serve(inventory):
        dep.apply()


def _setup(inventory: Path) -> None:
    from deployments.server import setup

    setup(inventory, work_pool="hostmaint-issue18")


def _automations() -> dict[str, list[str]]:
    """automation name -> what each one's deployment action targets ('missing' for a deleted deployment)."""
    from prefect.client.orchestration import get_client
    from prefect.events.actions import RunDeployment
    from prefect.exceptions import ObjectNotFound

    out: dict[str, list[str]] = {}
    with get_client(sync_client=True) as client:
        for automation in client.read_automations():
            for action in automation.actions:
                target = "no deployment"
                if isinstance(action, RunDeployment) and action.deployment_id is not None:
                    try:
                        dep = client.read_deployment(action.deployment_id)
                        target = f"{dep.name} ({dep.work_pool_name or 'served'})"
                    except ObjectNotFound:
                        target = "missing"
                out.setdefault(automation.name, []).append(target)
    return out


@pytest.mark.parametrize("order", [("setup", "serve"), ("serve", "setup"), ("setup", "serve", "setup", "serve"),
                                   ("serve", "serve", "setup", "setup")])
def test_setup_and_serve_leave_one_set_of_automations(order: tuple[str, ...], tmp_path: Path,
                                                     hostmaint_db: Path, prefect_server: None) -> None:
    inventory = make_fleet(tmp_path / "fleet")
    for step in order:
        _setup(inventory) if step == "setup" else _serve_registration(inventory)

    automations = _automations()
    assert automations["host degraded"] == ["degraded-host (served)"], automations
    assert automations["hardware check failed"] == ["hardware-check-failed (served)"], automations
    assert len(automations["hostmaint: crash flow runs whose process died"]) == 1, automations
    assert not any("missing" in targets for targets in automations.values()), automations


# --- runs are named and tagged after their action and host ----------------------------------------------------


def test_runs_are_named_after_action_and_host_and_tagged_to_filter(fleet: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    from flows.params import EvacuationRequest
    from flows.runbooks.on_request import evacuate_on_request

    state = evacuate_on_request(request=EvacuationRequest(host="hv02", reason="INC-7", operator="ann",
                                                          inventory=str(fleet)), return_state=True)
    with get_client(sync_client=True) as client:
        parent = client.read_flow_run(state.state_details.flow_run_id)
        # filtered by the server: unfiltered, it answers with its default page (200), which a session's
        # earlier flow tests fill
        [child] = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id])))
        assert child.parent_task_run_id is not None
        assert client.read_task_run(child.parent_task_run_id).flow_run_id == parent.id
    for run in (parent, child):
        assert run.name == "evacuate hv02 (dry run, simulated)", run.name
        assert {"host:hv02", "cluster:demo", "simulated"} <= set(run.tags), run.tags


# --- the audit names what really started a run --------------------------------------------------------------


def _run_in_process(flow_run_id: object) -> dict[str, str]:
    """Carry out a deployment's flow run here, as a worker or 'serve' would in its process."""
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow
    from provenance_flow import provenance

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)  # type: ignore[arg-type]
    return run_flow(provenance, flow_run=run, parameters=run.parameters)  # type: ignore[return-value]


def test_the_audit_names_what_started_a_run(prefect_server: None) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.schedules import Interval
    from prefect.states import Scheduled
    from provenance_flow import provenance

    dep = provenance.to_deployment(name="issue18", parameters={"operator": ""},
                                   schedules=[Interval(3600, parameters={"operator": "scheduler"})])
    deployment_id = dep.apply()
    with get_client(sync_client=True) as client:
        by_hand = client.create_flow_run_from_deployment(deployment_id, parameters={"operator": "alice"})
        client._client.post(f"/deployments/{deployment_id}/schedule", json={"min_runs": 1}).raise_for_status()
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
        [scheduled, *_] = [r for r in runs if r.auto_scheduled]
        client.set_flow_run_state(scheduled.id, Scheduled(), force=True)  # its time has come (it was an hour off)

    # the UI's "Custom run" (what the UI posts): not the scheduler, though the flow's default says schedule
    assert _run_in_process(by_hand.id) == {"trigger": "ui", "operator": "alice"}
    assert _run_in_process(scheduled.id) == {"trigger": "schedule", "operator": "scheduler"}
    # no deployment (a subflow, the CLI): what the caller said
    assert provenance(operator="bob", trigger="cli") == {"trigger": "cli", "operator": "bob"}


def test_a_window_run_by_hand_is_not_credited_to_the_scheduler(tmp_path: Path) -> None:
    from deployments.serve import build_deployments

    [window] = [d for d in build_deployments(make_fleet(tmp_path / "f")) if d.name.startswith("patch-window")]
    assert window.parameters["operator"] == ""  # the run form's default: the operator types a name
    assert window.schedules[0].parameters["operator"] == "scheduler"


# --- the way back after an evacuation -------------------------------------------------------------------------


def test_after_an_evacuation_return_host_puts_it_back_and_brings_its_vms_home(fleet: Path) -> None:
    from prefect_support import lost, where
    from typer.testing import CliRunner

    from flows.evacuate_host import evacuate_host
    from flows.return_host import AfterReturn, return_host
    from hostmaint.models import HostState, StepOutcome
    from hostmaint.runtime import open_runtime
    from hostmaint_cli.main import app

    home = {vm for vm, hosts in where(fleet).items() if "hv01" in hosts}
    evacuate_host(host="hv01", operator="ann", reason="RAM swap", inventory=str(fleet))
    rt = open_runtime(fleet)
    assert rt.states.state("hv01") is HostState.DRAINED
    # the operator's uncordon refuses the drained host, and says what to do instead
    refused = CliRunner().invoke(app, ["host", "uncordon", "hv01", "-i", str(fleet)])
    assert refused.exit_code == 2 and "hostmaint host return hv01" in " ".join(refused.output.split())

    outcome = return_host(host="hv01", operator="ann", then=AfterReturn.RETURN_VMS, inventory=str(fleet))

    assert outcome.outcome is StepOutcome.OK, outcome.detail
    assert rt.states.state("hv01") is HostState.ACTIVE
    assert {vm for vm, hosts in where(fleet).items() if "hv01" in hosts} == home
    assert all(len(hosts) == 1 for hosts in where(fleet).values()) and lost(fleet) == []
    # once back, a second return changes nothing
    again = return_host(host="hv01", operator="ann", inventory=str(fleet))
    assert again.outcome is StepOutcome.SKIPPED


def test_return_host_refuses_a_host_no_evacuation_left_naming_its_way_back(fleet: Path) -> None:
    from flows.return_host import return_host
    from hostmaint.runtime import open_runtime

    open_runtime(fleet).states.set_aside("hv02", "degraded: fan", "incident")
    with pytest.raises(Exception, match="hostmaint host uncordon hv02"):
        return_host(host="hv02", operator="ann", inventory=str(fleet))
    assert open_runtime(fleet).states.get("hv02").reason == "degraded: fan"


# --- forms offer the inventory's hosts and clusters, and refuse others before a run exists --------------------


def test_forms_offer_the_inventorys_hosts_and_clusters(tmp_path: Path) -> None:
    deps = {d.name: d for d in build_deployments(make_fleet(tmp_path / "f"))}
    hosts, clusters = ["hv01", "hv02", "hv03", "hv04"], ["demo"]
    for name, model, field, choices in (("evacuate-host", "EvacuationRequest", "host", hosts),
                                        ("patch-host", "PatchRequest", "host", hosts),
                                        ("return-host", "ReturnRequest", "host", hosts),
                                        ("rebalance-cluster", "RebalanceRequest", "cluster", clusters)):
        schema = deps[name]._parameter_openapi_schema.model_dump()
        assert schema["definitions"][model]["properties"][field]["enum"] == choices, name
    window = deps["patch-window-demo"]._parameter_openapi_schema.model_dump()
    assert window["properties"]["cluster"]["enum"] == clusters
    # an event names the host of a runbook: the run refuses an unknown one where the runs list shows it
    assert "enum" not in deps["degraded-host"]._parameter_openapi_schema.model_dump()["properties"]["host"]


@pytest.mark.parametrize("deployment, request_body", [
    ("evacuate-host", {"host": "hv99", "reason": "disk", "operator": "k"}),
    ("return-host", {"host": "hv99", "operator": "k"}),
    ("rebalance-cluster", {"cluster": "nope", "operator": "k"}),
])
def test_the_server_refuses_an_unknown_host_or_cluster_before_a_run_exists(
        prefect_server: None, tmp_path: Path, deployment: str, request_body: dict[str, str]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    [dep] = [d for d in build_deployments(make_fleet(tmp_path / "f")) if d.name == deployment]
    deployment_id = dep.apply()
    with get_client(sync_client=True) as client:
        with pytest.raises(Exception, match="409") as info:
            client.create_flow_run_from_deployment(deployment_id, parameters={"request": request_body})
        assert "is not one of" in str(info.value.response.text)  # type: ignore[attr-defined]
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
    assert [r for r in runs if r.parameters.get("request") == request_body] == []  # no run was made of it


# --- the run the operator opens holds the plan, the progress and the summary ----------------------------------


def _artifacts_of(run_id: object) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))  # type: ignore[list-item]


def test_the_forms_run_holds_the_plan_the_progress_and_the_summary(fleet: Path) -> None:
    from flows.params import EvacuationRequest
    from flows.runbooks.on_request import evacuate_on_request

    state = evacuate_on_request(request=EvacuationRequest(host="hv03", reason="INC-9", operator="ann", dry_run=False,
                                                          inventory=str(fleet)), return_state=True)
    assert state.is_completed(), state
    artifacts = _artifacts_of(state.state_details.flow_run_id)

    [plan] = [a for a in artifacts if a.type == "table" and (a.description or "").startswith("plan for hv03")]
    rows = plan.data if isinstance(plan.data, list) else json.loads(plan.data)
    assert rows and all(row["from"] == "hv03" and row["to"] not in ("", "hv03") for row in rows)
    assert {"vm", "from", "to", "cells", "NUMA", "why"} <= set(rows[0])
    [progress] = [a for a in artifacts if a.type == "progress"]
    assert progress.data == 100.0
    [summary] = [a for a in artifacts if a.type == "markdown"]
    assert summary.data.startswith("# evacuate hv03") and "moved; host left cordoned" in summary.data


def test_a_dry_runs_summary_shows_the_plan_whole(fleet: Path) -> None:
    from flows.params import EvacuationRequest
    from flows.runbooks.on_request import evacuate_on_request

    state = evacuate_on_request(request=EvacuationRequest(host="hv04", reason="INC-10", operator="ann",
                                                          inventory=str(fleet)), return_state=True)
    [summary] = [a for a in _artifacts_of(state.state_details.flow_run_id) if a.type == "markdown"]
    outcome = state.result()
    assert outcome.detail.count("\n") > 2  # the plan, several lines
    for line in outcome.detail.splitlines():
        assert line in summary.data  # every line of it, in a code block under the table
