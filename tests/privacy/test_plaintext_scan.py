"""Plaintext personal data never reaches Kafka, PostgreSQL, logs or shards: checked on raw bytes.

Known names and emails go through the whole platform — SDK, ledger, relay, Kafka, the
samples projection, a snapshot — and then every byte those steps wrote is searched for
them, in every form a copy could take (:func:`tests.support.plaintext.forms_of`). Each
search has a control: a non-personal marker that travelled the same path and must be found
by the same scanner. The scanner itself is tested first, form by form, with no services.
"""

from __future__ import annotations

import json
import logging
import random
import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from events.errors import EvpError
from events.event import Event
from events.settings import Settings
from events.store.client import EventStore
from tests.conftest import private_settings
from tests.support.examples import DIGITS, project
from tests.support.plaintext import (
    Hit,
    Person,
    PlaintextScanner,
    assert_no_plaintext,
    captured_logs,
    captured_wal,
    forms_of,
    is_wal,
    kafka_files,
    kafka_log_dir,
    log_server_error,
    make_people,
    pg_dump_files,
    postgres_files,
    random_marker,
    register,
    scan_for_plaintext,
    service_log_files,
    snapshot_files,
    submit,
    unique_word,
    with_bytea_decoded,
)

if TYPE_CHECKING:
    from trainer.snapshot import SnapshotManifest


# -- the scanner itself (no services) ------------------------------------------------------
def _nf(form: str) -> Callable[[str], str]:
    return lambda s: unicodedata.normalize(form, s)  # type: ignore[arg-type]


def _json_upper_hex(text: str) -> bytes:
    """``\\u00E9`` rather than ``\\u00e9``: JSON allows either, and Java's encoders write upper case."""
    return re.sub(r"\\u([0-9a-f]{4})", lambda m: "\\u" + m.group(1).upper(), json.dumps(text)[1:-1]).encode("ascii")


#: Written independently of the scanner: ``(form, how a program writes the text)``, and a
#: word the scanner's form label must contain (None where forms collapse, e.g. ASCII case).
WRITERS: dict[str, tuple[Callable[[str], bytes], str | None]] = {
    "utf-8": (lambda s: s.encode(), "utf-8"),
    "lower": (lambda s: s.lower().encode(), None),
    "upper": (lambda s: s.upper().encode(), "upper"),
    "casefold": (lambda s: s.casefold().encode(), None),
    "ascii mixed case": (lambda s: "".join(c.swapcase() if i % 2 and c.isascii() else c for i, c in enumerate(s)).encode(), None),
    "NFC": (lambda s: _nf("NFC")(s).encode(), None),
    "NFD": (lambda s: _nf("NFD")(s).encode(), "NFD"),
    "upper NFD": (lambda s: _nf("NFD")(s.upper()).encode(), "NFD"),
    "utf-16-le": (lambda s: s.encode("utf-16-le"), "utf-16-le"),
    "utf-16-be": (lambda s: s.encode("utf-16-be"), "utf-16-be"),
    "utf-16 with BOM": (lambda s: s.encode("utf-16"), "utf-16"),
    "utf-32-le": (lambda s: s.encode("utf-32-le"), "utf-32-le"),
    "utf-32-be": (lambda s: s.encode("utf-32-be"), "utf-32-be"),
    "upper utf-16-le": (lambda s: s.upper().encode("utf-16-le"), "utf-16-le"),
    "NFD utf-16-be": (lambda s: _nf("NFD")(s).encode("utf-16-be"), "utf-16-be"),
    "json \\u00e9": (lambda s: json.dumps(s).encode(), "json"),
    "json \\u00E9": (_json_upper_hex, "json"),
    "json utf-8": (lambda s: json.dumps(s, ensure_ascii=False).encode(), None),  # plain UTF-8 without quotes
    "json in json": (lambda s: json.dumps(json.dumps({"name": s})).encode(), "json"),
    "json NFD": (lambda s: json.dumps(_nf("NFD")(s)).encode(), "json"),
    "json \\/": (lambda s: json.dumps(s).replace("/", "\\/").encode(), "json"),
    "python repr (ascii)": (lambda s: ascii(s).encode(), "python"),
    "python bytes repr": (lambda s: repr(s.encode()).encode(), "python"),
    "url-encoded": (lambda s: quote(s, safe="").encode(), "url"),
}

#: Non-ASCII letters, a quote for ``\\"``, a slash for ``\\/``, a combining accent for NFD.
NEEDLES = ('Renée "Zoë" Łukasz-Qvxström', "amélie.søren-o'hara/qvx@Example.ORG")
#: The forms the previous scanner (exact UTF-8 and its lower case) could see at all.
SEEN_BEFORE = {"utf-8", "lower", "casefold", "NFC", "json utf-8"}


def _embedded(tmp_path: Path, name: str, body: bytes) -> tuple[Path, int]:
    """A file holding ``body`` amid unrelated bytes; and where ``body`` starts."""
    before = b"\x00\x01binary prefix \xff\xfe" + random.randbytes(37)
    path = tmp_path / name
    path.write_bytes(before + body + random.randbytes(29) + b" suffix")
    return path, len(before)


@pytest.mark.parametrize("form", sorted(WRITERS))
@pytest.mark.parametrize("needle", NEEDLES, ids=("name", "email"))
def test_a_needle_is_found_in_each_form_and_an_unrelated_word_is_not(form: str, needle: str, tmp_path: Path) -> None:
    """Positive and negative control of every form: the same writer, the needle or another word."""
    write, label = WRITERS[form]
    body = write(needle)
    if form not in SEEN_BEFORE:  # a copy an exact scan would have missed
        assert needle.encode() not in body and needle.lower().encode() not in body
    path, at = _embedded(tmp_path, "leak.bin", body)
    hits = scan_for_plaintext([path], [needle])
    assert hits and {h.needle for h in hits} == {needle} and all(h.path == str(path) for h in hits), hits
    first = min(h.offset for h in hits)
    assert at <= first < at + len(body), (at, hits)
    if label is not None:
        assert any(label in h.form for h in hits), hits

    unrelated, _ = _embedded(tmp_path, "clean.bin", write(f"Renée {unique_word(random.Random())}ström"))
    assert scan_for_plaintext([unrelated], [needle]) == []


@given(
    needle=st.text(st.characters(categories=("Lu", "Ll", "Lt", "Lo", "Mn")), min_size=1, max_size=12).filter(
        lambda s: any(ord(c) > 127 for c in s)
    ),
    form=st.sampled_from(sorted(WRITERS)),
    before=st.binary(max_size=40),
    after=st.binary(max_size=40),
)
def test_random_non_ascii_needles_are_found_in_every_form(needle: str, form: str, before: bytes, after: bytes) -> None:
    write, _ = WRITERS[form]
    hits = PlaintextScanner([needle]).hits(before + write(needle) + after, "data")
    assert needle in {h.needle for h in hits}


@given(needle=st.text(min_size=1, max_size=20), before=st.binary(max_size=50), after=st.binary(max_size=50))
def test_scanner_finds_a_needle_in_any_surroundings_and_its_lower_case(needle: str, before: bytes, after: bytes) -> None:
    scanner = PlaintextScanner([needle])
    assert needle in scanner.find(before + needle.encode("utf-8", "surrogatepass") + after)
    assert needle in scanner.find(before + needle.lower().encode("utf-8", "surrogatepass") + after)


def test_a_name_and_its_surname_are_each_reported_where_found() -> None:
    """The scanner looks for a long needle only where a shorter one inside it is: same answer."""
    scanner = PlaintextScanner(["Zoë Qvxström", "Qvxström", "zoë.qvx@example.org", "zoë.qvx"])
    data = b"..QVXSTR\xc3\x96M..zo\\u00EB.qvx@example.org..Zo\xc3\xab Qvxstr\xc3\xb6m"
    assert scanner.find(data) == sorted(["Qvxström", "Zoë Qvxström", "zoë.qvx", "zoë.qvx@example.org"])
    assert scanner.find(b"zo\xc3\xab.qvx only") == ["zoë.qvx"]
    assert scanner.hits(b"..QVXSTR\xc3\x96M", "x") == [Hit("x", 2, "upper utf-8", "Qvxström")]
    assert scanner.scan({"a": b"nothing", "b": b"Qvxstr\\xf6m"}) == {"b": ["Qvxström"]}


def test_forms_collapse_to_distinct_ascii_lowered_patterns() -> None:
    assert set(forms_of("abc").values()) >= {"utf-8", "utf-16-le", "utf-32-be"}
    assert len(forms_of("abc")) == len(set(forms_of("abc")))
    assert all(p == p.lower() for p in forms_of("ZOË Ström"))
    assert forms_of("") == {}


@given(text=st.text(min_size=1, max_size=40), noise=st.binary(max_size=30))
def test_bytea_hex_is_decoded_for_the_scan(text: str, noise: bytes) -> None:
    literal = b"\\\\x" + (noise + text.encode("utf-8", "surrogatepass")).hex().encode()
    dump = b"COPY t (v) FROM stdin;\n1\t" + literal + b"\n\\.\n"
    assert text.encode("utf-8", "surrogatepass") in with_bytea_decoded(dump)
    assert PlaintextScanner([text]).find(with_bytea_decoded(dump))


def test_a_scan_without_a_found_control_fails(tmp_path: Path) -> None:
    path = tmp_path / "empty.bin"
    path.write_bytes(b"nothing to see")
    with pytest.raises(AssertionError, match="control"):
        assert_no_plaintext([path], ["Zoë"], controls=["ctl-marker-qvx"])
    with pytest.raises(ValueError):
        assert_no_plaintext([path], ["Zoë"], controls=[])
    path.write_bytes(b"ctl-marker-qvx and ZO\\u00cb")
    with pytest.raises(AssertionError, match="plaintext personal data found"):
        assert_no_plaintext([path], ["Zoë"], controls=["ctl-marker-qvx"])
    assert_no_plaintext([path], ["Ada"], controls=["ctl-marker-qvx"])


# -- through the whole platform ------------------------------------------------------------
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
    wal: tuple[Path, ...]  #: copies of the WAL segments written while the world was built

    @property
    def personal(self) -> tuple[str, ...]:
        return tuple(v for p in self.people for v in p.personal)


@pytest.fixture(scope="module")
def world(services: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    from projections.runner import ProjectionRunner  # the layers above the SDK, imported only with services
    from trainer.snapshot import create_snapshot, load_dataset

    digits = project(DIGITS)
    rng = random.Random()
    folder = tmp_path_factory.mktemp("privacy-scan")
    home = folder / "home"
    people = tuple(make_people(rng, 4))
    source = random_marker(rng, "source")
    log_marker = random_marker(rng, "log")
    sample_ids = tuple(f"smp-{random_marker(rng, 'id')}-{i}" for i in range(len(people) * 5))
    with private_settings(services, home) as settings:
        with captured_wal(settings.database_url, folder / "wal") as wal, captured_logs() as logs, \
                EventStore.open(settings) as store:
            for person in people:
                register(store, person)
            for i, person in enumerate(people):
                submit(store, person, sample_ids[i * 5 : (i + 1) * 5], source)
            errors = _rejected_attempts(store, people[0])
            store.flush()
            for view in ("samples", "annotators"):
                with ProjectionRunner(settings, digits.load("views", view)()) as runner:
                    runner.catch_up()
            manifest = create_snapshot(store, load_dataset(digits, "digits"))
            logging.getLogger("tests.privacy").info("control %s", log_marker)
            log_text = logs.getvalue()
        log_server_error(settings.database_url, log_marker)
        yield World(settings, people, source, sample_ids, log_marker, log_text, tuple(errors), manifest, tuple(wal))


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
    with pytest.raises(EvpError) as caught:  # the same email again, upper-cased: refused on its blind index
        register(store, Person("ann-dup", person.name, person.email.upper()))
    messages.append(str(caught.value))
    return messages


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
    from projections.tables import read_rows

    with psycopg.connect(world.settings.database_url) as conn, conn.cursor() as cur:
        rows = read_rows(cur, project(DIGITS).load("views", "annotators")())
    assert sorted(rows) == sorted(p.annotator_id for p in world.people)
    assert all(r["name"].value.startswith("evp1:") and r["email"].value.startswith("evp1:") for r in rows.values())


@services
def test_kafka_log_segments_hold_no_plaintext(world: World) -> None:
    if kafka_log_dir() is None:
        pytest.skip("the broker's log directory is not on this machine")
    files = kafka_files(world.settings)
    segments = [p for p in files if p.suffix == ".log"]
    assert sum(p.stat().st_size for p in segments) > 0, f"no segment bytes for {world.settings.topic_prefix}.*"
    assert_no_plaintext(segments, world.personal, controls=[world.source_marker])
    assert scan_for_plaintext(files, world.personal) == []  # indexes, snapshots, checkpoints too


@services
def test_database_dump_holds_no_plaintext(world: World, tmp_path: Path) -> None:
    dump, values = pg_dump_files(world.settings.database_url, tmp_path)
    assert_no_plaintext([dump], world.personal, controls=[world.source_marker])  # the view's source column
    assert_no_plaintext([values], world.personal, controls=[world.source_marker])  # the ledger's record values


@services
def test_database_files_and_wal_hold_no_plaintext(world: World) -> None:
    files = postgres_files(world.settings.admin_url("a checkpoint before reading the table files"))
    if not files:
        pytest.skip("the PostgreSQL data directory is not readable here")
    tables = [p for p in files if not is_wal(p)]
    assert world.wal, "the world's WAL was not copied"
    assert_no_plaintext(world.wal, world.personal, controls=[world.source_marker])
    assert_no_plaintext(tables, world.personal, controls=[world.source_marker])
    assert scan_for_plaintext([p for p in files if is_wal(p)], world.personal) == []  # the WAL as it is now, too


@services
def test_snapshot_shards_hold_no_plaintext(world: World) -> None:
    files = snapshot_files(world.settings)
    shards = [p for p in files if p.name != "manifest.json"]
    assert len(shards) == len(world.manifest.shards) > 0
    assert_no_plaintext(shards, world.personal, controls=[world.sample_ids[0]])
    assert scan_for_plaintext(files, world.personal) == []


@services
def test_service_logs_hold_no_plaintext(world: World) -> None:
    files = service_log_files()
    kafka_logs = [p for p in files if p.name.startswith("kafka")]
    postgres_logs = [p for p in files if p.name.startswith("postgres")]
    if not kafka_logs or not postgres_logs:
        pytest.skip("the services' logs are not on this machine")
    assert_no_plaintext(kafka_logs, world.personal, controls=[f"{world.settings.topic_prefix}.events"])
    assert_no_plaintext(postgres_logs, world.personal, controls=[world.log_marker])
    assert scan_for_plaintext(files, world.personal) == []


@services
def test_captured_logs_and_errors_hold_no_plaintext(world: World) -> None:
    logs = world.logs.encode()
    personal = PlaintextScanner(world.personal)
    assert PlaintextScanner([world.log_marker]).find(logs), "control: the test's own log line was not captured"
    assert len(world.refusals) == 3 and all(world.refusals)
    hits = [h for i, m in enumerate(world.refusals) for h in personal.hits(m.encode(), f"refusal {i}")]
    assert personal.hits(logs, "captured logs") + hits == []
