"""Domain models: hosts, NUMA cells, VMs, the fleet snapshot, plans and migrations.

Everything here is frozen data. The fleet snapshot's JSON form is a public
contract (``docs/snapshot.md``): fields are added, never renamed.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import weakref
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from itertools import chain
from typing import Annotated, Any, ClassVar, Literal, Self, TypeVar

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass as pydantic_dataclass
from pydantic.fields import FieldInfo
from pydantic_core import SchemaSerializer, SchemaValidator

from hostmaint.bulk import Forked, collector_paused, release_freed_memory

SNAPSHOT_FORMAT = "hostmaint.snapshot/1"


class Frozen(BaseModel):
    """Base of every model: immutable, unknown fields refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class _NoPins(dict[int, tuple[int, ...]]):
    """The empty pin map every validated VM without pins shares (two per VM, 64 bytes each, ~11 MB at
    90,000 VMs). Reads as ``{}``; changing it would change every VM's: refused."""

    __slots__ = ()

    def _refuse(self, *args: object, **kwargs: object) -> None:
        raise TypeError("a VM's empty pin map is shared: build a new dict to change it")

    __setitem__ = __delitem__ = setdefault = update = pop = popitem = clear = _refuse  # type: ignore[assignment]
    __ior__ = _refuse  # type: ignore[assignment]

    def __copy__(self) -> dict[int, tuple[int, ...]]:
        return {}

    def __deepcopy__(self, memo: object) -> dict[int, tuple[int, ...]]:
        return {}

    def __reduce__(self) -> tuple[type[dict[int, tuple[int, ...]]], tuple[()]]:
        return dict, ()


_NO_PINS = _NoPins()


class SlottedModel:
    """The part of pydantic's BaseModel API hostmaint uses (``model_copy``, ``model_dump``,
    ``model_validate``...), for a frozen pydantic dataclass with slots: the models a snapshot holds
    thousands of (Vm, Host, Cell, HugePages), where a BaseModel's per-instance ``__dict__`` (~0.8 KB
    for a VM's 25 fields) was most of a 5,000-host plan's memory. Validation, errors and dumps are
    pydantic's, from the same field declarations; a slotted model has no set of given field names."""

    __slots__ = ()
    __dataclass_fields__: ClassVar[dict[str, Any]]
    __pydantic_validator__: ClassVar[SchemaValidator]
    __pydantic_serializer__: ClassVar[SchemaSerializer]
    __pydantic_fields__: ClassVar[dict[str, FieldInfo]]
    model_fields: ClassVar[dict[str, FieldInfo]]  # the fields' declarations, as BaseModel's

    @classmethod
    def model_validate(cls, obj: object) -> Self:
        """Validate ``obj`` (a dict of fields, or an instance) as BaseModel.model_validate does."""
        made: Self = cls.__pydantic_validator__.validate_python(obj)
        return made

    @classmethod
    def model_validate_json(cls, data: str | bytes) -> Self:
        """Validate JSON text as BaseModel.model_validate_json does."""
        made: Self = cls.__pydantic_validator__.validate_json(data)
        return made

    def model_dump(self, *, mode: Literal["json", "python"] = "python", **options: Any) -> dict[str, Any]:
        """Every field, as BaseModel.model_dump gives them (``options``: include, exclude, ...)."""
        dumped: dict[str, Any] = self.__pydantic_serializer__.to_python(self, mode=mode, **options)
        return dumped

    def model_dump_json(self, **options: Any) -> str:
        """The fields as JSON, as BaseModel.model_dump_json writes them (``options``: indent, exclude, ...)."""
        return self.__pydantic_serializer__.to_json(self, **options).decode()

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy with ``update``'s fields replaced, not validated (as BaseModel.model_copy)."""
        new: Self = copy.deepcopy(self) if deep else _copier(type(self))(self)
        if update:
            unknown = update.keys() - self.__dataclass_fields__.keys()
            if unknown:
                raise ValueError(f"{type(self).__name__} has no field(s) {', '.join(sorted(unknown))}")
            for name, value in update.items():
                object.__setattr__(new, name, value)
        return new


_COPIERS: dict[type, Callable[[Any], Any]] = {}


def _copier(model: type[SlottedModel]) -> Callable[[Any], Any]:
    """A function copying a slotted model field by field (made once per class, as dataclasses make
    their ``__init__``): a simulated night copies every VM of a fleet again and again."""
    known = _COPIERS.get(model)
    if known is None:
        names = list(model.__dataclass_fields__)  # identifiers of our own declarations, never input
        source = "def copy(m):\n    new = new_(model)\n" + "".join(
            f"    set_(new, {n!r}, m.{n})\n" for n in names) + "    return new\n"
        space: dict[str, Any] = {"new_": object.__new__, "set_": object.__setattr__, "model": model}
        exec(source, space)
        known = _COPIERS[model] = space["copy"]
    return known


class _SharedFieldNames(set[str]):
    """The names of the fields a model was given, one object for all the models of a class given the
    same names: pydantic keeps a set per instance (~0.2 KB even for a numatune's two fields), and the
    parts of a snapshot's VMs that stay BaseModels are many (see _shared). Frozen models never add to
    it (pydantic adds only on assignment); a copy (``model_copy``, ``copy.copy``) gets a plain set of
    its own, which ``model_copy(update=...)`` then grows. Changing it in place would change every
    model's: refused."""

    __slots__ = ()

    def __copy__(self) -> set[str]:
        return set(self)

    def _refuse(self, *args: object) -> None:
        raise TypeError("the field names of frozen models are shared: copy them to change them")

    add = discard = remove = pop = clear = update = _refuse  # type: ignore[assignment]
    difference_update = intersection_update = symmetric_difference_update = _refuse  # type: ignore[assignment]
    __ior__ = __iand__ = __isub__ = __ixor__ = _refuse  # type: ignore[assignment]


# (model class, field names) -> the one set its models share; bounded (a model is given one of a few
# sets of fields in practice; past the bound a model keeps its own)
_FIELD_NAMES: dict[tuple[type, frozenset[str]], _SharedFieldNames] = {}
_LAST_FIELD_NAMES: dict[type, _SharedFieldNames] = {}
_MAX_FIELD_NAME_SETS = 1024


def _share_field_names(model: BaseModel) -> None:
    """Let ``model`` (frozen, just validated) share its set of given field names with its equals."""
    given = model.__pydantic_fields_set__
    cls = type(model)
    last = _LAST_FIELD_NAMES.get(cls)
    if last is not None and last == given:  # the common case: as the model before it
        object.__setattr__(model, "__pydantic_fields_set__", last)
        return
    key = (cls, frozenset(given))
    shared = _FIELD_NAMES.get(key)
    if shared is None:
        if len(_FIELD_NAMES) >= _MAX_FIELD_NAME_SETS:
            return
        shared = _FIELD_NAMES[key] = _SharedFieldNames(given)
    _LAST_FIELD_NAMES[cls] = shared
    object.__setattr__(model, "__pydantic_fields_set__", shared)


_SHARED_CPUS: dict[tuple[int, ...], tuple[int, ...]] = {}  # a cell's CPUs -> the one tuple equal cells share
_SHARED_SIZES: dict[int, int] = {}  # a VM's memory_mib -> the one int object VMs of that size share
_Part = TypeVar("_Part", bound=BaseModel)
# (shared set of given names, field values) -> the one frozen model of them VMs share; bounded
_SHARED_PARTS: dict[tuple[object, ...], BaseModel] = {}
_MAX_SHARED_PARTS = 1 << 16


def _shared(part: _Part) -> _Part:
    """An equal frozen model met before (same fields, same values, the same fields given), or ``part``."""
    _share_field_names(part)
    given = part.__pydantic_fields_set__
    if type(given) is not _SharedFieldNames:  # past the bound of shared sets
        return part
    key = (id(given), *part.__dict__.values())  # the shared set is kept (_FIELD_NAMES): its id too
    try:
        known = _SHARED_PARTS.get(key)
    except TypeError:  # a value that is not hashable
        return part
    if known is not None:
        return known  # type: ignore[return-value]  # the set of given names is its class's
    if len(_SHARED_PARTS) < _MAX_SHARED_PARTS:
        _SHARED_PARTS[key] = part
    return part


# --- enums -----------------------------------------------------------------


class HostState(StrEnum):
    """Where a host stands in maintenance. Only ``active`` hosts receive VMs."""

    ACTIVE = "active"
    CORDONED = "cordoned"
    DRAINING = "draining"
    DRAINED = "drained"
    PATCHING = "patching"
    REBOOTING = "rebooting"
    VERIFYING = "verifying"
    FAILED = "failed"


class StepOutcome(StrEnum):
    """How one step of maintenance ended."""

    OK = "ok"
    SKIPPED = "skipped"
    FAILED = "failed"
    DRY_RUN = "dry-run"
    ABORTED = "aborted"
    UNKNOWN = "unknown"  # the connection was lost while it ran: it may or may not have happened


class Step(StrEnum):
    """A step of maintenance: the name its audit records carry (the stored value never changes, so
    old trails still read and resume), the step a StepError names, and what a resumed run has left
    to do (hostmaint/resume.py). Match records against members, never against text."""

    # a host's maintenance, in runbook order
    PRECHECK = "precheck"
    GATE = "gate"
    SILENCE = "silence"
    CORDON = "cordon"
    DISCOVER = "discover"  # the cluster as it is now, and the moves an earlier run left unrecorded
    PLAN = "plan"
    REPLAN = "replan"
    HOOK = "hook"
    DRAIN = "drain"
    MIGRATE = "migrate"
    MIGRATION_FOUND = "migration-found"
    MIGRATION_RESOLVED = "migration-resolved"
    VM_NOT_FOUND = "vm-not-found"
    VM_STOPPED_OUTSIDE = "vm-stopped-outside"  # its guest shut down, or a tenant destroyed it, mid-maintenance
    VM_RESUMED = "vm-resumed"  # left paused on its source by a migration that no longer runs
    STALE_COPY_REMOVED = "stale-copy-removed"  # a paused source copy of a VM its migration's target runs
    SHUTDOWN_VM = "shutdown-vm"
    CONFIRM_EMPTY = "confirm-empty"
    PREFLIGHT = "preflight"
    SNAPSHOT = "snapshot"  # the installed packages, read before and after an update
    UPDATE_STARTED = "update-started"
    UPDATE = "update"
    UPDATE_RECOVERED = "update-recovered"
    REBOOT_DECISION = "reboot-decision"
    PROVE_REBOOT = "prove-reboot"  # resume only: a reboot an earlier run issued, proven or done now
    REBOOT_ISSUED = "reboot-issued"
    REBOOT = "reboot"
    VERIFY = "verify"
    START_VM = "start-vm"
    SHUT_OFF_VMS = "shut-off-vms"
    UNCORDON = "uncordon"
    RETURN_VMS = "return-vms"
    INVARIANTS = "invariants"
    SILENCE_END = "silence-end"
    # when a maintenance cannot go on, or is stopped
    KEEP_CORDONED = "keep-cordoned"
    CANCEL = "cancel"
    MOVES_STARTED = "moves-started"
    # around maintenance
    REBALANCE = "rebalance"
    WINDOW = "window"
    INCIDENT = "incident"
    APPROVAL = "approval"
    RESIZE = "resize"  # a VM grown (or shrunk) live: hostmaint/resizing.py
    # an operator's own change of a host's state
    RESET = "reset"
    OPERATOR_CORDON = "operator-cordon"
    OPERATOR_UNCORDON = "operator-uncordon"


class Trigger(StrEnum):
    """What started a run; recorded in every audit record."""

    SCHEDULE = "schedule"
    UI = "ui"
    EVENT = "event"
    CLI = "cli"
    TEST = "test"


class RebootPolicy(StrEnum):
    IF_NEEDED = "if-needed"
    ALWAYS = "always"
    NEVER = "never"


class PackageManager(StrEnum):
    YUM = "yum"
    DNF = "dnf"


class UnmigratableAction(StrEnum):
    """What to do with a VM that cannot live-migrate."""

    BLOCK = "block"  # the host cannot be drained; the plan says so and nothing runs
    SHUTDOWN = "shutdown"  # shut down cleanly before the reboot, start again after verify
    SKIP_HOST = "skip-host"  # leave the whole host out of the window


# --- inventory limits (also carried in the snapshot) ------------------------


class Limits(Frozen):
    """Cluster limits from the inventory. Planning and draining never exceed them."""

    migrations_per_source: Annotated[int, Field(ge=1, le=64)] = 2
    migrations_per_target: Annotated[int, Field(ge=1, le=64)] = 2
    migrations_per_cluster: Annotated[int, Field(ge=1, le=1024)] = 8
    max_hosts_in_maintenance: Annotated[int, Field(ge=1, le=1024)] = 1
    memory_headroom_pct: Annotated[float, Field(ge=0, le=90)] = 10.0
    vcpu_overcommit: Annotated[float, Field(gt=0, le=64)] = 4.0
    # guest memory a host may hold per MiB of its ordinary memory (outside its hugepage pools): above
    # 1 for fleets that overcommit memory (balloon, KSM); discovery caps free memory by it
    memory_overcommit: Annotated[float, Field(ge=1, le=16)] = 1.0
    # N+1: after draining, the cluster must still survive losing this many of its largest hosts
    # (0 for a two-host lab, where N+1 can never hold)
    spare_hosts: Annotated[int, Field(ge=0, le=64)] = 1


# --- discovered facts -------------------------------------------------------

# Bounds on what a host or snapshot may report (not policy: hostmaint.resize has the sizes an operator
# may ask for), past anything real, so that every sum the planner and its exact stage make stays within
# 64 bits: CP-SAT refuses a larger constant (a snapshot with a cell of 10^30 MiB ended in a TypeError
# from OR-Tools, not in an error naming the field) and numpy's int64 would wrap. 2^40 MiB is an
# exbibyte; times the VMs of a cluster it is still far below 2^63.
MIB_BOUND = 2**40
VCPUS_BOUND = 2**20  # libvirt's own limit is a few thousand
PAGE_KIB_BOUND = 2**30  # a page of 1 TiB; real ones are 2 MiB and 1 GiB
PAGES_BOUND = 2**40
SLOTS_BOUND = 2**16


@pydantic_dataclass(frozen=True, slots=True, kw_only=True, config=ConfigDict(extra="forbid"))
class HugePages(SlottedModel):
    """A cell's hugepage pool of one page size. Slotted (SlottedModel): one per cell of every host."""

    size_kib: Annotated[int, Field(gt=0, le=PAGE_KIB_BOUND, strict=True)]
    total: Annotated[int, Field(ge=0, le=PAGES_BOUND, strict=True)]
    free: Annotated[int, Field(ge=0, le=PAGES_BOUND, strict=True)]


@pydantic_dataclass(frozen=True, slots=True, kw_only=True, config=ConfigDict(extra="forbid"))
class Cell(SlottedModel):
    """One host NUMA cell. Slotted (SlottedModel): a large site has ~15,000."""

    id: Annotated[int, Field(ge=0)]
    memory_mib: Annotated[int, Field(ge=0, le=MIB_BOUND, strict=True)]
    free_mib: Annotated[int, Field(ge=0, le=MIB_BOUND, strict=True)]
    cpus: tuple[int, ...] = ()
    hugepages: tuple[HugePages, ...] = ()


class GuestCell(Frozen):
    """One guest (vNUMA) cell of a VM."""

    id: Annotated[int, Field(ge=0)]
    memory_mib: Annotated[int, Field(gt=0, le=MIB_BOUND, strict=True)]
    vcpus: tuple[int, ...] = ()


NUMATUNE_MODES = ("strict", "preferred", "interleave", "restrictive")  # libvirt's <numatune> modes


class Numatune(Frozen):
    mode: str = "strict"  # one of NUMATUNE_MODES; checked by the Vm, whose name the error gives
    nodeset: tuple[int, ...] = ()


class VirtioMem(Frozen):
    """A virtio-mem device: memory the guest can be given live, up to ``size_mib``, on one guest node."""

    node: Annotated[int, Field(ge=0)]
    size_mib: Annotated[int, Field(gt=0, le=MIB_BOUND, strict=True)]  # the most it can plug (<target><size>)
    # what the guest is asked to have plugged now
    requested_mib: Annotated[int, Field(ge=0, le=MIB_BOUND, strict=True)] = 0
    block_kib: Annotated[int, Field(gt=0, le=PAGE_KIB_BOUND, strict=True)] = 2048  # requested sizes are whole blocks


@pydantic_dataclass(frozen=True, slots=True, kw_only=True, config=ConfigDict(extra="forbid"))
class Vm(SlottedModel):
    """A running VM as discovered, with the inventory's policy resolved onto it. Slotted (see
    SlottedModel): a large site's snapshot holds ~100,000."""

    name: Annotated[str, Field(min_length=1)]
    uuid: str
    host: str
    memory_mib: Annotated[int, Field(gt=0, le=MIB_BOUND, strict=True)]
    vcpus: Annotated[int, Field(gt=0, le=VCPUS_BOUND, strict=True)]
    # <vcpu>'s maximum when hot-pluggable vCPUs make it more than ``vcpus`` (those online now, what
    # the host runs); pins and guest cells may name any vCPU below it. None: the same as vcpus.
    max_vcpus: Annotated[int, Field(gt=0, le=VCPUS_BOUND, strict=True)] | None = None
    # vCPUs present since boot (not hot-pluggable): libvirt cannot unplug them live. None: not known
    fixed_vcpus: Annotated[int, Field(gt=0, le=VCPUS_BOUND, strict=True)] | None = None
    # <maxMemory slots>: the most memory DIMMs may bring it to, and the slots for them; None/0 when
    # the domain was defined without (no DIMM can be hot-plugged). Slots used: its DIMM devices.
    max_memory_mib: Annotated[int, Field(gt=0, le=MIB_BOUND, strict=True)] | None = None
    memory_slots: Annotated[int, Field(ge=0, le=SLOTS_BOUND, strict=True)] = 0
    memory_slots_used: Annotated[int, Field(ge=0, le=SLOTS_BOUND, strict=True)] = 0
    virtio_mem: VirtioMem | None = None
    vnuma: tuple[GuestCell, ...] = ()
    vcpupin: dict[int, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    emulatorpin: tuple[int, ...] = ()
    # <vcpu cpuset>: where libvirt runs every vCPU without its own vcpupin and the emulator
    # threads when there is no emulatorpin; empty when not set (or placement='auto')
    vcpu_cpuset: tuple[int, ...] = ()
    iothreadpin: dict[int, tuple[int, ...]] = dataclasses.field(default_factory=dict)  # iothread id -> host CPUs
    numatune: Numatune | None = None
    hugepage_kib: Annotated[int, Field(ge=0, le=PAGE_KIB_BOUND, strict=True)] = 0
    migratable: bool = True
    not_migratable_reason: str | None = None
    # False for a transient domain: libvirt forgets it once it stops, so it can never be shut down
    # for maintenance and started again
    persistent: bool = True
    # policy, resolved from the inventory's vm_policies
    anti_affinity: str | None = None
    on_unmigratable: UnmigratableAction = UnmigratableAction.BLOCK
    tags: tuple[str, ...] = ()
    origin: str | None = None  # the host it lived on before maintenance moved it

    @field_validator("memory_mib", "vcpus", mode="wrap")
    @classmethod
    def _positive(cls, value: object, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> int:
        # A snapshot's VMs are found by name, not position: say which VM has no memory or vCPUs, or
        # more than any machine has.
        try:
            return int(handler(value))
        except ValidationError as exc:
            error = exc.errors()[0]
            name = info.data.get("name", "?")
            if error["type"] == "greater_than":
                raise ValueError(f"VM {name!r}: {info.field_name} must be greater than 0, got {value!r}") from None
            if error["type"] == "less_than_equal":
                most = (error.get("ctx") or {}).get("le")
                raise ValueError(f"VM {name!r}: {info.field_name} must be at most {most}, got {value!r}") from None
            raise

    @model_validator(mode="after")
    def _coherent(self) -> Vm:
        # One validator, and the common case answered without a loop in Python: a snapshot holds
        # tens of thousands of VMs and every plan loads one. The checks and their order are
        # _vnuma_within_memory's, _numatune_mode_known's and _vcpus_exist's.
        if not self.vcpupin:
            object.__setattr__(self, "vcpupin", _NO_PINS)
        if not self.iothreadpin:
            object.__setattr__(self, "iothreadpin", _NO_PINS)
        if self.vnuma:
            self._vnuma_within_memory()
        if self.numatune is not None:
            self._numatune_mode_known()
        if self.max_memory_mib is not None or self.memory_slots_used or self.virtio_mem is not None \
                or self.fixed_vcpus is not None:
            self._room_to_grow_coherent()
        most = self.max_vcpus or self.vcpus
        flat = [vcpu for g in self.vnuma for vcpu in g.vcpus] if self.vnuma else []
        if (most < self.vcpus
                or (self.vcpupin and not (min(self.vcpupin) >= 0 and max(self.vcpupin) < most))
                or (self.vnuma and len({g.id for g in self.vnuma}) < len(self.vnuma))
                or (flat and not (min(flat) >= 0 and max(flat) < most and len(set(flat)) == len(flat)))
                or (self.iothreadpin and min(self.iothreadpin) < 1)
                or (self.hugepage_kib and not _power_of_two(self.hugepage_kib))):
            self._vcpus_exist()  # raises, naming the first problem
        # equal parts are one object: ~30 % of a site's VMs carry a numatune (a model, its dict and its
        # set of given names, ~0.5 KB), and VMs of one flavour the same guest cells
        if self.numatune is not None:
            object.__setattr__(self, "numatune", _shared(self.numatune))
        if self.vnuma:
            object.__setattr__(self, "vnuma", tuple(map(_shared, self.vnuma)))
        # and sizes: a site has a few flavours, and each VM's memory_mib was an int object of its own
        size = _SHARED_SIZES.get(self.memory_mib)
        if size is None and len(_SHARED_SIZES) < _MAX_SHARED_PARTS:
            size = _SHARED_SIZES[self.memory_mib] = self.memory_mib
        if size is not None:
            object.__setattr__(self, "memory_mib", size)
        return self

    def _vnuma_within_memory(self) -> None:
        # Guest cells hold part of the VM's memory (the rest is hot-plugged DIMMs); cells holding
        # more than the whole VM is a topology no domain has, and would be planned as given.
        listed = sum(g.memory_mib for g in self.vnuma)
        if listed > self.memory_mib:
            raise ValueError(f"VM {self.name!r}: its vNUMA cells hold {listed} MiB, more than its "
                             f"memory_mib {self.memory_mib}")

    def _room_to_grow_coherent(self) -> None:
        # What a resize plans from (hostmaint/resize.py): a limit below what the VM already has would
        # be planned as room it does not have, or refused with the wrong reason.
        if self.max_memory_mib is not None and self.max_memory_mib < self.memory_mib:
            raise ValueError(f"VM {self.name!r}: max_memory_mib {self.max_memory_mib} is less than its "
                             f"memory_mib {self.memory_mib}")
        if self.memory_slots_used > self.memory_slots:
            raise ValueError(f"VM {self.name!r}: memory_slots_used {self.memory_slots_used} is more than its "
                             f"memory_slots {self.memory_slots}")
        if self.fixed_vcpus is not None and self.fixed_vcpus > self.vcpus:
            raise ValueError(f"VM {self.name!r}: fixed_vcpus {self.fixed_vcpus} is more than the {self.vcpus} "
                             f"vCPUs it runs")
        vmem = self.virtio_mem
        if vmem is not None:
            if vmem.requested_mib > vmem.size_mib:
                raise ValueError(f"VM {self.name!r}: virtio_mem requested_mib {vmem.requested_mib} is more than "
                                 f"its size_mib {vmem.size_mib}")
            if self.vnuma and vmem.node not in {g.id for g in self.vnuma}:
                raise ValueError(f"VM {self.name!r}: virtio_mem node {vmem.node} is not one of its guest cells")

    def _numatune_mode_known(self) -> None:
        # An unknown mode would be planned as a binding and sent back to libvirt, which refuses
        # the destination XML only when the migration starts, after the plan was approved.
        if self.numatune is not None and self.numatune.mode not in NUMATUNE_MODES:
            raise ValueError(f"VM {self.name!r}: numatune mode {self.numatune.mode!r} is not one of "
                             f"{', '.join(NUMATUNE_MODES)}")

    def _vcpus_exist(self) -> None:
        # vCPUs are numbered 0..vcpus-1 and libvirt refuses a domain whose pins or guest cells
        # name others: such a VM never ran, and its pins would be planned (and rewritten) as given.
        most = self.max_vcpus or self.vcpus
        if most < self.vcpus:
            raise ValueError(f"VM {self.name!r}: max_vcpus {most} is less than the {self.vcpus} vCPUs it runs")

        def check(vcpu: int, where: str) -> None:
            if not 0 <= vcpu < most:
                raise ValueError(f"VM {self.name!r}: {where} names vCPU {vcpu}, but the VM has {most} vCPU(s) "
                                 f"(0-{most - 1}{'' if self.max_vcpus else '; max_vcpus gives hot-pluggable ones'})")
        for vcpu in self.vcpupin:
            check(vcpu, "vcpupin")
        cell_of: dict[int, int] = {}
        seen_cells: set[int] = set()
        for g in self.vnuma:
            if g.id in seen_cells:
                raise ValueError(f"VM {self.name!r}: vnuma: guest cell id {g.id} is listed twice")
            seen_cells.add(g.id)
            for vcpu in g.vcpus:
                check(vcpu, f"vnuma guest cell {g.id}")
                if vcpu in cell_of:
                    where = "twice in guest cell" if cell_of[vcpu] == g.id else f"in guest cells {cell_of[vcpu]} and"
                    raise ValueError(f"VM {self.name!r}: vnuma: vCPU {vcpu} is listed {where} {g.id}")
                cell_of[vcpu] = g.id
        for thread in self.iothreadpin:
            if thread < 1:  # libvirt numbers I/O threads from 1 and refuses 0
                raise ValueError(f"VM {self.name!r}: iothreadpin names I/O thread {thread}; I/O thread ids "
                                 f"start at 1")
        if self.hugepage_kib and not _power_of_two(self.hugepage_kib):
            raise ValueError(f"VM {self.name!r}: hugepage_kib {self.hugepage_kib} is not a power of two; no "
                             f"page size is")

    @property
    def pinned(self) -> bool:
        # Emulator or I/O threads pinned alone, or vCPUs bound by <vcpu cpuset> alone, hold their
        # CPUs as much as vcpupin does: the target must reserve them and the migration must rewrite
        # them, or they land on another VM's CPUs (or on CPU ids that mean nothing on the target).
        return bool(self.vcpupin or self.emulatorpin or self.vcpu_cpuset or self.iothreadpin)




@pydantic_dataclass(frozen=True, slots=True, kw_only=True, config=ConfigDict(extra="forbid"))
class Host(SlottedModel):
    """A hypervisor host: discovered cells plus the state hostmaint keeps for it. Slotted (SlottedModel)."""

    name: Annotated[str, Field(min_length=1)]
    cluster: str
    state: HostState = HostState.ACTIVE
    cells: tuple[Cell, ...]
    reserved_memory_mib: Annotated[int, Field(ge=0, le=MIB_BOUND, strict=True)] = 0
    cpu_group: str = "default"  # CPU compatibility group: migrations stay inside one
    boot_id: str | None = None
    kernel: str | None = None

    @model_validator(mode="after")
    def _cells_consistent(self) -> Host:
        # The planner finds cells by id and books pinned CPUs by number: a second cell with the
        # same id would be charged to the first, and a CPU in two cells handed out twice, so the
        # plan would be silently wrong.
        # Discovery always reports at least one cell (a host without a NUMA topology is one cell
        # holding all of it), and every utilisation the planner weighs is over the host's memory.
        if not self.cells:
            raise ValueError(f"host {self.name!r} has no NUMA cells; a host without a NUMA topology "
                             f"is one cell holding all its memory and CPUs")
        if self.memory_mib <= 0:
            raise ValueError(f"host {self.name!r}: its cells hold no memory")
        # the common host answered without a loop over its CPUs in Python (a large site has thousands,
        # ~100 CPUs each); the loop below names the first problem. Cells of one layout share their CPUs.
        cpus = list(chain.from_iterable(cell.cpus for cell in self.cells))
        if (len({cell.id for cell in self.cells}) == len(self.cells)
                and all(cell.free_mib <= cell.memory_mib for cell in self.cells)
                and (not cpus or (min(cpus) >= 0 and len(set(cpus)) == len(cpus)))):
            for cell in self.cells:
                _check_pools(self.name, cell)
                if cell.cpus and len(_SHARED_CPUS) < _MAX_SHARED_PARTS:
                    object.__setattr__(cell, "cpus", _SHARED_CPUS.setdefault(cell.cpus, cell.cpus))
            return self
        seen_cells: set[int] = set()
        cpu_cell: dict[int, int] = {}
        for cell in self.cells:
            if cell.id in seen_cells:
                raise ValueError(f"host {self.name!r}: cell id {cell.id} is listed twice")
            if cell.free_mib > cell.memory_mib:
                # the planner would count memory the cell does not have as room for VMs
                raise ValueError(f"host {self.name!r}: cell {cell.id} has {cell.free_mib} MiB free of "
                                 f"{cell.memory_mib} MiB")
            seen_cells.add(cell.id)
            _check_pools(self.name, cell)
            for cpu in cell.cpus:
                if cpu < 0:
                    raise ValueError(f"host {self.name!r}: cell {cell.id} lists CPU {cpu}; CPU ids are not negative")
                if cpu in cpu_cell:
                    where = "twice in cell" if cpu_cell[cpu] == cell.id else f"in cells {cpu_cell[cpu]} and"
                    raise ValueError(f"host {self.name!r}: CPU {cpu} is listed {where} {cell.id}")
                cpu_cell[cpu] = cell.id
        return self

    @property
    def memory_mib(self) -> int:
        return sum(c.memory_mib for c in self.cells)

    @property
    def cpu_count(self) -> int:
        return sum(len(c.cpus) for c in self.cells)


for _slotted in (HugePages, Cell, Vm, Host):
    _slotted.model_fields = _slotted.__pydantic_fields__


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _check_pools(host: str, cell: Cell) -> None:
    """A cell's hugepage pools as the kernel keeps them: one pool per page size, a power of two,
    no more free pages than the pool has, and no pool larger than the cell's memory."""
    sizes: set[int] = set()
    pool_kib = 0
    for hp in cell.hugepages:
        where = f"host {host!r}: cell {cell.id}: hugepages of {hp.size_kib} KiB"
        if not _power_of_two(hp.size_kib):
            raise ValueError(f"{where}: the page size is not a power of two")
        if hp.size_kib in sizes:
            # the planner keeps one pool per size: a second entry would silently replace the first
            raise ValueError(f"{where} are listed twice")
        sizes.add(hp.size_kib)
        if hp.free > hp.total:
            raise ValueError(f"{where}: {hp.free} pages free of a pool of {hp.total}")
        pool_kib += hp.total * hp.size_kib
    if pool_kib > cell.memory_mib * 1024:
        raise ValueError(f"host {host!r}: cell {cell.id}: its hugepage pools hold {pool_kib // 1024} MiB, "
                         f"more than the cell's memory_mib {cell.memory_mib}")


class FleetSnapshot(Frozen):
    """The discovered state of one cluster. JSON in and out; see docs/snapshot.md."""

    format: str = SNAPSHOT_FORMAT
    cluster: str
    taken_at: str
    source: str = "unknown"  # "libvirt", "simulated", or the producing tool
    limits: Limits = Limits()
    hosts: tuple[Host, ...]
    vms: tuple[Vm, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> FleetSnapshot:
        # Linear in hosts and VMs: a large site's snapshot has thousands of hosts and ~100,000 VMs.
        counts = Counter(h.name for h in self.hosts)
        dup = {n for n, k in counts.items() if k > 1}
        if dup:
            raise ValueError(f"hosts: duplicate host name(s) {sorted(dup)}")
        hosts = {h.name: h for h in self.hosts}
        # VMs on known hosts, each once: answered by two sets; the walk below names the first problem
        # (in VM order, with what they name) only when there is one
        vms_known = len({vm.name for vm in self.vms}) == len(self.vms) and hosts.keys() >= {vm.host for vm in self.vms}
        facts: dict[str, _HostFacts] = {}
        # hosts of one build share one layout: its facts once (a set of ~100 CPUs each is ~5 KB a host)
        layouts: dict[tuple[tuple[int, tuple[int, ...], tuple[int, ...]], ...], _HostFacts] = {}
        seen: set[str] = set()
        for i, vm in enumerate(self.vms):
            if not vms_known:
                if vm.host not in hosts:
                    raise ValueError(f"vms[{i}].host: VM {vm.name!r} is on unknown host {vm.host!r}")
                if vm.name in seen:
                    raise ValueError(f"vms[{i}].name: VM {vm.name!r} runs more than once")
                seen.add(vm.name)
            # vm.pinned, read field by field: else it names nothing of the host
            if (vm.vcpupin or vm.emulatorpin or vm.vcpu_cpuset or vm.iothreadpin or vm.numatune is not None
                    or vm.hugepage_kib):
                host = hosts[vm.host]
                known = facts.get(host.name)
                if known is None:
                    layout = tuple((c.id, c.cpus, tuple(hp.size_kib for hp in c.hugepages)) for c in host.cells)
                    known = layouts.get(layout)
                    if known is None:
                        known = layouts[layout] = _HostFacts.of(host)
                    facts[host.name] = known
                _check_vm_on_host(i, vm, host, known)
        if self.format != SNAPSHOT_FORMAT:
            raise ValueError(f"format: expected {SNAPSHOT_FORMAT!r}, got {self.format!r}")
        return self

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def vms_on(self, host: str) -> tuple[Vm, ...]:
        """The VMs on ``host``, in snapshot order (grouped once per snapshot object, then looked up:
        a plan asks per host, and a large site has ~100,000 VMs)."""
        by_host = _VMS_BY_HOST.get(id(self))
        if by_host is None:
            grouped: dict[str, list[Vm]] = {}
            for v in self.vms:
                grouped.setdefault(v.host, []).append(v)
            by_host = _VMS_BY_HOST[id(self)] = {name: tuple(vms) for name, vms in grouped.items()}
            weakref.finalize(self, _VMS_BY_HOST.pop, id(self), None)
        return by_host.get(host, ())

    def digest(self) -> str:
        """SHA-256 of the canonical JSON: plans name the snapshot they were made from.

        Computed once per snapshot object (it is frozen) and kept: a plan, its check and its
        render each ask for it, and at 1,000 hosts it costs as much as the plan."""
        known = _DIGESTS.get(id(self))
        if known is not None:
            return known
        ahead = _DIGESTS_AHEAD.pop(id(self), None)
        answer = ahead.result() if ahead is not None else None
        value = answer.decode("ascii", "replace") if answer is not None else ""
        if not _SHA256_HEX.fullmatch(value):  # no child, or it failed: computed here, as ever
            value = self._digest_here()
        _DIGESTS[id(self)] = value
        weakref.finalize(self, _DIGESTS.pop, id(self), None)
        return value

    def start_digest(self, *, at_least_vms: int = 5000) -> None:
        """Begin :meth:`digest` on another core, for a snapshot of at least ``at_least_vms`` VMs: a
        forked child computes it from these frozen models while this process plans, and ``digest()``
        takes its answer (the same value: the same code on the same models). Where no child can be
        forked (other threads, no fork) nothing starts and ``digest()`` computes it as ever."""
        if len(self.vms) < at_least_vms or id(self) in _DIGESTS or id(self) in _DIGESTS_AHEAD:
            return
        ahead = Forked.start(lambda: self._digest_here().encode("ascii"))
        if ahead is not None:
            _DIGESTS_AHEAD[id(self)] = ahead
            weakref.finalize(self, _cancel_ahead, id(self))

    def _digest_here(self) -> str:
        hashed = hashlib.sha256()
        with collector_paused():  # a dict per VM and host, made and dropped a few thousand at a time
            if not _canonical_fast_into(self, hashed.update):
                canon = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()
                hashed = hashlib.sha256(canon)
        release_freed_memory()  # ~10 MiB of text and dicts at 5,000 hosts, in the C heap
        return hashed.hexdigest()


def _canonical_fast(snapshot: FleetSnapshot) -> bytes | None:
    """The snapshot's canonical JSON as ``json.dumps(model_dump(mode="json"), sort_keys=True,
    separators=(",", ":"))`` writes it, made by orjson straight from the models (~8× faster at
    5,000 hosts); None where the two could differ, and the caller makes it the slow way."""
    parts: list[bytes] = []
    return b"".join(parts) if _canonical_fast_into(snapshot, parts.append) else None


_VMS_PER_PART = 2000


_FieldsOf = Callable[[Any], dict[str, object]]
_FIELDS_SORTED: dict[type, _FieldsOf] = {}


def _fields_sorted(model: type[SlottedModel]) -> _FieldsOf:
    """A function giving a slotted model's fields as a dict, keys in sorted order: a dict display made
    once per class (``{"anti_affinity": m.anti_affinity, ...}``, as dataclasses make their ``__init__``),
    ~2x faster than ``dict(zip(keys, attrgetter(*keys)(m)))``; the digest makes one per VM and host."""
    known = _FIELDS_SORTED.get(model)
    if known is None:
        names = sorted(model.__dataclass_fields__)  # identifiers of our own declarations, never input
        known = _FIELDS_SORTED[model] = eval("lambda m: {" + ", ".join(f"{n!r}: m.{n}" for n in names) + "}")
    return known


_vm_fields = _fields_sorted(Vm)


def _canonical_fast_into(snapshot: FleetSnapshot, write: Callable[[bytes], object]) -> bool:
    """Write :func:`_canonical_fast`'s bytes to ``write`` in parts (the VMs a few thousand at a time:
    the whole text is ~50 MB at 5,000 hosts, and a digest needs only its hash); False where they
    could differ from json.dumps' (what was written is then to be thrown away).

    They write the same bytes for what a snapshot holds (models, str, int, bool, None, tuples, dicts
    with int keys as text) except: a string with a character outside printable ASCII, a quote or a
    backslash (json.dumps escapes, orjson writes UTF-8 or escapes otherwise), and floats, which
    orjson prints its own way (1e-5 for 1e-05). Such output is refused here; the snapshot's only
    floats are its limits' (test_planning_speed checks that), compared one by one."""
    for value in snapshot.limits.__dict__.values():
        if isinstance(value, float) and orjson.dumps(value) != repr(value).encode():
            return False
    # slotted models (dataclasses) through _fields_of: orjson writes a dataclass's fields unsorted
    option = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATACLASS
    try:
        # "vms" is the last of the snapshot's keys in sorted order: the rest, then its list
        head = orjson.dumps({**snapshot.__dict__, "vms": ()}, default=_fields_of, option=option)
        if not head.endswith(b',"vms":[]}') or not _as_json_dumps_writes(head):
            return False
        write(head[:-2])
        vms = snapshot.vms
        for at in range(0, len(vms), _VMS_PER_PART):
            # a VM is slotted: its fields as a dict (orjson writes a dataclass's unsorted)
            part = orjson.dumps(list(map(_vm_fields, vms[at:at + _VMS_PER_PART])), default=_fields_of, option=option)
            if not _as_json_dumps_writes(part):
                return False
            write(part[1:-1] if at == 0 else b"," + part[1:-1])
    except (TypeError, orjson.JSONEncodeError, AttributeError):  # an int beyond 64 bits: json.dumps writes it,
        return False  # orjson cannot; AttributeError: not a Vm in vms (model_construct), which model_dump sees
    write(b"]}")
    return True


def _as_json_dumps_writes(out: bytes) -> bool:
    return out.isascii() and b"\\" not in out and b"\x7f" not in out


def _fields_of(model: object) -> dict[str, object]:
    # a model's fields, as model_dump gives them: a frozen model keeps nothing else in __dict__
    if isinstance(model, BaseModel):
        return model.__dict__
    if isinstance(model, SlottedModel):
        return _fields_sorted(type(model))(model)
    raise TypeError(f"not JSON: {type(model).__name__}")


@dataclass(frozen=True)
class _HostFacts:
    """What VMs may name on a host, gathered once per host rather than once per VM."""

    cpus: frozenset[int]
    cells: frozenset[int]
    page_sizes: frozenset[int]

    @classmethod
    def of(cls, host: Host) -> _HostFacts:
        return cls(cpus=frozenset(chain.from_iterable(cell.cpus for cell in host.cells)),
                   cells=frozenset(cell.id for cell in host.cells),
                   page_sizes=frozenset(hp.size_kib for cell in host.cells for hp in cell.hugepages))


# id of a live FleetSnapshot -> its digest; an entry goes when its snapshot does (weakref.finalize),
# so an id reused by a later object never finds a stale digest. A copy (model_copy) is a new object.
_DIGESTS: dict[int, str] = {}
_VMS_BY_HOST: dict[int, dict[str, tuple[Vm, ...]]] = {}  # the same, for FleetSnapshot.vms_on
# id of a live FleetSnapshot -> its digest being computed by a child (start_digest); taken by digest(),
# or the child stopped and reaped when the snapshot goes first
_DIGESTS_AHEAD: dict[int, Forked] = {}
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _cancel_ahead(key: int) -> None:
    ahead = _DIGESTS_AHEAD.pop(key, None)
    if ahead is not None:
        ahead.cancel()


def _check_vm_on_host(index: int, vm: Vm, host: Host, facts: _HostFacts | None = None) -> None:
    """What a running VM's definition names must exist on its host: libvirt refuses to start a
    domain pinned to CPUs or bound to NUMA nodes the host lacks, or backed by hugepages of a size
    the host has no pool of. Planned as given, such pins would be counted and rewritten."""
    facts = facts or _HostFacts.of(host)
    cpus = facts.cpus
    if not (cpus.issuperset(vm.emulatorpin) and cpus.issuperset(vm.vcpu_cpuset)
            and all(map(cpus.issuperset, vm.vcpupin.values())) and all(map(cpus.issuperset, vm.iothreadpin.values()))):
        named = {"vcpupin": [c for pin in vm.vcpupin.values() for c in pin], "emulatorpin": vm.emulatorpin,
                 "vcpu_cpuset": vm.vcpu_cpuset, "iothreadpin": [c for pin in vm.iothreadpin.values() for c in pin]}
        for field_name, held in named.items():  # the first that names a CPU the host lacks
            if cpus.issuperset(held):
                continue
            missing = sorted(set(held) - cpus)
            raise ValueError(f"vms[{index}].{field_name}: VM {vm.name!r} is pinned to CPU(s) "
                             f"{', '.join(map(str, missing))}, which host {host.name!r} does not have")
    if vm.numatune is not None and not facts.cells.issuperset(vm.numatune.nodeset):
        missing = sorted(set(vm.numatune.nodeset) - facts.cells)
        if missing:
            raise ValueError(f"vms[{index}].numatune: VM {vm.name!r} is bound to NUMA node(s) "
                             f"{', '.join(map(str, missing))}, which host {host.name!r} does not have")
    if vm.hugepage_kib and vm.hugepage_kib not in facts.page_sizes:
        raise ValueError(f"vms[{index}].hugepage_kib: VM {vm.name!r} is backed by {vm.hugepage_kib} KiB "
                         f"hugepages, but host {host.name!r} lists no pool of that size (a bare <hugepages/> "
                         f"is read as the host's default size: is it another?)")


# --- plans ------------------------------------------------------------------


class Placement(Frozen):
    """One VM's move: where to, which cells, the rewrite the target needs, and why."""

    vm: str
    source: str
    target: str
    target_cells: tuple[int, ...] = ()
    numa_local: bool = True
    vcpupin: dict[int, tuple[int, ...]] = Field(default_factory=dict)
    emulatorpin: tuple[int, ...] = ()
    vcpu_cpuset: tuple[int, ...] = ()  # the VM's <vcpu cpuset> on the target; empty = leave it as is
    iothreadpin: dict[int, tuple[int, ...]] = Field(default_factory=dict)
    numatune_nodeset: tuple[int, ...] | None = None
    memory_mib: int = 0
    reason: str = ""
    runner_up: str | None = None
    cell_memory_mib: tuple[int, ...] = ()  # memory each of target_cells holds, in the same order

    @property
    def rewrites_domain(self) -> bool:
        """Whether the target needs the domain XML rewritten: anything pinned or bound to the
        source's CPUs or cells must not reach the target as it is."""
        return bool(self.vcpupin or self.emulatorpin or self.vcpu_cpuset or self.iothreadpin
                    or self.numatune_nodeset is not None)


class Blocker(Frozen):
    """Why a VM (and so its host) cannot be evacuated, and how to get past it."""

    vm: str
    host: str
    constraint: str  # memory | vcpu | hugepages | numa | pinning | anti-affinity | cpu-group | unmigratable | capacity
    reason: str
    hint: str = ""
    # with a proven refusal: VMs that cannot all be placed together (this one among them), found and
    # shrunk by the exact stage
    core: tuple[str, ...] = ()


class VmAction(Frozen):
    """A non-migratable VM handled by its policy instead of a migration."""

    vm: str
    host: str
    action: UnmigratableAction
    reason: str


class CapacityCheck(Frozen):
    """The N+1 check: can the cluster absorb the drained hosts and still lose its largest host?"""

    ok: bool
    margin_mib: int
    reason: str


class Balance(Frozen):
    """How evenly memory is used over a set of hosts: what plans report about their result."""

    hosts: int = 0
    host_max_mean: float = 0.0  # fullest host's utilisation over the capacity-weighted mean
    host_std: float = 0.0
    cell_max_mean: float = 0.0
    cell_std: float = 0.0
    numa_remote: int = 0  # placements spread over cells because no single cell held them
    objective: float = 0.0  # memory-weighted sum of squared utilisations (lower is more even)


class PlanProof(StrEnum):
    """How sure a plan is of its placement, from the exact stage (placement/exact.py)."""

    OPTIMAL = "optimal"  # CP-SAT proved every stage of the objective optimal
    FEASIBLE = "feasible"  # the budget ran out first: the best found, not proven best (nor a refusal proven)
    INFEASIBLE = "infeasible"  # CP-SAT proved that not every VM can be placed
    GREEDY_ONLY = "greedy-only"  # the exact stage did not run (no budget, or too large a model)

    @property
    def label(self) -> str:
        """How tables and refusals say it."""
        return {PlanProof.FEASIBLE: "feasible (limit reached)", PlanProof.INFEASIBLE: "infeasible (proven)",
                PlanProof.GREEDY_ONLY: "greedy only"}.get(self, self.value)


class EvacuationPlan(Frozen):
    """Where every VM of the drained hosts goes. Printed before anything moves."""

    cluster: str
    hosts: tuple[str, ...]
    snapshot_digest: str
    placements: tuple[Placement, ...] = ()
    blocked: tuple[Blocker, ...] = ()
    vm_actions: tuple[VmAction, ...] = ()
    skipped_hosts: tuple[str, ...] = ()
    capacity: CapacityCheck | None = None
    planner: str = "hostmaint"
    balance: Balance | None = None  # over the hosts that may receive, after the plan
    proof: PlanProof = PlanProof.GREEDY_ONLY
    proof_note: str = ""  # what the exact stage did: its budget, the stages it proved, why it did not run

    @property
    def feasible(self) -> bool:
        return not self.blocked and (self.capacity is None or self.capacity.ok)

    @property
    def refusals(self) -> list[str]:
        """Why the plan cannot be carried out: N+1 first, then each VM that has no target."""
        reasons = [f"{b.vm}: {b.constraint}: {b.reason}" for b in self.blocked]
        if self.capacity is not None and not self.capacity.ok:
            reasons.insert(0, f"N+1: {self.capacity.reason}")
        return reasons


class RebalanceMove(Frozen):
    placement: Placement
    improvement: float  # drop in the balance objective this move buys


class RebalancePlan(Frozen):
    cluster: str
    snapshot_digest: str
    moves: tuple[RebalanceMove, ...] = ()
    balance_before: float = 0.0
    balance_after: float = 0.0
    spread_before: Balance | None = None
    spread_after: Balance | None = None
    proof: PlanProof = PlanProof.GREEDY_ONLY
    proof_note: str = ""



class WindowStep(Frozen):
    """One host of a rolling window: its place in the order and where its VMs go."""

    order: int
    host: str
    evacuation: EvacuationPlan
    estimated_seconds: float = 0.0


class WindowPlan(Frozen):
    """A rolling maintenance window: hosts in order, each with its evacuation onto already-patched hosts."""

    cluster: str
    snapshot_digest: str
    steps: tuple[WindowStep, ...] = ()
    skipped_hosts: tuple[str, ...] = ()
    capacity: CapacityCheck | None = None
    migrations: int = 0
    vms_moved: int = 0  # distinct VMs that migrate at least once
    migrations_per_vm: float = 0.0
    estimated_seconds: float = 0.0
    planner: str = "hostmaint"
    proof: PlanProof = PlanProof.GREEDY_ONLY  # the weakest of its steps' (see placement.exact.weakest)

    @property
    def feasible(self) -> bool:
        return all(s.evacuation.feasible for s in self.steps) and (self.capacity is None or self.capacity.ok)

    @property
    def order(self) -> tuple[str, ...]:
        return tuple(s.host for s in self.steps)

    def patched_before(self, host: str) -> tuple[str, ...]:
        """Hosts patched earlier in this window than ``host``."""
        names = self.order
        return names[: names.index(host)] if host in names else ()

# --- migrations ---------------------------------------------------------------


QEMU_DOWNTIME_LIMIT_MS = 300  # QEMU's own downtime-limit, the configured one when the options name none


class MigrationOptions(Frozen):
    """Knobs of one live migration. ``placement`` carries the target's pinning/numatune rewrite."""

    bandwidth_mib_s: int | None = None
    auto_converge: bool = False
    # QEMU's vCPU throttle when auto-converge starts and its step per round (libvirt's
    # auto_converge.initial / .increment); None leaves QEMU's defaults (20 %, +10 %).
    auto_converge_initial_pct: Annotated[int, Field(ge=1, le=99)] | None = None
    auto_converge_increment_pct: Annotated[int, Field(ge=1, le=99)] | None = None
    post_copy: bool = False
    parallel_connections: Annotated[int, Field(ge=1, le=64)] = 1
    stall_seconds: Annotated[float, Field(gt=0)] = 60.0
    seconds_per_gib: Annotated[float, Field(gt=0)] = 150.0
    min_budget_seconds: Annotated[float, Field(gt=0)] = 60.0
    placement: Placement | None = None
    # how it travels (hostmaint.migration.transport): QEMU's TLS, and the target's address on the
    # migration network (None: the target's management address, as libvirt picks it)
    tls: bool = False
    migration_address: str | None = None
    # the longest final pause QEMU may plan for (libvirt's migrateSetMaxDowntime); None: QEMU's 300 ms.
    # The adaptive scheduler sets each migration's own from its share of the link at the switch-over
    downtime_limit_ms: Annotated[int, Field(ge=1)] | None = None


class MigrationProgress(Frozen):
    """One progress sample of a running migration."""

    vm: str
    elapsed_s: float
    data_total: int = 0
    data_processed: int = 0
    data_remaining: int = 0
    dirty_rate_bps: int = 0
    iterations: int = 0
    throttle_pct: int = 0  # the guest's vCPU throttle auto-converge applies now


class MigrationResult(Frozen):
    """How one migration ended, with the stats the audit record keeps."""

    vm: str
    source: str
    target: str
    outcome: StepOutcome
    seconds: float = 0.0
    downtime_ms: float | None = None
    data_bytes: int = 0
    iterations: int = 0
    error: str | None = None
    # how it travelled, as the driver asked libvirt (None: the driver does not say)
    tls: bool | None = None
    migration_address: str | None = None
    # the VM stopped outside hostmaint instead of moving (its guest shut down, or someone destroyed it):
    # libvirt's reason ("shutdown", "destroyed"), the outcome then "skipped"; None otherwise
    stopped_outside: str | None = None


class CommandResult(Frozen):
    """What a command on a host returned."""

    host: str
    argv: tuple[str, ...]
    exit_code: int
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0


class HostDiscovery(Frozen):
    """What a hypervisor driver sees on one host, before the inventory's policy is applied."""

    host: str
    hostname: str = ""
    host_uuid: str = ""
    cells: tuple[Cell, ...]
    vms: tuple[Vm, ...] = ()
