"""Migration TLS and the migration network on the real lab (issue 20): one TLS lab (its own PKI, libvirtd
on TLS with client certificates checked, QEMU migration TLS, a second bridge as the migration network).

- a drain under ``migration.tls: required`` moves every VM with TLS, and its bytes cross the migration
  network, not the management one (the hosts' interface counters);
- on the wire: a marker the guest holds in memory is absent from a capture of the TLS migration stream
  and present in a plain one; ``qemu+ssh://`` works end to end, the peer-to-peer connection included;
- a host whose QEMU certificate comes from another CA is refused by hostmaint's precheck naming it, and
  by QEMU itself when asked anyway: the VM stays where it was;
- TLS off on one host: ``required`` refuses before the cordon, nothing changed; ``preferred`` migrates to
  it in plain TCP and records the fallback in the audit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path

import pytest
import yaml

from hostmaint.errors import MigrationError, StepError
from hostmaint.lab import LabInfo, lab_down, lab_up
from hostmaint.lab.capture import WireCapture
from hostmaint.lab.lab import add_guest, reissue_qemu_certs, remove_qemu_certs
from hostmaint.lab.network import MIG_SUBNET, interface_bytes, migration_veth_name, veth_name
from hostmaint.maintenance import RunContext, cordon, drain_host, plan_drain, precheck
from hostmaint.models import HostState, MigrationOptions
from hostmaint.runtime import Runtime, open_runtime
from tests.lab.labkit import WORKDIR, hostmaint_db_at, lab_skip_reason, leftovers, wait_for_no_foreign_lab

pytestmark = pytest.mark.lab

SEED = "Tls20x"  # the guest builds "hostmaint-marker:<SEED>" itself: the domain XML holds only the seed
MARKER = f"hostmaint-marker:{SEED}".encode()


@pytest.fixture(scope="module")
def tls_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabInfo]:
    reason = lab_skip_reason()
    if reason:
        pytest.skip(reason)
    wait_for_no_foreign_lab()
    lab_down(WORKDIR)
    info = lab_up(hosts=3, vms=2, workdir=WORKDIR, linux_guests=0, tls=True, host_memory_mib=1024)
    try:
        # a quiet Linux guest (TCG) holding the marker 8,192 times in its memory
        add_guest(info, "mark01", "hv01", memory_mib=256, linux=True, dirty_mib=0, marker=SEED)
        console = info.workdir / "guests" / "mark01.console"
        deadline = time.monotonic() + 180
        while "marker written" not in console.read_text(errors="replace"):
            assert time.monotonic() < deadline, "the marker guest did not write its marker"
            time.sleep(0.5)
        with hostmaint_db_at(tmp_path_factory.mktemp("lab-tls") / "hostmaint.db"):
            yield info
    finally:
        lab_down(WORKDIR)
        assert not leftovers(WORKDIR), leftovers(WORKDIR)


def _runtime(info: LabInfo, inventory: Path | None = None) -> Runtime:
    return open_runtime(inventory or info.inventory_path, fresh=True)


def _where(rt: Runtime, vm: str) -> tuple[str, ...]:
    return rt.hypervisor.locate(vm)


def _back_in_service(rt: Runtime, host: str) -> None:
    """A host a test drained goes back into service, as an operator would put it (the next test plans)."""
    states = rt.states
    if states.state(host) is HostState.DRAINING:
        states.transition(host, HostState.DRAINED, "test: drained", None)
    if states.state(host) is not HostState.ACTIVE:
        states.set_aside(host, "test: back", None)
        states.return_to_service(host, "test: back", None)


def test_a_drain_with_tls_required_moves_encrypted_on_the_migration_network(tls_lab: LabInfo) -> None:
    rt = _runtime(tls_lab)
    run = RunContext(operator="lab-test", reason="tls drain")
    precheck(rt, run, "hv01")  # every host ready: nothing refused
    cordon(rt, run, "hv01")
    plan = plan_drain(rt, run, "hv01")
    assert {p.vm for p in plan.placements} >= {"mark01", "vm01"}
    targets = sorted({p.target for p in plan.placements})
    links = [migration_veth_name(t) for t in targets] + [veth_name(h) for h in ("hv01", *targets)]
    before = {h.name: interface_bytes(h.name) for h in tls_lab.hosts}
    captures = [WireCapture(link, MARKER) for link in links]
    for cap in captures:
        cap.__enter__()
    try:
        report = drain_host(rt, run, plan)
    finally:
        for cap in captures:
            cap.__exit__(None, None, None)
    after = {h.name: interface_bytes(h.name) for h in tls_lab.hosts}

    assert report.ok, report.results
    for r in report.results:
        assert r.tls is True and r.migration_address is not None, r
        assert ip_address(r.migration_address) in MIG_SUBNET and r.migration_address != tls_lab.host(r.target).ip
        assert _where(rt, r.vm) == (r.target,)
    sent = {i: after["hv01"][i][1] - before["hv01"][i][1] for i in ("eth0", "eth1")}
    moved = sum(r.data_bytes for r in report.results)
    assert moved > 50 * 2**20  # the Linux guest's memory: enough to tell the networks apart
    assert sent["eth1"] >= 0.9 * moved, (sent, moved)  # the pages crossed the migration network ...
    assert sent["eth0"] < 0.05 * sent["eth1"], sent  # ... and the management one carried control only
    for cap in captures:
        assert cap.counts.marker_hits == 0, (cap.link, cap.counts)
        assert cap.counts.dropped == 0, (cap.link, cap.counts)
    on_migration = [c.counts for c in captures[:len(targets)]]
    assert sum(c.payload_bytes for c in on_migration) >= 0.9 * moved
    assert sum(c.tls_records for c in on_migration) > 0 and sum(c.qemu_stream_headers for c in on_migration) == 0
    drain_record = [r for r in rt.audit.records(host="hv01", run_id=run.run_id)
                    if str(r.step) == "drain"][-1]
    assert drain_record.details["transport"]["tls"] == "required"
    assert all(h["tls"] == "ready" for h in drain_record.details["transport"]["hosts"].values())
    _back_in_service(rt, "hv01")


def test_the_marker_crosses_the_wire_in_plain_text_without_tls_and_qemu_ssh_works_end_to_end(
        tls_lab: LabInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    from hostmaint.drivers.libvirt import LibvirtHypervisor

    rt = _runtime(tls_lab)
    (source,) = _where(rt, "mark01")
    target = "hv01" if source != "hv01" else "hv02"
    with WireCapture(migration_veth_name(target), MARKER) as cap:
        rt.hypervisor.migrate("mark01", source, target,
                              MigrationOptions(tls=False, migration_address=tls_lab.host(target).migration_ip))
    # most of the marker's pages cross in clear (8160 of 8192 seen in one run: a few can go before the
    # capture starts); with TLS the same capture finds none
    assert cap.counts.marker_hits >= 4096 and cap.counts.qemu_stream_headers > 0, cap.counts
    assert cap.counts.dropped == 0

    # qemu+ssh: hostmaint's connections and the source libvirtd's peer-to-peer one go over SSH, host keys
    # checked against the lab's known_hosts (the ssh on PATH plays root's ssh config)
    monkeypatch.setenv("PATH", f"{tls_lab.ssh_bin}:{os.environ['PATH']}")
    hv = LibvirtHypervisor({h.name: tls_lab.ssh_uri(h.name) for h in tls_lab.hosts})
    try:
        (vm_host,) = hv.locate("vm02")
        to = "hv03" if vm_host != "hv03" else "hv02"
        options = MigrationOptions(tls=True, migration_address=tls_lab.host(to).migration_ip)
        result = hv.migrate("vm02", vm_host, to, options)
        assert result.tls is True and hv.locate("vm02") == (to,)
    finally:
        hv.close()


def test_a_host_with_a_certificate_from_another_ca_is_refused_and_the_vm_stays(tls_lab: LabInfo) -> None:
    rt = _runtime(tls_lab)
    run = RunContext(operator="lab-test", reason="foreign CA")
    (source,) = _where(rt, "vm01")
    reissue_qemu_certs(tls_lab, "hv03", foreign=True)
    try:
        others = [h.name for h in tls_lab.hosts if h.name != source]
        for h in others:
            _back_in_service(rt, h)
        if source != "hv03":
            with pytest.raises(StepError) as refused:
                precheck(rt, run, source)
            assert "hv03" in str(refused.value) and "not signed by the CA" in str(refused.value)
            assert rt.states.state(source) is HostState.ACTIVE
        # asked anyway, QEMU refuses it too: the guest stays on its source
        mover, to = (source, "hv03") if source != "hv03" else ("hv03", "hv01")
        with pytest.raises(MigrationError) as failed:
            rt.hypervisor.migrate("vm01", mover, to,
                                  MigrationOptions(tls=True, migration_address=tls_lab.host(to).migration_ip))
        assert f"still runs on {mover}" in str(failed.value) and "TLS" in str(failed.value)
        assert _where(rt, "vm01") == (mover,)
    finally:
        reissue_qemu_certs(tls_lab, "hv03")


def test_libvirtd_admits_only_clients_with_a_certificate_from_its_ca(tls_lab: LabInfo, tmp_path: Path) -> None:
    from hostmaint.lab import pki

    other = pki.make_ca(tmp_path / "ca", "another CA", organization="hostmaint lab")  # even the allowed DN
    pki.make_operator_client(other, tmp_path / "client")
    # the client trusts the lab's CA (so it accepts the server): only libvirtd's check of the client can refuse
    shutil.copy2(tls_lab.client_pki / "cacert.pem", tmp_path / "client" / "cacert.pem")
    uri = f"qemu+tls://{tls_lab.host('hv01').ip}/system"
    ours = subprocess.run(["virsh", "-c", f"{uri}?pkipath={tls_lab.client_pki}", "hostname"],
                          capture_output=True, text=True, timeout=60)
    theirs = subprocess.run(["virsh", "-c", f"{uri}?pkipath={tmp_path / 'client'}", "hostname"],
                            capture_output=True, text=True, timeout=60)
    assert ours.returncode == 0 and ours.stdout.strip() == "hv01", ours.stderr
    assert theirs.returncode != 0, theirs.stdout


def test_tls_off_on_one_host_is_refused_before_the_cordon_and_preferred_falls_back_with_a_warning(
        tls_lab: LabInfo, tmp_path: Path) -> None:
    rt = _runtime(tls_lab)
    run = RunContext(operator="lab-test", reason="tls off on hv02")
    for h in tls_lab.hosts:
        _back_in_service(rt, h.name)
    # the source must hold a VM to drain (earlier tests moved guests around): hv03, else hv01
    source = "hv03" if rt.hypervisor.running_vms("hv03") else "hv01"
    spare = "hv01" if source == "hv03" else "hv03"
    remove_qemu_certs(tls_lab, "hv02")
    try:
        records_before = len(rt.audit.records(host=source))
        with pytest.raises(StepError) as refused:
            precheck(rt, run, source)
        text = str(refused.value)
        assert "hv02: no QEMU TLS certificates" in text and "nothing changed" in text, text
        assert rt.states.state(source) is HostState.ACTIVE
        steps = [str(r.step) for r in rt.audit.records(host=source)[records_before:]]
        assert "cordon" not in steps

        # preferred: the same cluster drains onto hv02 (the third host set aside) in plain TCP, and the audit says so
        doc = yaml.safe_load(tls_lab.inventory_path.read_text())
        doc["clusters"][0]["migration"]["tls"] = "preferred"
        doc["clusters"][0]["limits"]["spare_hosts"] = 0  # one target left: N+1 cannot hold here
        preferred = tmp_path / "inventory.yaml"
        preferred.write_text(yaml.safe_dump(doc))
        rt2 = _runtime(tls_lab, preferred)
        run2 = RunContext(operator="lab-test", reason="preferred")
        rt2.states.set_aside(spare, "test: not a target", None)
        precheck(rt2, run2, source)
        cordon(rt2, run2, source)
        plan = plan_drain(rt2, run2, source)
        assert plan.placements and {p.target for p in plan.placements} == {"hv02"}
        report = drain_host(rt2, run2, plan)
        assert report.ok, report.results
        assert all(r.tls is False and r.migration_address == tls_lab.host("hv02").migration_ip
                   for r in report.results), report.results
        drain_record = [r for r in rt2.audit.records(host=source, run_id=run2.run_id)
                        if str(r.step) == "drain"][-1]
        warnings = drain_record.details["transport_warnings"]
        assert any("fell back to plain TCP" in w and "hv02: no QEMU TLS certificates" in w for w in warnings), warnings
        for name in (source, spare):
            _back_in_service(rt2, name)
    finally:
        reissue_qemu_certs(tls_lab, "hv02")
