"""Dirty-rate probing before a drain: measured where the driver can, unknown (never guessed) where not."""

from __future__ import annotations

from hostmaint.drivers.base import DirtyRateProbe
from hostmaint.errors import TransientDriverError
from hostmaint.migration.probe import probe_dirty_rates


class Probing:
    def __init__(self, rates: dict[str, dict[str, float]], broken: tuple[str, ...] = ()) -> None:
        self.rates, self.broken, self.asked = rates, broken, []

    def measure_dirty_rates(self, host: str, seconds: float = 1.0) -> dict[str, float]:
        self.asked.append((host, seconds))
        if host in self.broken:
            raise TransientDriverError("libvirtd does not answer", host)
        return dict(self.rates.get(host, {}))


class NotProbing:
    pass


def test_rates_of_the_vms_asked_for_only() -> None:
    hv = Probing({"hv01": {"a": 120.0, "b": 0.5, "other": 9.0}})
    assert isinstance(hv, DirtyRateProbe)
    rates, notes = probe_dirty_rates(hv, ["hv01"], ["a", "b"], seconds=3)  # type: ignore[arg-type]
    assert rates == {"a": 120.0, "b": 0.5} and notes == []
    assert hv.asked == [("hv01", 3)]


def test_an_unmeasured_vm_stays_unknown_and_is_named() -> None:
    hv = Probing({"hv01": {"a": 120.0}, "hv02": {"c": 4.0}}, broken=("hv02",))
    rates, notes = probe_dirty_rates(hv, ["hv01", "hv02"], ["a", "b", "c"])  # type: ignore[arg-type]
    assert rates == {"a": 120.0}
    assert any("hv02" in n and "libvirtd does not answer" in n for n in notes)
    assert any("b, c" in n for n in notes)


def test_a_driver_that_cannot_measure_changes_nothing() -> None:
    rates, notes = probe_dirty_rates(NotProbing(), ["hv01"], ["a"])  # type: ignore[arg-type]
    assert rates == {} and notes == ["this driver cannot measure dirty rates"]
