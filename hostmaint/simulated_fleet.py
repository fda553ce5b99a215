"""Build a SIMULATED fleet on disk: an inventory, a fleet state file, and nothing real.

Used by ``hostmaint demo --simulated``, by flow tests that need no root, and by
benchmarks. Everything it writes says it is simulated.
"""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime
from pathlib import Path

import yaml

from hostmaint.drivers.memory import SimulatedFleet
from hostmaint.drivers.memory_shell import SimHostPackages
from hostmaint.models import Cell, FleetSnapshot, Host, Limits, Vm

BASE_PACKAGES = {
    "bash": "5.1.8-9.el9",
    "openssl": "1:3.0.7-27.el9",
    "libvirt-daemon": "10.0.0-6.el9",
    "qemu-kvm": "17:8.2.0-11.el9",
    "kernel-core": "5.14.0-427.13.1.el9",
}


def demo_snapshot(hosts: int = 4, vms: int = 12, *, cluster: str = "demo") -> FleetSnapshot:
    """A small deterministic cluster: 2-cell hosts, VMs of 2-8 GiB, one anti-affinity pair (db-1, db-2)."""
    host_names = [f"hv{i:02d}" for i in range(1, hosts + 1)]
    cells = (Cell(id=0, memory_mib=32768, free_mib=32768, cpus=tuple(range(0, 16))),
             Cell(id=1, memory_mib=32768, free_mib=32768, cpus=tuple(range(16, 32))))
    host_models = tuple(Host(name=h, cluster=cluster, cells=cells) for h in host_names)
    sizes = [2048, 4096, 8192, 4096, 2048, 6144]
    vm_models = []
    for i in range(vms):
        name = "db-1" if i == 0 else "db-2" if i == 1 else f"app-{i - 1:02d}"
        mem = sizes[i % len(sizes)]
        vm_models.append(Vm(name=name, uuid=str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{cluster}.{name}")),
                            host=host_names[i % hosts], memory_mib=mem, vcpus=max(1, mem // 2048),
                            anti_affinity="databases" if name.startswith("db-") else None))
    return FleetSnapshot(cluster=cluster, taken_at=datetime(2026, 1, 1, tzinfo=UTC).isoformat(),
                         source="simulated", limits=Limits(migrations_per_source=2, migrations_per_target=2,
                                                           migrations_per_cluster=4, max_hosts_in_maintenance=1),
                         hosts=host_models, vms=tuple(sorted(vm_models, key=lambda v: v.name)))


def demo_packages(snapshot: FleetSnapshot, *,
                  kernel_update_on: tuple[str, ...] = ("hv02",)) -> dict[str, SimHostPackages]:
    """Every host has an openssl update pending; the hosts named get a newer kernel too."""
    out = {}
    for h in snapshot.hosts:
        available = {"openssl": "1:3.0.7-28.el9"}
        if h.name in kernel_update_on:
            available["kernel-core"] = "5.14.0-503.11.1.el9"
        out[h.name] = SimHostPackages(installed=dict(BASE_PACKAGES), available=available,
                                      boot_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"boot-{h.name}-0")),
                                      reboot_delay_s=1.0)
    return out


def write_simulated_fleet(workdir: Path, snapshot: FleetSnapshot, packages: dict[str, SimHostPackages], *,
                          time_scale: float = 0.02, bandwidth_mib_s: float = 1100.0,
                          vm_policies: list[dict[str, object]] | None = None) -> Path:
    """Write ``inventory.yaml`` and ``fleet-state.json`` for a simulated cluster; return the inventory path."""
    workdir.mkdir(parents=True, exist_ok=True)
    state = workdir / "fleet-state.json"
    fleet = SimulatedFleet(snapshot, packages, bandwidth_mib_s=bandwidth_mib_s, time_scale=time_scale,
                           state_file=state)
    fleet.save()
    known_hosts = workdir / "known_hosts"
    known_hosts.write_text("# simulated fleet: no SSH host keys, nothing is contacted\n")
    policies = vm_policies if vm_policies is not None else [
        {"match": {"name": "db-*"}, "anti_affinity": "databases"}]
    limits = snapshot.limits.model_dump()
    inventory = {
        "version": 1,
        "simulation": {"state_file": state.name, "time_scale": time_scale},
        "clusters": [{"name": snapshot.cluster, "limits": limits,
                      "host_policy": {"package_manager": "dnf", "reboot": "if-needed", "reboot_timeout_s": 60},
                      "vm_policies": policies}],
        "hosts": [{"name": h.name, "cluster": snapshot.cluster, "libvirt_uri": f"sim:///{h.name}",
                   "ssh": {"address": f"{h.name}.simulated", "key": {"agent": True},
                           "known_hosts": known_hosts.name}}
                  for h in snapshot.hosts],
    }
    path = workdir / "inventory.yaml"
    path.write_text("# SIMULATED fleet written by hostmaint; no real host is contacted.\n"
                    + yaml.safe_dump(inventory, sort_keys=False))
    return path


def use_fresh_database(workdir: Path) -> Path:
    """Point this process's state and audit at a new, empty ``workdir/hostmaint.db``; return its path.

    A simulated fleet's made-up hosts, windows and audit records must never land in a real trail
    (a trail's records cannot be removed again), so an exported ``HOSTMAINT_DB`` is overridden. A
    stale file from an earlier run goes, with SQLite's WAL files (SQLite would apply them to the
    new database), since its host states would be wrong for a new fleet.
    """
    db = workdir / "hostmaint.db"
    for stale in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        stale.unlink(missing_ok=True)
    os.environ["HOSTMAINT_DB"] = str(db)
    return db
