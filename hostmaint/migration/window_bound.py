"""A tighter lower bound on a window's makespan: whole hosts in the maintenance slots, and where the VMs
of the hosts drained before the first patch can go.

:func:`~hostmaint.migration.simulate.window_floor_bound` counts work in the fluid sense (the escapes
after the first patch, within the cluster's slots and links) and whole hosts only by the length of
one of them. What it cannot see is that the hosts drained before the first patch have nowhere to send
their VMs but hosts not yet in maintenance, with only so much free memory, which must drain them
again; at 30 hosts and 12 at once that is a fifth of the cluster's memory. :func:`window_slot_bound`
keeps that, as a linear programme over the ways a maintenance slot can be filled (its proof:
benchmarks/RESULTS.md, "The night against its bound"):

* hosts in maintenance at most ``k`` at once fit ``k`` slots one after another; a host holds its slot
  at least ``ℓ_h`` = its own floor drain + the patch;
* ``P``, the first patch, is at least the shortest ``ℓ``. A host whose maintenance began before ``P``
  (*early*) is the first of its slot (nothing ended before ``P``), so a slot led by a *late* host is
  empty until ``P``;
* an early host's VMs that leave it before ``P`` land on hosts whose maintenance has not begun (none
  is patched), which send them again. Summed over the hosts, the early hosts' own memory is sent
  again after ``P``: by a late host that took it in before its maintenance (at most its free memory,
  and lengthening its drain at its link), or by an early host after ``P`` (which then patches after
  that: ``P`` + set-up + what it sends ÷ its link + the patch). A slot can take in only so much.

For a candidate makespan ``T`` every way of filling one slot is a column (its hosts, early-led or not,
and how much of the early memory it can take in at most), and the LP asks whether ``k`` slots can hold
every host once and take in at least what their early hosts bring. When not even fractionally, no
schedule ends by ``T``. Pure and deterministic (GLOP, OR-Tools' LP solver).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from hostmaint.migration.policy import SchedulerPolicy, stream_rate
from hostmaint.migration.simulate import SimParams, WindowFloor, window_floor_bound
from hostmaint.models import FleetSnapshot, HostState, MigrationOptions

# Beyond this many columns (slots of 4+ hosts on a large window) the LP is not built: the bound is
# then the others' (still valid, only weaker).
MAX_COLUMNS = 100_000
# ... and the whole search stops once its LPs have held this many columns together (what it proved so
# far stands): a window of 4-6 hosts a slot would otherwise build LPs of ~10^5 columns dozens of times
MAX_WORK = 500_000
STEP = 0.005  # the search for the first feasible makespan rises by this share of the lower end
RESOLUTION_S = 0.5  # and then halves the gap down to this


@dataclass(frozen=True)
class WindowSlots:
    """The slot bound and what it is made of (seconds)."""

    floor: WindowFloor  # window_floor_bound, which this only adds to
    packing_s: float  # whole hosts in the k slots, counted by how many a slot must hold
    slots_s: float  # the LP's: no schedule ends by this (0 when not built)

    @property
    def bound_s(self) -> float:
        """No schedule of the window within the limits ends sooner."""
        return max(self.floor.total_s, self.packing_s, self.slots_s)


@dataclass(frozen=True)
class SlotHost:
    name: str
    hold_s: float  # ℓ: its own floor drain and the patch
    sends_s: float  # the part of ℓ that memory taken in adds to: set-up + its own memory ÷ rate + patch
    memory_mib: float  # its own VMs
    usable_mib: float  # the most VM memory it may hold
    rate: float  # MiB/s it sends at most: what it took in lengthens its drain by that ÷ this

    @property
    def room_mib(self) -> float:
        return max(0.0, self.usable_mib - self.memory_mib)


def packing_bound(lengths: Sequence[float], k: int) -> float:
    """Hosts whose maintenance lasts at least ``lengths``, at most ``k`` at once, cannot all be done
    sooner. The intervals fit ``k`` slots one after another (an interval family with at most ``k``
    at once is ``k``-colourable), so some slot holds ``c`` = ⌈n ÷ k⌉ or more hosts. If one holds
    ``c`` + 1, it lasts at least the ``c`` + 1 shortest; if none does, at least ``n − (c − 1)·k``
    slots hold exactly ``c``, together at least the ``c·x`` shortest, the longest of them at least
    their share."""
    each = sorted(lengths)
    n = len(each)
    if n == 0:
        return 0.0
    k = max(1, min(k, n))
    c = math.ceil(n / k)
    x = n - (c - 1) * k
    fuller = sum(each[:c + 1]) if n > c else math.inf
    return min(fuller, sum(each[:c * x]) / x)


def slot_hosts(snapshot: FleetSnapshot, names: Sequence[str], *, patch_s: float, policy: SchedulerPolicy,
               options: MigrationOptions = MigrationOptions(), params: SimParams = SimParams()) -> list[SlotHost]:
    """What :func:`window_slot_bound` knows of each host of the window (in ``names``' order)."""
    limits = snapshot.limits
    setup = params.setup(options)
    into = max((params.link(h.name) for h in snapshot.hosts), default=params.default_link_mib_s)

    def stream(host: str) -> float:
        return stream_rate(options, policy, min(params.link(host), into))

    def send_rate(host: str) -> float:  # as window_floor_bound: its link, or its slots' streams
        if policy.adaptive:
            return params.link(host)
        return min(params.link(host), stream(host) * min(limits.migrations_per_source, limits.migrations_per_cluster))

    due = set(names)
    own: dict[str, list[int]] = {n: [] for n in names}
    for v in snapshot.vms:
        if v.host in due:
            own[v.host].append(v.memory_mib)
    by_name = {h.name: h for h in snapshot.hosts}
    head = limits.memory_headroom_pct / 100
    hosts = []
    for n in names:
        sizes = own[n]
        drain = setup + max(sum(sizes) / send_rate(n), max(sizes) / stream(n)) if sizes else 0.0
        h = by_name[n]
        # the most VM memory the simulator or the planner lets a host hold, the larger reading (the
        # planner's: what its guests leave free, at most memory × overcommit, less the reservation
        # and the headroom)
        usable = max((h.memory_mib - h.reserved_memory_mib) * (1 - head),
                     h.memory_mib * (limits.memory_overcommit - head) - h.reserved_memory_mib)
        sends = setup + sum(sizes) / send_rate(n) if sizes else 0.0
        hosts.append(SlotHost(n, drain + patch_s, sends + patch_s, float(sum(sizes)), usable, send_rate(n)))
    return hosts


def window_slot_bound(snapshot: FleetSnapshot, names: Sequence[str], k: int, *, patch_s: float,
                      policy: SchedulerPolicy | None = None, options: MigrationOptions = MigrationOptions(),
                      params: SimParams = SimParams()) -> WindowSlots:
    """A lower bound on the makespan of every window over ``names`` (``k`` hosts in maintenance at
    once), at least :func:`window_floor_bound`'s. Pure and deterministic."""
    policy = policy or SchedulerPolicy()
    floor = window_floor_bound(snapshot, names, k, patch_s=patch_s, policy=policy, options=options, params=params)
    setup = params.setup(options)
    hosts = slot_hosts(snapshot, names, policy=policy, options=options, params=params, patch_s=patch_s)
    packing = packing_bound([h.hold_s for h in hosts], k)
    due = set(names)
    outside = any(h.state is HostState.ACTIVE and h.name not in due for h in snapshot.hosts)
    if outside or not hosts or not any(h.memory_mib for h in hosts):
        # a host outside the window takes VMs from the start: no first-patch wait to build on
        return WindowSlots(floor, packing, 0.0)
    lower = max(floor.total_s, packing)
    return WindowSlots(floor, packing, _first_feasible(hosts, min(k, len(hosts)), patch_s + setup, lower))


def _first_feasible(hosts: list[SlotHost], k: int, patch_setup: float, lower: float) -> float:
    """The largest makespan the LP proves no schedule reaches (0: none above ``lower``)."""
    proven = 0.0
    t = lower
    feasible = None
    work = [MAX_WORK]  # columns the search may still build
    for step in range(1, 201):  # rise until the LP finds room
        verdict = _possible(hosts, k, patch_setup, t, work)
        if verdict is None:
            return proven  # too many columns: no further claim
        if verdict:
            feasible = t
            break
        proven = t
        t = lower * (1 + STEP * step)
    if feasible is None:
        return proven
    lo, hi = proven, feasible
    while proven and hi - lo > RESOLUTION_S:
        mid = (lo + hi) / 2
        verdict = _possible(hosts, k, patch_setup, mid, work)
        if verdict is None:
            break
        if verdict:
            hi = mid
        else:
            lo = proven = mid
    return proven


@dataclass(frozen=True)
class SlotColumn:
    """One way to fill a maintenance slot by a makespan: its hosts (indices into the hosts), and what
    it can take in of the early hosts' memory."""

    hosts: tuple[int, ...]
    early: bool  # led by a host whose maintenance began before the first patch
    value: float  # MiB of the early memory it takes in at most, less what its early host brings
    leader: int | None = None  # the early host (early-led only)


def slot_columns(hosts: list[SlotHost], patch_setup: float, t: float) -> Iterator[SlotColumn]:
    """Every way one slot can be filled by ``t``, with what it can take in of the early hosts' memory.

    Late-led: its hosts begin at or after P ≥ ℓ_min; each takes in at most its free memory, all of it
    at most at the slot's fastest link in the time the slot has left. Early-led by g: g first (from 0,
    ℓ_g), then the late hosts; if g also sends after P (it took in VMs or kept its own), it patches
    after P + set-up + that ÷ its link: it can take in at most its usable memory, the slot's time after
    P + set-up + patch, less its late hosts'. Either way g's own memory is owed."""
    order = sorted(range(len(hosts)), key=lambda i: hosts[i].hold_s)
    first = hosts[order[0]].hold_s  # P ≥ the shortest ℓ: the first patched host's own drain and patch

    def grow(chosen: list[int], at: int, used: float) -> Iterator[list[int]]:
        for j in range(at, len(order)):
            i = order[j]
            if used + hosts[i].hold_s > t:
                return  # sorted: every later host is longer
            chosen.append(i)
            yield chosen
            yield from grow(chosen, j + 1, used + hosts[i].hold_s)
            chosen.pop()

    for chosen in grow([], 0, 0.0):
        members = tuple(sorted(chosen))
        held = sum(hosts[i].hold_s for i in members)
        # what taken-in memory lengthens: a host's drain is max(memory ÷ rate, its largest VM ÷ a
        # stream), so only the memory term grows with it
        sending = sum(hosts[i].sends_s for i in members)
        rate = max(hosts[i].rate for i in members)
        if first + held <= t:
            room = sum(hosts[i].room_mib for i in members)
            yield SlotColumn(members, False, min(room, rate * max(0.0, t - first - sending)))
        for g in members:
            late = [i for i in members if i != g]
            late_sending = sending - hosts[g].sends_s
            room = sum(hosts[i].room_mib for i in late)
            keep = min(room, max(hosts[i].rate for i in late) * max(0.0, t - hosts[g].hold_s - late_sending)) \
                if late else 0.0
            spare = t - first - patch_setup - late_sending
            span = min(room + hosts[g].usable_mib, rate * spare) if spare > 0 else 0.0
            yield SlotColumn(members, True, max(keep, span) - hosts[g].memory_mib, g)


def _possible(hosts: list[SlotHost], k: int, patch_setup: float, t: float, work: list[int]) -> bool | None:
    """Whether the LP leaves room for a schedule ending by ``t`` (None: too many columns to say, for
    this LP or for what ``work`` has left)."""
    from ortools.linear_solver import pywraplp  # with OR-Tools' import cost, only when asked

    columns = []
    for c in slot_columns(hosts, patch_setup, t):
        columns.append(c)
        if len(columns) > min(MAX_COLUMNS, work[0]):
            return None
    work[0] -= len(columns)
    if not columns:
        return False
    solver = pywraplp.Solver.CreateSolver("GLOP")
    y = [solver.NumVar(0.0, 1.0, "") for _ in columns]
    covers: list[list[int]] = [[] for _ in hosts]
    for j, c in enumerate(columns):
        for i in c.hosts:
            covers[i].append(j)
    for js in covers:
        if not js:
            return False  # a host fits no slot by t
        solver.Add(sum(y[j] for j in js) == 1)
    solver.Add(sum(y) <= k)
    solver.Add(sum(y[j] for j, c in enumerate(columns) if c.early) >= 1)  # the first patched host is early
    scale = max(1.0, max(abs(c.value) for c in columns))
    solver.Maximize(sum((c.value / scale) * y[j] for j, c in enumerate(columns)))
    status = solver.Solve()
    if status == pywraplp.Solver.INFEASIBLE:
        return False
    if status != pywraplp.Solver.OPTIMAL:
        return True  # no proof either way: claim nothing
    # the early memory must all be taken in; a hair of tolerance for the solver's arithmetic
    return solver.Objective().Value() >= -1e-7 * len(hosts)
