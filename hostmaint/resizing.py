"""Carry out a :class:`~hostmaint.resize.ResizePlan` on a hypervisor: migrate first if the plan says so,
hot-plug the vCPUs (then their pins) and the memory, verify from libvirt what the guest has, and
roll back what can be rolled back when a step fails.

What can be rolled back: vCPUs hot-plugged by this run (unplugged again) and a virtio-mem request
(set back; the guest gives the memory back when it can). A DIMM that was plugged stays: taking it
out needs the guest's cooperation, so the outcome says so instead of pretending.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hostmaint.drivers.base import GuestResize, GuestSize
from hostmaint.errors import HostmaintError, InputError, PlanError
from hostmaint.maintenance import RunContext, audited, run_migrations
from hostmaint.models import EvacuationPlan, FleetSnapshot, MigrationResult, Placement, Step, StepOutcome
from hostmaint.resize import MemoryMethod, ResizePlan
from hostmaint.runtime import Runtime


@dataclass
class ResizeOutcome:
    """What a resize did: the guest before and after (as libvirt says), each step, what was undone."""

    vm: str
    host: str
    outcome: StepOutcome
    before: GuestSize | None = None
    after: GuestSize | None = None
    after_persistent: GuestSize | None = None
    migration: MigrationResult | None = None
    done: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)  # changes that stay although the resize failed
    error: str | None = None
    seconds: float = 0.0

    def details(self) -> dict[str, Any]:
        """The audit record's details: before/after topology and pins, the migration, each step."""
        def size(s: GuestSize | None) -> dict[str, Any] | None:
            if s is None:
                return None
            return {"vcpus": s.vcpus, "max_vcpus": s.max_vcpus, "memory_mib": s.memory_mib,
                    "guest_memory_mib": s.guest_memory_mib,
                    "vcpupin": {str(k): list(v) for k, v in sorted(s.vcpupin.items())},
                    "dimms": [list(d) for d in s.dimms], "virtio_mem_requested_mib": s.virtio_mem_requested_mib}
        return {"before": size(self.before), "after": size(self.after), "after_persistent": size(self.after_persistent),
                "migration": self.migration.model_dump(mode="json") if self.migration is not None else None,
                "done": self.done, "rolled_back": self.rolled_back, "left": self.left, "error": self.error}


def _mismatches(plan: ResizePlan, got: GuestSize, where: str) -> list[str]:
    wrong = []
    if got.vcpus != plan.vcpus_after:
        wrong.append(f"{where}: {got.vcpus} vCPUs, planned {plan.vcpus_after}")
    for v in plan.new_vcpus:
        if v.pin and tuple(sorted(got.vcpupin.get(v.vcpu, ()))) != tuple(sorted(v.pin)):
            wrong.append(f"{where}: vCPU {v.vcpu} pinned to {list(got.vcpupin.get(v.vcpu, ()))}, planned {list(v.pin)}")
    mem = plan.memory
    if mem is not None and mem.method is MemoryMethod.VIRTIO_MEM:
        if got.virtio_mem_requested_mib != mem.requested_mib:
            wrong.append(f"{where}: virtio-mem requests {got.virtio_mem_requested_mib} MiB, "
                         f"planned {mem.requested_mib}")
    elif got.guest_memory_mib != plan.memory_mib_after:
        wrong.append(f"{where}: {got.guest_memory_mib} MiB, planned {plan.memory_mib_after}")
    return wrong


def carry_out(plan: ResizePlan, hv: GuestResize, *,
              migrate: Callable[[Placement], MigrationResult] | None = None,
              clock: Callable[[], float] = time.monotonic) -> ResizeOutcome:
    """Run ``plan`` (refused plans raise PlanError, nothing done). A failed step is rolled back as far
    as it can be and the outcome says what stays; it does not raise for a hypervisor error."""
    if not plan.feasible:
        raise PlanError(f"resize of {plan.vm} refused: " + "; ".join(plan.refusals))
    started = clock()
    out = ResizeOutcome(vm=plan.vm, host=plan.target_host, outcome=StepOutcome.OK)

    def fail(message: str) -> ResizeOutcome:
        out.outcome = StepOutcome.FAILED
        out.error = message
        out.seconds = round(clock() - started, 3)
        return out

    if plan.migration is not None:
        if migrate is None:
            raise PlanError(f"resize of {plan.vm} needs a migration to {plan.migration.target} first, and no "
                            f"migration was given to carry it out")
        out.migration = migrate(plan.migration)
        if out.migration.outcome is not StepOutcome.OK:
            return fail(f"the migration to {plan.migration.target} did not complete "
                        f"({out.migration.error or out.migration.outcome.value}); {plan.vm} stays on {plan.host} "
                        f"at its size")
        out.done.append(f"migrated {plan.host} -> {plan.migration.target}")
    host = plan.target_host
    try:
        out.before = hv.guest_size(plan.vm, host)
    except HostmaintError as exc:
        return fail(f"cannot read {plan.vm} on {host}: {exc}")
    if out.before.vcpus != plan.vcpus_before or out.before.guest_memory_mib != plan.memory_mib_before:
        return fail(f"{plan.vm} has {out.before.vcpus} vCPUs and {out.before.guest_memory_mib} MiB, the plan was "
                    f"made for "
                    f"{plan.vcpus_before} and {plan.memory_mib_before}: re-plan")
    before = out.before
    try:
        if plan.vcpus_after != before.vcpus:
            hv.set_vcpus(plan.vm, host, plan.vcpus_after)
            out.done.append(f"vCPUs {before.vcpus} -> {plan.vcpus_after}")
        pins = {v.vcpu: v.pin for v in plan.new_vcpus if v.pin}
        if pins:
            hv.pin_vcpus(plan.vm, host, pins)
            out.done.append("pinned " + ", ".join(f"vCPU {v} -> {list(c)}" for v, c in sorted(pins.items())))
        mem = plan.memory
        if mem is not None and mem.method is MemoryMethod.DIMM:
            hv.add_dimm(plan.vm, host, mem.mib, mem.guest_cell, mem.page_kib)
            out.done.append(f"DIMM of {mem.mib} MiB on guest node {mem.guest_cell}")
        elif mem is not None:
            hv.set_virtio_mem(plan.vm, host, mem.requested_mib)
            out.done.append(f"virtio-mem requested {before.virtio_mem_requested_mib} -> {mem.requested_mib} MiB")
        out.after = hv.guest_size(plan.vm, host)
        out.after_persistent = hv.guest_size(plan.vm, host, persistent=True)
        wrong = _mismatches(plan, out.after, "live") + _mismatches(plan, out.after_persistent, "persistent")
        if wrong:
            raise PlanError(f"{plan.vm} does not have what was planned: " + "; ".join(wrong))
    except HostmaintError as exc:
        _roll_back(plan, hv, host, before, out)
        return fail(str(exc))
    out.seconds = round(clock() - started, 3)
    return out


def _roll_back(plan: ResizePlan, hv: GuestResize, host: str, before: GuestSize, out: ResizeOutcome) -> None:
    """Undo what can be undone, newest first; what cannot is listed in ``out.left``."""
    mem = plan.memory
    if any(d.startswith("virtio-mem") for d in out.done) and before.virtio_mem_requested_mib is not None:
        try:
            hv.set_virtio_mem(plan.vm, host, before.virtio_mem_requested_mib)
            out.rolled_back.append(f"virtio-mem requested back to {before.virtio_mem_requested_mib} MiB (the guest "
                                   f"gives it back as it can)")
        except HostmaintError as exc:
            out.left.append(f"virtio-mem still requests {mem.requested_mib if mem else '?'} MiB: {exc}")
    if any(d.startswith("DIMM") for d in out.done) and mem is not None:
        out.left.append(f"the {mem.mib} MiB DIMM stays: unplugging memory needs the guest's cooperation")
    if any(d.startswith("vCPUs") for d in out.done) and plan.vcpus_after > before.vcpus:
        try:
            hv.set_vcpus(plan.vm, host, before.vcpus)
            out.rolled_back.append(f"vCPUs back to {before.vcpus}")
        except HostmaintError as exc:
            out.left.append(f"{plan.vcpus_after} vCPUs stay online: {exc}")
        pinned = [v for v in plan.new_vcpus if v.pin]
        if pinned and any(d.startswith("pinned") for d in out.done):
            # libvirt keeps a pin for an offline vCPU (and a later plan counts its CPUs as held)
            out.left.append(f"the pins of offline vCPUs {', '.join(str(v.vcpu) for v in pinned)} stay in the "
                            f"definition (they hold CPUs {', '.join(str(c) for v in pinned for c in v.pin)})")
    if any(d.startswith("migrated") for d in out.done) and plan.migration is not None:
        out.left.append(f"{plan.vm} stays on {plan.migration.target}, where it was migrated to grow")


def run_resize(rt: Runtime, run: RunContext, plan: ResizePlan, snapshot: FleetSnapshot, *,
               approved_by: str | None = None) -> ResizeOutcome:
    """Carry out ``plan`` on the runtime's hypervisor, audited as one ``resize`` record (before/after
    topology and pins, the migration if any, who asked and who approved). A migration the plan needs
    first runs through the drain executor, as any maintenance migration (its own ``drain`` record)."""
    hv = rt.hypervisor
    if not isinstance(hv, GuestResize):
        raise InputError(f"the hypervisor driver of this inventory ({type(hv).__name__}) cannot hot-plug vCPUs "
                         f"or memory; nothing changed")

    def migrate(p: Placement) -> MigrationResult:
        evacuation = EvacuationPlan(cluster=plan.cluster, hosts=(p.source,), snapshot_digest=plan.snapshot_digest,
                                    placements=(p,))
        with audited(rt, run, Step.DRAIN, host=p.source, cluster=plan.cluster,
                     inputs={"for": f"resize of {p.vm}", "placements": [p.model_dump(mode="json")]}) as rec:
            report = run_migrations(rt, run, rec, evacuation, snapshot.limits, plan.cluster, snap=snapshot)
            rec.outcome = StepOutcome.OK if report.ok else StepOutcome.FAILED
        return next((r for r in report.results if r.vm == p.vm),
                    MigrationResult(vm=p.vm, source=p.source, target=p.target, outcome=StepOutcome.FAILED,
                                    error="the drain reported no result for it"))

    inputs = {"plan": plan.model_dump(mode="json"), "requested_by": run.operator, "approved_by": approved_by}
    with audited(rt, run, Step.RESIZE, host=plan.host, vm=plan.vm, cluster=plan.cluster, inputs=inputs) as rec:
        out = carry_out(plan, hv, migrate=migrate)
        rec.details.update(out.details())
        rec.outcome = out.outcome
    return out
