"""Shared helpers for projection tests: event builders and the expected fold.

:class:`ExpectedView` is the test oracle: a plain, one-event-at-a-time Python fold of what
was appended, written independently of :mod:`projections.samples`, so a wrong batch
reduction or a doubled/lost event in the runner shows up as a difference.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg

from events.store.client import EventStore
from events.event import Event
from projections.samples import read_samples

EPOCH = datetime(2026, 1, 1, tzinfo=timezone.utc)


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


@dataclass
class ExpectedView:
    """What the samples table must hold after the events appended through :meth:`append`."""

    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)

    def append(self, store: EventStore, stream_id: str, events: Event | Sequence[Event]) -> None:
        batch = [events] if isinstance(events, Event) else list(events)
        store.append(stream_id, batch)
        for event in batch:
            self.fold(stream_id, event)

    def fold(self, stream_id: str, event: Event) -> None:
        version = self.versions.get(stream_id, 0) + 1
        self.versions[stream_id] = version
        data = event.data
        if event.type == "SampleSubmitted":
            self.rows[data["sample_id"]] = {
                "annotator_id": data["annotator_id"], "label": data["label"], "features": list(data["features"]),
                "source": data["source"], "submitted_at": event.occurred_at, "corrected": False, "corrections": 0,
                "version": version,
            }
        elif event.type == "LabelCorrected":
            row = self.rows.get(data["sample_id"])
            if row is not None:
                row.update(label=data["label"], corrected=True, corrections=row["corrections"] + 1, version=version)
        elif event.type == "SampleRetracted":
            self.rows.pop(data["sample_id"], None)

    def restricted(self, prefix: str) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in self.rows.items() if k.startswith(prefix)}


def view_rows(conn: psycopg.Connection[Any], schema: str = "evp_views", prefix: str = "") -> dict[str, dict[str, Any]]:
    """The samples table in the oracle's shape."""
    with conn.cursor() as cur:
        rows = read_samples(cur, schema)
    return {k: {c: v for c, v in row.items() if c != "sample_id"} for k, row in rows.items() if k.startswith(prefix)}


def random_ops(rng: random.Random, store: EventStore, expected: ExpectedView, prefix: str, count: int,
               annotator: str = "a1", pool: int | None = None) -> None:
    """Append ``count`` random submit/correct/retract operations on a pool of samples (count/3 by default)."""
    for n in range(count):
        sample = f"{prefix}{rng.randrange(pool or max(3, count // 3))}"
        kind = rng.choice(("submit", "submit", "correct", "retract"))
        if kind == "submit" and sample in expected.rows:
            kind = "correct"
        event = {
            "submit": lambda: submitted(sample, annotator, rng.randrange(10), rng.randrange(17), n),
            "correct": lambda: corrected(sample, annotator, rng.randrange(10)),
            "retract": lambda: retracted(sample, annotator),
        }[kind]()
        expected.append(store, f"sample-{sample}", event)


def assert_view(conn: psycopg.Connection[Any], expected: Mapping[str, Any], schema: str = "evp_views",
                prefix: str = "") -> None:
    actual = view_rows(conn, schema, prefix)
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    wrong = sorted(k for k in set(expected) & set(actual) if expected[k] != actual[k])
    assert not (missing or extra or wrong), (
        f"view differs from the fold: missing {missing[:5]}, extra {extra[:5]}, wrong {wrong[:5]}"
        + (f"; first wrong: view {actual[wrong[0]]} vs fold {expected[wrong[0]]}" if wrong else "")
    )
