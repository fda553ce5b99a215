"""The balance objective: the memory-weighted sum of squared utilisations of hosts and cells.

Squares punish the fullest hosts most, so minimising the sum spreads load
evenly. Each host's term is weighted by its memory relative to the cluster's
mean host (``HostLoad.weight``): without the weight, the minimum of a plain
sum of squares would load big hosts *more* than small ones; with it, the
minimum is every host (and every cell) at the same utilisation. A host's cells
together weigh as much as the host, each in proportion to its size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from hostmaint.models import Balance
from hostmaint.placement.ledger import Fit, HostLoad

CELL_WEIGHT = 0.5  # a host's cells together, relative to the host itself


def host_cost(host: HostLoad) -> float:
    """This host's share of the objective."""
    mem = host.memory_mib
    if not mem:
        return 0.0
    cell_part = sum(c.memory_mib / mem * c.util**2 for c in host.cells)
    return host.weight * (host.util**2 + CELL_WEIGHT * cell_part)


def fit_delta(host: HostLoad, fit: Fit) -> float:
    """How much the objective grows if ``fit`` is charged onto ``host`` (smaller is better)."""
    mem = host.memory_mib
    if not mem:
        return math.inf
    added = sum(fit.cell_mib)
    used = host.used_mib
    delta = ((used + added) / mem) ** 2 - (used / mem) ** 2
    for cell_id, mib in zip(fit.cells, fit.cell_mib, strict=True):
        cell = host.cell(cell_id)
        if cell.memory_mib:
            delta += CELL_WEIGHT * cell.memory_mib / mem * (((cell.used_mib + mib) / cell.memory_mib) ** 2
                                                            - cell.util**2)
    return host.weight * delta


def release_delta(host: HostLoad, mib: float) -> float:
    """How much the objective changes if a VM of ``mib`` leaves ``host`` (cells give back pro rata)."""
    mem = host.memory_mib
    used = host.used_mib
    if not mem or used <= 0:
        return 0.0
    mib = min(mib, used)
    delta = ((used - mib) / mem) ** 2 - (used / mem) ** 2
    for cell in host.cells:
        if cell.memory_mib:
            share = min(cell.used_mib, mib * cell.used_mib / used)
            delta += CELL_WEIGHT * cell.memory_mib / mem * (((cell.used_mib - share) / cell.memory_mib) ** 2
                                                            - cell.util**2)
    return host.weight * delta


def balance(hosts: Iterable[HostLoad]) -> float:
    """The objective over a set of hosts."""
    return sum(host_cost(h) for h in hosts)


def spread(utils: list[float]) -> tuple[float, float, float]:
    """(max/mean, standard deviation, mean) of utilisations; (0, 0, 0) for none."""
    if not utils:
        return 0.0, 0.0, 0.0
    mean = sum(utils) / len(utils)
    std = math.sqrt(sum((u - mean) ** 2 for u in utils) / len(utils))
    return (max(utils) / mean if mean else 0.0), std, mean


def measure(hosts: Iterable[HostLoad], numa_remote: int = 0) -> Balance:
    """What a plan reports about how even the hosts are: max/mean (mean weighted by capacity), σ."""
    hosts = list(hosts)
    cells = [c for h in hosts for c in h.cells if c.memory_mib]
    if not hosts or not cells:
        return Balance(numa_remote=numa_remote)

    def max_mean_std(pairs: list[tuple[float, int]]) -> tuple[float, float]:
        utils = [u / m for u, m in pairs if m]
        weighted = sum(u for u, _ in pairs) / sum(m for _, m in pairs)
        mean = sum(utils) / len(utils)
        std = math.sqrt(sum((x - mean) ** 2 for x in utils) / len(utils))
        return (max(utils) / weighted if weighted else 0.0), std

    hmm, hstd = max_mean_std([(h.used_mib, h.memory_mib) for h in hosts])
    cmm, cstd = max_mean_std([(c.used_mib, c.memory_mib) for c in cells])
    return Balance(hosts=len(hosts), host_max_mean=round(hmm, 4), host_std=round(hstd, 4),
                   cell_max_mean=round(cmm, 4), cell_std=round(cstd, 4), numa_remote=numa_remote,
                   objective=round(balance(hosts), 6))
