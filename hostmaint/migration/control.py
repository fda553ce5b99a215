"""Optional escalation controls a hypervisor driver may offer for a running migration.

``Hypervisor.migrate`` starts a migration with its ``MigrationOptions`` (auto-converge, post-copy
capability); changing course while it runs needs two more calls. They are optional: the drain
executor uses them only when ``isinstance(hypervisor, MigrationControl)``; without them an escalation
that cannot be made is skipped and the next one (in the end: abort) is taken.

For libvirt: ``start_post_copy`` is ``virDomainMigrateStartPostCopy`` (the migration must have been
started with ``VIR_MIGRATE_POSTCOPY``, i.e. ``options.post_copy``); ``enable_auto_converge`` has no
libvirt call for a running job, so a driver may raise the guest's CPU throttle through QEMU's
``migrate-set-parameters`` on a job started with ``VIR_MIGRATE_AUTO_CONVERGE``, or raise the downtime
limit (``virDomainMigrateSetMaxDowntime``) as Nova does.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class MigrationControl(Protocol):
    """Change course of a running migration. Raise ``MigrationError`` when it cannot be done."""

    def enable_auto_converge(self, vm: str, source: str) -> None:
        """Throttle the guest's vCPUs so its dirty rate falls below the migration's bandwidth."""
        ...

    def start_post_copy(self, vm: str, source: str) -> None:
        """Switch a running pre-copy migration to post-copy: the VM resumes on the target now."""
        ...


@runtime_checkable
class DowntimeRetune(Protocol):
    """Lower (or raise) the downtime limit of a running migration: the drain does when it learns that
    switch-overs take longer than it reserved, so the migrations already in flight pause within the
    limit too, not only those it starts next (libvirt: ``virDomainMigrateSetMaxDowntime``)."""

    def set_downtime_limit(self, vm: str, source: str, downtime_ms: int) -> None:
        """QEMU's downtime limit for ``vm``'s migration from ``source``, from now on; one set before the
        job runs holds from its start. Raise ``DriverError`` when it cannot be set."""
        ...
