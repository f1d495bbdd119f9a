"""What field encryption costs the producer SDK, measured against itself in the same run.

Three measurements, each printed as encrypted vs. plain and their ratio:

1. ``prepare`` only (validate, blind index, seal, Avro-encode; no I/O): the CPU cost;
2. ``append`` to the ledger (one PostgreSQL transaction per batch), for subjects seen for
   the first time (a data key is created and stored per subject) and for known subjects
   (keys cached);
3. raw ``seal_text`` / ``open_text`` operations per second.

"Plain" is the same SDK over the digits schemas with their ``PII`` tags removed: nothing is
sealed, the blind index is still computed (``evp.unique`` stays). Each side has its own
database and topic prefix (their wire schemas differ), dropped at the end. ``--small`` runs
2,000 events, the default 2,000 and 20,000, ``--large`` also 200,000.

    python bench/bench_encryption.py [--small | --large]
"""

from __future__ import annotations

import os
import secrets
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _support import DIGITS, sizes_from, throwaway  # noqa: E402
from events.privacy import cipher
from events.store.client import EventStore  # noqa: E402
from events.event import Event  # noqa: E402
from events.privacy.policy import TAGS_PROPERTY  # noqa: E402
from events.project import Project  # noqa: E402
from events.schema.catalog import Catalog  # noqa: E402
from events.settings import Settings  # noqa: E402

SIZES = {"small": (2_000,), "default": (2_000, 20_000), "large": (2_000, 20_000, 200_000)}
BATCH = 50  #: events per append (one ledger transaction)
SAMPLES_PER_ANNOTATOR = 1
ROUNDS = 3
#: New subjects cost a key-store round trip each: fewer of them keep the run short.
NEW_SUBJECTS = 250


@dataclass(frozen=True)
class Rate:
    label: str
    encrypted: float  #: events (or operations) per second with encryption
    plain: float

    def row(self, events: int) -> str:
        ratio = self.encrypted / self.plain if self.plain else float("nan")
        return (f"| {events:,} | {self.label} | {self.encrypted:,.0f} | {1e6 / self.encrypted:,.1f} | {self.plain:,.0f} |"
                f" {1e6 / self.plain:,.1f} | {ratio:.2f}x |")


def plain_catalog() -> Catalog:
    """The digits schemas with no personal fields: every PII tag removed."""
    schemas = Project.read(DIGITS).schemas()
    for schema in schemas:
        for field in schema.get("fields", []):
            field.pop(TAGS_PROPERTY, None)
    return Catalog.with_platform(schemas)


def workload(annotators: int, tag: str, emails: str | None = None) -> list[Event]:
    """Registrations with personal data, each followed by a sample submission.

    ``tag`` names the annotators (the data subjects); ``emails`` (default: ``tag``) their
    addresses, which are unique (``evp.unique``): the same subjects again need new ones.
    """
    events: list[Event] = []
    for i in range(annotators):
        annotator = f"bench-{tag}-{i}"
        events.append(Event("AnnotatorRegistered", {
            "annotator_id": annotator, "name": f"Annotator Number {i}",
            "email": f"annotator.{i}.{emails or tag}@example.org",
        }))
        for n in range(SAMPLES_PER_ANNOTATOR):
            events.append(Event("SampleSubmitted", {
                "sample_id": f"{annotator}-{n}", "annotator_id": annotator, "features": [float(i % 17)] * 64,
                "label": i % 10, "source": "bench",
            }))
    return events


def fresh_ids(events: Sequence[Event]) -> list[Event]:
    """The same events under new ids: a repeat append is new work, not an idempotent no-op."""
    return [replace(e, event_id=uuid.uuid4()) for e in events]


def timed(run: Callable[[], int]) -> float:
    started = time.perf_counter()
    count = run()
    return count / (time.perf_counter() - started)


def prepare_all(store: EventStore, events: Sequence[Event]) -> int:
    for event in events:
        store.prepare(event)
    return len(events)


def append_all(store: EventStore, events: Sequence[Event], stream_prefix: str) -> int:
    for start in range(0, len(events), BATCH):
        store.append(f"{stream_prefix}-{start // BATCH}", events[start : start + BATCH])
    return len(events)


def median_of(rounds: int, measure: Callable[[int], float]) -> float:
    """The median of ``rounds`` runs (``measure(round)`` returns a rate)."""
    return statistics.median(measure(r) for r in range(rounds))


def sdk_rates(encrypted: EventStore, plain: EventStore, size: int) -> list[Rate]:
    annotators = size // (1 + SAMPLES_PER_ANNOTATOR)
    base = workload(annotators, "warm")
    # warm both: schemas registered, validators compiled, the encrypted side's keys created
    append_all(encrypted, base, "warm-enc")
    append_all(plain, fresh_ids(base), "warm-plain")

    def prepare_rate(store: EventStore) -> Callable[[int], float]:
        return lambda _r: timed(lambda: prepare_all(store, base))

    def known_rate(store: EventStore, label: str) -> Callable[[int], float]:
        return lambda r: timed(lambda: append_all(store, workload(annotators, "warm", f"known-{label}-{r}"),
                                                  f"known-{label}-{r}"))

    def new_rate(store: EventStore, label: str) -> Callable[[int], float]:
        fresh = min(annotators, NEW_SUBJECTS)
        return lambda r: timed(lambda: append_all(store, workload(fresh, f"new-{label}-{r}"), f"new-{label}-{r}"))

    return [
        Rate("prepare (no I/O)", median_of(ROUNDS, prepare_rate(encrypted)), median_of(ROUNDS, prepare_rate(plain))),
        Rate("append, known subjects", median_of(ROUNDS, known_rate(encrypted, "e")), median_of(ROUNDS, known_rate(plain, "p"))),
        Rate("append, new subjects (key created)", median_of(1, new_rate(encrypted, "e")), median_of(1, new_rate(plain, "p"))),
    ]


def cipher_rates(operations: int) -> dict[str, float]:
    """Operations per second of the field cipher alone, on an email-sized value."""
    key = secrets.token_bytes(cipher.KEY_BYTES)
    aad = cipher.field_aad(str(uuid.uuid4()), "digits.AnnotatorRegistered", "email", "annotator-1")
    text = "annotator.12345@example.org"
    sealed = cipher.seal_text(key, text, aad)

    def seal() -> int:
        for _ in range(operations):
            cipher.seal_text(key, text, aad)
        return operations

    def open_() -> int:
        for _ in range(operations):
            cipher.open_text(key, sealed, aad)
        return operations

    return {"seal_text": timed(seal), "open_text": timed(open_)}


def main(argv: Sequence[str] | None = None) -> int:
    sizes = sizes_from(argv, __doc__, SIZES)
    print(f"### field encryption: encrypted vs plain (half the events carry personal data), batches of {BATCH},"
          f" median of {ROUNDS} runs (new subjects: 1 run of {NEW_SUBJECTS} at most); {os.cpu_count()} CPUs")
    print()
    print("| events | measurement | encrypted events/s | µs per event | plain events/s | µs per event | ratio |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for events in sizes:
        with throwaway(Settings.from_env()) as settings, throwaway(Settings.from_env()) as plain_settings:
            with EventStore.open(settings) as encrypted, EventStore.open(plain_settings, plain_catalog()) as plain:
                rates = sdk_rates(encrypted, plain, events)
        for rate in rates:
            print(rate.row(events), flush=True)
    raw = cipher_rates(20_000)
    print()
    for name, per_second in raw.items():
        print(f"{name} (27-byte value): {per_second:,.0f}/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
