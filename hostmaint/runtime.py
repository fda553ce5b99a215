"""Everything a maintenance run needs, built once per process from an inventory.

A ``Runtime`` holds the inventory, the two drivers, the host state store and
the audit trail. Drivers are real (libvirt + SSH) unless the inventory has a
``simulation`` section, in which case both seams are served by the SIMULATED
fleet and ``simulated`` is True so every report can say so.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hostmaint.audit import AuditTrail
from hostmaint.db import open_engine
from hostmaint.drivers.base import HostShell, Hypervisor
from hostmaint.inventory import Inventory, load_inventory
from hostmaint.state import HostStateStore

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from hostmaint.drivers.libvirt import Connector

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """The inventory, drivers, state and audit of one process."""

    inventory: Inventory
    inventory_path: str
    hypervisor: Hypervisor
    shell: HostShell
    states: HostStateStore
    audit: AuditTrail
    simulated: bool
    db_url: str | None = None
    engine: Engine | None = None  # the states' and audit's: its connections go when the runtime closes

    def cluster_of(self, host: str) -> str:
        return self.inventory.host(host).cluster

    @property
    def source(self) -> str:
        return "simulated" if self.simulated else "libvirt"


_cache: dict[tuple[str, str | None], Runtime] = {}
_cache_lock = threading.Lock()


def open_runtime(inventory_path: str | Path, db_url: str | None = None, *,
                 key_loader: Callable[[str], str] | None = None, libvirt_connector: Connector | None = None,
                 fresh: bool = False) -> Runtime:
    """Build (or reuse, within one process) the runtime for an inventory file.

    Reuse matters: one SSH connection and one libvirt connection per host serve
    every step of a run. ``fresh`` drops the cached one (tests, or after the
    inventory changed). ``key_loader`` and ``libvirt_connector`` replace how SSH keys are read and
    libvirt connections opened (tests).
    """
    path = str(Path(inventory_path).resolve())
    key = (path, db_url)
    with _cache_lock:
        # a dropped one (fresh) is not closed: a run in another thread of this process may still use it
        if not fresh and key in _cache:
            return _cache[key]
        inventory = load_inventory(path)
        engine = open_engine(db_url)
        if inventory.simulation is not None:
            from hostmaint.drivers.memory import SimulatedFleet

            fleet = SimulatedFleet.load(Path(inventory.simulation.state_file),
                                         time_scale=inventory.simulation.time_scale)
            hypervisor: Hypervisor = fleet
            shell: HostShell = fleet
            simulated = True
        else:
            from hostmaint.drivers.libvirt import LibvirtHypervisor, open_libvirt
            from hostmaint.drivers.ssh import SshShell

            hypervisor = LibvirtHypervisor({h.name: h.libvirt_uri for h in inventory.hosts},
                                           connector=libvirt_connector or open_libvirt,
                                           shared_storage_prefixes={h.name: inventory.shared_storage_for(h.name)
                                                                    for h in inventory.hosts})
            shell = SshShell.from_inventory(inventory, key_loader=key_loader)
            simulated = False
        rt = Runtime(inventory=inventory, inventory_path=path, hypervisor=hypervisor, shell=shell,
                     states=HostStateStore(engine), audit=AuditTrail(engine), simulated=simulated,
                     db_url=db_url, engine=engine)
        _cache[key] = rt
        return rt


def close_all() -> None:
    """Close every cached runtime's connections."""
    with _cache_lock:
        for rt in _cache.values():
            _close(rt)
        _cache.clear()


def _close(rt: Runtime) -> None:
    """Close ``rt``'s SSH and libvirt connections and its database connections (the engine stays
    usable: a call through it later connects again)."""
    rt.shell.close()
    # libvirt-python can crash at exit collecting connections to daemons that are gone.
    close = getattr(rt.hypervisor, "close", None)
    if callable(close):
        close()
    if rt.engine is not None:
        rt.engine.dispose()
