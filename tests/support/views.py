"""Helpers for view tests: the example projects' views, event builders, oracles.

:class:`ExpectedSamples` is the test oracle: a plain, one-event-at-a-time Python fold of what
was appended, written independently of the views and of :mod:`projections.fold`, so a wrong
batch reduction, a wrong handler or a doubled/lost event in the runner shows up as a
difference.
"""

from __future__ import annotations

import random
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg

from events.event import Event
from events.privacy.keyring import Keyring
from events.privacy.personal import seal
from events.project import Project
from events.schema.catalog import Catalog
from events.settings import Settings
from events.store.client import EventStore
from events.store.log import LogRecord
from projections.tables import read_rows
from projections.view import View

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "examples" / "digits"
CLINIC = REPO / "examples" / "clinic"
for root in (DIGITS, CLINIC):  # what Project.load does, for tests that import the views directly
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))

from clinic.views import DiagnosesView, PatientsView  # noqa: E402
from digits.views import AnnotatorsView, SamplesView  # noqa: E402

EPOCH = datetime(2026, 1, 1, tzinfo=timezone.utc)
SAMPLES_SCHEMA = SamplesView().default_schema
ANNOTATORS_SCHEMA = AnnotatorsView().default_schema


def at(n: int) -> datetime:
    """A deterministic occurred-at time (the view stores it)."""
    return EPOCH + timedelta(seconds=n)


def submitted(sample_id: str, annotator_id: str, label: int, pixel: int, n: int = 0) -> Event:
    return Event("SampleSubmitted", {
        "sample_id": sample_id, "annotator_id": annotator_id, "features": [float((pixel + i) % 17) for i in range(64)],
        "label": label, "source": f"digits:{pixel}",
    }, occurred_at=at(n))


def corrected(sample_id: str, annotator_id: str, label: int, previous: int = 0) -> Event:
    return Event("LabelCorrected", {
        "sample_id": sample_id, "annotator_id": annotator_id, "previous_label": previous, "label": label, "reason": "review",
    })


def retracted(sample_id: str, annotator_id: str) -> Event:
    return Event("SampleRetracted", {"sample_id": sample_id, "annotator_id": annotator_id, "reason": "withdrawn"})


def registered(annotator_id: str, n: int = 0) -> Event:
    return Event("AnnotatorRegistered", {
        "annotator_id": annotator_id, "name": f"Name {annotator_id}", "email": f"{annotator_id}@example.org",
    }, occurred_at=at(n))


def forgotten(subject_id: str) -> Event:
    """The platform's erasure event as `evp forget` appends it (here without destroying the key)."""
    return Event("SubjectForgotten", {"subject_id": subject_id, "reason": "request"})


@dataclass
class ExpectedSamples:
    """What the samples table must hold after the events appended (or folded) through it."""

    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)

    def append(self, store: EventStore, stream_id: str, events: Event | Sequence[Event]) -> None:
        batch = [events] if isinstance(events, Event) else list(events)
        store.append(stream_id, batch)
        for event in batch:
            self.fold(stream_id, event.type, event.data, event.occurred_at)

    def fold(self, stream_id: str, event_type: str, data: Mapping[str, Any], when: datetime | None) -> None:
        version = self.versions.get(stream_id, 0) + 1
        self.versions[stream_id] = version
        if event_type == "SampleSubmitted":
            self.rows[data["sample_id"]] = {
                "annotator_id": data["annotator_id"], "label": data["label"], "features": list(data["features"]),
                "source": data["source"], "submitted_at": when, "corrected": False, "corrections": 0, "version": version,
            }
        elif event_type == "LabelCorrected":
            row = self.rows.get(data["sample_id"])
            if row is not None:
                row.update(label=data["label"], corrected=True, corrections=row["corrections"] + 1, version=version)
        elif event_type == "SampleRetracted":
            self.rows.pop(data["sample_id"], None)

    def restricted(self, prefix: str) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in self.rows.items() if k.startswith(prefix)}


def random_op(rng: random.Random, expected: ExpectedSamples, prefix: str, pool: int, n: int,
              annotator: str = "a1") -> tuple[str, Event]:
    """One random submit/correct/retract on a pool of samples, as (stream id, event)."""
    sample = f"{prefix}{rng.randrange(pool)}"
    kind = rng.choice(("submit", "submit", "correct", "retract"))
    if kind == "submit" and sample in expected.rows:
        kind = "correct"
    if kind == "submit":
        event = submitted(sample, annotator, rng.randrange(10), rng.randrange(17), n)
    elif kind == "correct":
        event = corrected(sample, annotator, rng.randrange(10))
    else:
        event = retracted(sample, annotator)
    return f"sample-{sample}", event


def random_ops(rng: random.Random, store: EventStore, expected: ExpectedSamples, prefix: str, count: int,
               annotator: str = "a1", pool: int | None = None) -> None:
    """Append ``count`` random operations on a pool of samples (count/3 by default)."""
    for n in range(count):
        stream, event = random_op(rng, expected, prefix, pool or max(3, count // 3), n, annotator)
        expected.append(store, stream, event)


def sample_rows(conn: psycopg.Connection[Any], schema: str = SAMPLES_SCHEMA, prefix: str = "") -> dict[str, dict[str, Any]]:
    """The samples table in the oracle's shape."""
    with conn.cursor() as cur:
        rows = read_rows(cur, SamplesView(), schema)
    return {k: {c: v for c, v in row.items() if c != "sample_id"} for k, row in rows.items() if k.startswith(prefix)}


def assert_samples(conn: psycopg.Connection[Any], expected: Mapping[str, Any], schema: str = SAMPLES_SCHEMA,
                   prefix: str = "") -> None:
    actual = sample_rows(conn, schema, prefix)
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    wrong = sorted(k for k in set(expected) & set(actual) if expected[k] != actual[k])
    assert not (missing or extra or wrong), (
        f"view differs from the fold: missing {missing[:5]}, extra {extra[:5]}, wrong {wrong[:5]}"
        + (f"; first wrong: view {actual[wrong[0]]} vs fold {expected[wrong[0]]}" if wrong else "")
    )


def republish_everything(settings: Settings) -> int:
    """What a relay does after crashing between sending and recording: send it all again."""
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        cur = conn.execute("INSERT INTO evp_outbox (position, partition) SELECT position, partition FROM evp_events"
                           " ON CONFLICT DO NOTHING")
        return cur.rowcount


# -- records without Kafka -----------------------------------------------------------------
@dataclass
class Records:
    """Builds :class:`LogRecord` values as the runner would decode them, sealing personal
    fields like the SDK (under ``keyring``), with per-stream versions and offsets."""

    keyring: Keyring
    catalog: Catalog
    versions: dict[str, int] = field(default_factory=dict)
    offset: int = 0

    def make(self, stream_id: str, event_type: str, data: Mapping[str, Any], *, occurred: datetime | None = None,
             plaintext: bool = False) -> LogRecord:
        full = self.catalog.full_name(event_type)
        event_id = uuid.uuid4()
        sealed_data = dict(data) if plaintext else seal(self.catalog.policy(full), str(event_id), data, self.keyring)
        version = self.versions.get(stream_id, 0) + 1
        self.versions[stream_id] = version
        self.offset += 1
        return LogRecord(0, self.offset, stream_id, version, event_id, full, 1, "test",
                         (occurred or at(self.offset)).isoformat(), sealed_data)


def clinic_catalog() -> Catalog:
    return Catalog.with_platform(Project.read(CLINIC).schemas())


__all__ = [
    "ANNOTATORS_SCHEMA", "AnnotatorsView", "DiagnosesView", "ExpectedSamples", "PatientsView", "Records",
    "SAMPLES_SCHEMA", "SamplesView", "View", "assert_samples", "at", "clinic_catalog", "corrected", "forgotten",
    "random_op", "random_ops", "registered", "republish_everything", "retracted", "sample_rows", "submitted",
]
