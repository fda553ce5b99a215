"""Plans as plain-text tables, for ``--dry-run`` and ``hostmaint plan ...`` output.

Names and reasons come from hosts and snapshots: every one goes through :func:`visible`, so a
line break or an escape sequence in a VM's name shows as ``\\n`` or ``\\x1b`` and a table keeps
one line per VM. The text is plain: print it as such (rich ``Text``), never as markup.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.cells import cell_len

from hostmaint.display import visible
from hostmaint.models import Balance, CapacityCheck, EvacuationPlan, PlanProof, RebalancePlan, WindowPlan


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[visible(c) for c in r] for r in rows]
    # terminal columns, not characters: a CJK name takes two per character
    widths = [max(cell_len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c + " " * (w - cell_len(c)) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _names(names: Sequence[str]) -> str:
    return ", ".join(map(visible, names))


def _pins(p: dict[int, tuple[int, ...]]) -> str:
    return " ".join(f"{v}:{','.join(map(str, cpus))}" for v, cpus in sorted(p.items())) or "-"


def _capacity(check: CapacityCheck | None) -> str:
    if check is None:
        return "N+1 check: not run"
    return f"N+1 check: {'ok' if check.ok else 'REFUSED'} (margin {check.margin_mib} MiB): {visible(check.reason)}"


def _balance(b: Balance | None, what: str = "balance after") -> str:
    if b is None:
        return f"{what}: not measured"
    return (f"{what}: {b.hosts} hosts, host max/mean {b.host_max_mean:.3f} σ {b.host_std:.3f}, "
            f"cell max/mean {b.cell_max_mean:.3f} σ {b.cell_std:.3f}, NUMA-remote {b.numa_remote}")


def _proof(plan: EvacuationPlan) -> str:
    """The plan's proof line: how sure it is, and for a refusal whether it is proven."""
    line = f"proof: {plan.proof.label}"
    if plan.blocked and plan.proof is not PlanProof.INFEASIBLE:
        line += " (the refusal is NOT proven: a larger --exact-budget may find a placement)"
    return line + (f"; {plan.proof_note}" if plan.proof_note else "")


def _evacuation(plan: EvacuationPlan, *, title: str | None = None) -> str:
    out = [title or f"Evacuation plan for {_names(plan.hosts)} (cluster {visible(plan.cluster)}): "
           f"{'FEASIBLE' if plan.feasible else 'NOT FEASIBLE'}",
           f"snapshot {plan.snapshot_digest[:12]}, planner {plan.planner}", _proof(plan), _capacity(plan.capacity),
           _balance(plan.balance)]
    if plan.placements:
        rows = [(p.vm, p.source, p.target, ",".join(map(str, p.target_cells)),
                 "local" if p.numa_local else "REMOTE", p.memory_mib, _pins(p.vcpupin),
                 ",".join(map(str, p.numatune_nodeset)) if p.numatune_nodeset is not None else "-",
                 p.runner_up or "-") for p in plan.placements]
        headers = ("VM", "FROM", "TO", "CELLS", "NUMA", "MiB", "VCPUPIN", "NODESET", "RUNNER-UP")
        out += ["", _table(headers, rows)]
    if plan.vm_actions:
        out += ["", _table(("VM", "HOST", "ACTION", "WHY"),
                           [(a.vm, a.host, a.action.value, a.reason) for a in plan.vm_actions])]
    if plan.skipped_hosts:
        out += ["", f"skipped hosts: {_names(plan.skipped_hosts)}"]
    if plan.blocked:
        blocked = [(b.vm, b.host, b.constraint, b.reason, b.hint) for b in plan.blocked]
        out += ["", "BLOCKED:", _table(("VM", "HOST", "CONSTRAINT", "REASON", "HINT"), blocked)]
    return "\n".join(out)


def _rebalance(plan: RebalancePlan) -> str:
    out = [f"Rebalance plan for cluster {visible(plan.cluster)}: {len(plan.moves)} move(s), "
           f"balance {plan.balance_before:.4f} -> {plan.balance_after:.4f} (sum of squared utilisations)",
           f"snapshot {plan.snapshot_digest[:12]}, proof: {plan.proof.label}", _balance(plan.spread_before, "before"),
           _balance(plan.spread_after, "after")]
    if plan.moves:
        rows = [(i + 1, m.placement.vm, m.placement.source, m.placement.target,
                 ",".join(map(str, m.placement.target_cells)), m.placement.memory_mib, f"{m.improvement:.4f}")
                for i, m in enumerate(plan.moves)]
        out += ["", _table(("#", "VM", "FROM", "TO", "CELLS", "MiB", "GAIN"), rows)]
    return "\n".join(out)


def _window(plan: WindowPlan) -> str:
    out = [f"Rolling window for cluster {visible(plan.cluster)}: {'FEASIBLE' if plan.feasible else 'NOT FEASIBLE'}; "
           f"{len(plan.steps)} host(s), {plan.migrations} migration(s) of {plan.vms_moved} VM(s) "
           f"= {plan.migrations_per_vm:.2f} per VM; estimated {plan.estimated_seconds / 60:.0f} min",
           f"snapshot {plan.snapshot_digest[:12]}, proof: {plan.proof.label} (the weakest of its steps')",
           _capacity(plan.capacity)]
    rows = [(s.order, s.host, len(s.evacuation.placements), sum(1 for p in s.evacuation.placements
                                                                if p.target in plan.patched_before(s.host)),
             len(s.evacuation.vm_actions), len(s.evacuation.blocked), f"{s.estimated_seconds / 60:.1f}")
            for s in plan.steps]
    out += ["", _table(("#", "HOST", "MOVES", "ONTO PATCHED", "ACTIONS", "BLOCKED", "MIN"), rows)]
    if plan.skipped_hosts:
        out += ["", f"skipped hosts: {_names(plan.skipped_hosts)}"]
    for step in plan.steps:
        if step.evacuation.placements or step.evacuation.blocked or step.evacuation.vm_actions:
            out += ["", _evacuation(step.evacuation, title=f"Step {step.order}: drain {visible(step.host)}")]
    return "\n".join(out)


def render_plan(plan: EvacuationPlan | RebalancePlan | WindowPlan | CapacityCheck) -> str:
    """A readable plain-text table of any plan, for ``--dry-run`` printing."""
    if isinstance(plan, EvacuationPlan):
        return _evacuation(plan)
    if isinstance(plan, RebalancePlan):
        return _rebalance(plan)
    if isinstance(plan, WindowPlan):
        return _window(plan)
    if isinstance(plan, CapacityCheck):
        return _capacity(plan)
    raise TypeError(f"render_plan: not a plan: {type(plan).__name__}")
