"""The fast snapshot load (pydantic parses and validates the JSON in one pass) is as strict as the
strict path it skips: a key given twice in any object of an otherwise valid snapshot is still
refused, naming it, and what it accepts is what the strict path makes. Its speed is measured in
benchmarks/planning_scale.py, not here."""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from hostmaint.config_file import parse_json
from hostmaint.errors import FileFormatError, SnapshotError
from hostmaint.fleet import _parse_fast, dump_snapshot, load_snapshot, parse_snapshot
from hostmaint.models import (
    Cell,
    FleetSnapshot,
    GuestCell,
    Host,
    HugePages,
    Limits,
    Numatune,
    SlottedModel,
    VirtioMem,
    Vm,
)
from hostmaint.placement.synthetic import generate_fleet


class Twice(list[tuple[str, Any]]):
    """A JSON object written as given: a key may come twice."""


class Spaced(str):
    """A key written with a space before its colon, whatever the others have."""


def _dumps(value: Any, colon: str = ": ") -> str:
    if isinstance(value, Twice):
        return "{" + ", ".join(f"{json.dumps(k)}{' : ' if isinstance(k, Spaced) else colon}{_dumps(v, colon)}"
                               for k, v in value) + "}"
    if isinstance(value, dict):
        return _dumps(Twice(value.items()), colon)
    if isinstance(value, list):
        return "[" + ", ".join(_dumps(v, colon) for v in value) + "]"
    return json.dumps(value)


def _base() -> dict[str, Any]:
    return {
        "cluster": "c", "taken_at": "t", "limits": {"spare_hosts": 0},
        "hosts": [{"name": "hv1", "cluster": "c", "cells": [
            {"id": 0, "memory_mib": 65536, "free_mib": 16384, "cpus": [0, 1, 2, 3],
             "hugepages": [{"size_kib": 2048, "total": 512, "free": 512}]},
            {"id": 1, "memory_mib": 65536, "free_mib": 30000, "cpus": [4, 5, 6, 7]}]}],
        "vms": [{"name": "db-1", "uuid": "u1", "host": "hv1", "memory_mib": 8192, "vcpus": 2,
                 "vnuma": [{"id": 0, "memory_mib": 4096, "vcpus": [0]}, {"id": 1, "memory_mib": 4096, "vcpus": [1]}],
                 "vcpupin": {"0": [0], "1": [4]}, "iothreadpin": {"1": [1]},
                 "numatune": {"mode": "strict", "nodeset": [0, 1]}, "hugepage_kib": 2048,
                 "virtio_mem": {"node": 0, "size_mib": 4096, "requested_mib": 1024}}],
    }


def _twice(obj: dict[str, Any], key: str) -> Twice:
    """``obj`` with ``key`` given twice, with the same value: the model it makes is the same. The
    second has a space before its colon: the one place a key does not end in ``":``."""
    return Twice([*obj.items(), (Spaced(key), obj[key])])


PLACES = {
    "top level": lambda d: _twice(d, "cluster"),
    "limits": lambda d: {**d, "limits": _twice(d["limits"], "spare_hosts")},
    "host": lambda d: {**d, "hosts": [_twice(d["hosts"][0], "cluster")]},
    "cell": lambda d: {**d, "hosts": [{**d["hosts"][0], "cells": [_twice(d["hosts"][0]["cells"][0], "free_mib"),
                                                                  d["hosts"][0]["cells"][1]]}]},
    "hugepages": lambda d: {**d, "hosts": [{**d["hosts"][0], "cells": [
        {**d["hosts"][0]["cells"][0], "hugepages": [_twice(d["hosts"][0]["cells"][0]["hugepages"][0], "free")]},
        d["hosts"][0]["cells"][1]]}]},
    "vm": lambda d: {**d, "vms": [_twice(d["vms"][0], "memory_mib")]},
    "guest cell": lambda d: {**d, "vms": [{**d["vms"][0], "vnuma": [_twice(d["vms"][0]["vnuma"][0], "vcpus"),
                                                                   d["vms"][0]["vnuma"][1]]}]},
    "numatune": lambda d: {**d, "vms": [{**d["vms"][0], "numatune": _twice(d["vms"][0]["numatune"], "mode")}]},
    "vcpupin": lambda d: {**d, "vms": [{**d["vms"][0], "vcpupin": _twice(d["vms"][0]["vcpupin"], "1")}]},
    "iothreadpin": lambda d: {**d, "vms": [{**d["vms"][0], "iothreadpin": _twice(d["vms"][0]["iothreadpin"], "1")}]},
    "virtio_mem": lambda d: {**d, "vms": [{**d["vms"][0], "virtio_mem": _twice(d["vms"][0]["virtio_mem"], "node")}]},
}

# every JSON object a snapshot holds, by the field that holds it: fleet._colons_held counts the keys of each
OBJECTS = {"FleetSnapshot.limits", "FleetSnapshot.hosts", "FleetSnapshot.vms", "Host.cells", "Cell.hugepages",
           "Vm.vnuma", "Vm.vcpupin", "Vm.iothreadpin", "Vm.numatune", "Vm.virtio_mem"}


def test_every_object_a_snapshot_holds_is_counted() -> None:
    # a field added to the models that holds an object (a model, a map) must be counted by
    # fleet._colons_held, and a place added to PLACES above; else every snapshot that has one is
    # read the slow way (still strictly)
    found = set()
    seen: set[type] = set()

    def walk(model: type[BaseModel | SlottedModel]) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, field in model.model_fields.items():
            kinds = [field.annotation]
            while kinds:
                kind = kinds.pop()
                kinds.extend(typing.get_args(kind))
                is_model = isinstance(kind, type) and issubclass(kind, BaseModel | SlottedModel)
                if typing.get_origin(kind) is dict or is_model:
                    found.add(f"{model.__name__}.{name}")
                if is_model:
                    walk(kind)

    walk(FleetSnapshot)
    assert found == OBJECTS


@pytest.mark.parametrize("colon", [": ", ":"], ids=["plain", "compact"])
@pytest.mark.parametrize("place", sorted(PLACES))
def test_a_key_given_twice_anywhere_in_a_valid_snapshot_is_refused(place: str, colon: str, tmp_path: Path) -> None:
    text = _dumps(PLACES[place](_base()), colon)
    with pytest.raises(FileFormatError, match="is given twice"):  # the strict reading sees it too
        parse_json(text, "s.json")
    with pytest.raises(SnapshotError, match="is given twice in one object"):
        parse_snapshot(text, "s.json")
    path = tmp_path / "s.json"
    path.write_text(text)
    with pytest.raises(SnapshotError, match=f"{path}: key .* is given twice in one object"):
        load_snapshot(path)


def test_a_key_given_twice_beside_an_escaped_colon_is_refused() -> None:
    # the colon written as \u003a is in the VM's name but not in the text: it must not stand in
    # for the colon of the key that was lost
    data = _base()
    data["vms"][0]["name"] = "db:1"
    text = _dumps(PLACES["vm"](data)).replace("db:1", "db\\u003a1")
    assert "db\\u003a1" in text
    with pytest.raises(SnapshotError, match="'memory_mib' is given twice in one object"):
        parse_snapshot(text, "s.json")


def test_no_default_string_of_the_models_holds_a_colon() -> None:
    # _colons_held counts the colons of the strings a snapshot holds as the text's: a default one
    # with a colon would be counted without being in the text
    for model in (FleetSnapshot, Limits, Host, Cell, HugePages, Vm, GuestCell, Numatune, VirtioMem):
        for name, field in model.model_fields.items():
            assert ":" not in str(field.default), (model.__name__, name)


def _strict(text: str) -> FleetSnapshot:
    return FleetSnapshot.model_validate(parse_json(text, "s"))


@pytest.mark.parametrize("colon", [": ", " : ", ":"])
def test_what_the_fast_path_accepts_is_what_the_strict_path_makes(colon: str, tmp_path: Path) -> None:
    data = _base()
    # strings holding a quote and a colon, and keys the fast count cannot tell from them
    data["vms"][0]["tags"] = ['x":y', '":', "a\\\":b", "::"]
    data["vms"][0]["not_migratable_reason"] = "p: q"
    data["hosts"][0]["kernel"] = "6.1:x"
    data["taken_at"] = "2026-12-06T07:00:00+00:00"
    text = _dumps(data, colon)
    assert parse_snapshot(text, "s") == _strict(text)
    assert _parse_fast(text) == _strict(text)  # colons in its strings did not send it the slow way
    path = tmp_path / "s.json"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())  # a BOM, as read_text allows
    assert load_snapshot(path) == _strict(text)


def test_a_generated_fleet_loads_the_same_either_way(tmp_path: Path) -> None:
    snap = generate_fleet(2, 40, drain_vms=20)
    text = dump_snapshot(snap)
    path = tmp_path / "s.json"
    path.write_text(text)
    loaded = load_snapshot(path)
    assert loaded == snap == _strict(text)
    assert loaded.digest() == snap.digest()
    # and it took the fast path: a field added to the models without _keys_held counting it would
    # send every snapshot the slow way, silently
    assert _parse_fast(text) == snap
    assert _parse_fast(json.dumps(_base())) is not None


def test_bad_input_keeps_its_message(tmp_path: Path) -> None:
    data = _base()
    data["vms"][0]["memory_mib"] = 0
    with pytest.raises(SnapshotError, match=r"s.json: vms\[0\].memory_mib: VM 'db-1': memory_mib must be greater "):
        parse_snapshot(json.dumps(data), "s.json")
    path = tmp_path / "s.json"
    path.write_bytes(json.dumps(_base()).replace('"c"', '"d\\u00e9mo"', 1).encode().replace(b"\\u00e9", b"\xe9"))
    with pytest.raises(SnapshotError, match="not UTF-8: byte 0xe9 at line 1, column 15"):
        load_snapshot(path)
