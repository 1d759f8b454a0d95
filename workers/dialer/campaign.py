"""Campaigns: a CSV of contacts enqueued as calls, and their progress by state.

CSV format: a header row, then one contact per row. Columns (case-insensitive):

* ``to`` (or ``number`` / ``phone``) — required, country code first;
* ``id`` — optional contact id; it makes the idempotency key (else the number);
* ``caller_id``, ``flow``, ``listen_mode``, ``voice_quality``, ``start_at`` —
  optional per-row overrides of the command-line defaults;
* any other column is passed to the platform in ``extra_params`` (the call's
  events echo it back), so a row's own data travels with its call.

Every call's idempotency key is ``campaign:<name>:<id or number>``: running the
same file again does not dial anyone twice, and a file cut short can simply be
run again. Bad rows are reported with their line number and reason; the good
rows are enqueued regardless.

Progress is read from the campaign's state hash (``call id -> state``), which
``piopiy_voice.callrecord.set_state`` updates whenever a state change names the
campaign (the dialer and the gateway both pass it).
"""

from __future__ import annotations

import csv
import io
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from piopiy_voice import callrecord, keys
from piopiy_voice.settings import Settings

from .api import IdempotencyConflict, _name, build_request, enqueue_request
from .ratelimit import live_count

TO_COLUMNS = ("to", "number", "phone")
ROW_OPTIONS = ("caller_id", "flow", "listen_mode", "voice_quality", "start_at")
RESERVED = set(TO_COLUMNS) | set(ROW_OPTIONS) | {"id"}


@dataclass
class RowError:
    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass
class ImportReport:
    campaign: str
    rows: int = 0
    enqueued: int = 0
    already: int = 0  #: rows whose call had been enqueued before (same key)
    errors: list[RowError] = field(default_factory=list)
    call_ids: list[str] = field(default_factory=list)


def info_key(name: str) -> str:
    return keys.campaign_key(name, "info")


def read_rows(stream: TextIO) -> Iterator[tuple[int, dict[str, str] | None, str | None]]:
    """Yield ``(line number, row, error)`` for each data row; the header is line 1.

    ``row`` is keyed by lower-cased, stripped column names.
    """
    reader = csv.reader(stream)
    try:
        header = next(reader)
    except StopIteration:
        raise ValueError("the CSV file is empty (expected a header row)") from None
    except csv.Error as exc:
        raise ValueError(f"line 1: unreadable header ({exc})") from None
    names = [h.strip().lower() for h in header]
    if not any(n in TO_COLUMNS for n in names):
        raise ValueError(f"line 1: the header needs a 'to' column (or number/phone), got {header}")
    dupes = sorted({n for n in names if names.count(n) > 1 and n})
    if dupes:
        raise ValueError(f"line 1: duplicate column(s) {', '.join(dupes)}")
    while True:
        start = reader.line_num + 1
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield start, None, f"unreadable row ({exc})"
            continue
        if not any(v.strip() for v in values):
            continue  # blank line
        if len(values) > len(names):
            yield start, None, f"{len(values)} fields but the header has {len(names)}"
            continue
        values += [""] * (len(names) - len(values))
        yield start, {n: v.strip() for n, v in zip(names, values) if n}, None


def _row_request(row: dict[str, str], name: str, defaults: dict[str, Any], settings: Settings):
    to = next((row[c] for c in TO_COLUMNS if row.get(c)), "")
    if not to:
        raise ValueError("to: empty")
    fields = dict(defaults)
    for opt in ROW_OPTIONS:
        if row.get(opt):
            fields[opt] = row[opt]
    extra = {k: v for k, v in row.items() if k not in RESERVED and v != ""}
    if extra:
        fields["extra_params"] = {**fields.get("extra_params", {}), **extra}
    contact = row.get("id") or to.lstrip("+")
    fields["idempotency_key"] = f"campaign:{name}:{contact}"
    fields["campaign"] = name
    return build_request(settings, to=to, **fields)


def enqueue_csv(conn, source: str | Path | TextIO, name: str, *, defaults: dict[str, Any] | None = None,
                settings: Settings | None = None,
                progress: Callable[[int, int], None] | None = None) -> ImportReport:
    """Enqueue every good row of ``source`` as a call of campaign ``name``.

    ``defaults`` are ``CallRequest`` fields applied to every row (a row's own
    columns win). ``progress(done, total)`` is called as rows are processed.
    Raises ``ValueError`` when the file as a whole is unusable (no header,
    no ``to`` column); bad rows only end up in ``report.errors``.
    """
    settings = settings or Settings.from_env()
    _name(name, "name")
    defaults = dict(defaults or {})
    if isinstance(source, (str, Path)):
        text = Path(source).read_text(encoding="utf-8-sig")
    else:
        text = source.read()
    total = sum(1 for _ in read_rows(io.StringIO(text, newline="")))  # cheap next to enqueueing
    report = ImportReport(campaign=name)
    conn.hsetnx(info_key(name), "created_at", f"{time.time():.3f}")
    for line, row, error in read_rows(io.StringIO(text, newline="")):
        report.rows += 1
        if error is None:
            try:
                request = _row_request(row, name, defaults, settings)
                result = enqueue_request(conn, request, settings=settings)
            except IdempotencyConflict as exc:
                error = f"already enqueued with different options (call {exc.call_id})"
            except ValueError as exc:
                error = str(exc)
            else:
                report.call_ids.append(result.call_id)
                if result.created:
                    report.enqueued += 1
                else:
                    report.already += 1
        if error is not None:
            report.errors.append(RowError(line, error))
        if progress:
            progress(report.rows, total)
    conn.hincrby(info_key(name), "rows_enqueued", report.enqueued)
    conn.expire(info_key(name), keys.CAMPAIGN_TTL_S)
    return report


def state_counts(conn, name: str) -> dict[str, int]:
    """Calls of campaign ``name`` by state (every state listed, zeros included)."""
    counts: Counter[str] = Counter()
    for _, state in conn.hscan_iter(keys.campaign_key(name, "states"), count=1000):
        counts[state.decode() if isinstance(state, bytes) else state] += 1
    out = {state: counts.get(state, 0) for state in callrecord.STATES}
    out.update({k: v for k, v in counts.items() if k not in out})
    return out


def campaign_status(conn, name: str) -> dict[str, Any] | None:
    """Counts by state plus live slots in use; None when no such campaign exists."""
    _name(name, "name")
    counts = state_counts(conn, name)
    if not sum(counts.values()) and not conn.exists(info_key(name)):
        return None
    return {"campaign": name, "total": sum(counts.values()), "states": counts,
            "live_slots": live_count(conn, name)}
