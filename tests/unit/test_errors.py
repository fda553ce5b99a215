"""Every failure names its host: a StepError's message starts with ``"{host}: "`` unless it already
names the host in one of the two forms the code uses (``"hv01: ..."``, ``"host hv01 ..."``). A host
name further on (a longer host name that starts with it, a VM named like the host, host output
quoted in the message) does not say which host failed."""

from __future__ import annotations

import pickle

import pytest

from hostmaint.errors import CommandError, StepError, TargetsUnreachable
from hostmaint.migration.drain import DrainReport
from hostmaint.models import Step


@pytest.mark.parametrize(("host", "message", "said"), [
    ("hv1", "cannot reach hv10 for the drain", "hv1: cannot reach hv10 for the drain"),
    ("hv1", "hv10: stopped answering", "hv1: hv10: stopped answering"),
    ("hv01", "hv01 failed to migrate (a VM named like its host)", "hv01: hv01 failed to migrate (a VM named like "
                                                                  "its host)"),
    ("hv01", "uname -n printed 'hv01'", "hv01: uname -n printed 'hv01'"),
    ("hv01", "hv01:no space", "hv01: hv01:no space"),
    ("hv01", "hv01: uname -r failed", "hv01: uname -r failed"),
    ("hv01", "host hv01 is failed (disk); an operator must clear it", "host hv01 is failed (disk); an operator "
                                                                      "must clear it"),
    ("hv01", "host hv010 is failed (disk)", "hv01: host hv010 is failed (disk)"),
    (None, "invariant broken: vm1 runs twice", "invariant broken: vm1 runs twice"),
])
def test_a_step_error_names_its_host_unless_its_message_starts_with_it(host: str | None, message: str,
                                                                       said: str) -> None:
    assert str(StepError(message, host, Step.UPDATE)) == said


def test_a_drain_that_lost_targets_names_its_host_too() -> None:
    err = TargetsUnreachable("drain of hv1: hv10 stopped answering", "hv1", ["hv10"], DrainReport((), (), 0.0, 0))
    assert str(err) == "hv1: drain of hv1: hv10 stopped answering"
    assert str(pickle.loads(pickle.dumps(err))) == str(err)  # Prefect keeps it pickled: no second prefix


def test_a_step_error_quoting_a_driver_error_of_its_host_names_the_host_once() -> None:
    from hostmaint.patching import _run

    class TimingOut:
        def run(self, host: str, argv: list[str], timeout: float = 60.0) -> None:
            raise CommandError(f"timed out after {timeout:g}s", host)

    with pytest.raises(StepError) as caught:
        _run(TimingOut(), "hv01", ["dnf", "-y", "update"], Step.UPDATE, 5)  # type: ignore[arg-type]
    assert str(caught.value) == "hv01: dnf -y update: timed out after 5s"


def test_a_migration_error_quoting_its_sources_driver_error_names_the_host_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import libvirt

    from hostmaint.drivers.libvirt import LibvirtHypervisor
    from hostmaint.errors import MigrationError
    from tests.fakes.libvirtd import FakeConnector, FakeError, FakeHost, FakeNetwork

    uri = "qemu+tcp://10.213.7.11/system"
    network = FakeNetwork({uri: FakeHost("hv01")})
    network[uri].add("vm1")  # no migration runs: libvirt refuses the switch
    hv = LibvirtHypervisor({"hv01": uri}, connector=FakeConnector(network))
    with pytest.raises(MigrationError) as caught:
        hv.start_post_copy("vm1", "hv01")
    assert str(caught.value).startswith(f"hv01: switching vm1 to post-copy on {uri}: ")

    def refuse(downtime_ms: int, flags: int) -> int:
        raise FakeError(libvirt.VIR_ERR_OPERATION_INVALID, "Requested operation is not valid: no job is active")

    monkeypatch.setattr(network[uri].domains["vm1"], "migrateSetMaxDowntime", refuse)
    with pytest.raises(MigrationError) as caught:
        hv.enable_auto_converge("vm1", "hv01")
    assert str(caught.value).startswith(f"hv01: raising the downtime limit of vm1 on {uri}: ")
