"""Where and why a domain stopped when libvirt keeps nothing of it (a transient guest): the driver's
connections listen for lifecycle events (hostmaint/drivers/libvirt/lifecycle.py). Fake libvirtd hosts
call the callbacks as libvirt's event loop would; the lab test with a real transient guest destroyed
mid-migration is tests/lab/test_lab_others.py."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import libvirt
import pytest

from hostmaint.drivers.libvirt import LibvirtHypervisor
from hostmaint.drivers.libvirt.lifecycle import StopJournal
from hostmaint.models import MigrationOptions
from tests.fakes.libvirtd import FakeClock, FakeConnector, FakeDomain, FakeHost, FakeJob, FakeNetwork

URIS = {"hv01": "qemu+tcp://hv01/system", "hv02": "qemu+tcp://hv02/system"}


def two_hosts() -> tuple[LibvirtHypervisor, FakeHost, FakeHost, FakeClock]:
    network = FakeNetwork({URIS["hv01"]: FakeHost("hv01"), URIS["hv02"]: FakeHost("hv02")})
    clock = FakeClock()
    hv = LibvirtHypervisor(URIS, connector=FakeConnector(network), clock=clock, sleep=clock.sleep, wait=clock.wait)
    return hv, network[URIS["hv01"]], network[URIS["hv02"]], clock


def test_a_transient_guest_destroyed_while_a_connection_listens_is_known_by_its_reason() -> None:
    hv, hv01, _, _ = two_hosts()
    guest = hv01.add("tenant1", persistent=False)
    hv01.add("kept", persistent=True)
    assert hv.running_vms("hv01") == ("kept", "tenant1")  # a connection is open: it listens
    guest.destroy()
    assert "tenant1" not in hv01.domains  # libvirt forgets it: no definition, no reason to read
    assert hv.shut_off_reasons("hv01") == {"tenant1": "destroyed"}
    assert hv.shut_off_reasons("hv02") == {}


def test_a_stop_no_connection_saw_is_not_known() -> None:
    hv, hv01, _, _ = two_hosts()
    guest = hv01.add("tenant1", persistent=False)
    guest.destroy()  # before the driver connected
    assert hv.shut_off_reasons("hv01") == {}


def test_libvirts_own_reason_of_a_persistent_guest_comes_first() -> None:
    hv, hv01, _, _ = two_hosts()
    guest = hv01.add("vm1", persistent=True)
    hv.running_vms("hv01")
    guest.destroy()  # the event says "destroyed"; the domain stays defined, shut off
    # libvirt's own state reason (the fake's is 1, "shutdown") is what counts, not the event's word
    assert hv.connections.stops.stopped_on("hv01") == {"vm1": "destroyed"}
    assert hv.shut_off_reasons("hv01") == {"vm1": "shutdown"}


def test_a_guest_started_again_or_found_running_is_no_longer_stopped() -> None:
    hv, hv01, hv02, _ = two_hosts()
    guest = hv01.add("tenant1", persistent=False)
    hv.running_vms("hv01")
    hv.running_vms("hv02")
    guest.destroy()
    assert hv.shut_off_reasons("hv01") == {"tenant1": "destroyed"}
    hv02.add("tenant1", persistent=False)  # created again there, with no event (as if no connection saw it)
    assert "tenant1" in hv.running_vms("hv02")  # a listing finds it running: the old stop is past
    assert hv.shut_off_reasons("hv01") == {}


def test_a_paused_migration_copy_found_by_a_listing_does_not_clear_the_stop() -> None:
    hv, hv01, hv02, _ = two_hosts()
    guest = hv01.add("tenant1", persistent=False)
    hv.running_vms("hv01")
    guest.destroy()
    copy = hv02.add("tenant1", persistent=False)
    copy.paused_reason = libvirt.VIR_DOMAIN_PAUSED_MIGRATION  # an incoming copy, never ran there
    assert "tenant1" in hv.running_vms("hv02")
    assert hv.shut_off_reasons("hv01") == {"tenant1": "destroyed"}


@pytest.mark.parametrize("persistent", [False, True])
def test_a_failed_migration_keeps_the_sources_word_beside_the_targets(persistent: bool) -> None:
    """The tenant destroys a guest on its source while it migrates: libvirt stops it there ("destroyed")
    and then tears down the target's incoming copy, worded "destroyed" too: recorded "failed" there, a
    copy that never ran. The source's word stays (a persistent guest's from libvirt's own state)."""
    hv, hv01, hv02, clock = two_hosts()
    guest = hv01.add("vm1", persistent=persistent)
    hv.running_vms("hv01")
    hv.running_vms("hv02")
    network = hv01.network
    assert network is not None

    def new_job(dom: FakeDomain, to: FakeHost, params: dict[str, Any], flags: int) -> FakeJob:
        incoming = to.add("vm1", persistent=False)
        incoming.paused_reason = libvirt.VIR_DOMAIN_PAUSED_MIGRATION
        to.emit(incoming, libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_MIGRATED)
        dom.destroy()  # the tenant's
        incoming.destroy()  # libvirt's teardown of the copy: worded "destroyed" too (seen on the lab)
        job = FakeJob(lambda: {})
        job.abort_error = (libvirt.VIR_ERR_OPERATION_FAILED, "operation failed: domain is not running")
        job.finish("failed")
        return job

    network.on_job = new_job
    try:
        hv.migrate("vm1", "hv01", "hv02", MigrationOptions())
    except Exception as exc:  # noqa: BLE001 - the migration fails; what matters is what is known after
        assert "vm1" in str(exc)
    assert guest.active is False and ("vm1" in hv01.domains) is persistent and "vm1" not in hv02.domains
    # the fake's state reason for a shut-off domain is 1, libvirt's "shutdown"; the journal's is the event's
    assert hv.shut_off_reasons("hv01") == {"vm1": "shutdown" if persistent else "destroyed"}
    assert hv.shut_off_reasons("hv02") == {"vm1": "failed"}
    assert clock.now < 31


def test_a_successful_migration_then_a_destroy_on_the_target_is_the_targets_word() -> None:
    hv, hv01, hv02, _ = two_hosts()
    hv01.add("vm1", persistent=False)
    hv.running_vms("hv02")
    network = hv01.network
    assert network is not None

    def landing(dom: FakeDomain, to: FakeHost, params: dict[str, Any], flags: int) -> FakeJob:
        job = FakeJob(lambda: {})
        job.finish()
        return job

    network.on_job = landing
    hv.migrate("vm1", "hv01", "hv02", MigrationOptions())
    assert hv.shut_off_reasons("hv01") == {"vm1": "migrated"}  # not a stop from outside: a move
    hv02.domains["vm1"].destroy()
    assert hv.shut_off_reasons("hv02") == {"vm1": "destroyed"}


def test_closing_a_connection_deregisters_its_callback() -> None:
    # a registration holds libvirt's connection: closed without deregistering, its socket stays open
    hv, hv01, hv02, _ = two_hosts()
    hv.running_vms("hv01")
    hv.running_vms("hv02")
    assert len(hv01.listeners) == 1 and len(hv02.listeners) == 1
    hv.connections.close()
    for _ in range(500):  # closed on a thread of its own (a close may hang on a vanished host)
        if not (hv01.listeners or hv02.listeners):
            break
        time.sleep(0.01)
    assert hv01.listeners == {} and hv02.listeners == {}


def test_the_journal_is_bounded_and_forgets_the_oldest() -> None:
    journal = StopJournal(limit=3)
    host = FakeHost("hv01")
    for n in range(5):
        journal._event(None, FakeDomain(host, f"vm{n}"), libvirt.VIR_DOMAIN_EVENT_STOPPED,
                       libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED, "hv01")
    assert journal.stopped_on("hv01") == {"vm2": "destroyed", "vm3": "destroyed", "vm4": "destroyed"}
    journal._event(None, FakeDomain(host, "vm2"), libvirt.VIR_DOMAIN_EVENT_STOPPED,
                   libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN, "hv02")  # vm2 newest now
    journal._event(None, FakeDomain(host, "vm5"), libvirt.VIR_DOMAIN_EVENT_STOPPED,
                   libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED, "hv01")
    assert journal.names() == {"vm2", "vm4", "vm5"}
    assert journal.stopped_on("hv02") == {"vm2": "shutdown"}


def test_a_connection_without_events_is_used_as_before() -> None:
    journal = StopJournal()

    class NoEvents:
        pass

    journal.listen(NoEvents(), "hv01")  # type: ignore[arg-type]
    journal.unlisten(NoEvents())  # type: ignore[arg-type]
    assert journal.stopped_on("hv01") == {}


def test_a_vm_stopped_mid_migration_on_two_hosts_is_its_sources_per_the_migrations_record(
        sim_inventory: Path) -> None:
    """Where the driver did not see the incoming copy come in, its teardown reads "destroyed" on the target
    too: the migration's record (it found the VM stopped on its source) says which host's word it is."""
    from hostmaint import maintenance as steps
    from hostmaint.models import Step, StepOutcome
    from hostmaint.runtime import open_runtime

    rt = open_runtime(sim_inventory, fresh=True)
    run = steps.RunContext(run_id="run-1", flow="evacuate-host", operator="alice")
    off = {"vm1": {"hv01": "destroyed", "hv02": "destroyed"}}
    assert steps.stopped_outside(rt, run, off) == {}  # two hosts say so, nothing says which: not decided
    with steps.audited(rt, run, Step.MIGRATE, host="hv01", vm="vm1") as rec:
        rec.outcome = StepOutcome.SKIPPED
        rec.details.update(source="hv01", target="hv02", stopped_outside="destroyed")
    assert steps.stopped_outside(rt, run, off) == {"vm1": ("hv01", "destroyed")}
    [found] = [r for r in rt.audit.records(run_id="run-1") if r.step == Step.VM_STOPPED_OUTSIDE]
    assert (found.vm, found.host, found.details["reason"]) == ("vm1", "hv01", "destroyed")
    # another run's record is not this run's evidence
    other = steps.RunContext(run_id="run-2", flow="evacuate-host", operator="alice")
    assert steps.stopped_outside(rt, other, off) == {}
