"""A SIMULATED host shell: answers, like a RHEL host would, the commands ``hostmaint.patching`` runs.

Nothing here touches a real host. Each simulated host has an rpm database, repositories with
newer versions, a running kernel and a boot id (``SimHostPackages``). ``dnf``/``yum``
(``--version``, ``check-update [--refresh]`` exiting 0/100, ``-y update`` with ``--exclude=``
and ``--security``), ``rpm -qa/-q --qf``, ``needs-restarting -r``, ``uname -r``/``-n``,
``grubby --default-kernel`` / ``--set-default``, ``df -Pm``, the boot id, ``systemctl --failed``,
and ``reboot`` are answered; a reboot takes the host down for ``reboot_delay_s`` of the injected
clock and brings it back with a new boot id running its boot default kernel (the newest, unless
one is pinned). Anything else exits 127, as on a host without that command. Options the real
tools would reject are rejected here too, so a wrong command line fails in the unit tests.

Per-host state is a plain dataclass of JSON values so the simulated fleet can persist it.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from hostmaint.errors import DriverError, TransientDriverError
from hostmaint.models import CommandResult
from hostmaint.rpm_version import evr_compare, newest_kernel, split_evr

KERNEL_NAMES = ("kernel-core", "kernel")
INSTALL_ONLY = frozenset({"kernel", "kernel-core", "kernel-modules", "kernel-modules-core"})
INSTALL_ONLY_LIMIT = 3  # dnf's default installonly_limit
# Packages after whose update needs-restarting -r asks for a reboot (its built-in list).
REBOOT_PACKAGES = frozenset({"kernel", "kernel-core", "kernel-rt", "glibc", "linux-firmware", "systemd",
                             "udev", "openssl-libs", "gnutls", "dbus", "dbus-broker"})
REPO = "sim-updates"


@dataclass
class SimHostPackages:
    """One simulated host's packages and boot state. Versions are ``[E:]V-R``; names carry no arch.

    ``available`` maps a name to the newer version the repositories offer (a name not installed
    is a new dependency the update pulls in). ``older`` keeps the previous versions of install-only
    packages (kernels). ``commands`` scripts answers for the inventory's checks, keyed by
    ``shlex.join(argv)``: ``[exit_code, stdout, stderr]``.
    """

    installed: dict[str, str]
    available: dict[str, str] = field(default_factory=dict)
    running_kernel: str = ""
    boot_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    down_until: float | None = None
    fail_update: bool = False
    reboot_delay_s: float = 3.0
    never_returns: bool = False
    arch: str = "x86_64"
    security: list[str] = field(default_factory=list)  # available updates that are security errata
    removes: list[str] = field(default_factory=list)  # packages the update obsoletes
    older: dict[str, list[str]] = field(default_factory=dict)
    package_managers: list[str] = field(default_factory=lambda: ["dnf", "yum"])
    pm_version: str = "4.14.0"
    free_mib: dict[str, int] = field(default_factory=lambda: {"/": 20000, "/var": 20000, "/boot": 800})
    repo_error: str | None = None
    needs_restart: bool = False  # a core library was updated since boot
    needs_restarting_installed: bool = True
    # a kernel the site pinned as the boot default (grubby --set-default; `uname -r` spelling); None: the
    # newest installed is the default, as kernel installs make it (UPDATEDEFAULT=yes)
    boot_pin: str | None = None
    has_grubby: bool = True
    nodename: str = ""  # what `uname -n` says; empty: the host's inventory name
    has_systemd: bool = True
    failed_units: list[str] = field(default_factory=list)
    commands: dict[str, list[int | str]] = field(default_factory=dict)
    # another dnf run (dnf-automatic) holds the package manager's lock for the next N commands that need
    # it: with exit_on_lock they exit 200 naming lock_pid, as dnf does (without it dnf would wait)
    lock_held_for: int = 0
    lock_pid: int = 4242
    reboots: int = 0
    log: list[str] = field(default_factory=list)  # every argv run, as shlex.join, for tests

    def __post_init__(self) -> None:
        if not self.running_kernel:
            kernels = self.kernels()
            self.running_kernel = newest_kernel(kernels) if kernels else "5.14.0-0.sim.x86_64"

    def versions(self, name: str) -> list[str]:
        """Every installed version of ``name``, oldest first."""
        if name not in self.installed:
            return []
        return [*self.older.get(name, []), self.installed[name]]

    def kernels(self) -> list[str]:
        """Installed kernels, spelled like ``uname -r``."""
        out: set[str] = set()
        for name in KERNEL_NAMES:
            for evr in self.versions(name):
                _, v, r = split_evr(evr)
                out.add(f"{v}-{r}.{self.arch}")
        return sorted(out)

    def boot_default(self) -> str:
        """The kernel the next boot brings: the pinned one while it is installed, else the newest."""
        kernels = self.kernels()
        if self.boot_pin is not None and self.boot_pin in kernels:
            return self.boot_pin
        return newest_kernel(kernels) if kernels else self.running_kernel

    def is_down(self, now: float) -> bool:
        return self.down_until is not None and (self.never_returns or now < self.down_until)


class _Usage(Exception):
    """A command line the real tool would reject."""


def _result(host: str, argv: Sequence[str], code: int, out: str = "", err: str = "") -> CommandResult:
    return CommandResult(host=host, argv=tuple(argv), exit_code=code, stdout=out, stderr=err)


class SimulatedShell:
    """A simulated ``HostShell`` over ``SimHostPackages``; time comes from the injected clock."""

    def __init__(self, hosts: dict[str, SimHostPackages],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.hosts = hosts
        self.clock = clock
        self._lock = threading.RLock()

    def close(self) -> None:
        """Nothing to drop: there are no connections."""

    def run(self, host: str, argv: Sequence[str], timeout: float = 60.0) -> CommandResult:
        """Answer ``argv`` as the simulated host would. Raises TransientDriverError while it is down."""
        argv = list(argv)
        if not argv:
            raise ValueError("empty argv")
        with self._lock:
            state = self.hosts.get(host)
            if state is None:
                raise TransientDriverError("no route to host (not in the simulated fleet)", host)
            if state.is_down(self.clock()):
                raise TransientDriverError("connection refused (simulated host is down)", host)
            if argv[:3] == ["sudo", "-n", "--"]:
                argv = argv[3:]
            state.log.append(shlex.join(argv))
            scripted = state.commands.get(shlex.join(argv))
            if scripted is not None:
                code, out, err = scripted
                return _result(host, argv, int(code), str(out), str(err))
            handler = _COMMANDS.get(argv[0])
            if handler is None:
                return _result(host, argv, 127, err=f"bash: line 1: {argv[0]}: command not found\n")
            try:
                return handler(self, host, state, argv)
            except _Usage as exc:
                return _result(host, argv, 1, err=f"{argv[0]}: {exc}\n")

    # --- commands --------------------------------------------------------------------

    def _package_manager(self, host: str, s: SimHostPackages, argv: list[str]) -> CommandResult:
        if argv[0] not in s.package_managers:
            return _result(host, argv, 127, err=f"bash: line 1: {argv[0]}: command not found\n")
        opts = {"yes": False, "refresh": False, "security": False, "quiet": False, "exit_on_lock": False}
        excludes: list[str] = []
        words: list[str] = []
        for a in argv[1:]:
            if a == "--version":
                return _result(host, argv, 0, out=f"{s.pm_version}\n  Installed: {argv[0]}\n")
            if a in ("-y", "--assumeyes"):
                opts["yes"] = True
            elif a in ("-q", "--quiet"):
                opts["quiet"] = True
            elif a == "--refresh":
                opts["refresh"] = True
            elif a == "--security":
                opts["security"] = True
            elif a.startswith("--setopt="):
                if "=" not in a.split("=", 1)[1]:
                    return _result(host, argv, 1, err=f"Error: Setopt argument has no value: {a}\n")
                opts["exit_on_lock"] = opts["exit_on_lock"] or a.lower() in ("--setopt=exit_on_lock=true",
                                                                             "--setopt=exit_on_lock=1")
            elif a.startswith("--exclude="):
                excludes.extend(g for g in a.split("=", 1)[1].split(",") if g)
            elif a.startswith("-"):
                return _result(host, argv, 2, err=f"usage: {argv[0]} [options] COMMAND\n"
                               f"{argv[0]}: error: unrecognized arguments: {a}\n")
            else:
                words.append(a)
        if not words:
            return _result(host, argv, 1, err="Error: No command given.\n")
        command = words[0]
        if command in ("check-update", "update", "upgrade", "clean") and s.lock_held_for > 0:
            if not opts["exit_on_lock"]:
                raise _Usage("the simulated lock is held and dnf would wait without end: give exit_on_lock")
            s.lock_held_for -= 1
            what = "RPMDB" if command in ("update", "upgrade") else "metadata"
            return _result(host, argv, 200, err=f"{what} already locked by {s.lock_pid}\n  The application "
                                                f"with PID {s.lock_pid} is: dnf-automatic\n")
        if command == "check-update":
            if s.repo_error:
                return _result(host, argv, 1, err=f"Error: Failed to download metadata for repo '{REPO}': "
                                                   f"{s.repo_error}\n")
            pending = self._pending(s, excludes, opts["security"])
            out = "".join(f"{name}.{s.arch:<40} {ver:<30} {REPO}\n" for name, ver in pending)
            if not opts["quiet"]:
                out = "Last metadata expiration check: 0:00:01 ago.\n" + ("\n" + out if out else "")
            return _result(host, argv, 100 if pending else 0, out=out)
        if command in ("update", "upgrade"):
            return self._update(host, s, argv, excludes, opts)
        if command == "clean":
            return _result(host, argv, 0, out="Cache was expired\n")
        return _result(host, argv, 1,
                       err=f"No such command: {command}. Please use /usr/bin/{argv[0]} --help\n")

    @staticmethod
    def _pending(s: SimHostPackages, excludes: list[str], security: bool) -> list[tuple[str, str]]:
        out = []
        for name, ver in sorted(s.available.items()):
            full = f"{name}.{s.arch}"
            if any(fnmatch.fnmatchcase(name, g) or fnmatch.fnmatchcase(full, g) for g in excludes):
                continue
            if security and name not in s.security:
                continue
            if name in s.installed and evr_compare(ver, s.installed[name]) <= 0:
                continue
            out.append((name, ver))
        return out

    def _update(self, host: str, s: SimHostPackages, argv: list[str], excludes: list[str],
                opts: dict[str, bool]) -> CommandResult:
        if s.repo_error:
            return _result(host, argv, 1, err=f"Error: Failed to download metadata for repo '{REPO}': "
                                               f"{s.repo_error}\n")
        pending = self._pending(s, excludes, opts["security"])
        if not pending:
            return _result(host, argv, 0, out="Dependencies resolved.\nNothing to do.\nComplete!\n")
        if not opts["yes"]:
            return _result(host, argv, 1, out="Is this ok [y/N]: ", err="Operation aborted.\n")
        if s.fail_update:
            name, ver = pending[0]
            return _result(host, argv, 1, out="Dependencies resolved.\nRunning transaction check\n",
                           err="Error: Transaction test error:\n"
                               f"  file /usr/lib64/lib{name}.so.1 from install of "
                               f"{name}-{ver}.{s.arch} conflicts with file from package "
                               f"{name}-compat-1.0-1.{s.arch}\n")
        upgraded, installed = [], []
        for name, ver in pending:
            if name in s.installed:
                if name in INSTALL_ONLY:
                    kept = [*s.older.get(name, []), s.installed[name]]
                    s.older[name] = kept[-(INSTALL_ONLY_LIMIT - 1):]
                    installed.append(f"{name}-{ver}.{s.arch}")
                else:
                    upgraded.append(f"{name}-{ver}.{s.arch}")
            else:
                installed.append(f"{name}-{ver}.{s.arch}")
            s.installed[name] = ver
            del s.available[name]
            if name in REBOOT_PACKAGES:
                s.needs_restart = True
        removed = [f"{n}-{s.installed.pop(n)}.{s.arch}" for n in s.removes if n in s.installed]
        s.removes = []
        out = "Dependencies resolved.\nRunning transaction\n"
        for title, items in (("Upgraded", upgraded), ("Installed", installed), ("Removed", removed)):
            if items:
                out += f"\n{title}:\n" + "".join(f"  {i}\n" for i in items)
        return _result(host, argv, 0, out=out + "\nComplete!\n")

    def _rpm(self, host: str, s: SimHostPackages, argv: list[str]) -> CommandResult:
        args = argv[1:]
        whatprovides = "--whatprovides" in args
        if whatprovides:
            args.remove("--whatprovides")
        if len(args) >= 3 and args[1] == "--qf" and args[0] in ("-qa", "-q"):
            fmt, names = args[2], args[3:]
        else:
            raise _Usage(f"unsupported by the simulation: {shlex.join(args)}")
        if args[0] == "-qa":
            if names or whatprovides:
                raise _Usage("-qa takes no package names here")
            names = sorted(s.installed)
        elif not names:
            raise _Usage("no arguments given for query")
        out, missing = [], 0
        for name in names:
            # a package provides its own name; kernel-core also provides "kernel", as on RHEL 8+
            providers = [name] if not whatprovides else \
                [p for p in sorted(s.installed) if p == name or (name == "kernel" and p in KERNEL_NAMES)]
            found = [(p, evr) for p in providers for evr in s.versions(p)]
            if not found:
                out.append(f"no package provides {name}\n" if whatprovides else f"package {name} is not installed\n")
                missing += 1
            out.extend(_queryformat(fmt, p, evr, s.arch) for p, evr in found)
        return _result(host, argv, missing if args[0] == "-q" else 0, out="".join(out))

    def _needs_restarting(self, host: str, s: SimHostPackages, argv: list[str]) -> CommandResult:
        if not s.needs_restarting_installed:
            return _result(host, argv, 127, err="bash: line 1: needs-restarting: command not found\n")
        if argv[1:] != ["-r"]:
            raise _Usage("the simulation answers only -r")
        kernels = s.kernels()
        stale = s.needs_restart or (bool(kernels) and s.boot_default() != s.running_kernel)
        if stale:
            return _result(host, argv, 1, out="Core libraries or services have been updated since boot-up:\n"
                           "  * kernel\n\nReboot is required to fully utilize these updates.\n"
                           "More information: https://access.redhat.com/solutions/27943\n")
        return _result(host, argv, 0, out="No core libraries or services have been updated since boot-up.\n"
                       "Reboot should not be necessary.\n")

    def _uname(self, host: str, s: SimHostPackages, argv: list[str]) -> CommandResult:
        if argv[1:] == ["-r"]:
            return _result(host, argv, 0, out=s.running_kernel + "\n")
        if argv[1:] == ["-n"]:
            return _result(host, argv, 0, out=(s.nodename or host) + "\n")
        return _result(host, argv, 0, out="Linux\n")

    def _cat(self, host: str, s: SimHostPackages, argv: list[str]) -> CommandResult:
        if argv[1:] == ["/proc/sys/kernel/random/boot_id"]:
            return _result(host, argv, 0, out=s.boot_id + "\n")
        return _result(host, argv, 1, err=f"cat: {' '.join(argv[1:])}: No such file or directory\n")

    def _df(self, host: str, s: SimHostPackages, argv: list[str]) -> CommandResult:
        if len(argv) != 3 or argv[1] != "-Pm":
            raise _Usage("the simulation answers only df -Pm PATH")
        path = argv[2]
        if path not in s.free_mib:
            return _result(host, argv, 1, err=f"df: {path}: No such file or directory\n")
        free = s.free_mib[path]
        header = "Filesystem     1048576-blocks  Used Available Capacity Mounted on\n"
        row = f"/dev/sim{len(path)}   {free + 1000} 1000 {free} 5% {path}\n"
        return _result(host, argv, 0, out=header + row)

    def _test(self, host: str, s: SimHostPackages, argv: list[str]) -> CommandResult:
        if argv[1:] == ["-d", "/run/systemd/system"]:
            return _result(host, argv, 0 if s.has_systemd else 1)
        return _result(host, argv, 1)

    def _systemctl(self, host: str, s: SimHostPackages, argv: list[str]) -> CommandResult:
        if not s.has_systemd:
            return _result(host, argv, 1,
                           err="System has not been booted with systemd as init system (PID 1).\n")
        if argv[1:2] == ["--failed"]:
            lines = "".join(f"{u} loaded failed failed {u}\n" for u in s.failed_units)
            return _result(host, argv, 0, out=lines)
        if argv[1:2] == ["is-active"] and len(argv) == 3:
            failed = argv[2] in s.failed_units or f"{argv[2]}.service" in s.failed_units
            return _result(host, argv, 3 if failed else 0, out="failed\n" if failed else "active\n")
        raise _Usage(f"unsupported by the simulation: {shlex.join(argv[1:])}")

    def _grubby(self, host: str, s: SimHostPackages, argv: list[str]) -> CommandResult:
        if not s.has_grubby:
            return _result(host, argv, 127, err="bash: line 1: grubby: command not found\n")
        if argv[1:] == ["--default-kernel"]:
            if not s.kernels():
                return _result(host, argv, 0)  # no boot entry to name
            return _result(host, argv, 0, out=f"/boot/vmlinuz-{s.boot_default()}\n")
        if len(argv) in (2, 3) and argv[1].split("=")[0] == "--set-default":
            path = argv[1].partition("=")[2] if len(argv) == 2 else argv[2]
            release = path.removeprefix("/boot/vmlinuz-")
            if release not in s.kernels():
                return _result(host, argv, 1, err=f"The param {path} is incorrect\n")
            s.boot_pin = release
            return _result(host, argv, 0, out=f"The default is /boot/loader/entries/{release}.conf with index 0 "
                                               f"and kernel {path}\n")
        raise _Usage("the simulation answers only --default-kernel and --set-default")

    def _reboot(self, host: str, s: SimHostPackages, argv: list[str]) -> CommandResult:
        s.running_kernel = s.boot_default()
        s.boot_id = str(uuid.uuid4())
        s.needs_restart = False
        s.down_until = self.clock() + s.reboot_delay_s
        s.reboots += 1
        # as on a real host, the session dies with sshd before an exit status is sent
        raise TransientDriverError("connection closed by remote host (simulated reboot)", host)

    @staticmethod
    def _true(host: str, argv: list[str]) -> CommandResult:
        return _result(host, argv, 0 if argv[0] == "true" else 1)


def _queryformat(fmt: str, name: str, evr: str, arch: str) -> str:
    epoch, version, release = split_evr(evr)
    tags = {"NAME": name, "ARCH": arch, "EPOCHNUM": str(epoch), "EPOCH": str(epoch) if epoch else "(none)",
            "VERSION": version, "RELEASE": release}

    def tag(m: re.Match[str]) -> str:
        key = m.group(1).upper()
        if key not in tags:
            raise DriverError(f"simulated rpm: unknown query tag {key}")
        return tags[key]

    text = re.sub(r"%\{([A-Za-z]+)\}", tag, fmt)
    return text.replace("\\t", "\t").replace("\\n", "\n")


_Handler = Callable[[SimulatedShell, str, SimHostPackages, list[str]], CommandResult]
_COMMANDS: dict[str, _Handler] = {
    "dnf": SimulatedShell._package_manager,
    "yum": SimulatedShell._package_manager,
    "rpm": SimulatedShell._rpm,
    "needs-restarting": SimulatedShell._needs_restarting,
    "uname": SimulatedShell._uname,
    "grubby": SimulatedShell._grubby,
    "cat": SimulatedShell._cat,
    "df": SimulatedShell._df,
    "test": SimulatedShell._test,
    "systemctl": SimulatedShell._systemctl,
    "reboot": SimulatedShell._reboot,
    "true": lambda shell, host, s, argv: SimulatedShell._true(host, argv),
    "false": lambda shell, host, s, argv: SimulatedShell._true(host, argv),
}
