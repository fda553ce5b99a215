"""Monitoring gates and silences: Prometheus holds a host's drain or reboot while alerts fire, and an
Alertmanager silence covers the host's expected alerts while it is in maintenance.

A **gate** is a PromQL query per cluster (``monitoring.prometheus.gates`` in the inventory); a
non-empty answer holds the host: the run waits (bounded) or skips it, and the series that held it
are recorded. A **silence** is a lease: created short, extended while the run is alive (a daemon
thread), expired at the end; a run that dies stops extending it and it lapses by itself. Its id is
in the audit trail, and a resumed run adopts it.

Unreachable monitoring never blocks maintenance unless the inventory says ``required: true``: it is
logged and audited. ``$host`` and ``$cluster`` in a query are replaced by the names escaped for the
PromQL string they stand in (regex-escaped too after ``=~``/``!~``): a name is never pasted raw.

The HTTP seam is an ``httpx.Client`` the caller may inject (``transport=``, tests); httpx errors are
mapped once, here, to :class:`hostmaint.errors.MonitoringError` naming the url. Time is a parameter
(``clock``, ``sleep``, ``now``).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from string import Template
from typing import TYPE_CHECKING, Any

import httpx

from hostmaint.display import visible
from hostmaint.errors import MonitoringError, StepError
from hostmaint.models import Step, StepOutcome
from hostmaint.redaction import redact_text

if TYPE_CHECKING:
    from hostmaint.inventory import AlertmanagerSettings, PrometheusSettings
    from hostmaint.maintenance import RunContext
    from hostmaint.runtime import Runtime

log = logging.getLogger(__name__)

PLACEHOLDERS = frozenset({"host", "cluster"})


class GatePoint(StrEnum):
    """Where a host's maintenance asks its gates."""

    BEFORE_DRAIN = "before-drain"
    BEFORE_REBOOT = "before-reboot"


class OnHold(StrEnum):
    """What a held gate does: wait (up to ``wait_s``, then the host stops) or skip the host at once."""

    WAIT = "wait"
    SKIP = "skip"


class WorkKind(StrEnum):
    """The kind of work a gate is asked for: each gate holds the kinds its ``kinds`` names."""

    MAINTENANCE = "maintenance"  # patch-host: planned, and waiting costs nothing but time
    EVACUATION = "evacuation"  # a planned evacuation (evacuate-host from the UI, the CLI, a schedule)
    INCIDENT = "incident"  # an incident's evacuation: it runs because something is wrong with the host


class GateVerdict(StrEnum):
    OPEN = "open"  # the query answered empty
    HELD = "held"  # the query answered series: something fires
    UNREACHABLE = "unreachable"  # Prometheus did not answer; not required: recorded, does not hold
    BLOCKED = "blocked"  # Prometheus did not answer and the inventory requires it
    BYPASSED = "bypassed"  # not asked: the gate does not hold this kind of work (recorded, with why)


# --- PromQL templates ------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


@dataclass(frozen=True)
class _Piece:
    text: str
    placeholder: str | None = None
    regex: bool = False  # inside a string after =~ or !~


def _scan_query(query: str) -> list[_Piece]:
    """Split a gate query into literal text and placeholders, each placeholder knowing whether it
    stands inside a double- or single-quoted string and after a regex matcher. Raises ValueError
    for a placeholder outside a string (it would be PromQL syntax, not a value) or an unknown one."""
    pieces: list[_Piece] = []
    i, n = 0, len(query)
    literal = []
    while i < n:
        c = query[i]
        if c == "$":
            raise ValueError(f"placeholder at offset {i} is outside a quoted label value: write it inside "
                             'quotes, e.g. instance="$host"')
        if c == "`":  # raw string: no escapes, so a name could not be escaped inside it
            end = query.find("`", i + 1)
            if end < 0:
                raise ValueError(f"unterminated ` string at offset {i}")
            if "$" in query[i:end]:
                raise ValueError('placeholders are not allowed in `raw` strings: use "..." quotes')
            literal.append(query[i:end + 1])
            i = end + 1
            continue
        if c in "\"'":
            before = "".join(literal).rstrip()
            regex = before.endswith(("=~", "!~"))
            literal.append(c)
            i += 1
            while i < n and query[i] != c:
                if query[i] == "\\" and i + 1 < n:
                    literal.append(query[i:i + 2])
                    i += 2
                    continue
                m = _PLACEHOLDER.match(query, i) if query[i] == "$" else None
                if m is not None:
                    name = m["braced"] or m["plain"]
                    if name not in PLACEHOLDERS:
                        raise ValueError(f"unknown placeholder ${name}: only $host and $cluster")
                    pieces.append(_Piece("".join(literal)))
                    literal = []
                    pieces.append(_Piece("", name, regex))
                    i = m.end()
                    continue
                if query[i] == "$":
                    raise ValueError(f"a lone $ at offset {i}: only $host and $cluster are placeholders")
                literal.append(query[i])
                i += 1
            if i >= n:
                raise ValueError(f"unterminated {c} string")
            literal.append(c)
            i += 1
            continue
        literal.append(c)
        i += 1
    pieces.append(_Piece("".join(literal)))
    return pieces


def check_query(query: str) -> str:
    """Validate a gate query template (raises ValueError saying what is wrong); returns it."""
    if not query.strip():
        raise ValueError("is empty")
    if any(ord(ch) < 32 and ch not in "\n\t" for ch in query):
        raise ValueError("has a control character")
    _scan_query(query)
    return query


def promql_string(value: str) -> str:
    """``value`` escaped for the inside of a double- or single-quoted PromQL string (Go escapes)."""
    out = value.replace("\\", "\\\\").replace('"', '\\"').replace("'", "\\'")
    return out.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def regex_literal(value: str) -> str:
    """``value`` as an RE2 regular expression matching exactly it (escaped punctuation is literal in RE2)."""
    return re.escape(value)


def render_query(query: str, *, host: str, cluster: str) -> str:
    """The gate query with ``$host``/``$cluster`` replaced by the names, escaped for where they stand."""
    values = {"host": host, "cluster": cluster}
    out = []
    for piece in _scan_query(query):
        if piece.placeholder is None:
            out.append(piece.text)
        else:
            value = values[piece.placeholder]
            out.append(promql_string(regex_literal(value) if piece.regex else value))
    return "".join(out)


def check_template(text: str) -> str:
    """Validate a ``$host``/``$cluster`` template for an argv element or a matcher value; ``$$`` is a
    literal ``$``. Raises ValueError naming an unknown placeholder."""
    t = Template(text)
    if not t.is_valid():
        raise ValueError(f"{text!r} has a $ that is not a placeholder: write $$ for a literal $")
    unknown = sorted(set(t.get_identifiers()) - PLACEHOLDERS)
    if unknown:
        raise ValueError(f"{text!r}: unknown placeholder ${unknown[0]} (only $host and $cluster; $$ is a literal $)")
    return text


def render_template(text: str, *, host: str, cluster: str, regex: bool = False) -> str:
    """A template with the names substituted (regex-escaped for a regex matcher)."""
    values = {"host": host, "cluster": cluster}
    if regex:
        values = {k: regex_literal(v) for k, v in values.items()}
    return Template(text).substitute(values)


# --- Prometheus ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    """One series a gate query answered: its labels (as Prometheus gave them: data, not markup)."""

    labels: dict[str, str]
    value: str

    def describe(self) -> str:
        name = self.labels.get("alertname") or self.labels.get("__name__") or "series"
        rest = ",".join(f"{k}={v!r}" for k, v in sorted(self.labels.items()) if k not in ("alertname", "__name__"))
        return f"{name}{{{rest}}}"


def _client(timeout: float, transport: httpx.BaseTransport | None) -> httpx.Client:
    # trust_env off: no proxy or netrc from the environment reaches the monitoring servers
    return httpx.Client(timeout=timeout, transport=transport, trust_env=False, follow_redirects=False)


def _request(client: httpx.Client, method: str, url: str, what: str, **kw: Any) -> httpx.Response:
    try:
        return client.request(method, url, **kw)
    except httpx.HTTPError as exc:
        raise MonitoringError(f"{what}: {type(exc).__name__}: {exc}", url) from exc


def _problem(response: httpx.Response) -> str:
    """What a refusal's body says, its first 300 characters, masked before they are cut (a cut inside a
    URL's password left its first characters unrecognised)."""
    try:
        body = response.json()
    except ValueError:
        return redact_text(response.text)[:300]
    if isinstance(body, dict):
        return redact_text(str(body.get("error") or body.get("message") or body))[:300]
    return redact_text(str(body))[:300]


class Prometheus:
    """Prometheus's HTTP API, the instant query only."""

    def __init__(self, url: str, client: httpx.Client) -> None:
        self.url = url.rstrip("/")
        self.client = client

    def query(self, promql: str) -> list[Series]:
        """The instant vector ``promql`` answers now. Raises MonitoringError when Prometheus does not
        answer, refuses the query, or answers something other than a vector."""
        url = f"{self.url}/api/v1/query"
        response = _request(self.client, "POST", url, "query", data={"query": promql})
        if response.status_code != 200:
            raise MonitoringError(f"query refused (HTTP {response.status_code}): {_problem(response)}", url)
        try:
            body = response.json()
            data = body["data"]
            kind, result = data["resultType"], data["result"]
        except (ValueError, KeyError, TypeError) as exc:
            raise MonitoringError(f"not a Prometheus answer: {redact_text(response.text)[:200]!r}", url) from exc
        if body.get("status") != "success":
            raise MonitoringError(f"query failed: {body.get('error')}", url)
        if kind != "vector":
            raise MonitoringError(f"a gate query must answer an instant vector, got {kind}", url)
        try:
            return [Series({str(k): str(v) for k, v in (r.get("metric") or {}).items()},
                           str(r.get("value", [0, ""])[1])) for r in result]
        except (AttributeError, TypeError, IndexError) as exc:
            # a vector whose samples are not {metric: {...}, value: [t, v]}: no answer, as any other
            raise MonitoringError(f"not a Prometheus answer: {redact_text(response.text)[:200]!r}", url) from exc


@dataclass(frozen=True)
class GateCheck:
    """One gate query's answer, judged: a verdict with its reason and the series that held it."""

    gate: str
    query: str
    verdict: GateVerdict
    reason: str
    series: tuple[Series, ...] = ()

    @property
    def passes(self) -> bool:
        return self.verdict in (GateVerdict.OPEN, GateVerdict.UNREACHABLE, GateVerdict.BYPASSED)


def judge(gate: str, query: str, answer: Sequence[Series] | MonitoringError, *, required: bool) -> GateCheck:
    """What one answer of a gate query means. Pure."""
    if isinstance(answer, MonitoringError):
        if required:
            return GateCheck(gate, query, GateVerdict.BLOCKED,
                             f"gate {gate}: Prometheus is required and did not answer ({answer})")
        return GateCheck(gate, query, GateVerdict.UNREACHABLE,
                         f"gate {gate}: Prometheus did not answer ({answer}); not required, so it does not hold")
    if not answer:
        return GateCheck(gate, query, GateVerdict.OPEN, f"gate {gate}: nothing fires")
    shown = ", ".join(s.describe() for s in answer[:5]) + (f" and {len(answer) - 5} more" if len(answer) > 5 else "")
    return GateCheck(gate, query, GateVerdict.HELD, f"gate {gate} holds: {shown}", tuple(answer))


@dataclass(frozen=True)
class GateResult:
    """How a host's gates at one point ended, after waiting if the inventory says so."""

    point: GatePoint
    passed: bool
    reason: str
    checks: tuple[GateCheck, ...] = ()
    attempts: int = 0
    waited_s: float = 0.0


def wait_for_gates(point: GatePoint, ask: Callable[[], list[GateCheck]], *, on_hold: OnHold, wait_s: float,
                   interval_s: float, clock: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep) -> GateResult:
    """Ask the gates until all pass, or until ``wait_s`` has gone by (``on_hold`` wait), or once (skip).

    Every check of the last attempt is returned, the holding ones named in the reason."""
    start = clock()
    attempts = 0
    while True:
        checks = ask()
        attempts += 1
        waited = clock() - start
        holding = [c for c in checks if not c.passes]
        if not holding:
            notes = [c.reason for c in checks if c.verdict in (GateVerdict.UNREACHABLE, GateVerdict.BYPASSED)]
            reason = "gates open" + (f" ({'; '.join(notes)})" if notes else "")
            return GateResult(point, True, reason, tuple(checks), attempts, round(waited, 3))
        left = wait_s - waited
        if on_hold is OnHold.SKIP or left <= 0:
            why = "; ".join(c.reason for c in holding)
            tail = "skipped (on_hold: skip)" if on_hold is OnHold.SKIP else f"still held after {waited:.0f}s"
            return GateResult(point, False, f"{point.value}: {why}; {tail}", tuple(checks), attempts, round(waited, 3))
        sleep(min(interval_s, left))


def bypass_reason(gate: str, kind: WorkKind, kinds: Sequence[WorkKind]) -> str:
    """Why gate ``gate`` (holding ``kinds``) is not asked for work of ``kind``. Pure."""
    if kind is WorkKind.INCIDENT:
        return (f"gate {gate}: bypassed for an incident evacuation: it moves VMs off a host because something "
                "is wrong with it, and waiting for alerts to clear would keep them there (add incident to the "
                "gate's kinds to hold incidents too)")
    return f"gate {gate}: bypassed, it holds {', '.join(k.value for k in kinds)} only, not {kind.value}"


def ask_prometheus(settings: PrometheusSettings, point: GatePoint, *, host: str, cluster: str,
                   transport: httpx.BaseTransport | None = None,
                   kind: WorkKind = WorkKind.MAINTENANCE) -> list[GateCheck]:
    """Every gate of ``settings`` at ``point``, queried once and judged; a gate that does not hold
    work of ``kind`` is not queried and says so (verdict ``bypassed``)."""
    checks = []
    with _client(settings.timeout_s, transport) as client:
        prom = Prometheus(settings.url, client)
        for g in settings.gates:
            if point not in g.at:
                continue
            query = render_query(g.query, host=host, cluster=cluster)
            if kind not in g.kinds:
                checks.append(GateCheck(g.name, query, GateVerdict.BYPASSED, bypass_reason(g.name, kind, g.kinds)))
                continue
            try:
                answer: list[Series] | MonitoringError = prom.query(query)
            except MonitoringError as exc:
                answer = exc
            checks.append(judge(g.name, query, answer, required=settings.required))
    return checks


def gate(rt: Runtime, run: RunContext, host: str, point: GatePoint, *, kind: WorkKind = WorkKind.MAINTENANCE,
         clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
         transport: httpx.BaseTransport | None = None) -> GateResult:
    """Ask ``host``'s gates at ``point`` for work of ``kind`` (step ``gate``), waiting as the inventory says.

    Records every query, its verdict and the series that held the host; a gate that does not hold
    ``kind`` (an incident's evacuation, by default) is recorded ``bypassed`` with why. Does not change
    the host's state: the caller skips the host (before the drain) or keeps it out (:func:`hold_reboot`)."""
    from hostmaint.maintenance import audited

    cluster = rt.cluster_of(host)
    monitoring = rt.inventory.cluster(cluster).monitoring
    settings = monitoring.prometheus if monitoring else None
    if settings is None or not any(point in g.at for g in settings.gates):
        return GateResult(point, True, "no gate")
    with audited(rt, run, Step.GATE, host=host,
                 inputs={"point": point.value, "kind": kind.value, "url": redact_text(settings.url),
                         "on_hold": settings.on_hold.value, "wait_s": settings.wait_s,
                         "required": settings.required}) as rec:
        result = wait_for_gates(
            point, lambda: ask_prometheus(settings, point, host=host, cluster=cluster, transport=transport, kind=kind),
            on_hold=settings.on_hold, wait_s=settings.wait_s, interval_s=settings.interval_s, clock=clock, sleep=sleep)
        rec.details.update({
            "passed": result.passed, "reason": result.reason, "attempts": result.attempts,
            "waited_s": result.waited_s,
            "checks": [{"gate": c.gate, "query": c.query, "verdict": c.verdict.value, "reason": c.reason,
                        "series": [s.labels for s in c.series[:20]]} for c in result.checks]})
        unreachable = [c.reason for c in result.checks if c.verdict is GateVerdict.UNREACHABLE]
        for note in unreachable:
            log.warning("%s: %s", host, visible(note))
        for check in result.checks:
            if check.verdict is GateVerdict.BYPASSED:
                log.info("%s: %s", host, visible(check.reason))
        if not result.passed:
            rec.outcome = StepOutcome.SKIPPED
            log.warning("%s: held by monitoring: %s", host, visible(result.reason))
        return result


def hold_reboot(rt: Runtime, run: RunContext, host: str, result: GateResult) -> None:
    """A host whose reboot gate held: it stays out of service (cordoned) with the reason, and the
    run stops with a StepError. Its VMs are elsewhere and run; a later run finishes the maintenance."""
    from hostmaint.maintenance import audited

    reason = f"not rebooted, held by monitoring: {result.reason}"
    # the gate's own record says what held it; this one says what that changed (its state)
    with audited(rt, run, Step.KEEP_CORDONED, host=host, inputs={"why": reason}) as rec:
        rec.details["state_before"] = rt.states.state(host).value
        rec.details["state"] = rt.states.keep_out(host, reason, run.run_id).state.value
    raise StepError(reason, host, Step.GATE)


# --- Alertmanager silences -----------------------------------------------------------------------


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass(frozen=True)
class Silence:
    """A silence as Alertmanager holds it."""

    silence_id: str
    matchers: tuple[dict[str, Any], ...]
    starts_at: datetime
    ends_at: datetime
    state: str  # active, pending, expired


# what Alertmanager answers for a silence's id (a UUID): anything else is not pasted into a URL's path,
# where "../.." would send the requests that follow (with the url's credentials) to another endpoint
_SILENCE_ID = re.compile(r"[A-Za-z0-9-]{1,64}")


class Alertmanager:
    """Alertmanager's v2 silences API."""

    def __init__(self, url: str, client: httpx.Client) -> None:
        self.url = url.rstrip("/")
        self.client = client

    def put(self, matchers: Sequence[dict[str, Any]], starts_at: datetime, ends_at: datetime, *, comment: str,
            created_by: str, silence_id: str | None = None) -> str:
        """Create a silence, or update ``silence_id`` (same matchers and start: extended in place;
        Alertmanager gives a new id when it cannot update). Returns the id Alertmanager answers."""
        url = f"{self.url}/api/v2/silences"
        body: dict[str, Any] = {"matchers": list(matchers), "startsAt": _iso(starts_at), "endsAt": _iso(ends_at),
                                "comment": comment, "createdBy": created_by}
        if silence_id:
            body["id"] = silence_id
        response = _request(self.client, "POST", url, "silence", json=body)
        if response.status_code != 200:
            raise MonitoringError(f"silence refused (HTTP {response.status_code}): {_problem(response)}", url)
        try:
            answered = str(response.json()["silenceID"])
        except (ValueError, KeyError, TypeError) as exc:
            raise MonitoringError(f"not an Alertmanager answer: {redact_text(response.text)[:200]!r}", url) from exc
        if not _SILENCE_ID.fullmatch(answered):
            raise MonitoringError(f"not an Alertmanager answer: silence id {answered[:80]!r}", url)
        return answered

    def started(self, silence_id: str, fallback: datetime) -> datetime:
        """When Alertmanager says ``silence_id`` started: it moves a start in the past to its own now,
        and an extension must send exactly that start (or Alertmanager replaces the silence)."""
        found = self.get(silence_id)
        return found.starts_at if found is not None else fallback

    def get(self, silence_id: str) -> Silence | None:
        """The silence ``silence_id``, or None when Alertmanager does not know it."""
        if not _SILENCE_ID.fullmatch(silence_id):
            return None  # no id Alertmanager gives: it has no such silence
        url = f"{self.url}/api/v2/silence/{silence_id}"
        response = _request(self.client, "GET", url, "read silence")
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise MonitoringError(f"silence read refused (HTTP {response.status_code}): {_problem(response)}", url)
        try:
            b = response.json()
            matchers = tuple(b["matchers"])
            if not all(isinstance(m, dict) for m in matchers):
                raise TypeError("a matcher is not an object")
            return Silence(str(b["id"]), matchers, _parse_time(b["startsAt"]), _parse_time(b["endsAt"]),
                           str(b["status"]["state"]))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MonitoringError(f"not an Alertmanager silence: {redact_text(response.text)[:200]!r}", url) from exc

    def expire(self, silence_id: str) -> bool:
        """Expire ``silence_id`` now; False when Alertmanager does not know it (or it has ended already)."""
        if not _SILENCE_ID.fullmatch(silence_id):
            return False
        url = f"{self.url}/api/v2/silence/{silence_id}"
        response = _request(self.client, "DELETE", url, "expire silence")
        if response.status_code == 200:
            return True
        problem = _problem(response)
        if response.status_code == 404 or "not found" in problem or "already expired" in problem:
            return False
        raise MonitoringError(f"expiry refused (HTTP {response.status_code}): {problem}", url)


def silence_matchers(settings: AlertmanagerSettings, *, host: str, cluster: str) -> list[dict[str, Any]]:
    """The silence's matchers with the names substituted (regex-escaped in regex matchers)."""
    return [{"name": m.name, "value": render_template(m.value, host=host, cluster=cluster, regex=m.regex),
             "isRegex": m.regex, "isEqual": m.equal} for m in settings.matchers]


def _same_matchers(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]]) -> bool:
    def key(m: dict[str, Any]) -> tuple[str, str, bool, bool]:
        return (str(m.get("name")), str(m.get("value")), bool(m.get("isRegex")), bool(m.get("isEqual", True)))
    return sorted(map(key, a)) == sorted(map(key, b))


class SilenceLease:
    """A silence kept alive by extension; it lapses by itself when nobody extends it.

    :meth:`start` extends it from a daemon thread every ``every_s`` (a daemon: a killed or cancelled
    run's process never waits for it); :meth:`end` stops the thread and expires the silence.
    A plain class, not a dataclass: Prefect rebuilds dataclass task parameters, and a lease must
    stay one object with one thread."""

    def __init__(self, am: Alertmanager, silence_id: str, matchers: list[dict[str, Any]], starts_at: datetime,
                 lease_s: float, comment: str, created_by: str,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC), ends_at: datetime | None = None) -> None:
        self.am = am
        self.silence_id = silence_id
        self.matchers = matchers
        self.starts_at = starts_at
        self.lease_s = lease_s
        self.comment = comment
        self.created_by = created_by
        self.now = now
        self.ends_at = ends_at
        self.extensions = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SilenceLease({self.silence_id!r}, ends_at={self.ends_at})"

    def extend(self) -> str:
        """Push the end to now + lease (same id while Alertmanager can update it). Returns the id."""
        with self._lock:
            ends = self.now() + timedelta(seconds=self.lease_s)
            new_id = self.am.put(self.matchers, self.starts_at, ends, comment=self.comment,
                                 created_by=self.created_by, silence_id=self.silence_id)
            if new_id != self.silence_id:
                # it lapsed meanwhile (the run stalled longer than the lease): Alertmanager made a new one
                log.warning("silence %s had lapsed; Alertmanager replaced it with %s", self.silence_id, new_id)
                self.silence_id = new_id
                self.starts_at = self.am.started(new_id, self.now())
            self.ends_at = ends
            self.extensions += 1
            return self.silence_id

    def start(self, every_s: float) -> None:
        """Extend every ``every_s`` seconds from a daemon thread until :meth:`end`."""
        def loop() -> None:
            while not self._stop.wait(every_s):
                try:
                    self.extend()
                except MonitoringError as exc:
                    # the silence lapses at its end unless a later extension gets through
                    self.failures.append(str(exc))
                    log.warning("could not extend silence %s: %s", self.silence_id, visible(exc))

        self._thread = threading.Thread(target=loop, name=f"silence-{self.silence_id[:8]}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop extending (the silence then lapses at its end)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def end(self) -> bool:
        """Stop extending and expire the silence now; False when Alertmanager no longer had it."""
        self.stop()
        with self._lock:
            return self.am.expire(self.silence_id)


def recorded_silence(rt: Runtime, host: str) -> str | None:
    """The id of the last silence a run opened for ``host`` and did not end (the audit trail says)."""
    for rec in reversed(rt.audit.records(host=host, steps=(Step.SILENCE, Step.SILENCE_END))):
        if rec.step == Step.SILENCE_END:
            return None
        if rec.step == Step.SILENCE and rec.details.get("silence_id"):
            return str(rec.details["silence_id"])
    return None


def open_silence(rt: Runtime, run: RunContext, host: str, *, now: Callable[[], datetime] | None = None,
                 transport: httpx.BaseTransport | None = None, start: bool = True,
                 hold_s: float | None = None) -> SilenceLease | None:
    """Silence ``host``'s expected alerts for its maintenance, as a lease (step ``silence``).

    Adopts the silence an earlier run of this host recorded and never ended, when Alertmanager still
    has it active with the same matchers; otherwise creates one. None when the cluster has no
    Alertmanager, or it did not answer and is not required (logged and audited). Raises StepError
    naming the url when it did not answer and is required.

    ``hold_s``: an evacuation's silence, for a host that stays out of service after the run: it ends
    ``hold_s`` from now, is not extended (no run lives to extend it), and whatever puts the host back
    in service ends it (:func:`end_recorded_silence`); a host left out longer is silenced no longer."""
    from hostmaint.maintenance import audited

    cluster = rt.cluster_of(host)
    monitoring = rt.inventory.cluster(cluster).monitoring
    settings = monitoring.alertmanager if monitoring else None
    if settings is None:
        return None
    clock = now or (lambda: datetime.now(UTC))
    matchers = silence_matchers(settings, host=host, cluster=cluster)
    comment = f"{settings.comment}: {host}, run {run.run_id} ({run.flow}, {run.operator})"
    earlier = recorded_silence(rt, host)
    lease_s = hold_s if hold_s is not None else settings.lease_s
    with audited(rt, run, Step.SILENCE, host=host,
                 inputs={"url": redact_text(settings.url), "matchers": matchers, "lease_s": lease_s,
                         "required": settings.required,
                         **({"until": "the host is back in service (return-host)"} if hold_s is not None else {})}
                 ) as rec:
        client = _client(settings.timeout_s, transport)
        am = Alertmanager(settings.url, client)
        try:
            found = am.get(earlier) if earlier else None
            if found is not None and found.state == "active" and _same_matchers(found.matchers, matchers):
                lease = SilenceLease(am, found.silence_id, matchers, found.starts_at, lease_s, comment,
                                     "hostmaint", clock)
                lease.extend()
                rec.details["adopted"] = earlier
            else:
                start_at = clock()
                sid = am.put(matchers, start_at, start_at + timedelta(seconds=lease_s), comment=comment,
                             created_by="hostmaint")
                lease = SilenceLease(am, sid, matchers, am.started(sid, start_at), lease_s, comment,
                                     "hostmaint", clock, ends_at=start_at + timedelta(seconds=lease_s))
                if earlier:
                    rec.details["earlier"] = {"silence_id": earlier, "state": found.state if found else "unknown"}
        except MonitoringError as exc:
            client.close()
            if settings.required:
                raise StepError(f"Alertmanager is required and did not answer: {exc}", host, Step.SILENCE) from exc
            rec.outcome = StepOutcome.SKIPPED
            rec.details["error"] = str(exc)
            rec.details["note"] = "Alertmanager is not required: maintenance goes on without a silence"
            log.warning("%s: no silence, Alertmanager did not answer (not required): %s", host, visible(exc))
            return None
        rec.details["silence_id"] = lease.silence_id
        rec.details["ends_at"] = _iso(lease.ends_at) if lease.ends_at else None
        if start and hold_s is None:
            lease.start(settings.extend_every_s or settings.lease_s / 3)
        return lease


def end_recorded_silence(rt: Runtime, run: RunContext, host: str, *,
                         transport: httpx.BaseTransport | None = None) -> bool:
    """End the silence a run recorded for ``host`` and nobody ended (an evacuation's, kept while the
    host was out of service), now that it is back (step ``silence-end``). False when there is none."""
    monitoring = rt.inventory.cluster(rt.cluster_of(host)).monitoring
    settings = monitoring.alertmanager if monitoring else None
    earlier = recorded_silence(rt, host)
    if settings is None or earlier is None:
        return False
    am = Alertmanager(settings.url, _client(settings.timeout_s, transport))
    lease = SilenceLease(am, earlier, [], datetime.now(UTC), settings.lease_s, "", "hostmaint")
    end_silence(rt, run, host, lease)
    return True


def end_silence(rt: Runtime, run: RunContext, host: str, lease: SilenceLease | None) -> None:
    """Stop extending and expire ``host``'s silence (step ``silence-end``). A failure to expire is
    recorded, never raised: the silence then lapses by itself at its end."""
    from hostmaint.maintenance import audited

    if lease is None:
        return
    with audited(rt, run, Step.SILENCE_END, host=host, inputs={"silence_id": lease.silence_id}) as rec:
        try:
            expired = lease.end()
        except MonitoringError as exc:
            rec.outcome = StepOutcome.FAILED
            rec.details["error"] = str(exc)
            rec.details["note"] = "could not expire it: it lapses by itself at its end"
            log.warning("%s: could not expire silence %s (it lapses at %s): %s", host, lease.silence_id,
                        lease.ends_at, visible(exc))
        else:
            rec.details["expired"] = expired
        finally:
            lease.am.client.close()
        rec.details["silence_id"] = lease.silence_id
        rec.details["extensions"] = lease.extensions
        if lease.failures:
            rec.details["extension_failures"] = lease.failures[-5:]
