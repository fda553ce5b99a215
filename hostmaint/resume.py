"""What is left of a host's maintenance: the runbook, from where the host's record says it got.

A patch that died half way is run again and goes on from the host's recorded state and its audit
trail. Which steps remain is decided here and nowhere else; ``flows/patch_host.py`` walks the list.
Pure: no I/O, the same record and trail always give the same steps.

The runbook (:data:`RUNBOOK`), and where a run that finds the host in each state takes it up:

================  ===============================================================================
state             steps left
================  ===============================================================================
active, cordoned  all of it: precheck, gate, silence, cordon, discover, drain, confirm-empty,
                  update, reboot, verify, start-vm, uncordon, return-vms
draining          from the silence (adopted when the earlier run's lives); the cordon takes the
                  host over and the drain goes on
drained           from the silence, without the cordon; the drain moves only what still runs on
                  it (:func:`drain_due`: a VM an earlier run left there, or one started since)
patching          from the update (an update whose outcome was lost is read back first), after a
                  drain of what runs on it now (:func:`drain_due`: one a tenant started since)
rebooting         the reboot an earlier run issued is proven (``prove-reboot``: its recorded boot
                  id against the host's); one never issued, or that never happened, is done as a
                  fresh run does it: the reboot gate, the pre-reboot hooks, then the reboot
verifying         from the verify
failed            from the silence; the cordon refuses the host until an operator resets it
================  ===============================================================================

A ``reboot`` in the list is done when the step before it says so: the update's decision, or a
``prove-reboot`` that found no new boot; with neither before it (a reboot never issued) it is owed.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from hostmaint.audit import AuditRecord
from hostmaint.models import Cell, HostState, Step, StepOutcome
from hostmaint.state import HostRecord

RUNBOOK: tuple[Step, ...] = (
    Step.PRECHECK, Step.GATE, Step.SILENCE, Step.CORDON, Step.DISCOVER, Step.DRAIN, Step.CONFIRM_EMPTY,
    Step.UPDATE, Step.REBOOT, Step.VERIFY, Step.START_VM, Step.UNCORDON, Step.RETURN_VMS,
)
"""A patch of one host, in order. Hooks and the reboot gate belong to the step they come before or
after (pre-drain: drain; gate and pre-reboot: reboot; post-verify: verify; post-maintenance: the end)."""

BEFORE_CORDON = frozenset({Step.PRECHECK, Step.GATE, Step.SILENCE})
"""Steps that change nothing of the host: a failure in them leaves it as it was."""


def _from(first: Step, *, without: Sequence[Step] = ()) -> tuple[Step, ...]:
    return tuple(s for s in RUNBOOK[RUNBOOK.index(first):] if s not in without)


_TAIL = _from(Step.VERIFY)

_LEFT: dict[HostState, tuple[Step, ...]] = {
    HostState.ACTIVE: RUNBOOK,
    HostState.CORDONED: RUNBOOK,
    HostState.DRAINING: _from(Step.SILENCE),
    HostState.DRAINED: _from(Step.SILENCE, without=[Step.CORDON]),
    HostState.PATCHING: (Step.SILENCE, Step.DISCOVER, Step.DRAIN, Step.CONFIRM_EMPTY, *_from(Step.UPDATE)),
    HostState.VERIFYING: (Step.SILENCE, Step.DISCOVER, *_TAIL),
    HostState.FAILED: _from(Step.SILENCE),
}


def issued_boot_id(record: HostRecord, audit: Sequence[AuditRecord]) -> str | None:
    """The boot id recorded before the reboot of ``record``'s host was asked for (step ``reboot-issued``)
    since the host entered its current state, or None: no reboot was issued in it. ``audit``: the
    host's records, oldest first."""
    issued = [r for r in audit if r.step == Step.REBOOT_ISSUED and r.outcome is StepOutcome.OK
              and datetime.fromisoformat(r.time) >= record.since]
    boot_id = issued[-1].details.get("boot_id_before") if issued else None
    return str(boot_id) if boot_id is not None else None


def cells_before_reboot(audit: Sequence[AuditRecord]) -> tuple[Cell, ...] | None:
    """The NUMA cells recorded right before the host's last reboot in its current maintenance (step
    ``reboot-issued`` after its last cordon), or None: none was issued since. What verify compares the
    host with when the run verifying it is not the one that saw it before (that one died during the
    reboot). ``audit``: the host's records, oldest first."""
    cordons = [i for i, r in enumerate(audit)
               if r.step == Step.CORDON and r.outcome in (StepOutcome.OK, StepOutcome.SKIPPED)]
    since = audit[cordons[-1]:] if cordons else audit
    issued = [r for r in since if r.step == Step.REBOOT_ISSUED and r.outcome is StepOutcome.OK
              and "cells_before" in r.details]
    if not issued:
        return None
    return tuple(Cell.model_validate(c) for c in issued[-1].details["cells_before"])


def remaining_steps(record: HostRecord, audit: Sequence[AuditRecord]) -> tuple[Step, ...]:
    """The steps of :data:`RUNBOOK` left for the host of ``record`` (its state now), given its audit
    trail ``audit`` (oldest first): see the module's table."""
    if record.state is HostState.REBOOTING:
        proof = (Step.PROVE_REBOOT,) if issued_boot_id(record, audit) is not None else ()
        return (Step.SILENCE, Step.DISCOVER, *proof, *_from(Step.REBOOT))
    return _LEFT[record.state]


def drain_due(state: HostState, vms_on_host: bool) -> bool:
    """Whether the drain step moves anything: always for a host not drained yet (the drain takes it to
    ``drained``), and for a drained or patching host only when VMs run on it (``vms_on_host``,
    discovered now: one its shutdown never reached, or a tenant's started since)."""
    return state not in (HostState.DRAINED, HostState.PATCHING) or vms_on_host
