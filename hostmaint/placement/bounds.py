"""The order the greedy weighs hosts in: cheapest possible objective growth first.

A fit's growth (``objective.fit_delta``) is at least its host term plus, for a VM that lands in one
cell, the cheapest cell term: ``weight · ((2·used·a + a²) / mem² + ½ · min_c (2·used_c·a + a²) / mem_c / mem)``
for ``a`` MiB. ``evacuate._by_bound`` stops at the first host whose (rank, bound) ranks below the
runner-up found so far, so only a short prefix of this order is ever weighed; computing it is what
costs, once per VM over every target. Above :data:`VECTOR_MIN` targets the bounds are computed as
arrays: the same floating-point operations in the same order as the loop below (each one rounded
alike in IEEE double), so the order, and every plan, is the loop's.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hostmaint.placement.ledger import CellLoad, HostLoad
from hostmaint.placement.objective import CELL_WEIGHT

_USED = operator.attrgetter("used_mib")

# Below this many targets the plain loop is as fast and numpy is not imported at all (~70 ms).
VECTOR_MIN = 256


def by_bound(targets: Sequence[HostLoad], ranks: Mapping[str, int], add: float, one_cell: bool
             ) -> Iterator[tuple[int, float, HostLoad]]:
    """Each target with memory as (rank, bound, host), ordered by (rank, bound, host name).

    ``add``: the MiB the VM adds; ``one_cell``: it lands in one cell, so the cheapest cell term
    counts too. Lazy: the caller stops once the rest cannot win."""
    if len(targets) < VECTOR_MIN:
        return iter(_by_loop(targets, ranks, add, one_cell))
    return _by_arrays(targets, ranks, add, one_cell)


def _by_loop(targets: Sequence[HostLoad], ranks: Mapping[str, int], add: float, one_cell: bool
             ) -> list[tuple[int, float, HostLoad]]:
    add2 = add * add
    ranked = []
    for host in targets:
        mem = host.memory_mib
        if not mem:
            continue
        # (u + a)² - u² = 2ua + a², over the size squared; per cell, weighted by cell size / mem
        used = 0.0
        cheapest = math.inf
        for c in host.cells:
            used += c.used_mib
            if c.memory_mib:
                cheapest = min(cheapest, (2 * c.used_mib * add + add2) / c.memory_mib)
        bound = (2 * used * add + add2) / (mem * mem)
        if one_cell and cheapest < math.inf:  # it lands in one cell: the cheapest bounds the cell term
            bound += CELL_WEIGHT * cheapest / mem
        ranked.append((ranks.get(host.name, 0), host.weight * bound, host.name, host))
    ranked.sort(key=lambda r: (r[0], r[1], r[2]))
    return [(rank, bound, host) for rank, bound, _, host in ranked]


class Targets(list[HostLoad]):
    """A pool of target hosts that is not changed once made (a drain's hosts of one CPU group):
    :func:`by_bound` keeps its layout (cells, sizes, weights) with it, and reads only the load
    (which the ledger changes as it charges) on each call."""

    layout: _Layout | None = None


@dataclass
class _Layout:
    """What stays the same while a pool is planned onto: its cells, in one (hosts × widest) grid."""

    cells: list[CellLoad]  # every host's cells, in order, one after the other
    at: Any  # where each of them sits in the grid (numpy indices), row by row; None: no host is narrower
    width: int
    cell_mem: Any  # numpy arrays: (hosts, width) cell sizes; a padded cell has none
    mem: Any
    weight: Any
    has_mem: Any

    @classmethod
    def of(cls, targets: Sequence[HostLoad]) -> _Layout:
        import numpy as np

        counts = [len(h.cells) for h in targets]
        width = max(counts)
        cells = [c for h in targets for c in h.cells]
        at = None if len(cells) == len(targets) * width else np.array(
            [i * width + j for i, k in enumerate(counts) for j in range(k)], dtype=np.intp)
        mem = np.array([h.memory_mib for h in targets], dtype=np.float64)
        return cls(cells, at, width, _grid(np, len(targets), width, at, [float(c.memory_mib) for c in cells]), mem,
                   np.array([h.weight for h in targets], dtype=np.float64), mem > 0)


def _grid(np: Any, n: int, width: int, at: Any, flat: Any) -> Any:
    # padded cells are empty: adding 0.0 leaves a sum as it was, and the minimum skips them as the loop does
    if at is None:
        return np.asarray(flat, dtype=np.float64).reshape(n, width)
    grid = np.zeros((n, width))
    grid.flat[at] = flat
    return grid


def _by_arrays(targets: Sequence[HostLoad], ranks: Mapping[str, int], add: float, one_cell: bool
               ) -> Iterator[tuple[int, float, HostLoad]]:
    import numpy as np

    layout = targets.layout if isinstance(targets, Targets) else None
    if layout is None:
        layout = _Layout.of(targets)
        if isinstance(targets, Targets):
            targets.layout = layout
    n = len(targets)
    cell_used = _grid(np, n, layout.width, layout.at,
                      np.fromiter(map(_USED, layout.cells), dtype=np.float64, count=len(layout.cells)))
    cell_mem, mem = layout.cell_mem, layout.mem
    add2 = add * add
    used = np.zeros(n)
    for j in range(layout.width):  # left to right, as the loop adds
        used += cell_used[:, j]
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = (2 * used * add + add2) / (mem * mem)
        if one_cell:
            cheapest = np.where(cell_mem > 0, (2 * cell_used * add + add2) / cell_mem, np.inf).min(axis=1)
            bound = np.where(cheapest < np.inf, bound + CELL_WEIGHT * cheapest / mem, bound)
        bound = layout.weight * bound
    rank = np.array([ranks.get(h.name, 0) for h in targets], dtype=np.int64) if ranks else np.zeros(n, np.int64)
    order = np.lexsort((bound, rank))
    order = order[layout.has_mem[order]].tolist()
    bounds = bound.tolist()
    ranks_of = rank.tolist()
    # lexsort keeps equal keys in list order; the loop breaks those ties by host name
    i = 0
    while i < len(order):
        key = (ranks_of[order[i]], bounds[order[i]])
        j = i + 1
        while j < len(order) and (ranks_of[order[j]], bounds[order[j]]) == key:
            j += 1
        tied = order[i:j]
        if len(tied) > 1:
            tied.sort(key=lambda k: targets[k].name)
        for k in tied:
            yield key[0], key[1], targets[k]
        i = j
