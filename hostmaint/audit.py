"""The audit trail: append-only, hash-chained records of every maintenance step.

Each record's ``hash`` is the SHA-256 of the canonical JSON (sorted keys, compact
separators) of all its other fields, ``seq`` and ``prev_hash`` included; ``prev_hash`` is
the hash of the record before it (64 zeros for record 1). Editing a field breaks that
record's hash; deleting or reordering records breaks ``seq`` or ``prev_hash``.
:meth:`AuditTrail.verify` finds the first such break and names the record. See docs/audit.md
for what the chain does not protect against and how to anchor it.

Secrets never reach the record: :func:`redact` runs over ``inputs`` and ``details`` on append.
"""

from __future__ import annotations

import csv
import dataclasses
import enum
import hashlib
import io
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import PurePath
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from hostmaint.db import Clock, audit_table, lock_for_append, utcnow, write_transaction
from hostmaint.display import spreadsheet_cell
from hostmaint.errors import AuditError
from hostmaint.models import Step, StepOutcome, Trigger
from hostmaint.redaction import redact

GENESIS_HASH = "0" * 64
# lost seq races happen only with a writer that does not lock (lock_for_append): a backstop
_APPEND_ATTEMPTS = 20

# the stored fields, in the order exports print them
FIELDS = ("seq", "time", "run_id", "flow", "trigger", "operator", "cluster", "host", "vm", "step",
          "inputs", "outcome", "duration_s", "details", "prev_hash", "hash")


# --- what callers pass and what is stored -----------------------------------------


@dataclass(frozen=True, kw_only=True)
class AuditEntry:
    """One step to record, as the caller knows it. ``inputs`` and ``details`` are redacted on append."""

    step: Step
    run_id: str | None = None
    flow: str = ""
    trigger: Trigger | None = None
    operator: str = ""
    cluster: str = ""
    host: str | None = None
    vm: str | None = None
    inputs: Mapping[str, Any] = field(default_factory=dict)
    outcome: StepOutcome = StepOutcome.OK
    duration_s: float = 0.0
    details: Mapping[str, Any] = field(default_factory=dict)  # migration stats, package diff, ...


@dataclass(frozen=True)
class AuditRecord:
    """A stored audit record: the entry plus its place in the chain."""

    seq: int
    time: str  # UTC, ISO 8601
    run_id: str | None
    flow: str
    trigger: Trigger | None
    operator: str
    cluster: str
    host: str | None
    vm: str | None
    step: Step | str  # a name this version does not know stays the text it was stored as
    inputs: dict[str, Any]
    outcome: StepOutcome
    duration_s: float
    details: dict[str, Any]
    prev_hash: str
    hash: str

    def to_dict(self) -> dict[str, Any]:
        """The record as plain JSON values (enums as their values)."""
        return {name: _plain(getattr(self, name)) for name in FIELDS}

    @property
    def label(self) -> str:
        """How messages name the record: ``record 7 (drain hv02)``."""
        return _label(self.to_dict())


@dataclass(frozen=True)
class Anchor:
    """A chain head written down outside the database: record ``seq`` had hash ``hash``.

    Written as ``SEQ:HASH`` (``str(anchor)``, :meth:`parse`). With the seq, a trail cut
    below the anchor is reported with the records that are missing, not just "hash not found".
    """

    seq: int
    hash: str

    def __str__(self) -> str:
        return f"{self.seq}:{self.hash}"

    @classmethod
    def parse(cls, text: str) -> Anchor:
        """``SEQ:HASH`` as :class:`VerifyReport` prints it; ValueError saying what is wrong otherwise."""
        seq_text, sep, hash_text = text.strip().partition(":")
        if not sep or not seq_text.isdigit():
            raise ValueError(f"expected SEQ:HASH (a record number, a colon, its 64-hex-digit hash), got {text!r}")
        hash_text = hash_text.lower()
        if not _is_hash(hash_text):
            raise ValueError(f"{hash_text!r} is not a SHA-256 hash (64 hex digits)")
        seq = int(seq_text)
        if seq == 0 and hash_text != GENESIS_HASH:
            raise ValueError("record 0 is the empty trail: its hash is 64 zeros")
        return cls(seq, hash_text)


def parse_anchor(text: str) -> Anchor | str:
    """An anchor as an operator wrote it down: ``SEQ:HASH``, or a bare hash (what :meth:`AuditTrail.verify`
    took before anchors had a seq). ValueError saying what is wrong otherwise."""
    bare = text.strip().lower()
    if ":" not in bare and _is_hash(bare):
        return bare
    return Anchor.parse(text)


@dataclass(frozen=True)
class VerifyReport:
    """The result of :meth:`AuditTrail.verify`. ``problem`` names the first bad record and what is wrong."""

    ok: bool
    count: int
    first_bad_seq: int | None
    problem: str
    last_hash: str = ""  # write this into the change ticket to anchor the chain (docs/audit.md)
    last_seq: int = 0  # the record ``last_hash`` belongs to (0: none)

    @property
    def head(self) -> Anchor:
        """The last record that verified, as an anchor to write down (``str()`` gives ``SEQ:HASH``)."""
        return Anchor(self.last_seq, self.last_hash or GENESIS_HASH)


# --- redaction and canonical form ---------------------------------------------------


def _plain(value: Any) -> Any:
    """JSON-ready form of what steps put in ``inputs``/``details``: models, dataclasses, enums, times."""
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, Mapping):
        return {str(_plain(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted((_plain(v) for v in value), key=repr)
    if hasattr(value, "model_dump"):  # a pydantic model
        return _plain(value.model_dump(mode="json"))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # canonical JSON has no NaN/Infinity
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def canonical_json(value: Any) -> str:
    """The one JSON text a value hashes as: ``json.dumps(value, sort_keys=True, separators=(",", ":"))``."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def record_hash(fields: Mapping[str, Any]) -> str:
    """SHA-256 over the canonical JSON of every field except ``hash``."""
    body = {k: _plain(v) for k, v in fields.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


# --- the trail --------------------------------------------------------------------


class AuditTrail:
    """The audit trail in the hostmaint database. Safe with concurrent writers (threads and processes)."""

    def __init__(self, engine: Engine, clock: Clock = utcnow) -> None:
        self._engine = engine
        self._clock = clock

    def append(self, entry: AuditEntry) -> AuditRecord:
        """Redact, chain and store ``entry`` as the next record.

        The last record is read and record ``seq + 1`` inserted in one write transaction that
        keeps other appenders out (SQLite: its write lock; PostgreSQL: an advisory lock readers
        ignore, see :func:`~hostmaint.db.lock_for_append`). ``seq`` is unique as well, so a writer
        that still lost a race gets a conflict and tries again on top of the winner.
        """
        inputs = redact(_plain(dict(entry.inputs)))
        details = redact(_plain(dict(entry.details)))
        # through JSON and back, so the record hashes now exactly as it will when read back
        inputs = json.loads(canonical_json(inputs))
        details = json.loads(canonical_json(details))
        trigger = Trigger(entry.trigger) if entry.trigger is not None else None
        outcome = StepOutcome(entry.outcome)
        # + 0.0 turns -0.0 into 0.0: SQLite reads -0.0 back as 0.0, and the record would no longer match its hash
        duration_s = float(entry.duration_s) + 0.0
        if not math.isfinite(duration_s):
            # SQLite would store NaN as NULL and the record would no longer match its hash
            raise ValueError(f"audit entry {entry.step!r}: duration_s must be a finite number, got {duration_s}")
        for attempt in range(_APPEND_ATTEMPTS):
            try:
                with write_transaction(self._engine) as conn:
                    lock_for_append(conn, audit_table)
                    last = conn.execute(sa.select(audit_table.c.seq, audit_table.c.hash)
                                        .order_by(audit_table.c.seq.desc()).limit(1)).first()
                    seq, prev_hash = (last.seq + 1, last.hash) if last else (1, GENESIS_HASH)
                    fields: dict[str, Any] = dict(
                        seq=seq, time=self._clock().astimezone(UTC).isoformat(), run_id=entry.run_id,
                        flow=entry.flow, trigger=trigger, operator=entry.operator, cluster=entry.cluster,
                        host=entry.host, vm=entry.vm, step=_step(entry.step), inputs=inputs, outcome=outcome,
                        duration_s=duration_s, details=details, prev_hash=prev_hash)
                    fields["hash"] = record_hash(fields)
                    record = AuditRecord(**fields)
                    row = record.to_dict()
                    row["inputs"] = canonical_json(inputs)
                    row["details"] = canonical_json(details)
                    conn.execute(sa.insert(audit_table).values(**row))
                return record
            except IntegrityError:
                if attempt == _APPEND_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def records(self, host: str | None = None, run_id: str | None = None,
                limit: int | None = None, *, cluster: str | None = None,
                steps: Iterable[Step] | None = None) -> list[AuditRecord]:
        """Stored records in seq order, optionally of one host, one run, one cluster and/or some steps.

        ``limit`` keeps the most recent ``limit`` of them (still oldest first). The filters are the
        database's: the trail grows with every maintenance of the fleet, and a caller that wants a
        cluster's migrations should not decode a year of every host's records to find them.
        """
        t = audit_table
        query = sa.select(t)
        if host is not None:
            query = query.where(t.c.host == host)
        if run_id is not None:
            query = query.where(t.c.run_id == run_id)
        if cluster is not None:
            query = query.where(t.c.cluster == cluster)
        if steps is not None:
            query = query.where(t.c.step.in_(sorted({Step(s).value for s in steps})))
        if limit is not None:
            query = query.order_by(t.c.seq.desc()).limit(limit)
            with self._engine.connect() as conn:
                return [_from_row(r) for r in reversed(conn.execute(query).all())]
        with self._engine.connect() as conn:
            return [_from_row(r) for r in conn.execute(query.order_by(t.c.seq))]

    def verify(self, anchor: Anchor | str | None = None) -> VerifyReport:
        """Walk the chain and report the first record that was altered, removed or moved.

        ``anchor``: a head written down earlier (the change ticket's ``report.head``). The chain
        alone cannot tell that its newest records were deleted or that it was rebuilt from
        scratch; against an anchor it can. An :class:`Anchor` must still be record ``seq``
        with that hash: a chain that now ends before it is reported with the missing records.
        A bare hash (the older form) must still be somewhere in the chain.
        """
        # streamed: the trail of a large site outgrows memory long before it outgrows the disk
        anchored: dict[str, Any] | None = None  # the record at the anchor's seq, were the chain intact
        seen_anchor = False
        prev: dict[str, Any] | None = None
        count = 0
        stored = _StoredByHash(self._engine)
        with self._engine.connect() as conn:
            rows = conn.execution_options(yield_per=2000).execute(
                sa.select(audit_table).order_by(audit_table.c.seq))
            for row in rows:
                fields = _stored_fields(row)
                found = _check(fields, prev, stored)
                if found is not None:
                    rows.close()
                    bad_seq, problem = found
                    return VerifyReport(ok=False, count=count, first_bad_seq=bad_seq, problem=problem,
                                        last_hash=prev["hash"] if prev else GENESIS_HASH,
                                        last_seq=prev["seq"] if prev else 0)
                count += 1
                if isinstance(anchor, Anchor) and count == anchor.seq:
                    anchored = fields  # the walk passed so far, so record n is the n-th
                seen_anchor = seen_anchor or (isinstance(anchor, str) and fields["hash"] == anchor)
                prev = fields
        last_hash: str = prev["hash"] if prev else GENESIS_HASH
        last_seq: int = prev["seq"] if prev else 0
        if isinstance(anchor, Anchor):
            found = _check_anchor(anchor, count, anchored)
            if found is not None:
                bad_seq, problem = found
                return VerifyReport(ok=False, count=count, first_bad_seq=bad_seq, problem=problem,
                                    last_hash=last_hash, last_seq=last_seq)
        elif anchor is not None and anchor != GENESIS_HASH and not seen_anchor:
            return VerifyReport(ok=False, count=count, first_bad_seq=None, last_hash=last_hash, last_seq=last_seq,
                                problem=f"the anchored hash {anchor} is not in the chain: the trail was"
                                        " rewritten or truncated after the anchor was taken")
        return VerifyReport(ok=True, count=count, first_bad_seq=None, last_hash=last_hash, last_seq=last_seq,
                            problem=f"{count} records, chain intact")

    def export(self, fmt: Literal["jsonl", "csv"]) -> str:
        """Every record, in seq order, as JSON lines or CSV: :meth:`export_lines` joined."""
        return "".join(self.export_lines(fmt))

    def export_lines(self, fmt: Literal["jsonl", "csv"]) -> Iterator[str]:
        """Every record, in seq order, as JSON lines or CSV (``inputs``/``details`` as JSON text in CSV),
        a line (a CSV row) at a time as the records are read: a site's trail need not fit in memory.

        JSON lines carry the exact records. The CSV is for spreadsheets, and names in it come from
        hosts: a text cell that a spreadsheet would take as a formula (``=``, ``+``, ``-``, ``@``, tab,
        CR first) starts with ``'`` there (:func:`~hostmaint.display.spreadsheet_cell`), and a field
        with a line break is quoted, so a record stays one row. The stored records are not changed.
        """
        if fmt not in ("jsonl", "csv"):  # refused now, not when the first line is asked for
            raise ValueError(f"export format {fmt!r}: expected 'jsonl' or 'csv'")
        return self._jsonl() if fmt == "jsonl" else self._csv()

    def iter_records(self) -> Iterator[AuditRecord]:
        """Every stored record in seq order, read as it is consumed."""
        with self._engine.connect() as conn:
            for row in conn.execution_options(yield_per=2000).execute(
                    sa.select(audit_table).order_by(audit_table.c.seq)):
                yield _from_row(row)

    def _jsonl(self) -> Iterator[str]:
        for r in self.iter_records():
            yield canonical_json(r.to_dict()) + "\n"

    def _csv(self) -> Iterator[str]:
        out = io.StringIO()
        # RFC 4180's CRLF: the csv module quotes a field holding any character of the line
        # terminator, so with "\n" alone a bare CR in a name was written unquoted and split the row
        writer = csv.DictWriter(out, fieldnames=FIELDS, lineterminator="\r\n")
        writer.writeheader()
        for r in self.iter_records():
            row = r.to_dict()
            row["inputs"] = canonical_json(row["inputs"])
            row["details"] = canonical_json(row["details"])
            writer.writerow({k: spreadsheet_cell(v) for k, v in row.items()})
            yield out.getvalue()
            out.seek(0)
            out.truncate()
        if out.tell():  # an empty trail: the header alone
            yield out.getvalue()


def _label(fields: Mapping[str, Any]) -> str:
    """How messages name a record: ``record 7 (drain hv02)``."""
    what = " ".join(str(fields[k]) for k in ("step", "host") if fields.get(k))
    return f"record {fields['seq']} ({what})" if what else f"record {fields['seq']}"


def _check(fields: dict[str, Any], prev: Mapping[str, Any] | None,
           stored: _StoredByHash) -> tuple[int, str] | None:
    """The first bad seq and what is wrong, if ``fields`` does not rightly follow ``prev``."""
    seq = fields["seq"]
    expected_seq = prev["seq"] + 1 if prev else 1
    expected_prev = prev["hash"] if prev else GENESIS_HASH
    if fields["hash"] != record_hash(fields):
        moved_from = _original_seq(fields, stored)
        if moved_from is not None and moved_from != seq:
            return seq, (f"{_label(fields)} holds the content of record {moved_from}: records were swapped"
                         " or reordered")
        return seq, f"{_label(fields)} was altered: its hash does not match its content"
    if seq > expected_seq:
        missing = (f"record {expected_seq} was" if seq == expected_seq + 1
                   else f"records {expected_seq}..{seq - 1} were")
        after = f"record {prev['seq']}" if prev else "the start of the chain"
        return expected_seq, f"{missing} deleted: {_label(fields)} follows {after}"
    if seq < expected_seq:  # only possible if seq lost its uniqueness
        return seq, f"{_label(fields)} repeats record {seq}: records were duplicated or reordered"
    if fields["prev_hash"] != expected_prev:
        return seq, (f"{_label(fields)} does not link to the record before it: its prev_hash is not"
                     f" record {expected_seq - 1}'s hash (a record was removed, inserted or rewritten)")
    return None


def _check_anchor(anchor: Anchor, count: int, fields: Mapping[str, Any] | None) -> tuple[int, str] | None:
    """The first bad seq and what is wrong, if an intact chain of ``count`` records, whose record at
    the anchor's seq is ``fields``, does not hold ``anchor`` where it was."""
    if anchor.seq == 0:
        return None  # the empty trail: every chain starts from it
    if anchor.seq > count or fields is None:
        first = count + 1
        missing = f"record {first} is" if first == anchor.seq else f"records {first}..{anchor.seq} are"
        ends = f"ends at record {count}" if count else "is empty"
        return first, (f"{missing} missing: the chain {ends}, but the anchor {anchor} names record {anchor.seq};"
                       " the newest records were deleted after the anchor was taken")
    if fields["hash"] != anchor.hash:
        return anchor.seq, (f"{_label(fields)} is not the anchored record: its hash is {fields['hash']}, the"
                            f" anchor {anchor} says otherwise; the trail up to it was rewritten (or cut and"
                            " written again) after the anchor was taken")
    return None


def _is_hash(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


class _StoredByHash:
    """The stored records by hash, asked of the database only when a record fails its check (tracing
    where moved content came from), so that an intact walk holds one record at a time."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def get(self, record_hash: str) -> Mapping[str, Any] | None:
        """The newest stored record with this hash, as stored."""
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(audit_table).where(audit_table.c.hash == record_hash)
                               .order_by(audit_table.c.seq.desc()).limit(1)).first()
        return _stored_fields(row) if row is not None else None

    def __len__(self) -> int:
        with self._engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(audit_table)).scalar_one())


def _original_seq(fields: Mapping[str, Any], stored: _StoredByHash) -> int | None:
    """Where a record's content was first written, if it is an intact record moved to another seq.

    Its ``prev_hash`` names its original predecessor; that one is either intact where it
    stands (so this content belonged right after it) or moved too, so follow the links back.
    """
    steps = 0
    link: Mapping[str, Any] = fields
    while link["prev_hash"] != GENESIS_HASH:
        before = stored.get(link["prev_hash"])
        steps += 1
        if before is None or steps > len(stored):
            return None
        if record_hash(before) == before["hash"]:
            steps += before["seq"] - 1
            break
        link = before
    candidate = steps + 1
    return candidate if record_hash({**fields, "seq": candidate}) == fields["hash"] else None


def _stored_fields(row: sa.Row) -> dict[str, Any]:
    """A row's fields exactly as stored (no enum parsing), so a tampered value is hashed, not rejected."""
    fields = dict(row._mapping)
    for name in ("inputs", "details"):
        fields[name] = _json_or_text(fields[name])
    return fields


def _json_or_text(text: Any) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text  # edited into something that is not JSON: hashed as the raw text, which cannot match


def _step(name: str) -> Step | str:
    """A stored step name as its member: the stored text is the member's value, so records written
    before the names were members (or by another version) read back the same."""
    try:
        return Step(name)
    except ValueError:
        return name


def _from_row(row: sa.Row) -> AuditRecord:
    try:
        trigger = Trigger(row.trigger) if row.trigger is not None else None
        outcome = StepOutcome(row.outcome)
        inputs, details = json.loads(row.inputs), json.loads(row.details)
    except ValueError as exc:
        raise AuditError(f"record {row.seq} cannot be read ({exc}): it was altered; run verify()") from exc
    return AuditRecord(
        seq=row.seq, time=row.time, run_id=row.run_id, flow=row.flow, trigger=trigger, operator=row.operator,
        cluster=row.cluster, host=row.host, vm=row.vm, step=_step(row.step), inputs=inputs, outcome=outcome,
        duration_s=row.duration_s, details=details, prev_hash=row.prev_hash, hash=row.hash)
