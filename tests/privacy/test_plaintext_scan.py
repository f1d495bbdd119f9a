"""Plaintext personal data never reaches Kafka, PostgreSQL, logs or shards: checked on raw bytes.

Known names and emails go through the whole platform — SDK, ledger, relay, Kafka, the
samples projection, a snapshot — and then every byte those steps wrote is searched for
them. Each search has a control: a non-personal marker that travelled the same path and
must be found by the same scanner.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from events.store.client import EventStore
from events.errors import EvpError
from events.event import Event
from events.settings import Settings
from projections.runner import ProjectionRunner
from projections.samples import SamplesView
from tests.conftest import create_database, drop_database
from tests.privacy import (
    Person,
    PlaintextScanner,
    captured_logs,
    database_files,
    kafka_log_dir,
    log_server_error,
    make_people,
    pg_dump,
    postgres_data_dir,
    random_marker,
    read_files,
    register,
    registered,
    service_log_files,
    snapshot_files,
    submit,
    topic_files,
    with_bytea_decoded,
)
from trainer.snapshot import SnapshotManifest, create_snapshot


@dataclass(frozen=True)
class World:
    settings: Settings
    people: tuple[Person, ...]
    source_marker: str  #: in every sample's ``source``: Kafka, the ledger, the view
    sample_ids: tuple[str, ...]  #: in the snapshot shards
    log_marker: str  #: logged by the test, and by PostgreSQL
    logs: str  #: this process's log records while the world was built
    refusals: tuple[str, ...]  #: messages of appends the SDK refused, personal data in hand
    manifest: SnapshotManifest

    @property
    def scanner(self) -> PlaintextScanner:
        return PlaintextScanner(v for p in self.people for v in p.personal)


@pytest.fixture(scope="module")
def world(services: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    rng = random.Random()
    home = tmp_path_factory.mktemp("privacy-scan")
    url = create_database(services)
    settings = services.with_(
        database_url=url, topic_prefix=f"t{rng.getrandbits(40):010x}", home=home / "home", kek_file=home / "home" / "kek"
    )
    people = tuple(make_people(rng, 4))
    source = random_marker(rng, "source")
    log_marker = random_marker(rng, "log")
    sample_ids = tuple(f"smp-{random_marker(rng, 'id')}-{i}" for i in range(len(people) * 5))
    try:
        with captured_logs() as logs, EventStore.open(settings) as store:
            for person in people:
                register(store, person)
            for i, person in enumerate(people):
                submit(store, person, sample_ids[i * 5 : (i + 1) * 5], source)
            errors = _rejected_attempts(store, people[0])
            store.flush()
            with ProjectionRunner(settings, SamplesView()) as runner:
                runner.catch_up()
            manifest = create_snapshot(store)
            logging.getLogger("tests.privacy").info("control %s", log_marker)
            log_text = logs.getvalue()
        log_server_error(url, log_marker)
        yield World(settings, people, source, sample_ids, log_marker, log_text, tuple(errors), manifest)
    finally:
        drop_database(services, url)


def _rejected_attempts(store: EventStore, person: Person) -> list[str]:
    """Appends the SDK must refuse, with personal data in them: their messages are scanned too."""
    attempts = [
        ("annotator-nobody", Event("AnnotatorRegistered", {"annotator_id": "", "name": person.name, "email": person.email})),
        ("annotator-twice", Event("AnnotatorRegistered", {
            "annotator_id": person.annotator_id, "name": person.name, "email": person.email, "email_index": "x",
        })),
    ]
    messages = []
    for stream, event in attempts:
        with pytest.raises(EvpError) as caught:
            store.append(stream, event)
        messages.append(str(caught.value))
    with pytest.raises(EvpError) as caught:  # the same email again: refused on its blind index
        store.append("annotator-dup", registered(Person("ann-dup", person.name, person.email)),
                     reservations=[store.reserve_email(person.email.upper())])
    messages.append(str(caught.value))
    return messages


def _assert_clean(scanner: PlaintextScanner, sources: dict[str, bytes]) -> None:
    hits = scanner.scan(sources)
    assert not hits, f"plaintext personal data found: {hits}"


services = pytest.mark.services


@services
def test_personal_data_went_in_and_decrypts_with_the_keys(world: World) -> None:
    """Not vacuous: the data is there, sealed, and opens to the original values."""
    with EventStore.open(world.settings) as store:
        for person in world.people:
            raw = store.read_stream(person.stream_id, decrypt=False)[0].data
            assert raw["name"].startswith("evp1:") and raw["email"].startswith("evp1:")
            opened = store.read_stream(person.stream_id)[0].data
            assert (opened["name"], opened["email"]) == (person.name, person.email)
    with psycopg.connect(world.settings.database_url) as conn:
        rows = conn.execute("SELECT name_sealed, email_sealed FROM evp_views.annotators").fetchall()
    assert len(rows) == len(world.people) and all(n.startswith("evp1:") and e.startswith("evp1:") for n, e in rows)


@services
def test_kafka_log_segments_hold_no_plaintext(world: World) -> None:
    log_dir = kafka_log_dir()
    if log_dir is None:
        pytest.skip("the broker's log directory is not on this machine")
    files = read_files(topic_files(log_dir, world.settings))
    segments = {name: data for name, data in files.items() if name.endswith(".log")}
    assert sum(map(len, segments.values())) > 0, f"no segment bytes for {world.settings.topic_prefix}.* in {log_dir}"
    assert PlaintextScanner([world.source_marker]).scan(segments), "control: the source marker is not in the segments"
    _assert_clean(world.scanner, files)


@services
def test_database_dump_holds_no_plaintext(world: World) -> None:
    dump = pg_dump(world.settings.database_url)
    control = PlaintextScanner([world.source_marker])
    assert control.find(dump), "control: the view's source column is not in the dump"
    values_only = with_bytea_decoded(dump)[len(dump) :]
    assert control.find(values_only), "control: the ledger's record values are not in the decoded bytea"
    _assert_clean(world.scanner, {"pg_dump": dump, "pg_dump bytea": values_only})


@services
def test_database_files_and_wal_hold_no_plaintext(world: World) -> None:
    data_dir = postgres_data_dir()
    if data_dir is None:
        pytest.skip("the PostgreSQL data directory is not readable here")
    with psycopg.connect(world.settings.database_url, autocommit=True) as conn:
        files = read_files(database_files(data_dir, conn))
    wal = {name: data for name, data in files.items() if "pg_wal" in Path(name).parts}
    tables = {name: data for name, data in files.items() if name not in wal}
    control = PlaintextScanner([world.source_marker])
    assert control.scan(wal), "control: the source marker is not in the WAL"
    assert control.scan(tables), "control: the source marker is not in the table files"
    _assert_clean(world.scanner, files)


@services
def test_snapshot_shards_hold_no_plaintext(world: World) -> None:
    files = read_files(snapshot_files(world.settings))
    shards = {name: data for name, data in files.items() if not name.endswith("manifest.json")}
    assert len(shards) == len(world.manifest.shards) > 0
    assert PlaintextScanner([world.sample_ids[0]]).scan(shards), "control: a sample id is not in the shards"
    _assert_clean(world.scanner, files)


@services
def test_service_logs_hold_no_plaintext(world: World) -> None:
    files = read_files(service_log_files())
    kafka_logs = {n: d for n, d in files.items() if Path(n).name.startswith("kafka")}
    postgres_logs = {n: d for n, d in files.items() if Path(n).name.startswith("postgres")}
    if not kafka_logs or not postgres_logs:
        pytest.skip("the services' logs are not on this machine")
    assert PlaintextScanner([f"{world.settings.topic_prefix}.events"]).scan(kafka_logs), "control: topic not in kafka log"
    assert PlaintextScanner([world.log_marker]).scan(postgres_logs), "control: marker not in the postgres log"
    _assert_clean(world.scanner, files)


@services
def test_captured_logs_and_errors_hold_no_plaintext(world: World) -> None:
    logs = world.logs.encode()
    assert PlaintextScanner([world.log_marker]).find(logs), "control: the test's own log line was not captured"
    assert len(world.refusals) == 3 and all(world.refusals)
    _assert_clean(world.scanner, {"captured logs": logs, **{f"refusal {i}": m.encode() for i, m in enumerate(world.refusals)}})


# -- the scanner itself (no services) ------------------------------------------------------
@given(needle=st.text(min_size=1, max_size=20), before=st.binary(max_size=50), after=st.binary(max_size=50))
def test_scanner_finds_a_needle_in_any_surroundings_and_its_lower_case(needle: str, before: bytes, after: bytes) -> None:
    scanner = PlaintextScanner([needle])
    assert needle in scanner.find(before + needle.encode() + after)
    assert needle.lower() in scanner.find(before + needle.lower().encode() + after)


@given(text=st.text(min_size=1, max_size=40), noise=st.binary(max_size=30))
def test_bytea_hex_is_decoded_for_the_scan(text: str, noise: bytes) -> None:
    literal = b"\\\\x" + (noise + text.encode()).hex().encode()
    dump = b"COPY t (v) FROM stdin;\n1\t" + literal + b"\n\\.\n"
    assert text.encode() in with_bytea_decoded(dump)
    assert PlaintextScanner([text]).find(with_bytea_decoded(dump))
