"""The drain executor against an in-memory hypervisor with scripted migrations.

The fake counts what is in flight per source, per target and in total, and the memory each host
holds (a VM in flight occupies its target from the start; a hugepage-backed VM takes pages of its
size from the target's pool instead), so the tests check the limits on the driver's side, not on the
scheduler's word.
"""

from __future__ import annotations

import contextvars
import threading
import time
from dataclasses import dataclass

import pytest

from hostmaint.errors import MigrationError, MigrationNotStarted, TransientDriverError
from hostmaint.migration import EventKind, MigrationControl, Order, SchedulerPolicy, drain
from hostmaint.models import (
    EvacuationPlan,
    HostDiscovery,
    Limits,
    MigrationOptions,
    MigrationProgress,
    MigrationResult,
    Placement,
    StepOutcome,
)

MIB = 1024 * 1024


@dataclass(frozen=True)
class Script:
    """How one VM's migration behaves in the fake."""

    steps: int = 3  # samples until done when it converges
    step_s: float = 0.002  # real sleep per sample: lets migrations overlap
    sample_dt: float = 1.0  # the migration's own clock advances this much per sample
    converges: bool = True
    converges_with_auto_converge: bool = False
    fail: bool = False  # raise MigrationError at the end; the VM stays on its source
    report_progress: bool = True
    hang: bool = False  # report nothing and wait until aborted


class FakeHypervisor:
    """An in-memory fleet. Thread-safe; records concurrency, memory and every call."""

    def __init__(self, vms: dict[str, tuple[str, int]], capacity_mib: dict[str, int],
                 scripts: dict[str, Script] | None = None, *, page_kib: dict[str, int] | None = None,
                 free_pages: dict[str, dict[int, int]] | None = None) -> None:
        self.location = {vm: host for vm, (host, _) in vms.items()}
        self.memory = {vm: mib for vm, (_, mib) in vms.items()}
        self.capacity = dict(capacity_mib)
        self.used = {h: 0 for h in capacity_mib}
        # hugepage-backed VMs (vm -> page size KiB) and each host's free pages besides those they hold
        self.page_kib = dict(page_kib or {})
        self.free_pages = {h: dict(sizes) for h, sizes in (free_pages or {}).items()}
        for vm, host in self.location.items():
            if vm not in self.page_kib:
                self.used[host] += self.memory[vm]
        self.scripts = scripts or {}
        self.lock = threading.Lock()
        self.in_flight: list[tuple[str, str]] = []
        self.max_total = 0
        self.max_source: dict[str, int] = {}
        self.max_target: dict[str, int] = {}
        self.overcommits: list[str] = []
        self.aborts: set[str] = set()
        self.calls: list[tuple[str, MigrationOptions]] = []
        self.escalations: list[tuple[str, str]] = []
        self.post_copy: set[str] = set()
        self.auto_converge: set[str] = set()
        self.finished: list[str] = []

    # the Hypervisor protocol -------------------------------------------------

    def discover(self, host: str) -> HostDiscovery:
        return HostDiscovery(host=host, cells=())

    def running_vms(self, host: str) -> tuple[str, ...]:
        return tuple(sorted(vm for vm, h in self.location.items() if h == host))

    def locate(self, vm: str) -> tuple[str, ...]:
        with self.lock:
            return (self.location[vm],) if vm in self.location else ()

    def shutdown(self, vm: str, host: str, timeout: float = 120.0) -> None:
        raise NotImplementedError

    def start(self, vm: str, host: str) -> None:
        raise NotImplementedError

    def abort(self, vm: str, source: str) -> None:
        with self.lock:
            self.aborts.add(vm)

    def migrate(self, vm: str, source: str, target: str, options: MigrationOptions,
                on_progress=None) -> MigrationResult:
        script = self.scripts.get(vm, Script())
        mem = self.memory[vm]
        with self.lock:
            assert self.location[vm] == source, f"{vm} is not on {source}"
            self.calls.append((vm, options))
            if options.auto_converge:
                self.auto_converge.add(vm)
            self.in_flight.append((source, target))
            self.max_total = max(self.max_total, len(self.in_flight))
            n_src = sum(1 for s, _ in self.in_flight if s == source)
            n_tgt = sum(1 for _, t in self.in_flight if t == target)
            self.max_source[source] = max(self.max_source.get(source, 0), n_src)
            self.max_target[target] = max(self.max_target.get(target, 0), n_tgt)
            self.hold(vm, target, 1)  # the target holds the VM's memory from the first byte
        moved = False
        try:
            elapsed, remaining, iterations = 0.0, mem * MIB, 0
            for _ in range(500):
                if self.aborted(vm):
                    raise MigrationError("aborted by request", host=source, vm=vm, target=target)
                time.sleep(script.step_s)
                if script.hang:
                    continue
                elapsed += script.sample_dt
                iterations += 1
                with self.lock:
                    in_post_copy = vm in self.post_copy
                    throttled = vm in self.auto_converge
                if in_post_copy or script.converges or (throttled and script.converges_with_auto_converge):
                    remaining = max(0, remaining - mem * MIB // script.steps - 1)
                if script.report_progress and on_progress is not None:
                    on_progress(MigrationProgress(vm=vm, elapsed_s=elapsed, data_total=mem * MIB,
                                                  data_processed=iterations * mem * MIB // script.steps,
                                                  data_remaining=remaining, iterations=iterations))
                if remaining == 0:
                    break
            else:
                raise MigrationError("fake: ran out of samples", host=source, vm=vm, target=target)
            if self.aborted(vm) and vm not in self.post_copy:
                raise MigrationError("aborted by request", host=source, vm=vm, target=target)
            if script.fail:
                raise MigrationError("scripted failure", host=source, vm=vm, target=target)
            with self.lock:
                self.location[vm] = target
                self.finished.append(vm)
            moved = True
            return MigrationResult(vm=vm, source=source, target=target, outcome=StepOutcome.OK,
                                   seconds=elapsed, data_bytes=mem * MIB, downtime_ms=30.0,
                                   iterations=iterations)
        finally:
            with self.lock:
                self.in_flight.remove((source, target))
                self.hold(vm, source if moved else target, -1)

    def hold(self, vm: str, host: str, sign: int) -> None:
        """Take (1) or give back (-1) ``vm``'s memory on ``host``, from the pool it uses; under the lock."""
        mem = self.memory[vm]
        size = self.page_kib.get(vm)
        if size is None:
            self.used[host] += sign * mem
            if self.used[host] > self.capacity[host]:
                self.overcommits.append(f"{host}: {self.used[host]} > {self.capacity[host]}")
            return
        pool = self.free_pages.setdefault(host, {})
        pool[size] = pool.get(size, 0) - sign * -(-mem * 1024 // size)
        if pool[size] < 0:
            self.overcommits.append(f"{host}: {-pool[size]} {size} KiB hugepages short")

    def aborted(self, vm: str) -> bool:
        with self.lock:
            return vm in self.aborts


class ControllableFake(FakeHypervisor):
    """A fake that can also switch a running migration to auto-converge or post-copy."""

    def enable_auto_converge(self, vm: str, source: str) -> None:
        with self.lock:
            self.escalations.append((vm, "auto-converge"))
            self.auto_converge.add(vm)

    def start_post_copy(self, vm: str, source: str) -> None:
        with self.lock:
            self.escalations.append((vm, "post-copy"))
            self.post_copy.add(vm)


def make_plan(moves: list[tuple[str, str, str, int]]) -> EvacuationPlan:
    return EvacuationPlan(cluster="c1", hosts=tuple(sorted({s for _, s, _, _ in moves})), snapshot_digest="x",
                          placements=tuple(Placement(vm=vm, source=s, target=t, memory_mib=m,
                                                     reason="test") for vm, s, t, m in moves))


def fleet(moves: list[tuple[str, str, str, int]], capacity: int = 100_000, cls=FakeHypervisor,
          scripts: dict[str, Script] | None = None) -> FakeHypervisor:
    hosts = {h for _, s, t, _ in moves for h in (s, t)}
    return cls({vm: (s, m) for vm, s, _, m in moves}, {h: capacity for h in hosts}, scripts)


MANY = [(f"vm{i:02d}", f"src{i % 2}", f"dst{i % 3}", 512 + 64 * i) for i in range(14)]


# --- limits ---------------------------------------------------------------------


@pytest.mark.parametrize("policy", [SchedulerPolicy.fixed(1), SchedulerPolicy.fixed(2),
                                    SchedulerPolicy.unbounded(), SchedulerPolicy()],
                         ids=["fixed1", "fixed2", "unbounded", "adaptive"])
def test_limits_are_never_exceeded_and_every_vm_moves(policy: SchedulerPolicy) -> None:
    hv = fleet(MANY)
    limits = Limits(migrations_per_source=2, migrations_per_target=1, migrations_per_cluster=3)
    report = drain(make_plan(MANY), hv, limits, policy=policy,
                   bandwidth_mib_s={"src0": 10_000, "src1": 10_000})
    assert report.ok, report.failed
    assert [r.vm for r in report.results] == [m[0] for m in MANY]  # plan order
    assert all(hv.location[vm] == t for vm, _, t, _ in MANY)
    assert hv.max_total <= 3
    assert max(hv.max_source.values()) <= min(2, policy.max_per_source or 2)
    assert max(hv.max_target.values()) <= 1
    assert 1 <= report.max_concurrency <= 3
    starts = [e for e in report.events if e.kind is EventKind.STARTED]
    assert len(starts) == len(MANY)
    assert all(e.detail["on_source"] <= 2 and e.detail["on_target"] <= 1 and e.detail["in_flight"] <= 3
               for e in starts)


def test_empty_plan_is_an_empty_ok_report() -> None:
    report = drain(make_plan([]), fleet([]), Limits())
    assert report.ok and report.results == () and report.max_concurrency == 0


def test_concurrency_timeline_follows_starts_and_ends() -> None:
    moves = [(f"vm{i}", "src", f"dst{i}", 1024) for i in range(5)]
    report = drain(make_plan(moves), fleet(moves), Limits(migrations_per_source=8, migrations_per_target=8),
                   policy=SchedulerPolicy.fixed(2))
    timeline = report.concurrency
    assert len(timeline) == 10  # five starts, five ends
    assert max(n for _, n in timeline) == report.max_concurrency == 2
    assert timeline[-1][1] == 0


def test_fixed_limits_reach_their_concurrency() -> None:
    moves = [(f"vm{i}", "src", f"dst{i}", 1024) for i in range(6)]
    limits = Limits(migrations_per_source=8, migrations_per_target=8, migrations_per_cluster=8)
    for policy, expected in [(SchedulerPolicy.fixed(2), 2), (SchedulerPolicy.unbounded(), 6),
                             (SchedulerPolicy.fixed(1), 1)]:
        assert drain(make_plan(moves), fleet(moves), limits, policy=policy).max_concurrency == expected


def test_each_migration_carries_its_placement() -> None:
    hv = fleet(MANY[:4])
    plan = make_plan(MANY[:4])
    drain(plan, hv, Limits())
    by_vm = {vm: opts.placement for vm, opts in hv.calls}
    assert by_vm == {p.vm: p for p in plan.placements}


# --- memory in flight ------------------------------------------------------------


def test_in_flight_memory_counts_against_the_target() -> None:
    # "a" must wait until "b" has left dst: dst has 1000 MiB free, "a" needs 2000.
    moves = [("a", "src", "dst", 2000), ("b", "dst", "other", 2000)]
    hv = FakeHypervisor({"a": ("src", 2000), "b": ("dst", 2000)},
                        {"src": 10_000, "dst": 3000, "other": 10_000})
    report = drain(make_plan(moves), hv, Limits(migrations_per_target=4), policy=SchedulerPolicy.unbounded(),
                   target_free_mib={"dst": 1000, "other": 8000})
    assert report.ok
    assert hv.overcommits == []
    assert hv.finished == ["b", "a"]
    kinds = [(e.kind, e.vm) for e in report.events if e.kind in (EventKind.STARTED, EventKind.FINISHED)]
    assert kinds.index((EventKind.FINISHED, "b")) < kinds.index((EventKind.STARTED, "a"))


def test_in_flight_memory_limits_parallel_arrivals() -> None:
    moves = [(f"vm{i}", "src", "dst", 1000) for i in range(4)]
    hv = FakeHypervisor({vm: ("src", 1000) for vm, *_ in moves}, {"src": 10_000, "dst": 4000})
    # Only two of the four fit into the 2500 MiB "dst" has free; the other two never start.
    report = drain(make_plan(moves), hv, Limits(migrations_per_target=8), policy=SchedulerPolicy.unbounded(),
                   target_free_mib={"dst": 2500})
    assert [r.outcome for r in report.results] == [StepOutcome.OK] * 2 + [StepOutcome.FAILED] * 2
    assert all("memory" in (r.error or "") for r in report.failed)
    assert hv.location["vm2"] == "src" and hv.location["vm3"] == "src"


GIB_PAGE_KIB = 1024 * 1024  # 1 GiB hugepages


def test_hugepage_vm_is_admitted_by_the_free_pages_of_its_size_not_by_ordinary_memory() -> None:
    # dst has 28 GiB of ordinary memory free and 80 free 1 GiB pages: the 32 GiB hugepage VM fits the
    # pool (where the planner put it), the 20 GiB ordinary VM fits the ordinary memory, both at once.
    moves = [("hp", "src", "dst", 32 * 1024), ("plain", "src", "dst", 20 * 1024)]
    hv = FakeHypervisor({"hp": ("src", 32 * 1024), "plain": ("src", 20 * 1024)},
                        {"src": 100_000, "dst": 28 * 1024}, page_kib={"hp": GIB_PAGE_KIB},
                        free_pages={"dst": {GIB_PAGE_KIB: 80}})
    report = drain(make_plan(moves), hv, Limits(), policy=SchedulerPolicy.unbounded(),
                   target_free_mib={"dst": 28 * 1024}, vm_hugepage_kib={"hp": GIB_PAGE_KIB},
                   target_free_hugepages={"dst": {GIB_PAGE_KIB: 80}})
    assert report.ok, report.failed
    assert hv.location == {"hp": "dst", "plain": "dst"}
    assert hv.overcommits == []
    assert hv.free_pages["dst"][GIB_PAGE_KIB] == 80 - 32 and hv.used["dst"] == 20 * 1024


def test_in_flight_hugepage_vms_count_against_the_targets_free_pages() -> None:
    # dst has 40 free 1 GiB pages: "a" and "b" (32 pages each) cannot arrive together, so "b" waits
    # until "out" has left dst and given its 32 pages back. Ordinary memory has room for all of them.
    moves = [("out", "dst", "other", 32 * 1024), ("a", "src", "dst", 32 * 1024), ("b", "src", "dst", 32 * 1024)]
    hv = FakeHypervisor({vm: (s, m) for vm, s, _, m in moves}, {"src": 100_000, "dst": 100_000, "other": 100_000},
                        scripts={"out": Script(steps=10)}, page_kib={vm: GIB_PAGE_KIB for vm, *_ in moves},
                        free_pages={"dst": {GIB_PAGE_KIB: 40}, "other": {GIB_PAGE_KIB: 80}})
    report = drain(make_plan(moves), hv, Limits(migrations_per_source=4, migrations_per_target=4),
                   policy=SchedulerPolicy.unbounded(), target_free_mib={"dst": 100_000, "other": 100_000},
                   vm_hugepage_kib={vm: GIB_PAGE_KIB for vm, *_ in moves},
                   target_free_hugepages={"dst": {GIB_PAGE_KIB: 40}, "other": {GIB_PAGE_KIB: 80}})
    assert report.ok, report.failed
    assert hv.overcommits == []  # the pool was never short, on the driver's side
    assert hv.location == {"out": "other", "a": "dst", "b": "dst"}
    kinds = [(e.kind, e.vm) for e in report.events if e.kind in (EventKind.STARTED, EventKind.FINISHED)]
    assert kinds.index((EventKind.STARTED, "a")) < kinds.index((EventKind.FINISHED, "out"))
    assert kinds.index((EventKind.FINISHED, "out")) < kinds.index((EventKind.STARTED, "b"))


def test_a_hugepage_vm_that_never_fits_the_pool_is_refused_with_the_page_size() -> None:
    moves = [("hp", "src", "dst", 32 * 1024)]
    hv = FakeHypervisor({"hp": ("src", 32 * 1024)}, {"src": 100_000, "dst": 100_000},
                        page_kib={"hp": GIB_PAGE_KIB}, free_pages={"dst": {GIB_PAGE_KIB: 16}})
    report = drain(make_plan(moves), hv, Limits(), target_free_mib={"dst": 100_000},
                   vm_hugepage_kib={"hp": GIB_PAGE_KIB}, target_free_hugepages={"dst": {GIB_PAGE_KIB: 16}})
    assert report.results[0].outcome is StepOutcome.FAILED
    assert "1048576 KiB hugepages" in (report.results[0].error or "")
    assert hv.calls == [] and hv.location["hp"] == "src"


# --- skip, failure, abort -----------------------------------------------------------


def test_already_moved_vm_is_skipped_not_failed() -> None:
    moves = MANY[:3]
    hv = fleet(moves)
    hv.location["vm01"] = "dst1"  # a previous run moved it before it crashed
    report = drain(make_plan(moves), hv, Limits())
    assert report.ok
    assert report.results[1].outcome is StepOutcome.SKIPPED
    assert "vm01" not in [vm for vm, _ in hv.calls]
    assert [e.kind for e in report.events if e.vm == "vm01"][-1] is EventKind.SKIPPED


def test_failures_are_collected_and_the_rest_goes_on() -> None:
    moves = MANY[:6]
    hv = fleet(moves, scripts={"vm02": Script(fail=True), "vm04": Script(fail=True)})
    report = drain(make_plan(moves), hv, Limits())
    assert not report.ok
    assert [r.vm for r in report.failed] == ["vm02", "vm04"]
    assert all(r.outcome is StepOutcome.FAILED and "scripted failure" in (r.error or "")
               for r in report.failed)
    assert hv.location["vm02"] == "src0" and hv.location["vm04"] == "src0"
    assert sum(r.outcome is StepOutcome.OK for r in report.results) == 4


def test_stop_on_first_failure_starts_nothing_more() -> None:
    moves = [(f"vm{i}", "src", "dst", 512) for i in range(4)]
    hv = fleet(moves, scripts={"vm0": Script(fail=True)})
    report = drain(make_plan(moves), hv, Limits(),
                   policy=SchedulerPolicy.fixed(1, stop_on_first_failure=True))
    assert [r.outcome for r in report.results] == [StepOutcome.FAILED] + [StepOutcome.ABORTED] * 3
    assert [vm for vm, _ in hv.calls] == ["vm0"]
    assert all(hv.location[vm] == "src" for vm, *_ in moves)


def test_locate_error_is_a_failure_of_that_vm_only() -> None:
    moves = MANY[:3]

    class Flaky(FakeHypervisor):
        def locate(self, vm: str) -> tuple[str, ...]:
            if vm == "vm00":
                raise TransientDriverError("connection refused", host="src0")
            return super().locate(vm)

    report = drain(make_plan(moves), fleet(moves, cls=Flaky), Limits())
    assert [r.outcome for r in report.results] == [StepOutcome.FAILED, StepOutcome.OK, StepOutcome.OK]


def test_a_failed_migration_whose_vm_cannot_be_located_is_unknown_not_failed() -> None:
    # The target's libvirtd died at the switch-over: the migration reports an error, the VM runs on the
    # target, and the target does not answer. Whether it moved cannot be known: "failed" would be false.
    moves = MANY[:2]

    class TargetDies(FakeHypervisor):
        dead: set[str] = set()

        def migrate(self, vm, source, target, options, on_progress=None):  # type: ignore[no-untyped-def]
            result = super().migrate(vm, source, target, options, on_progress)
            if vm == "vm00":
                self.dead = {target}
                raise TransientDriverError("end of file while reading data: Input/output error", host=target)
            return result

        def locate(self, vm: str) -> tuple[str, ...]:
            found = tuple(h for h in super().locate(vm) if h not in self.dead)
            if not found and self.dead:
                raise TransientDriverError(f"{vm} not found on the reachable hosts", host=sorted(self.dead)[0])
            return found

    hv = fleet(moves, cls=TargetDies)
    report = drain(make_plan(moves), hv, Limits(), policy=SchedulerPolicy.fixed(1))
    first = report.results[0]
    assert first.outcome is StepOutcome.UNKNOWN and "unknown" in (first.error or "")
    assert hv.location["vm00"] == "dst0"  # it did move
    assert not report.ok and report.failed == (first,)  # not known to be off its source: the host stays out


def test_a_failed_migration_whose_vm_runs_on_no_host_is_unknown() -> None:
    moves = MANY[:1]

    class Vanishes(FakeHypervisor):
        def migrate(self, vm, source, target, options, on_progress=None):  # type: ignore[no-untyped-def]
            with self.lock:
                del self.location[vm]  # paused on both sides at the switch-over when asked
            raise MigrationError("connection reset", host=source, vm=vm, target=target)

    report = drain(make_plan(moves), fleet(moves, cls=Vanishes), Limits())
    assert [r.outcome for r in report.results] == [StepOutcome.UNKNOWN]


def test_a_failed_migration_whose_only_copy_on_the_target_is_paused_for_it_is_unknown_not_moved() -> None:
    # libvirt returned the failure before the target tore its incoming copy down (seen on the lab under
    # load): that copy is active but never ran; calling the VM moved was false (it ran nowhere after)
    moves = MANY[:1]

    class CopyLeft(FakeHypervisor):
        incoming: dict[str, str] = {}

        def migrate(self, vm, source, target, options, on_progress=None):  # type: ignore[no-untyped-def]
            with self.lock:
                self.location[vm] = target
                self.incoming = {vm: target}
            raise MigrationError("operation failed: domain is not running", host=source, vm=vm, target=target)

        def in_migration(self, host: str) -> tuple[str, ...]:
            return tuple(vm for vm, h in self.incoming.items() if h == host)

    report = drain(make_plan(moves), fleet(moves, cls=CopyLeft), Limits())
    [result] = report.results
    assert result.outcome is StepOutcome.UNKNOWN and "paused by the migration" in (result.error or "")
    assert not report.ok and report.summary() == "0 VM(s) moved"


class TenantStops(FakeHypervisor):
    """A fake whose tenants stop VMs: ``stop`` before its migration starts, ``stop_during`` while it runs
    (libvirt then fails the migration), each leaving the VM shut off on its source for ``reason``."""

    def __init__(self, *args, stop: dict[str, str] | None = None, stop_during: dict[str, str] | None = None,
                 **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.stop, self.stop_during = stop or {}, stop_during or {}
        self.off: dict[str, tuple[str, str]] = {}  # vm -> (host, reason)

    def shut_down_by_tenant(self, vm: str, reason: str) -> None:
        with self.lock:
            self.off[vm] = (self.location.pop(vm), reason)

    def locate(self, vm: str) -> tuple[str, ...]:
        if vm in self.stop:
            self.shut_down_by_tenant(vm, self.stop.pop(vm))
        return super().locate(vm)

    def migrate(self, vm, source, target, options, on_progress=None):  # type: ignore[no-untyped-def]
        if vm in self.stop_during:
            self.shut_down_by_tenant(vm, self.stop_during.pop(vm))
            raise MigrationError("operation failed: domain is not running", host=source, vm=vm, target=target)
        return super().migrate(vm, source, target, options, on_progress)

    def shut_off_reasons(self, host: str) -> dict[str, str]:
        with self.lock:
            return {vm: reason for vm, (h, reason) in self.off.items() if h == host}


@pytest.mark.parametrize("reason", ["destroyed", "shutdown", "saved", "from-snapshot"])
def test_a_vm_its_tenant_stops_before_or_during_its_migration_is_skipped_and_says_so(reason: str) -> None:
    moves = MANY[:4]
    hv = TenantStops({vm: (s, m) for vm, s, _, m in moves}, {h: 100_000 for _, s, t, _ in moves for h in (s, t)},
                     stop={"vm01": reason}, stop_during={"vm02": reason})
    report = drain(make_plan(moves), hv, Limits(), policy=SchedulerPolicy.fixed(1))
    by_vm = {r.vm: r for r in report.results}
    assert report.ok  # stopped where they were: nothing of the plan is left on its source running
    for vm, when in (("vm01", "before"), ("vm02", "during")):
        assert by_vm[vm].outcome is StepOutcome.SKIPPED and by_vm[vm].stopped_outside == reason
        assert f"stopped outside hostmaint {when} its migration" in (by_vm[vm].error or "")
        assert f"({reason})" in (by_vm[vm].error or "")
    assert by_vm["vm00"].outcome is by_vm["vm03"].outcome is StepOutcome.OK
    assert report.summary() == f"2 VM(s) moved; stopped outside hostmaint, not moved: vm01 ({reason}), vm02 ({reason})"


@pytest.mark.parametrize("reason", ["crashed", "migrated", "failed", "daemon", "unknown", None])
def test_a_vm_shut_off_for_any_other_reason_is_not_taken_for_stopped_by_its_tenant(reason: str | None) -> None:
    # crashed during its migration, or shut off by a migration (its copy lost): not the tenant's doing;
    # gone without a trace (None): the same. Whether it moved stays unknown, the host stays out.
    moves = MANY[:1]
    hv = TenantStops({vm: (s, m) for vm, s, _, m in moves}, {h: 100_000 for _, s, t, _ in moves for h in (s, t)},
                     stop_during={"vm00": reason or "gone"})
    if reason is None:
        hv.shut_off_reasons = lambda host: {}  # type: ignore[method-assign]
    report = drain(make_plan(moves), hv, Limits())
    assert [r.outcome for r in report.results] == [StepOutcome.UNKNOWN]
    assert report.results[0].stopped_outside is None and not report.ok


# --- escalation --------------------------------------------------------------------


def escalations(report) -> list[tuple[str, str]]:
    return [(e.vm, e.detail["action"]) for e in report.events
            if e.kind is EventKind.ESCALATED and "error" not in e.detail]


def test_escalation_goes_auto_converge_then_post_copy() -> None:
    moves = [("busy", "src", "dst", 1024), ("calm", "src", "dst", 1024)]
    hv = fleet(moves, cls=ControllableFake, scripts={"busy": Script(converges=False)})
    assert isinstance(hv, MigrationControl)
    report = drain(make_plan(moves), hv, Limits(), options=MigrationOptions(stall_seconds=3),
                   policy=SchedulerPolicy(allow_post_copy=True))
    assert report.ok
    assert escalations(report) == [("busy", "enable-auto-converge"), ("busy", "switch-to-post-copy")]
    assert hv.escalations == [("busy", "auto-converge"), ("busy", "post-copy")]
    assert hv.location == {"busy": "dst", "calm": "dst"}


def test_auto_converge_that_works_stops_the_escalation() -> None:
    moves = [("busy", "src", "dst", 1024)]
    hv = fleet(moves, cls=ControllableFake,
               scripts={"busy": Script(converges=False, converges_with_auto_converge=True)})
    report = drain(make_plan(moves), hv, Limits(), options=MigrationOptions(stall_seconds=3),
                   policy=SchedulerPolicy(allow_post_copy=True))
    assert report.ok
    assert escalations(report) == [("busy", "enable-auto-converge")]


class PostCopyFails(ControllableFake):
    """A fake whose switch to post-copy fails (libvirt refused it): the migration stays pre-copy."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.on_switch = lambda: None  # what happens while the switch is being tried

    def start_post_copy(self, vm: str, source: str) -> None:
        self.on_switch()
        raise MigrationError("migrateStartPostCopy: operation failed", host=source, vm=vm)


def test_a_failed_switch_to_post_copy_aborts_within_the_budget_and_stays_on_its_source() -> None:
    moves = [("stuck", "src", "dst", 1024)]
    hv = fleet(moves, cls=PostCopyFails, scripts={"stuck": Script(converges=False)})
    # 1 GiB at 30 s/GiB: a 30 s budget on the fake's clock, with room for the whole ladder (5 s stalls)
    opts = MigrationOptions(stall_seconds=5, seconds_per_gib=30, min_budget_seconds=30)
    report = drain(make_plan(moves), hv, Limits(), options=opts, policy=SchedulerPolicy(allow_post_copy=True))
    assert escalations(report) == [("stuck", "enable-auto-converge"), ("stuck", "switch-to-post-copy"),
                                   ("stuck", "abort")]
    failed_switch = [e.detail for e in report.events if e.kind is EventKind.ESCALATED and "error" in e.detail]
    assert [(d["action"], "migrateStartPostCopy" in d["error"]) for d in failed_switch] == [
        ("switch-to-post-copy", True)]
    abort = [e for e in report.events if e.kind is EventKind.ESCALATED and e.detail.get("action") == "abort"][0]
    assert abort.detail["elapsed_s"] < 30  # decided by the policy, not by the budget or the driver
    stuck = report.results[0]
    assert stuck.outcome is StepOutcome.ABORTED and "post-copy failed" in (stuck.error or "")
    assert hv.aborted("stuck") and hv.location["stuck"] == "src" and "stuck" not in hv.post_copy
    (ended,) = [e for e in report.events if e.kind is EventKind.ABORTED]
    assert ended.detail["escalation"] == "post_copy_failed"  # the audit record says how far it got


def test_cancel_during_a_failed_switch_to_post_copy_still_aborts() -> None:
    # A cancel while the switch is tried is held off (the migration might be going post-copy); the switch
    # fails, so the migration is pre-copy after all and aborted, and nothing more starts.
    moves = [("stuck", "src", "dst", 1024), ("next", "src", "dst", 512)]
    hv = fleet(moves, cls=PostCopyFails, scripts={"stuck": Script(converges=False)})
    stop = threading.Event()
    hv.on_switch = stop.set  # type: ignore[attr-defined]
    report = drain(make_plan(moves), hv, Limits(), options=MigrationOptions(stall_seconds=3),
                   policy=SchedulerPolicy.fixed(1, allow_post_copy=True), cancel=stop, poll_s=0.001)
    assert [r.outcome for r in report.results] == [StepOutcome.ABORTED, StepOutcome.ABORTED]
    assert hv.aborted("stuck") and hv.location == {"stuck": "src", "next": "src"}
    assert [vm for vm, _ in hv.calls] == ["stuck"]


def test_without_post_copy_a_stalled_migration_is_aborted_and_stays_on_its_source() -> None:
    moves = [("busy", "src", "dst", 1024), ("calm", "src", "dst", 1024)]
    hv = fleet(moves, cls=ControllableFake, scripts={"busy": Script(converges=False)})
    report = drain(make_plan(moves), hv, Limits(), options=MigrationOptions(stall_seconds=3))
    assert escalations(report) == [("busy", "enable-auto-converge"), ("busy", "abort")]
    # what the audit record keeps: both escalation decisions, then the abort, in order
    assert [(d["vm"], d["kind"], d.get("action")) for d in report.decisions] == [
        ("busy", "escalated", "enable-auto-converge"), ("busy", "escalated", "abort"), ("busy", "aborted", None)]
    busy = report.results[0]
    assert busy.outcome is StepOutcome.ABORTED and "no progress" in (busy.error or "")
    assert hv.location == {"busy": "src", "calm": "dst"}
    assert hv.used["dst"] == 1024  # the aborted VM's memory was given back on the target
    assert [r.vm for r in report.failed] == ["busy"]


def test_without_controls_a_stall_goes_straight_to_abort() -> None:
    moves = [("busy", "src", "dst", 1024)]
    hv = fleet(moves, scripts={"busy": Script(converges=False)})
    report = drain(make_plan(moves), hv, Limits(), options=MigrationOptions(stall_seconds=3),
                   policy=SchedulerPolicy(allow_post_copy=True))
    assert escalations(report) == [("busy", "abort")]
    assert report.results[0].outcome is StepOutcome.ABORTED
    assert hv.location["busy"] == "src"


def test_time_budget_aborts_even_a_migration_that_progresses_slowly() -> None:
    moves = [("big", "src", "dst", 2048)]
    # 100 samples of 1 s each to finish; the budget is 2 GiB x 10 s/GiB = 20 s.
    hv = fleet(moves, cls=ControllableFake, scripts={"big": Script(steps=100, step_s=0.0)})
    report = drain(make_plan(moves), hv, Limits(),
                   options=MigrationOptions(seconds_per_gib=10, min_budget_seconds=5))
    assert escalations(report) == [("big", "abort")]
    assert "budget" in (report.results[0].error or "")
    assert hv.location["big"] == "src"


def test_watchdog_aborts_a_silent_migration_on_the_wall_clock() -> None:
    moves = [("mute", "src", "dst", 64)]
    hv = fleet(moves, scripts={"mute": Script(hang=True, step_s=0.005)})
    report = drain(make_plan(moves), hv, Limits(),
                   options=MigrationOptions(seconds_per_gib=0.001, min_budget_seconds=0.05), poll_s=0.01)
    assert report.results[0].outcome is StepOutcome.ABORTED
    assert hv.location["mute"] == "src"


def test_high_dirty_vm_starts_with_auto_converge() -> None:
    moves = [("hot", "src", "dst", 1024), ("cold", "src", "dst", 1024)]
    hv = fleet(moves)
    drain(make_plan(moves), hv, Limits(), dirty_rate={"hot": 500.0, "cold": 5.0})
    assert hv.auto_converge == {"hot"}


def test_cancel_aborts_running_and_starts_nothing_more() -> None:
    moves = [(f"vm{i}", "src", "dst", 512) for i in range(4)]
    hv = fleet(moves, scripts={"vm0": Script(steps=40, step_s=0.005)})
    stop = threading.Event()

    def on_event(event) -> None:
        if event.kind is EventKind.PROGRESS:
            stop.set()

    report = drain(make_plan(moves), hv, Limits(), policy=SchedulerPolicy.fixed(1, progress_event_s=0.0),
                   on_event=on_event, cancel=stop, poll_s=0.01)
    assert [r.outcome for r in report.results] == [StepOutcome.ABORTED] * 4
    assert all(hv.location[vm] == "src" for vm, *_ in moves)
    assert [vm for vm, _ in hv.calls] == ["vm0"]


def test_events_stream_to_on_event_in_order() -> None:
    seen = []
    report = drain(make_plan(MANY[:4]), fleet(MANY[:4]), Limits(), on_event=seen.append)
    assert tuple(seen) == report.events
    assert [e.at_s for e in seen] == sorted(e.at_s for e in seen)
    last = [e for e in seen if e.kind is EventKind.FINISHED][-1]
    assert last.detail["done"] == 4 and last.detail["total"] == 4 and last.detail["bytes_moved"] > 0


def test_adaptive_order_moves_large_calm_vms_first() -> None:
    moves = [("small", "src", "dst", 512), ("hot", "src", "dst", 8192), ("large", "src", "dst", 4096)]
    hv = fleet(moves)
    drain(make_plan(moves), hv, Limits(), policy=SchedulerPolicy(order=Order.ADAPTIVE),
          dirty_rate={"hot": 400.0})
    assert [vm for vm, _ in hv.calls][0] == "large"
    assert [vm for vm, _ in hv.calls][-1] == "hot"


# --- what the drain sees of the link ---------------------------------------------------------------


def test_drain_reports_what_its_migrations_pushed_together() -> None:
    """Two 1 GiB migrations from one source, each sending 512 MiB/s of wall time for 2 s: the drain's
    link observation is their sum at most, with the demand its streams could have pushed."""
    moves = [("a", "src", "dst1", 1024), ("b", "src", "dst2", 1024)]
    slow = Script(steps=20, step_s=0.1)
    hv = fleet(moves, scripts={"a": slow, "b": slow})
    report = drain(make_plan(moves), hv, Limits(), policy=SchedulerPolicy.unbounded(),
                   bandwidth_mib_s={"src": 10_000})
    assert report.ok
    (seen,) = report.links
    assert (seen.host, seen.streams, seen.demand_mib_s) == ("src", 2, 1200.0)
    # sleeps only ever stretch, so the fake never sends faster than 2 × 512 MiB/s
    assert 0 < seen.peak_mib_s <= 1024 * 1.05


# --- context ----------------------------------------------------------------------

RUN = contextvars.ContextVar("RUN", default="no run")


class ContextRecordingFake(FakeHypervisor):
    """Records which run each migrate and abort call sees: what a run-aware log handler would see."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[str, str, str]] = []

    def migrate(self, vm, source, target, options, on_progress=None):  # type: ignore[no-untyped-def]
        with self.lock:
            self.seen.append(("migrate", vm, RUN.get()))
        return super().migrate(vm, source, target, options, on_progress)

    def abort(self, vm: str, source: str) -> None:
        with self.lock:
            self.seen.append(("abort", vm, RUN.get()))
        super().abort(vm, source)


def test_the_callers_context_follows_migrations_and_aborts_onto_their_threads() -> None:
    moves = [("busy", "src", "dst", 1024), ("calm", "src", "dst", 1024), ("calm2", "src", "dst", 512)]
    hv = fleet(moves, cls=ContextRecordingFake, scripts={"busy": Script(converges=False)})
    token = RUN.set("run-42")
    try:
        report = drain(make_plan(moves), hv, Limits(), options=MigrationOptions(stall_seconds=3))
    finally:
        RUN.reset(token)
    assert [r.vm for r in report.results if r.outcome is StepOutcome.ABORTED] == ["busy"]
    seen = hv.seen  # type: ignore[attr-defined]
    assert {kind for kind, _, _ in seen} == {"migrate", "abort"}
    assert {run for _, _, run in seen} == {"run-42"}, seen


def test_each_migration_gets_the_downtime_limit_of_its_share_at_the_switch_over() -> None:
    # 10 GbE, one 600 MiB/s stream each: two fill the link and a third's set-up overlaps their end, so a
    # migration's last data may go at a third of the link: its own limit is scaled to fit QEMU's 300 ms
    moves = [(f"vm{i}", "src", f"dst{i}", 1024) for i in range(4)]
    hv = fleet(moves)
    drain(make_plan(moves), hv, Limits(migrations_per_source=3, migrations_per_target=8),
          bandwidth_mib_s={"src": 1100})
    assert {opts.downtime_limit_ms for _, opts in hv.calls} == {165}
    fixed = fleet(moves)
    drain(make_plan(moves), fixed, Limits(migrations_per_source=3), policy=SchedulerPolicy.fixed(2))
    assert {opts.downtime_limit_ms for _, opts in fixed.calls} == {None}  # QEMU's own, as before


class SlowSwitchOver(FakeHypervisor):
    """Hosts whose switch-over costs ``fixed_ms`` beyond QEMU's limit (TCG guests, a busy host): each
    pause is the limit the migration was given, spent in full, plus that."""

    fixed_ms = 200.0

    def migrate(self, vm: str, source: str, target: str, options: MigrationOptions,
                on_progress=None) -> MigrationResult:
        result = super().migrate(vm, source, target, options, on_progress)
        limit = options.downtime_limit_ms or 300
        return result.model_copy(update={"downtime_ms": limit + self.fixed_ms})


def test_after_a_pause_over_the_limit_the_drain_reserves_what_the_switch_over_really_took() -> None:
    # one at a time (alone at its share): the first is planned 270 ms + 30 and pauses 470; from then on
    # the drain reserves 200 ms and the pauses fit QEMU's 300 ms
    moves = [(f"vm{i}", "src", "dst", 1024) for i in range(4)]
    hv = fleet(moves, cls=SlowSwitchOver)
    report = drain(make_plan(moves), hv, Limits(migrations_per_source=1), bandwidth_mib_s={"src": 600})
    pauses = [r.downtime_ms for r in report.results]
    assert pauses[0] == 470
    assert all(p is not None and p <= 300 for p in pauses[1:]), pauses
    started = [e.detail["switchover_reserve_ms"] for e in report.events if e.kind is EventKind.STARTED]
    assert started == [30.0, 200.0, 200.0, 200.0]
    # the fixed anchors keep QEMU's limit and learn nothing: the operator compares them as they are
    fixed = fleet(moves, cls=SlowSwitchOver)
    report = drain(make_plan(moves), fixed, Limits(migrations_per_source=1), policy=SchedulerPolicy.fixed(1))
    assert {r.downtime_ms for r in report.results} == {500}


class RetunableSlowSwitchOver(SlowSwitchOver):
    """Slow switch-overs on a driver that can change a running migration's downtime limit: the pause
    is the limit in force when the migration ends."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.retuned: dict[str, int] = {}

    def set_downtime_limit(self, vm: str, source: str, downtime_ms: int) -> None:
        with self.lock:
            self.retuned[vm] = downtime_ms

    def migrate(self, vm: str, source: str, target: str, options: MigrationOptions,
                on_progress=None) -> MigrationResult:
        result = FakeHypervisor.migrate(self, vm, source, target, options, on_progress)
        with self.lock:
            limit = self.retuned.get(vm, options.downtime_limit_ms or 300)
        return result.model_copy(update={"downtime_ms": limit + self.fixed_ms})


def test_migrations_in_flight_when_a_pause_outgrew_the_limit_get_their_limit_lowered_too() -> None:
    # three in flight on 10 GbE, each planned 165 ms + 30: the quick one pauses 365 ms, so the drain
    # reserves 200 ms; the two still sending would pause as long unless their jobs' limits come down now
    # (to 61 ms: 100 ms left beside the reserve, scaled by their share at the switch-over)
    moves = [("quick", "src", "dst0", 1024), ("long1", "src", "dst1", 4096), ("long2", "src", "dst2", 4096)]
    scripts = {"quick": Script(steps=2), **{vm: Script(steps=60, step_s=0.01) for vm in ("long1", "long2")}}
    hv = fleet(moves, cls=RetunableSlowSwitchOver, scripts=scripts)
    report = drain(make_plan(moves), hv, Limits(migrations_per_source=3, migrations_per_target=8),
                   bandwidth_mib_s={"src": 1100})
    pauses = {r.vm: r.downtime_ms for r in report.results}
    assert pauses["quick"] is not None and pauses["quick"] > 300
    assert set(hv.retuned) == {"long1", "long2"}, hv.retuned  # type: ignore[attr-defined]
    assert all(pauses[vm] is not None and pauses[vm] <= 300 for vm in ("long1", "long2")), pauses
    retuned = [e for e in report.events if e.kind is EventKind.RETUNED]
    assert {e.vm for e in retuned} == {"long1", "long2"}
    assert all(e.detail["downtime_limit_ms"] < e.detail["was_ms"] for e in retuned)
    assert {d["vm"] for d in report.decisions if d["kind"] == "retuned"} == {"long1", "long2"}  # in the audit
    # a driver that cannot retune: the same drain, the two pause over the limit as before
    plain = fleet(moves, cls=SlowSwitchOver, scripts=scripts)
    before = drain(make_plan(moves), plain, Limits(migrations_per_source=3, migrations_per_target=8),
                   bandwidth_mib_s={"src": 1100})
    assert all((r.downtime_ms or 0) > 300 for r in before.results), [r.downtime_ms for r in before.results]


def test_the_executor_admits_in_the_order_the_shared_stagger_rule_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    # the simulator and the executor must run the same admission order (the benchmark measures the one
    # that runs at night): the executor asks admission_order at each pass, with what is running
    import sys

    executor = sys.modules["hostmaint.migration.drain"]  # the package's `drain` is the function
    asked: list[tuple[list[str], dict[str, int]]] = []

    def last_first(pending, ends, shares, policy):  # type: ignore[no-untyped-def]
        asked.append(([s.vm for s in pending], {src: len(e) for src, e in ends.items()}))
        return list(reversed(pending))

    monkeypatch.setattr(executor, "admission_order", last_first)
    moves = [(f"vm{i}", "src", "dst", 8192) for i in range(4)]  # large: not about to finish at once
    hv = fleet(moves, scripts={vm: Script(steps=6, step_s=0.01) for vm, *_ in moves})
    report = drain(make_plan(moves), hv, Limits(migrations_per_source=1), bandwidth_mib_s={"src": 600})
    assert report.ok
    started = [e.vm for e in report.events if e.kind is EventKind.STARTED]
    assert started == list(reversed(asked[0][0])), (started, asked)
    assert any(running for _, running in asked), "never asked with a migration running"
    # the fixed anchors keep their order and are never re-ordered
    asked.clear()
    fixed = fleet(moves)
    report = drain(make_plan(moves), fixed, Limits(migrations_per_source=1), policy=SchedulerPolicy.fixed(1))
    assert [e.vm for e in report.events if e.kind is EventKind.STARTED] == ["vm0", "vm1", "vm2", "vm3"]
    assert asked == []


def test_migrations_started_beside_the_drains_long_pole_are_capped_so_it_keeps_its_stream() -> None:
    # 25 GbE: 64 GiB alone outlasts the source's whole memory over the link, so it decides the drain. The
    # executor, as the simulator, starts the others with libvirt's bandwidth at 575 MiB/s while it sends
    # (2900 less its 600, over 4 streams); the pole itself, and every VM of a fixed anchor, goes uncapped.
    moves = [("big", "src", "dst0", 65536), *((f"s{i}", "src", f"dst{1 + i % 3}", 2048) for i in range(6))]
    scripts = {"big": Script(steps=40, step_s=0.01)}  # in flight while the others come and go
    limits = Limits(migrations_per_source=6, migrations_per_target=6, migrations_per_cluster=6)
    hv = fleet(moves, scripts=scripts)
    report = drain(make_plan(moves), hv, limits, bandwidth_mib_s={"src": 2900})
    assert report.ok
    caps = {vm: opts.bandwidth_mib_s for vm, opts in hv.calls}
    assert caps == {"big": None, **{f"s{i}": 575 for i in range(6)}}
    started = {e.vm: e.detail["bandwidth_mib_s"] for e in report.events if e.kind is EventKind.STARTED}
    assert started == caps  # the record says what the driver was given
    fixed = fleet(moves, scripts=scripts)
    drain(make_plan(moves), fixed, limits, bandwidth_mib_s={"src": 2900}, policy=SchedulerPolicy.fixed(2))
    assert {opts.bandwidth_mib_s for _, opts in fixed.calls} == {None}


def test_where_the_link_decides_the_drain_the_executor_starts_a_moderately_dirty_vm_throttled() -> None:
    # 130 MiB/s of a 600 MiB/s stream: under the plain upfront line (30 %), over the one for a drain its
    # link decides (20 %): auto-converge from the start at 77 %, as the simulator has it. Beside a 64 GiB VM
    # that decides the drain it starts as before.
    limits = Limits(migrations_per_source=6, migrations_per_target=6, migrations_per_cluster=6)
    moves = [(f"v{i}", "src", f"dst{i % 3}", 16384) for i in range(8)]
    hv = fleet(moves)
    assert drain(make_plan(moves), hv, limits, bandwidth_mib_s={"src": 2900}, dirty_rate={"v0": 130.0}).ok
    started = {vm: (o.auto_converge, o.auto_converge_initial_pct) for vm, o in hv.calls}
    assert started["v0"] == (True, 77) and started["v1"] == (False, None)
    pole = [("big", "src", "dst0", 65536), *moves[:4]]
    beside = fleet(pole, scripts={"big": Script(steps=40, step_s=0.01)})
    assert drain(make_plan(pole), beside, limits, bandwidth_mib_s={"src": 2900}, dirty_rate={"v0": 130.0}).ok
    assert {vm: o.auto_converge for vm, o in beside.calls}["v0"] is False


def test_a_migration_that_never_started_is_failed_not_unknown() -> None:
    # the source's libvirtd was gone when the migration was to start: nothing was asked of libvirt, so the
    # VM did not move, though it cannot be located now; "unknown" would send the next run looking for it
    moves = MANY[:1]

    class SourceGone(FakeHypervisor):
        gone = False

        def migrate(self, vm, source, target, options, on_progress=None):  # type: ignore[no-untyped-def]
            self.gone = True
            raise MigrationNotStarted(f"migrating {vm}: not started: cannot connect", source, vm, target)

        def locate(self, vm: str) -> tuple[str, ...]:
            if self.gone:
                raise TransientDriverError("cannot connect to libvirt", host="src0")
            return super().locate(vm)

    report = drain(make_plan(moves), fleet(moves, cls=SourceGone), Limits())
    [result] = report.results
    assert result.outcome is StepOutcome.FAILED and "did not move" in (result.error or ""), result


def test_a_target_that_leaves_service_mid_drain_is_sent_nothing_more() -> None:
    # the operator cordons dst1 once the first migration has ended: what was still meant for it is
    # not started (the flow re-plans it), the rest goes on
    moves = [(f"vm{i}", "src", f"dst{i % 2}", 512) for i in range(6)]
    hv = fleet(moves)
    cordoned: set[str] = set()

    def usable(host: str) -> str | None:
        if hv.finished and host == "dst1":
            cordoned.add(host)
        return "is cordoned (disk errors)" if host in cordoned else None

    report = drain(make_plan(moves), hv, Limits(), policy=SchedulerPolicy.fixed(1), target_usable=usable)
    assert report.withdrawn == ("dst1",)
    refused = [r for r in report.results if r.outcome is StepOutcome.FAILED]
    assert refused and all(r.target == "dst1" and "not started: dst1 is cordoned (disk errors)" in (r.error or "")
                           for r in refused)
    assert all(hv.location[r.vm] == "src" for r in refused)  # never asked of the hypervisor
    assert {vm for vm, _ in hv.calls} == {r.vm for r in report.results if r.outcome is StepOutcome.OK}
    assert all(hv.location[r.vm] == "dst0" for r in report.results if r.target == "dst0")
