"""The two seams between hostmaint and the world: a hypervisor and a host shell.

Only plain values cross them; no libvirt or paramiko object leaves its driver.
Drivers raise the errors of ``hostmaint.errors`` and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from hostmaint.models import CommandResult, HostDiscovery, MigrationOptions, MigrationProgress, MigrationResult

ProgressCallback = Callable[[MigrationProgress], None]


@runtime_checkable
class Hypervisor(Protocol):
    """The libvirt side of a cluster: hosts are named as in the inventory."""

    def discover(self, host: str) -> HostDiscovery:
        """NUMA cells and running VMs of one host. Raises TransientDriverError when unreachable."""
        ...

    def migrate(self, vm: str, source: str, target: str, options: MigrationOptions,
                on_progress: ProgressCallback | None = None) -> MigrationResult:
        """Live-migrate ``vm`` and confirm where it runs afterwards.

        Returns a result with outcome OK once the VM runs on ``target`` and not on ``source``.
        Raises MigrationError when it failed or was aborted; the VM then still runs on ``source``.
        """
        ...

    def abort(self, vm: str, source: str) -> None:
        """Abort a running migration of ``vm``; safe when none runs."""
        ...

    def locate(self, vm: str) -> tuple[str, ...]:
        """Hosts where ``vm`` is running now (exactly one, in a healthy fleet)."""
        ...

    def running_vms(self, host: str) -> tuple[str, ...]:
        """Names of the VMs running on ``host``; proves its libvirtd answers."""
        ...

    def shutdown(self, vm: str, host: str, timeout: float = 120.0) -> None:
        """Shut a VM down cleanly (only where its policy says so)."""
        ...

    def start(self, vm: str, host: str) -> None:
        """Start a VM that ``shutdown`` stopped."""
        ...


@runtime_checkable
class DirtyRateProbe(Protocol):
    """A hypervisor that can measure how fast its running guests dirty memory (QEMU's calc-dirty-rate):
    what the drain scheduler orders, admits and throttles by."""

    def measure_dirty_rates(self, host: str, seconds: float = 1.0) -> dict[str, float]:
        """MiB/s per running VM of ``host``, sampled over ``seconds``; VMs that could not be measured
        are left out (their rate stays unknown, never guessed)."""
        ...


@runtime_checkable
class MigrationStates(Protocol):
    """A hypervisor whose live migrations show the moving VM on both hosts for a while (libvirt: the
    destination's domain exists, paused, from the first byte; in post-copy the source stays, paused)."""

    def in_migration(self, host: str) -> tuple[str, ...]:
        """Names of the VMs on ``host`` that are there only because a live migration is moving them:
        paused for it (an incoming copy, a source at switch-over or in post-copy)."""
        ...


@runtime_checkable
class StrandedVms(Protocol):
    """A hypervisor that can find a VM a live migration left paused on its source and run it again
    (libvirt: a source's libvirtd that died at the switch-over comes back to a domain paused for the
    migration, with no migration job left and no copy on the target)."""

    def stranded(self, host: str) -> tuple[str, ...]:
        """Names of the VMs on ``host`` paused for a live migration that no longer runs."""
        ...

    def resume(self, vm: str, host: str) -> None:
        """Let ``vm`` run again on ``host``."""
        ...

    def discard_stale(self, vm: str, host: str, running_on: str) -> None:
        """Remove ``vm``'s copy that a migration left paused on ``host`` when ``running_on`` runs it
        (the migration completed; what the source would have done had its libvirtd lived)."""
        ...


@runtime_checkable
class ShutOffVms(Protocol):
    """A hypervisor that can list the VMs defined on a host but not running (libvirt: persistent,
    inactive domains): they stay defined through maintenance, and the operator is told of them."""

    def shut_off_vms(self, host: str) -> tuple[str, ...]:
        """Names of the persistent VMs defined on ``host`` that are shut off."""
        ...


# libvirt's reasons a domain is shut off (virDomainShutoffReason), as the words drivers report
SHUTOFF_REASONS = ("unknown", "shutdown", "destroyed", "crashed", "migrated", "saved", "failed", "from-snapshot",
                   "daemon")
# Stopped from outside hostmaint: the guest shut itself down, someone destroyed it, saved it (virsh
# managedsave / save) or reverted it to a shut-off snapshot. hostmaint never destroys, saves or reverts a
# VM (its policy shuts one down, and records it first), so each is proof it was not us. Not here: crashed
# and failed (a migration or a start of ours can end so), migrated, daemon, unknown.
STOPPED_OUTSIDE_REASONS = frozenset({"shutdown", "destroyed", "saved", "from-snapshot"})


@runtime_checkable
class ShutOffReasons(Protocol):
    """A hypervisor that can say why each shut-off VM of a host stopped (libvirt: the domain's state
    reason). A VM a tenant stops while its host is in maintenance is found by it, not taken for lost."""

    def shut_off_reasons(self, host: str) -> dict[str, str]:
        """Persistent VMs defined on ``host`` and shut off -> the reason, one of :data:`SHUTOFF_REASONS`;
        and, where the driver saw them stop, VMs that stopped there and left no definition (transient)."""
        ...


@runtime_checkable
class AutostartFlags(Protocol):
    """A hypervisor whose persistent VMs can start with their host (libvirt: the domain's autostart flag).
    A live migration does not carry the flag (PERSIST_DEST defines the guest on its target without it):
    a move the driver did not see to its end is settled by putting it back from here."""

    def autostarts(self, host: str) -> dict[str, bool]:
        """Persistent VMs defined on ``host`` (running or not) -> whether each starts with the host."""
        ...

    def set_autostart(self, vm: str, host: str, autostart: bool) -> None:
        """Make ``vm``'s definition on ``host`` start with its host, or not (DriverError when it has none)."""
        ...


@dataclass(frozen=True)
class GuestSize:
    """What a running guest has, as libvirt says (its live definition, or the persistent one)."""

    vcpus: int  # online (<vcpu current>)
    max_vcpus: int
    memory_mib: int  # <memory>: boot memory and memory devices
    vcpupin: dict[int, tuple[int, ...]] = field(default_factory=dict)
    dimms: tuple[tuple[int, int], ...] = ()  # (MiB, guest node) of each DIMM
    virtio_mem_requested_mib: int | None = None
    virtio_mem_size_mib: int = 0

    @property
    def guest_memory_mib(self) -> int:
        """What the guest has: ``<memory>`` counts a virtio-mem device at its full size, the guest only
        what it was asked to plug."""
        if self.virtio_mem_requested_mib is None:
            return self.memory_mib
        return self.memory_mib - (self.virtio_mem_size_mib - self.virtio_mem_requested_mib)


@runtime_checkable
class GuestResize(Protocol):
    """A hypervisor that grows (or shrinks) a running guest: each change live and in the persistent
    definition, so a restart keeps it (libvirt's VIR_DOMAIN_AFFECT_LIVE | CONFIG)."""

    def guest_size(self, vm: str, host: str, *, persistent: bool = False) -> GuestSize:
        """What ``vm`` on ``host`` has now (``persistent``: what its definition gives it at a restart)."""
        ...

    def set_vcpus(self, vm: str, host: str, count: int) -> None:
        """Bring ``count`` vCPUs online (hot-plug or unplug the ones above)."""
        ...

    def pin_vcpus(self, vm: str, host: str, pins: Mapping[int, Sequence[int]]) -> None:
        """Pin each vCPU of ``pins`` to its host CPUs."""
        ...

    def add_dimm(self, vm: str, host: str, mib: int, node: int, page_kib: int = 0) -> None:
        """Hot-plug a DIMM of ``mib`` on guest NUMA node ``node`` (backed by ``page_kib`` hugepages)."""
        ...

    def set_virtio_mem(self, vm: str, host: str, requested_mib: int) -> None:
        """Ask the guest's virtio-mem device to have ``requested_mib`` plugged."""
        ...


@runtime_checkable
class HostShell(Protocol):
    """Commands on a host, as argv lists; never a shell string."""

    def run(self, host: str, argv: Sequence[str], timeout: float = 60.0) -> CommandResult:
        """Run ``argv`` on ``host``. A non-zero exit is a result, not an exception.

        Raises TransientDriverError when the host cannot be reached (worth retrying),
        HostKeyError on a bad host key, CommandError when the command timed out.
        """
        ...

    def close(self) -> None:
        """Drop every connection this shell holds."""
        ...
