"""The hostmaint database goes away in the middle of a drain (a PostgreSQL failover, a full disk under
SQLite): nothing more may be done unrecorded, and the run after it must find and record every move
that happened. On a SIMULATED fleet; the outage is every statement failing as the driver would."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from flows.patch_host import patch_host
from hostmaint.drivers.memory import SimulatedFleet
from hostmaint.models import HostState, Step, StepOutcome, Trigger
from hostmaint.runtime import open_runtime

pytestmark = pytest.mark.usefixtures("prefect_server")


class Outage:
    """Every statement on ``engine`` fails while ``down``, as a database that went away."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine, self.down, self.refused = engine, False, 0
        sa.event.listen(engine, "before_cursor_execute", self.refuse)

    def refuse(self, *args: Any, **kwargs: Any) -> None:
        if self.down:
            self.refused += 1
            raise sa.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))

    def end(self) -> None:
        self.down = False
        sa.event.remove(self.engine, "before_cursor_execute", self.refuse)


def where(fleet: SimulatedFleet) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for host, vms in fleet.running.items():
        for vm in vms:
            out.setdefault(vm, []).append(host)
    return out


@pytest.mark.parametrize("after_moves", [0, 2])
def test_a_database_outage_mid_drain_stops_the_run_and_the_next_run_records_every_move(
        sim_inventory: Path, monkeypatch: pytest.MonkeyPatch, after_moves: int) -> None:
    rt = open_runtime(sim_inventory)
    fleet = rt.hypervisor
    assert isinstance(fleet, SimulatedFleet)
    before = where(fleet)
    on_host = sorted(vm for vm, hosts in before.items() if hosts == ["hv01"])
    outage = Outage(rt.audit._engine)  # type: ignore[attr-defined]
    migrate = fleet.migrate
    landed: list[str] = []

    def then_the_database_goes(vm: str, *args: Any, **kwargs: Any) -> Any:
        result = migrate(vm, *args, **kwargs)
        landed.append(vm)
        if len(landed) > after_moves:
            outage.down = True  # this VM moved; its record, and everything after, cannot be written
        return result

    monkeypatch.setattr(fleet, "migrate", then_the_database_goes)
    try:
        try:
            first = patch_host(host="hv01", operator="lee", inventory=str(sim_inventory), trigger=Trigger.TEST)
        except Exception as exc:  # noqa: BLE001 - whatever the run raises, what it left is what is checked
            first = exc
    finally:
        outage.end()
    assert outage.refused, "the outage never reached the run"
    assert not (hasattr(first, "outcome") and first.outcome is StepOutcome.OK), first
    mid = where(fleet)
    assert set(mid) == set(before) and all(len(h) == 1 for h in mid.values()), mid  # every VM runs once

    monkeypatch.setattr(fleet, "migrate", migrate)
    second = patch_host(host="hv01", operator="lee", inventory=str(sim_inventory), trigger=Trigger.TEST,
                        lock_wait_s=120)

    assert second.outcome is StepOutcome.OK, second.detail
    assert rt.states.state("hv01") is HostState.ACTIVE
    after = where(fleet)
    assert set(after) == set(before) and all(len(h) == 1 for h in after.values()), after
    # every VM that left hv01 in the first run is on record: its migration, or found by the second run
    records = rt.audit.records(host="hv01", steps=(Step.MIGRATE, Step.MIGRATION_FOUND))
    recorded = {r.vm for r in records if r.outcome is StepOutcome.OK or r.step == Step.MIGRATION_FOUND}
    left_in_first = {vm for vm in on_host if mid[vm] != ["hv01"]}
    assert left_in_first <= recorded, (left_in_first, recorded)
    assert rt.audit.verify().ok
