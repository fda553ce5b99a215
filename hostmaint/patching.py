"""Patch steps over a HostShell: preflight, snapshot, update, diff, reboot decision, reboot, verify.

Each step is one function a task wraps; none imports Prefect, all take the shell (and, for
verify, the hypervisor) as parameters and return frozen results. A step that fails raises
``StepError(message, host=, step=)`` carrying what the host said; the task turns that into
"host stays cordoned, marked failed, reason in the audit". Connection trouble is left as
``TransientDriverError`` so the task's retries can handle it; every step here is safe to retry
(``dnf update`` converges, reads read).

Commands are argv lists; the shell quotes each element, so nothing here builds a shell string.
Package globs were validated at inventory load and are checked again before use.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable, Sequence
from functools import cmp_to_key

from tenacity import RetryCallState, Retrying, retry_if_result, stop_after_attempt, wait_fixed

from hostmaint.display import command_line, visible
from hostmaint.drivers.base import HostShell, Hypervisor
from hostmaint.errors import CommandError, DriverError, HostKeyError, StepError, TransientDriverError, without_host
from hostmaint.inventory import PACKAGE_PATTERN, HostPolicy
from hostmaint.models import Cell, CommandResult, Frozen, PackageManager, RebootPolicy, Step
from hostmaint.redaction import redact_text
from hostmaint.rpm_version import evr_compare, kernel_compare, newest_kernel

log = logging.getLogger(__name__)

# The exact commands, named so the simulated shell and the lab can answer them.
RPM_QUERYFORMAT = r"%{NAME}.%{ARCH}\t%{EPOCHNUM}:%{VERSION}-%{RELEASE}\n"
KERNEL_QUERYFORMAT = r"%{VERSION}-%{RELEASE}.%{ARCH}\n"  # the spelling of `uname -r`
# Capabilities a kernel package provides: RHEL 8+ kernel-core provides both, RHEL 7's kernel "kernel".
KERNEL_CAPABILITIES = ("kernel", "kernel-core")
BOOT_ID_ARGV = ("cat", "/proc/sys/kernel/random/boot_id")
REBOOT_ARGV = ("reboot",)
FREE_SPACE_PATHS = ("/", "/var", "/boot")
OPTIONAL_PATHS = frozenset({"/boot"})  # a host without a separate /boot directory is fine
CHECK_UPDATE_OK = (0, 100)  # dnf/yum: 0 nothing to do, 100 updates available, anything else an error

QUERY_TIMEOUT_S = 120.0
# dnf and yum given exit_on_lock exit at once when another run (dnf-automatic, an operator's) holds
# their lock, where they would otherwise wait without end and without a word to us: hostmaint waits
# itself, asking again every LOCK_POLL_S, within the policy's package_lock_wait_s
EXIT_ON_LOCK = "--setopt=exit_on_lock=True"
LOCKED_EXIT = 200  # dnf's exit code when exit_on_lock finds the lock held (dnf/cli/main.py)
LOCK_POLL_S = 10.0
# what they print then: dnf "RPMDB already locked by 7154" (also metadata, cachedir, log), yum 3
# "Existing lock /var/run/yum.pid: another copy is running as pid 7154." (matched text only: host
# output is never quoted further)
_LOCK_HELD = re.compile(r"\b(?:RPMDB|metadata|cachedir|log) already locked by \d+"
                        r"|Existing lock \S+: another copy is running as pid \d+")
REFRESH_TIMEOUT_S = 900.0
PROBE_TIMEOUT_S = 10.0


# --- results ----------------------------------------------------------------


class AvailableUpdate(Frozen):
    """One line of ``check-update``: ``name.arch``, the new version, its repository."""

    package: str
    version: str
    repo: str


class Preflight(Frozen):
    """What preflight found: the package manager to use, free space, the pending updates."""

    host: str
    package_manager: PackageManager
    package_manager_version: str
    free_mib: dict[str, int]
    updates: tuple[AvailableUpdate, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def legacy_yum(self) -> bool:
        """yum 3 (RHEL 7): no ``--refresh``; metadata is expired with ``yum clean expire-cache`` instead."""
        return self.package_manager is PackageManager.YUM and self.package_manager_version.startswith("3.")


class UpdateResult(Frozen):
    """The package manager's run: its argv, exit code and output, kept for the audit."""

    host: str
    argv: tuple[str, ...]
    exit_code: int
    stdout: str
    stderr: str
    seconds: float
    nothing_to_do: bool
    # what dnf/yum said each time another run held its lock before this one ran (waited LOCK_POLL_S each)
    lock_waits: tuple[str, ...] = ()


class PackageChange(Frozen):
    package: str
    old: str
    new: str


class PackageDiff(Frozen):
    """Installed / upgraded / removed packages between two snapshots, with versions."""

    installed: tuple[PackageChange, ...] = ()  # old is ""
    upgraded: tuple[PackageChange, ...] = ()  # includes downgrades and install-only additions
    removed: tuple[PackageChange, ...] = ()  # new is ""

    @property
    def empty(self) -> bool:
        return not (self.installed or self.upgraded or self.removed)

    def summary(self) -> str:
        return f"{len(self.installed)} installed, {len(self.upgraded)} upgraded, {len(self.removed)} removed"


class RebootDecision(Frozen):
    needed: bool
    reason: str
    running_kernel: str | None = None
    newest_kernel: str | None = None
    boot_kernel: str | None = None  # what the bootloader boots next (grubby --default-kernel), when it says


class RebootResult(Frozen):
    """A reboot seen through the boot id: ``down_after_s`` is None when it was never seen down."""

    host: str
    old_boot_id: str
    new_boot_id: str
    down_after_s: float | None
    back_after_s: float


class CheckResult(Frozen):
    """One verification check; ``skipped`` checks (n/a on this host) count as ok.

    ``warning``: ok, yet something the operator should know (a kernel reboot pending by policy).
    """

    name: str
    ok: bool
    detail: str
    skipped: bool = False
    warning: bool = False
    unanswered: bool = False  # failed because the host did not answer it (a daemon still starting, sshd down)


class VerifyReport(Frozen):
    host: str
    ok: bool
    checks: tuple[CheckResult, ...]

    @property
    def failures(self) -> tuple[CheckResult, ...]:
        return tuple(c for c in self.checks if not c.ok)

    @property
    def warnings(self) -> tuple[CheckResult, ...]:
        return tuple(c for c in self.checks if c.ok and c.warning)

    def reason(self) -> str:
        """One line naming every failed check, for StepError and the audit."""
        return "; ".join(f"{c.name}: {c.detail}" for c in self.failures) or "all checks passed"


# --- helpers ------------------------------------------------------------------


def _tail(text: str, lines: int = 30) -> str:
    kept = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join(kept[-lines:])


SAID_KEPT = 2000  # characters of a failed command's output that a message quotes: its end, where errors are


def _said(result: CommandResult) -> str:
    """What a failed command said: stderr first (dnf's errors), else stdout; its last 30 lines, of which
    the last :data:`SAID_KEPT` characters (masked before they are cut, so a cut cannot unmask a password):
    a host printing megabytes on one line must not make every message, state and report that quotes it as
    long."""
    said = _tail(result.stderr) or _tail(result.stdout) or "(no output)"
    if len(said) <= SAID_KEPT:
        return said
    masked = redact_text(said)
    return f"(... {len(masked) - SAID_KEPT} characters before) {masked[-SAID_KEPT:]}"


def _run(shell: HostShell, host: str, argv: Sequence[str], step: Step, timeout: float) -> CommandResult:
    """Run a command; a command timeout becomes a StepError for ``step``. Unreachable stays transient."""
    try:
        return shell.run(host, argv, timeout=timeout)
    except HostKeyError as exc:
        raise StepError(str(exc), host=host, step=step) from exc
    except CommandError as exc:
        raise StepError(f"{' '.join(argv)}: {without_host(exc, host)}", host=host, step=step) from exc


def lock_held(result: CommandResult) -> str | None:
    """What dnf/yum said when another run holds its lock (run with :data:`EXIT_ON_LOCK`): the matched
    words, e.g. "RPMDB already locked by 7154"; None when that is not why it failed.

    Only their lock exit code says so: the same words in the output of a run that failed otherwise
    (a scriptlet's, a repository's) must not make a failed transaction "busy", run again and
    reported as having changed nothing."""
    if result.exit_code != LOCKED_EXIT:
        return None
    found = _LOCK_HELD.search(f"{result.stderr}\n{result.stdout}")
    return found.group(0) if found else "its lock is held by another run"


def _run_when_unlocked(shell: HostShell, host: str, argv: Sequence[str], step: Step, timeout: float,
                       wait_s: float, sleep: Callable[[float], None] = time.sleep,
                       waits: list[str] | None = None) -> CommandResult:
    """Run a dnf/yum command; while another run holds the package manager's lock, ask again every
    :data:`LOCK_POLL_S` s for at most ``wait_s`` (each wait's words appended to ``waits``). Raises
    StepError naming the holder if it never frees (the command changed nothing: it stops before its
    transaction)."""
    polls = int(wait_s // LOCK_POLL_S)

    def waiting(state: RetryCallState) -> None:
        held = lock_held(state.outcome.result()) if state.outcome else None
        if waits is not None and held is not None:
            waits.append(held)
        log.info("%s: %s: %s; asking again in %gs (waiting up to %gs)", host, argv[0], visible(held), LOCK_POLL_S,
                 wait_s)

    retrying = Retrying(retry=retry_if_result(lambda res: lock_held(res) is not None),
                        stop=stop_after_attempt(polls + 1), wait=wait_fixed(LOCK_POLL_S), sleep=sleep,
                        before_sleep=waiting,
                        retry_error_callback=lambda state: state.outcome.result() if state.outcome else None)
    res: CommandResult = retrying(_run, shell, host, argv, step, timeout)
    held = lock_held(res)
    if held is not None:
        raise StepError(f"the package manager is busy: {argv[0]}: {held} (another dnf/yum run, e.g. "
                        f"dnf-automatic), still after {polls * LOCK_POLL_S:g}s of waiting (policy "
                        "package_lock_wait_s); this run changed no package", host=host, step=step)
    return res


def _checked_globs(globs: Sequence[str], host: str) -> list[str]:
    # Validated at inventory load; checked again because a HostPolicy can be built in code too.
    for g in globs:
        if not PACKAGE_PATTERN.match(g):
            raise StepError(f"exclude {g!r} is not a package name or glob", host=host, step=Step.UPDATE)
    return list(globs)


def _refresh_args() -> list[str]:
    """Fresh metadata, and an unreachable repository is an error rather than silently skipped.

    Some dnf builds (Debian's) default to ``skip_if_unavailable=True``: an unreachable repo then
    exits 0 with "nothing to do", and a host would be declared patched without having seen it.
    """
    return ["--refresh", "--setopt=skip_if_unavailable=False"]


def _filter_args(policy: HostPolicy, host: str) -> list[str]:
    args = [f"--exclude={g}" for g in _checked_globs(policy.excludes, host)]
    if policy.security_only:
        args.append("--security")
    return args


def parse_check_update(stdout: str) -> tuple[AvailableUpdate, ...]:
    """Parse ``dnf/yum check-update`` output: ``name.arch  version  repo`` lines.

    Long names wrap onto a second line; the "Obsoleting Packages" section and the
    metadata banner are not updates.
    """
    updates: list[AvailableUpdate] = []
    pending: list[str] = []
    for line in stdout.splitlines():
        if line.startswith("Obsoleting") or line.startswith("Security:"):
            break
        words = pending + line.split()
        if not words:
            continue
        if len(words) < 3:
            pending = words if len(words) == 1 and "." in words[0] else []
            continue
        pending = []
        name, version, repo = words[0], words[1], words[2]
        if "." not in name or not re.match(r"^[0-9]", version.split(":")[-1]):
            continue  # a banner such as "Last metadata expiration check: ..."
        updates.append(AvailableUpdate(package=name, version=version, repo=repo))
    return tuple(updates)


# --- 1. preflight -------------------------------------------------------------


def detect_package_manager(shell: HostShell, host: str,
                           preferred: PackageManager) -> tuple[PackageManager, str, str]:
    """The policy's package manager if it answers ``--version``, else the other one; (pm, version, note)."""
    other = PackageManager.YUM if preferred is PackageManager.DNF else PackageManager.DNF
    tried: list[str] = []
    for pm in (preferred, other):
        res = _run(shell, host, [pm.value, "--version"], Step.PREFLIGHT, PROBE_TIMEOUT_S)
        if res.exit_code == 0:
            version = (res.stdout.strip().splitlines() or ["unknown"])[0].strip()
            note = "" if pm is preferred else f"{preferred.value} not found ({tried[0]}); using {pm.value}"
            return pm, version, note
        tried.append(f"{pm.value} --version exit {res.exit_code}")
    raise StepError(f"no package manager: {'; '.join(tried)}", host=host, step=Step.PREFLIGHT)


def free_space(shell: HostShell, host: str, paths: Sequence[str] = FREE_SPACE_PATHS) -> dict[str, int]:
    """Available MiB on the filesystem holding each path (``df -Pm``); a missing /boot is left out."""
    free: dict[str, int] = {}
    for path in paths:
        res = _run(shell, host, ["df", "-Pm", path], Step.PREFLIGHT, PROBE_TIMEOUT_S)
        if res.exit_code != 0:
            if path in OPTIONAL_PATHS and "No such file" in res.stderr:
                continue
            raise StepError(f"df -Pm {path} failed (exit {res.exit_code}): {_said(res)}",
                            host=host, step=Step.PREFLIGHT)
        rows = [ln for ln in res.stdout.strip().splitlines()[1:] if ln.strip()]
        available = _df_available(rows[-1]) if rows else None
        if available is None:
            raise StepError(f"df -Pm {path}: unexpected output {res.stdout.strip()[:300]!r}",
                            host=host, step=Step.PREFLIGHT)
        free[path] = available
    return free


_DF_NUMBERS = re.compile(r"\s(\d+)\s+(\d+)\s+(\d+)\s+(\d+)%\s")


def _df_available(row: str) -> int | None:
    """Available MiB from a ``df -P`` row: ``Filesystem 1M-blocks Used Available Capacity Mounted-on``.

    Found as the four numbers ending in the capacity's ``%``, not by counting words from either
    end: a mount point (or a device) may contain spaces.
    """
    match = _DF_NUMBERS.search(row + " ")
    return int(match.group(3)) if match else None


def check_updates(shell: HostShell, host: str, pm: PackageManager, policy: HostPolicy, *,
                  legacy_yum: bool = False) -> tuple[AvailableUpdate, ...]:
    """Refresh metadata and list pending updates (policy excludes and security filter applied).

    ``--refresh`` matters: without it dnf can miss a package added to a repo within the
    metadata's expiry (seen in the lab). yum 3 has no ``--refresh``; its cache is expired first.
    """
    wait = policy.package_lock_wait_s
    if legacy_yum:
        res = _run_when_unlocked(shell, host, ["yum", EXIT_ON_LOCK, "clean", "expire-cache"], Step.PREFLIGHT,
                                 QUERY_TIMEOUT_S, wait)
        if res.exit_code != 0:
            raise StepError(f"yum clean expire-cache failed (exit {res.exit_code}): {_said(res)}",
                            host=host, step=Step.PREFLIGHT)
        argv = ["yum", "-q", EXIT_ON_LOCK, "check-update", *_filter_args(policy, host)]
    else:
        argv = [pm.value, "-q", EXIT_ON_LOCK, "check-update", *_refresh_args(), *_filter_args(policy, host)]
    res = _run_when_unlocked(shell, host, argv, Step.PREFLIGHT, min(REFRESH_TIMEOUT_S, policy.update_timeout_s),
                             wait)
    if res.exit_code not in CHECK_UPDATE_OK:
        raise StepError(f"repositories not reachable: {' '.join(argv)} exit {res.exit_code}: {_said(res)}",
                        host=host, step=Step.PREFLIGHT)
    return parse_check_update(res.stdout) if res.exit_code == 100 else ()


def precheck(shell: HostShell, host: str, policy: HostPolicy) -> Preflight:
    """What can be known before a VM moves: the host answers over SSH with a key we trust, its
    package manager is there and it has the free space the policy asks for. Cheap (no repository
    is asked). Raises StepError naming the problem."""
    pm, version, note = detect_package_manager(shell, host, policy.package_manager)
    free = free_space(shell, host)
    low = [f"{path} has {mib} MiB free, policy needs {policy.min_free_mib} MiB"
           for path, mib in free.items() if mib < policy.min_free_mib]
    if low:
        raise StepError("not enough free space: " + "; ".join(low), host=host, step=Step.PREFLIGHT)
    return Preflight(host=host, package_manager=pm, package_manager_version=version, free_mib=free,
                     notes=(note,) if note else ())


def preflight(shell: HostShell, host: str, policy: HostPolicy) -> Preflight:
    """Step 1: package manager present, enough free space, repositories reachable, updates listed.

    Raises StepError naming every problem found (space on each mount, or the repo error's stderr).
    """
    result = precheck(shell, host, policy)
    updates = check_updates(shell, host, result.package_manager, policy, legacy_yum=result.legacy_yum)
    return result.model_copy(update={"updates": updates})


# --- 2. snapshot ---------------------------------------------------------------


def installed_packages(shell: HostShell, host: str) -> dict[str, str]:
    """Step 2: ``name.arch`` → ``epoch:version-release`` of every installed package.

    Install-only packages (kernels) have several versions at once; they are listed oldest
    first, joined by ", ", so a diff shows a new kernel next to the old.
    """
    res = _run(shell, host, ["rpm", "-qa", "--qf", RPM_QUERYFORMAT], Step.SNAPSHOT, QUERY_TIMEOUT_S)
    if res.exit_code != 0:
        raise StepError(f"rpm -qa failed (exit {res.exit_code}): {_said(res)}", host=host, step=Step.SNAPSHOT)
    versions: dict[str, list[str]] = {}
    for line in res.stdout.splitlines():
        name, sep, evr = line.partition("\t")
        if sep and name and evr:
            versions.setdefault(name.strip(), []).append(evr.strip())
    return {name: ", ".join(sorted(vs, key=cmp_to_key(evr_compare))) for name, vs in sorted(versions.items())}


# --- 3. update -----------------------------------------------------------------


def update_argv(pm: PackageManager, policy: HostPolicy, host: str = "") -> list[str]:
    """``dnf -y --setopt=exit_on_lock=True update --refresh [--exclude=G ...] [--security]``; each element
    stays one argument.

    dnf refreshes its metadata first, so the update sees what preflight saw even when it runs
    without a preflight (a retry) or the cache expired meanwhile. ``yum`` gets no ``--refresh``:
    yum 3 does not know it, and preflight already expired its cache.
    """
    refresh = _refresh_args() if pm is PackageManager.DNF else []
    return [pm.value, "-y", EXIT_ON_LOCK, "update", *refresh, *_filter_args(policy, host)]


def apply_updates(shell: HostShell, host: str, policy: HostPolicy,
                  package_manager: PackageManager | None = None,
                  sleep: Callable[[float], None] = time.sleep) -> UpdateResult:
    """Step 3: run the update with the policy's excludes and security filter; capture the output.

    ``package_manager`` is what preflight found (defaults to the policy's). Another run holding the
    package manager's lock is waited for (``policy.package_lock_wait_s``, ``sleep`` between asks).
    Raises StepError with what the package manager said when it exits non-zero or times out.
    """
    pm = package_manager or policy.package_manager
    argv = update_argv(pm, policy, host)
    log.info("%s: running %s", host, command_line(argv))
    waits: list[str] = []
    res = _run_when_unlocked(shell, host, argv, Step.UPDATE, policy.update_timeout_s, policy.package_lock_wait_s,
                             sleep, waits)
    if res.exit_code != 0:
        raise StepError(f"{pm.value} update failed (exit {res.exit_code}): {_said(res)}",
                        host=host, step=Step.UPDATE)
    nothing = "Nothing to do" in res.stdout or "No packages marked for update" in res.stdout
    return UpdateResult(host=host, argv=tuple(argv), exit_code=res.exit_code, stdout=res.stdout,
                        stderr=res.stderr, seconds=res.seconds, nothing_to_do=nothing, lock_waits=tuple(waits))


# --- 4. diff -------------------------------------------------------------------


def package_diff(before: dict[str, str], after: dict[str, str]) -> PackageDiff:
    """Step 4: what the update changed, from two ``installed_packages`` snapshots. Pure."""
    installed = [PackageChange(package=p, old="", new=after[p]) for p in sorted(after.keys() - before.keys())]
    removed = [PackageChange(package=p, old=before[p], new="") for p in sorted(before.keys() - after.keys())]
    upgraded = [PackageChange(package=p, old=before[p], new=after[p])
                for p in sorted(before.keys() & after.keys()) if before[p] != after[p]]
    return PackageDiff(installed=tuple(installed), upgraded=tuple(upgraded), removed=tuple(removed))


# --- 5. reboot decision -----------------------------------------------------------


# a kernel release as `uname -r` and rpm spell it (5.14.0-427.el9.x86_64, 6.1.0-18-amd64): anything else a
# host prints where one is expected (a second line, spaces, escapes) is not one, and is never compared
KERNEL_RELEASE = re.compile(r"[A-Za-z0-9._+~^-]{1,255}")


def running_kernel(shell: HostShell, host: str, step: Step = Step.REBOOT_DECISION) -> str:
    """The running kernel's release (``uname -r``); StepError when the host says anything but one."""
    res = _run(shell, host, ["uname", "-r"], step, PROBE_TIMEOUT_S)
    if res.exit_code != 0 or not res.stdout.strip():
        raise StepError(f"uname -r failed (exit {res.exit_code}): {_said(res)}", host=host, step=step)
    release = res.stdout.strip()
    if not KERNEL_RELEASE.fullmatch(release):
        raise StepError(f"uname -r: expected one kernel release, got {release[:80]!r}", host=host, step=step)
    return release


def installed_kernels(shell: HostShell, host: str, step: Step = Step.REBOOT_DECISION) -> tuple[str, ...]:
    """Installed kernels spelled like ``uname -r``; empty only when rpm says nothing provides a kernel.

    Asked by capability (``rpm -q --whatprovides kernel kernel-core``), so any kernel flavour that
    provides ``kernel`` counts, whatever its package name. rpm exits with the number of capabilities
    nobody provides and prints "no package provides X" for each. Any answer that does not add up is
    a StepError naming the command, never a shorter list: a partial list (rpm killed by a signal,
    which the SSH driver reports as exit -1) would make verify say "running the newest kernel" and
    the reboot decision say "no reboot" about a host that has a newer one installed.
    """
    argv = ["rpm", "-q", "--whatprovides", "--qf", KERNEL_QUERYFORMAT, *KERNEL_CAPABILITIES]
    command = f"{' '.join(argv[:3])} {' '.join(KERNEL_CAPABILITIES)}"
    res = _run(shell, host, argv, step, QUERY_TIMEOUT_S)

    def broken(why: str) -> StepError:
        return StepError(f"{command}: {why}", host=host, step=step)

    if res.exit_code < 0:
        raise broken(f"exit {res.exit_code}: killed by a signal or its exit status was lost, so its list "
                     f"may be partial: {_said(res)}")
    if res.exit_code > len(KERNEL_CAPABILITIES) or (res.exit_code and res.stderr.strip()):
        raise broken(f"failed (exit {res.exit_code}): {_said(res)}")
    kernels: set[str] = set()
    unprovided = 0
    for line in res.stdout.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("no package provides "):
            unprovided += 1
        elif not KERNEL_RELEASE.fullmatch(line):
            # not a `uname -r` spelling: a message this parser does not know (another locale, a warning)
            raise broken(f"unexpected output line {line[:80]!r}")
        else:
            kernels.add(line)
    if unprovided != res.exit_code:
        raise broken(f"exit {res.exit_code} but {unprovided} 'no package provides' line(s): output is incomplete")
    if not kernels and unprovided < len(KERNEL_CAPABILITIES):
        raise broken(f"exit {res.exit_code} says a package provides a kernel, but no kernel was listed")
    return tuple(sorted(kernels))


_VMLINUZ = "/boot/vmlinuz-"


def _not_installed(res: CommandResult) -> bool:
    """The command does not exist there: the shell's 127, or sudo's "command not found" (exit 1)."""
    return res.exit_code == 127 or (res.exit_code == 1 and "command not found" in res.stderr
                                    and res.stderr.lstrip().startswith("sudo:"))


def boot_kernel(shell: HostShell, host: str, step: Step = Step.REBOOT_DECISION) -> str | None:
    """The kernel the host's bootloader boots next (``grubby --default-kernel``), spelled like ``uname -r``.

    None when the host has no grubby (exit 127) or it names no default: the newest installed kernel
    is then what a reboot is expected to bring. A site may pin an older kernel (``grubby
    --set-default``, ``UPDATEDEFAULT=no``) after a regression; expecting the newest there would call
    every correct boot of such a host a failure and keep it out of service. Output that is not one
    ``/boot/vmlinuz-<release>`` path is a StepError naming the host (its text is data, never trusted).
    """
    res = _run(shell, host, ["grubby", "--default-kernel"], step, PROBE_TIMEOUT_S)
    if _not_installed(res):
        return None
    if res.exit_code != 0:
        raise StepError(f"grubby --default-kernel failed (exit {res.exit_code}): {_said(res)}", host=host, step=step)
    lines = [ln.strip() for ln in res.stdout.splitlines() if ln.strip()]
    if not lines:
        return None
    release = lines[0].removeprefix(_VMLINUZ)
    if len(lines) != 1 or not lines[0].startswith(_VMLINUZ) or not KERNEL_RELEASE.fullmatch(release):
        raise StepError(f"grubby --default-kernel: expected one {_VMLINUZ}<release> line, got "
                        f"{_tail(res.stdout, 3)[:200]!r}", host=host, step=step)
    return release


MAX_NAME = 255  # a DNS name has at most 253 characters, a kernel's nodename 64: longer is no machine's name


def nodename(shell: HostShell, host: str, step: Step = Step.PRECHECK) -> str:
    """The name the machine SSH reaches gives itself (``uname -n``); StepError when it says no one name."""
    res = _run(shell, host, ["uname", "-n"], step, PROBE_TIMEOUT_S)
    words = res.stdout.split()
    if res.exit_code != 0 or len(words) != 1 or len(words[0]) > MAX_NAME:
        raise StepError(f"uname -n: expected the machine's name (exit 0, one word of at most {MAX_NAME} "
                        f"characters), got exit {res.exit_code}: {_said(res)}", host=host, step=step)
    return words[0]


def canonical_name(shell: HostShell, host: str, step: Step = Step.PRECHECK) -> str | None:
    """The machine's name as its own resolver canonicalises it (``hostname -f``), as libvirt does; None
    when it cannot say (no such command, no answer, not one word)."""
    res = _run(shell, host, ["hostname", "-f"], step, PROBE_TIMEOUT_S)
    words = res.stdout.split()
    return words[0] if res.exit_code == 0 and len(words) == 1 and len(words[0]) <= MAX_NAME else None


# the names a machine has before anyone named it (a fresh install's localhost.localdomain, a kernel's
# "(none)"): every such machine has them, so they cannot say which machine answered
UNNAMED = frozenset({"localhost", "localhost4", "localhost6", "(none)", ""})


def _labels(name: str) -> list[str]:
    return name.strip().rstrip(".").lower().split(".")


def names_a_machine(name: str) -> bool:
    """Whether ``name`` (``uname -n``, libvirt's hostname) could tell one machine from another."""
    return _labels(name)[0] not in UNNAMED


def same_name(a: str, b: str) -> bool:
    """Whether two spellings are one name: case and a trailing dot aside, every label."""
    return _labels(a) == _labels(b)


def same_machine(ssh_name: str, libvirt_name: str) -> bool:
    """Whether two names a machine gave itself are one: libvirt may add the domain (its hostname is
    canonicalised through DNS), ``uname -n`` may not, so the first labels are compared, in any case;
    when both carry a domain the whole names are (hv01.dc1 and hv01.dc2 are two machines). A name that
    names no machine (:data:`UNNAMED`) is the same as none."""
    a, b = _labels(ssh_name), _labels(libvirt_name)
    if not (names_a_machine(ssh_name) and names_a_machine(libvirt_name)) or a[0] != b[0]:
        return False
    return len(a) == 1 or len(b) == 1 or a == b


def reboot_decision(shell: HostShell, host: str, policy: HostPolicy) -> RebootDecision:
    """Step 5: reboot or not, with the reason.

    if-needed = ``needs-restarting -r`` exits 1, or the kernel a reboot would bring (the bootloader's
    default, else the newest installed) is not the running one.
    """
    if policy.reboot is RebootPolicy.ALWAYS:
        return RebootDecision(needed=True, reason="policy: always reboot")
    if policy.reboot is RebootPolicy.NEVER:
        return RebootDecision(needed=False, reason="policy: never reboot")
    running = running_kernel(shell, host)
    kernels = installed_kernels(shell, host)
    top = newest_kernel(kernels) if kernels else None
    default = boot_kernel(shell, host)
    reasons: list[str] = []
    if default is not None and default != running:
        reasons.append(f"the boot default kernel {default} is not the running {running}")
    elif default is None and top is not None and top != running:
        reasons.append(f"newest installed kernel {top} is not the running {running}")
    res = _run(shell, host, ["needs-restarting", "-r"], Step.REBOOT_DECISION, QUERY_TIMEOUT_S)
    if res.exit_code < 0:
        # killed mid-way, it may have been about to say "reboot": that is no answer, not "unavailable"
        raise StepError(f"needs-restarting -r: exit {res.exit_code}: killed by a signal or its exit status "
                        f"was lost: {_said(res)}", host=host, step=Step.REBOOT_DECISION)
    if res.exit_code == 1:
        said = next((ln.strip() for ln in res.stdout.splitlines() if ln.strip()), "reboot required")
        reasons.append(f"needs-restarting -r: {said}")
    elif res.exit_code != 0:
        # not installed (127) or broken: the kernel comparison alone decides, and the reason says so
        note = f"needs-restarting unavailable (exit {res.exit_code})"
        if reasons:
            reasons.append(note)
        else:
            return RebootDecision(needed=False, reason=f"running kernel is {_expected(default)}; {note}",
                                  running_kernel=running, newest_kernel=top, boot_kernel=default)
    if reasons:
        return RebootDecision(needed=True, reason="; ".join(reasons),
                              running_kernel=running, newest_kernel=top, boot_kernel=default)
    return RebootDecision(needed=False, reason=f"no reboot needed: running kernel is {_expected(default)} and "
                          "needs-restarting -r says no", running_kernel=running, newest_kernel=top,
                          boot_kernel=default)


def _expected(default: str | None) -> str:
    return "the newest" if default is None else "the boot default"


# --- 6. reboot ------------------------------------------------------------------


_BOOT_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)


def parse_boot_id(stdout: str, host: str) -> str:
    """The boot id in ``stdout`` (the kernel's UUID, whitespace around it ignored), lower case.

    Anything else is a StepError showing a short excerpt: "the boot id changed" is how a reboot is
    seen, so a login banner or an error text on stdout must never pass for a new boot id.
    """
    text = stdout.strip()
    if _BOOT_ID.fullmatch(text):
        return text.lower()
    excerpt = repr(text[:60]) + (f" ... ({len(text)} characters)" if len(text) > 60 else "")
    raise StepError(f"{' '.join(BOOT_ID_ARGV)} printed {excerpt}, not a boot id (a UUID); "
                    "is something (a login banner, a shell profile) writing to stdout?", host=host, step=Step.REBOOT)


def read_boot_id(shell: HostShell, host: str, timeout: float = PROBE_TIMEOUT_S) -> str:
    """The host's boot id. Raises TransientDriverError/CommandError when it cannot be read, and
    StepError when what the host printed is not a boot id."""
    res = shell.run(host, BOOT_ID_ARGV, timeout=timeout)
    if res.exit_code != 0 or not res.stdout.strip():
        raise TransientDriverError(f"boot id unreadable (exit {res.exit_code})", host=host)
    return parse_boot_id(res.stdout, host)


def reboot_and_wait(shell: HostShell, host: str, policy: HostPolicy, *,
                    clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                    poll_s: float = 1.0, before_issue: Callable[[str], None] | None = None) -> RebootResult:
    """Step 6: reboot, see the host go down, wait for it back with a new boot id.

    The reboot command may return, lose its connection or time out: all three mean "issued".
    Only an explicit non-zero exit (reboot refused) fails at once. Raises StepError when the
    boot id has not changed within ``policy.reboot_timeout_s`` (the host never came back, or
    never went down), and at once when the host answers with something that is not a boot id
    (before the reboot, nothing is rebooted then). ``before_issue`` gets the boot id before the
    reboot is asked for, so a caller can keep it where a run that dies meanwhile finds it.
    """
    try:
        old = read_boot_id(shell, host)
    except HostKeyError as exc:
        raise StepError(str(exc), host=host, step=Step.REBOOT) from exc
    except DriverError as exc:
        raise StepError(f"cannot read boot id before reboot: {without_host(exc, host)}", host=host,
                        step=Step.REBOOT) from exc
    if before_issue is not None:
        before_issue(old)
    start = clock()
    log.info("%s: rebooting (boot id %s)", host, old)
    try:
        res = shell.run(host, REBOOT_ARGV, timeout=PROBE_TIMEOUT_S)
        # -1: the session was killed by the shutdown before reporting an exit status
        if res.exit_code not in (0, -1):
            raise StepError(f"reboot refused (exit {res.exit_code}): {_said(res)}",
                            host=host, step=Step.REBOOT)
    except (TransientDriverError, CommandError) as exc:
        log.info("%s: connection dropped by reboot as expected (%s)", host, type(exc).__name__)
    return wait_for_new_boot(shell, host, policy, old, start, clock=clock, sleep=sleep, poll_s=poll_s)


def wait_for_new_boot(shell: HostShell, host: str, policy: HostPolicy, old: str, start: float, *,
                      clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                      poll_s: float = 1.0) -> RebootResult:
    """Wait until ``host`` answers with a boot id other than ``old``, at most ``policy.reboot_timeout_s``
    from ``start`` (a ``clock()`` reading); raises StepError as :func:`reboot_and_wait` does."""
    deadline = start + policy.reboot_timeout_s
    down_after: float | None = None
    answers_old_since: float | None = None  # answering again with ``old`` after it was seen down, since
    last_error = ""
    while True:
        now = clock()
        if now >= deadline:
            break
        try:
            current = read_boot_id(shell, host, timeout=max(0.1, min(PROBE_TIMEOUT_S, deadline - now)))
        except HostKeyError as exc:
            raise StepError(f"after reboot: {without_host(exc, host)}", host=host, step=Step.REBOOT) from exc
        except (TransientDriverError, CommandError) as exc:
            last_error = str(exc)
            answers_old_since = None
            if down_after is None:
                down_after = clock() - start
                log.info("%s: down after %.1fs", host, down_after)
        else:
            if current != old:
                back = clock() - start
                log.info("%s: back after %.1fs with boot id %s", host, back, current)
                return RebootResult(host=host, old_boot_id=old, new_boot_id=current,
                                    down_after_s=down_after, back_after_s=back)
            if down_after is not None and answers_old_since is None:
                answers_old_since = clock() - start
                log.info("%s: answers again after %.1fs, with its old boot id %s", host, answers_old_since, old)
        sleep(max(0.0, min(poll_s, deadline - clock())))
    if down_after is None:
        raise StepError(f"host did not reboot: boot id still {old} after {policy.reboot_timeout_s:g}s",
                        host=host, step=Step.REBOOT)
    if answers_old_since is not None:
        # a soft reboot, or only its network or sshd restarted: up again, on the kernel it ran before
        raise StepError(f"host did not reboot: it stopped answering after {down_after:.1f}s, answers again "
                        f"since {answers_old_since:.1f}s with the same boot id {old}, still after "
                        f"{policy.reboot_timeout_s:g}s (a soft reboot, or only its network or sshd restarted)",
                        host=host, step=Step.REBOOT)
    raise StepError(f"host went down after {down_after:.1f}s and did not come back within "
                    f"{policy.reboot_timeout_s:g}s (last error: {last_error})", host=host, step=Step.REBOOT)


# --- 7. verify ------------------------------------------------------------------


def _check(name: str, fn: Callable[[], CheckResult]) -> CheckResult:
    """Run one check; a driver error is that check's failure, not the report's."""
    try:
        return fn()
    except TransientDriverError as exc:
        return CheckResult(name=name, ok=False, detail=str(exc), unanswered=True)
    except (DriverError, StepError) as exc:
        return CheckResult(name=name, ok=False, detail=str(exc))


def check_kernel(shell: HostShell, host: str, reboot: RebootPolicy = RebootPolicy.IF_NEEDED) -> CheckResult:
    """The host runs the kernel its bootloader boots (``grubby --default-kernel``), else its newest installed.

    A boot default older than the newest installed is a pin the site chose: the check passes with a
    warning naming both. Running anything but the boot default (a fallback boot after the new kernel
    failed) fails. Under ``reboot: never`` the host keeps its old kernel on purpose, so a *newer*
    kernel to boot than the running one is a warning ("reboot pending by policy"), not a failure:
    failing it would mark a correctly patched host failed and keep its VMs away. Any other mismatch
    (running a kernel newer than every installed one) still fails, under every policy.
    """
    kernels = installed_kernels(shell, host, Step.VERIFY)
    default = boot_kernel(shell, host, Step.VERIFY)
    if not kernels and default is None:
        return CheckResult(name="kernel", ok=True, skipped=True, detail="n/a: no kernel package installed")
    running = running_kernel(shell, host, Step.VERIFY)
    top = newest_kernel(kernels) if kernels else default
    expected = default if default is not None else top
    assert expected is not None and top is not None  # one of them is known, see above
    what = "the newest kernel" if default is None else "the boot default kernel"
    if running == expected:
        if default is not None and top != default and kernel_compare(top, default) > 0:
            return CheckResult(name="kernel", ok=True, warning=True,
                               detail=f"running the boot default kernel {running}; newer kernel {top} installed "
                                      "and not the boot default (pinned: grubby --set-default)")
        return CheckResult(name="kernel", ok=True, detail=f"running {what} {running}")
    if reboot is RebootPolicy.NEVER and kernel_compare(expected, running) > 0:
        newer = (f"newer kernel {expected} installed, still running {running}" if default is None else
                 f"the boot default kernel {default} is newer than the running {running}")
        return CheckResult(name="kernel", ok=True, warning=True,
                           detail=f"{newer}: reboot pending by policy (reboot: never)")
    if default is not None:
        return CheckResult(name="kernel", ok=False, detail=f"running {running}, boot default kernel is {default}")
    return CheckResult(name="kernel", ok=False, detail=f"running {running}, newest installed is {top}")


def check_libvirtd(hypervisor: Hypervisor, host: str) -> CheckResult:
    vms = hypervisor.running_vms(host)
    return CheckResult(name="libvirtd", ok=True, detail=f"libvirtd answers; {len(vms)} running VM(s)")


def _cell_shape(cells: Sequence[Cell]) -> dict[int, tuple[tuple[int, ...], int]]:
    return {c.id: (tuple(sorted(c.cpus)), c.memory_mib) for c in cells}


def check_numa(hypervisor: Hypervisor, host: str, cells_before: Sequence[Cell]) -> CheckResult:
    before = _cell_shape(cells_before)
    after = _cell_shape(hypervisor.discover(host).cells)
    if before == after:
        return CheckResult(name="numa", ok=True, detail=f"{len(after)} cell(s) unchanged")
    diffs = []
    for cid in sorted(before.keys() | after.keys()):
        b, a = before.get(cid), after.get(cid)
        if b is None:
            diffs.append(f"cell {cid} appeared")
        elif a is None:
            diffs.append(f"cell {cid} is gone")
        else:
            if b[0] != a[0]:
                diffs.append(f"cell {cid} cpus {list(b[0])} -> {list(a[0])}")
            if b[1] != a[1]:
                diffs.append(f"cell {cid} memory {b[1]} -> {a[1]} MiB")
    return CheckResult(name="numa", ok=False, detail="topology changed: " + "; ".join(diffs))


MAX_UNITS_SHOWN = 20  # failed units a check's detail names (the rest counted): it becomes a state's reason


def check_systemd(shell: HostShell, host: str) -> CheckResult:
    probe = shell.run(host, ["test", "-d", "/run/systemd/system"], timeout=PROBE_TIMEOUT_S)
    if probe.exit_code not in (0, 1):
        # test says 0 or 1; anything else (killed by a signal: -1) is no answer, and must not skip the check
        return CheckResult(name="systemd", ok=False,
                           detail=f"test -d /run/systemd/system: exit {probe.exit_code}: {_said(probe)}")
    if probe.exit_code == 1:
        return CheckResult(name="systemd", ok=True, skipped=True, detail="n/a: host does not run systemd")
    res = shell.run(host, ["systemctl", "--failed", "--no-legend", "--plain"], timeout=QUERY_TIMEOUT_S)
    if res.exit_code != 0:
        return CheckResult(name="systemd", ok=False,
                           detail=f"systemctl --failed exit {res.exit_code}: {_said(res)}")
    units = [ln.split()[0] for ln in res.stdout.splitlines() if ln.split()]
    if units:
        shown = ", ".join(u[:MAX_NAME] for u in units[:MAX_UNITS_SHOWN])
        more = f" and {len(units) - MAX_UNITS_SHOWN} more" if len(units) > MAX_UNITS_SHOWN else ""
        return CheckResult(name="systemd", ok=False, detail=f"failed units: {shown}{more}")
    return CheckResult(name="systemd", ok=True, detail="no failed units")


def verify_host(shell: HostShell, hypervisor: Hypervisor, host: str, policy: HostPolicy, *,
                cells_before: Sequence[Cell] | None = None) -> VerifyReport:
    """Step 7: every check runs and is reported; ``ok`` is False when any failed. Never raises for a check.

    Checks: the newest kernel runs (under ``reboot: never`` a newer one installed is a warning, see
    ``check_kernel``); libvirtd answers; NUMA cells (ids, cpus, memory) are those
    seen before maintenance; no failed systemd units (where systemd runs); the inventory's checks.
    """
    checks = [
        _check("kernel", lambda: check_kernel(shell, host, policy.reboot)),
        _check("libvirtd", lambda: check_libvirtd(hypervisor, host)),
    ]
    if cells_before is None:
        checks.append(CheckResult(name="numa", ok=True, skipped=True,
                                  detail="n/a: no topology recorded before maintenance"))
    else:
        checks.append(_check("numa", lambda: check_numa(hypervisor, host, cells_before)))
    checks.append(_check("systemd", lambda: check_systemd(shell, host)))
    for vc in policy.verify:
        checks.append(_check(vc.name, functools.partial(_inventory_check, shell, host, vc.argv, vc.expect_exit,
                                                        vc.timeout_s, vc.name)))
    return VerifyReport(host=host, ok=all(c.ok for c in checks), checks=tuple(checks))


VERIFY_SETTLE_S = 120.0
VERIFY_POLL_S = 5.0


def verify_host_settled(shell: HostShell, hypervisor: Hypervisor, host: str, policy: HostPolicy, *,
                        cells_before: Sequence[Cell] | None = None, clock: Callable[[], float] = time.monotonic,
                        sleep: Callable[[float], None] = time.sleep,
                        poll_s: float = VERIFY_POLL_S) -> tuple[VerifyReport, int]:
    """:func:`verify_host`, asked again every ``poll_s`` while every failed check failed only because the
    host did not answer it, for at most :data:`VERIFY_SETTLE_S` (the policy's reboot timeout when shorter):
    a host answers SSH as soon as it is back, and its libvirtd can take a while longer (storage pools,
    networks) — that is a host still booting, not a broken one. A check that got an answer and failed
    (a wrong kernel, a changed topology) ends it at once. Returns the last report and how many were made."""
    deadline = clock() + min(VERIFY_SETTLE_S, policy.reboot_timeout_s)
    attempts = 0
    while True:
        report = verify_host(shell, hypervisor, host, policy, cells_before=cells_before)
        attempts += 1
        if report.ok or not all(c.unanswered for c in report.failures) or clock() + poll_s > deadline:
            return report, attempts
        log.info("%s: not answering all checks yet (%s); asking again in %gs", host, report.reason(), poll_s)
        sleep(poll_s)


def _inventory_check(shell: HostShell, host: str, argv: Sequence[str], expect: int, timeout: float,
                     name: str) -> CheckResult:
    res = shell.run(host, argv, timeout=timeout)
    if res.exit_code == expect:
        return CheckResult(name=name, ok=True, detail=f"exit {res.exit_code} as expected")
    return CheckResult(name=name, ok=False,
                       detail=f"{' '.join(argv)}: exit {res.exit_code}, expected {expect}: {_said(res)}")
