"""The fold of one batch, in memory and free of I/O: records in, net changes out.

A batch touches some rows many times (a submission, three corrections, a retraction); the
tables only need the end state of each. The contract, for the records of one batch in log
order (:func:`route`, then :func:`fold`, then :func:`redact`):

1. :func:`route` finds each record's handler and row key; records of types the view does
   not handle are dropped, erasures (``evp.platform.SubjectForgotten``) are collected as
   subjects, and records without a usable key are refused;
2. the caller loads the rows of those keys, as stored (one query);
3. :func:`fold` runs the handlers record by record over an in-memory copy of those rows;
   a handler's :class:`events.errors.InvalidEvent` refuses that record and leaves its row
   as it was; the result is, per key, one put (insert or replace) or one delete, and only
   for rows that changed;
4. :func:`redact` clears the personal columns of puts whose subject is forgotten (before,
   in or after this batch: the caller passes every forgotten subject it knows of).

The same records folded one at a time give the same end state (the property the tests
check against an independent fold).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from events.errors import InvalidEvent
from events.store.log import LogRecord
from projections.view import FORGOTTEN, Layout, Row, Sealed, View, ViewDefinitionError

Refusal = tuple[LogRecord, InvalidEvent]


@dataclass(frozen=True)
class Stored:
    """A row as the table holds it: the declared columns, and whether it was redacted."""

    row: Row
    erased: bool = False


@dataclass(frozen=True)
class Target:
    record: LogRecord
    key: Any
    handler: Callable[[Row | None, LogRecord], Row | None]


@dataclass(frozen=True)
class Routed:
    """A batch sorted out: records to fold, subjects forgotten, records refused for their key."""

    targets: tuple[Target, ...] = ()
    forgotten: tuple[str, ...] = ()
    refused: tuple[Refusal, ...] = ()

    @property
    def keys(self) -> list[Any]:
        return list(dict.fromkeys(t.key for t in self.targets))


@dataclass(frozen=True)
class Changes:
    """The net effect of a batch: each key in at most one of ``puts`` and ``deletes``."""

    puts: tuple[Stored, ...] = ()
    deletes: tuple[Any, ...] = ()
    forgotten: tuple[str, ...] = ()
    refused: tuple[Refusal, ...] = ()


def route(view: View, layout: Layout, records: Iterable[LogRecord]) -> Routed:
    """Step 1: each record's handler and key, the erasures, and the records with a bad key."""
    targets: list[Target] = []
    forgotten: list[str] = []
    refused: list[Refusal] = []
    for record in records:
        if record.event_type == FORGOTTEN:
            subject = record.data.get("subject_id")
            if isinstance(subject, str) and subject:
                forgotten.append(subject)
            else:
                refused.append((record, InvalidEvent(record.event_type, "subject_id", "must be a non-empty string")))
            continue
        found = view.handler_for(record.event_type)
        if found is None:
            continue
        key_field, handler = found
        try:
            targets.append(Target(record, key_of(layout, record, key_field), handler))
        except InvalidEvent as err:
            refused.append((record, err))
    return Routed(tuple(targets), tuple(dict.fromkeys(forgotten)), tuple(refused))


def key_of(layout: Layout, record: LogRecord, field: str) -> Any:
    """The row key in ``record``'s ``field``; InvalidEvent naming the field when unusable."""
    value = record.data.get(field)
    if layout.key.sql_type == "text":
        if isinstance(value, str) and value.strip():
            return value
        raise InvalidEvent(record.event_type, field,
                           f"holds the key of view {layout.view!r}: must be a non-empty string, got {value!r}")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise InvalidEvent(record.event_type, field, f"holds the key of view {layout.view!r}: must be an integer, got {value!r}")


def fold(layout: Layout, routed: Routed, loaded: Mapping[Any, Stored]) -> Changes:
    """Step 3: run the handlers over the loaded rows; the puts and deletes that differ from them."""
    state: dict[Any, Stored | None] = {}
    refused = list(routed.refused)
    for target in routed.targets:
        current = state[target.key] if target.key in state else loaded.get(target.key)
        try:
            out = target.handler(None if current is None else dict(current.row), target.record)
        except InvalidEvent as err:
            refused.append((target.record, err))
            continue
        if out is None:
            state[target.key] = None
        else:
            row = checked_row(layout, target, out)
            state[target.key] = Stored(row, current.erased if current is not None else False)
    puts = tuple(s for k, s in state.items() if s is not None and loaded.get(k) != s)
    deletes = tuple(k for k, s in state.items() if s is None and k in loaded)
    return Changes(puts, deletes, routed.forgotten, tuple(refused))


def checked_row(layout: Layout, target: Target, out: object) -> Row:
    """What a handler returned, as a full row; ViewDefinitionError names what is wrong with it."""
    function = getattr(target.handler, "func", target.handler)  # a functools.partial binding the view
    where = f"handler {getattr(function, '__name__', '?')} for {target.record.event_type}"
    if not isinstance(out, Mapping):
        raise ViewDefinitionError(layout.view, where, f"must return a dict or None, got {type(out).__name__}")
    unknown = sorted(set(out) - layout.names)
    if unknown:
        raise ViewDefinitionError(layout.view, where, f"returned column(s) {unknown} the view does not declare")
    key = layout.key.name
    if key in out and out[key] != target.key:
        raise ViewDefinitionError(layout.view, where, f"returned key {out[key]!r} for the row of key {target.key!r}")
    for column in layout.personal:
        value = out.get(column.name)
        if value is not None and not isinstance(value, Sealed):
            raise ViewDefinitionError(
                layout.view, where,
                f"personal column {column.name!r} must hold projections.view.sealed(record, field), got {type(value).__name__}",
            )
    row = {c.name: out.get(c.name) for c in layout.columns}
    row[key] = target.key
    for column in layout.personal:
        value, holder = row.get(column.name), column.subject or ""
        # Redaction clears a column when the subject in its subject column is forgotten: that
        # must be the subject the value was sealed for, or an erasure would miss it.
        if isinstance(value, Sealed) and value.subject is not None and row.get(holder) != value.subject:
            raise ViewDefinitionError(
                layout.view, where,
                f"personal column {column.name!r} is redacted with subject column {holder!r} "
                f"({row.get(holder)!r}), but its value was sealed for another subject "
                f"(field {value.field!r} of {value.event_type})",
            )
    return row


def subjects_of(layout: Layout, puts: Sequence[Stored]) -> set[str]:
    """The subjects named by the puts' subject columns (whose erasures the caller looks up)."""
    return {str(s.row[subject]) for s in puts for subject in layout.subjects() if s.row.get(subject) is not None}


def redact(layout: Layout, puts: Sequence[Stored], forgotten: set[str]) -> tuple[Stored, ...]:
    """Step 4: the puts with personal columns of forgotten subjects cleared and ``erased`` set."""
    subjects = layout.subjects()
    out: list[Stored] = []
    for stored in puts:
        row, erased = stored.row, stored.erased
        for subject, columns in subjects.items():
            if row.get(subject) is not None and str(row[subject]) in forgotten and any(row[c] is not None for c in columns):
                row = row | {c: None for c in columns}
                erased = True
        out.append(Stored(row, erased) if (row, erased) != (stored.row, stored.erased) else stored)
    return tuple(out)
