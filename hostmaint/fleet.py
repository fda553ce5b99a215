"""The fleet snapshot: discovered state of a cluster as data, JSON in and out.

A snapshot joins three sources: what the hypervisor driver discovers on each
host (cells, VMs), what hostmaint keeps (host state, VM origins), and what the
inventory decides (VM policies, limits). Planning works on snapshots only, so
any planning command can run offline from a file. The JSON form is a public
contract; see docs/snapshot.md.
"""

from __future__ import annotations

import codecs
import functools
import json
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter, ValidationError
from pydantic_core import SchemaValidator

from hostmaint.bulk import collector_paused, release_freed_memory
from hostmaint.config_file import parse_json, read_utf8
from hostmaint.errors import FileFormatError, SnapshotError
from hostmaint.models import Cell, FleetSnapshot, Host, HostDiscovery, HostState, HugePages, UnmigratableAction, Vm

if TYPE_CHECKING:  # planning from a file needs neither (the inventory imports httpx, the hooks, ...)
    from hostmaint.drivers.base import Hypervisor
    from hostmaint.inventory import Inventory

DISCOVERY_ATTEMPTS = 3


def apply_policies(inventory: Inventory, cluster: str, vm: Vm) -> Vm:
    """Resolve the inventory's VM policy (first match wins) onto a discovered VM."""
    policy = inventory.vm_policy(cluster, vm.name, vm.tags)
    if policy is None:
        return vm
    changes: dict[str, object] = {
        "anti_affinity": policy.anti_affinity,
        "on_unmigratable": policy.on_unmigratable,
    }
    if not policy.migratable:
        changes["migratable"] = False
        changes["not_migratable_reason"] = vm.not_migratable_reason or "policy: migratable: false"
    return vm.model_copy(update=changes)


def free_after_guests(cells: tuple[Cell, ...], vms: Sequence[Vm], overcommit: float = 1.0) -> tuple[Cell, ...]:
    """``cells`` with free memory no higher than what the guests running there leave.

    The host's free memory counts only pages a guest has touched: a guest that started a moment ago
    (or that never touches most of its memory) looks almost free, and a plan made on that figure
    places VMs where the guest's memory will be. So free memory is capped at the host's ordinary
    memory (less its hugepage pools) times ``overcommit`` (the cluster's ``memory_overcommit``) less
    its guests' ordinary memory, lowered in every cell in proportion (which cell a guest's pages land
    in is not known). Hugepage-backed guests are in the pools, whose free pages libvirt counts apart."""
    free = sum(c.free_mib for c in cells)
    pools = sum(hp.total * hp.size_kib for c in cells for hp in c.hugepages) // 1024
    committed = sum(v.memory_mib for v in vms if not v.hugepage_kib)
    ceiling = max(0, int((sum(c.memory_mib for c in cells) - pools) * overcommit) - committed)
    if free <= ceiling:
        return cells
    return tuple(c.model_copy(update={"free_mib": c.free_mib * ceiling // free}) for c in cells)


def _same_name(name: str, seen: list[Vm]) -> str:
    """Why one name on several hosts stops the discovery: one VM running twice, or VMs sharing a name."""
    where = ", ".join(f"{v.host} (uuid {v.uuid})" for v in seen)
    if len({v.uuid for v in seen}) == 1:
        return (f"VM {name!r} runs on {' and '.join(v.host for v in seen)} at once, the same uuid {seen[0].uuid} "
                f"on each, and no migration is moving it: one VM running twice writes its disks from two hosts; "
                f"stop the copy that should not run (virsh destroy on that host) before any maintenance")
    return (f"{len(seen)} different VMs are named {name!r}: on {where}. hostmaint knows a VM by its name within "
            f"a cluster and cannot tell them apart (a move, a return home, the count of every VM running once "
            f"would mix them up): rename all but one (virsh domrename, while shut off) or keep them in "
            f"different clusters")


def build_snapshot(inventory: Inventory, cluster: str, discoveries: Mapping[str, HostDiscovery], *,
                   states: Mapping[str, HostState] | None = None, origins: Mapping[str, str] | None = None,
                   source: str = "libvirt", now: datetime | None = None,
                   moving: Mapping[str, Collection[str]] | None = None) -> FleetSnapshot:
    """Join discoveries, kept state and inventory policy into one snapshot of ``cluster``.

    ``moving``: per host, the VMs there only because a live migration is moving them (paused for it,
    ``MigrationStates.in_migration``). Another run's migration shows its VM on two hosts; the
    snapshot keeps the copy that runs (both paused, at the switch-over: the first host by name).
    A VM on two hosts with neither copy moving is inconsistent: SnapshotError."""
    states = states or {}
    origins = origins or {}
    moving = moving or {}
    limits = inventory.cluster(cluster).limits
    hosts: list[Host] = []
    vms: list[Vm] = []
    for entry in inventory.hosts_of(cluster):
        found = discoveries.get(entry.name)
        if found is None:
            continue
        hosts.append(Host(name=entry.name, cluster=cluster, state=states.get(entry.name, HostState.ACTIVE),
                          cells=free_after_guests(found.cells, found.vms, limits.memory_overcommit),
                          reserved_memory_mib=entry.reserved_memory_mib, cpu_group=entry.cpu_group))
        for vm in found.vms:
            vm = vm.model_copy(update={"host": entry.name, "origin": origins.get(vm.name)})
            vms.append(apply_policies(inventory, cluster, vm))
    copies: dict[str, list[Vm]] = {}
    for vm in vms:
        copies.setdefault(vm.name, []).append(vm)
    for name, seen in copies.items():
        if len(seen) < 2:
            continue
        transit = [v for v in seen if name in moving.get(v.host, ())]
        if not transit:
            raise SnapshotError(f"cluster {cluster}: discovered state is inconsistent: {_same_name(name, seen)}")
        keep = [v for v in seen if v not in transit] or transit[:1]
        vms = [v for v in vms if v.name != name or v in keep]
    taken = (now or datetime.now(UTC)).isoformat(timespec="seconds")
    try:
        return FleetSnapshot(cluster=cluster, taken_at=taken, source=source,
                             limits=limits,
                             hosts=tuple(sorted(hosts, key=lambda h: h.name)),
                             vms=tuple(sorted(vms, key=lambda v: v.name)))
    except ValidationError as exc:
        raise SnapshotError(f"cluster {cluster}: discovered state is inconsistent: {_first_error(exc)}") from None


def discover_cluster(inventory: Inventory, cluster: str, hypervisor: Hypervisor, *,
                     states: Mapping[str, HostState] | None = None, origins: Mapping[str, str] | None = None,
                     source: str = "libvirt", skip_unreachable: frozenset[str] = frozenset()) -> FleetSnapshot:
    """Discover every host of ``cluster`` through ``hypervisor`` and build a snapshot.

    Hosts named in ``skip_unreachable`` (a host that is rebooting, say) are left out;
    any other unreachable host raises, since a plan without it would be wrong. Hosts are asked one
    after another, so a migration that ends between two of them can show its VM running on both:
    an inconsistent discovery is made again, up to :data:`DISCOVERY_ATTEMPTS` times, a second apart.
    """
    from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_fixed

    from hostmaint.drivers.base import MigrationStates, StrandedVms

    for attempt in Retrying(stop=stop_after_attempt(DISCOVERY_ATTEMPTS), wait=wait_fixed(1.0),
                            retry=retry_if_exception_type(SnapshotError), reraise=True):
        with attempt:
            discoveries = {}
            moving: dict[str, tuple[str, ...]] = {}
            for entry in inventory.hosts_of(cluster):
                if entry.name in skip_unreachable:
                    continue
                discoveries[entry.name] = hypervisor.discover(entry.name)
                if isinstance(hypervisor, MigrationStates):
                    moving[entry.name] = hypervisor.in_migration(entry.name)
                if isinstance(hypervisor, StrandedVms):
                    # a copy a migration left paused is not a second run of a VM another host runs
                    # (maintenance.settle_stranded removes it); alone, it is the VM
                    moving[entry.name] = (*moving.get(entry.name, ()), *hypervisor.stranded(entry.name))
            return build_snapshot(inventory, cluster, discoveries, states=states, origins=origins, source=source,
                                  moving=moving)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _first_error(exc: ValidationError, data: object = None) -> str:
    err = exc.errors()[0]
    path = ""
    for part in err["loc"]:
        path += f"[{part}]" if isinstance(part, int) else ("." if path else "") + str(part)
    msg = str(err["msg"]).removeprefix("Value error, ")
    # a slotted model's (a dataclass's) words for what a BaseModel says, said as before
    if err["type"] == "unexpected_keyword_argument":
        msg = "Extra inputs are not permitted"
    elif err["type"] == "dataclass_type":
        msg = f"Input should be a valid dictionary or instance of {err.get('ctx', {}).get('class_name', '?')}"
    msg = _name_the_entry(err["loc"], msg, data)
    return f"{path}: {msg}" if path else msg


def _name_the_entry(loc: tuple[int | str, ...], msg: str, data: object) -> str:
    """Pydantic's own errors ("greater than or equal to 0") name a position, hosts[3]: say which
    host or VM that is, as our own checks do."""
    if len(loc) < 2 or loc[0] not in ("hosts", "vms") or not isinstance(loc[1], int) or not isinstance(data, dict):
        return msg
    entries = data.get(str(loc[0]))
    if not isinstance(entries, list) or not 0 <= loc[1] < len(entries) or not isinstance(entries[loc[1]], dict):
        return msg
    name = entries[loc[1]].get("name")
    what = "host" if loc[0] == "hosts" else "VM"
    if not isinstance(name, str) or f"{what} {name!r}" in msg:
        return msg
    return f"{what} {name!r}: {msg}"


def parse_snapshot(text: str | bytes, source: str = "<snapshot>") -> FleetSnapshot:
    """Parse snapshot JSON (bytes: UTF-8, checked by the caller). Raises SnapshotError naming the
    field path (or the key given twice)."""
    with collector_paused():
        fast = _parse_in_pieces(text) if isinstance(text, bytes) else None
        if fast is None:
            fast = _parse_fast(text)
        if fast is not None:
            return fast
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        try:
            data = parse_json(text, source)
        except FileFormatError as exc:
            raise SnapshotError(str(exc)) from None
        try:
            return FleetSnapshot.model_validate(data)
        except ValidationError as exc:
            raise SnapshotError(f"{source}: {_first_error(exc, data)}") from None


def _parse_fast(text: str | bytes) -> FleetSnapshot | None:
    """The snapshot parsed and validated by pydantic in one pass over the JSON (no Python dicts in
    between), or None when that fails, or when the text may hold a key given twice, which that
    parser keeps the last of without a word. Then the strict path above reads it again and refuses
    it naming what is wrong, as it always has.

    A key given twice is found by counting colons. Outside strings JSON has one colon per key;
    inside, the colons of its string values, which the models hold (an escaped one, ``\\u003a``,
    is not in the text: such a text goes the strict way). The models hold one entry per distinct key
    of each object they were made from (the fields set, the pin maps' keys; a slotted model's fields less
    those filled with defaults). So when the text has exactly as many colons as the models account for,
    no key was lost."""
    try:
        snapshot, defaulted = _validate_counting(FleetSnapshot, text)
    except (ValidationError, _CannotCount):
        return None
    if isinstance(text, bytes):
        colons = text.count(b":")
        escaped = _escaped_colon(text)
    else:
        colons = text.count(":")
        escaped = "\\" in text and ("\\u003a" in text or "\\u003A" in text)
    if escaped or colons != _colons_held(snapshot, defaulted):
        return None
    return snapshot


# how `hostmaint snapshot` (dump_snapshot) lays out a snapshot's VMs: the last key of the top level,
# one VM object after another at four spaces
_VMS_OPEN = b'\n  "vms": ['
_VMS_CLOSE = b"\n  ]\n}"
_BETWEEN_VMS = b"\n    },\n    {"
_PIECE_BYTES = 1 << 20
_PIECES_PER_TRIM = 8  # the C heap's freed memory given back every 8 MB of VMs (bulk.release_freed_memory)
_BLOCK_BYTES = 1 << 16


def _parse_in_pieces(data: bytes, piece_bytes: int = _PIECE_BYTES) -> FleetSnapshot | None:
    """:func:`_read_in_pieces` of a text in memory."""
    return _read_in_pieces((data[i:i + _BLOCK_BYTES] for i in range(0, len(data), _BLOCK_BYTES)), piece_bytes)


def _read_in_pieces(blocks: Iterable[bytes], piece_bytes: int = _PIECE_BYTES) -> FleetSnapshot | None:
    """:func:`_parse_fast` of a snapshot laid out as ``dump_snapshot`` writes it, read from
    ``blocks`` (a file's, as they are read) a megabyte of VMs at a time, or None: then the one-pass
    and the strict reading decide, as before.

    Pydantic parses a whole text into its own tree before it validates: at 5,000 hosts ~150 MB
    beside the file's 75 MB and the models, most of the peak memory of a plan. A piece of the VMs'
    list is the text between two of them; the rest of the file is the top level with ``"vms": []``.
    Splitting there is exact: a line break is never inside a JSON string, so each cut falls between
    tokens, and when the top level and every piece (as a list) are valid JSON, the file is that top
    level with all the pieces' VMs, in order. Each is checked as the one-pass path checks the whole:
    validated by the same models, a key given twice found by its colons."""
    blocks = iter(blocks)
    text = bytearray()
    for block in blocks:
        text += block
        opened = text.find(_VMS_OPEN, max(0, len(text) - len(block) - len(_VMS_OPEN)))
        if opened >= 0:
            break
    else:
        return None
    # the top level first, "vms": [] closing it (all that may follow the list is checked below): the
    # memory pydantic's tree of it takes is free again before the VMs' models are made
    head = bytes(text[:opened + len(_VMS_OPEN)]) + b"]\n}"
    del text[:opened + len(_VMS_OPEN)]
    try:
        top, defaulted = _validate_counting(FleetSnapshot, head)
    except (ValidationError, _CannotCount):
        return None
    if top.vms or head.count(b":") != _colons_outside_vms(top) - defaulted or _escaped_colon(head):
        return None
    del head
    vms: list[Vm] = []
    pieces = 0
    while True:
        cut = text.find(_BETWEEN_VMS, piece_bytes) if len(text) > piece_bytes else -1
        if cut < 0:
            more = next(blocks, None)
            if more is None:
                break
            text += more
            continue
        if not _take_piece(text[:cut + len(b"\n    }")], vms):
            return None
        del text[:cut + len(b"\n    },")]
        pieces += 1
        if pieces % _PIECES_PER_TRIM == 0:
            release_freed_memory()
    end = len(text)
    while end and text[end - 1] in b" \t\r\n":
        end -= 1
    closed = end - len(_VMS_CLOSE)
    if closed <= 0 or text[closed:end] != _VMS_CLOSE or not _take_piece(text[:closed], vms):
        return None
    # the models made above as they are, and the checks of the whole snapshot (VMs on known hosts,
    # each once, pins their host has): validating them again would run every VM's own checks twice
    checks = _snapshot_checks()
    if checks is None:
        return None
    whole = FleetSnapshot.model_construct(set(top.model_fields_set), **{**top.__dict__, "vms": tuple(vms)})
    del vms
    try:
        for check in checks:
            check(whole)
    except ValueError:
        return None
    release_freed_memory()
    return whole


def _take_piece(text: bytearray, vms: list[Vm]) -> bool:
    """Validate the VMs ``text`` lists (a piece of the VMs' list) onto ``vms``; False if the piece is
    not valid JSON of VMs, holds none, or may hold a key given twice."""
    piece = b"[" + text + b"]"
    try:
        some, defaulted = _validate_counting(tuple[Vm, ...], piece)
    except (ValidationError, _CannotCount):
        return False
    if not some or piece.count(b":") != _colons_of_vms(some) - defaulted or _escaped_colon(piece):
        return False
    vms += some
    return True


def _escaped_colon(text: bytes) -> bool:
    # a backslash first: one byte is found ~20x faster than a longer needle, and most files have none
    return b"\\" in text and (b"\\u003a" in text or b"\\u003A" in text)


def _snapshot_checks() -> list[Callable[[FleetSnapshot], object]] | None:
    """FleetSnapshot's own validators, which run after its fields'; None if it has others, which
    model_construct would skip (then snapshots are read the one-pass way: test_snapshot_pieces fails)."""
    found = FleetSnapshot.__pydantic_decorators__
    if found.field_validators or any(d.info.mode != "after" for d in found.model_validators.values()):
        return None
    return [d.func for d in found.model_validators.values()]


# fields of slotted models (SlottedModel: hosts, cells, pools, VMs) pydantic filled with their defaults in
# the validators of _counting_defaults, per thread (the factories run in the thread that validates): such a
# model keeps no set of the fields it was given
_DEFAULTED = threading.local()


def _validate_counting(kind: Any, text: str | bytes) -> tuple[Any, int]:
    """``text`` validated as ``kind`` (FleetSnapshot, tuple[Vm, ...]) by the same schema as ever, and
    how many fields of slotted models it left out (filled with their defaults): the text gave the others.
    Counted per thread: a count another thread's validation changed could hide a key given twice."""
    validator = _counting_defaults(kind)
    if validator is None:
        raise _CannotCount
    _DEFAULTED.n = 0
    made = validator.validate_json(text)
    return made, _DEFAULTED.n


class _CannotCount(Exception):
    """This pydantic-core cannot count the defaults it fills (see _counting_defaults)."""


@functools.cache
def _counting_defaults(kind: Any) -> SchemaValidator | None:
    """The counting validator of ``kind``, or None when this pydantic-core does not run the counting
    factories: it reuses a class's own validator in place of the schema given for it ("prebuilt";
    ``_use_prebuilt=False``, a private option, turns that off). Checked on a cell that leaves out
    two fields; without it snapshots are read the strict way (test_snapshot_pieces fails loudly)."""
    try:
        probe = SchemaValidator(_count_defaults(TypeAdapter(Cell).core_schema), _use_prebuilt=False)
        _DEFAULTED.n = 0
        probe.validate_json('{"id": 0, "memory_mib": 1, "free_mib": 0}')
        if _DEFAULTED.n != 2:
            return None
        return SchemaValidator(_count_defaults(TypeAdapter(kind).core_schema), _use_prebuilt=False)
    except TypeError:  # no such option
        return None


def _count_defaults(schema: Any) -> Any:
    """A copy of a core schema in which each default of a slotted model (a dataclass: the snapshot's
    have no others) is given by a factory that counts.

    And without Vm._positive, which only words an error (the VM's name in it) and accepts what its
    inner schema accepts: what fails here is read the strict way, which says it (~50 ms of 88k VMs)."""
    if isinstance(schema, list):
        return [_count_defaults(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if schema.get("type") == "function-wrap" and _is_positive(schema["function"].get("function")):
        return _count_defaults(schema["schema"])
    out = {key: _count_defaults(value) for key, value in schema.items()}
    if out.get("type") == "dataclass-args":
        for field in out["fields"]:
            if field["schema"]["type"] == "default":
                field["schema"] = _counted(field["schema"])
    return out


def _is_positive(function: object) -> bool:
    return getattr(function, "__func__", None) is getattr(Vm._positive, "__func__", Vm._positive)


def _counted(default: dict[str, Any]) -> dict[str, Any]:
    if default.get("default_factory_takes_data"):
        raise TypeError("a default factory that takes the data: count it here")
    factory = default.get("default_factory")
    value = default.get("default")

    def make() -> Any:
        _DEFAULTED.n += 1
        return factory() if factory is not None else value

    return {**{k: v for k, v in default.items() if k != "default"}, "default_factory": make,
            "default_factory_takes_data": False}


def _colons_held(snapshot: FleetSnapshot, defaulted: int) -> int:
    """Colons the JSON text a snapshot was validated from has, as its models tell: one per distinct key
    of each object, and those inside its strings (no default string of the models holds one).
    ``defaulted``: the fields of slotted models the text left out (_validate_counting)."""
    return _colons_outside_vms(snapshot) + _colons_of_vms(snapshot.vms) - defaulted


# The counts below take every field of a slotted model as given: the caller subtracts those the text
# left out (_validate_counting).
_HOST_FIELDS, _CELL_FIELDS, _POOL_FIELDS, _VM_FIELDS = (
    len(model.__dataclass_fields__) for model in (Host, Cell, HugePages, Vm))


def _colons_outside_vms(snapshot: FleetSnapshot) -> int:
    texts = [snapshot.format, snapshot.cluster, snapshot.taken_at, snapshot.source]
    n = len(snapshot.__pydantic_fields_set__) + len(snapshot.limits.__pydantic_fields_set__)
    n += len(snapshot.hosts) * _HOST_FIELDS
    for host in snapshot.hosts:
        texts += (host.name, host.cluster, host.cpu_group, host.boot_id or "", host.kernel or "")
        n += len(host.cells) * _CELL_FIELDS + sum(len(cell.hugepages) for cell in host.cells) * _POOL_FIELDS
    return n + "\n".join(texts).count(":")


def _colons_of_vms(vms: Sequence[Vm]) -> int:
    texts: list[str] = []
    n = len(vms) * _VM_FIELDS
    for vm in vms:
        n += len(vm.vcpupin) + len(vm.iothreadpin)
        texts += (vm.name, vm.uuid, vm.host, vm.not_migratable_reason or "", vm.anti_affinity or "", vm.origin or "")
        if vm.tags:
            texts += vm.tags
        if vm.numatune is not None:
            n += len(vm.numatune.__pydantic_fields_set__)
            texts.append(vm.numatune.mode)
        for guest in vm.vnuma:
            n += len(guest.__pydantic_fields_set__)
        if vm.virtio_mem is not None:
            n += len(vm.virtio_mem.__pydantic_fields_set__)
    return n + "\n".join(texts).count(":")


def load_snapshot(path: str | Path) -> FleetSnapshot:
    """Read a snapshot file written by ``hostmaint snapshot`` or any tool that follows docs/snapshot.md."""
    p = Path(path)
    try:
        with collector_paused():
            # a file as it is read, never whole in memory; another layout (or a problem) as below
            fast = _read_in_pieces(_utf8_blocks(p))
        if fast is not None:
            return fast
    except _Unreadable:
        pass
    try:
        data = read_utf8(p)  # UTF-8, or an error naming the byte and its line
    except FileFormatError as exc:
        raise SnapshotError(str(exc)) from None
    return parse_snapshot(data, str(p))


class _Unreadable(Exception):
    """A file :func:`_utf8_blocks` cannot give as UTF-8 blocks: read_utf8 names the problem."""


def _utf8_blocks(path: Path) -> Iterator[bytes]:
    """The file's blocks as read, checked as UTF-8 across their edges; _Unreadable where it cannot
    be read, is not UTF-8 or starts with a BOM."""
    check = codecs.getincrementaldecoder("utf-8")()
    try:
        with path.open("rb") as f:
            first = True
            while block := f.read(_BLOCK_BYTES):
                if first and block.startswith(codecs.BOM_UTF8):
                    raise _Unreadable
                first = False
                if not block.isascii() or check.getstate()[0]:
                    check.decode(block)
                yield block
        check.decode(b"", final=True)
    except (OSError, UnicodeDecodeError):
        raise _Unreadable from None


def dump_snapshot(snapshot: FleetSnapshot) -> str:
    """Canonical, stable JSON of a snapshot (sorted keys, two-space indent)."""
    with collector_paused():
        return json.dumps(snapshot.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


def with_state(snapshot: FleetSnapshot, states: Mapping[str, HostState]) -> FleetSnapshot:
    """The same snapshot with host states replaced (a plan must see cordons made since discovery)."""
    hosts = tuple(h.model_copy(update={"state": states.get(h.name, h.state)}) for h in snapshot.hosts)
    return snapshot.model_copy(update={"hosts": hosts})


def unmigratable_action(vm: Vm) -> UnmigratableAction | None:
    """What the policy says to do with ``vm`` if it cannot live-migrate; None when it can."""
    return None if vm.migratable else vm.on_unmigratable
