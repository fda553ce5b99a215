"""Patch window schedules (``windows.yaml``): when each cluster's window opens, how long it lasts,
how many hosts it takes at once, and the dates it skips.

Pure: the file is read strictly and every bad field is named (exit 2); ``deployments/serve.py``
turns a window into a Prefect schedule, ``hostmaint inventory check --windows`` checks one.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dateutil.rrule import rrulestr
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hostmaint.config_file import load_yaml
from hostmaint.errors import InputError
from hostmaint.placement.exact import DEFAULT_BUDGET

EXCLUSION_HORIZON_YEARS = 10


# The bounds a window's numbers share with the patch-window flow's own parameters (flows/common.py):
# a windows.yaml that loads never makes runs the flow refuses
WINDOW_MINUTES_MAX = 7 * 24 * 60
HOSTS_AT_ONCE_MAX = 1024  # as the cluster limit max_hosts_in_maintenance


class WindowConfig(BaseModel):
    """When a cluster's patch window opens, how long it lasts, and how many hosts it takes at once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rrule: Annotated[str, Field(min_length=5, description="RFC 5545 RRULE (without DTSTART), local time")]
    timezone: str = "UTC"
    starts: date = date(2026, 1, 1)
    window_minutes: Annotated[float, Field(gt=0, le=WINDOW_MINUTES_MAX)] = 240
    max_hosts_in_parallel: Annotated[int, Field(ge=1, le=HOSTS_AT_ONCE_MAX)] = 1
    max_failed_hosts: Annotated[int, Field(ge=0)] = 0
    # deterministic seconds for the planner's exact stage (placement/exact.py); 0: greedy only
    exact_budget: Annotated[float, Field(ge=0, le=600)] = DEFAULT_BUDGET
    exclude: list[date] = Field(default_factory=list)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {v!r} (use an IANA name such as Asia/Tokyo)") from None
        return v

    @field_validator("rrule")
    @classmethod
    def _rule(cls, v: str) -> str:
        v = v.strip().removeprefix("RRULE:")
        if "DTSTART" in v or "\n" in v:
            raise ValueError("give only the RRULE part; the start is 'starts' and exclusions are 'exclude'")
        try:
            rrulestr(f"DTSTART:20260101T000000\nRRULE:{v}")
        except ValueError as exc:
            raise ValueError(f"not a valid RRULE {v!r}: {exc}") from None
        return v


def _window_config(path: Path, where: str, data: Any) -> WindowConfig:
    """One window's settings, or InputError naming the file and each bad field (``default.rrule: ...``)."""
    if not isinstance(data, dict):
        raise InputError(f"{path}: {where}: must be a mapping of window settings, got {type(data).__name__}")
    try:
        return WindowConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = ".".join(str(p) for p in (where, *err["loc"]))
            msg = str(err["msg"]).removeprefix("Value error, ")
            problems.append(f"{field}: {'unknown field' if err['type'] == 'extra_forbidden' else msg}")
        raise InputError(f"{path}: " + "; ".join(problems)) from None


def load_windows(path: Path, known: Collection[str] | None = None) -> tuple[WindowConfig, dict[str, WindowConfig]]:
    """Read windows.yaml: the default window and every cluster's override (merged onto the default).

    ``known``: the inventory's clusters. An override naming none of them is refused: it is almost
    always a typo, and the cluster it meant would silently run on the default window (another
    timezone, another size).
    """
    raw = load_yaml(path) or {}  # strict: UTF-8, no key given twice (exit 2 naming file and lines)
    if not isinstance(raw, dict):
        raise InputError(f"{path}: top level: must be a mapping with default: and clusters:, "
                         f"got {type(raw).__name__}")
    if not isinstance(raw.get("clusters") or {}, dict):
        raise InputError(f"{path}: clusters: must be a mapping {{cluster: overrides}}, "
                         f"got {type(raw['clusters']).__name__}")
    default = _window_config(path, "default", raw.get("default") or {})
    clusters = {name: _window_config(path, f"clusters.{name}", {**default.model_dump(), **(over or {})})
                for name, over in (raw.get("clusters") or {}).items()}
    if known is not None:
        unknown = sorted(str(name) for name in clusters if name not in known)
        if unknown:
            raise InputError(f"{path}: clusters: {', '.join(map(repr, unknown))}: no cluster of the inventory is "
                             f"called that (its clusters: {', '.join(sorted(known)) or 'none'}); correct the "
                             f"name or remove the override, else that cluster runs on the default window")
    return default, clusters


@dataclass(frozen=True)
class ClockChange:
    """A window whose local start does not exist: the clocks jump over it (DST begins)."""

    nominal: datetime  # naive local time the rule names, e.g. 02:30
    opens: datetime  # naive local time the window really opens, e.g. 03:30 (RFC 5545: the offset before the gap)


def _horizon(cfg: WindowConfig, today: date) -> tuple[datetime, datetime]:
    start = datetime.combine(cfg.starts, time(0, 0))
    last = datetime.combine(max(cfg.starts, today), time(0, 0)) + timedelta(days=366 * EXCLUSION_HORIZON_YEARS)
    return start, last


def _offset(zone: ZoneInfo, instant: datetime) -> timedelta:
    return instant.astimezone(zone).utcoffset() or timedelta(0)


def _gaps(zone: ZoneInfo, start: datetime, end: datetime) -> list[tuple[datetime, datetime, timedelta]]:
    """The zone's nonexistent local times between naive local ``start`` and ``end``: [from, to) and the jump.

    Found by sampling the UTC offset every 6 hours (no zone changes its clocks twice within that) and
    bisecting each forward change to the second.
    """
    step = timedelta(hours=6)
    at = start.replace(tzinfo=UTC) - timedelta(days=1)
    stop = end.replace(tzinfo=UTC) + timedelta(days=1)
    gaps = []
    before = _offset(zone, at)
    while at < stop:
        nxt = at + step
        after = _offset(zone, nxt)
        if after > before:
            lo, hi = at, nxt  # offset(lo) == before, offset(hi) == after: the jump is in (lo, hi]
            while hi - lo > timedelta(seconds=1):
                mid = lo + (hi - lo) / 2
                lo, hi = (mid, hi) if _offset(zone, mid) == before else (lo, mid)
            jump = hi.replace(microsecond=0)
            gaps.append(((jump + before).replace(tzinfo=None), (jump + after).replace(tzinfo=None), after - before))
        before, at = after, nxt
    return gaps


def clock_changes(cfg: WindowConfig, today: date | None = None) -> list[ClockChange]:
    """The windows, within the horizon, that the rule puts at a local time the clocks skip.

    Prefect (through dateutil) reads such a time with the offset *after* the jump: a 02:30 window on
    the night European clocks go forward would start at 01:30, an hour before the window an operator
    agreed. RFC 5545 reads it with the offset before the jump, 03:30, which is also what cron-like
    schedulers do (never early); ``window_rrule`` moves each such window there. Excluded dates are
    not listed.
    """
    zone = ZoneInfo(cfg.timezone)
    start, last = _horizon(cfg, today or datetime.now(UTC).date())
    rule = rrulestr(f"DTSTART:{start:%Y%m%dT%H%M%S}\nRRULE:{cfg.rrule}")
    excluded = set(cfg.exclude)
    changes = []
    for gap_from, gap_to, jump in _gaps(zone, start, last):
        for nominal in rule.between(gap_from, gap_to, inc=True):
            if nominal < gap_to and nominal.date() not in excluded:
                changes.append(ClockChange(nominal=nominal, opens=nominal + jump))
    return changes


def window_rrule(cfg: WindowConfig, today: date | None = None) -> str:
    """The full rule for Prefect: DTSTART, the RRULE, an EXDATE per excluded window, in local time.

    An excluded date on which no window falls is refused (naming the nearest window
    dates): it is almost always a typo, and silently keeping the window would be worse. A window
    the rule puts in the hour the clocks skip is moved past the jump (``clock_changes``): its
    nominal time is excluded and the real one added as an RDATE.
    """
    start, horizon = _horizon(cfg, today or datetime.now(UTC).date())
    text = f"DTSTART:{start:%Y%m%dT%H%M%S}\nRRULE:{cfg.rrule}"
    excluded: list[datetime] = []
    if cfg.exclude:
        occurrences = rrulestr(text).between(start, horizon, inc=True)
        by_day: dict[date, list[datetime]] = {}
        for when in occurrences:
            by_day.setdefault(when.date(), []).append(when)
        for day in sorted(set(cfg.exclude)):
            if day not in by_day:
                near = sorted(by_day, key=lambda d: abs((d - day).days))[:2]
                raise InputError(f"exclude {day}: no patch window falls on that date (nearest: "
                                 f"{', '.join(str(d) for d in sorted(near))}); rule {cfg.rrule}")
            excluded += by_day[day]
    moved = clock_changes(cfg, today)
    excluded = sorted(excluded + [c.nominal for c in moved])
    if moved:
        text += "\nRDATE:" + ",".join(f"{c.opens:%Y%m%dT%H%M%S}" for c in moved)
    if excluded:
        text += "\nEXDATE:" + ",".join(f"{w:%Y%m%dT%H%M%S}" for w in excluded)
    return text
