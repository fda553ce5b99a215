"""Hosts that come back from their reboot changed, on the real lab: patch-host must never call them
verified, and must leave them out of service with the real reason.

- the host comes back with another SSH host key (reinstalled, or another machine on its address);
- the reboot only restarted userspace (a soft reboot): the host answers again with its old boot id;
- libvirtd does not start at boot, or starts after sshd;
- the host comes back with less memory (a DIMM lost at POST): its NUMA cell changed, also when the run
  that rebooted it died during the reboot and another run verifies it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostmaint.lab import LabInfo
from hostmaint.models import HostState, StepOutcome, Trigger
from tests.lab.labkit import HOST_MEMORY_MIB, WORKDIR, all_vms, fresh_lab

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("prefect_server")]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def reboot_lab(prefect_server: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabInfo]:
    with fresh_lab(tmp_path_factory.mktemp("lab-reboot-faults") / "hostmaint.db") as info:
        yield info


@pytest.fixture
def rt(reboot_lab: LabInfo) -> Any:
    from hostmaint.runtime import open_runtime

    return open_runtime(reboot_lab.inventory_path)


def _reactivate(rt: Any) -> None:
    """Hosts an earlier test left out of service go back, as an operator would put them."""
    for host in ("hv01", "hv02", "hv03"):
        if rt.states.state(host) is HostState.FAILED:
            rt.states.transition(host, HostState.CORDONED, "test: operator reset")
        if rt.states.state(host) is not HostState.ACTIVE:
            rt.states.transition(host, HostState.ACTIVE, "test: operator uncordon")


def _always_reboot(lab: LabInfo, tmp_path: Path, host: str, timeout_s: int = 30) -> str:
    """The lab's inventory with ``host`` rebooted by every patch (its kernel is new after the first)."""
    import yaml

    from flows.locks import ensure_limits

    data = yaml.safe_load(lab.inventory_path.read_text())
    for entry in data["hosts"]:
        if entry["name"] == host:
            entry["policy"] = {"reboot": "always", "reboot_timeout_s": timeout_s}
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(data))
    ensure_limits(path)
    return str(path)


def _patch_fails(host: str, inventory: str, match: str) -> str:
    """patch-host of ``host`` fails with an error matching ``match``; returns its message."""
    from flows.patch_host import patch_host
    from hostmaint.errors import HostmaintError

    with pytest.raises(HostmaintError, match=match) as err:
        patch_host(host=host, operator="lab-test", reason="reboot fault", inventory=inventory, trigger=Trigger.TEST)
    return str(err.value)


def _wait_up(host: str, timeout: float = 60) -> None:
    from hostmaint.lab.host import read_status

    deadline = time.monotonic() + timeout
    while read_status(WORKDIR, host).get("phase") != "up":
        assert time.monotonic() < deadline, f"{host} did not boot within {timeout} s"
        time.sleep(0.2)


def _left_out_safely(rt: Any, host: str, before: dict[str, list[str]], says: str) -> None:
    """``host`` is failed with a reason saying ``says``, never verified, and every VM runs once elsewhere."""
    record = rt.states.get(host)
    assert record.state is HostState.FAILED, record
    assert says.lower() in record.reason.lower(), record.reason
    run = rt.audit.records(host=host)[-1].run_id
    this_run = rt.audit.records(host=host, run_id=run)
    assert not [r for r in this_run if r.step in ("verify", "uncordon") and r.outcome is StepOutcome.OK], this_run
    after = all_vms(rt)
    assert set(after) == set(before) and all(len(h) == 1 for h in after.values()), after
    assert not [vm for vm, hosts in after.items() if host in hosts], after
    assert rt.audit.verify().ok


def test_a_host_back_with_another_host_key_is_refused_and_left_failed_saying_so(reboot_lab: LabInfo, rt: Any,
                                                                                tmp_path: Path) -> None:
    from flows.patch_host import patch_host
    from hostmaint.lab.faults import reboots, reimage_at_reboot, trust_host_key

    _reactivate(rt)
    host = "hv02"
    inventory = _always_reboot(reboot_lab, tmp_path, host)
    before = all_vms(rt)
    booted = len(reboots(WORKDIR, host))
    mend = reimage_at_reboot(WORKDIR, host)
    try:
        said = _patch_fails(host, inventory, "host key")
    finally:
        mend()
    assert len(reboots(WORKDIR, host)) == booted + 1  # it did reboot, empty
    assert "CHANGED" in said, said
    _left_out_safely(rt, host, before, "host key")

    # the operator checks the new key out of band, trusts it, resets the host: the next patch goes through
    _wait_up(host)
    trust_host_key(WORKDIR, reboot_lab.known_hosts_path, host, reboot_lab.host(host).ip)
    _reactivate(rt)
    result = patch_host(host=host, operator="lab-test", reason="after the new key", inventory=inventory,
                        trigger=Trigger.TEST)
    assert result.outcome is StepOutcome.OK, result.detail
    assert rt.states.state(host) is HostState.ACTIVE


def test_a_reboot_that_kept_the_boot_id_is_failed_as_not_rebooted(reboot_lab: LabInfo, rt: Any,
                                                                   tmp_path: Path) -> None:
    from hostmaint.lab.faults import soft_reboot

    _reactivate(rt)
    host = "hv03"
    inventory = _always_reboot(reboot_lab, tmp_path, host, timeout_s=25)
    before = all_vms(rt)
    mend = soft_reboot(WORKDIR, host, down_seconds=10)  # longer than the SSH driver's retries ride out
    try:
        _patch_fails(host, inventory, "did not reboot")
    finally:
        mend()
    # it went down and answered again, with the boot it had: neither "did not come back" nor rebooted
    reason = rt.states.get(host).reason
    assert "did not come back" not in reason and "boot id" in reason, reason
    _left_out_safely(rt, host, before, "did not reboot")


def test_a_host_back_without_libvirtd_is_failed_naming_it(reboot_lab: LabInfo, rt: Any, tmp_path: Path) -> None:
    from hostmaint.lab import start_libvirtd
    from hostmaint.lab.faults import reboot_without_libvirtd

    _reactivate(rt)
    host = "hv01"
    inventory = _always_reboot(reboot_lab, tmp_path, host)
    before = all_vms(rt)
    mend = reboot_without_libvirtd(WORKDIR, host)
    try:
        _patch_fails(host, inventory, "libvirtd")
    finally:
        mend()
        _wait_up(host)
        start_libvirtd(host, WORKDIR)
    _left_out_safely(rt, host, before, "libvirtd")


def test_a_host_whose_libvirtd_answers_after_its_sshd_is_verified_once_it_does(reboot_lab: LabInfo, rt: Any,
                                                                              tmp_path: Path) -> None:
    from flows.patch_host import patch_host
    from hostmaint.lab.faults import slow_libvirtd_at_reboot

    _reactivate(rt)
    host = "hv01"
    inventory = _always_reboot(reboot_lab, tmp_path, host)
    before = all_vms(rt)
    mend = slow_libvirtd_at_reboot(WORKDIR, host, 8)
    try:
        result = patch_host(host=host, operator="lab-test", reason="slow libvirtd", inventory=inventory,
                            trigger=Trigger.TEST)
    finally:
        mend()
    assert result.outcome is StepOutcome.OK, result.detail
    assert rt.states.state(host) is HostState.ACTIVE
    run = rt.audit.records(host=host)[-1].run_id
    [verify] = [r for r in rt.audit.records(host=host, run_id=run) if r.step == "verify"]
    assert verify.outcome is StepOutcome.OK and verify.details["verify"]["ok"], verify.details
    after = all_vms(rt)
    assert set(after) == set(before) and all(len(h) == 1 for h in after.values()), after
    assert rt.audit.verify().ok


def test_a_host_back_with_less_memory_is_failed_naming_its_numa_cell(reboot_lab: LabInfo, rt: Any,
                                                                     tmp_path: Path) -> None:
    from hostmaint.lab.faults import change_memory_at_reboot

    _reactivate(rt)
    host = "hv02"
    inventory = _always_reboot(reboot_lab, tmp_path, host)
    before = all_vms(rt)
    memory = HOST_MEMORY_MIB[1]
    mend = change_memory_at_reboot(WORKDIR, host, memory - 256)
    try:
        _patch_fails(host, inventory, "numa")
    finally:
        mend()
    _left_out_safely(rt, host, before, f"memory {memory} -> {memory - 256} MiB")


def test_a_host_back_with_less_memory_after_its_run_died_is_failed_by_the_next_run(
        reboot_lab: LabInfo, rt: Any, tmp_path: Path) -> None:
    """The run that rebooted the host dies during the reboot; the run after it proves the reboot and
    verifies the host against the topology recorded before the reboot, not against nothing."""
    from prefect.settings import PREFECT_API_URL

    from flows.patch_host import patch_host
    from hostmaint.lab.faults import change_memory_at_reboot
    from hostmaint.lab.host import read_status
    from tests.lab.test_lab_truth import _expire_leases

    _reactivate(rt)
    host = "hv03"
    inventory = _always_reboot(reboot_lab, tmp_path, host)
    before = all_vms(rt)
    memory = HOST_MEMORY_MIB[2]
    booted = read_status(WORKDIR, host).get("boot_count")
    mend = change_memory_at_reboot(WORKDIR, host, memory - 256)
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "HOSTMAINT_LOCK_LEASE_SECONDS": "60"}
    script = ("from flows.patch_host import patch_host\n"
              f"patch_host(host={host!r}, operator='lab-test', reason='dies', inventory={inventory!r}, "
              "trigger='test')\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while read_status(WORKDIR, host).get("phase") != "down":
            assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before the host went down"
            assert time.monotonic() < deadline, "the host was never rebooted"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the run dies while its host reboots
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        mend()
    _wait_up(host)
    assert read_status(WORKDIR, host).get("boot_count") != booted
    assert rt.states.state(host) is HostState.REBOOTING

    _expire_leases(rt)
    with pytest.raises(Exception, match="numa"):
        patch_host(host=host, operator="lab-test", reason="after the dead run", inventory=inventory,
                   trigger=Trigger.TEST, lock_wait_s=30)
    _left_out_safely(rt, host, before, f"memory {memory} -> {memory - 256} MiB")
