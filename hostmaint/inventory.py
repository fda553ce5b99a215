"""The inventory: clusters, hosts, policies and limits, loaded from YAML and validated.

Only what an operator decides lives here. Live facts (VMs, memory, cells) are
discovered, never typed in. Every error names the file, the field path and,
where there is one, the host: ``inventory.yaml: hosts[3].ssh.port (host hv04): must be 1-65535, got 0``.
See docs/inventory.md.
"""

from __future__ import annotations

import difflib
import fnmatch
import ipaddress
import re
import stat
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hostmaint.config_file import load_yaml
from hostmaint.errors import FileFormatError, InventoryError
from hostmaint.hooks import HookPlace
from hostmaint.models import MIB_BOUND, QEMU_DOWNTIME_LIMIT_MS, Limits, PackageManager, RebootPolicy, UnmigratableAction
from hostmaint.monitoring import GatePoint, OnHold, WorkKind, check_query, check_template
from hostmaint.redaction import holds_private_key, is_secret_name, redact_text

# A package name or glob: nothing a shell could read as syntax.
PACKAGE_PATTERN = re.compile(r"^[A-Za-z0-9._+*-]+$")
HOST_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
# what Prefect accepts as a block document name
BLOCK_NAME = r"^[a-z0-9-]+$"
# a PEM block as it appears in a message (repr() turns its line breaks into "\\n"), or cut off at the end
_PEM_BLOCK = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|$)", re.S)
KEY_NOT_HERE = ("the key itself never goes in the inventory: use key: {file: PATH}, {agent: true} or "
                "{secret_block: NAME}")


def _check_shared_paths(paths: list[str]) -> list[str]:
    """Entries of ``shared_storage``: absolute, normalized paths, as libvirt names a disk's source."""
    for i, path in enumerate(paths):
        if not path:
            raise ValueError(f"[{i}] is empty: give an absolute path such as /mnt/nfs/images")
        if any(ord(c) < 32 or ord(c) == 127 for c in path):
            raise ValueError(f"[{i}] {path!r} has a control character or line break")
        if not path.startswith("/"):
            raise ValueError(f"[{i}] {path!r} is not an absolute path (libvirt names disk sources by absolute path)")
        # the match is literal, on the path in the domain XML: a path that spells a directory another
        # way (//, ., ..) would silently match nothing, or something else
        parts = path.rstrip("/").split("/")[1:]
        if "" in parts:
            raise ValueError(f"[{i}] {path!r} has an empty path component (//)")
        if "." in parts or ".." in parts:
            raise ValueError(f"[{i}] {path!r} has a '.' or '..' component: give the path as the domain XML names it")
        if "*" in path[:-1] or "?" in path or "[" in path:  # read literally, a glob would match nothing
            raise ValueError(f"[{i}] {path!r}: the only pattern understood is one * at the end "
                             "(a name prefix, e.g. /dev/disk/by-id/dm-uuid-mpath-*)")
        if shared_storage_prefix(path) == "/":
            raise ValueError(f"[{i}] {path!r} would count every disk of every host as shared")
    return paths


def shared_storage_prefix(path: str) -> str:
    """The string a disk's source path must start with to lie in the ``shared_storage`` entry ``path``.

    A directory ends with ``/`` so that ``/mnt/nfs`` never covers ``/mnt/nfs-local/x``; an entry ending
    in ``*`` is a name prefix and is taken as written (``.../dm-uuid-mpath-*`` covers every multipath LUN).
    """
    if path.endswith("*"):
        return path[:-1]
    return path.rstrip("/") + "/"


def _check_package_globs(names: list[str]) -> list[str]:
    for i, name in enumerate(names):
        if not PACKAGE_PATTERN.match(name):
            raise ValueError(f"[{i}] {name!r} is not a package name or glob ([A-Za-z0-9._+*-]+)")
    return names


# a migration's bandwidth cap and a link's speed in MiB/s: 1 TiB/s is past any link, and libvirt refuses
# a cap whose bytes per second leave 64 bits
BANDWIDTH_MIB_S_BOUND = 2**20


class Strict(BaseModel):
    # no inf or nan in any number: a stall_seconds of .inf would never escalate a stalled migration
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class SshKey(Strict):
    """Where the SSH private key comes from. The key itself never enters the inventory."""

    file: Annotated[str, Field(min_length=1)] | None = None
    agent: bool = False
    # a Prefect Secret block holding the key
    secret_block: Annotated[str, Field(pattern=BLOCK_NAME)] | None = None

    @field_validator("file", mode="before")
    @classmethod
    def _a_path(cls, v: Any) -> Any:
        # a key pasted under file: would otherwise pass, and be printed as the "path" at connect time
        if isinstance(v, str) and holds_private_key(v):
            raise ValueError(f"holds a private key, not the path of one; {KEY_NOT_HERE}")
        if isinstance(v, str) and any(c in v for c in "\n\r\0"):
            raise ValueError("must be the path of the key file: it has a line break")
        return v

    @field_validator("secret_block", mode="before")
    @classmethod
    def _a_block_name(cls, v: Any) -> Any:
        if isinstance(v, str) and holds_private_key(v):
            raise ValueError(f"holds a private key, not the name of the Secret block that holds it; {KEY_NOT_HERE}")
        if isinstance(v, str) and not re.fullmatch(BLOCK_NAME, v):
            raise ValueError("must be a Prefect block name: lowercase letters, digits and dashes")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> SshKey:
        sources = [self.file is not None, self.agent, self.secret_block is not None]
        if sum(sources) != 1:
            raise ValueError("set exactly one of file, agent, secret_block")
        return self


class SshTarget(Strict):
    address: Annotated[str, Field(min_length=1)]
    port: Annotated[int, Field(strict=True)] = 22  # strict: YAML's "yes" would otherwise be port 1
    user: Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_-]{0,31}$")] = "root"
    key: SshKey
    known_hosts: Annotated[str, Field(min_length=1)]
    sudo: bool = False
    connect_timeout_s: Annotated[float, Field(gt=0, le=300)] = 10.0

    @field_validator("port")
    @classmethod
    def _port(cls, v: int) -> int:
        if not 1 <= v <= 65535:
            raise ValueError(f"must be 1-65535, got {v}")
        return v


class VerifyCheck(Strict):
    """A host's own check: an argv list (never a shell string) and the exit code that means healthy."""

    name: Annotated[str, Field(min_length=1)]
    argv: Annotated[list[str], Field(min_length=1)]
    expect_exit: Annotated[int, Field(ge=0, le=255)] = 0
    timeout_s: Annotated[float, Field(gt=0, le=3600)] = 60.0


class HostPolicy(Strict):
    """How a host is patched and verified."""

    package_manager: PackageManager = PackageManager.DNF
    excludes: list[str] = Field(default_factory=list)
    security_only: bool = False
    reboot: RebootPolicy = RebootPolicy.IF_NEEDED
    reboot_timeout_s: Annotated[float, Field(gt=0, le=7200)] = 900.0
    update_timeout_s: Annotated[float, Field(gt=0, le=14400)] = 3600.0
    # how long to wait for another dnf/yum run (dnf-automatic, an operator's) holding the package
    # manager's lock before the update gives up, naming it (0: not at all)
    package_lock_wait_s: Annotated[float, Field(ge=0, le=14400)] = 900.0
    min_free_mib: Annotated[int, Field(ge=0, le=MIB_BOUND)] = 512
    verify: list[VerifyCheck] = Field(default_factory=list)

    @field_validator("excludes")
    @classmethod
    def _package_globs(cls, v: list[str]) -> list[str]:
        return _check_package_globs(v)


class PolicyOverride(Strict):
    """Per-host changes to the cluster's host policy; unset fields inherit."""

    package_manager: PackageManager | None = None
    excludes: list[str] | None = None
    security_only: bool | None = None
    reboot: RebootPolicy | None = None
    reboot_timeout_s: Annotated[float, Field(gt=0, le=7200)] | None = None
    update_timeout_s: Annotated[float, Field(gt=0, le=14400)] | None = None
    package_lock_wait_s: Annotated[float, Field(ge=0, le=14400)] | None = None
    min_free_mib: Annotated[int, Field(ge=0, le=MIB_BOUND)] | None = None
    verify: list[VerifyCheck] | None = None

    @field_validator("excludes")
    @classmethod
    def _package_globs(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else _check_package_globs(v)


class VmMatch(Strict):
    name: str | None = None  # fnmatch glob
    tag: str | None = None

    @model_validator(mode="after")
    def _something(self) -> VmMatch:
        if self.name is None and self.tag is None:
            raise ValueError("match needs name or tag")
        return self


class VmPolicy(Strict):
    """Policy for the VMs it matches (first match wins)."""

    match: VmMatch
    anti_affinity: Annotated[str, Field(min_length=1)] | None = None
    migratable: bool = True
    on_unmigratable: UnmigratableAction = UnmigratableAction.BLOCK

    def matches(self, vm_name: str, tags: tuple[str, ...]) -> bool:
        if self.match.name is not None and not fnmatch.fnmatchcase(vm_name, self.match.name):
            return False
        return self.match.tag is None or self.match.tag in tags


class MigrationTls(StrEnum):
    """Whether a cluster's live migrations encrypt the guest's memory (QEMU's TLS, ``VIR_MIGRATE_TLS``)."""

    REQUIRED = "required"  # TLS or no migration: a host that cannot is refused before anything moves
    PREFERRED = "preferred"  # TLS where both ends can; plain TCP otherwise, with a warning in the audit
    OFF = "off"  # plain TCP: the guest's memory crosses the network readable by anyone on it


def _check_address(v: str | None) -> str | None:
    """An IP address or a DNS name, as a migration URI's host."""
    if v is None:
        return v
    try:
        return str(ipaddress.ip_address(v))
    except ValueError:
        pass
    if not re.fullmatch(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*", v):
        raise ValueError(f"must be an IP address or a DNS name, got {v!r}")
    return v


class MigrationSettings(Strict):
    """How a cluster's drains live-migrate (hostmaint.migration): escalation, budgets, throttling.

    The defaults are the adaptive scheduler's; the inventory's ``limits`` still bound concurrency."""

    allow_post_copy: bool = False  # post-copy loses the VM if the network fails mid-way: opt in
    auto_converge: bool = True  # throttle a guest's vCPUs when its migration stalls (and upfront, below)
    # a guest known to dirty much of its stream starts throttled, at most this much (QEMU's own start: 20)
    max_upfront_throttle_pct: Annotated[int, Field(ge=20, le=99)] = 90
    parallel_connections: Annotated[int, Field(ge=1, le=64)] = 1
    # per-migration cap (libvirt's bandwidth)
    bandwidth_mib_s: Annotated[int, Field(gt=0, le=BANDWIDTH_MIB_S_BOUND)] | None = None
    stall_seconds: Annotated[float, Field(gt=0)] = 60.0  # no progress this long: escalate one step
    seconds_per_gib: Annotated[float, Field(gt=0)] = 150.0  # every migration's time budget ...
    min_budget_seconds: Annotated[float, Field(gt=0)] = 60.0  # ... and its floor; then it is aborted
    # Encrypted by default: a migration carries the guest's whole memory (keys, passwords, customer data).
    # Plain TCP is an explicit choice (docs/inventory.md#migration-tls-and-network)
    tls: MigrationTls = MigrationTls.REQUIRED
    # The migration network: each host's address on it is discovered (its interface in this subnet), unless
    # the host names its own migration_address. Unset: migrations use the management address.
    network: str | None = None
    # a TLS stream's rate ÷ a plain one's on these hosts, for the scheduler and the what-if simulator
    # (unset: hostmaint.migration.policy.DEFAULT_TLS_STREAM_FACTOR, measured on the lab)
    tls_stream_factor: Annotated[float, Field(gt=0, le=1)] | None = None
    # the whole pause a live migration may cost its guest (unset: QEMU's own 300 ms); the scheduler sets each
    # migration's QEMU limit below it for the link share at its end and the switch-over (docs/draining.md)
    downtime_limit_ms: Annotated[int, Field(ge=10, le=60_000)] | None = None
    # what the switch-over takes beyond QEMU's limit on these hosts (device state, handshake): where it is
    # more than the model's 30 ms, each drain learns it from its first pause over the limit; set it to start there
    switchover_ms: Annotated[float, Field(ge=0, le=10_000)] = 30.0

    @model_validator(mode="after")
    def _switchover_within_limit(self) -> MigrationSettings:
        limit = self.downtime_limit_ms or QEMU_DOWNTIME_LIMIT_MS
        whose = "" if self.downtime_limit_ms else ", QEMU's own"
        if self.switchover_ms >= limit:
            raise ValueError(f"switchover_ms ({self.switchover_ms:g}) must be below the downtime limit "
                             f"({limit} ms{whose}): nothing would be left for the memory still to send")
        return self

    @field_validator("network")
    @classmethod
    def _network(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            return str(ipaddress.ip_network(v, strict=True))
        except ValueError as exc:
            raise ValueError(f"must be a network such as 10.214.0.0/24 ({exc})") from None


# --- monitoring and hooks (hostmaint.monitoring, hostmaint.hooks; docs/integrations.md) -----------------

LABEL_NAME = r"^[a-zA-Z_][a-zA-Z0-9_]*$"
NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"


def _check_url(v: str) -> str:
    if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", v):
        raise ValueError("must be an http:// or https:// URL without spaces, query or fragment "
                         "(e.g. http://prometheus.example:9090)")
    return v.rstrip("/")


class PrometheusGate(Strict):
    """A PromQL query that holds a host while it answers anything (``$host``/``$cluster`` inside quotes)."""

    name: Annotated[str, Field(pattern=NAME)]
    query: str
    at: Annotated[list[GatePoint], Field(min_length=1)] = Field(
        default_factory=lambda: [GatePoint.BEFORE_DRAIN, GatePoint.BEFORE_REBOOT])
    # the work it holds: an incident's evacuation is not held by default (it runs because alerts fire;
    # its gate record says it was bypassed and why)
    kinds: Annotated[list[WorkKind], Field(min_length=1)] = Field(
        default_factory=lambda: [WorkKind.MAINTENANCE, WorkKind.EVACUATION])

    @field_validator("query")
    @classmethod
    def _query(cls, v: str) -> str:
        return check_query(v)


class PrometheusSettings(Strict):
    url: str
    required: bool = False  # unreachable: logged and audited, never holds the host (true: holds it)
    timeout_s: Annotated[float, Field(gt=0, le=120)] = 10.0
    gates: Annotated[list[PrometheusGate], Field(min_length=1)]
    on_hold: OnHold = OnHold.WAIT
    wait_s: Annotated[float, Field(ge=0, le=86400)] = 900.0  # how long a held host waits before it stops
    interval_s: Annotated[float, Field(gt=0, le=3600)] = 30.0

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _check_url(v)

    @model_validator(mode="after")
    def _unique(self) -> PrometheusSettings:
        names = [g.name for g in self.gates]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"gates: the gate name {twice[0]!r} is used twice")
        return self


class SilenceMatcher(Strict):
    """An Alertmanager matcher; ``value`` may hold ``$host``/``$cluster`` (regex-escaped when ``regex``)."""

    name: Annotated[str, Field(pattern=LABEL_NAME)]
    value: Annotated[str, Field(min_length=1)]
    regex: bool = False
    equal: bool = True

    @field_validator("value")
    @classmethod
    def _value(cls, v: str) -> str:
        return check_template(v)


class AlertmanagerSettings(Strict):
    url: str
    required: bool = False  # unreachable: logged and audited, maintenance goes on without a silence
    timeout_s: Annotated[float, Field(gt=0, le=120)] = 10.0
    matchers: Annotated[list[SilenceMatcher], Field(min_length=1)]
    # the lease: the silence ends this long after the last extension, so a dead run's silence lapses
    lease_s: Annotated[float, Field(ge=1, le=86400)] = 600.0
    extend_every_s: Annotated[float, Field(gt=0)] | None = None  # default: a third of lease_s
    comment: Annotated[str, Field(min_length=1, max_length=200)] = "hostmaint maintenance"
    # an evacuated host stays out of service after its run: its silence lasts this long, or until
    # return-host puts it back (0: evacuations make no silence)
    evacuation_silence_s: Annotated[float, Field(ge=0, le=30 * 86400)] = 86400.0

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _check_url(v)

    @field_validator("evacuation_silence_s")
    @classmethod
    def _evacuation_silence(cls, v: float) -> float:
        if 0 < v < 60:
            raise ValueError(f"must be 0 (no silence for evacuations) or at least 60 seconds, got {v:g}: "
                             "it is in seconds and covers the host for as long as it is out of service")
        return v

    @model_validator(mode="after")
    def _sane(self) -> AlertmanagerSettings:
        if self.extend_every_s is not None and self.extend_every_s >= self.lease_s:
            raise ValueError(f"extend_every_s ({self.extend_every_s:g}) must be shorter than lease_s "
                             f"({self.lease_s:g}), or the silence lapses between extensions")
        if not any(m.equal and not m.regex for m in self.matchers):
            raise ValueError("matchers: at least one must be a plain equality matcher (regex: false, equal: true): "
                             "a silence must not cover every alert")
        return self


class Monitoring(Strict):
    prometheus: PrometheusSettings | None = None
    alertmanager: AlertmanagerSettings | None = None


class HookSpec(Strict):
    """A command at one point of a host's maintenance: an argv list, never a shell string."""

    name: Annotated[str, Field(pattern=NAME)]
    argv: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
    on: HookPlace = HookPlace.HOST
    timeout_s: Annotated[float, Field(gt=0, le=7200)] = 300.0

    @field_validator("argv")
    @classmethod
    def _argv(cls, v: list[str]) -> list[str]:
        for i, arg in enumerate(v):
            if "\0" in arg:
                raise ValueError(f"[{i}] has a NUL byte")
            try:
                check_template(arg)
            except ValueError as exc:
                raise ValueError(f"[{i}] {exc}") from None
        return v


class Hooks(Strict):
    pre_drain: list[HookSpec] = Field(default_factory=list)
    pre_reboot: list[HookSpec] = Field(default_factory=list)
    post_verify: list[HookSpec] = Field(default_factory=list)
    post_maintenance: list[HookSpec] = Field(default_factory=list)

    def at(self, field: str) -> list[HookSpec]:
        """The hooks of the point whose field is ``field`` (``pre_drain``)."""
        return list(getattr(self, field))


class Cluster(Strict):
    name: Annotated[str, Field(pattern=HOST_NAME)]
    limits: Limits = Limits()
    host_policy: HostPolicy = HostPolicy()
    vm_policies: list[VmPolicy] = Field(default_factory=list)
    # unset: each host's link is measured by its drains (hostmaint.migration.links), ~10 GbE until then
    link_bandwidth_mib_s: Annotated[int, Field(gt=0, le=BANDWIDTH_MIB_S_BOUND)] | None = None
    migration: MigrationSettings = MigrationSettings()
    # Paths every host of the cluster sees as the same storage (NFS, GFS2, a shared LUN): a file or
    # block disk there may live-migrate, any other blocks its VM (hostmaint never copies disks).
    # Cluster-wide only: the planner may send a VM to any host of the cluster, so a path shared by
    # some hosts only is not shared storage for a migration.
    shared_storage: list[str] = Field(default_factory=list)
    monitoring: Monitoring | None = None  # gates and silences (docs/integrations.md)
    hooks: Hooks = Hooks()

    @field_validator("shared_storage")
    @classmethod
    def _shared_paths(cls, v: list[str]) -> list[str]:
        return _check_shared_paths(v)

    @property
    def shared_storage_prefixes(self) -> tuple[str, ...]:
        """``shared_storage`` as the prefixes a disk's source path is matched against (see shared_storage_prefix)."""
        return tuple(dict.fromkeys(shared_storage_prefix(p) for p in self.shared_storage))


# a machine's own name as `uname -n` or libvirt gives it: one word, at most a DNS name's length
MACHINE_NAME = r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,253}[A-Za-z0-9.])?$"


class MachineNames(Strict):
    """The names one machine gives itself where its SSH and libvirt names differ in a way hostmaint cannot
    match on its own (a libvirt hostname from another DNS view): the same-machine check then wants
    exactly these, so an address that reaches another machine is still refused."""

    ssh: Annotated[str, Field(pattern=MACHINE_NAME)]  # what `uname -n` says over SSH
    libvirt: Annotated[str, Field(pattern=MACHINE_NAME)]  # libvirt's hostname (virsh hostname)

    @field_validator("ssh", "libvirt")
    @classmethod
    def _names_a_machine(cls, v: str) -> str:
        # every unnamed machine has these: declaring one would let any such machine pass
        if v.rstrip(".").split(".")[0].lower() in ("localhost", "localhost4", "localhost6"):
            raise ValueError(f"{v!r} is every unnamed machine's name and cannot tell one machine from another")
        return v


class HostEntry(Strict):
    name: Annotated[str, Field(pattern=HOST_NAME)]
    cluster: str
    libvirt_uri: Annotated[str, Field(pattern=r"^(qemu|test|sim)(\+[a-z]+)?://")]
    ssh: SshTarget
    policy: PolicyOverride = PolicyOverride()
    cpu_group: str = "default"
    reserved_memory_mib: Annotated[int, Field(ge=0, le=MIB_BOUND)] = 0
    link_bandwidth_mib_s: Annotated[int, Field(gt=0, le=BANDWIDTH_MIB_S_BOUND)] | None = None
    hooks: Hooks = Hooks()  # run after the cluster's at each point
    # where this host receives migrations (its migration-network address); else discovered in the
    # cluster's migration.network, else the management address
    migration_address: str | None = None
    # set only where `uname -n` and libvirt's hostname differ beyond what the same-machine check matches
    machine_names: MachineNames | None = None

    @field_validator("migration_address")
    @classmethod
    def _migration_address(cls, v: str | None) -> str | None:
        return _check_address(v)

    @field_validator("libvirt_uri")
    @classmethod
    def _verified_uri(cls, v: str) -> str:
        return _check_libvirt_uri(v)


# URI parameters that would switch off the check of whom libvirt talks to (docs/inventory.md)
_UNVERIFIED = {"no_verify": ("1",), "known_hosts_verify": ("ignore", "auto")}


def _check_libvirt_uri(uri: str) -> str:
    """A libvirt URI that verifies its peer: no ``no_verify=1`` (TLS: the server's certificate; SSH: the
    host key) and no ``known_hosts_verify=ignore|auto`` (libssh: unknown host keys accepted)."""
    if any(c in uri for c in "\n\r\0 "):
        raise ValueError("has a space, line break or NUL byte")
    params = parse_qs(urlsplit(uri).query)
    for name, bad in _UNVERIFIED.items():
        for value in params.get(name, []):
            if value in bad:
                raise ValueError(f"{name}={value} turns off the check of the host's identity (certificate or "
                                 "host key); hostmaint always verifies: remove it and give the CA or known_hosts")
    return uri


class Simulation(Strict):
    """Marks an inventory whose hosts are SIMULATED (hostmaint.drivers.memory), for demos and tests."""

    state_file: Annotated[str, Field(min_length=1)]
    time_scale: Annotated[float, Field(gt=0, le=10)] = 0.01


class NotifyOn(StrEnum):
    FAILED = "failed"  # a window, patch, evacuation or runbook run failed or crashed
    APPROVAL = "approval"  # a run waits for an operator (paused or suspended)
    WINDOW_END = "window-end"  # a patch window ended, with its summary


class Notifications(Strict):
    """Prefect notification blocks ``hostmaint setup`` makes automations send to, as ``TYPE/NAME``
    (``custom-webhook/ops``, ``slack-webhook/oncall``): the URL or token stays in the block."""

    blocks: Annotated[list[Annotated[str, Field(pattern=r"^[a-z0-9-]+/[a-z0-9-]+$")]], Field(min_length=1)]
    on: Annotated[list[NotifyOn], Field(min_length=1)] = Field(default_factory=lambda: list(NotifyOn))


def _shared_endpoints(hosts: list[HostEntry]) -> list[str]:
    """Two hosts whose SSH address (and port) or libvirt URI's host are the same: one machine under two names.

    A copy-paste slip in a large inventory. Its cost is not a confusing error: a patch of one name would
    drain the VMs of the machine libvirt reaches and then update and reboot the machine SSH reaches, VMs
    and all. URIs without a host (``test:///default``, the simulation's ``sim:///``) are not compared.
    """
    problems: list[str] = []
    ssh_seen: dict[tuple[str, int], int] = {}
    libvirt_seen: dict[str, int] = {}
    names_seen: dict[tuple[str, str], int] = {}
    for i, h in enumerate(hosts):
        key = (h.ssh.address.strip().lower().strip("[]"), h.ssh.port)
        if key in ssh_seen:
            j = ssh_seen[key]
            problems.append(f"hosts[{i}].ssh.address (host {h.name}): {h.ssh.address} port {h.ssh.port} is also "
                            f"hosts[{j}]'s (host {hosts[j].name}): two names for one machine; each host needs its own")
        ssh_seen.setdefault(key, i)
        try:
            machine = (urlsplit(h.libvirt_uri).hostname or "").lower()
        except ValueError:
            machine = ""  # the URI's own validator said what is wrong with it
        if machine:
            if machine in libvirt_seen:
                j = libvirt_seen[machine]
                problems.append(f"hosts[{i}].libvirt_uri (host {h.name}): {h.libvirt_uri} reaches {machine}, as "
                                f"hosts[{j}]'s (host {hosts[j].name}) does: two names for one machine; each host "
                                "needs its own")
            libvirt_seen.setdefault(machine, i)
        if h.machine_names is not None:
            for key_name, declared in (("ssh", h.machine_names.ssh), ("libvirt", h.machine_names.libvirt)):
                name = declared.rstrip(".").lower()
                seen = names_seen.setdefault((key_name, name), i)
                if seen != i:
                    problems.append(f"hosts[{i}].machine_names.{key_name} (host {h.name}): {declared} is also "
                                    f"hosts[{seen}]'s (host {hosts[seen].name}): one machine's name for two hosts")
    return problems


def _unknown(kind: str, name: str, known: list[str]) -> KeyError:
    """``unknown host 'hv1'``, with the name it is likely a typo of and the names there are: a newcomer's
    typo ('hv1', 'HV01') should not need the inventory opened to find the right one."""
    folded = [k for k in known if k.lower() == name.lower()]
    close = folded or difflib.get_close_matches(name, known, n=1, cutoff=0.75)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    shown = ", ".join(known[:KNOWN_SHOWN]) + (f", ... ({len(known)} in all)" if len(known) > KNOWN_SHOWN else "")
    return KeyError(f"unknown {kind} {name!r}{hint} (the inventory's {kind}s: {shown})")


KNOWN_SHOWN = 10


class Inventory(Strict):
    """The whole inventory file."""

    version: Annotated[int, Field(strict=True, ge=1, le=1)] = 1  # the only format there is
    simulation: Simulation | None = None
    clusters: Annotated[list[Cluster], Field(min_length=1)]
    hosts: Annotated[list[HostEntry], Field(min_length=1)]
    notifications: Notifications | None = None  # docs/integrations.md

    @model_validator(mode="after")
    def _references(self) -> Inventory:
        problems: list[str] = []
        cluster_names = [c.name for c in self.clusters]
        for i, name in enumerate(cluster_names):
            if cluster_names.index(name) != i:
                problems.append(f"clusters[{i}].name: duplicate cluster {name!r}")
        seen: dict[str, int] = {}
        for i, h in enumerate(self.hosts):
            if h.name in seen:
                problems.append(f"hosts[{i}].name (host {h.name}): duplicate host, first at hosts[{seen[h.name]}]")
            seen.setdefault(h.name, i)
            if h.cluster not in cluster_names:
                problems.append(f"hosts[{i}].cluster (host {h.name}): unknown cluster {h.cluster!r}; "
                                f"known: {', '.join(cluster_names)}")
            elif h.migration_address is not None:
                net = self.clusters[cluster_names.index(h.cluster)].migration.network
                if net is not None and not _in_network(h.migration_address, net):
                    problems.append(f"hosts[{i}].migration_address (host {h.name}): {h.migration_address} is "
                                    f"not in its cluster's migration.network {net}")
        problems += _shared_endpoints(self.hosts)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    # --- look-ups -------------------------------------------------------------

    def host(self, name: str) -> HostEntry:
        for h in self.hosts:
            if h.name == name:
                return h
        raise _unknown("host", name, [h.name for h in self.hosts])

    def cluster(self, name: str) -> Cluster:
        for c in self.clusters:
            if c.name == name:
                return c
        raise _unknown("cluster", name, [c.name for c in self.clusters])

    def hosts_of(self, cluster: str) -> list[HostEntry]:
        return [h for h in self.hosts if h.cluster == cluster]

    def policy_for(self, host: str) -> HostPolicy:
        """The cluster's host policy with the host's overrides applied."""
        entry = self.host(host)
        base = self.cluster(entry.cluster).host_policy
        # Field values, not model_dump(): nested models (verify checks) must stay models.
        changes = {k: getattr(entry.policy, k) for k in type(entry.policy).model_fields
                   if getattr(entry.policy, k) is not None}
        return base.model_copy(update=changes) if changes else base

    def hooks_for(self, host: str, field: str) -> list[HookSpec]:
        """``host``'s hooks at the point whose field is ``field``: its cluster's first, then its own."""
        entry = self.host(host)
        return self.cluster(entry.cluster).hooks.at(field) + entry.hooks.at(field)

    def shared_storage_for(self, host: str) -> tuple[str, ...]:
        """The shared-storage prefixes of ``host``: its cluster's (there is no host override)."""
        return self.cluster(self.host(host).cluster).shared_storage_prefixes

    def vm_policy(self, cluster: str, vm_name: str, tags: tuple[str, ...] = ()) -> VmPolicy | None:
        for policy in self.cluster(cluster).vm_policies:
            if policy.matches(vm_name, tags):
                return policy
        return None


def _in_network(address: str, network: str) -> bool:
    try:
        return ipaddress.ip_address(address) in ipaddress.ip_network(network)
    except ValueError:
        return False  # a DNS name: where it points is not known here


def _field_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _host_of(raw: Any, loc: tuple[Any, ...]) -> str | None:
    if len(loc) >= 2 and loc[0] == "hosts" and isinstance(loc[1], int) and isinstance(raw, dict):
        hosts = raw.get("hosts")
        if isinstance(hosts, list) and loc[1] < len(hosts) and isinstance(hosts[loc[1]], dict):
            name = hosts[loc[1]].get("name")
            return str(name) if name is not None else None
    return None


def _secret_setting(loc: tuple[Any, ...]) -> bool:
    """Whether the field at ``loc`` is about credentials: anything under ``ssh.key``, or a secret-looking name."""
    names = [p for p in loc if isinstance(p, str)]
    under_key = any(a == "ssh" and b == "key" for a, b in zip(names, names[1:], strict=False))
    return under_key or any(is_secret_name(n) for n in names)


def _message(err: Any, loc: tuple[Any, ...]) -> str:
    msg = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    elif err["type"] == "missing":
        msg = "required field is missing"
    if err["type"] not in ("missing", "extra_forbidden") and "input" in err \
            and not isinstance(err["input"], dict | list) and "got" not in msg:
        value = err["input"]
        pem = isinstance(value, str) and holds_private_key(value)
        # errors are printed and logged: a key or password pasted in the wrong place must not be echoed
        if pem:
            msg += " (the value is not shown: it holds a private key)"
            if KEY_NOT_HERE not in msg:
                msg += f"; {KEY_NOT_HERE}"
        elif _secret_setting(loc):
            msg += " (the value is not shown: it is a credential setting)"
        elif isinstance(value, str) and redact_text(value) != value:
            msg += " (the value is not shown: it holds a password or token)"
        else:
            msg += f", got {value!r}"
    return msg


def parse_inventory(data: Any, source: str = "<inventory>") -> Inventory:
    """Validate already-parsed YAML/JSON data. Raises InventoryError naming every bad field."""
    if not isinstance(data, dict):
        raise InventoryError([f"top level: must be a mapping, got {type(data).__name__}"], source)
    try:
        return Inventory.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            path = _field_path(loc) or "top level"
            host = _host_of(data, loc)
            where = f"{path} (host {host})" if host else path
            msg = _message(err, loc)
            if "\n" in msg:  # cross-field checks already carry their own paths
                problems.extend(msg.splitlines())
            elif not loc and ":" in msg.split(" ")[0]:
                problems.append(msg)
            else:
                problems.append(f"{where}: {msg}")
        # the net under _message: a validator's own message may quote what it was given
        problems = [redact_text(_PEM_BLOCK.sub("<a private key, not shown>", p)) for p in problems]
        raise InventoryError(problems, source) from None


def load_inventory(path: str | Path) -> Inventory:
    """Load and validate an inventory file. Raises InventoryError (exit 2 in the CLI)."""
    p = Path(path)
    try:
        # strict: UTF-8 only, and a key given twice (a second limits: block) is refused, not half-read
        data = load_yaml(p)
    except FileFormatError as exc:
        raise InventoryError([exc.problem], exc.source) from None
    return resolve_paths(parse_inventory(data, str(p)), p.parent)


def resolve_paths(inv: Inventory, base: Path) -> Inventory:
    """Make key and known_hosts paths relative to the inventory file absolute."""
    hosts = []
    for h in inv.hosts:
        ssh = h.ssh
        kh = str((base / ssh.known_hosts).resolve()) if not Path(ssh.known_hosts).is_absolute() else ssh.known_hosts
        key = ssh.key
        if key.file is not None and not Path(key.file).is_absolute():
            key = key.model_copy(update={"file": str((base / key.file).resolve())})
        hosts.append(h.model_copy(update={"ssh": ssh.model_copy(update={"known_hosts": kh, "key": key})}))
    sim = inv.simulation
    if sim is not None and not Path(sim.state_file).is_absolute():
        sim = sim.model_copy(update={"state_file": str((base / sim.state_file).resolve())})
    return inv.model_copy(update={"hosts": hosts, "simulation": sim})


# --- the local files an inventory names ------------------------------------------------------------------


def file_problem(path: str) -> str | None:
    """Why ``path`` cannot be read as a file here, or None. Never opens a FIFO or a device (it could block)."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        return f"{path} does not exist"
    except OSError as exc:
        return f"{path} cannot be reached: {exc.strerror}"
    if stat.S_ISDIR(mode):
        return f"{path} is a directory, not a file"
    if not stat.S_ISREG(mode):
        return f"{path} is not a regular file"
    try:
        with p.open("rb") as f:
            f.read(1)
    except OSError as exc:
        return f"{path} cannot be read: {exc.strerror}"
    return None


def file_problems(inv: Inventory) -> list[str]:
    """What is wrong with the local files ``inv`` names, one problem per file and field, naming its hosts.

    A known_hosts file or SSH key file that does not exist or cannot be read makes SSH to its hosts
    impossible (host keys are always verified); a missing ``simulation.state_file`` leaves nothing to
    simulate. ``load_inventory`` does not look (a command may not need the files, and may run where
    they are not); ``hostmaint inventory check`` does. Secret blocks and agents are not checked here.
    """
    # (field, path) -> hosts naming it, in inventory order
    named: dict[tuple[str, str], list[str]] = {}
    fields: dict[tuple[str, str], str] = {}
    for i, h in enumerate(inv.hosts):
        refs = [("known_hosts", h.ssh.known_hosts, f"hosts[{i}].ssh.known_hosts")]
        if h.ssh.key.file is not None:
            refs.append(("key", h.ssh.key.file, f"hosts[{i}].ssh.key.file"))
        for kind, path, field in refs:
            named.setdefault((kind, path), []).append(h.name)
            fields.setdefault((kind, path), field)
    why = {"known_hosts": "no host key can be verified, so SSH is impossible",
           "key": "the SSH key cannot be loaded, so SSH is impossible"}
    problems = []
    for (kind, path), hosts in named.items():
        problem = file_problem(path)
        if problem is not None:
            them = f"host {hosts[0]}" if len(hosts) == 1 else f"hosts {', '.join(hosts)}"
            problems.append(f"{fields[(kind, path)]} ({them}): {problem}: {why[kind]}")
    if inv.simulation is not None:
        problem = file_problem(inv.simulation.state_file)
        if problem is not None:
            problems.append(f"simulation.state_file: {problem}: the SIMULATED fleet cannot be loaded")
    return problems
