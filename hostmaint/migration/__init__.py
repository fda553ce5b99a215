"""Live migration: the drain executor, its scheduling policy and the what-if simulator.

``drain`` runs an evacuation plan against a real ``Hypervisor``; ``policy`` holds the pure decisions
(order, admission, escalation) that both the executor and the simulator use.
"""

from hostmaint.migration.control import MigrationControl
from hostmaint.migration.drain import DrainEvent, DrainReport, EventKind, drain
from hostmaint.migration.policy import Action, Decision, Escalation, Order, SchedulerPolicy, next_action

__all__ = [
    "Action", "Decision", "DrainEvent", "DrainReport", "Escalation", "EventKind", "MigrationControl",
    "Order", "SchedulerPolicy", "drain", "next_action",
]
