"""Two hosts of one cluster drain at the same time on the real lab: real libvirtd, live migrations.

Four lab hosts; hv01 and hv02 each carry a Linux guest that rewrites its memory and a SeaBIOS
guest. Their migrations are capped at 16 MiB/s (post-copy allowed), so each drain takes long
enough for the other to start beside it. Runs as root; its own lab, torn down at the end.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from hostmaint.lab import LabInfo, add_guest, lab_down, lab_up
from hostmaint.models import HostState, StepOutcome
from tests.lab.labkit import WORKDIR, hostmaint_db_at, lab_skip_reason, leftovers, wait_for_no_foreign_lab

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("prefect_server")]


@pytest.fixture(scope="module")
def four_hosts(prefect_server: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LabInfo, Path]]:
    reason = lab_skip_reason()
    if reason:
        pytest.skip(reason)
    from flows.locks import ensure_limits

    wait_for_no_foreign_lab()
    lab_down(WORKDIR)
    info = lab_up(hosts=4, vms=2, workdir=WORKDIR, linux_guests=0, host_memory_mib=1024)
    home = tmp_path_factory.mktemp("side-by-side")
    try:
        for host in ("hv01", "hv02"):
            add_guest(info, f"busy-{host}", host, memory_mib=256, linux=True)
        data = yaml.safe_load(info.inventory_path.read_text())
        cluster = data["clusters"][0]
        # spare_hosts 0: with hv04 held back for a moment, hv03 alone must be allowed to take hv01's guests
        cluster["limits"].update({"max_hosts_in_maintenance": 2, "migrations_per_cluster": 4,
                                  "migrations_per_source": 2, "spare_hosts": 0})
        # slow, sure migrations: capped, and a guest that cannot converge at the cap goes post-copy
        # (update, not replace: the lab's tls: off stays)
        cluster["migration"].update({"bandwidth_mib_s": 16, "allow_post_copy": True, "stall_seconds": 6})
        inventory = home / "inventory.yaml"
        inventory.write_text(yaml.safe_dump(data))
        ensure_limits(inventory)
        with hostmaint_db_at(home / "hostmaint.db"):
            yield info, inventory
    finally:
        lab_down(WORKDIR)
        assert not leftovers(WORKDIR), leftovers(WORKDIR)


def test_two_real_drains_run_side_by_side_onto_different_hosts(four_hosts: tuple[LabInfo, Path]) -> None:
    from hostmaint.runtime import open_runtime
    from tests.side_by_side import assert_drained_at_once_onto_different_hosts, evacuate_side_by_side

    info, inventory = four_hosts
    rt = open_runtime(inventory)
    hosts = [h.name for h in info.hosts]

    def placement() -> dict[str, list[str]]:
        return {vm: [h for h in hosts if vm in rt.hypervisor.running_vms(h)]
                for h in hosts for vm in rt.hypervisor.running_vms(h)}

    before = placement()
    assert {vm for vm, on in before.items() if on == ["hv01"]} >= {"busy-hv01"}
    # an operator took hv01 and hv02 out of placement (neither plan targets the other), and hv04 for
    # now: hv01's VMs all go to hv03 (the planner would spread them over both free hosts otherwise)
    for host in ("hv01", "hv02", "hv04"):
        rt.states.transition(host, HostState.CORDONED, "test: operator cordon")

    # hv03 is busy with hv01's drain when hv04 comes back: hv02's plan prefers hv04 and drains beside it
    results = evacuate_side_by_side(rt, inventory, "hv01", "hv02", once_first_drains=lambda: rt.states.transition(
        "hv04", HostState.ACTIVE, "test: operator uncordon"))

    assert {h: r.outcome for h, r in results.items()} == {"hv01": StepOutcome.OK, "hv02": StepOutcome.OK}
    after = placement()
    assert set(after) == set(before) and all(len(on) == 1 for on in after.values()), after
    assert not rt.hypervisor.running_vms("hv01") and not rt.hypervisor.running_vms("hv02")
    assert_drained_at_once_onto_different_hosts(rt.audit.records(), "hv01", "hv02")  # real migrations at once
    assert rt.audit.verify().ok


def test_a_real_window_of_two_patches_drains_them_side_by_side(four_hosts: tuple[LabInfo, Path]) -> None:
    """After the evacuations above the guests run on hv03 and hv04, and hv01 and hv02 are empty. A
    patch window of hv03 and hv04, two at once: both plan at its start, focused on the emptiest hosts
    (the same one, unless the second plans after the first drain took it); they drain at the same
    time, each onto a host of its own, patch, reboot and come back."""
    from flows.patch_window import patch_window
    from hostmaint.models import Trigger
    from hostmaint.runtime import open_runtime
    from tests.side_by_side import assert_drained_at_once_onto_different_hosts

    info, inventory = four_hosts
    rt = open_runtime(inventory)
    hosts = [h.name for h in info.hosts]
    for host in ("hv01", "hv02"):  # the operator puts the evacuated hosts back
        if rt.states.state(host) is not HostState.ACTIVE:
            rt.states.transition(host, HostState.ACTIVE, "test: operator uncordon")
    guests = {vm for h in hosts for vm in rt.hypervisor.running_vms(h)}
    assert not rt.hypervisor.running_vms("hv01") and not rt.hypervisor.running_vms("hv02")
    seen = len(rt.audit.records())

    outcomes = patch_window(cluster=rt.cluster_of("hv03"), hosts=["hv03", "hv04"], max_hosts_in_parallel=2,
                            window_id="lab-two", operator="lab", inventory=str(inventory), trigger=Trigger.TEST,
                            rebalance_moves=0)

    assert {o.host: o.outcome for o in outcomes} == {"hv03": StepOutcome.OK, "hv04": StepOutcome.OK}, outcomes
    running = {h: rt.hypervisor.running_vms(h) for h in hosts}
    assert sorted(vm for vms in running.values() for vm in vms) == sorted(guests)  # each once, none lost
    assert not running["hv03"] and not running["hv04"]
    records = rt.audit.records()[seen:]
    assert_drained_at_once_onto_different_hosts(records, "hv03", "hv04")
    assert all(r.inputs["focus"] for r in records if r.step == "plan")
    assert {r.host for r in records if r.step == "verify"} == {"hv03", "hv04"}
    assert rt.audit.verify().ok
