"""resize-vm: grow a running VM live (vCPUs, memory), NUMA-aware, as planned and approved (issue 21).

The run holds the VM's host like any maintenance step (``locks.host_maintenance``), discovers the
cluster, plans (hostmaint/resize.py), shows the plan (run log and artifact), waits for approval when
asked, then carries it out (hostmaint/resizing.py): a migration first when the host cannot hold the
grown VM, then the hot-plug, verified from libvirt. A refused plan changes nothing; a host in
maintenance is refused by the plan (its state is not ``active``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import State
from pydantic import BaseModel, ConfigDict, Field, model_validator

from flows import locks
from flows.common import ApprovalSeconds, HostOutcome, PollSeconds, WaitSeconds, default_inventory, run_context
from flows.run_display import label_run, rejected, shown_here
from flows.runbooks.approval import ask_approval
from hostmaint.display import markdown_code, markdown_text, visible
from hostmaint.errors import InputError
from hostmaint.maintenance import audited
from hostmaint.models import FleetSnapshot, Step, StepOutcome, Trigger, Vm
from hostmaint.resize import MAX_VCPUS, ResizePlan, parse_size_mib, plan_resize, render_resize
from hostmaint.resizing import run_resize
from tasks.common import RuntimeRef
from tasks.maintenance import discover


class ResizeRequest(BaseModel):
    """Grow a running VM's vCPUs and/or memory live (the form of the resize-vm deployment)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vm: str = Field(min_length=1, max_length=255, title="VM", description="The running VM, as libvirt names it.")
    vcpus: int | None = Field(default=None, ge=1, le=MAX_VCPUS, title="vCPUs",
                              description="The vCPU count it should have; empty: unchanged.")
    memory: str | None = Field(default=None, max_length=32, title="Memory",
                               description="The memory it should have (8G, 512M, 4096 = MiB); empty: unchanged.")
    reason: str = Field(min_length=3, max_length=500, title="Reason",
                        description="Why: a ticket number or a sentence. Recorded in the audit trail.")
    operator: str = Field(default="unknown", min_length=1, max_length=120, title="Operator")
    dry_run: bool = Field(default=True, title="Dry run", description="Only print the plan; change nothing.")
    approval_required: bool = Field(default=True, title="Approval required",
                                    description="Print the plan and pause until someone approves it.")
    inventory: str | None = Field(default=None, title="Inventory file")

    @model_validator(mode="after")
    def _something_to_do(self) -> ResizeRequest:
        if self.vcpus is None and self.memory is None:
            raise ValueError("vcpus, memory: give a new vCPU count or memory size (or both)")
        if self.memory is not None:
            try:
                parse_size_mib(self.memory)
            except InputError as exc:
                raise ValueError(str(exc)) from None
        return self

    @property
    def memory_mib(self) -> int | None:
        return parse_size_mib(self.memory) if self.memory is not None else None


Targets = Callable[[Vm], tuple[int | None, int | None]]


def show_resize(plan: ResizePlan, why: str) -> str:
    """Print the plan to the run log and publish it as the run's artifact; return the text."""
    text = "\n".join(render_resize(plan))
    get_run_logger().info("resize plan for %s (%s):\n%s", visible(plan.vm), visible(why), text)
    create_markdown_artifact(f"# Resize plan for {markdown_text(plan.vm)}\n\nWhy: {markdown_text(why)}\n\n"
                             f"{markdown_code(text)}",
                             key=f"resize-{''.join(c if c.isalnum() else '-' for c in plan.vm.lower())[:60]}",
                             description=f"resize plan for {plan.vm}")
    return text


def resize(*, vm: str, targets: Targets, flow_name: str, trigger: Trigger, operator: str, reason: str,
           inventory: str | None, dry_run: bool, approval_required: bool, approval_timeout_s: int,
           poll_interval_s: int, lock_wait_s: float | None) -> HostOutcome | State:
    """Lock the VM's host, plan from a fresh discovery, show, ask, carry out (see the module's doc).
    ``targets`` gives (vCPUs, MiB) for the VM as discovered (None: unchanged)."""
    inv = inventory or default_inventory()
    ref = RuntimeRef(inv)
    rt = ref.open()
    run = run_context(flow_name, trigger, operator, reason)
    hosts = rt.hypervisor.locate(vm)
    if len(hosts) != 1:
        raise InputError(f"vm: {vm!r} is " + ("not running on any host of the inventory" if not hosts
                                              else f"running on {len(hosts)} hosts ({', '.join(hosts)})"))
    host = hosts[0]
    cluster = rt.cluster_of(host)
    label_run("resize", inv, host=host, dry_run=dry_run)
    with locks.host_maintenance(host, cluster, wait_seconds=lock_wait_s):
        snapshot: FleetSnapshot = discover(ref, cluster)
        found = next((v for v in snapshot.vms if v.name == vm), None)
        if found is None:
            raise InputError(f"vm: {vm!r} left {host} while the run started; nothing changed")
        vcpus, memory_mib = targets(found)
        plan = plan_resize(snapshot, vm, vcpus=vcpus, memory_mib=memory_mib)
        text = show_resize(plan, reason)

        def outcome(result: StepOutcome, detail: str) -> HostOutcome:
            return HostOutcome(host=host, outcome=result, state=rt.states.state(host), simulated=rt.simulated,
                               detail=detail)

        if not plan.feasible or dry_run or not plan.changes:
            kind = StepOutcome.DRY_RUN if dry_run and plan.feasible else StepOutcome.SKIPPED
            with audited(rt, run, Step.RESIZE, host=host, vm=vm, cluster=cluster,
                         inputs={"plan": plan.model_dump(mode="json"), "requested_by": run.operator}) as rec:
                rec.outcome = kind
                rec.details["refusals"] = list(plan.refusals)
            return outcome(kind, "; ".join(plan.refusals) if plan.refusals else text)
        approver = None
        if approval_required:
            answer = ask_approval(rt, run, host, plan, timeout_s=approval_timeout_s, poll_interval_s=poll_interval_s)
            if not answer.approve:
                return rejected(outcome(StepOutcome.SKIPPED, f"resize not approved by {answer.operator}"
                                        f"{': ' + answer.comment if answer.comment else ''}; nothing changed"))
            approver = answer.operator
        # a migration first holds its target like a drain's (inbound:<target>, a migrations slot): no
        # drain sends VMs there meanwhile and the host does not go into maintenance under it
        slots = locks.drain_slots(cluster, [plan.migration.target], 1, wait_seconds=lock_wait_s) \
            if plan.migration is not None else nullcontext()
        with slots:
            out = run_resize(rt, run, plan, snapshot, approved_by=approver)
    detail = "; ".join(out.done) if out.outcome is StepOutcome.OK else f"{out.error}; rolled back: " \
        f"{', '.join(out.rolled_back) or 'nothing'}; stays: {', '.join(out.left) or 'nothing'}"
    result = outcome(out.outcome, detail)
    if out.migration is not None:
        result = result.model_copy(update={"migrations": [out.migration]})
    return result


@flow(name="resize-vm", log_prints=True)
def resize_vm(request: ResizeRequest, trigger: Trigger = Trigger.UI, approval_timeout_s: ApprovalSeconds = 3600,
              poll_interval_s: PollSeconds = 10, lock_wait_s: WaitSeconds | None = 60) -> HostOutcome | State:
    """Resize one VM as asked in the form (or by ``hostmaint vm resize``)."""
    mib = request.memory_mib
    result = resize(vm=request.vm, targets=lambda vm: (request.vcpus, mib), flow_name="resize-vm",
                    trigger=trigger, operator=request.operator, reason=request.reason, inventory=request.inventory,
                    dry_run=request.dry_run, approval_required=request.approval_required,
                    approval_timeout_s=approval_timeout_s, poll_interval_s=poll_interval_s, lock_wait_s=lock_wait_s)
    return shown_here(f"resize {request.vm}", result) if isinstance(result, HostOutcome) else result
