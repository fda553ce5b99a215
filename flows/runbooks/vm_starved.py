"""vm-starved runbook: monitoring says a VM is short of CPU or memory → propose a live resize, wait
for approval, carry it out.

Started by a ``hostmaint.vm.cpu-starved`` or ``hostmaint.vm.memory-pressure`` event through the
deployment's triggers (the VM is the event's resource, ``hostmaint.vm.<name>``). The proposal is one
vCPU more, or a quarter more memory (hostmaint.resize.propose); the event's payload may name the
size instead. A human always decides: the run pauses until someone approves, whatever the event says.
"""

from __future__ import annotations

from prefect import flow
from prefect.client.schemas.objects import State

from flows.common import ApprovalSeconds, HostOutcome, PollSeconds, WaitSeconds
from flows.resize_vm import resize
from flows.run_display import shown_here
from hostmaint.errors import InputError
from hostmaint.models import Trigger, Vm
from hostmaint.resize import Shortage, parse_size_mib, propose

CPU_EVENT = "hostmaint.vm.cpu-starved"
MEMORY_EVENT = "hostmaint.vm.memory-pressure"
EVENT_SHORTAGE = {CPU_EVENT: Shortage.CPU, MEMORY_EVENT: Shortage.MEMORY}


@flow(name="vm-starved-runbook", log_prints=True)
def vm_starved_runbook(vm: str, event: str = CPU_EVENT, reason: str = "", vcpus: str = "", memory: str = "",
                       source: str = "monitoring", event_id: str | None = None, inventory: str | None = None,
                       approval_timeout_s: ApprovalSeconds = 3600, poll_interval_s: PollSeconds = 10,
                       lock_wait_s: WaitSeconds | None = 300) -> HostOutcome | State:
    """Propose growing ``vm`` for the shortage ``event`` names, show the plan, and resize once approved.

    ``vcpus``/``memory``: the size the event asks for (text, as a trigger renders payload keys; empty:
    the runbook's own proposal). A blank ``reason``, an unknown event or a bad size is refused
    (InputError naming the field) before anything changes.
    """
    shortage = EVENT_SHORTAGE.get(event)
    if shortage is None:
        raise InputError(f"event: {event!r} is not one of {', '.join(EVENT_SHORTAGE)}; nothing changed")
    if not reason.strip():
        raise InputError(f"{event} for VM {vm!r} gives no reason: 'reason' is empty (payload.reason missing or "
                         f"blank); refused, nothing was changed")
    asked_vcpus: int | None = None
    if vcpus.strip():
        if not (vcpus.strip().isascii() and vcpus.strip().isdigit()):
            raise InputError(f"vcpus: {vcpus!r} is not a whole number; nothing changed")
        asked_vcpus = int(vcpus.strip())
    asked_mib = parse_size_mib(memory) if memory.strip() else None

    def targets(found: Vm) -> tuple[int | None, int | None]:
        if asked_vcpus is not None or asked_mib is not None:
            return asked_vcpus, asked_mib
        return propose(found, shortage)

    result = resize(vm=vm, targets=targets, flow_name="vm-starved-runbook", trigger=Trigger.EVENT, operator=source,
                    reason=f"{shortage.value} starved: {reason}" if shortage is Shortage.CPU
                    else f"memory pressure: {reason}", inventory=inventory, dry_run=False, approval_required=True,
                    approval_timeout_s=approval_timeout_s, poll_interval_s=poll_interval_s, lock_wait_s=lock_wait_s)
    return shown_here(f"resize {vm}", result) if isinstance(result, HostOutcome) else result
