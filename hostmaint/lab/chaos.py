"""A randomized fault campaign on the real lab, with the invariants checked from outside hostmaint.

``hostmaint lab chaos`` and ``benchmarks/chaos.py`` run it. Each round starts a maintenance as an
operator would — ``hostmaint patch``, ``evacuate``, ``window run``, ``rebalance``, two patches at
once, or a patch run by a Prefect worker from its deployment — against a Prefect server the
campaign runs on loopback, and injects one or more faults at random moments (after a random delay,
or when the lab shows a plan printed, a migration, an SSH command or a dnf command under way).
The fault classes and what each must lead to are in :data:`EXPECTED` (docs: hostmaint/lab/README.md).

Then every fault is undone (the operator fixed the cause), and what was interrupted is run again
once: a plain re-run, after ``hostmaint host reset`` for a host left failed (docs), and after the
dead run's lock lease ran out for a killed run (docs/deployments.md). The checks never read
hostmaint's database; they ask the lab: every VM running on exactly one host (each host's libvirtd
over its own socket, sampled every 0.15 s during the round); no reboot killed a guest (the lab host's
supervisor logs the guests each power cut kills); each host's state (``hostmaint host status``) true
against libvirt and the host (``drained`` only when empty, ``active`` only when verified — running
the newest kernel — or never taken out of service), and a host out of service gives the real reason
(:func:`check_reasons`: derived from the fault injected and what libvirt and the host show);
``hostmaint audit verify`` passes; every VM move seen in libvirt and every package change seen in the
host's rpm database has a successful audit record; a run that failed left a failed record; no host
of a window starts after the window's end; and the work converges within the one re-run.

Rounds are seeded: ``seed`` draws one seed per round, and ``replay`` runs those rounds again with the
same faults, hosts and timing offsets. Results go to ``OUT/rounds.jsonl`` (one line a round, appended
across runs), failing round seeds to ``OUT/failing-seeds.txt``; :func:`table` makes the table per
fault class. Prefect itself (its server, a worker, deployments) is driven through a
:class:`PrefectSide` the caller brings (``deployments/chaos.py``): the core imports no Prefect.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import yaml

from hostmaint.lab import LabInfo, faults, kill_libvirtd, lab_down, lab_status, lab_up, remove_guest, start_libvirtd
from hostmaint.lab.host import read_status, wait_for_phase
from hostmaint.lab.network import LAB_NET
from hostmaint.lab.packages import KERNEL_PACKAGE, TOOLS_PACKAGE, RpmSpec, build_repo
from hostmaint.window import PATCH_SECONDS

DEFAULT_WORKDIR = Path(f"/var/tmp/hostmaint-chaos-net{LAB_NET}")
HOSTS = ("hv01", "hv02", "hv03")
REBOOT_TIMEOUT_S = 15
LEASE_S = 60  # the minimum lock lease: a killed run's slots free after this
PORT = 4317 + LAB_NET  # each lab net's campaign has a server of its own
OP_TIMEOUT_S = 300
MIN_HOST_ESTIMATE_S = PATCH_SECONDS + REBOOT_TIMEOUT_S  # a window's estimate of a lab host, its drain aside
FILLER_PREFIX = "cxf"  # guests that fill a target (a tenant's, deleted once the round's first re-run saw them)
FAULT_CLASSES = ("link-cut", "libvirtd-kill", "ssh-drop", "reboot-hangs", "reboot-never", "reboot-skipped",
                 "repo-broken", "disk-full", "host-key-changed", "vm-started", "target-filled", "flow-killed",
                 "worker-killed", "server-restart", "window-ends", "vm-stopped", "dnf-busy", "target-cordoned")
# What each fault must lead to (checked from outside; the same in every round): the invariants hold
# (every VM once, no reboot with a guest on it, the audit verifies and names every move and package
# change), the faulted run either succeeds or fails with a host out of service giving the reason below,
# and one re-run after the fault is undone (reset first when failed, after the lease when killed; hosts out of
# service re-run before the others, as a window orders them) finishes.
EXPECTED = {
    "link-cut": "mid-migration: the migration is aborted or completes and is recorded (unknown until the next "
                "run settles it); mid-update: the update's outcome is unknown, the host stays patching and the "
                "re-run reads the changes from rpm",
    "libvirtd-kill": "a source's or target's libvirtd dies and restarts: guests keep running; a migration to a "
                     "dead target is recorded unknown (never failed when it completed)",
    "ssh-drop": "every SSH session of the host dies mid-command: an update's outcome is unknown (the re-run "
                "reads the rpm db), any other step fails with the host out of service",
    "reboot-hangs": "the host stays down past the reboot timeout: failed, reason 'did not come back'; reset, the "
                    "re-run verifies it",
    "reboot-never": "the host never comes back until the operator powers it on: failed, reason 'did not come "
                    "back'; powered on, reset, the re-run verifies it",
    "reboot-skipped": "the reboot says 'rebooting' and does nothing: failed, reason 'did not reboot' (same boot "
                      "id); reset, the re-run reboots it",
    "repo-broken": "dnf cannot read the repository: the update fails, nothing installed, failed with the dnf "
                   "error as the reason; or refused by the precheck before anything moved",
    "disk-full": "the filesystem rpm installs into is full: the update fails, failed, the reason names the space",
    "host-key-changed": "strict host-key checking refuses the host: nothing moves, or the run fails with the "
                        "host out of service naming the host key",
    "vm-started": "a tenant's VM started on the host under maintenance: never rebooted with it; the host stays "
                  "cordoned naming the VM, the re-run moves it off",
    "vm-stopped": "a tenant destroys or saves (managedsave) a guest running on the host under maintenance "
                  "(before or during its migration; once they have all left, one on another host): no run starts "
                  "it again or calls it "
                  "lost (no 'runs 0 times' of it in any record); the run goes on, the re-run finishes; the tenant "
                  "starts it again after the round",
    "dnf-busy": "the host's own dnf run (dnf-automatic) holds the RPMDB lock for 5-90 s: the update waits for it "
                "(the campaign's policy waits 60 s) and patches, or fails naming the lock's holder with no package "
                "changed; the re-run patches",
    "target-cordoned": "an operator cordons a host (not one under maintenance) while the run's migrations go on: "
                       "no VM's copy appears on it from a second after the cordon until it is uncordoned; what "
                       "was planned for it is re-planned onto the others, or the run fails with its host cordoned "
                       "naming what is still on it; uncordoned, the re-run finishes",
    "target-filled": "a target fills between plan and migration: re-planned or failed, the host stays cordoned "
                     "naming the VMs still on it; the re-run (target still full) refuses or re-plans safely",
    "flow-killed": "kill -9 of the CLI process running the flow: migrations in flight finish and are found by "
                   "the re-run (migration-found), which waits out the dead run's lease and finishes",
    "worker-killed": "kill -9 of the Prefect worker and the flow run it started: as flow-killed; the worker is "
                     "restarted and the re-run is a new run of the deployment",
    "server-restart": "the Prefect server dies and restarts: a starting run fails in one line (no traceback), a "
                      "running one goes on or fails; the re-run finishes",
    "window-ends": "a window ends where the first host's estimate fits and a later one's may not: no host starts "
                   "whose estimate does not fit the time left, the run exits non-zero naming what is left; the "
                   "re-run (same window id, no end) finishes the rest",
}
OPS = ("patch", "evacuate", "window", "rebalance", "patch-pair", "patch-worker")
OP_WEIGHTS = {"patch": 5, "evacuate": 2, "window": 2, "rebalance": 1, "patch-pair": 1, "patch-worker": 2}
# which faults mean something for which maintenance (no SSH in an evacuation or a rebalance)
SSH_FAULTS = {"ssh-drop", "reboot-hangs", "reboot-never", "reboot-skipped", "repo-broken", "disk-full",
              "host-key-changed", "dnf-busy"}
ANY = set(FAULT_CLASSES) - {"worker-killed", "window-ends", "target-cordoned"}
# an operator's cordon of a host the window would patch is kept by it (the host ends cordoned, by design):
# the class is for runs that leave a host to cordon
COMPATIBLE = {
    "patch": ANY | {"target-cordoned"},
    "patch-pair": ANY | {"target-cordoned"},
    "patch-worker": (ANY - {"flow-killed"}) | {"worker-killed", "target-cordoned"},
    "window": ANY | {"window-ends"},
    "evacuate": (ANY - SSH_FAULTS) | {"target-cordoned"},
    "rebalance": {"link-cut", "libvirtd-kill", "target-filled", "flow-killed", "server-restart", "vm-stopped"},
}
PATCHING_OPS = {"patch", "patch-pair", "window", "patch-worker"}
ENDS_RUN = {"flow-killed", "worker-killed", "server-restart"}  # one of them in a round is enough to learn from


# --- the scenario: everything a round does, drawn from its seed alone ---------------------------------


@dataclass(frozen=True)
class FaultSpec:
    kind: str
    host: str
    trigger: str  # start | offset | planned (a plan printed) | migrating | ssh (any session) | dnf | dnf-update
    delay: float  # seconds after the trigger (window-ends: when the window ends, after the run starts)
    duration: float  # seconds until undone (0: until the round's recovery)


@dataclass(frozen=True)
class Scenario:
    round_seed: int
    op: str
    hosts: tuple[str, ...]
    faults: tuple[FaultSpec, ...]


def make_scenario(round_seed: int, classes: Sequence[str] = FAULT_CLASSES, ops: Sequence[str] = OPS,
                  most: int = 3) -> Scenario:
    """The round's maintenance and up to ``most`` faults; the same seed gives the same round."""
    rng = random.Random(round_seed)
    usable = [op for op in ops if COMPATIBLE[op] & set(classes)]
    op = rng.choices(usable, weights=[OP_WEIGHTS[o] for o in usable])[0]
    if op == "patch-pair":
        hosts = tuple(rng.sample(HOSTS, 2))
    elif op in ("patch", "evacuate", "patch-worker"):
        hosts = (rng.choice(HOSTS),)
    else:
        hosts = HOSTS
    allowed = sorted(COMPATIBLE[op] & set(classes))
    # up to 4 faults: mostly 2-3; more (a long run reaching many faults): 2 up to ``most``, evenly
    counts = [n for n in (1, 2, 2, 3, 3, 4) if n <= most] or [1] if most <= 4 else list(range(2, most + 1))
    count = 1 if len(allowed) == 1 else min(len(allowed), rng.choice(counts))
    kinds = rng.sample(allowed, count)
    enders = [k for k in kinds if k in ENDS_RUN]
    for extra in enders[1:]:
        kinds.remove(extra)
    return Scenario(round_seed, op, hosts, tuple(_fault(rng, kind, op, hosts) for kind in kinds))


def _fault(rng: random.Random, kind: str, op: str, hosts: tuple[str, ...]) -> FaultSpec:
    target = rng.choice(hosts)  # the host under maintenance the fault hits
    others = [h for h in HOSTS if h not in hosts] or [h for h in HOSTS if h != target]
    patches = op in PATCHING_OPS
    if kind == "link-cut":
        trigger = rng.choice(["migrating", "dnf", "dnf-update"] if patches else ["migrating", "offset"])
        return FaultSpec(kind, rng.choice([target, *others]) if trigger == "migrating" else target, trigger,
                         rng.uniform(0, 0.3) if trigger.startswith("dnf") else rng.uniform(0, 3), rng.uniform(2, 12))
    if kind == "libvirtd-kill":
        return FaultSpec(kind, rng.choice([target, *others]), rng.choice(["migrating", "offset"]),
                         rng.uniform(0, 4), rng.uniform(1, 6))
    if kind == "ssh-drop":
        return FaultSpec(kind, target, rng.choice(["ssh", "dnf", "dnf-update", "dnf-update"]), rng.uniform(0, 0.3), 0)
    if kind in ("reboot-hangs", "reboot-never", "reboot-skipped"):
        return FaultSpec(kind, target, "start", 0, 0)
    if kind == "dnf-busy":
        return FaultSpec(kind, target, rng.choice(["start", "migrating"]), rng.uniform(0, 2), rng.uniform(5, 90))
    if kind in ("repo-broken", "disk-full", "host-key-changed"):
        return FaultSpec(kind, target, rng.choice(["start", "migrating"]), rng.uniform(0, 2), 0)
    if kind == "vm-started":
        return FaultSpec(kind, target, rng.choice(["planned", "migrating"]), rng.uniform(0, 2), 0)
    if kind == "vm-stopped":
        return FaultSpec(kind, target, rng.choice(["planned", "migrating"]), rng.uniform(0, 2), 0)
    if kind == "target-cordoned":
        return FaultSpec(kind, rng.choice(others), rng.choice(["planned", "migrating"]), rng.uniform(0, 1.5), 0)
    if kind == "target-filled":
        return FaultSpec(kind, rng.choice(others), rng.choice(["planned", "migrating"]), rng.uniform(0, 0.5), 0)
    if kind in ("flow-killed", "worker-killed"):
        trigger = rng.choice(["offset", "migrating", "dnf-update"] if patches else ["offset", "migrating"])
        return FaultSpec(kind, target, trigger, rng.uniform(0, 0.3 if trigger == "dnf-update" else 15), 0)
    if kind == "server-restart":
        return FaultSpec(kind, target, "offset", rng.uniform(1, 15), 0)
    if kind == "window-ends":
        # the window's end, seconds after the run starts: around the point where the first host's
        # estimate still fits and the next one's does not (hosts start ~25 s apart on the lab)
        return FaultSpec(kind, target, "start", MIN_HOST_ESTIMATE_S + rng.uniform(-10, 60), 0)
    raise ValueError(f"unknown fault class {kind!r}")


# --- what the lab shows, sampled continuously ------------------------------------------------------


class Watcher(threading.Thread):
    """Samples every host's running and paused domains (its libvirtd, over its own socket) and which
    hosts run dnf, every ``period`` s; keeps the moves seen and the duplicates."""

    def __init__(self, workdir: Path, hosts: Sequence[str], period: float = 0.15) -> None:
        super().__init__(daemon=True, name="chaos-watcher")
        import libvirt

        libvirt.registerErrorHandler(lambda *_: None, None)  # errors are read from exceptions
        self.libvirt = libvirt
        self.workdir = workdir
        self.hosts = list(hosts)
        self.period = period
        self.conns: dict[str, Any] = {}
        self.conn_lock = threading.Lock()  # the round's checks sample from another thread
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.last: dict[str, str] = {}  # vm -> host it last ran on
        self.first_seen: dict[str, float] = {}  # vm -> when a sample first saw it running (epoch s)
        self.moves: list[tuple[float, str, str, str]] = []
        self.duplicates: list[str] = []
        self.migrating = False
        self.dnf: set[str] = set()  # hosts seen running dnf (any command)
        self.dnf_update: set[str] = set()  # hosts seen running dnf update
        self.ssh: set[str] = set()  # hosts seen with an SSH session
        self.first_dnf: dict[str, float] = {}  # host -> when dnf was first seen on it this round (its precheck)
        # (when, vm, host): a domain of the VM (an incoming copy, paused, or running) seen on a host where
        # the sample before had none; a host that did not answer keeps what it had
        self.appeared: list[tuple[float, str, str]] = []
        self._present: set[tuple[str, str]] = set()

    def sample(self) -> dict[str, dict[str, int]]:
        """host -> {vm: libvirt state}; a host whose libvirtd does not answer is left out."""
        with self.conn_lock:
            return self._sample()

    def _sample(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for host in self.hosts:
            try:
                conn = self.conns.get(host)
                if conn is None:
                    conn = self.conns[host] = self.libvirt.open(faults.libvirt_socket_uri(self.workdir, host))
                out[host] = {d.name(): d.state()[0] for d in conn.listAllDomains(0)}
            except self.libvirt.libvirtError:
                self._drop(host)
        return out

    def _drop(self, host: str) -> None:
        conn = self.conns.pop(host, None)
        if conn is not None:
            try:
                conn.close()
            except self.libvirt.libvirtError:
                pass  # a connection to a dead daemon: nothing to close

    def running(self, snapshot: dict[str, dict[str, int]] | None = None) -> dict[str, list[str]]:
        """vm -> hosts it RUNS on (paused incoming copies of a migration do not count)."""
        snap = self.sample() if snapshot is None else snapshot
        out: dict[str, list[str]] = {}
        for host, doms in snap.items():
            for vm, state in doms.items():
                if state == self.libvirt.VIR_DOMAIN_RUNNING:
                    out.setdefault(vm, []).append(host)
        return out

    def run(self) -> None:
        doubled: set[str] = set()  # VMs the previous sample saw running on two hosts
        while not self.stop_event.is_set():
            snap = self.sample()
            now = time.time()
            running = self.running(snap)
            suspects = set(doubled)
            doubled = {vm for vm, hosts in running.items() if len(hosts) > 1}
            with self.lock:
                for vm in running:
                    self.first_seen.setdefault(vm, now)
                for vm, hosts in running.items():
                    if len(hosts) > 1:
                        # hosts are asked one after the other: a migration that completes between two
                        # of them shows its VM on both once; a VM really running twice stays so
                        if vm in suspects:
                            self.duplicates.append(f"{vm} running on {', '.join(sorted(hosts))} at once")
                    elif self.last.get(vm) not in (None, hosts[0]):
                        src = self.last[vm]
                        self.moves.append((now, vm, src, hosts[0]))
                    if len(hosts) == 1:
                        self.last[vm] = hosts[0]
                present = {(vm, h) for h, doms in snap.items() for vm in doms}
                present |= {(vm, h) for vm, h in self._present if h not in snap}
                self.appeared += [(now, vm, h) for vm, h in sorted(present - self._present)]
                self._present = present
                paused = {vm for doms in snap.values() for vm, st in doms.items()
                          if st == self.libvirt.VIR_DOMAIN_PAUSED}
                self.migrating = self.migrating or bool(paused & set(running))
                for host in self.hosts:
                    commands = _commands(host)
                    if any(argv[0].startswith("sshd:") for argv in commands if argv):
                        self.ssh.add(host)  # a session's process (the listener is the sshd binary's path)
                    dnf = [argv for argv in commands if any(a.endswith("/dnf") for a in argv)]
                    if dnf:
                        self.dnf.add(host)
                        self.first_dnf.setdefault(host, now)
                    if any("update" in argv for argv in dnf):
                        self.dnf_update.add(host)
            self.stop_event.wait(self.period)

    def reset_round(self) -> None:
        with self.lock:
            self.moves.clear()
            self.duplicates.clear()
            self.migrating = False
            self.dnf.clear()
            self.dnf_update.clear()
            self.ssh.clear()
            self.first_dnf.clear()
            self.appeared.clear()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(10)
        with self.conn_lock:
            for host in list(self.conns):
                self._drop(host)


def _commands(host: str) -> list[list[str]]:
    try:
        return faults.host_commands(host)
    except Exception:  # noqa: BLE001 - a probe of a host that is rebooting; "nothing now" is the answer
        return []


# --- the campaign's world: lab, Prefect, CLI ----------------------------------------------------------


def cli_command() -> list[str]:
    """This interpreter's hostmaint CLI, from the source tree on its path (a snapshot of main under
    PYTHONPATH runs its own CLI, whatever entry point the venv's script names)."""
    import importlib.util

    if importlib.util.find_spec("hostmaint_cli") is not None:
        code = "import sys; from hostmaint_cli.main import main; sys.argv[0] = 'hostmaint'; sys.exit(main())"
    else:
        code = "import sys; from hostmaint.cli import app; sys.argv[0] = 'hostmaint'; app()"
    return [sys.executable, "-c", code]


class FlowRunHandle(Protocol):
    """A flow run a Prefect worker executes (:meth:`PrefectSide.submit`)."""

    def poll(self) -> int | None:
        """None while it runs; then 0 when it completed, 1 when it failed, crashed or was cancelled."""

    def describe(self) -> str:
        """Its final state and message, and its log (what an operator reads in the UI)."""


class PrefectSide(Protocol):
    """Prefect for the campaign: a server on loopback, and a process worker running the patch-host
    deployment. Implemented outside the core (deployments/chaos.py): the core imports no Prefect."""

    def start(self, out: Path, port: int, env: dict[str, str]) -> dict[str, str]:
        """Start the server (its files under ``out``); returns ``env`` plus what clients need to reach it."""

    def restart_server(self) -> None:
        """Kill the server (SIGKILL) and start it again on the same port and files."""

    def start_worker(self) -> None:
        """Register the patch-host deployment (once) and start a process worker for it."""

    def kill_worker(self) -> list[int]:
        """kill -9 of the worker and every process it started (the flow runs it executes); their pids."""

    def submit(self, host: str, reason: str, operator: str) -> FlowRunHandle:
        """Start a run of the patch-host deployment for ``host``."""

    def stop(self) -> None:
        """Stop the worker and the server."""


@dataclass
class Campaign:
    workdir: Path
    out: Path
    info: LabInfo
    inventory: Path
    env: dict[str, str]
    prefect: PrefectSide
    watcher: Watcher
    release: int = 0  # the newest kernel-lab release in the repo (6.1.0-N.lab)
    guest_counter: int = 0
    log: Callable[[str], None] = print
    worker: bool = False  # a worker runs (the patch-worker rounds)
    command: list[str] = field(default_factory=cli_command)

    def cli(self, *args: str, timeout: float = OP_TIMEOUT_S, log_to: Path | None = None) -> tuple[int, str, str]:
        proc = subprocess.run([*self.command, *args], env=self.env, cwd=self.out,
                              capture_output=True, text=True, timeout=timeout)
        if log_to is not None:
            with log_to.open("a") as f:
                f.write(f"$ hostmaint {' '.join(args)}\n-> {proc.returncode}\n{proc.stdout}\n{proc.stderr}\n")
        return proc.returncode, proc.stdout, proc.stderr

    def states(self) -> dict[str, dict[str, Any]]:
        rc, stdout, stderr = self.cli("host", "status", "--json", timeout=120)
        if rc != 0:
            raise RuntimeError(f"hostmaint host status failed ({rc}): {stderr}")
        return {row["host"]: row for row in json.loads(stdout)}

    def audit(self, since: float) -> list[dict[str, Any]]:
        rc, stdout, stderr = self.cli("audit", "export", "--format", "jsonl", timeout=120)
        if rc != 0:
            raise RuntimeError(f"hostmaint audit export failed ({rc}): {stderr}")
        records = [json.loads(line) for line in stdout.splitlines() if line.strip()]
        return [r for r in records if datetime.fromisoformat(r["time"]).timestamp() >= since - 0.5]

    def publish_release(self) -> str:
        """A new kernel-lab and tools release in the lab repo: every host has updates pending again."""
        self.release += 1
        n = self.release
        build_repo(self.info.workdir / "cache" / "repo",
                   (RpmSpec(TOOLS_PACKAGE, f"1.{n}", "1"), RpmSpec(KERNEL_PACKAGE, "6.1.0", f"{n}.lab")))
        return f"6.1.0-{n}.lab.x86_64"

    def next_guest(self, prefix: str) -> str:
        self.guest_counter += 1
        return f"{prefix}{self.guest_counter:03d}"


def open_campaign(workdir: Path, out: Path, prefect: PrefectSide, log: Callable[[str], None] = print,
                  worker: bool = False) -> Campaign:
    """Bring up a fresh lab (3 hosts of 1024 MiB, six 64 MiB guests), a Prefect server on loopback and
    the limits (a worker comes up with the first worker round), and an inventory whose reboot timeout
    is short enough for a hanging reboot to show. When any of it fails, what came up goes down again."""
    out.mkdir(parents=True, exist_ok=True)
    lab_down(workdir)
    info = lab_up(hosts=len(HOSTS), vms=6, workdir=workdir, linux_guests=0, host_memory_mib=1024)
    try:
        data = yaml.safe_load(info.inventory_path.read_text())
        data["clusters"][0]["host_policy"]["reboot_timeout_s"] = REBOOT_TIMEOUT_S
        data["clusters"][0]["host_policy"]["update_timeout_s"] = 60
        data["clusters"][0]["host_policy"]["package_lock_wait_s"] = 60  # dnf-busy holds its lock 5-90 s
        inventory = out / "inventory.yaml"
        inventory.write_text(yaml.safe_dump(data, sort_keys=False))
        db = out / f"hostmaint-{int(time.time())}.db"
        env = dict(os.environ)
        env.update({"HOSTMAINT_DB": str(db), "HOSTMAINT_INVENTORY": str(inventory),
                    "HOSTMAINT_LOCK_LEASE_SECONDS": str(LEASE_S), "PREFECT_LOGGING_LEVEL": "INFO",
                    "USER": "chaos", "COLUMNS": "200", "NO_COLOR": "1"})
        env = prefect.start(out, PORT, env)
        campaign = Campaign(workdir=workdir, out=out, info=info, inventory=inventory, env=env, prefect=prefect,
                            watcher=Watcher(workdir, HOSTS), log=log, worker=worker)
        # releases published by earlier campaigns stay in the repo's cache: count on from the newest
        campaign.release = max(int(p.name.split("-")[3].split(".")[0])
                               for p in (workdir / "cache" / "repo").glob(f"{KERNEL_PACKAGE}-6.1.0-*.lab.*.rpm"))
        rc, _, stderr = campaign.cli("setup", "--no-deployments", "-i", str(inventory), timeout=180)
        if rc != 0:
            raise RuntimeError(f"hostmaint setup failed: {stderr}")
    except BaseException:
        prefect.stop()
        lab_down(workdir)
        raise
    campaign.watcher.start()
    return campaign


def close_campaign(campaign: Campaign) -> None:
    if campaign.watcher.is_alive():
        campaign.watcher.stop()
    campaign.prefect.stop()
    lab_down(campaign.workdir)


# --- one round -------------------------------------------------------------------------------------------


@dataclass
class FaultRun:
    spec: FaultSpec
    injected: bool = False
    at: float | None = None  # seconds after the op started
    note: str = ""


@dataclass
class RoundResult:
    round_seed: int
    op: str
    hosts: list[str]
    faults: list[dict[str, Any]]
    first_rc: list[int | None]
    rerun_rc: list[int | None]
    converged: bool
    violations: list[str]
    findings: list[str] = field(default_factory=list)  # wrong, but no invariant broken (e.g. a traceback)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    started: str = ""


def op_args(op: str, host: str | None, round_seed: int, window_end: datetime | None = None) -> list[str]:
    if op in ("patch", "patch-pair", "patch-worker"):
        return ["patch", str(host), "--reason", "chaos patch"]
    if op == "evacuate":
        return ["evacuate", str(host), "--reason", "chaos evacuation"]
    if op == "window":
        return ["window", "run", "lab", "--max-parallel", "1", "--window-id", f"chaos-{round_seed}",
                *(["--window-end", window_end.isoformat(timespec="seconds")] if window_end else [])]
    return ["rebalance", "lab", "--max-moves", "3"]


class OpRun:
    """One maintenance as a CLI process (its own process group, so a kill -9 takes all of it)."""

    def __init__(self, campaign: Campaign, args: list[str], log: Path) -> None:
        self.args = args
        self.log = log
        self.started = time.monotonic()
        self.killed_at: float | None = None
        with log.open("a") as f:
            f.write(f"$ hostmaint {' '.join(args)}\n")
            f.flush()
            self.proc = subprocess.Popen([*campaign.command, *args], env=campaign.env,
                                         cwd=campaign.out, stdout=f, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            faults.kill_process_group(self.proc.pid)
            self.killed_at = time.monotonic()

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(max(1.0, timeout - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait(30)
            return None

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class WorkerOp:
    """One patch-host run of the deployment, executed by the campaign's Prefect worker."""

    def __init__(self, campaign: Campaign, args: list[str], log: Path) -> None:
        self.args = args
        self.log = log
        self.started = time.monotonic()
        self.killed_at: float | None = None
        with log.open("a") as f:
            f.write(f"$ (worker) deployment patch-host {args[1]}\n")
        self.handle = campaign.prefect.submit(args[1], "chaos patch", "chaos")
        self.rc: int | None = None

    def running(self) -> bool:
        if self.killed_at is not None or self.rc is not None:
            return False
        self.rc = self.handle.poll()
        return self.rc is None

    def kill(self) -> None:
        """The worker was killed with this run in it: the run is dead, whatever Prefect says of it yet."""
        if self.running():
            self.killed_at = time.monotonic()

    def wait(self, timeout: float) -> int | None:
        while self.running():
            if time.monotonic() - self.started > timeout:
                return None
            time.sleep(1)
        if self.killed_at is not None:
            return -9
        with self.log.open("a") as f:
            f.write(self.handle.describe() + "\n")
        return self.rc

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_op(campaign: Campaign, op: str, args: list[str], log: Path) -> OpRun | WorkerOp:
    return WorkerOp(campaign, args, log) if op == "patch-worker" else OpRun(campaign, args, log)


class Injector:
    """Injects one round's faults at their moments and keeps their undos."""

    def __init__(self, campaign: Campaign, scenario: Scenario, ops: list[OpRun | WorkerOp]) -> None:
        self.c = campaign
        self.scenario = scenario
        self.ops = ops
        self.runs = [FaultRun(spec) for spec in scenario.faults]
        self.undos: list[tuple[str, faults.Undo]] = []
        self.added_guests: list[str] = []
        self.started_at: dict[str, float] = {}  # vm-started: guest -> when its start returned (running by then)
        self.stopped_guests: dict[str, str] = {}  # vm-stopped: guest -> the host it was destroyed on
        self.cordoned: dict[str, list[float]] = {}  # target-cordoned: host -> [cordoned at, uncordoned at]
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.threads: list[threading.Thread] = []
        self.t0 = time.monotonic()
        self.log_path = ops[0].log if ops else None
        self.log_offset = 0

    def arm(self) -> None:
        """Faults that are in place before the maintenance starts."""
        for fr in self.runs:
            if fr.spec.trigger == "start":
                self._inject(fr)

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.log_path = self.ops[0].log
        for fr in self.runs:
            if fr.spec.trigger != "start":
                t = threading.Thread(target=self._wait_and_inject, args=(fr,), daemon=True)
                t.start()
                self.threads.append(t)

    def _triggered(self, spec: FaultSpec) -> bool:
        w = self.c.watcher
        if spec.trigger == "offset":
            return True
        if spec.trigger == "planned" and self.log_path is not None:
            with self.log_path.open("rb") as f:
                f.seek(self.log_offset)
                return b"plan for " in f.read()
        with w.lock:
            if spec.trigger == "migrating":
                return w.migrating
            if spec.trigger == "ssh":
                return spec.host in w.ssh
            if spec.trigger in ("dnf", "dnf-update"):
                seen = w.dnf if spec.trigger == "dnf" else w.dnf_update
                return spec.host in seen or (spec.kind != "ssh-drop" and bool(seen))
        return False

    def _wait_and_inject(self, fr: FaultRun) -> None:
        while not self.done.is_set() and not self._triggered(fr.spec):
            if all(not op.running() for op in self.ops):
                fr.note = f"not injected: the maintenance ended before '{fr.spec.trigger}'"
                return
            time.sleep(0.05)
        if self.done.wait(fr.spec.delay) or all(not op.running() for op in self.ops):
            fr.note = fr.note or "not injected: the maintenance ended first"
            return
        self._inject(fr)

    def _inject(self, fr: FaultRun) -> None:
        spec, c = fr.spec, self.c
        workdir = c.workdir
        try:
            if spec.kind == "link-cut":
                self._timed(spec, faults.cut_link(spec.host))
            elif spec.kind == "libvirtd-kill":
                kill_libvirtd(spec.host, workdir)
                self._timed(spec, lambda: start_libvirtd(spec.host, workdir))
            elif spec.kind == "ssh-drop":
                killed = faults.kill_ssh_sessions(workdir, spec.host)
                fr.note = f"{killed} session(s) killed"
                if not killed:
                    fr.note = "not injected: no SSH session at that moment"
                    return
            elif spec.kind == "reboot-hangs":
                self._keep(spec, faults.hang_reboot(workdir, spec.host, REBOOT_TIMEOUT_S + 15))
            elif spec.kind == "reboot-never":
                self._keep(spec, faults.never_reboot_back(workdir, spec.host))
            elif spec.kind == "reboot-skipped":
                self._keep(spec, faults.ignore_reboot(workdir, spec.host))
            elif spec.kind == "repo-broken":
                self._keep(spec, faults.break_repo(workdir, spec.host))
            elif spec.kind == "dnf-busy":
                self._timed(spec, faults.hold_package_lock(workdir, spec.host))
            elif spec.kind == "disk-full":
                self._keep(spec, faults.fill_disk(workdir, spec.host))
            elif spec.kind == "host-key-changed":
                self._keep(spec, faults.change_host_key(c.info.known_hosts_path, c.info.host(spec.host).ip))
            elif spec.kind == "vm-started":
                name = c.next_guest("cxv")
                faults.start_guest(c.info, name, spec.host)
                with self.lock:
                    self.added_guests.append(name)
                    self.started_at[name] = time.time()
                fr.note = f"started {name} on {spec.host}"
            elif spec.kind == "vm-stopped":
                # a guest of the host under maintenance; once its small guests have all left (they move in
                # a second), one running anywhere: a tenant's VM stopped on a target is this fault too
                alone = {vm: hosts[0] for vm, hosts in c.watcher.running().items()
                           if len(hosts) == 1 and vm not in self.added_guests}
                on_it = sorted(vm for vm, host in alone.items() if host == spec.host) or sorted(alone)
                # which guest: drawn from the round's seed (the delay is), so a replay stops the same one
                guest = on_it[int(spec.delay * 1000) % len(on_it)] if on_it else None
                how = ("destroy", "managedsave")[int(spec.delay * 10000) % 2]  # the seed's too
                if guest is None or not faults.stop_guest(workdir, alone[guest], guest, how):
                    fr.note = "not injected: no guest running alone on a host at that moment"
                    return
                with self.lock:
                    self.stopped_guests[guest] = alone[guest]
                fr.note = f"{'destroyed' if how == 'destroy' else 'saved (managedsave)'} {guest} on {alone[guest]}"
            elif spec.kind == "target-cordoned":
                rc, _, err = c.cli("host", "cordon", spec.host, "--operator", "chaos",
                                   "--reason", "chaos: operator cordon (disk errors)")
                if rc != 0:
                    fr.note = f"not injected: the cordon was refused: {err.strip()[-160:]}"
                    return
                span = [time.time(), float("inf")]
                with self.lock:
                    self.cordoned[spec.host] = span

                def uncordon(host: str = spec.host, span: list[float] = span) -> None:
                    c.cli("host", "uncordon", host, "--operator", "chaos", "--reason", "chaos: disks replaced")
                    span[1] = time.time()

                self._keep(spec, uncordon)
                fr.note = f"cordoned {spec.host}"
            elif spec.kind == "target-filled":
                name = c.next_guest(FILLER_PREFIX)
                vm = faults.fill_host(c.info, name, spec.host)
                if vm is None:
                    fr.note = f"not injected: {spec.host} had no room to fill"
                    return
                with self.lock:
                    self.added_guests.append(name)
                fr.note = f"{name} ({vm.memory_mib} MiB) fills {spec.host}"
            elif spec.kind == "flow-killed":
                running = [op for op in self.ops if op.running()]
                if not running:
                    fr.note = "not injected: no flow process left"
                    return
                victim = running[0]
                victim.kill()
                fr.note = f"killed: hostmaint {' '.join(victim.args)}"
            elif spec.kind == "worker-killed":
                pids = c.prefect.kill_worker()
                for op in self.ops:
                    op.kill()  # every run the worker held died with it
                self._keep(spec, c.prefect.start_worker)  # the operator (or systemd) starts it again
                fr.note = f"killed the worker and {max(0, len(pids) - 1)} process(es) it started"
            elif spec.kind == "server-restart":
                c.prefect.restart_server()
            elif spec.kind == "window-ends":
                fr.note = f"the window ends {spec.delay:.0f} s after the run starts"
        except Exception as exc:  # noqa: BLE001 - a fault that could not be injected is reported, not fatal
            fr.note = f"not injected: {type(exc).__name__}: {exc}"
            return
        fr.injected = True
        fr.at = round(time.monotonic() - self.t0, 2)

    def _keep(self, spec: FaultSpec, undo: faults.Undo) -> None:
        with self.lock:
            self.undos.append((spec.kind, undo))

    def _timed(self, spec: FaultSpec, undo: faults.Undo) -> None:
        """Undo after the fault's duration (the cable plugged back, systemd restarting libvirtd)."""
        fired = threading.Event()

        def once() -> None:
            with self.lock:
                if fired.is_set():
                    return
                fired.set()
            undo()

        timer = threading.Timer(spec.duration, once)
        timer.daemon = True
        timer.start()
        self._keep(spec, once)

    def finish(self) -> list[str]:
        """Stop injecting and undo every fault still in place; returns what could not be undone."""
        self.done.set()
        for t in self.threads:
            t.join(60)
        problems = []
        for kind, undo in reversed(self.undos):
            try:
                undo()
            except Exception as exc:  # noqa: BLE001 - keep undoing the rest; the round reports it
                problems.append(f"undo {kind}: {exc}")
        return problems


def wait_hosts_up(campaign: Campaign, timeout: float = 90) -> None:
    """Every lab host booted and answering (a hanging reboot finishes on its own)."""
    for host in HOSTS:
        wait_for_phase(campaign.workdir, host, ("up",), timeout)
    deadline = time.monotonic() + timeout
    while not lab_status(campaign.workdir).up:
        if time.monotonic() > deadline:
            raise RuntimeError(f"lab not up again: {lab_status(campaign.workdir)}")
        time.sleep(0.5)
    for host in HOSTS:  # libvirtd killed by a fault whose undo did not run yet
        if read_status(campaign.workdir, host).get("libvirtd_pid") is None:
            start_libvirtd(host, campaign.workdir)
        left = faults.leftover_full_disks(campaign.workdir, host)
        if left:
            raise RuntimeError(f"{host}: a full filesystem is still mounted at {left} after its undo")


def run_round(campaign: Campaign, scenario: Scenario) -> RoundResult:
    c = campaign
    rdir = c.out / "rounds" / str(scenario.round_seed)
    rdir.mkdir(parents=True, exist_ok=True)
    log = rdir / "ops.log"
    started = time.time()
    result = RoundResult(scenario.round_seed, scenario.op, list(scenario.hosts), [], [], [], False, [],
                         started=datetime.now(UTC).isoformat(timespec="seconds"))
    newest = c.publish_release() if scenario.op in PATCHING_OPS else None
    packages_before = {h: faults.installed_packages(c.workdir, h) for h in HOSTS}
    reboots_before = {h: len(faults.reboots(c.workdir, h)) for h in HOSTS}
    placed = c.watcher.running()
    expected = set(placed)
    states_at_start = c.states()
    c.watcher.reset_round()

    ops: list[OpRun | WorkerOp] = []
    injector = Injector(c, scenario, ops)
    injector.log_offset = log.stat().st_size if log.exists() else 0
    injector.arm()
    ends = [f.delay for f in scenario.faults if f.kind == "window-ends"]
    window_end = datetime.now(UTC) + timedelta(seconds=ends[0]) if ends else None
    targets = scenario.hosts if scenario.op in ("patch", "evacuate", "patch-pair", "patch-worker") else (None,)
    for host in targets:
        ops.append(start_op(c, scenario.op, op_args(scenario.op, host, scenario.round_seed, window_end), log))
    injector.start()
    ended: list[float] = []  # when each op was seen to have ended (at the latest)
    for op in ops:
        result.first_rc.append(op.wait(OP_TIMEOUT_S))
        ended.append(time.time())
    with c.watcher.lock:
        first_dnf = dict(c.watcher.first_dnf)
    killed = [op.killed_at for op in ops if op.killed_at is not None]
    result.notes += injector.finish()
    expected |= set(injector.added_guests)
    result.faults = [{**asdict(fr.spec), "injected": fr.injected, "at": fr.at, "note": fr.note}
                     for fr in injector.runs]
    try:
        wait_hosts_up(c)
    except Exception as exc:  # noqa: BLE001 - the campaign's own problem, reported with the round
        result.notes.append(f"campaign problem: the lab is not as before the faults: {exc}")

    first_out = [op.output() for op in ops]
    for rc, op in zip(result.first_rc, ops, strict=True):
        if rc is None:
            result.violations.append(f"hang: hostmaint {' '.join(op.args)} did not end within {OP_TIMEOUT_S} s")
    for rc, text, op in zip(result.first_rc, first_out, ops, strict=True):
        if isinstance(op, OpRun) and crashed(rc, text):
            result.findings.append("crash: the faulted run ended without the CLI's own error line: "
                                   + last_error(text))
    # the state after the faulted run, before anyone fixes anything
    states_after_first = c.states()
    with c.watcher.lock:
        moved_by_first = bool(c.watcher.moves)
    result.violations += check_states(c, scenario, newest, "after the faulted run", states_after_first,
                                      states_at_start, placed, c.audit(started))
    facts = Facts(injected=[fr.spec for fr in injector.runs if fr.injected], reboots_before=reboots_before,
                  packages_before=packages_before, added=list(injector.added_guests), at_start=states_at_start)
    result.violations += check_reasons(c, facts, "after the faulted run", states_after_first)
    if window_end is not None:
        # no host of the window starts unless its estimate fits the time left (its precheck's dnf is the
        # first command a host gets; every estimate is at least MIN_HOST_ESTIMATE_S)
        end = window_end.timestamp()
        result.violations += [f"window: {h} was started {end - t:.0f} s before the window's end, less than any "
                              f"host's estimate ({MIN_HOST_ESTIMATE_S:.0f} s)"
                              for h, t in sorted(first_dnf.items()) if t > end - MIN_HOST_ESTIMATE_S + 1.0]
        if ends and all(rc == 0 for rc in result.first_rc) and len(first_dnf) < len(HOSTS):
            result.violations.append(f"window: exit 0, but only {sorted(first_dnf)} of {list(HOSTS)} were started")

    # recovery, as an operator would
    result.rerun_rc = [None] * len(ops)

    def rerun(indices: list[int], states: dict[str, dict[str, Any]]) -> None:
        for host in HOSTS:
            if states[host]["state"] == "failed":
                c.cli("host", "reset", host, "--reason", "chaos: fault fixed", log_to=log)
        # a host out of service (reset, or left cordoned) is finished first, as the window does
        # (unfinished_first): while it is out, N+1 rightly refuses to drain another host of a small
        # cluster (round seeds 1452329124, 532732275); the rest run together
        reset = [i for i in indices if ops[i].args[0] == "patch" and states[ops[i].args[1]]["state"] != "active"]
        rest = [i for i in indices if i not in reset]
        if reset and rest:  # the case 7fc4f04 ordered: its proof on the lab is a converged round with this note
            result.notes.append(f"re-run order: out of service {[ops[i].args[1] for i in reset]} first, then "
                                f"{[ops[i].args[1] if ops[i].args[0] == 'patch' else ops[i].args[0] for i in rest]}")
        groups = [reset, rest]
        if scenario.op == "patch-pair":
            # two patches of one small cluster re-run together race to cordon, and N+1 rightly refuses
            # whichever plans second (round 1318253299): an operator told so re-runs them one at a time
            groups = [[i] for i in reset + rest]
        for group in groups:
            if group:
                rerun_group(group)

    def rerun_group(indices: list[int]) -> None:
        offset = log.stat().st_size
        # a plain re-run: the same command (a window without its end), or a new run of the deployment
        runs = {i: start_op(c, scenario.op, op_args(scenario.op, None, scenario.round_seed)
                            if scenario.op == "window" else ops[i].args, log) for i in indices}
        for i, run in runs.items():
            result.rerun_rc[i] = run.wait(OP_TIMEOUT_S)
            if result.rerun_rc[i] is None:
                result.violations.append(f"hang: the re-run hostmaint {' '.join(run.args)} did not end within "
                                         f"{OP_TIMEOUT_S} s")
            if isinstance(run, OpRun) and crashed(result.rerun_rc[i], run.output()[offset:]):
                result.findings.append("crash: a re-run ended without the CLI's own error line: "
                                       + last_error(run.output()[offset:]))

    needs_rerun = [i for i, rc in enumerate(result.first_rc) if rc != 0]
    # an evacuation that ended well, on whose host a tenant's VM came up after it ended: host status
    # says so (not drained: X runs on it), and the operator runs the evacuation again
    for i, rc in enumerate(result.first_rc):
        look = last_look(c.audit(started), ops[i].args[1]) if rc == 0 and ops[i].args[:1] == ["evacuate"] else None
        late = late_tenants(c, ops[i].args, injector.added_guests, ended[i], injector.started_at, look) \
            if rc == 0 else []
        if late:
            needs_rerun.append(i)
            result.notes.append(f"re-run: {late} started on {ops[i].args[1]} after the evacuation ended")
    if needs_rerun:
        if killed:
            time.sleep(max(0.0, max(killed) + LEASE_S + 5 - time.monotonic()))  # the dead run's lease
        fillers = [g for g in injector.added_guests if g.startswith(FILLER_PREFIX)]
        if fillers:
            # the target stays full for a first plain re-run (what an operator would try first), checked;
            # then its tenant's guest goes, and the re-run that must converge runs
            rerun(needs_rerun, states_after_first)
            result.notes.append(f"re-run with the target still full: rc {result.rerun_rc}")
            full = c.states()
            result.violations += check_states(c, scenario, newest, "after a re-run with the target still full",
                                              full, states_at_start, placed, c.audit(started))
            for name in fillers:
                remove_guest(c.info, name)
                injector.added_guests.remove(name)
                expected.discard(name)
            needs_rerun = [i for i in needs_rerun if result.rerun_rc[i] != 0]
            states_after_first = full
        if needs_rerun:
            rerun(needs_rerun, states_after_first)
    final_rc = [f if r is None else r for f, r in zip(result.first_rc, result.rerun_rc, strict=True)]

    # the checks, from outside
    running = c.watcher.running()
    stopped = dict(injector.stopped_guests)  # by their tenant: they run nowhere until the tenant starts them
    for vm in sorted(expected - set(stopped)):
        hosts = running.get(vm, [])
        if len(hosts) != 1:
            result.violations.append(f"vm: {vm} runs on {len(hosts)} hosts ({', '.join(hosts) or 'none'})")
    for vm, host in sorted(stopped.items()):
        if running.get(vm):
            result.violations.append(f"vm: {vm}, destroyed by its tenant on {host}, runs again on "
                                     f"{', '.join(running[vm])}: no tenant started it")
    with c.watcher.lock:
        result.violations += [f"vm: {d}" for d in dict.fromkeys(c.watcher.duplicates)]
        moves = list(c.watcher.moves)
    for host in HOSTS:
        for entry in faults.reboots(c.workdir, host)[reboots_before[host]:]:
            if entry.get("guests_killed"):
                result.violations.append(f"reboot: {host} rebooted with {entry['guests_killed']} running on it")
    states_final = c.states()
    records = c.audit(started)
    result.violations += check_states(c, scenario, newest, "after the re-run", states_final, states_at_start, placed,
                                      records)
    result.violations += check_reasons(c, facts, "after the re-run", states_final)
    rc, _, stderr = c.cli("audit", "verify", log_to=log)
    if rc != 0:
        result.violations.append(f"audit: verify failed: {stderr.strip()[:300]}")
    unrecorded, contradicted = check_moves_recorded(moves, records)
    result.violations += unrecorded
    result.findings += contradicted
    result.violations += check_packages_recorded(c, packages_before, records)
    result.violations += check_not_called_lost(stopped, records, [op.output() for op in ops])
    with c.watcher.lock:
        appeared = list(c.watcher.appeared)
    result.violations += check_nothing_placed_on_cordoned(injector.cordoned, appeared, injector.added_guests)
    changed = moved_by_first or any((states_after_first[h]["state"], states_after_first[h]["reason"])
                                 != (states_at_start[h]["state"], states_at_start[h]["reason"]) for h in HOSTS)
    if any(rc == 1 for rc in result.first_rc) and changed \
            and not any(r["outcome"] in ("failed", "aborted", "unknown") for r in records):
        result.violations.append("audit: the faulted run failed after changing something, but no record of the "
                                 "round says failed (or unknown)")

    result.converged = all(rc == 0 for rc in final_rc) and not goal_missed(c, scenario, newest, states_final,
                                                                            final_rc, result)
    result.violations = list(dict.fromkeys(result.violations))
    result.seconds = round(time.time() - started, 1)
    normalise(c, injector.added_guests, log, result, stopped=stopped)
    return result


def late_tenants(c: Campaign, args: Sequence[str], added: Iterable[str], ended: float,
                 started_at: Mapping[str, float] | None = None, look: float | None = None) -> list[str]:
    """The tenant's VMs running on the host an evacuation (``args``) left drained that came up after the
    run's last look at it: the watcher first saw them after the run had ended, or their start returned
    after the run's last ``confirm-empty`` (``look``; round 175911973: started 1 s before the run's end,
    after that check). No run of ours was there to see them."""
    if not args or args[0] != "evacuate":
        return []
    running = c.watcher.running()
    with c.watcher.lock:
        first_seen = dict(c.watcher.first_seen)
    started_at = started_at or {}
    return sorted(g for g in added if not g.startswith(FILLER_PREFIX) and args[1] in running.get(g, [])
                  and (first_seen.get(g, 0.0) > ended
                       or (look is not None and started_at.get(g, 0.0) > look)))


def last_look(records: Iterable[dict[str, Any]], host: str) -> float | None:
    """When a run last proved ``host`` empty (its latest ``confirm-empty`` record that found nothing), epoch s."""
    times = [datetime.fromisoformat(r["time"]).timestamp() for r in records
             if r.get("step") == "confirm-empty" and r.get("host") == host and r.get("outcome") == "ok"]
    return max(times, default=None)


def crashed(rc: int | None, output: str) -> bool:
    """A run that failed without the CLI's own one-line error (exit_codes) or its outcome table: an
    exception escaped. (Prefect logs a failed task's traceback; that alone is not a crash.)"""
    if rc != 1:
        return False
    lines = [line.strip() for line in output.splitlines()]
    return not any(line.startswith(("failed:", "no safe plan:", "error:")) for line in lines) \
        and "outcome per host" not in output


def last_error(output: str) -> str:
    """The last exception line of a run's output (what an operator would read first)."""
    heads = [(line, line.split(":")[0]) for line in output.splitlines() if line and not line[0].isspace()]
    errors = [line.strip() for line, head in heads if "Error" in head or "Exception" in head]
    return errors[-1][:300] if errors else "(no exception line)"


def moved_off_by_others(records: Sequence[dict[str, Any]]) -> dict[str, set[str]]:
    """host -> VMs a successful migration moved off it in a run that never cordoned it: another host's
    maintenance bringing its VMs home, or a rebalance. Such a move is no sign the host left service."""
    cordoned = {(r.get("run_id"), r.get("host")) for r in records if r.get("step") == "cordon"}
    out: dict[str, set[str]] = {}
    for r in records:
        host, vm = r.get("host"), r.get("vm")
        if r.get("step") == "migrate" and r.get("outcome") == "ok" and host and vm \
                and (r.get("run_id"), host) not in cordoned:
            out.setdefault(host, set()).add(vm)
    return out


def check_states(c: Campaign, scenario: Scenario, newest: str | None, when: str, states: dict[str, dict[str, Any]],
                 at_start: dict[str, dict[str, Any]], placed: dict[str, list[str]],
                 records: Sequence[dict[str, Any]]) -> list[str]:
    """Each host's state and reason (``states``, from hostmaint host status) against what libvirt and
    the host show. ``at_start``: the states when the round began; ``placed``: where each VM ran then;
    ``records``: the round's audit records (which run moved a VM off a host)."""
    problems = []
    running = c.watcher.running()
    on_host: dict[str, list[str]] = {h: [] for h in HOSTS}
    for vm, hosts in running.items():
        for h in hosts:
            on_host[h].append(vm)
    # a host whose state changed this round and whose VMs of the round's start run elsewhere now left
    # service in this round (a run that was refused before anything moved did not; nor did a host whose
    # guest another host's run took home: seen, patch-pair round 721510573)
    others = moved_off_by_others(records)
    left = {h: {vm for vm, where in placed.items()
                if where == [h] and running.get(vm, [h]) != [h] and vm not in others.get(h, set())}
            for h in HOSTS if (states[h]["state"], states[h]["reason"])
            != (at_start[h]["state"], at_start[h]["reason"])}
    for host in HOSTS:
        state, reason = states[host]["state"], states[host]["reason"]
        if state in ("drained", "patching", "rebooting", "verifying") and on_host[host]:
            problems.append(f"state {when}: {host} is {state} while {sorted(on_host[host])} run on it")
        if state in ("failed", "cordoned") and not str(reason).strip():
            problems.append(f"state {when}: {host} is {state} with no reason")
        targeted = host in scenario.hosts and scenario.op != "rebalance"
        if state == "active" and targeted and left.get(host):
            kernel = faults.running_kernel(c.workdir, host)
            if scenario.op == "evacuate":
                problems.append(f"state {when}: {host} is active ('{reason}') after its evacuation moved "
                                f"{sorted(left[host])} off it")
            elif newest is not None and kernel != newest:
                problems.append(f"state {when}: {host} is active ('{reason}') but runs {kernel}, not {newest}: "
                                f"it left service ({sorted(left[host])} moved off) and was never verified")
    return problems


@dataclass
class Facts:
    """What the round did to the lab, as the checks of a host's reason need it."""

    injected: list[FaultSpec]
    reboots_before: dict[str, int]
    packages_before: dict[str, set[str]]
    added: list[str]  # guests the faults started (vm-started, target-filled)
    at_start: dict[str, dict[str, Any]]


# what a host's reason must say when a fault's mark is on it (see check_reasons)
SAYS = {
    "reboot-skipped": re.compile(r"did not reboot|never rebooted|boot id (still|unchanged)", re.I),
    "reboot-hangs": re.compile(r"did not come back|not come back|never came back", re.I),
    "reboot-never": re.compile(r"did not come back|not come back|never came back", re.I),
    "disk-full": re.compile(r"space|disk|full", re.I),
    "repo-broken": re.compile(r"repo|metadata|mirror|download", re.I),
    "host-key-changed": re.compile(r"host key", re.I),
    "dnf-busy": re.compile(r"busy|already locked by", re.I),
}
DNF_FAULTS = {"disk-full", "repo-broken", "dnf-busy"}
CONNECTION_FAULTS = {"ssh-drop", "link-cut", "host-key-changed", "libvirtd-kill"}
AWAY = re.compile(r"its VMs away: (.*?)(?:;|$)")
AWAY_ONE = re.compile(r"(\S+) \(on (\S+)\)")
ON_IT = re.compile(r"(?:not drained: |drain failed: )(.+?) (?:started on it|runs on it|still on it)")


def check_reasons(c: Campaign, facts: Facts, when: str, states: dict[str, dict[str, Any]]) -> list[str]:
    """A host out of service gives the real reason, derived from outside (libvirt, the host's reboot
    log and rpm database) and the faults injected, never from hostmaint's own state:

    - what a reason says of VMs is true now: those it names on the host ("not drained: X runs on
      it", "drain failed: X still on it") run there; those it names away ("X (on Y)") run on Y;
    - a host a failed drain left out names a VM that runs on it;
    - a tenant's VM started on a host that stays cordoned with it is named;
    - a host left failed after a fault whose mark is on it says so: the reboot that did not happen
      (updated, same boot), did not come back (a power cut logged), the full disk or broken repository
      (dnf ran, nothing installed), the changed host key — unless another fault on the same host may
      have failed it first."""
    problems = []
    running = c.watcher.running()
    for host in HOSTS:
        state, reason = states[host]["state"], str(states[host]["reason"] or "")
        if state == "active":
            continue
        on_it = sorted(vm for vm, hosts in running.items() if host in hosts)
        said = f"state {when}: {host} is {state} ('{reason}')"
        for m in ON_IT.finditer(reason):
            for vm in m.group(1).split(", "):
                if vm not in on_it:
                    problems.append(f"{said}, but {vm} does not run on it (libvirt: {on_it or 'nothing'})")
        for m in AWAY.finditer(reason):
            for vm, where in AWAY_ONE.findall(m.group(1)):
                if where != "nowhere" and where not in running.get(vm, []):
                    problems.append(f"{said}, but {vm} does not run on {where} (libvirt: {running.get(vm, [])})")
        if reason.startswith("drain failed") and not any(vm in reason for vm in on_it) and on_it \
                and "unknown" not in reason:
            problems.append(f"{said}: its drain failed with {on_it} on it, and the reason names none of them")
        # a tenant's VM must be named when it ran before the reason was written: one started later on
        # a host left cordoned is news to no run (the watcher sees a start up to a sample late)
        written = datetime.fromisoformat(states[host]["since"]).timestamp() if states[host].get("since") else None
        tenants = [g for g in facts.added if g in on_it and not g.startswith(FILLER_PREFIX)
                   and (written is None or c.watcher.first_seen.get(g, written) < written)]
        if tenants and state == "cordoned" and not any(g in reason for g in tenants) \
                and states[host]["reason"] != facts.at_start[host]["reason"]:
            problems.append(f"{said}, with the tenant's {tenants} on it, which the reason does not name")
        if state != "failed":
            continue
        hit = {f.kind for f in facts.injected if f.host == host}
        rebooted = len(faults.reboots(c.workdir, host)) > facts.reboots_before[host]
        updated = faults.installed_packages(c.workdir, host) != facts.packages_before[host]
        marks = set()
        if "reboot-skipped" in hit and updated and not rebooted:
            marks.add("reboot-skipped")
        if hit & {"reboot-hangs", "reboot-never"} and rebooted:
            marks |= hit & {"reboot-hangs", "reboot-never"}
        if len(hit & DNF_FAULTS) == 1 and not updated and not rebooted:
            marks |= hit & DNF_FAULTS
        if "host-key-changed" in hit:
            marks.add("host-key-changed")
        others = hit & CONNECTION_FAULTS - {"host-key-changed"}
        if others or len(marks) > 1:
            continue  # another fault on this host may have failed it first: any true reason will do
        for kind in marks:
            # another fault of the host that its reason names may have stopped it first (a changed host
            # key bites at the next connection; the open one ran dnf into a broken repo: round 1272006114)
            if not SAYS[kind].search(reason) and not any(SAYS[k].search(reason) for k in hit & SAYS.keys() - {kind}):
                problems.append(f"{said}: after {kind}, the reason does not say so (expected /{SAYS[kind].pattern}/)")
    return problems


def goal_missed(c: Campaign, scenario: Scenario, newest: str | None, states: dict[str, dict[str, Any]],
                final_rc: list[int | None], result: RoundResult) -> bool:
    """Whether the work did not reach its goal; an exit 0 without the goal is also a violation."""
    running = c.watcher.running()
    missed = []
    if scenario.op in PATCHING_OPS:
        for host in scenario.hosts:
            kernel = faults.running_kernel(c.workdir, host)
            if states[host]["state"] != "active" or kernel != newest:
                missed.append(f"{host} is {states[host]['state']} running {kernel} (newest {newest})")
    elif scenario.op == "evacuate":
        host = scenario.hosts[0]
        left = sorted(vm for vm, hosts in running.items() if host in hosts)
        if states[host]["state"] != "drained" or left:
            missed.append(f"{host} is {states[host]['state']} with {left} on it")
    if missed and all(rc == 0 for rc in final_rc):
        result.violations.append(f"false success: exit 0 but {'; '.join(missed)}")
    if missed:
        result.notes.append("goal missed: " + "; ".join(missed))
    return bool(missed)


def check_moves_recorded(moves: Iterable[tuple[float, str, str, str]], records: list[dict[str, Any]]
                         ) -> tuple[list[str], list[str]]:
    """Every move libvirt showed has a successful record naming the VM, its source and its target
    (a migration, or one a later run found and recorded for a run that died). Returns the violations,
    and as findings the moves whose own attempt is recorded failed (true in the end, wrong on the way).

    A migration is recorded once it ended, so the attempt that made a move is the first record of
    that VM, source and target written after the watcher saw the move (less :data:`RECORD_SLACK_S`);
    a failed record of an earlier attempt that never landed is true and no finding."""

    def target(r: dict[str, Any]) -> object:
        return (r.get("inputs") or {}).get("target") or (r.get("details") or {}).get("target")

    attempts: dict[tuple[str, str, object], list[tuple[float, str]]] = {}
    for r in records:
        if r["vm"] and r["outcome"] in ("ok", "failed"):
            attempts.setdefault((r["vm"], r["host"], target(r)), []).append(
                (datetime.fromisoformat(r["time"]).timestamp(), r["outcome"]))
    violations, findings = [], []
    for seen_at, vm, src, dst in moves:
        said = sorted(attempts.get((vm, src, dst), []))
        if not any(outcome == "ok" for _, outcome in said):
            violations.append(f"audit: {vm} moved {src} -> {dst} with no successful record of it")
            continue
        own = next((outcome for at, outcome in said if at >= seen_at - RECORD_SLACK_S), None)
        if own == "failed":
            findings.append(f"record: {vm} moved {src} -> {dst}, but the record of the migration that moved it "
                            "says failed")
    return list(dict.fromkeys(violations)), list(dict.fromkeys(findings))


RECORD_SLACK_S = 1.0
"""How long before the watcher's sight of a move its record may be written: the watcher samples every
0.15 s and a busy machine delays it; an earlier attempt's record is written when that attempt ended,
seconds before a later one could land."""


def check_packages_recorded(c: Campaign, before: dict[str, set[str]], records: list[dict[str, Any]]) -> list[str]:
    """Every package that appeared on a host is named by a successful record of that host."""
    problems = []
    for host in HOSTS:
        new = faults.installed_packages(c.workdir, host) - before[host]
        texts = [json.dumps(r) for r in records if r["host"] == host and r["outcome"] == "ok"]
        for nevr in sorted(new):
            version = nevr.rsplit("-", 2)[1] + "-" + nevr.rsplit("-", 2)[2]
            if not any(version in t for t in texts):
                problems.append(f"audit: {nevr} was installed on {host} but no successful record names it")
    return problems


CORDON_SLACK_S = 1.0
"""A migration the drain started just before the operator's cordon committed shows its copy on the target
a moment after (the watcher samples every 0.15 s; the cordon's time is taken when its command returned)."""


def check_nothing_placed_on_cordoned(cordoned: Mapping[str, Sequence[float]],
                                     appeared: Iterable[tuple[float, str, str]], tenants: Iterable[str]) -> list[str]:
    """No VM's copy appears on a host from :data:`CORDON_SLACK_S` after an operator cordoned it until it
    was uncordoned (a tenant's own guest started there is not hostmaint's placement)."""
    theirs = set(tenants)
    problems = []
    for host, (start, end) in sorted(cordoned.items()):
        for at, vm, where in appeared:
            if where == host and vm not in theirs and start + CORDON_SLACK_S < at < end:
                problems.append(f"placement: {vm} appeared on {host} {at - start:.1f} s after the operator "
                                "cordoned it")
    return problems


def check_not_called_lost(stopped: Mapping[str, str], records: list[dict[str, Any]],
                          outputs: Sequence[str] = ()) -> list[str]:
    """Neither a record of the round nor a run's output calls a guest its tenant destroyed lost ("X runs
    0 times"): hostmaint did not stop it, and libvirt says who did."""
    problems = []
    for vm, host in sorted(stopped.items()):
        said = f"{vm} runs 0 times"
        for r in records:
            if said in json.dumps(r):
                problems.append(f"audit: {vm}, destroyed by its tenant on {host}, is called lost by a "
                                f"{r['step']} record ({r['outcome']})")
                break
        else:
            if any(said in text for text in outputs):
                problems.append(f"run: {vm}, destroyed by its tenant on {host}, is called lost in a run's output")
    return problems


def normalise(c: Campaign, added: list[str], log: Path, result: RoundResult, *,
              stopped: Mapping[str, str] | None = None) -> None:
    """Between rounds, outside the measurement: the operator's tenants delete the chaos guests and start
    again those they destroyed, and every host goes back to service (a later round may start anywhere)."""
    for name in added:
        remove_guest(c.info, name)
    states = c.states()
    for _ in range(2):
        if all(s["state"] == "active" for s in states.values()):
            break
        for host, s in states.items():
            state = s["state"]
            if state == "failed":
                c.cli("host", "reset", host, "--reason", "chaos: back to service", log_to=log)
                state = "cordoned"
            if state in ("draining", "patching", "rebooting", "verifying"):
                c.cli("patch", host, "--reason", "chaos: finish before the next round", log_to=log)
                continue
            if state in ("cordoned", "drained"):
                c.cli("host", "cordon", host, "--reason", "chaos: back to service", log_to=log)
                c.cli("host", "uncordon", host, "--reason", "chaos: back to service", log_to=log)
        states = c.states()
    for name in sorted(stopped or {}):
        if faults.start_stopped_guest(c.workdir, list(HOSTS), name) is None:
            result.notes.append(f"{name}, destroyed by its tenant, was not found shut off to start again")
    stuck = {h: s["state"] for h, s in states.items() if s["state"] != "active"}
    if stuck:
        result.notes.append(f"hosts not back in service after the round: {stuck}")
    missing = [vm.name for vm in c.info.vms if vm.name not in c.watcher.running()]
    if missing:
        result.notes.append(f"lab guests not running after the round: {missing}")


# --- the campaign -----------------------------------------------------------------------------------------


def round_seeds(seed: int) -> Iterable[int]:
    rng = random.Random(seed)
    while True:
        yield rng.randrange(1, 2**31)


def run_campaign(seed: int | None = None, rounds: int | None = None, minutes: float | None = None,
                 replay: Sequence[int] = (), workdir: Path = DEFAULT_WORKDIR, out: Path | None = None,
                 classes: Sequence[str] = FAULT_CLASSES, ops: Sequence[str] = OPS, most: int = 3,
                 prefect: Callable[[], PrefectSide] | None = None,
                 log: Callable[[str], None] = print) -> list[RoundResult]:
    """Run rounds until ``rounds`` are done or ``minutes`` have passed (a round is never cut short);
    ``replay`` runs exactly the rounds with those round seeds; ``most``: faults a round draws at most.
    ``prefect`` makes the Prefect side (deployments/chaos.py by default). Appends to ``out/rounds.jsonl``."""
    out = out or workdir / "out"
    seeds: Iterable[int] = replay if replay else round_seeds(seed if seed is not None else 1)
    limit = len(replay) if replay else rounds
    deadline = time.monotonic() + minutes * 60 if minutes else None
    make_prefect = prefect or _default_prefect()
    worker = "patch-worker" in ops

    def fresh() -> Campaign:
        return open_campaign(workdir, out, make_prefect(), log, worker=worker)

    campaign = fresh()
    results: list[RoundResult] = []
    try:
        for round_seed in seeds:
            if limit is not None and len(results) >= limit:
                break
            if deadline is not None and time.monotonic() > deadline:
                break
            scenario = make_scenario(round_seed, classes, ops, most)
            log(f"round {len(results) + 1} seed {round_seed}: {scenario.op} {','.join(scenario.hosts)} + "
                + ", ".join(f"{f.kind}@{f.host}/{f.trigger}+{f.delay:.1f}s" for f in scenario.faults))
            try:
                result = run_round(campaign, scenario)
            except Exception as exc:  # noqa: BLE001 - the round is recorded as failed; the next gets a fresh lab
                drawn = [{**asdict(f), "injected": False, "at": None, "note": ""} for f in scenario.faults]
                result = RoundResult(round_seed, scenario.op, list(scenario.hosts), drawn, [], [], False,
                                     [f"campaign: the round broke off: {type(exc).__name__}: {exc}"])
                close_campaign(campaign)
                campaign = fresh()
            results.append(result)
            record = {**asdict(result), "campaign_seed": seed, "code": os.environ.get("HOSTMAINT_CHAOS_CODE", "")}
            with (out / "rounds.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
            if result.violations or result.findings or not result.converged:
                with (out / "failing-seeds.txt").open("a") as f:
                    f.write(f"{round_seed}\t{scenario.op}\t{[x['kind'] for x in result.faults]}\t"
                            f"converged={result.converged}\tviolations={result.violations}\t"
                            f"findings={result.findings}\n")
            log(f"  -> {result.seconds:.0f} s, rc {result.first_rc} / re-run {result.rerun_rc}, "
                f"converged={result.converged}, injected="
                f"{[x['kind'] for x in result.faults if x['injected']]}"
                + "".join(f"\n     VIOLATION {v}" for v in result.violations)
                + "".join(f"\n     finding: {v}" for v in result.findings)
                + "".join(f"\n     note: {n}" for n in result.notes))
    finally:
        close_campaign(campaign)
    return results


def table(records: Sequence[dict[str, Any]]) -> str:
    """Per fault class: rounds where it was injected, faults injected, rounds with a violation, converged."""
    rows = []
    for kind in FAULT_CLASSES:
        hit = [r for r in records if any(f["kind"] == kind and f["injected"] for f in r["faults"])]
        injected = sum(1 for r in records for f in r["faults"] if f["kind"] == kind and f["injected"])
        missed = sum(1 for r in records for f in r["faults"] if f["kind"] == kind and not f["injected"])
        bad = sum(1 for r in hit if r["violations"])
        odd = sum(1 for r in hit if r.get("findings"))
        conv = sum(1 for r in hit if r["converged"])
        rows.append((kind, len(hit), injected, missed, bad, odd, f"{100 * conv / len(hit):.0f} %" if hit else "-"))
    lines = ["| fault class | rounds | faults injected | drawn, not injected | rounds with a violation "
             "| rounds with a finding | converged |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {k} | {n} | {i} | {m} | {b} | {o} | {c} |" for k, n, i, m, b, o, c in rows]
    total = sum(r[2] for r in rows)
    bad_rounds = sum(1 for r in records if r["violations"])
    odd_rounds = sum(1 for r in records if r.get("findings"))
    conv_all = sum(1 for r in records if r["converged"])
    lines.append(f"| **all** | {len(records)} | {total} | {sum(r[3] for r in rows)} | {bad_rounds} | {odd_rounds} | "
                 f"{100 * conv_all / len(records):.0f} % |" if records else "| **all** | 0 | 0 | 0 | 0 | 0 | - |")
    return "\n".join(lines)


def _default_prefect() -> Callable[[], PrefectSide]:
    # deployments/ holds the Prefect side (the core imports no Prefect); imported only when a campaign runs
    from importlib import import_module

    return import_module("deployments.chaos").LocalPrefect  # type: ignore[no-any-return]


def report(out: Path) -> tuple[str, bool]:
    """The table over ``out/rounds.jsonl``, and whether every round recorded there held and converged."""
    path = out / "rounds.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    text = table(records)
    failing = out / "failing-seeds.txt"
    if failing.exists():
        text += f"\nfailing round seeds: {failing}"
    return text, all(not r["violations"] and r["converged"] for r in records)


def main(argv: Sequence[str] | None = None, prefect: Callable[[], PrefectSide] | None = None) -> int:
    """benchmarks/chaos.py's command line (``hostmaint lab chaos`` has the same options)."""
    import argparse

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--minutes", type=float, default=None)
    parser.add_argument("--replay", type=int, nargs="+", default=[], help="run the rounds with these round seeds")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--out", type=Path, default=None, help="results directory (default WORKDIR/out)")
    parser.add_argument("--classes", default=",".join(FAULT_CLASSES), help="fault classes to draw from")
    parser.add_argument("--ops", default=",".join(OPS), help="maintenances to draw from")
    parser.add_argument("--faults", type=int, default=3, help="faults a round draws at most (1-8)")
    parser.add_argument("--report", action="store_true", help="print the table of OUT/rounds.jsonl and exit")
    args = parser.parse_args(argv)
    out = args.out or args.workdir / "out"
    if not args.report:
        classes = [c for c in args.classes.split(",") if c]
        ops = [o for o in args.ops.split(",") if o]
        bad = sorted(set(classes) - set(FAULT_CLASSES)) + sorted(set(ops) - set(OPS))
        if bad:
            parser.error(f"unknown fault class or op: {bad}")
        if args.rounds is None and args.minutes is None and not args.replay:
            parser.error("give --rounds, --minutes or --replay")
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # finally: the lab and the server go down
        run_campaign(args.seed, args.rounds, args.minutes, args.replay, args.workdir, out, classes, ops,
                     args.faults, prefect, log=lambda s: print(s, flush=True))
    text, ok = report(out)
    print(text)
    return 0 if ok else 1
