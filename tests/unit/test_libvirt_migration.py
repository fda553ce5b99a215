"""The libvirt driver's migration monitor over fake hosts: progress from jobStats, the driver's last word
(abort, or post-copy where allowed) on the test's clock, and where the VM runs afterwards. The lab
tests run the same against real migrations."""

from __future__ import annotations

import threading
from typing import Any

import libvirt
import pytest

from hostmaint.drivers.libvirt import LibvirtHypervisor, MonitorSettings
from hostmaint.errors import DriverError, MigrationError
from hostmaint.models import MigrationOptions, MigrationProgress, StepOutcome
from tests.fakes.libvirtd import FakeClock, FakeConnector, FakeDomain, FakeHost, FakeJob, FakeNetwork, no_domain

MIB = 1024**2
URIS = {"hv01": "qemu+tcp://10.213.7.11/system", "hv02": "qemu+tcp://10.213.7.12/system"}


def lab(stats: Any) -> tuple[LibvirtHypervisor, FakeNetwork, FakeClock]:
    """hv01 runs vm1; its migration's progress is ``stats(job, clock)`` on each jobStats call."""
    network = FakeNetwork({URIS["hv01"]: FakeHost("hv01"), URIS["hv02"]: FakeHost("hv02")})
    network[URIS["hv01"]].add("vm1")
    clock = FakeClock()

    def new_job(dom: FakeDomain, target: FakeHost, params: dict[str, Any], flags: int) -> FakeJob:
        job = FakeJob(lambda: {})
        job.stats = lambda: stats(job, clock)
        return job

    network.on_job = new_job
    hv = LibvirtHypervisor(URIS, connector=FakeConnector(network), clock=clock, sleep=clock.sleep, wait=clock.wait)
    return hv, network, clock


def crawl(job: FakeJob, clock: FakeClock) -> dict[str, Any]:
    """A migration that keeps sending but never gets below 160 of its 256 MiB left; in post-copy it ends."""
    if job.post_copy:
        job.finish()
    return {"data_total": 256 * MIB, "data_processed": int(clock.now * MIB), "data_remaining": 160 * MIB}


def test_a_migration_that_stops_progressing_is_aborted_and_stays_on_its_source() -> None:
    hv, network, clock = lab(crawl)
    samples: list[MigrationProgress] = []
    options = MigrationOptions(stall_seconds=3, min_budget_seconds=100)
    with pytest.raises(MigrationError) as caught:
        hv.migrate("vm1", "hv01", "hv02", options, samples.append)
    err = caught.value
    assert (err.vm, err.host, err.target) == ("vm1", "hv01", "hv02")
    assert "stall rule: no progress for 3s" in str(err) and "still runs on hv01" in str(err)
    [(job, _, _)] = network.jobs
    assert job.outcome == "aborted"
    assert 3.0 <= clock.now < 4.0  # decided on the first sample 3 s after the last new low
    assert hv.locate("vm1") == ("hv01",)


def steady(job: FakeJob, clock: FakeClock) -> dict[str, Any]:
    """A migration that keeps sending and never finishes by itself."""
    return {"data_total": 256 * MIB, "data_processed": int(clock.now * MIB) + 1, "data_remaining": 200 * MIB}


@pytest.mark.parametrize("reported", [None, (libvirt.VIR_ERR_INTERNAL_ERROR, "internal error: qemu unexpectedly "
                                             "closed the monitor: load of migration failed: Invalid argument")])
def test_a_migration_aborted_on_request_says_so_whatever_libvirt_reports(reported: tuple[int, str] | None) -> None:
    # seen on the lab: aborting a running migration, libvirt sometimes reports the target QEMU's failure
    # on the cut stream instead of "operation aborted"; the error must still say it was aborted as asked
    hv, network, _ = lab(steady)

    def abort_once(p: MigrationProgress) -> None:
        [(job, _, _)] = network.jobs
        job.abort_error = reported
        if not job.ended.is_set():
            hv.abort("vm1", "hv01")

    with pytest.raises(MigrationError) as caught:
        hv.migrate("vm1", "hv01", "hv02", MigrationOptions(stall_seconds=600, min_budget_seconds=600), abort_once)
    text = str(caught.value)
    assert "aborted" in text and "still runs on hv01" in text and "stall rule" not in text
    if reported is not None:
        assert "aborted as asked" in text and "load of migration failed" in text
    assert hv.locate("vm1") == ("hv01",)


def test_an_abort_asked_of_one_migration_does_not_mark_the_next() -> None:
    hv, network, _ = lab(steady)
    hv.abort("vm1", "hv01")  # nothing runs: nothing to remember
    failing = (libvirt.VIR_ERR_INTERNAL_ERROR, "internal error: connection reset")

    def fail(p: MigrationProgress) -> None:
        [(job, _, _)] = network.jobs
        job.abort_error = failing
        job.finish("failed")

    with pytest.raises(MigrationError) as caught:
        hv.migrate("vm1", "hv01", "hv02", MigrationOptions(stall_seconds=600, min_budget_seconds=600), fail)
    assert "aborted" not in str(caught.value) and "connection reset" in str(caught.value)


def test_over_its_budget_a_migration_that_may_use_post_copy_is_switched_and_lands() -> None:
    hv, network, _ = lab(crawl)
    samples: list[MigrationProgress] = []
    options = MigrationOptions(post_copy=True, stall_seconds=60, min_budget_seconds=3, seconds_per_gib=1)
    result = hv.migrate("vm1", "hv01", "hv02", options, samples.append)
    assert result.outcome is StepOutcome.OK and hv.locate("vm1") == ("hv02",)
    [(job, _, flags)] = network.jobs
    assert job.post_copy and job.outcome == "migrated"
    assert any(s.elapsed_s >= 3 and s.data_remaining > s.data_total // 2 for s in samples)


def test_a_migration_the_scheduler_switched_to_post_copy_is_never_aborted() -> None:
    def slow_post_copy(job: FakeJob, clock: FakeClock) -> dict[str, Any]:
        if clock.now >= 20:
            job.finish()  # post-copy pulls the rest page by page, with no new low of "remaining" till then
        return {"data_total": 256 * MIB, "data_processed": int(clock.now * MIB), "data_remaining": 160 * MIB}

    hv, network, clock = lab(slow_post_copy)
    switched: list[float] = []

    def scheduler(sample: MigrationProgress) -> None:
        if sample.elapsed_s >= 1 and not switched:
            switched.append(sample.elapsed_s)
            hv.start_post_copy("vm1", "hv01")

    result = hv.migrate("vm1", "hv01", "hv02", MigrationOptions(post_copy=True, stall_seconds=3,
                                                                min_budget_seconds=100), scheduler)
    assert result.outcome is StepOutcome.OK and switched
    assert clock.now >= 20  # stalled for far longer than 3 s in post-copy
    assert "abortJob" not in network[URIS["hv02"]].domains["vm1"].calls


def done_at_once(job: FakeJob, clock: FakeClock) -> dict[str, Any]:
    job.finish()
    return {"data_total": 64 * MIB, "data_processed": 64 * MIB, "data_remaining": 0}


def test_the_monitor_wakes_when_the_migration_ends_not_at_its_next_poll() -> None:
    # the monitor's wait is a real wait for the job's end; a poll interval of an hour would show in the
    # test clock's seconds if it slept its interval out
    network = FakeNetwork({URIS["hv01"]: FakeHost("hv01"), URIS["hv02"]: FakeHost("hv02")})
    network[URIS["hv01"]].add("vm1")
    network.on_job = lambda dom, target, params, flags: FakeJob(lambda: {})
    clock = FakeClock()
    hv = LibvirtHypervisor(URIS, connector=FakeConnector(network), clock=clock, sleep=clock.sleep,
                           monitor=MonitorSettings(poll_interval_s=3600))
    finisher = threading.Timer(0.05, lambda: network.jobs[0][0].finish())
    finisher.start()
    result = hv.migrate("vm1", "hv01", "hv02", MigrationOptions())
    finisher.join()
    assert result.outcome is StepOutcome.OK and hv.locate("vm1") == ("hv02",)
    assert result.seconds == 0 and clock.slept == []


def test_migrations_from_one_source_reuse_a_connection_for_their_jobs() -> None:
    hv, network, _ = lab(done_at_once)
    connector = hv.connections._connector  # type: ignore[attr-defined]
    for source, target in [("hv01", "hv02"), ("hv02", "hv01"), ("hv01", "hv02"), ("hv02", "hv01")]:
        assert hv.migrate("vm1", source, target, MigrationOptions()).outcome is StepOutcome.OK
    # per host: this thread's connection and the one lent to each job in turn; not one per migration
    assert connector.uris.count(URIS["hv01"]) == 2 and connector.uris.count(URIS["hv02"]) == 2


def test_a_lent_connection_that_broke_is_replaced_before_the_next_job() -> None:
    hv, network, _ = lab(done_at_once)
    connector = hv.connections._connector  # type: ignore[attr-defined]
    hv.migrate("vm1", "hv01", "hv02", MigrationOptions())
    lent = [c for c in connector.opened if c.uri == URIS["hv02"]]
    for conn in lent:
        conn.reset()  # libvirtd on hv02 restarted: every connection to it is dead, though none knows yet
    result = hv.migrate("vm1", "hv02", "hv01", MigrationOptions())
    assert result.outcome is StepOutcome.OK and hv.locate("vm1") == ("hv01",)
    assert all(c.closed for c in lent)


def test_the_job_gets_the_downtime_limit_the_scheduler_chose_for_it() -> None:
    def quick(job: FakeJob, clock: FakeClock) -> dict[str, Any]:
        if clock.now >= 2:
            job.finish()
        return {"data_total": 256 * MIB, "data_processed": int(clock.now * MIB), "data_remaining": 64 * MIB}

    hv, network, _ = lab(quick)
    result = hv.migrate("vm1", "hv01", "hv02", MigrationOptions(downtime_limit_ms=165), None)
    assert result.outcome is StepOutcome.OK
    [(job, _, _)] = network.jobs
    assert job.max_downtime_ms == 165  # set on the running job: no migrateToURI3 parameter carries it


def test_a_limit_the_caller_lowers_before_the_monitors_first_setting_is_not_undone_by_it() -> None:
    # the drain lowers a running migration's limit (its reserve was learned) from its own thread; if that
    # lands before the monitor's first sample sets the limit the migration started with, the lower one holds
    hv: LibvirtHypervisor

    def lowered_at_once(job: FakeJob, clock: FakeClock) -> dict[str, Any]:
        if job.max_downtime_ms is None:
            hv.set_downtime_limit("vm1", "hv01", 61)  # before the monitor has set anything on the job
        if clock.now >= 2:
            job.finish()
        return {"data_total": 256 * MIB, "data_processed": int(clock.now * MIB), "data_remaining": 64 * MIB}

    hv, network, _ = lab(lowered_at_once)
    with pytest.raises(MigrationError, match="no migration of vm1 from hv01 runs here"):
        hv.set_downtime_limit("vm1", "hv01", 61)  # nothing runs: refused, nothing kept for a later job
    result = hv.migrate("vm1", "hv01", "hv02", MigrationOptions(downtime_limit_ms=165), None)
    assert result.outcome is StepOutcome.OK
    [(job, _, _)] = network.jobs
    assert job.max_downtime_ms == 61


def test_a_downtime_limit_that_could_not_be_set_is_logged_as_one_line(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # libvirt's errors quote the domain's name, which a tenant chose: the error is logged escaped
    def quick(job: FakeJob, clock: FakeClock) -> dict[str, Any]:
        if clock.now >= 2:
            job.finish()
        return {"data_total": 256 * MIB, "data_processed": int(clock.now * MIB), "data_remaining": 64 * MIB}

    hv, _, _ = lab(quick)

    def refused(vm: str, source: str, downtime_ms: int | None) -> None:
        raise DriverError("setting the downtime limit of web\x1b[2J\nhv01: migrated", source)

    monkeypatch.setattr(hv.migrations, "_apply_downtime", refused)
    with caplog.at_level("WARNING", logger="hostmaint"):
        assert hv.migrate("vm1", "hv01", "hv02", MigrationOptions(downtime_limit_ms=165)).outcome is StepOutcome.OK
    lines = [r.getMessage() for r in caplog.records if "downtime limit" in r.getMessage()]
    assert lines and all("\x1b" not in line and "\n" not in line and "web\\x1b[2J\\nhv01" in line for line in lines)


def done(job: FakeJob, clock: FakeClock) -> dict[str, Any]:
    job.finish()
    return {"data_total": 64 * MIB, "data_processed": 64 * MIB, "data_remaining": 0}


@pytest.mark.parametrize("autostarts", [True, False])
def test_a_moved_vm_keeps_its_autostart_which_libvirt_drops(autostarts: bool) -> None:
    hv, network, _ = lab(done)
    network[URIS["hv01"]].domains["vm1"].autostarts = autostarts

    assert hv.migrate("vm1", "hv01", "hv02", MigrationOptions()).outcome is StepOutcome.OK

    assert network[URIS["hv02"]].domains["vm1"].autostarts is autostarts


def test_the_autostart_flags_a_moved_vm_is_settled_with_are_read_and_set_on_the_host() -> None:
    # what a later run uses to put back the flag of a move whose run died before the driver could
    hv, network, _ = lab(done)
    hv01 = network[URIS["hv01"]]
    hv01.domains["vm1"].autostarts = True
    hv01.add("off", active=False)
    hv01.add("passing", persistent=False)  # transient: no autostart to have, not listed

    assert hv.autostarts("hv01") == {"off": False, "vm1": True}
    hv.set_autostart("off", "hv01", True)
    hv.set_autostart("vm1", "hv01", False)
    assert hv.autostarts("hv01") == {"off": True, "vm1": False}
    for vm in ("passing", "nowhere"):
        with pytest.raises(DriverError, match=f"{vm} is not defined on hv01"):
            hv.set_autostart(vm, "hv01", True)


def destroyed_mid_way(copy_gone_after_s: float | None) -> tuple[LibvirtHypervisor, FakeNetwork, FakeClock]:
    """vm1 destroyed on hv01 while it migrates: libvirt fails the migration and returns while the target's
    incoming copy (paused for the migration) is still there, gone ``copy_gone_after_s`` later (None: never).
    Seen on the lab under load; the paused copy never ran."""
    network = FakeNetwork({URIS["hv01"]: FakeHost("hv01"), URIS["hv02"]: FakeHost("hv02")})
    source, target = network[URIS["hv01"]], network[URIS["hv02"]]
    network[URIS["hv01"]].add("vm1")
    clock = FakeClock()

    def new_job(dom: FakeDomain, to: FakeHost, params: dict[str, Any], flags: int) -> FakeJob:
        job = FakeJob(lambda: {})
        dom.active = False  # the tenant's destroy
        gone_at = None if copy_gone_after_s is None else clock.now + copy_gone_after_s

        class IncomingCopy(FakeDomain):
            def state(self) -> tuple[int, int]:
                if gone_at is not None and clock.now >= gone_at:  # libvirt has torn it down
                    target.domains.pop("vm1", None)
                    raise no_domain("vm1")
                return super().state()

        copy = target.domains["vm1"] = IncomingCopy(target, "vm1")
        copy.paused_reason = libvirt.VIR_DOMAIN_PAUSED_MIGRATION
        job.abort_error = (libvirt.VIR_ERR_OPERATION_FAILED, "operation failed: domain is not running")
        job.finish("failed")
        return job

    network.on_job = new_job
    hv = LibvirtHypervisor(URIS, connector=FakeConnector(network), clock=clock, sleep=clock.sleep, wait=clock.wait)
    assert source.domains["vm1"].active
    return hv, network, clock


def test_a_failed_migrations_paused_copy_on_the_target_is_not_taken_for_the_vm_running_there() -> None:
    hv, network, clock = destroyed_mid_way(copy_gone_after_s=2.0)
    with pytest.raises(MigrationError) as caught:
        hv.migrate("vm1", "hv01", "hv02", MigrationOptions())
    assert "runs on neither host" in str(caught.value), str(caught.value)
    assert "vm1" not in network[URIS["hv02"]].domains and clock.now >= 2.0  # it waited for the teardown


def test_a_paused_copy_that_stays_makes_the_outcome_unknown_not_a_landing() -> None:
    hv, _, clock = destroyed_mid_way(copy_gone_after_s=None)
    with pytest.raises(MigrationError) as caught:
        hv.migrate("vm1", "hv01", "hv02", MigrationOptions())
    text = str(caught.value)
    assert "whether vm1 moved is unknown" in text and "still paused by the migration" in text, text
    assert "runs on hv02" not in text
    assert 30.0 <= clock.now < 31.0  # MonitorSettings.teardown_timeout_s, then it says so
