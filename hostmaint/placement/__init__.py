"""Placement: NUMA-aware evacuation, rolling windows and rebalancing. Pure: snapshot in, plan out.

Public API::

    check_capacity(snapshot, hosts, *, spare_hosts=None) -> CapacityCheck    # the N+1 check
    plan_evacuation(snapshot, hosts, *, avoid=(), busy=(), focus=False, spare_hosts=None, exact_budget=1.0)
        -> EvacuationPlan
    stale_targets(plan, planned_on, now) -> list[str]                       # must a waiting plan be re-made?
    plan_window(snapshot, hosts=None, *, spare_hosts=None, ...) -> WindowPlan
    plan_rebalance(snapshot, max_moves, *, prefer_origin=True, within=None, exact_budget=1.0) -> RebalancePlan
    render_plan(plan) -> str

See docs/planner.md for the rules and the objective.
"""

from hostmaint.placement.evacuate import check_capacity, plan_evacuation, stale_targets
from hostmaint.placement.rebalance import plan_rebalance
from hostmaint.placement.render import render_plan
from hostmaint.placement.rolling import plan_window

__all__ = ["check_capacity", "plan_evacuation", "plan_rebalance", "plan_window", "render_plan", "stale_targets"]
