"""Plaintext scans: people with known personal data, and a byte scanner a leak cannot slip past.

A pytest plugin (registered in ``tests/conftest.py``) and a plain module: any test may call
:func:`scan_for_plaintext` on the files evp wrote, and the collectors below name those
files — Kafka log segments, a ``pg_dump``, PostgreSQL's table files and WAL, a folder of
snapshot shards or backups, the services' logs.

The scanner looks for each needle in every form a copy of it could take on its way to a
disk (:func:`forms_of`): UTF-8, UTF-16 and UTF-32 (both byte orders), JSON string escapes
(``\\u00e9``, ``\\"``, ``\\/``, and JSON inside JSON), Python escapes (``\\xe9``,
``b'\\xc3\\xa9'``), URL encoding; each as given, lower-, upper- and case-folded, NFC and
NFD. ASCII letters match in any case (haystack and patterns are both ASCII-lowered), so
``ZoË`` and ``zOË`` are one pattern; a non-ASCII letter matches as given, lower-, upper- or
case-folded with the whole needle. Compressed or base64-encoded copies are not looked for:
the controls catch a path that compresses (the marker is then not found either).

Every scan comes with a control (:func:`assert_no_plaintext`): a non-personal marker that
went through the same path and must be found, so a scan that reads the wrong files (or
nothing) fails instead of passing.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import runpy
import shutil
import subprocess
import sys
import tempfile
import unicodedata
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, quote_plus

import psycopg
import psycopg.errors
import psycopg.sql
import pytest

from events.event import NO_STREAM, Event
from events.settings import Settings
from events.store.client import EventStore

REPO = Path(__file__).resolve().parents[2]
SERVICES_SCRIPT = REPO / "platform" / "services.py"

# Letters outside the hex alphabet: a needle can then never match by chance inside the hex
# of a pg_dump or a key, and 12 random ones never match by chance in random ciphertext.
_WORD_LETTERS = "ghijklmnopqrstuvwxyzGHIJKLMNOPQRSTUVWXYZ"


def unique_word(rng: random.Random, length: int = 12) -> str:
    return "".join(rng.choice(_WORD_LETTERS) for _ in range(length))


def random_marker(rng: random.Random, label: str) -> str:
    """A non-personal control string, unique to one test run."""
    return f"ctl-{label}-{unique_word(rng)}"


# -- people and their events ---------------------------------------------------------------
@dataclass(frozen=True)
class Person:
    """An annotator whose name and email must never appear in plaintext anywhere."""

    annotator_id: str
    name: str
    email: str

    @property
    def stream_id(self) -> str:
        return f"annotator-{self.annotator_id}"

    @property
    def personal(self) -> tuple[str, ...]:
        """What a scan must not find: each value, and the distinctive parts of each."""
        surname = self.name.split()[-1]
        local_part = self.email.split("@")[0]
        return (self.name, self.email, surname, local_part)


def make_people(rng: random.Random, count: int) -> list[Person]:
    """People with unique names and emails, some non-ASCII, some mixed case."""
    first_names = ("Zoë", "Ada", "Łukasz", "Grace", "Søren", "Amélie")
    people = []
    for i in range(count):
        word = unique_word(rng)
        people.append(Person(
            annotator_id=f"ann-{unique_word(rng, 8).lower()}",
            name=f"{first_names[i % len(first_names)]} {word}ström",
            email=f"{first_names[i % len(first_names)].lower()}.{word}@Example.ORG",
        ))
    return people


def registered(person: Person) -> Event:
    return Event("AnnotatorRegistered", {"annotator_id": person.annotator_id, "name": person.name, "email": person.email})


def register(store: EventStore, person: Person) -> None:
    """Register through the SDK, which claims the email's blind index like a real signup
    (the schema marks the email ``"evp.unique"``; the SDK reserves it on append)."""
    store.append(person.stream_id, registered(person), NO_STREAM)


def submit(store: EventStore, person: Person, sample_ids: Sequence[str], source: str) -> None:
    """One ``SampleSubmitted`` per id, features from scikit-learn's digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for sample_id in sample_ids:
        row = zlib.crc32(sample_id.encode()) % len(digits.target)
        store.append(f"sample-{sample_id}", Event("SampleSubmitted", {
            "sample_id": sample_id, "annotator_id": person.annotator_id, "features": digits.data[row].tolist(),
            "label": int(digits.target[row]), "source": source,
        }))


# -- the forms of a needle -----------------------------------------------------------------
_CASES: tuple[tuple[str, Callable[[str], str]], ...] = (
    ("", lambda s: s), ("lower", str.lower), ("upper", str.upper), ("casefold", str.casefold),
)
_NORMAL_FORMS: tuple[Literal["NFC", "NFD"], ...] = ("NFC", "NFD")


def _json(text: str, *, ascii_only: bool) -> str:
    return json.dumps(text, ensure_ascii=ascii_only)[1:-1]


def _utf(codec: str) -> Callable[[str], bytes]:
    return lambda text: text.encode(codec, errors="surrogatepass")


#: How a text becomes bytes on its way to a disk. Escapes that differ only in the case of
#: their hex digits (``\u00e9``/``\u00E9``, ``%C3%A9``/``%c3%a9``) are one pattern, because
#: the scan is ASCII-case-insensitive.
ENCODINGS: tuple[tuple[str, Callable[[str], bytes]], ...] = (
    ("utf-8", _utf("utf-8")),
    ("utf-16-le", _utf("utf-16-le")),
    ("utf-16-be", _utf("utf-16-be")),
    ("utf-32-le", _utf("utf-32-le")),
    ("utf-32-be", _utf("utf-32-be")),
    ("json \\u-escaped", lambda t: _json(t, ascii_only=True).encode("ascii")),
    ("json \\u-escaped, \\/", lambda t: _json(t, ascii_only=True).replace("/", "\\/").encode("ascii")),
    ("json utf-8", lambda t: _json(t, ascii_only=False).encode("utf-8", errors="surrogatepass")),
    ("json utf-8, \\/", lambda t: _json(t, ascii_only=False).replace("/", "\\/").encode("utf-8", errors="surrogatepass")),
    ("json twice \\u-escaped", lambda t: _json(_json(t, ascii_only=True), ascii_only=True).encode("ascii")),
    ("python \\x-escaped", lambda t: t.encode("unicode_escape")),
    ("python bytes repr", lambda t: repr(t.encode("utf-8", errors="surrogatepass"))[2:-1].encode("ascii")),
    ("url-encoded", lambda t: quote(t, safe="", errors="surrogatepass").encode("ascii")),
    ("url-encoded, +", lambda t: quote_plus(t, safe="", errors="surrogatepass").encode("ascii")),
)


def _texts(needle: str) -> Iterator[tuple[str, str]]:
    """``(label, text)``: the needle in each case, each normal form, in either order."""
    for case, change in _CASES:
        yield case, change(needle)
        for form in _NORMAL_FORMS:
            yield f"{case} {form}".strip(), unicodedata.normalize(form, change(needle))
            yield f"{form} {case}".strip(), change(unicodedata.normalize(form, needle))


def forms_of(needle: str) -> dict[bytes, str]:
    """``{pattern: form}``: the distinct byte patterns a scan for ``needle`` looks for.

    Patterns are ASCII-lowered (the scan lowers the haystack the same way); the form is the
    first way of writing the needle that gives the pattern, e.g. ``"upper NFD utf-16-le"``.
    """
    patterns: dict[bytes, str] = {}
    for case_form, text in _texts(needle):
        for encoding, encode in ENCODINGS:
            pattern = encode(text).lower()
            if pattern:
                patterns.setdefault(pattern, f"{case_form} {encoding}".strip())
    return patterns


# -- the scanner ---------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class Hit:
    """One needle found: where (a file's path or a source's label), at which byte, in which form."""

    path: str
    offset: int
    form: str
    needle: str

    def __str__(self) -> str:
        return f"{self.path}@{self.offset}: {self.needle!r} ({self.form})"


@dataclass(frozen=True)
class _Pattern:
    pattern: bytes
    form: str
    needle: str


class PlaintextScanner:
    """Finds needles, in every form of :func:`forms_of`, in raw bytes.

    A pattern that contains a shorter pattern (a name contains its surname) is looked for
    only where that shorter one is found: one pass over the haystack per shortest pattern,
    with the same answer as a pass per pattern.
    """

    def __init__(self, needles: Iterable[str]) -> None:
        patterns: dict[bytes, _Pattern] = {}
        for needle in dict.fromkeys(needles):
            for pattern, form in forms_of(needle).items():
                patterns.setdefault(pattern, _Pattern(pattern, form, needle))
        self._anchors: dict[bytes, list[_Pattern]] = {}  #: shortest pattern -> every pattern holding it
        for candidate in sorted(patterns.values(), key=lambda p: (len(p.pattern), p.pattern)):
            anchor = next((a for a in self._anchors if a in candidate.pattern), None)
            self._anchors.setdefault(candidate.pattern if anchor is None else anchor, []).append(candidate)

    def hits(self, data: bytes, where: str) -> list[Hit]:
        """The first place of every form found in ``data``, sorted by offset."""
        folded = data.lower()
        found = []
        for anchor, holding in self._anchors.items():
            if anchor not in folded:
                continue
            for p in holding:
                at = folded.find(p.pattern)
                if at >= 0:
                    found.append(Hit(where, at, p.form, p.needle))
        return sorted(found)

    def find(self, data: bytes) -> list[str]:
        """The needles found in ``data``, in any form."""
        return sorted({hit.needle for hit in self.hits(data, "")})

    def scan(self, sources: Mapping[str, bytes]) -> dict[str, list[str]]:
        """``{source: needles found}`` for the sources with at least one hit."""
        found = {where: self.find(data) for where, data in sources.items()}
        return {where: needles for where, needles in found.items() if needles}

    def scan_files(self, paths: Iterable[Path]) -> list[Hit]:
        return [hit for where, data in read_files(paths).items() for hit in self.hits(data, where)]


def scan_for_plaintext(paths: Iterable[Path], needles: Iterable[str]) -> list[Hit]:
    """Every needle found, in any form, in the raw bytes of ``paths``: one hit per file and form."""
    return PlaintextScanner(needles).scan_files(paths)


def assert_no_plaintext(paths: Iterable[Path], needles: Iterable[str], *, controls: Iterable[str]) -> None:
    """Fail unless every control is found in ``paths`` and no needle is.

    1. ``controls`` are non-personal markers that went the same way as the personal data;
       at least one is required, and each must be found somewhere in ``paths`` — else the
       scan read the wrong bytes, or none.
    2. No needle may be found, in any form, in any of ``paths``.
    """
    files, markers = list(paths), list(dict.fromkeys(controls))
    if not markers:
        raise ValueError("a plaintext scan needs a control marker that must be found")
    seen = {hit.needle for hit in scan_for_plaintext(files, markers)}
    missing = [m for m in markers if m not in seen]
    assert not missing, f"control: {missing} not found in {len(files)} files ({sum(p.stat().st_size for p in files)} bytes)"
    hits = scan_for_plaintext(files, needles)
    assert not hits, "plaintext personal data found:\n" + "\n".join(map(str, hits))


_BYTEA_HEX = re.compile(rb"\\{1,2}x((?:[0-9a-f]{2})+)")


def with_bytea_decoded(dump: bytes) -> bytes:
    """A dump plus the decoded bytes of every hex ``bytea`` literal in it.

    ``pg_dump`` writes ``bytea`` as hex: an Avro record value in the ledger would hide
    plaintext from a raw scan.
    """
    return dump + b"\n" + b"\n".join(bytes.fromhex(m.group(1).decode("ascii")) for m in _BYTEA_HEX.finditer(dump))


# -- where evp writes bytes ----------------------------------------------------------------
@cache
def _services() -> dict[str, Any]:
    """platform/services.py's globals (it is a script, not a package)."""
    return runpy.run_path(str(SERVICES_SCRIPT), run_name="evp_services")


def _service_paths() -> Any:
    return _services()["Paths"].from_env(dict(os.environ))


def kafka_log_dir() -> Path | None:
    """The local broker's log directory, or None when the broker runs elsewhere."""
    data: Path = _services()["Kafka"](_service_paths()).data
    return data if (data / "meta.properties").is_file() else None


def postgres_data_dir() -> Path | None:
    """The local server's data directory when this process may read it, else None."""
    data: Path = _services()["Postgres"](_service_paths()).data
    return data if os.access(data / "pg_wal", os.R_OK | os.X_OK) else None


def topic_files(log_dir: Path, settings: Settings) -> list[Path]:
    """Every file of every partition of the settings' topics (``<prefix>.events-0`` …)."""
    return sorted(p for d in log_dir.glob(f"{settings.topic_prefix}.*") for p in d.iterdir() if p.is_file())


def kafka_files(settings: Settings) -> list[Path]:
    """The broker's files of the settings' topics (segments, indexes), or ``[]`` when the broker is not local."""
    log_dir = kafka_log_dir()
    return [] if log_dir is None else topic_files(log_dir, settings)


def kafka_segments(settings: Settings) -> list[Path]:
    """The log segments (``*.log``) of the settings' topics: the records themselves."""
    return [p for p in kafka_files(settings) if p.suffix == ".log"]


def database_files(data_dir: Path, conn: psycopg.Connection[Any]) -> list[Path]:
    """The database's table files and the server's WAL segments, after a checkpoint."""
    row = conn.execute("SELECT oid FROM pg_database WHERE datname = current_database()").fetchone()
    assert row is not None
    conn.execute("CHECKPOINT")  # table pages reach their files, not only the WAL
    tables = [p for p in (data_dir / "base" / str(row[0])).iterdir() if p.is_file()]
    wal = [p for p in (data_dir / "pg_wal").iterdir() if p.is_file() and re.fullmatch(r"[0-9A-F]{24}", p.name)]
    return sorted(tables + wal)


def postgres_files(database_url: str) -> list[Path]:
    """:func:`database_files` of ``database_url``, or ``[]`` when the data directory is not readable here."""
    data_dir = postgres_data_dir()
    if data_dir is None:
        return []
    with psycopg.connect(database_url, autocommit=True) as conn:
        return database_files(data_dir, conn)


@contextmanager
def captured_wal(database_url: str, folder: Path) -> Iterator[list[Path]]:
    """The WAL segments written while the block runs, copied into ``folder`` when it ends.

    A checkpoint recycles old segments, and other databases on the server keep writing: a
    scan that lists ``pg_wal`` later can miss what the block wrote. The list is filled on
    exit (empty when the data directory is not readable here); a segment recycled before
    the copy fails loudly, never silently shortens the scan.
    """
    def current_segment() -> str:
        with psycopg.connect(database_url, autocommit=True) as conn:
            row = conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()
        assert row is not None
        return str(row[0])

    copies: list[Path] = []
    first = current_segment()
    yield copies
    data_dir = postgres_data_dir()
    if data_dir is None:
        return
    last = current_segment()
    names = sorted(p.name for p in (data_dir / "pg_wal").iterdir() if re.fullmatch(r"[0-9A-F]{24}", p.name))
    wanted = [n for n in names if first <= n <= last]
    assert wanted[:1] == [first] and wanted[-1:] == [last], f"WAL {first}..{last} was recycled before it was copied"
    folder.mkdir(parents=True, exist_ok=True)
    for name in wanted:
        copies.append(Path(shutil.copy2(data_dir / "pg_wal" / name, folder / name)))


def is_wal(path: Path) -> bool:
    return "pg_wal" in path.parts


def folder_files(folder: Path) -> list[Path]:
    """Every file below ``folder`` (snapshot shards, backups, a run's outputs), or ``[]``."""
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def snapshot_files(settings: Settings) -> list[Path]:
    return folder_files(settings.snapshots_dir)


def service_log_files() -> list[Path]:
    """The local services' logs (``kafka.log``, ``postgres.log``)."""
    logs: Path = _service_paths().logs
    return sorted(p for p in logs.iterdir() if p.is_file()) if logs.is_dir() else []


def read_files(paths: Iterable[Path]) -> dict[str, bytes]:
    """``{path: bytes}`` of the files still there: a live server removes some between a listing and
    the read (PostgreSQL rewrites its relcache ``pg_internal.init`` files), and a file gone holds nothing."""
    found: dict[str, bytes] = {}
    for path in paths:
        try:
            found[str(path)] = Path(path).read_bytes()
        except FileNotFoundError:
            continue
    return found


def pg_dump_binary(conn: psycopg.Connection[Any]) -> str:
    """A ``pg_dump`` at least as new as the server (an older one refuses to dump)."""
    major = conn.info.server_version // 10000
    debian = Path("/usr/lib/postgresql") / str(major) / "bin" / "pg_dump"  # where platform/services.py installs it
    found = str(debian) if debian.is_file() else shutil.which("pg_dump")
    if found is None:
        raise AssertionError(f"pg_dump for PostgreSQL {major} is not installed")
    return found


def pg_dump(database_url: str) -> bytes:
    """The whole database as plain SQL (schema and data)."""
    with psycopg.connect(database_url) as conn:
        binary = pg_dump_binary(conn)
    done = subprocess.run([binary, "--no-password", "-d", database_url], capture_output=True, timeout=120)
    if done.returncode != 0:
        raise AssertionError(f"pg_dump failed: {done.stderr.decode(errors='replace')}")
    return done.stdout


def pg_dump_files(database_url: str, folder: Path) -> list[Path]:
    """A ``pg_dump`` written to ``folder``: the dump, and the decoded bytes of its ``bytea`` values."""
    folder.mkdir(parents=True, exist_ok=True)
    dump = pg_dump(database_url)
    sql, values = folder / "pg_dump.sql", folder / "pg_dump.bytea"
    sql.write_bytes(dump)
    values.write_bytes(with_bytea_decoded(dump)[len(dump):])
    return [sql, values]


def with_role(database_url: str, role: str) -> str:
    """A URL whose sessions run as ``role`` (``SET ROLE`` at connect, so the role needs no LOGIN)."""
    separator = "&" if "?" in database_url else "?"
    return f"{database_url}{separator}options={quote(f'-c role={role}')}"


# -- logs and the command line -------------------------------------------------------------
@contextmanager
def captured_logs() -> Iterator[io.StringIO]:
    """Every log record of this process, at DEBUG, formatted with its arguments."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield buffer
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)


def run_cli(settings: Settings, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m events.cli ARGS`` with exactly these settings in its environment.

    It runs outside the source tree, as a user would: the subcommands then come from the
    installed package's entry points, not from a build directory lying in the tree.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVP_")}
    env.update(settings.to_env())
    return subprocess.run(
        [sys.executable, "-m", "events.cli", *args],
        capture_output=True, text=True, env=env, cwd=tempfile.gettempdir(), timeout=timeout,
    )


def log_server_error(database_url: str, marker: str) -> None:
    """Make PostgreSQL write ``marker`` to its log (a failed cast is logged with its input)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        try:
            conn.execute(psycopg.sql.SQL("SELECT {}::integer").format(psycopg.sql.Literal(marker)))
        except psycopg.errors.InvalidTextRepresentation:
            return
    raise AssertionError(f"casting {marker!r} to an integer did not fail")


# -- fixtures ------------------------------------------------------------------------------
@pytest.fixture
def plaintext_rng(request: pytest.FixtureRequest) -> random.Random:
    """A random source for names and markers; its seed is in the test's report to replay a failure."""
    seed = random.SystemRandom().getrandbits(64)
    request.node.user_properties.append(("plaintext_seed", seed))
    return random.Random(seed)


@pytest.fixture
def log_capture() -> Iterator[io.StringIO]:
    """:func:`captured_logs` for the whole test."""
    with captured_logs() as buffer:
        yield buffer


__all__ = [
    "ENCODINGS", "Hit", "Person", "PlaintextScanner", "assert_no_plaintext", "captured_logs", "captured_wal",
    "database_files",
    "folder_files", "forms_of", "is_wal", "kafka_files", "kafka_log_dir", "kafka_segments", "log_capture",
    "log_server_error", "make_people", "pg_dump", "pg_dump_files", "plaintext_rng", "postgres_data_dir",
    "postgres_files", "random_marker", "read_files", "register", "registered", "run_cli", "scan_for_plaintext",
    "service_log_files", "snapshot_files", "submit", "topic_files", "unique_word", "with_bytea_decoded", "with_role",
]
