"""A host's migration link: what the inventory says, or else what past drains measured.

The scheduler fills a source's link and no more, so it must know the link. An inventory figure
always wins (an operator knows the NIC and what else shares it). Without one, hostmaint uses what
earlier drains from that host actually pushed:

* during a drain, :class:`LinkMeter` watches the migrations that are sending memory and keeps, per
  source, the highest outbound rate they sustained together over a second, and what those same
  migrations could have pushed on their own (their streams' sum, the *demand*);
* if the demand was well above what got through (:data:`SATURATION`), the link was the bottleneck
  and the peak *is* the link: a measurement;
* if not, the migrations themselves were the bottleneck and the peak only says "at least this".
  Such a lower bound above the default is used with head-room (:data:`PROBE`), so the next drain asks
  for more than was seen and finds out whether the link has it; otherwise a drain that once ran few
  migrations would pin the estimate low for ever.

:func:`estimate_link` turns a host's recent observations into a :class:`LinkFigure`, and
:func:`resolve_link` decides between inventory, measurement and default. Everything here is pure.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

MIB = 1024 * 1024
SATURATION = 1.2  # demand ≥ this × what got through: the link, not the migrations, set the pace
PROBE = 1.25  # a lower bound above the default is used this much higher, to find the real link
RECENT = 10  # observations per host an estimate looks at (newest first)
WINDOW_S = 1.0  # a rate counts once a migration has sent for this long (no set-up, no single-sample spikes)


@dataclass(frozen=True)
class LinkObservation:
    """What one drain saw of a source host's link."""

    host: str
    peak_mib_s: float  # highest outbound rate its sending migrations sustained together
    demand_mib_s: float  # what those migrations could have pushed on their own, summed
    streams: int  # how many migrations were sending then

    @property
    def saturated(self) -> bool:
        """True when the link held the migrations back: the peak is the link itself."""
        return self.demand_mib_s >= SATURATION * self.peak_mib_s


@dataclass(frozen=True)
class LinkFigure:
    """The link bandwidth the scheduler uses for a host, and where the figure came from."""

    mib_s: float
    basis: str  # "inventory (host)", "inventory (cluster)", "measured", "probing", "default"
    note: str = ""


def sending_rate(samples: Sequence[tuple[float, int]], window_s: float = WINDOW_S) -> float | None:
    """A migration's sending rate in MiB/s over its last ``window_s`` seconds of samples
    ((seconds, bytes processed so far), oldest first), or None if they span less than that."""
    if len(samples) < 2:
        return None
    t_last, b_last = samples[-1]
    for t, b in reversed(samples[:-1]):
        if t_last - t >= window_s:
            return max(0.0, (b_last - b) / MIB / (t_last - t))
    return None


class LinkMeter:
    """Keeps, per source host, the best moment of one drain: the most its migrations pushed together."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._best: dict[str, LinkObservation] = {}

    def observe(self, source: str, sending: Sequence[tuple[float, Sequence[tuple[float, int]]]]) -> None:
        """One look at ``source``: for every migration sending memory from it now, its stream rate
        (MiB/s it could push alone) and its progress samples."""
        if not sending:
            return
        total = demand = 0.0
        for stream_mib_s, samples in sending:
            rate = sending_rate(samples, self.window_s)
            if rate is None:
                return  # one of them just started: the sum would under-count what the link carries
            total += rate
            demand += stream_mib_s
        best = self._best.get(source)
        if total > 0 and (best is None or total > best.peak_mib_s):
            self._best[source] = LinkObservation(source, round(total, 1), round(demand, 1), len(sending))

    def observations(self) -> tuple[LinkObservation, ...]:
        """One observation per source that had a countable moment, by host name."""
        return tuple(self._best[h] for h in sorted(self._best))


def estimate_link(observations: Sequence[LinkObservation], default_mib_s: float) -> LinkFigure | None:
    """A host's link from its recent drains (newest first), or None when none was ever measured.

    Saturated drains measure it (their median, so one odd night does not swing it). Drains that were
    not saturated only bound it from below: above the measurement, the link has become faster; above
    the default, the default is wrong. In both cases the figure is that bound with :data:`PROBE`
    head-room. A bound below the default leaves the default in place."""
    recent = list(observations)[:RECENT]
    if not recent:
        return None
    saturated = [o.peak_mib_s for o in recent if o.saturated][:5]
    at_least = max((o.peak_mib_s for o in recent if not o.saturated), default=0.0)
    if saturated:
        measured = statistics.median(saturated)
        if at_least <= measured:
            return LinkFigure(round(measured, 1), "measured",
                              f"median of {len(saturated)} saturated drain(s)")
        return LinkFigure(round(at_least * PROBE, 1), "probing",
                          f"{at_least:.0f} MiB/s seen, above the {measured:.0f} MiB/s measured before")
    if at_least > default_mib_s:
        return LinkFigure(round(at_least * PROBE, 1), "probing",
                          f"at least {at_least:.0f} MiB/s seen, never saturated")
    return LinkFigure(default_mib_s, "default", f"drains so far were not saturated (at most {at_least:.0f} MiB/s)")


def resolve_link(host_mib_s: float | None, cluster_mib_s: float | None,
                 observations: Sequence[LinkObservation], default_mib_s: float) -> LinkFigure:
    """The figure the scheduler uses for one host: the host's inventory entry, else the cluster's,
    else what past drains measured, else ``default_mib_s``."""
    if host_mib_s is not None:
        return LinkFigure(float(host_mib_s), "inventory (host)")
    if cluster_mib_s is not None:
        return LinkFigure(float(cluster_mib_s), "inventory (cluster)")
    return estimate_link(observations, default_mib_s) or LinkFigure(default_mib_s, "default", "never measured")
