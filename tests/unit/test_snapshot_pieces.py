"""A large snapshot is read a piece of its VMs at a time (fleet._parse_in_pieces), and its models
share their sets of given field names: both only to hold less memory. What that reading accepts is
exactly what the strict reading makes, anything it does not accept is refused as before, naming
the field, and plans from it are the same. Its memory and speed are measured in
benchmarks/planning_scale.py, not here."""

from __future__ import annotations

import copy
import hashlib
import json
import pickle
import threading
from pathlib import Path
from typing import Any

import pytest

import hostmaint.fleet as fleet_module
import hostmaint.models as models_module
from hostmaint.config_file import parse_json, read_utf8
from hostmaint.errors import SnapshotError
from hostmaint.fleet import _parse_in_pieces, dump_snapshot, load_snapshot, parse_snapshot
from hostmaint.models import FleetSnapshot, Host, HostState, Vm, _canonical_fast
from hostmaint.placement import plan_evacuation
from hostmaint.placement.synthetic import generate_fleet


def _strict(text: str) -> FleetSnapshot:
    return FleetSnapshot.model_validate(parse_json(text, "s"))


@pytest.fixture(scope="module")
def fleet() -> FleetSnapshot:
    return generate_fleet(3, 30, fill=(0.5, 0.8), drain_vms=12)


def _written(snap: FleetSnapshot) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(dump_snapshot(snap))
    return data


def _dump(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


@pytest.mark.parametrize("piece_bytes", [1, 3000, 1 << 20])
def test_read_in_pieces_it_is_what_the_strict_reading_makes(fleet: FleetSnapshot, piece_bytes: int) -> None:
    text = dump_snapshot(fleet)
    got = _parse_in_pieces(text.encode(), piece_bytes)
    assert got is not None  # the layout dump_snapshot writes is read this way
    want = _strict(text)
    assert got == want == fleet
    assert got.model_fields_set == want.model_fields_set
    assert got.digest() == fleet.digest()


def test_a_plan_from_pieces_is_the_plan_from_the_strict_reading(fleet: FleetSnapshot, tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(dump_snapshot(fleet))
    drained = [fleet.hosts[0].name]
    assert load_snapshot(path).vms_on(drained[0])
    assert (plan_evacuation(load_snapshot(path), drained, exact_budget=0).model_dump_json()
            == plan_evacuation(_strict(path.read_text()), drained, exact_budget=0).model_dump_json())


def _vm_written_twice(data: dict[str, Any], index: int, key: str) -> bytes:
    """The file as dump_snapshot lays it out with ``key`` given twice in VM ``index`` (its value the
    same: the model it makes is the same, only the colons tell)."""
    text = _dump(data).decode()
    name = json.dumps(data["vms"][index]["name"])
    at = text.index(f'"name": {name}')
    line = f'      "{key}": {json.dumps(data["vms"][index][key])},\n'
    start = text.rindex("{\n", 0, at) + 2
    return (text[:start] + line + text[start:]).encode()


@pytest.mark.parametrize("index", [0, 7, -1])
def test_a_key_given_twice_in_any_piece_is_refused(fleet: FleetSnapshot, index: int, tmp_path: Path) -> None:
    data = _written(fleet)
    text = _vm_written_twice(data, index, "memory_mib")
    assert _parse_in_pieces(text, 3000) is None
    path = tmp_path / "s.json"
    path.write_bytes(text)
    with pytest.raises(SnapshotError, match="'memory_mib' is given twice in one object"):
        load_snapshot(path)


@pytest.mark.parametrize("index", [0, -1])
def test_a_key_given_twice_where_another_is_left_out_is_refused(fleet: FleetSnapshot, index: int,
                                                                 tmp_path: Path) -> None:
    # a VM keeps no set of the fields it was given: the colons are counted against the fields not
    # filled with defaults, so a field left out cannot hide a key given twice
    data = _written(fleet)
    del data["vms"][index]["origin"]
    text = _vm_written_twice(data, index, "memory_mib")
    assert text.count(b":") == _dump(_written(fleet)).count(b":")  # as many colons as the file without either
    assert _parse_in_pieces(text, 3000) is None
    assert fleet_module._parse_fast(text) is None
    path = tmp_path / "s.json"
    path.write_bytes(text)
    with pytest.raises(SnapshotError, match="'memory_mib' is given twice in one object"):
        load_snapshot(path)
    # left out alone, it is read in pieces, with its default
    del data["vms"][-2]["tags"]
    left_out = _dump(data)
    got = _parse_in_pieces(left_out, 3000)
    assert got is not None and got == _strict(left_out.decode()) == fleet
    assert fleet_module._parse_fast(left_out) == fleet


def test_the_defaults_filled_are_counted_per_thread() -> None:
    # a count that another thread's validation changed could hide a key given twice
    text = b"[" + b", ".join(b'{"name": "v%d", "uuid": "u", "host": "h", "memory_mib": 1, "vcpus": 1}' % i
                             for i in range(50)) + b"]"
    counts: list[int] = []

    def validate() -> None:
        for _ in range(40):
            counts.append(fleet_module._validate_counting(tuple[Vm, ...], text)[1])

    workers = [threading.Thread(target=validate) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert counts == [50 * (len(Vm.model_fields) - 5)] * 160


def test_a_key_given_twice_outside_the_vms_is_refused(fleet: FleetSnapshot, tmp_path: Path) -> None:
    text = _dump(_written(fleet)).replace(b'\n  "cluster": ', b'\n  "source": "x",\n  "cluster": ', 1)
    assert _parse_in_pieces(text, 3000) is None
    path = tmp_path / "s.json"
    path.write_bytes(text)
    with pytest.raises(SnapshotError, match="'source' is given twice in one object"):
        load_snapshot(path)


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d["vms"][-1].update(memory_mib=0), r"vms\[\d+\]\.memory_mib: VM '[^']+': memory_mib must be greater "),
    (lambda d: d["vms"][9].update(host="nowhere"), r"vms\[9\]\.host: VM '[^']+' is on unknown host 'nowhere'"),
    (lambda d: d["vms"][9].update(name=d["vms"][3]["name"]), r"vms\[9\]\.name: VM '[^']+' runs more than once"),
    (lambda d: d["vms"][-1].update(vcpupin={"0": [9999]}), r"vms\[\d+\]\.vcpupin: VM .* CPU\(s\) 9999"),
    (lambda d: d["vms"][5].update(colour="red"), r"vms\[5\]\.colour: .*xtra"),
    (lambda d: d["hosts"][2]["cells"][0].update(free_mib=-1), r"hosts\[2\]\.cells\[0\]\.free_mib"),
    # JSON's true is not a count of 1, nor a string a number: sizes are strict integers in every reading
    (lambda d: d["vms"][7].update(vcpus=True), r"vms\[7\]\.vcpus: VM '[^']+': Input should be a valid integer"),
    (lambda d: d["hosts"][1]["cells"][0].update(memory_mib="65536"),
     r"hosts\[1\]\.cells\[0\]\.memory_mib: .*Input should be a valid integer"),
])
def test_bad_input_in_any_piece_is_refused_naming_it(fleet: FleetSnapshot, change: Any, message: str,
                                                     tmp_path: Path) -> None:
    data = _written(fleet)
    change(data)
    text = _dump(data)
    assert _parse_in_pieces(text, 3000) is None
    path = tmp_path / "s.json"
    path.write_bytes(text)
    with pytest.raises(SnapshotError, match=message):
        load_snapshot(path)


def test_another_layout_is_read_the_one_pass_way(fleet: FleetSnapshot, tmp_path: Path) -> None:
    data = _written(fleet)
    for text in (json.dumps(data).encode(), json.dumps(data, indent=4).encode(),
                 _dump(data).replace(b"\n", b"\r\n")):
        assert _parse_in_pieces(text, 3000) is None
        path = tmp_path / "s.json"
        path.write_bytes(text)
        assert load_snapshot(path) == fleet


def test_vms_of_a_nested_list_are_not_taken_for_the_snapshots(fleet: FleetSnapshot) -> None:
    # the VMs' list last at the top level, then a key after it: its text ends like a dump's but the
    # cut would leave that key out; the top level read without the VMs then fails, not a snapshot
    # without that key
    text = _dump(_written(fleet)).rstrip()
    assert text.endswith(b"\n  ]\n}")
    moved = text[:-2] + b',\n  "vms": [\n    {}\n  ]\n}'
    assert _parse_in_pieces(moved, 3000) is None


def test_models_share_their_field_names_and_a_copy_has_its_own(fleet: FleetSnapshot) -> None:
    # the parts of a VM that stay models (numatune, guest cells): one set of given names per class
    snap = _parse_in_pieces(dump_snapshot(fleet).encode(), 3000)
    assert snap is not None
    tuned = list({id(v.numatune): v.numatune for v in snap.vms if v.numatune is not None}.values())
    a, b = tuned[0], tuned[1]
    assert a is not b and a.model_fields_set is b.model_fields_set  # one set, not one per numatune
    given = set(a.model_fields_set)
    with pytest.raises(TypeError):
        a.model_fields_set.add("x")
    assert b.model_fields_set == given
    with pytest.raises(TypeError):
        a.model_fields_set.discard("mode")
    with pytest.raises(TypeError):
        a.__pydantic_fields_set__ |= {"x"}
    # a part given fewer fields: a set of its own, equal to what it was given
    vm = '"name": "v", "uuid": "u", "host": "h", "memory_mib": 1, "vcpus": 1'
    small = Vm.model_validate_json(f'{{{vm}, "numatune": {{"nodeset": [0]}}}}').numatune
    again = Vm.model_validate_json(f'{{{vm}, "numatune": {{"nodeset": [1]}}}}').numatune
    assert small is not None and again is not None
    assert small.model_fields_set == {"nodeset"}
    assert again.model_fields_set is small.model_fields_set
    moved = small.model_copy(update={"mode": "preferred"})
    assert moved.model_fields_set == {"nodeset", "mode"}
    assert again.model_fields_set == small.model_fields_set == {"nodeset"}
    assert small.model_dump(mode="json", exclude_unset=True) == {"nodeset": [0]}
    for twin in (copy.copy(small), copy.deepcopy(small)):
        assert twin == small and twin.model_fields_set == small.model_fields_set
        assert type(twin.model_fields_set) is set
    assert pickle.loads(pickle.dumps(small)).model_copy(update={"mode": "preferred"}) == moved
    assert pickle.loads(pickle.dumps(snap)) == snap


def test_hosts_are_slotted_and_cells_of_one_layout_share_their_cpus(fleet: FleetSnapshot) -> None:
    snap = _parse_in_pieces(dump_snapshot(fleet).encode(), 3000)
    assert snap is not None
    a, b = snap.hosts[0], snap.hosts[1]
    for part in (a, a.cells[0], a.cells[0].hugepages[0]):
        assert not hasattr(part, "__dict__")  # fields in slots: a dict per host, cell and pool otherwise
    assert a.cells[0].cpus == b.cells[0].cpus and a.cells[0].cpus is b.cells[0].cpus
    cordoned = a.model_copy(update={"state": HostState.CORDONED})
    assert (cordoned.state, a.state, cordoned.cells) == (HostState.CORDONED, HostState.ACTIVE, a.cells)
    assert Host.model_validate(a.model_dump()) == a == Host.model_validate_json(a.model_dump_json())


def test_vms_are_slotted_share_their_empty_pin_maps_and_copy_as_models_do(fleet: FleetSnapshot) -> None:
    snap = _parse_in_pieces(dump_snapshot(fleet).encode(), 3000)
    assert snap is not None
    plain = [v for v in snap.vms if not v.vcpupin and not v.iothreadpin]
    assert len(plain) > 1 and not hasattr(plain[0], "__dict__")  # fields in slots, no dict per VM
    a, b = plain[0], plain[1]
    assert a.vcpupin is b.vcpupin is a.iothreadpin == {}  # one empty map, not two per VM
    with pytest.raises(TypeError):
        a.vcpupin[0] = (1,)
    with pytest.raises(TypeError):
        a.iothreadpin.update({1: (2,)})
    assert b.vcpupin == {}
    # equal numatunes and guest cells are one object each (frozen models: ~0.5 KB apiece otherwise)
    tuned = [v.numatune for v in snap.vms if v.numatune is not None]
    assert len({id(t) for t in tuned}) == len({(t.mode, t.nodeset) for t in tuned}) < len(tuned)
    cells = [g for v in snap.vms for g in v.vnuma]
    assert len({id(g) for g in cells}) == len({(g.id, g.memory_mib, g.vcpus) for g in cells}) < len(cells)
    with pytest.raises(AttributeError):  # frozen
        a.host = "elsewhere"  # type: ignore[misc]
    # copies: fields replaced without validation, as BaseModel.model_copy; a pin map of their own
    moved = a.model_copy(update={"host": "h9", "vcpupin": {0: (3,)}})
    assert (moved.host, moved.vcpupin, a.host) == ("h9", {0: (3,)}, plain[0].host)
    assert moved.model_copy() == moved and moved.model_copy(deep=True) == moved
    with pytest.raises(ValueError, match="no field"):
        a.model_copy(update={"colour": "red"})
    for twin in (copy.copy(a), copy.deepcopy(a), pickle.loads(pickle.dumps(a))):
        assert twin == a
    unshared = copy.deepcopy(a).vcpupin
    unshared[1] = (2,)  # a deep copy's map is a dict of its own
    assert a.vcpupin == {}
    # dumped and validated as a model: the same fields, the same VM
    dumped = a.model_dump(mode="json")
    assert list(dumped) == list(Vm.model_fields) and dumped["vcpupin"] == {}
    assert Vm.model_validate(dumped) == a == Vm.model_validate_json(a.model_dump_json())
    assert json.loads(dump_snapshot(snap)) == json.loads(dump_snapshot(fleet))


@pytest.mark.parametrize("block", [7, 4096])
def test_a_file_is_read_in_blocks_utf8_checked_across_their_edges(fleet: FleetSnapshot, block: int,
                                                                  tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleet_module, "_BLOCK_BYTES", block)
    monkeypatch.setattr(fleet_module, "_PIECE_BYTES", 5000)
    read: list[Path] = []
    monkeypatch.setattr(fleet_module, "read_utf8", lambda p: read.append(p) or read_utf8(p))
    data = _written(fleet)
    data["vms"][4]["tags"] = ["caf\u00e9 \u2603", "\U0001f600"]  # two, three and four bytes in UTF-8
    data["hosts"][1]["kernel"] = "6.1-\u00fc"
    path = tmp_path / "s.json"
    path.write_bytes(_dump(data))
    got = load_snapshot(path)
    assert got == _strict(path.read_text())
    assert not read  # read as blocks, never whole
    # bad UTF-8 in a later block, a BOM, bytes after the snapshot: as before, read whole and named
    text = _dump(data)
    path.write_bytes(text.replace("\u2603".encode(), b"\xe2\x98"))
    with pytest.raises(SnapshotError, match=r"not UTF-8: byte 0x\w\w at line \d+"):
        load_snapshot(path)
    path.write_bytes(text + b"\xff")
    with pytest.raises(SnapshotError, match="not UTF-8"):
        load_snapshot(path)
    path.write_bytes(text + b"[]")
    with pytest.raises(SnapshotError):
        load_snapshot(path)
    path.write_bytes(b"\xef\xbb\xbf" + text)
    assert load_snapshot(path) == got
    assert len(read) == 4


def test_the_digest_written_in_parts_is_the_canonical_json(fleet: FleetSnapshot,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    whole = json.dumps(fleet.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()
    for per_part in (1, 7, 5000):
        monkeypatch.setattr(models_module, "_VMS_PER_PART", per_part)
        assert _canonical_fast(fleet) == whole
        assert fleet.model_copy().digest() == hashlib.sha256(whole).hexdigest()
    empty = fleet.model_copy(update={"vms": ()})
    assert _canonical_fast(empty) == json.dumps(empty.model_dump(mode="json"), sort_keys=True,
                                                separators=(",", ":")).encode()


def test_hosts_of_one_layout_share_their_facts_and_others_keep_theirs(fleet: FleetSnapshot) -> None:
    # what a VM's pins may name is gathered once per layout of cells: a host whose cells have other
    # CPUs (or page sizes) under the same ids must still be checked against its own
    data = _written(fleet)
    wide = data["hosts"][1]
    wide["cells"][0]["cpus"] = [*wide["cells"][0]["cpus"], 9000]
    on = [i for i, vm in enumerate(data["vms"]) if vm["host"] == wide["name"]][0]
    data["vms"][on].update(vcpupin={"0": [9000]}, vcpus=max(data["vms"][on]["vcpus"], 1))
    snap = _parse_in_pieces(_dump(data), 3000)
    assert snap is not None and snap.vms[on].vcpupin == {0: (9000,)}
    other = [i for i, vm in enumerate(data["vms"]) if vm["host"] == data["hosts"][2]["name"]][0]
    data["vms"][other].update(vcpupin={"0": [9000]})
    with pytest.raises(SnapshotError, match=rf"vms\[{other}\]\.vcpupin: .* CPU\(s\) 9000, which host"):
        parse_snapshot(_dump(data), "s.json")


def _cell(id_: int, cpus: list[int], **more: Any) -> dict[str, Any]:
    return {"id": id_, "memory_mib": 4096, "free_mib": 1024, "cpus": cpus, **more}


BAD_POOL = [{"size_kib": 2048, "total": 4, "free": 5}]


@pytest.mark.parametrize(("cells", "message"), [
    ([_cell(0, [0, 1], hugepages=BAD_POOL), _cell(1, [1, 2])], "cell 0: hugepages of 2048 KiB: 5 pages free"),
    ([_cell(0, [0, 1]), _cell(1, [1, 2], hugepages=BAD_POOL)], "cell 1: hugepages of 2048 KiB: 5 pages free"),
    ([_cell(0, [0, 1]), _cell(1, [1, 2])], "CPU 1 is listed in cells 0 and 1"),
    ([_cell(0, [0, 0]), _cell(1, [2], free_mib=9999)], "CPU 0 is listed twice in cell 0"),
    ([_cell(0, [0], free_mib=9999), _cell(0, [1])], "cell 0 has 9999 MiB free of 4096"),
    ([_cell(0, [0]), _cell(0, [-1])], "cell id 0 is listed twice"),
    ([_cell(0, [0]), _cell(1, [-1])], "cell 1 lists CPU -1"),
    ([_cell(0, [0]), _cell(1, [1], hugepages=BAD_POOL)], "cell 1: hugepages of 2048 KiB: 5 pages free"),
])
def test_a_hosts_first_problem_is_named_in_cell_order(cells: list[dict[str, Any]], message: str) -> None:
    # the common host is checked without a loop over its CPUs; one with a problem, in the order the
    # checks always had: each cell's id, free memory, pools, then its CPUs, cell after cell
    with pytest.raises(ValueError, match=message):
        Host.model_validate({"name": "hv", "cluster": "c", "cells": cells})
    assert Host.model_validate({"name": "hv", "cluster": "c", "cells": [_cell(0, [0, 1]), _cell(1, [2, 3])]})
