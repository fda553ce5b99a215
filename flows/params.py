"""Parameter models for the deployments: the Prefect UI renders each one as a form.

Every field has a title and a description (shown in the form) and is validated
twice: by the JSON schema on the server (a bad pattern is refused before a run
exists) and by pydantic in the flow run, which also checks the host or cluster
against the inventory, so a typo fails the run at once, naming the host, before
anything changes.

Which inventory: the model's ``inventory`` field when set, else
``$HOSTMAINT_INVENTORY`` (what a worker or ``hostmaint serve`` is started with).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flows.common import ExactBudget, default_inventory
from flows.return_host import AfterReturn
from hostmaint.errors import InputError
from hostmaint.inventory import HOST_NAME, Inventory, load_inventory
from hostmaint.placement.exact import DEFAULT_BUDGET

HostName = Annotated[str, Field(pattern=HOST_NAME, min_length=1, max_length=63)]
Operator = Annotated[str, Field(min_length=1, max_length=120, title="Operator",
                                description="Who asks for this; recorded in the audit trail with every step.")]
InventoryPath = Annotated[str | None, Field(
    default=None, title="Inventory",
    description="Inventory file on the worker. Leave empty for the worker's $HOSTMAINT_INVENTORY.")]


def _load(path: str | None) -> tuple[str, Inventory]:
    chosen = path or default_inventory()
    return chosen, load_inventory(chosen)


def check_host(host: str, inventory: str | None = None) -> str:
    """Return ``host`` if the inventory knows it; else raise InputError naming the host and the known ones."""
    chosen, inv = _load(inventory)
    known = [h.name for h in inv.hosts]
    if host not in known:
        raise InputError(f"unknown host {host!r}: it is not in the inventory {chosen} "
                         f"(known hosts: {', '.join(known)})")
    return host


def check_cluster(cluster: str, inventory: str | None = None) -> str:
    """Return ``cluster`` if the inventory knows it; else raise InputError naming it and the known ones."""
    chosen, inv = _load(inventory)
    known = [c.name for c in inv.clusters]
    if cluster not in known:
        raise InputError(f"unknown cluster {cluster!r}: it is not in the inventory {chosen} "
                         f"(known clusters: {', '.join(known)})")
    return cluster


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EvacuationRequest(_Request):
    """Move every VM off one host and leave it cordoned and empty."""

    host: HostName = Field(title="Host", description="The host to empty, as named in the inventory (e.g. hv01).")
    reason: str = Field(min_length=3, max_length=500, title="Reason",
                        description="Why: a ticket number or a sentence. Recorded in the audit trail.")
    operator: Operator
    dry_run: bool = Field(default=True, title="Dry run",
                          description="Only print the plan; change nothing. Switch off to evacuate for real.")
    approval_required: bool = Field(
        default=False, title="Approval required",
        description="Print the plan and pause until someone approves it (Resume in the run's menu).")
    exact_budget: ExactBudget = DEFAULT_BUDGET
    inventory: InventoryPath = None

    @model_validator(mode="after")
    def _known_host(self) -> EvacuationRequest:
        try:
            check_host(self.host, self.inventory)
        except InputError as exc:
            raise ValueError(str(exc)) from None
        return self


class PatchRequest(_Request):
    """Patch one host: evacuate, update, reboot when needed, verify, uncordon, return its VMs."""

    host: HostName = Field(title="Host", description="The host to patch, as named in the inventory.")
    reason: str = Field(default="patch", min_length=3, max_length=500, title="Reason",
                        description="Why: a ticket number or a sentence. Recorded in the audit trail.")
    operator: Operator
    dry_run: bool = Field(default=True, title="Dry run", description="Only print the evacuation plan.")
    return_vms: bool = Field(default=True, title="Return VMs",
                             description="Move the VMs back to the host once it is verified.")
    exact_budget: ExactBudget = DEFAULT_BUDGET
    inventory: InventoryPath = None

    @model_validator(mode="after")
    def _known_host(self) -> PatchRequest:
        try:
            check_host(self.host, self.inventory)
        except InputError as exc:
            raise ValueError(str(exc)) from None
        return self


class ReturnRequest(_Request):
    """End a host's evacuation: verify it, put it back into service as it was, return its VMs."""

    host: HostName = Field(title="Host", description="The evacuated host to put back, as named in the inventory.")
    then: AfterReturn = Field(default=AfterReturn.RETURN_VMS, title="Then",
                              description="Once it is verified and back: return-vms (the VMs the evacuation "
                                          "moved come back to it), rebalance (level the cluster) or nothing.")
    reason: str = Field(default="evacuation over", min_length=3, max_length=500, title="Reason",
                        description="Why: a ticket number or a sentence. Recorded in the audit trail.")
    operator: Operator
    inventory: InventoryPath = None

    @model_validator(mode="after")
    def _known_host(self) -> ReturnRequest:
        try:
            check_host(self.host, self.inventory)
        except InputError as exc:
            raise ValueError(str(exc)) from None
        return self


class RebalanceRequest(_Request):
    """Level a cluster's memory load with a bounded number of live migrations."""

    cluster: HostName = Field(title="Cluster", description="The cluster to rebalance, as named in the inventory.")
    max_moves: int = Field(default=10, ge=0, le=500, title="Max moves",
                           description="At most this many live migrations.")
    exact_budget: ExactBudget = DEFAULT_BUDGET
    operator: Operator
    dry_run: bool = Field(default=True, title="Dry run", description="Only print the plan.")
    inventory: InventoryPath = None

    @model_validator(mode="after")
    def _known_cluster(self) -> RebalanceRequest:
        try:
            check_cluster(self.cluster, self.inventory)
        except InputError as exc:
            raise ValueError(str(exc)) from None
        return self
