"""What the planning-speed work must not change: the snapshot's digest (plans name it), and a proof
the exact stage states without a search (a lower bound the greedy meets) is the one CP-SAT proves.
Speed itself is measured in benchmarks/planning_scale.py, not here."""

from __future__ import annotations

import hashlib
import json
import typing

import pytest
from pydantic import BaseModel

from hostmaint.fleet import parse_snapshot, with_state
from hostmaint.models import FleetSnapshot, HostState, PlanProof, SlottedModel, _canonical_fast
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


# RICH in printable ASCII: the digest is written by orjson (models._canonical_fast), whose bytes must be
# json.dumps' own; 12 pins, so the keys sort as text ("10" before "2")
ASCII = json.loads(json.dumps(RICH).replace("\\u00fc", "u").replace("\\u2603", "s"))
ASCII["vms"][0]["tags"] = ["a b", "~"]
ASCII["limits"]["vcpu_overcommit"] = 3.5


def test_the_fast_canonical_json_is_json_dumps_own_or_none() -> None:
    snap = parse_snapshot(json.dumps(ASCII))
    fast = _canonical_fast(snap)
    assert fast is not None and fast == json.dumps(snap.model_dump(mode="json"), sort_keys=True,
                                                   separators=(",", ":")).encode()
    assert snap.digest() == _old_digest(snap)
    # where orjson would write other bytes, it is not used, and the digest is the same
    for change in ({"tags": ['q"uote']}, {"tags": ["\u00e9"]}, {"tags": ["\x7f"]}, {"tags": ["a\tb"]},
                   {"limits": {"vcpu_overcommit": 1e-05}}):
        data = json.loads(json.dumps(ASCII))
        if "limits" in change:
            data["limits"].update(change["limits"])
        else:
            data["vms"][0].update(change)
        other = parse_snapshot(json.dumps(data))
        assert _canonical_fast(other) is None, change
        assert other.digest() == _old_digest(other)


def test_the_snapshots_only_floats_are_its_limits() -> None:
    # _canonical_fast compares the limits' floats one by one: any other float field would need the same
    seen: set[type] = set()
    floats = []

    def walk(model: type[BaseModel | SlottedModel]) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, field in model.model_fields.items():
            kinds = [field.annotation, *typing.get_args(field.annotation)]
            while kinds:
                kind = kinds.pop()
                kinds.extend(typing.get_args(kind))
                if kind is float:
                    floats.append(f"{model.__name__}.{name}")
                if isinstance(kind, type) and issubclass(kind, BaseModel | SlottedModel):
                    walk(kind)

    walk(FleetSnapshot)
    assert floats and all(f.startswith("Limits.") for f in floats), floats


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
