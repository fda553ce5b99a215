"""What the planning-speed work must not change: the snapshot's digest (plans name it), and a proof
the exact stage states without a search (a lower bound the greedy meets) is the one CP-SAT proves.
Speed itself is measured in benchmarks/planning_scale.py, not here."""

from __future__ import annotations

import hashlib
import json

import pytest

from hostmaint.fleet import parse_snapshot, with_state
from hostmaint.models import FleetSnapshot, HostState, PlanProof
from hostmaint.placement import exact as ex
from hostmaint.placement import plan_evacuation
from hostmaint.placement.synthetic import generate_fleet

RICH = {
    "cluster": "c", "taken_at": "t", "limits": {"memory_headroom_pct": 12.5, "vcpu_overcommit": 1e-05},
    "hosts": [{"name": "hv-ü", "cluster": "c", "cells": [
        {"id": 0, "memory_mib": 65536, "free_mib": 16384, "cpus": list(range(16)),
         "hugepages": [{"size_kib": 2048, "total": 512, "free": 512}]}]}],
    "vms": [{"name": "db-\u2603", "uuid": "u1", "host": "hv-ü", "memory_mib": 8192, "vcpus": 12,
             # 12 pins: the canonical form sorts their keys as text ("10" before "2")
             "vcpupin": {str(i): [i] for i in range(12)}, "iothreadpin": {"1": [13]},
             "numatune": {"mode": "strict", "nodeset": [0]}, "hugepage_kib": 2048, "tags": ["a\nb", "\x7f"]}],
}


def _old_digest(s: FleetSnapshot) -> str:
    canon = json.dumps(s.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


@pytest.mark.parametrize("snap", [parse_snapshot(json.dumps(RICH)), generate_fleet(3, 12, drain_vms=10)],
                         ids=["rich", "generated"])
def test_the_digest_is_the_canonical_jsons(snap: FleetSnapshot) -> None:
    assert snap.digest() == _old_digest(snap)


def test_a_digest_is_kept_per_snapshot_and_a_copy_has_its_own() -> None:
    snap = generate_fleet(1, 6, drain_vms=5)
    first = snap.digest()
    assert snap.digest() == first
    cordoned = with_state(snap, {"h0001": HostState.CORDONED})
    assert cordoned.digest() == _old_digest(cordoned) != first
    assert snap.digest() == first


def test_a_proof_without_a_search_is_what_cp_sat_proves(monkeypatch: pytest.MonkeyPatch) -> None:
    shortcut = []
    for seed in range(6):
        snap = generate_fleet(seed, 25, fill=(0.5, 0.8), drain_vms=40)
        fast = plan_evacuation(snap, ["h0000"])
        if "proven without a search" in fast.proof_note:
            shortcut.append((snap, fast))
    assert shortcut, "no fleet where the greedy meets the bounds: the test checks nothing"
    monkeypatch.setattr(ex, "_peak_at_bound", lambda prob, greedy: None)
    for snap, fast in shortcut:
        searched = plan_evacuation(snap, ["h0000"], exact_budget=20.0)
        assert fast.proof is searched.proof is PlanProof.OPTIMAL
        peak = fast.proof_note.split("peak utilisation: ")[1].split(",")[0]
        assert f"peak utilisation: {peak} (optimal)" in searched.proof_note
        assert "spread:" in searched.proof_note and "(optimal)" in searched.proof_note.split("spread:")[1]
        assert fast.placements == searched.placements
