"""Live-migration jobs and their monitor: start, watch, escalate, abort, confirm.

A migration runs ``migrateToURI3`` (``LIVE | PEER2PEER | PERSIST_DEST | UNDEFINE_SOURCE``; a transient
domain without the last two, so it stays transient) in a worker
thread while the calling thread polls ``jobStats()`` for progress and applies the driver's last word
(:func:`hostmaint.migration.policy.last_word`: post-copy where allowed, else abort, once it stalls or
runs over its budget). ``abortJob`` runs in its own thread with a timeout and is resent from a fresh
connection when it blocks: QEMU can sit in "cancelling" and block an abort for ten minutes (see the
lab notes). Errors: a migration that failed, was aborted or could not be confirmed is
``MigrationError`` naming the VM, source and target.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import libvirt

from hostmaint.display import visible
from hostmaint.drivers.base import ProgressCallback
from hostmaint.drivers.domain_xml import rewrite_for_target
from hostmaint.drivers.libvirt.connections import Connections, is_connection_error, is_running, lookup, message
from hostmaint.drivers.libvirt.discovery import MIGRATION_PAUSES, UNREADABLE, what_was_wrong
from hostmaint.errors import DriverError, MigrationError, MigrationNotStarted, TransientDriverError, without_host
from hostmaint.migration.policy import (
    MIB,
    Action,
    Escalation,
    ProgressTrack,
    last_word,
    migration_budget_s,
)
from hostmaint.models import MigrationOptions, MigrationProgress, MigrationResult, StepOutcome

log = logging.getLogger(__name__)

DEFAULT_FLAGS = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_PERSIST_DEST
                 | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
# How QEMU/libvirt say that the destination could not allocate the guest's memory.
_OUT_OF_MEMORY = ("preallocating memory failed", "Cannot allocate memory", "cannot allocate memory",
                  "Out of memory", "unable to map backing store")


@dataclass(frozen=True)
class MonitorSettings:
    """How a running migration is watched: progress is read every ``poll_interval_s``; an abort that
    blocks longer than ``abort_timeout_s`` is resent, ``abort_attempts`` times in all."""

    poll_interval_s: float = 0.5
    abort_timeout_s: float = 20.0
    abort_attempts: int = 3
    # after a failed migration, how long its incoming copy on the target (paused for it) may take to go
    teardown_timeout_s: float = 30.0


def progress_from_job_stats(vm: str, elapsed: float, stats: Mapping[str, Any]) -> MigrationProgress | None:
    """libvirt ``jobStats()`` → MigrationProgress; None when no migration job is running."""
    if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
        return None
    page = int(stats.get("memory_page_size", 4096) or 4096)
    return MigrationProgress(
        vm=vm, elapsed_s=elapsed,
        data_total=int(stats.get("data_total", 0)), data_processed=int(stats.get("data_processed", 0)),
        data_remaining=int(stats.get("data_remaining", 0)),
        dirty_rate_bps=int(stats.get("memory_dirty_rate", 0)) * page,
        iterations=int(stats.get("memory_iteration", 0)),
        throttle_pct=int(stats.get("auto_converge_throttle", 0) or 0),
    )


def migration_request(xml: str, options: MigrationOptions, *, persistent: bool = True) -> tuple[int, dict[str, Any]]:
    """Flags and typed parameters for migrateToURI3 from the options; ``xml`` is the domain's migratable
    XML, rewritten for the target when the placement pins it there. Raises what the parsers raise
    (:data:`~hostmaint.drivers.libvirt.discovery.UNREADABLE`) on XML they cannot read.

    A transient domain (``persistent`` false) moves without ``PERSIST_DEST``/``UNDEFINE_SOURCE``:
    with them the target would define it, and a VM whose owner keeps its definition elsewhere (and
    expects it gone once it stops) would be left defined on our target, changed behind its back.
    """
    flags = DEFAULT_FLAGS
    if not persistent:
        flags &= ~(libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
    params: dict[str, Any] = {}
    if options.bandwidth_mib_s is not None:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = options.bandwidth_mib_s
    if options.auto_converge:
        flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
        if options.auto_converge_initial_pct is not None:
            params[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INITIAL] = options.auto_converge_initial_pct
        if options.auto_converge_increment_pct is not None:
            params[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INCREMENT] = options.auto_converge_increment_pct
    if options.post_copy:
        flags |= libvirt.VIR_MIGRATE_POSTCOPY
    if options.parallel_connections > 1:
        flags |= libvirt.VIR_MIGRATE_PARALLEL
        params[libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] = options.parallel_connections
    if options.tls:
        flags |= libvirt.VIR_MIGRATE_TLS  # QEMU's own TLS for the memory stream, certificates checked both ways
    if options.migration_address is not None:
        # the stream goes to the target's migration address, and the target listens there only: without the
        # listen address QEMU listens where qemu.conf says and the connection is refused (lab notes)
        params[libvirt.VIR_MIGRATE_PARAM_URI] = migration_uri(options.migration_address)
        params[libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS] = options.migration_address
    placement = options.placement
    if placement is not None and placement.rewrites_domain:
        dest_xml = rewrite_for_target(xml, placement)
        params[libvirt.VIR_MIGRATE_PARAM_DEST_XML] = dest_xml
        if persistent:
            params[libvirt.VIR_MIGRATE_PARAM_PERSIST_XML] = dest_xml  # the persistent config gets it too
    return flags, params


def migration_uri(address: str) -> str:
    """``tcp://ADDRESS`` for the migration stream (an IPv6 address in brackets); the port is libvirt's pick."""
    return f"tcp://[{address}]" if ":" in address else f"tcp://{address}"


@dataclass
class _Worker:
    """The thread that runs the blocking migrateToURI3 call."""

    done: threading.Event = field(default_factory=threading.Event)
    error: libvirt.libvirtError | DriverError | None = None


def wait_for(event: threading.Event, seconds: float) -> bool:
    """Wait up to ``seconds`` for ``event``; True once it is set (the monitor's wait between samples)."""
    return event.wait(seconds)


@dataclass
class _Limit:
    """A running migration's downtime limit as its caller set it (None: the one it started with), and
    whether a caller asked to abort it: libvirt does not always report such a migration as aborted (the
    target's QEMU can fail first, on the stream the source cut), and its error must still say so."""

    ms: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    abort_asked: bool = False


class Migrations:
    """Live migrations between the hosts of ``connections``. ``clock`` and ``wait`` (for an event, with a
    timeout) drive the monitor: it wakes the moment a migration ends, not at its next poll."""

    def __init__(self, connections: Connections, settings: MonitorSettings = MonitorSettings(), *,
                 clock: Callable[[], float] = time.monotonic,
                 wait: Callable[[threading.Event, float], bool] = wait_for) -> None:
        self._connections = connections
        self._settings = settings
        self._clock = clock
        self._wait = wait
        self._lock = threading.Lock()
        self._post_copy: set[tuple[str, str]] = set()  # (vm, source) switched to post-copy
        # (vm, source) of each migration running here -> the downtime limit the caller set since it started
        # (set_downtime_limit); its lock is held across the libvirt call, so the monitor's first setting
        # never undoes the caller's, and a host that hangs holds up only its own migration; and whether a
        # caller asked to abort it (abort)
        self._downtime: dict[tuple[str, str], _Limit] = {}
        self._downtime_lock = threading.Lock()  # guards the dict; each entry's own lock, its job's limit

    def migrate(self, vm: str, source: str, target: str, options: MigrationOptions,
                on_progress: ProgressCallback | None = None) -> MigrationResult:
        """Live-migrate ``vm`` from ``source`` to ``target`` and confirm where it runs afterwards."""
        where = f"{vm} from {source} to {target}"
        if source == target:
            raise MigrationError(f"migrating {where}: source and target are the same host", source, vm, target)
        call = self._connections.call
        started = self._clock()
        try:
            found = call(source, f"reading {vm}", lambda c: self._migratable_xml(c, vm))
            if found is None:
                raise MigrationNotStarted(f"migrating {where}: {vm} is not running on {source}", source, vm, target)
            call(target, "checking the migration target", lambda c: c.getHostname())
        except MigrationNotStarted:
            raise
        except DriverError as exc:  # nothing was asked of libvirt yet: known not to have moved
            raise MigrationNotStarted(f"migrating {where}: not started: {exc}", source, vm, target) from exc
        xml, persistent, autostart = found
        try:
            flags, params = migration_request(xml, options, persistent=persistent)
        except UNREADABLE as exc:
            raise MigrationNotStarted(f"migrating {where}: cannot read the XML of {vm}: "
                                      f"{what_was_wrong(exc, xml)}", source, vm, target) from exc

        with self._downtime_lock:
            self._downtime[(vm, source)] = _Limit()  # running here, no limit set by the caller yet
        worker = _Worker()
        threading.Thread(target=self._run_migration, args=(worker, vm, source, target, flags, params),
                         name=f"migrate-{vm}", daemon=True).start()

        track = ProgressTrack()
        abort_reason: str | None = None
        try:
            abort_reason = self._monitor(vm, source, options, on_progress, started, worker, track)
        except BaseException:
            # the caller's progress callback failed (or we were interrupted): never leave a
            # migration running unwatched
            if not worker.done.is_set():
                self._abort_quietly(vm, source)
            raise
        finally:
            with self._lock:
                self._post_copy.discard((vm, source))
            with self._downtime_lock:
                entry = self._downtime.pop((vm, source), None)
            asked = entry is not None and entry.abort_asked

        seconds = round(self._clock() - started, 3)
        if worker.done.is_set() and worker.error is None:
            result = self._confirm_success(vm, source, target, seconds, track.last)
            if autostart:
                self._keep_autostart(vm, target)
            return result.model_copy(update={"tls": options.tls, "migration_address": options.migration_address})
        return self._failure(vm, source, target, worker, abort_reason, options, asked=asked)

    def _monitor(self, vm: str, source: str, options: MigrationOptions, on_progress: ProgressCallback | None,
                 started: float, worker: _Worker, track: ProgressTrack) -> str | None:
        """Poll progress until the worker is done; apply the driver's last word. Returns why it aborted,
        if it did. A migration in post-copy is never aborted (the VM already runs on the target)."""
        level = Escalation.NONE
        data_total = 0
        downtime_set = options.downtime_limit_ms is None
        while not worker.done.is_set():
            elapsed = self._clock() - started
            sample = self._sample(vm, source, elapsed)
            if sample is not None:
                if not downtime_set:
                    # no migrateToURI3 parameter carries it: set on the job once it runs, before its first
                    # round can end
                    downtime_set = self._set_max_downtime(vm, source, options.downtime_limit_ms)
                track.observe(sample)
                data_total = max(data_total, sample.data_total)
                if on_progress is not None:
                    on_progress(sample)
            if self._in_post_copy(vm, source):  # switched here or by the caller's scheduler
                level = Escalation.POST_COPY
            # the budget scales with the guest memory the job reports
            budget = migration_budget_s(data_total / MIB, options)
            decision = last_word(track.history, elapsed_s=elapsed, budget_s=budget,
                                 stall_s=options.stall_seconds, level=level, can_post_copy=options.post_copy)
            if decision.action is Action.SWITCH_TO_POST_COPY:
                try:
                    self.start_post_copy(vm, source)
                    continue
                except DriverError:
                    # could not switch (e.g. it just finished): still pre-copy, so the rule aborts it
                    level = Escalation.POST_COPY_FAILED
                    decision = last_word(track.history, elapsed_s=elapsed, budget_s=budget,
                                         stall_s=options.stall_seconds, level=level)
            if decision.action is Action.ABORT:
                self._abort_quietly(vm, source)
                worker.done.wait(max(60.0, self._settings.abort_timeout_s * self._settings.abort_attempts))
                return decision.reason
            # woken by the end of the migration: a sleep here cost each migration most of a poll interval
            # (its last jobStats tends to return as the job ends), which was most of its fixed cost
            self._wait(worker.done, self._settings.poll_interval_s)
        return None

    def _set_max_downtime(self, vm: str, source: str, downtime_ms: int | None) -> bool:
        """The job's downtime limit (migrateSetMaxDowntime), or the one the caller set since it started;
        True once set or past setting (best effort: a limit that could not be set leaves QEMU's own,
        which the job's stats then show)."""
        with self._downtime_lock:
            entry = self._downtime.get((vm, source), _Limit())
        with entry.lock:
            limit = entry.ms or downtime_ms
            try:
                self._apply_downtime(vm, source, limit)
            except DriverError as exc:
                log.warning("could not set the downtime limit of %s to %s ms: %s", visible(vm), limit, visible(exc))
        return True

    def _apply_downtime(self, vm: str, source: str, downtime_ms: int | None) -> None:
        def set_limit(conn: libvirt.virConnect) -> None:
            dom = lookup(conn, vm)
            if dom is not None and downtime_ms is not None:
                dom.migrateSetMaxDowntime(downtime_ms, 0)

        self._connections.call(source, f"setting the downtime limit of {vm}", set_limit)

    def set_downtime_limit(self, vm: str, source: str, downtime_ms: int) -> None:
        """QEMU's downtime limit for the running migration of ``vm`` from ``source``, from now on. Set
        before its job runs, it is the one the job starts with (libvirt refuses it until then)."""
        with self._downtime_lock:
            entry = self._downtime.get((vm, source))
        if entry is None:
            raise MigrationError(f"no migration of {vm} from {source} runs here", source, vm)
        with entry.lock:
            entry.ms = downtime_ms
            try:
                self._apply_downtime(vm, source, downtime_ms)
            except DriverError as exc:
                # most often its job does not run yet: the monitor sets the limit when it shows
                log.warning("downtime limit of %s not set now (kept for its job): %s", visible(vm), visible(exc))

    def _in_post_copy(self, vm: str, source: str) -> bool:
        with self._lock:
            return (vm, source) in self._post_copy

    def _abort_quietly(self, vm: str, source: str) -> None:
        """Abort; a failed abort is not raised here: the migration's own outcome is what counts."""
        try:
            self._abort_job(vm, source)
        except MigrationError:
            pass  # the worker's result (and the location check after it) decides what happened

    @staticmethod
    def _migratable_xml(conn: libvirt.virConnect, vm: str) -> tuple[str, bool, bool] | None:
        """The running ``vm``'s migratable XML, whether it is defined persistently and whether it starts with
        its host (autostart); None when not running."""
        dom = lookup(conn, vm)
        if dom is None or not dom.isActive():
            return None
        persistent = bool(dom.isPersistent())
        return str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE)), persistent, persistent and bool(dom.autostart())

    def _keep_autostart(self, vm: str, target: str) -> None:
        """Mark ``vm`` autostart on ``target`` as it was on its source: PERSIST_DEST defines it there without
        the flag, and a VM that started with its host after a power loss would not any more. A flag that
        cannot be set does not undo the move: it is logged (the run's log) for the operator."""
        def set_flag(conn: libvirt.virConnect) -> None:
            dom = lookup(conn, vm)
            if dom is None or not dom.isPersistent():
                raise DriverError(f"{vm} is not defined on {target}", target)
            dom.setAutostart(1)

        try:
            self._connections.call(target, f"setting the autostart of {vm}", set_flag)
        except DriverError as exc:
            log.warning("%s moved to %s, but its autostart could not be set there (virsh autostart %s): %s",
                        visible(vm), visible(target), visible(vm), visible(exc))

    def _run_migration(self, worker: _Worker, vm: str, source: str, target: str, flags: int,
                       params: dict[str, Any]) -> None:
        """Worker thread: the blocking migrateToURI3 on a connection to the source of its own (lent: the
        next migration reuses it). Never retried: a migration that may have started is not started again."""
        try:
            with self._connections.lend(source) as conn:
                dom = lookup(conn, vm)
                if dom is None:
                    raise DriverError(f"{vm} vanished from {source} before the migration started", source)
                dom.migrateToURI3(self._connections.uri(target), params, flags)
        except (libvirt.libvirtError, DriverError) as exc:
            worker.error = exc
        finally:
            worker.done.set()

    def _sample(self, vm: str, source: str, elapsed: float) -> MigrationProgress | None:
        def stats(conn: libvirt.virConnect) -> dict[str, Any] | None:
            dom = lookup(conn, vm)
            if dom is None:
                return None  # already undefined on the source: the migration is finishing
            try:
                return dict(dom.jobStats())
            except libvirt.libvirtError as exc:
                if exc.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
                    return None
                raise

        try:
            raw = self._connections.call(source, f"reading migration progress of {vm}", stats)
        except DriverError:
            # Progress is best effort: the worker's own result decides success or failure.
            return None
        return progress_from_job_stats(vm, elapsed, raw) if raw is not None else None

    def _confirm_success(self, vm: str, source: str, target: str, seconds: float,
                         last: MigrationProgress | None) -> MigrationResult:
        call = self._connections.call
        on_target = call(target, f"confirming {vm}", lambda c: is_running(c, vm))
        on_source = call(source, f"confirming {vm}", lambda c: is_running(c, vm))
        if not on_target or on_source:
            raise MigrationError(
                f"migrating {vm} from {source} to {target} reported success, but the VM runs on "
                f"{'both hosts' if on_target and on_source else source if on_source else 'neither host'}",
                source, vm, target)
        stats = call(target, f"reading migration stats of {vm}", lambda c: self._completed_stats(c, vm))
        return MigrationResult(
            vm=vm, source=source, target=target, outcome=StepOutcome.OK, seconds=seconds,
            downtime_ms=float(stats["downtime"]) if "downtime" in stats else None,
            data_bytes=int(stats.get("data_processed", last.data_processed if last else 0)),
            iterations=int(stats.get("memory_iteration", last.iterations if last else 0)),
        )

    @staticmethod
    def _completed_stats(conn: libvirt.virConnect, vm: str) -> dict[str, Any]:
        dom = lookup(conn, vm)
        if dom is None:
            return {}
        try:
            return dict(dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() in (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_OPERATION_INVALID):
                return {}  # stats are for the audit record; their absence does not fail a migration
            raise

    def _failure(self, vm: str, source: str, target: str, worker: _Worker,
                 abort_reason: str | None, options: MigrationOptions = MigrationOptions(), *,
                 asked: bool = False) -> MigrationResult:
        """The migration failed or was aborted: find out where the VM runs and raise MigrationError.
        ``asked``: a caller asked to abort it while it ran (:meth:`abort`)."""
        err = worker.error
        if isinstance(err, libvirt.libvirtError):
            detail = message(err)
            if err.get_error_code() == libvirt.VIR_ERR_OPERATION_ABORTED and abort_reason is None:
                detail = f"aborted ({detail})"
            elif asked and abort_reason is None:
                detail = f"aborted as asked (libvirt reported: {detail})"
        elif err is not None:
            detail = str(err)
        else:
            detail = "the migration call did not return after the abort"
        if abort_reason is not None:
            detail = f"aborted by the stall rule: {abort_reason}"
        elif any(sign in detail for sign in _OUT_OF_MEMORY):
            detail = f"{target} lacks the memory for {vm} ({detail})"
        elif options.tls:
            # a certificate QEMU refused reads as a bare TLS error: say that the stream was encrypted and where to
            detail = (f"{detail} (migration TLS to {options.migration_address or target}: check both hosts' QEMU "
                      "certificates, e.g. hostmaint host status --probe)")
        call = self._connections.call
        on_source = call(source, f"checking {vm} after a failed migration", lambda c: is_running(c, vm))
        if on_source:
            raise MigrationError(f"migrating {vm} from {source} to {target} failed: {detail}; "
                                 f"{vm} still runs on {source}", source, vm, target) from err
        on_target = self._runs_after_teardown(vm, target)
        if on_target is None:
            raise MigrationError(f"migrating {vm} from {source} to {target} failed: {detail}; whether {vm} moved "
                                 f"is unknown: its copy on {target} is still paused by the migration after "
                                 f"{self._settings.teardown_timeout_s:g}s", source, vm, target) from err
        if on_target:
            raise MigrationError(f"migrating {vm} from {source} to {target} reported failure ({detail}), "
                                 f"but {vm} runs on {target}", source, vm, target) from err
        raise MigrationError(f"migrating {vm} from {source} to {target} failed: {detail}; {vm} runs on "
                             f"neither host", source, vm, target) from err

    def _runs_after_teardown(self, vm: str, target: str) -> bool | None:
        """Whether ``vm`` runs on ``target`` after its migration there failed; None when its incoming copy
        is still paused for the migration after ``teardown_timeout_s``. libvirt can return the failure
        before the target has torn that copy down (seen on the lab under load: a guest destroyed on its
        source mid-migration, its paused copy on the target gone a moment later): that copy never ran."""
        def state(conn: libvirt.virConnect) -> tuple[int, int] | None:
            dom = lookup(conn, vm)
            if dom is None:
                return None
            try:
                found = dom.state()
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return None  # it left while we looked
                raise
            return int(found[0]), int(found[1])

        deadline = self._clock() + self._settings.teardown_timeout_s
        while True:
            found = self._connections.call(target, f"checking {vm} after a failed migration", state)
            if found is None or found[0] in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_NOSTATE):
                return False
            if found[0] != libvirt.VIR_DOMAIN_PAUSED or found[1] not in MIGRATION_PAUSES:
                return True
            if self._clock() >= deadline:
                return None
            self._wait(threading.Event(), min(0.25, self._settings.poll_interval_s))

    # --- abort and escalation -------------------------------------------------------

    def abort(self, vm: str, source: str) -> None:
        """Abort a running migration of ``vm`` on ``source``; returns at once when none runs."""
        with self._downtime_lock:
            entry = self._downtime.get((vm, source))
            if entry is not None:  # one of ours, running: its error will say it was asked
                entry.abort_asked = True
        self._abort_job(vm, source)

    def _abort_job(self, vm: str, source: str) -> None:
        """abortJob in its own thread with a timeout, resent from a fresh connection while it blocks."""
        errors: list[str] = []
        attempts, timeout = self._settings.abort_attempts, self._settings.abort_timeout_s
        for attempt in range(1, attempts + 1):
            done = threading.Event()
            outcome: dict[str, Exception] = {}

            threading.Thread(target=self._send_abort, args=(vm, source, done, outcome),
                             name=f"abort-{vm}-{attempt}", daemon=True).start()
            if not done.wait(timeout):
                errors.append(f"abortJob blocked for {timeout:g}s")
                # Worth an operator's eye: QEMU stuck in "cancelling" is rare, and a resend clears it.
                log.warning("aborting the migration of %s on %s: abortJob blocked for %gs (try %d of %d)%s",
                            visible(vm), visible(source), timeout, attempt, attempts,
                            "; resending from a fresh connection" if attempt < attempts else "")
                continue
            error = outcome.get("error")
            if error is None:
                return
            if isinstance(error, libvirt.libvirtError) and not is_connection_error(error):
                raise MigrationError(f"aborting the migration of {vm} on {source}: {message(error)}",
                                     source, vm) from error
            errors.append(str(error))
        raise MigrationError(f"could not abort the migration of {vm} on {source} after "
                             f"{attempts} tries: {'; '.join(errors)}", source, vm)

    def _send_abort(self, vm: str, source: str, done: threading.Event, outcome: dict[str, Exception]) -> None:
        conn = None
        try:
            conn = self._connections.open(source)  # never the cached one: it may be the one that blocks
            dom = lookup(conn, vm)
            if dom is not None:
                dom.abortJob()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:  # "no job is active"
                outcome["error"] = exc
        except DriverError as exc:
            outcome["error"] = exc
        finally:
            if conn is not None:
                self._connections.close_one(conn)
            done.set()

    def start_post_copy(self, vm: str, source: str) -> None:
        """Switch a running migration (started with post_copy) to post-copy."""
        def switch(conn: libvirt.virConnect) -> None:
            dom = lookup(conn, vm)
            if dom is None:
                raise MigrationError(f"{vm} is not on {source}: no migration to switch to post-copy", source, vm)
            dom.migrateStartPostCopy(0)

        try:
            self._connections.call(source, f"switching {vm} to post-copy", switch)
            with self._lock:
                self._post_copy.add((vm, source))  # from now on an abort would lose the VM
        except DriverError as exc:
            if isinstance(exc, MigrationError | TransientDriverError):
                raise
            raise MigrationError(without_host(exc, source), source, vm) from exc

    def enable_auto_converge(self, vm: str, source: str, max_downtime_ms: int = 2000) -> None:
        """Help a running migration converge: allow a longer final pause (as Nova does).

        libvirt cannot turn on auto-converge for a running job; raising the downtime limit lets the
        last pass start with more data left.
        """
        def raise_downtime(conn: libvirt.virConnect) -> None:
            dom = lookup(conn, vm)
            if dom is None:
                raise MigrationError(f"{vm} is not on {source}", source, vm)
            dom.migrateSetMaxDowntime(max_downtime_ms, 0)

        try:
            self._connections.call(source, f"raising the downtime limit of {vm}", raise_downtime)
        except DriverError as exc:
            if isinstance(exc, MigrationError | TransientDriverError):
                raise
            raise MigrationError(without_host(exc, source), source, vm) from exc
