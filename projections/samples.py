"""The samples view: labelled samples and their annotators, folded from the events topic.

``samples`` holds every submitted sample that was not retracted, with its current label;
``annotators`` holds who labels them, with personal fields exactly as they travel: sealed
("evp1:..." ciphertext) under the annotator's data key, next to the id of the event that
sealed them (the ciphertext is bound to it, so opening a value needs it). The view never sees plaintext, so
forgetting an annotator (deleting their key) makes their row unreadable here too, and
lookups by email go through the blind index.

The fold, per record in stream order:

- ``SampleSubmitted`` puts the sample (a re-submission replaces it, uncorrected);
- ``LabelCorrected`` sets the label of an existing sample, marks it corrected and counts
  the correction (the count is what makes a doubled event visible in the view);
- ``SampleRetracted`` deletes the sample;
- ``AnnotatorRegistered`` puts the annotator;
- every other event type is ignored.

A batch is first reduced to its net effect per sample (:func:`net_changes`), then written
with a handful of statements, whatever its size.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from functools import cache
from typing import Any

import psycopg
from psycopg import sql

from events.privacy import cipher
from events.schema.catalog import Catalog
from events.errors import InvalidEvent
from events.store.log import LogRecord
from projections.runner import parse_timestamp

DEFAULT_SCHEMA = "evp_views"

SUBMITTED = "SampleSubmitted"
CORRECTED = "LabelCorrected"
RETRACTED = "SampleRetracted"
REGISTERED = "AnnotatorRegistered"
FORGOTTEN = "SubjectForgotten"


@dataclass(frozen=True)
class SampleRow:
    sample_id: str
    annotator_id: str
    label: int
    features: tuple[float, ...]
    source: str
    submitted_at: datetime | None
    corrected: bool
    corrections: int
    version: int


@dataclass(frozen=True)
class LabelChange:
    """Corrections to a sample that was not submitted in the same batch: the last label, how many."""

    sample_id: str
    label: int
    version: int
    count: int


@dataclass(frozen=True)
class AnnotatorRow:
    annotator_id: str
    event_id: uuid.UUID  #: the sealed fields are bound to it: opening them needs it
    name_sealed: str
    email_sealed: str
    email_index: str
    registered_at: datetime | None


@dataclass(frozen=True)
class Changes:
    """The net effect of a batch: each sample id appears in at most one of the three."""

    puts: tuple[SampleRow, ...] = ()
    label_changes: tuple[LabelChange, ...] = ()
    deletes: tuple[str, ...] = ()
    annotators: tuple[AnnotatorRow, ...] = ()
    forgotten: tuple[str, ...] = ()  #: subjects whose personal columns must be redacted


def short_type(event_type: str) -> str:
    """``evp.samples.SampleSubmitted`` -> ``SampleSubmitted`` (short names are unique in the catalog)."""
    return event_type.rsplit(".", 1)[-1]


def _required_id(record: LogRecord, field: str) -> str:
    value = record.data.get(field)
    if not isinstance(value, str) or not value:
        raise InvalidEvent(record.event_type, field, f"must be a non-empty string, got {value!r}")
    return value


def _occurred_at(record: LogRecord) -> datetime | None:
    try:
        return parse_timestamp(record.occurred_at)
    except ValueError as err:
        raise InvalidEvent(record.event_type, "evp.occurred_at", f"header {record.occurred_at!r} is not ISO 8601") from err


def _annotator(record: LogRecord) -> AnnotatorRow:
    data = record.data
    for field in Catalog.default().personal_fields(record.event_type):
        value = data.get(field)
        if not isinstance(value, str) or not cipher.is_sealed(value):
            raise InvalidEvent(record.event_type, field, "personal data arrived unencrypted; the view stores only ciphertext")
    return AnnotatorRow(
        annotator_id=_required_id(record, "annotator_id"),
        event_id=record.event_id,
        name_sealed=data["name"],
        email_sealed=data["email"],
        email_index=_required_id(record, "email_index"),
        registered_at=_occurred_at(record),
    )


def net_changes(records: Sequence[LogRecord]) -> Changes:
    """Reduce records (in log order) to what they change, as if applied one by one.

    Per sample the state after the batch is one of: a full row (submitted in the batch,
    maybe corrected later in it), deleted, or a label change to a row that existed before.
    """
    rows: dict[str, SampleRow | None] = {}  # None: deleted in this batch
    labels: dict[str, LabelChange] = {}
    annotators: dict[str, AnnotatorRow] = {}
    forgotten: set[str] = set()
    for record in records:
        kind = short_type(record.event_type)
        if kind == FORGOTTEN:
            forgotten.add(_required_id(record, "subject_id"))
            continue
        if kind == REGISTERED:
            row = _annotator(record)
            annotators[row.annotator_id] = row
            continue
        if kind not in (SUBMITTED, CORRECTED, RETRACTED):
            continue
        sample_id = _required_id(record, "sample_id")
        data = record.data
        if kind == SUBMITTED:
            rows[sample_id] = SampleRow(
                sample_id=sample_id,
                annotator_id=_required_id(record, "annotator_id"),
                label=int(data["label"]),
                features=tuple(data["features"]),  # Avro floats: already Python floats
                source=str(data.get("source", "")),
                submitted_at=_occurred_at(record),
                corrected=False,
                corrections=0,
                version=record.version,
            )
            labels.pop(sample_id, None)
        elif kind == RETRACTED:
            rows[sample_id] = None
            labels.pop(sample_id, None)
        elif sample_id in rows:  # a correction of a sample put or deleted in this batch
            current = rows[sample_id]
            if current is not None:
                rows[sample_id] = replace(current, label=int(data["label"]), corrected=True,
                                          corrections=current.corrections + 1, version=record.version)
        else:  # a correction of a sample from an earlier batch (or of none at all)
            earlier = labels.get(sample_id)
            labels[sample_id] = LabelChange(sample_id, int(data["label"]), record.version, 1 + (earlier.count if earlier else 0))
    return Changes(
        puts=tuple(r for r in rows.values() if r is not None),
        label_changes=tuple(labels.values()),
        deletes=tuple(s for s, r in rows.items() if r is None),
        annotators=tuple(annotators.values()),
        forgotten=tuple(sorted(forgotten)),
    )


SAMPLE_COLUMNS = (
    "sample_id", "annotator_id", "label", "features", "source", "submitted_at", "corrected", "corrections", "version",
)
_SAMPLE_COLUMNS = sql.SQL(", ").join(map(sql.Identifier, SAMPLE_COLUMNS))

# New and replaced rows are COPYed into a private staging table, then merged with one
# INSERT ... ON CONFLICT: an order of magnitude faster than row-by-row inserts.
_STAGE = sql.SQL(
    "CREATE TEMP TABLE IF NOT EXISTS evp_samples_stage (sample_id text, annotator_id text, label integer,"
    " features real[], source text, submitted_at timestamptz, corrected boolean, corrections integer, version bigint)"
)
_COPY_STAGE = sql.SQL("COPY pg_temp.evp_samples_stage ({}) FROM STDIN").format(_SAMPLE_COLUMNS)
_CLEAR_STAGE = sql.SQL("TRUNCATE pg_temp.evp_samples_stage")


def _real_array(values: Sequence[float]) -> str:
    """A PostgreSQL array literal; much faster than adapting 64 floats one by one."""
    return "{" + str(list(values))[1:-1] + "}"


@dataclass(frozen=True)
class _Statements:
    create: tuple[sql.Composed, ...]
    put: sql.Composed
    relabel: sql.Composed
    delete: sql.Composed
    put_annotator: sql.Composed
    forget: sql.Composed
    redact: sql.Composed


@cache
def _statements(schema: str) -> _Statements:
    s = sql.Identifier(schema)
    return _Statements(
        create=(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {}.samples ("
                " sample_id text PRIMARY KEY, annotator_id text NOT NULL, label integer NOT NULL,"
                " features real[] NOT NULL, source text NOT NULL DEFAULT '', submitted_at timestamptz,"
                " corrected boolean NOT NULL DEFAULT false, corrections integer NOT NULL DEFAULT 0,"
                " version bigint NOT NULL)"
            ).format(s),
            sql.SQL("CREATE INDEX IF NOT EXISTS samples_by_annotator ON {}.samples (annotator_id)").format(s),
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {}.annotators ("
                " annotator_id text PRIMARY KEY, event_id uuid NOT NULL, name_sealed text, email_sealed text,"
                " email_index text, registered_at timestamptz, erased boolean NOT NULL DEFAULT false)"
            ).format(s),
            # Erasures may arrive before the registration they erase (another stream, maybe
            # another partition), so they are remembered and applied to late rows too.
            sql.SQL("CREATE TABLE IF NOT EXISTS {}.forgotten_subjects (subject_id text PRIMARY KEY)").format(s),
            sql.SQL("CREATE INDEX IF NOT EXISTS annotators_by_email_index ON {}.annotators (email_index)").format(s),
        ),
        put=sql.SQL(
            "INSERT INTO {}.samples AS t ({})"
            " SELECT {} FROM pg_temp.evp_samples_stage"
            " ON CONFLICT (sample_id) DO UPDATE SET annotator_id = EXCLUDED.annotator_id, label = EXCLUDED.label,"
            " features = EXCLUDED.features, source = EXCLUDED.source, submitted_at = EXCLUDED.submitted_at,"
            " corrected = EXCLUDED.corrected, corrections = EXCLUDED.corrections, version = EXCLUDED.version"
        ).format(s, _SAMPLE_COLUMNS, _SAMPLE_COLUMNS),
        relabel=sql.SQL(
            "UPDATE {}.samples AS t SET label = c.label, corrected = true, corrections = t.corrections + c.n,"
            " version = c.version FROM unnest(%s::text[], %s::integer[], %s::bigint[], %s::integer[])"
            " AS c (sample_id, label, version, n)"
            " WHERE t.sample_id = c.sample_id"
        ).format(s),
        delete=sql.SQL("DELETE FROM {}.samples WHERE sample_id = ANY(%s::text[])").format(s),
        put_annotator=sql.SQL(
            "INSERT INTO {}.annotators AS t (annotator_id, event_id, name_sealed, email_sealed, email_index, registered_at)"
            " VALUES (%s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (annotator_id) DO UPDATE SET event_id = EXCLUDED.event_id, name_sealed = EXCLUDED.name_sealed,"
            " email_sealed = EXCLUDED.email_sealed, email_index = EXCLUDED.email_index,"
            " registered_at = EXCLUDED.registered_at"
        ).format(s),
        forget=sql.SQL(
            "INSERT INTO {}.forgotten_subjects (subject_id) SELECT unnest(%s::text[]) ON CONFLICT DO NOTHING"
        ).format(s),
        redact=sql.SQL(
            "UPDATE {}.annotators SET name_sealed = NULL, email_sealed = NULL, email_index = NULL, erased = true"
            " WHERE NOT erased AND annotator_id IN (SELECT subject_id FROM {}.forgotten_subjects)"
        ).format(s, s),
    )


class SamplesView:
    """The ``samples`` and ``annotators`` tables (a :class:`projections.runner.BatchProjection`)."""

    name = "samples"
    default_schema = DEFAULT_SCHEMA

    def create(self, cur: psycopg.Cursor[Any], schema: str) -> None:
        for statement in _statements(schema).create:
            cur.execute(statement)

    def apply(self, cur: psycopg.Cursor[Any], schema: str, record: LogRecord) -> None:
        self.apply_batch(cur, schema, [record])

    def apply_batch(self, cur: psycopg.Cursor[Any], schema: str, records: Sequence[LogRecord]) -> None:
        write(cur, schema, net_changes(records))


def write(cur: psycopg.Cursor[Any], schema: str, changes: Changes) -> None:
    """Write a batch's net changes; the order does not matter, each sample is in one list."""
    st = _statements(schema)
    if changes.deletes:
        cur.execute(st.delete, (list(changes.deletes),))
    if changes.label_changes:
        c = changes.label_changes
        cur.execute(st.relabel, ([x.sample_id for x in c], [x.label for x in c], [x.version for x in c], [x.count for x in c]))
    if changes.puts:
        cur.execute(_STAGE)
        with cur.copy(_COPY_STAGE) as copy:
            for r in changes.puts:
                copy.write_row((r.sample_id, r.annotator_id, r.label, _real_array(r.features), r.source,
                                r.submitted_at, r.corrected, r.corrections, r.version))
        cur.execute(st.put)
        cur.execute(_CLEAR_STAGE)
    if changes.annotators:
        cur.executemany(st.put_annotator, [
            (a.annotator_id, a.event_id, a.name_sealed, a.email_sealed, a.email_index, a.registered_at) for a in changes.annotators
        ])
    if changes.forgotten:
        cur.execute(st.forget, (list(changes.forgotten),))
    if changes.forgotten or changes.annotators:
        cur.execute(st.redact)


def read_samples(cur: psycopg.Cursor[Any], schema: str = DEFAULT_SCHEMA) -> dict[str, Mapping[str, Any]]:
    """The samples table as ``{sample_id: row}`` (for comparisons, audits and tests)."""
    query = sql.SQL("SELECT {} FROM {}.samples").format(_SAMPLE_COLUMNS, sql.Identifier(schema))
    return {row[0]: dict(zip(SAMPLE_COLUMNS, row)) for row in cur.execute(query)}
