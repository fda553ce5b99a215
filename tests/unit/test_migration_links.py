"""A host's migration link: measured by drains where the inventory is silent, probed upward when unsure."""

from __future__ import annotations

import pytest

from hostmaint.migration.links import (
    MIB,
    PROBE,
    LinkMeter,
    LinkObservation,
    estimate_link,
    resolve_link,
    sending_rate,
)


def obs(peak: float, demand: float, host: str = "hv1", streams: int = 2) -> LinkObservation:
    return LinkObservation(host, peak, demand, streams)


def samples(rate_mib_s: float, seconds: float, start: float = 0.0, step: float = 0.5) -> list[tuple[float, int]]:
    """Progress samples of a migration sending ``rate_mib_s`` from ``start`` for ``seconds``."""
    n = int(seconds / step)
    return [(start + i * step, int(rate_mib_s * i * step * MIB)) for i in range(n + 1)]


# --- one migration's rate ---------------------------------------------------------------


def test_sending_rate_needs_a_full_window() -> None:
    assert sending_rate(samples(400, 0.5)) is None  # half a second of history is not enough
    assert sending_rate(samples(400, 2.0)) == pytest.approx(400, rel=0.01)


def test_sending_rate_looks_at_the_latest_window_only() -> None:
    slow_then_fast = samples(100, 3.0) + [(3.5, int((300 + 600 * 0.5) * MIB)), (4.0, int((300 + 600) * MIB))]
    assert sending_rate(slow_then_fast) == pytest.approx(600, rel=0.01)


# --- the meter -----------------------------------------------------------------------------


def test_meter_keeps_the_best_moment_with_its_demand() -> None:
    meter = LinkMeter()
    meter.observe("hv1", [(600.0, samples(500, 2.0))])
    meter.observe("hv1", [(600.0, samples(550, 2.0)), (600.0, samples(550, 2.0))])
    meter.observe("hv1", [(600.0, samples(300, 2.0))])
    (best,) = meter.observations()
    assert (best.host, best.streams, best.demand_mib_s) == ("hv1", 2, 1200.0)
    assert best.peak_mib_s == pytest.approx(1100, rel=0.01)
    assert not best.saturated  # 1200 asked, 1100 went: within the margin, so only "at least 1100"


def test_meter_skips_a_moment_when_one_migration_has_just_started() -> None:
    meter = LinkMeter()
    meter.observe("hv1", [(600.0, samples(500, 2.0)), (600.0, samples(500, 0.5))])
    assert meter.observations() == ()  # the newcomer's rate is unknown: the sum would under-count


def test_meter_keeps_sources_apart() -> None:
    meter = LinkMeter()
    meter.observe("hv2", [(600.0, samples(100, 2.0))] * 3)
    meter.observe("hv1", [(600.0, samples(500, 2.0))])
    hv1, hv2 = meter.observations()
    assert (hv1.host, hv2.host) == ("hv1", "hv2")
    assert hv2.saturated and hv2.peak_mib_s == pytest.approx(300, rel=0.01)


# --- the estimate --------------------------------------------------------------------------


def test_saturated_drains_measure_the_link_by_their_median() -> None:
    figure = estimate_link([obs(110, 1200), obs(130, 1200), obs(100, 600)], default_mib_s=1100)
    assert figure is not None
    assert (figure.mib_s, figure.basis) == (110, "measured")  # a 1 GbE link, not the 10 GbE default


def test_a_lower_bound_below_the_default_keeps_the_default() -> None:
    figure = estimate_link([obs(600, 600, streams=1)], default_mib_s=1100)
    assert figure is not None and (figure.mib_s, figure.basis) == (1100, "default")


def test_a_lower_bound_above_the_default_is_probed_upward() -> None:
    figure = estimate_link([obs(1800, 1800, streams=3)], default_mib_s=1100)
    assert figure is not None
    assert figure.basis == "probing" and figure.mib_s == pytest.approx(1800 * PROBE)


def test_probing_converges_on_the_real_link() -> None:
    """Drains that ask for the probed figure get ``min(asked, link)``: the estimate climbs, then
    a saturated drain pins it to the real link, and there it stays."""
    link, stream = 2900.0, 600.0
    history: list[LinkObservation] = []
    assert estimate_link(history, 1100) is None
    asked_for = 1100.0  # nothing measured yet: the default
    seen = []
    for _ in range(8):
        streams = max(1, -(-int(asked_for) // int(stream)))  # the scheduler fills what it believes
        demand = streams * stream
        history.insert(0, obs(min(demand, link), demand, streams=streams))
        figure = estimate_link(history, 1100)
        assert figure is not None
        asked_for = figure.mib_s
        seen.append((figure.basis, figure.mib_s))
    assert seen[-1] == ("measured", link)
    assert all(value <= link * PROBE for _, value in seen)


def test_a_faster_link_is_noticed_after_it_was_measured() -> None:
    figure = estimate_link([obs(2000, 2000, streams=4), obs(1100, 1800), obs(1100, 1800)], default_mib_s=1100)
    assert figure is not None and figure.basis == "probing" and figure.mib_s == pytest.approx(2000 * PROBE)


def test_only_recent_drains_count() -> None:
    old = [obs(110, 1200)] * 20
    new = [obs(1000, 1200)] * 10
    figure = estimate_link(new + old, default_mib_s=1100)
    assert figure is not None and figure.mib_s == 1000


def test_no_observation_no_estimate() -> None:
    assert estimate_link([], 1100) is None


# --- inventory first -------------------------------------------------------------------------


def test_inventory_wins_over_measurement() -> None:
    measured = [obs(110, 1200)]
    assert resolve_link(2900, 1100, measured, 1100).basis == "inventory (host)"
    assert resolve_link(None, 1100, measured, 1100).basis == "inventory (cluster)"
    figure = resolve_link(None, None, measured, 1100)
    assert (figure.mib_s, figure.basis) == (110, "measured")
    assert resolve_link(None, None, [], 1100).basis == "default"
