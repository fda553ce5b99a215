"""Cluster-wide locks: strict global concurrency limits on the session's Prefect test server.

What must hold: a missing or inactive limit fails the run loudly before anything
changes (and leaks no slot); a second maintenance of a host waits or is refused, never runs
alongside; ensure_limits is idempotent and follows the inventory.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect_support import ALL_VMS, in_background, make_fleet, where

from flows import locks
from flows.evacuate_host import evacuate_host
from hostmaint.audit import AuditTrail
from hostmaint.db import open_engine
from hostmaint.errors import LockError
from hostmaint.inventory import load_inventory
from hostmaint.migration.policy import SchedulerPolicy, drains_side_by_side, slots_per_drain
from hostmaint.models import HostState, MigrationOptions, StepOutcome
from hostmaint.runtime import open_runtime


def active_slots(name: str) -> int:
    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name).active_slots


def renamed_cluster(inventory: Path, cluster: str, **limits: int) -> Path:
    """The same fleet under another cluster name (so its cluster limits do not exist yet)."""
    data = yaml.safe_load(inventory.read_text())
    data["clusters"][0]["name"] = cluster
    data["clusters"][0]["limits"].update(limits)
    for h in data["hosts"]:
        h["cluster"] = cluster
    out = inventory.with_name(f"inventory-{cluster}.yaml")
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def test_limit_specs_follow_the_inventory(tmp_path: Path) -> None:
    inv = load_inventory(make_fleet(tmp_path))
    specs = {s.name: s.limit for s in locks.limit_specs(inv)}
    assert specs == {"host:hv01": 1, "host:hv02": 1, "host:hv03": 1, "host:hv04": 1,
                     "inbound:hv01": 1, "inbound:hv02": 1, "inbound:hv03": 1, "inbound:hv04": 1,
                     "maintenance:demo": 1, "migrations:demo": 4}


def test_ensure_limits_is_idempotent_and_follows_changes(tmp_path: Path, prefect_server: None) -> None:
    inventory = renamed_cluster(make_fleet(tmp_path), "idem", max_hosts_in_maintenance=2)
    first = {c.name: c.action for c in locks.ensure_limits(inventory)}
    assert first["maintenance:idem"] == "created" and first["migrations:idem"] == "created"
    again = locks.ensure_limits(inventory)
    assert {c.action for c in again} == {"unchanged"}
    changed = renamed_cluster(make_fleet(tmp_path / "b"), "idem", max_hosts_in_maintenance=3)
    third = {c.name: c for c in locks.ensure_limits(changed)}
    assert third["maintenance:idem"].action == "updated"
    assert (third["maintenance:idem"].previous, third["maintenance:idem"].limit) == (2, 3)


def test_missing_limit_fails_loudly_and_changes_nothing(tmp_path: Path, hostmaint_db: Path,
                                                        prefect_server: None) -> None:
    base = make_fleet(tmp_path / "fleet")
    locks.ensure_limits(base)  # host limits exist; the new cluster's limits do not
    inventory = renamed_cluster(base, "nolimits")
    before = where(inventory)

    with pytest.raises(LockError, match=r"lock 'maintenance:nolimits' is missing .* refusing to run unlocked"):
        evacuate_host(host="hv01", operator="ivan", inventory=str(inventory), lock_wait_s=5)

    assert where(inventory) == before
    assert open_runtime(inventory).states.state("hv01") is HostState.ACTIVE
    assert AuditTrail(open_engine()).records(host="hv01") == []
    assert active_slots("host:hv01") == 0  # the host slot taken first was given back


def test_second_evacuation_of_a_host_is_refused_while_the_first_runs(tmp_path: Path, hostmaint_db: Path,
                                                                     prefect_server: None) -> None:
    # ~4 s per migration: the first run must still hold the host when the second one's flow run has
    # been created (a busy Prefect server can make that take a few seconds)
    inventory = make_fleet(tmp_path / "fleet", time_scale=1.0)
    locks.ensure_limits(inventory)
    rt = open_runtime(inventory)
    first = in_background(evacuate_host, host="hv01", operator="first", inventory=str(inventory))
    while rt.states.state("hv01") is HostState.ACTIVE and not first.done.is_set():
        time.sleep(0.05)
    assert active_slots("host:hv01") == 1

    with pytest.raises(LockError, match=r"lock 'host:hv01' is held by another run \(host hv01 is under maintenance\)"):
        evacuate_host(host="hv01", operator="second", inventory=str(inventory), lock_wait_s=1)

    outcome = first.join()
    assert outcome.outcome is StepOutcome.OK
    records = AuditTrail(open_engine()).records(host="hv01")
    assert {r.operator for r in records} == {"first"}  # the refused run wrote nothing
    assert len({r.run_id for r in records}) == 1
    placement = where(inventory)
    assert set(placement) == ALL_VMS and all(len(h) == 1 for h in placement.values())
    assert active_slots("host:hv01") == 0 and active_slots("maintenance:demo") == 0


def test_second_evacuation_waits_for_the_first_then_finds_nothing_to_do(tmp_path: Path, hostmaint_db: Path,
                                                                        prefect_server: None) -> None:
    inventory = make_fleet(tmp_path / "fleet", time_scale=0.4)
    locks.ensure_limits(inventory)
    rt = open_runtime(inventory)
    first = in_background(evacuate_host, host="hv02", operator="first", inventory=str(inventory))
    while rt.states.state("hv02") is HostState.ACTIVE and not first.done.is_set():
        time.sleep(0.05)
    second = evacuate_host(host="hv02", operator="second", inventory=str(inventory), lock_wait_s=None)
    first_outcome = first.join()

    assert first_outcome.outcome is StepOutcome.OK and second.outcome is StepOutcome.OK
    assert second.migrations == []  # the host was empty by the time it got the lock
    records = AuditTrail(open_engine()).records(host="hv02")
    firsts = [r.seq for r in records if r.operator == "first"]
    seconds = [r.seq for r in records if r.operator == "second"]
    assert firsts and seconds and max(firsts) < min(seconds)  # one after the other, never interleaved
    assert rt.hypervisor.running_vms("hv02") == ()


def test_locks_are_reentrant_within_a_run(prefect_server: None, tmp_path: Path) -> None:
    locks.ensure_limits(make_fleet(tmp_path))
    with locks.host_maintenance("hv03", "demo", wait_seconds=5):
        with locks.host_maintenance("hv03", "demo", wait_seconds=1):
            assert locks.held() == {"host:hv03", "maintenance:demo", "inbound:hv03"}
            assert active_slots("host:hv03") == 1
    assert locks.held() == frozenset()
    assert active_slots("host:hv03") == 0


def test_lease_seconds_has_a_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(locks.LEASE_ENV, "5")
    assert locks.lease_seconds() == locks.MIN_LEASE_SECONDS
    monkeypatch.setenv(locks.LEASE_ENV, "soon")
    with pytest.raises(LockError, match="not a number"):
        locks.lease_seconds()


def test_drains_onto_other_hosts_run_together_and_one_onto_the_same_host_waits(prefect_server: None,
                                                                               tmp_path: Path) -> None:
    inventory = make_fleet(tmp_path)
    locks.ensure_limits(inventory)
    limits = load_inventory(inventory).cluster("demo").limits
    # demo: 4 migrations per cluster, 2 per source (fewer than its 10 GbE link could use)
    share = slots_per_drain({"hv01": 1100.0}, limits, SchedulerPolicy(), MigrationOptions())
    assert (share, drains_side_by_side(limits, SchedulerPolicy(), MigrationOptions())) == (2, 2)

    def drain_in_thread(targets: list[str], started: threading.Event, stop: threading.Event) -> threading.Thread:
        def body() -> None:  # a thread of its own has no locks of this run: it stands for another run
            with locks.drain_slots("demo", targets, share):
                started.set()
                stop.wait(30)
        thread = threading.Thread(target=body)
        thread.start()
        return thread

    stop = threading.Event()
    with locks.drain_slots("demo", ["hv02"], share):
        assert active_slots("inbound:hv02") == 1 and active_slots("migrations:demo") == 2
        beside, overlapping = threading.Event(), threading.Event()
        t1 = drain_in_thread(["hv03", "hv04"], beside, stop)
        assert beside.wait(30)  # other targets, slots left: at once
        assert active_slots("migrations:demo") == 4
        t2 = drain_in_thread(["hv02", "hv03"], overlapping, stop)
        assert not overlapping.wait(3)  # hv02 is this drain's target
        assert active_slots("migrations:demo") == 4  # and it took nothing while it waited: all or none
    stop.set()
    t1.join(30)
    assert overlapping.wait(30)  # this drain is over, and so is the other one onto hv03
    t2.join(30)
    for name in ("inbound:hv02", "inbound:hv03", "inbound:hv04", "migrations:demo"):
        assert active_slots(name) == 0, name


def limits_for(host: str, cluster: str, *, off: str | None = None) -> None:
    """The limits of one host of one cluster (names no other test uses), ``off`` switched off as in the UI."""
    sizes = {locks.host_limit(host): 1, locks.inbound_limit(host): 1, locks.inbound_limit(f"{host}-peer"): 1,
             locks.maintenance_limit(cluster): 1, locks.migrations_limit(cluster): 4}
    with get_client(sync_client=True) as client:
        for name, size in sizes.items():
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=size))
        if off is not None:
            client.update_global_concurrency_limit(off, GlobalConcurrencyLimitUpdate(active=False))


@contextmanager
def held_by_another_run(name: str) -> Iterator[None]:
    """``name`` held by a thread (a thread has no locks of this run: it stands for another run)."""
    taken, stop = threading.Event(), threading.Event()

    def body() -> None:
        with locks.hold(name):
            taken.set()
            stop.wait(60)
    thread = threading.Thread(target=body)
    thread.start()
    assert taken.wait(30)
    try:
        yield
    finally:
        stop.set()
        thread.join(30)


# (case, what is switched off, whether another run holds the host's inbound lock, how the lock is taken)
INACTIVE_CASES: list[tuple[str, str, bool, Callable[[str, str], AbstractContextManager[None]]]] = [
    ("hold", "host", False, lambda h, c: locks.hold(locks.host_limit(h), wait_seconds=2)),
    ("maintenance: all in one request", "host", False, lambda h, c: locks.host_maintenance(h, c, wait_seconds=2)),
    ("maintenance: one request", "maintenance", False, lambda h, c: locks.host_maintenance(h, c, wait_seconds=2)),
    # the host's inbound lock taken: the combined request is refused and the locks are taken one at a time
    ("maintenance: one at a time", "maintenance", True, lambda h, c: locks.host_maintenance(h, c, wait_seconds=2)),
    ("maintenance: one at a time, host", "host", True, lambda h, c: locks.host_maintenance(h, c, wait_seconds=2)),
    ("drain: target", "peer", False, lambda h, c: locks.drain_slots(c, [f"{h}-peer"], 2, wait_seconds=2)),
    ("drain: slots", "migrations", False, lambda h, c: locks.drain_slots(c, [f"{h}-peer"], 2, wait_seconds=2)),
    ("cluster migrations", "migrations", False, lambda h, c: locks.cluster_migrations(c, [f"{h}-peer"])),
]


@pytest.mark.parametrize(("case", "off", "inbound_taken", "take"), INACTIVE_CASES, ids=[c[0] for c in INACTIVE_CASES])
def test_an_inactive_limit_is_refused_like_a_missing_one(
        prefect_server: None, case: str, off: str, inbound_taken: bool,
        take: Callable[[str, str], AbstractContextManager[None]]) -> None:
    # the server grants an inactive limit without counting it: a run holding it would exclude nobody
    host = cluster = "off-" + "-".join(re.findall(r"[a-z]+", case))  # limits of this case alone
    names = {"host": locks.host_limit(host), "maintenance": locks.maintenance_limit(cluster),
             "peer": locks.inbound_limit(f"{host}-peer"), "migrations": locks.migrations_limit(cluster)}
    limits_for(host, cluster, off=names[off])
    entered = []
    with ExitStack() as other:
        if inbound_taken:
            other.enter_context(held_by_another_run(locks.inbound_limit(host)))
        with pytest.raises(LockError, match=rf"lock '{names[off]}' is inactive .* refuses to run unlocked; "
                                            r"nothing was changed\. Re-activate it with 'hostmaint setup"):
            with take(host, cluster):
                entered.append(case)
    assert entered == []
    assert locks.held() == frozenset()
    for name in (*names.values(), locks.inbound_limit(host)):
        assert active_slots(name) == 0, name  # every slot taken on the way was given back


def test_a_limit_switched_off_while_held_does_not_let_a_second_run_in(prefect_server: None) -> None:
    limits_for("inactive-held", "inactive-held")
    name = locks.host_limit("inactive-held")
    second: list[str] = []

    def second_run() -> None:  # a thread of its own has no locks of this run: it stands for another run
        try:
            with locks.hold(name, wait_seconds=2):
                second.append("held")
        except LockError as exc:
            second.append(str(exc))

    with locks.hold(name):
        with get_client(sync_client=True) as client:
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active=False))
        thread = threading.Thread(target=second_run)
        thread.start()
        thread.join(60)
    assert len(second) == 1 and f"lock {name!r} is inactive" in second[0]


def test_an_inactive_limit_stops_the_flow_before_anything_changes(tmp_path: Path, hostmaint_db: Path,
                                                                  prefect_server: None) -> None:
    inventory = renamed_cluster(make_fleet(tmp_path / "fleet"), "switchedoff")
    locks.ensure_limits(inventory)
    with get_client(sync_client=True) as client:
        client.update_global_concurrency_limit("maintenance:switchedoff", GlobalConcurrencyLimitUpdate(active=False))
    before = where(inventory)

    with pytest.raises(LockError, match=r"lock 'maintenance:switchedoff' is inactive"):
        evacuate_host(host="hv01", operator="ivan", inventory=str(inventory), lock_wait_s=5)

    assert where(inventory) == before
    assert open_runtime(inventory).states.state("hv01") is HostState.ACTIVE
    assert AuditTrail(open_engine()).records(host="hv01") == []
    assert active_slots("host:hv01") == 0
    # hostmaint setup switches it on again, as the message says
    assert {c.name: c.action for c in locks.ensure_limits(inventory)}["maintenance:switchedoff"] == "updated"
    with locks.host_maintenance("hv01", "switchedoff", wait_seconds=5):
        assert active_slots("maintenance:switchedoff") == 1
