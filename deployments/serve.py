"""The hostmaint deployments, built from the inventory, and served from one process.

::

    patch-window/patch-window-<cluster>   RRule schedule in the cluster's timezone, exclusion dates (windows.yaml)
    evacuate-on-request/evacuate-host     form: EvacuationRequest (dry run by default, optional approval)
    patch-on-request/patch-host           form: PatchRequest
    return-on-request/return-host         form: ReturnRequest (the way back after evacuate-host)
    rebalance-on-request/rebalance-cluster form: RebalanceRequest
    degraded-host-runbook/degraded-host   trigger: event hostmaint.host.degraded
    hardware-check-failed-runbook/hardware-check-failed   trigger: event hostmaint.host.hardware-check-failed

``hostmaint serve`` (small sites) serves these from one process; ``hostmaint setup
--work-pool`` registers the very same list with a process work pool, for workers on
several machines. ``prefect.yaml`` describes them for ``prefect deploy --all``; a
test keeps the two in step.

The inventory path is not baked into any deployment: the serving process or
worker is started with ``$HOSTMAINT_INVENTORY``, so one deployment serves any site.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

from prefect import Flow
from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentEventTrigger
from prefect.schedules import RRule, Schedule

from hostmaint.inventory import Inventory, load_inventory
from hostmaint.window_schedule import WindowConfig, load_windows, window_rrule

ROOT = Path(__file__).resolve().parents[1]
WINDOWS_FILE = Path(__file__).with_name("windows.yaml")
TAGS = ["hostmaint"]
SIMULATED_TAG = "simulated"
SIMULATED_LABEL = "SIMULATED fleet, no real host is touched. "

DEGRADED_EVENT = "hostmaint.host.degraded"
HARDWARE_EVENT = "hostmaint.host.hardware-check-failed"
HOST_RESOURCE_PREFIX = "hostmaint.host."
HOST_LABEL = "hostmaint.host.name"
CPU_STARVED_EVENT = "hostmaint.vm.cpu-starved"
MEMORY_PRESSURE_EVENT = "hostmaint.vm.memory-pressure"
VM_RESOURCE_PREFIX = "hostmaint.vm."
VM_LABEL = "hostmaint.vm.name"

# deployment name -> (entrypoint relative to the project root, description)
ENTRYPOINTS: dict[str, tuple[str, str]] = {
    "evacuate-host": ("flows/runbooks/on_request.py:evacuate_on_request",
                      "Move every VM off one host and leave it cordoned. Dry run by default."),
    "patch-host": ("flows/runbooks/on_request.py:patch_on_request",
                   "Evacuate, update, reboot when needed, verify, uncordon one host and return its VMs."),
    "return-host": ("flows/runbooks/on_request.py:return_on_request",
                    "The way back after evacuate-host: verify the host, put it back into service as it was, "
                    "return its VMs (or rebalance the cluster)."),
    "rebalance-cluster": ("flows/runbooks/on_request.py:rebalance_on_request",
                          "Level a cluster's memory load with a bounded number of live migrations."),
    "degraded-host": ("flows/runbooks/degraded_host.py:degraded_host_runbook",
                      f"Runbook for a {DEGRADED_EVENT} event: cordon, show the plan, wait for approval "
                      "(unless severity is critical), evacuate, keep cordoned."),
    "hardware-check-failed": ("flows/runbooks/hardware_check.py:hardware_check_failed_runbook",
                              f"Runbook for a {HARDWARE_EVENT} event: cordon at once, evacuate with approval, "
                              "keep cordoned with the reason."),
    "resize-vm": ("flows/resize_vm.py:resize_vm",
                  "Grow a running VM's vCPUs and memory live, NUMA-aware: the plan (a migration first when its "
                  "host cannot hold it) is shown and approved first. Dry run by default."),
    "vm-starved": ("flows/runbooks/vm_starved.py:vm_starved_runbook",
                   f"Runbook for {CPU_STARVED_EVENT} / {MEMORY_PRESSURE_EVENT}: propose a live resize, show the "
                   "plan, wait for approval, resize."),
}
PATCH_WINDOW_ENTRYPOINT = "flows/patch_window.py:patch_window"


# --- patch window schedules (read by hostmaint.window_schedule) ----------------------------------------


def window_parameters(cluster: str, cfg: WindowConfig, operator: str = "scheduler") -> dict[str, Any]:
    """The patch-window flow's parameters for a scheduled run of ``cluster``.

    The deployment's own parameters (the defaults of the UI's run form) take ``operator=""``: a run
    started by hand is recorded under the name typed there (or ``unknown``), never as the scheduler.
    """
    return {"cluster": cluster, "window_minutes": cfg.window_minutes,
            "max_hosts_in_parallel": cfg.max_hosts_in_parallel, "max_failed_hosts": cfg.max_failed_hosts,
            "exact_budget": cfg.exact_budget, "operator": operator}


def window_schedule(cluster: str, cfg: WindowConfig) -> Schedule:
    """An RRule schedule in the window's timezone, with its exclusion dates, starting ``cluster``'s window."""
    return RRule(window_rrule(cfg), timezone=cfg.timezone, parameters=window_parameters(cluster, cfg))


# --- event triggers ------------------------------------------------------------------------------------------


def host_event_resource(host: str, cluster: str | None = None) -> dict[str, str]:
    """The resource of a hostmaint host event; the runbook triggers read the host from ``hostmaint.host.name``."""
    resource = {"prefect.resource.id": f"{HOST_RESOURCE_PREFIX}{host}", HOST_LABEL: host}
    if cluster:
        resource["hostmaint.cluster"] = cluster
    return resource


def degraded_trigger(extra: dict[str, Any] | None = None) -> DeploymentEventTrigger:
    """Start the degraded-host runbook for each ``hostmaint.host.degraded`` event, host taken from the event."""
    return DeploymentEventTrigger(
        name="host degraded", expect={DEGRADED_EVENT}, match={"prefect.resource.id": f"{HOST_RESOURCE_PREFIX}*"},
        parameters={"host": "{{ event.resource['" + HOST_LABEL + "'] }}",
                    "reason": "{{ event.payload.reason }}",
                    "severity": "{{ event.payload.severity }}",
                    "source": "{{ event.payload.source }}",
                    "event_id": "{{ event.id | string }}",  # a bare UUID does not serialise
                    **(extra or {})})


def hardware_trigger(extra: dict[str, Any] | None = None) -> DeploymentEventTrigger:
    """Start the hardware-check-failed runbook for each ``hostmaint.host.hardware-check-failed`` event."""
    return DeploymentEventTrigger(
        name="hardware check failed", expect={HARDWARE_EVENT},
        match={"prefect.resource.id": f"{HOST_RESOURCE_PREFIX}*"},
        parameters={"host": "{{ event.resource['" + HOST_LABEL + "'] }}",
                    "check": "{{ event.payload.check }}",
                    "detail": "{{ event.payload.detail }}",
                    "source": "{{ event.payload.source }}",
                    "event_id": "{{ event.id | string }}",
                    **(extra or {})})


def vm_starved_trigger(event: str, extra: dict[str, Any] | None = None) -> DeploymentEventTrigger:
    """Start the vm-starved runbook for each ``event`` (cpu-starved or memory-pressure), VM taken from the event."""
    return DeploymentEventTrigger(
        name=event.removeprefix(VM_RESOURCE_PREFIX).replace("-", " "), expect={event},
        match={"prefect.resource.id": f"{VM_RESOURCE_PREFIX}*"},
        parameters={"vm": "{{ event.resource['" + VM_LABEL + "'] }}",
                    "event": event,
                    "reason": "{{ event.payload.reason }}",
                    "vcpus": "{{ event.payload.vcpus }}",
                    "memory": "{{ event.payload.memory }}",
                    "source": "{{ event.payload.source }}",
                    "event_id": "{{ event.id | string }}",
                    **(extra or {})})


# --- the deployments ------------------------------------------------------------------------------------------


def _load_flow(entrypoint: str, source: Path | None) -> Flow[..., Any]:
    if source is not None:
        # a work pool's workers change into ``source`` and import the entrypoint from there
        return Flow.from_source(source=str(source), entrypoint=entrypoint)  # type: ignore[return-value]
    from prefect.flows import load_flow_from_entrypoint

    path, _, name = entrypoint.partition(":")
    return load_flow_from_entrypoint(f"{ROOT / path}:{name}")


APPROVING = ("evacuate-host", "degraded-host", "hardware-check-failed", "resize-vm",
             "vm-starved")  # may pause for approval


def build_deployments(inventory: str | Path | Inventory, *, windows: Path = WINDOWS_FILE,
                      source: Path | None = None, approval_poll_s: int | None = None) -> list[RunnerDeployment]:
    """Every hostmaint deployment for ``inventory``: one patch window per cluster plus the forms and runbooks.

    ``source``: the project directory workers run from (work pool deployments);
    ``None`` for serving from this process. ``approval_poll_s``: how often a run
    paused for approval checks for the answer (the flows' default is 10 s).
    """
    inv = inventory if isinstance(inventory, Inventory) else load_inventory(inventory)
    default, overrides = load_windows(windows, known=[c.name for c in inv.clusters])
    # a simulated inventory says so on every deployment (and, through the tag, on every run), so
    # nobody mistakes a demo for the fleet
    label = SIMULATED_LABEL if inv.simulation is not None else ""
    tags = [*TAGS, SIMULATED_TAG] if inv.simulation is not None else TAGS
    out: list[RunnerDeployment] = []
    window_flow = _load_flow(PATCH_WINDOW_ENTRYPOINT, source)
    for cluster in inv.clusters:
        cfg = overrides.get(cluster.name, default)
        out.append(cast(RunnerDeployment, window_flow.to_deployment(
            name=f"patch-window-{cluster.name}", tags=[*tags, f"cluster:{cluster.name}"],
            description=f"{label}Patch window of cluster {cluster.name}: {cfg.rrule} in {cfg.timezone}, "
                        f"{cfg.window_minutes:g} min, {len(cfg.exclude)} date(s) excluded.",
            schedules=[window_schedule(cluster.name, cfg)],
            parameters=window_parameters(cluster.name, cfg, operator=""))))
    extra = {} if approval_poll_s is None else {"poll_interval_s": approval_poll_s}
    for name, (entrypoint, description) in ENTRYPOINTS.items():
        fl = _load_flow(entrypoint, source)
        kwargs: dict[str, Any] = {"parameters": dict(extra)} if name in APPROVING and extra else {}
        if name == "degraded-host":
            kwargs["triggers"] = [degraded_trigger(extra)]
        elif name == "hardware-check-failed":
            kwargs["triggers"] = [hardware_trigger(extra)]
        elif name == "vm-starved":
            kwargs["triggers"] = [vm_starved_trigger(e, extra) for e in (CPU_STARVED_EVENT, MEMORY_PRESSURE_EVENT)]
        out.append(cast(RunnerDeployment, fl.to_deployment(name=name, tags=tags, description=label + description,
                                                           **kwargs)))
    hosts = sorted(h.name for h in inv.hosts)
    clusters = sorted(c.name for c in inv.clusters)
    for dep in out:
        if dep.name in FORMS or dep.flow_name == "patch-window":
            offer_choices(dep, hosts=hosts, clusters=clusters)
    return out


FORMS = ("evacuate-host", "patch-host", "return-host", "rebalance-cluster")  # started by people, from the UI


def offer_choices(deployment: RunnerDeployment, *, hosts: list[str], clusters: list[str]) -> None:
    """Make every ``host`` and ``cluster`` field of the deployment's form a choice among the inventory's.

    The Prefect UI then offers a list instead of a text box, and the server refuses any other value
    (409) before a run exists; without it a typo failed the run half a minute after submit. The
    runbooks' parameters come from events and are left free: the run itself refuses an unknown host,
    where it shows in the runs list, rather than the trigger failing out of sight.
    """
    from tasks.prefect_private import parameter_schema, set_parameter_schema

    schema = parameter_schema(deployment)
    choices = {"host": hosts, "cluster": clusters}
    for fields in (schema.get("properties", {}), *(d.get("properties", {})
                                                   for d in schema.get("definitions", {}).values())):
        for name, values in choices.items():
            if name in fields and fields[name].get("type") == "string":
                fields[name]["enum"] = list(values)
    set_parameter_schema(deployment, schema)


SIMULATED_HOME = Path("~/.local/share/hostmaint/simulated")
SIMULATED_TIME_SCALE = 0.2  # real seconds per simulated one: a 4 GiB VM moves in ~1 s, slow enough to watch


def simulated_site(workdir: Path = SIMULATED_HOME, *, time_scale: float = SIMULATED_TIME_SCALE) -> Path:
    """A fresh SIMULATED fleet to serve (4 hosts, 12 VMs, cluster ``demo``) and its own empty database.

    Returns the inventory path. ``time_scale`` goes into the inventory's ``simulation.time_scale``,
    which is what the runs read. The database is ``workdir/hostmaint.db`` (``$HOSTMAINT_DB`` is set for
    this process and the runs it serves), so no simulated record reaches a real trail.
    """
    from hostmaint.simulated_fleet import demo_packages, demo_snapshot, use_fresh_database, write_simulated_fleet

    workdir = workdir.expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    use_fresh_database(workdir)
    snap = demo_snapshot(4, 12)
    return write_simulated_fleet(workdir, snap, demo_packages(snap), time_scale=time_scale)


def serve_deployments(inventory: str | Path, *, windows: Path = WINDOWS_FILE, limit: int | None = None,
                      approval_poll_s: int | None = None) -> None:
    """Create the limits, then serve every deployment from this process until interrupted.

    Runs started here find the inventory through ``$HOSTMAINT_INVENTORY`` (set to
    ``inventory`` here), and heartbeat every 30 s for the zombie-run automation.
    """
    from prefect import serve

    serve(*prepare_to_serve(inventory, windows=windows, approval_poll_s=approval_poll_s), limit=limit)


def prepare_to_serve(inventory: str | Path, *, windows: Path = WINDOWS_FILE,
                     approval_poll_s: int | None = None) -> list[RunnerDeployment]:
    """Everything ``serve`` does before it registers and runs the deployments; returns them."""
    from flows.locks import ensure_limits

    path = str(Path(inventory).resolve())
    os.environ["HOSTMAINT_INVENTORY"] = path
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")
    from deployments.server import ensure_zombie_automation

    ensure_limits(path)
    ensure_zombie_automation()  # as setup does: serve alone must not leave dead runs Running forever
    deployments = build_deployments(path, windows=windows, approval_poll_s=approval_poll_s)
    take_over_from_work_pools(deployments)
    remove_orphaned_triggers()
    return deployments


def take_over_from_work_pools(deployments: list[RunnerDeployment]) -> list[str]:
    """Delete same-named deployments registered with a work pool, so this process serves them instead.

    A deployment registered for workers carries that registration's code location;
    served over it, its runs would crash looking for code in the wrong place. The
    past runs stay in the history. Returns the names taken over.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    taken = []
    with get_client(sync_client=True) as client:
        for dep in deployments:
            full = f"{dep.flow_name}/{dep.name}"
            try:
                existing = client.read_deployment_by_name(full)
            except ObjectNotFound:
                continue
            if existing.work_pool_name:
                # its trigger automations first: the server keeps them when the deployment goes, and
                # they would fire at a deployment that no longer exists on every event
                client.delete_resource_owned_automations(f"prefect.deployment.{existing.id}")
                client.delete_deployment(existing.id)
                taken.append(full)
    return taken


# the automations degraded_trigger, hardware_trigger and vm_starved_trigger make
TRIGGER_NAMES = ("host degraded", "hardware check failed", "cpu starved", "memory pressure")


def remove_orphaned_triggers() -> list[str]:
    """Delete hostmaint's runbook trigger automations whose deployment no longer exists; return their ids.

    Earlier versions of ``serve`` deleted the work pool's deployments without their automations, which
    then appeared twice in the UI ("Run deployment: No access") and made the server log a 404 per event.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    removed = []
    with get_client(sync_client=True) as client:
        for automation in client.read_automations():
            owner = automation.owner_resource or ""
            if automation.name not in TRIGGER_NAMES or not owner.startswith("prefect.deployment."):
                continue
            try:
                client.read_deployment(owner.removeprefix("prefect.deployment."))
            except ObjectNotFound:
                client.delete_automation(automation.id)
                removed.append(str(automation.id))
    return removed
