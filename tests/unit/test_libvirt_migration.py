"""The libvirt driver's migration monitor over fake hosts: progress from jobStats, the driver's last word
(abort, or post-copy where allowed) on the test's clock, and where the VM runs afterwards. The lab
tests run the same against real migrations."""

from __future__ import annotations

from typing import Any

import pytest

from hostmaint.drivers.libvirt import LibvirtHypervisor
from hostmaint.errors import MigrationError
from hostmaint.models import MigrationOptions, MigrationProgress, StepOutcome
from tests.fakes.libvirtd import FakeClock, FakeConnector, FakeDomain, FakeHost, FakeJob, FakeNetwork

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
    hv = LibvirtHypervisor(URIS, connector=FakeConnector(network), clock=clock, sleep=clock.sleep)
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
