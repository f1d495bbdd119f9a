"""Shared helpers for the privacy tests: people with known personal data, and a byte scanner.

The scanner looks for personal data the hard way: in the raw bytes of everything evp
writes — Kafka log segments, a ``pg_dump``, PostgreSQL's table files and WAL, snapshot
shards, the services' logs and the test's own logs. Every scan comes with a control: a
non-personal marker that went through the same path and must be found, so a scanner that
reads the wrong files (or nothing) fails instead of passing.
"""

from __future__ import annotations

import io
import logging
import os
import random
import re
import runpy
import shutil
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import psycopg.errors
import psycopg.sql

from events.store.client import EventStore
from events.event import NO_STREAM, Event
from events.settings import Settings

REPO = Path(__file__).resolve().parents[2]
SERVICES_SCRIPT = REPO / "platform" / "services.py"

# Letters outside the hex alphabet: a needle can then never match by chance inside the hex
# of a pg_dump or a key, and 12 random ones never match by chance in random ciphertext.
_WORD_LETTERS = "ghijklmnopqrstuvwxyzGHIJKLMNOPQRSTUVWXYZ"


def unique_word(rng: random.Random, length: int = 12) -> str:
    return "".join(rng.choice(_WORD_LETTERS) for _ in range(length))


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
    """Register through the SDK, claiming the email's blind index like a real signup."""
    store.append(person.stream_id, registered(person), NO_STREAM, reservations=[store.reserve_email(person.email)])


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


# -- the scanner ---------------------------------------------------------------------------
class PlaintextScanner:
    """Finds needles (UTF-8, as given and lower-cased) in raw bytes."""

    def __init__(self, needles: Iterable[str]) -> None:
        forms = {form for needle in needles for form in (needle, needle.lower())}
        self._needles = sorted({form.encode("utf-8") for form in forms if form})

    def find(self, data: bytes) -> list[str]:
        return [n.decode("utf-8") for n in self._needles if n in data]

    def scan(self, sources: Mapping[str, bytes]) -> dict[str, list[str]]:
        """``{source: needles found}`` for the sources with at least one hit."""
        hits = {where: self.find(data) for where, data in sources.items()}
        return {where: found for where, found in hits.items() if found}


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


def service_log_files() -> list[Path]:
    logs: Path = _service_paths().logs
    return sorted(p for p in logs.iterdir() if p.is_file()) if logs.is_dir() else []


def topic_files(log_dir: Path, settings: Settings) -> list[Path]:
    """Every file of every partition of the settings' topics (``<prefix>.events-0`` …)."""
    return sorted(p for d in log_dir.glob(f"{settings.topic_prefix}.*") for p in d.iterdir() if p.is_file())


def database_files(data_dir: Path, conn: psycopg.Connection[Any]) -> list[Path]:
    """The database's table files and the server's WAL segments."""
    oid = conn.execute("SELECT oid FROM pg_database WHERE datname = current_database()").fetchone()[0]  # type: ignore[index]
    conn.execute("CHECKPOINT")  # table pages reach their files, not only the WAL
    tables = [p for p in (data_dir / "base" / str(oid)).iterdir() if p.is_file()]
    wal = [p for p in (data_dir / "pg_wal").iterdir() if p.is_file() and re.fullmatch(r"[0-9A-F]{24}", p.name)]
    return sorted(tables + wal)


def snapshot_files(settings: Settings) -> list[Path]:
    folder = settings.snapshots_dir
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def read_files(paths: Iterable[Path]) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in paths}


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


def random_marker(rng: random.Random, label: str) -> str:
    """A non-personal control string, unique to one test run."""
    return f"ctl-{label}-{unique_word(rng)}"


__all__ = [
    "Person", "PlaintextScanner", "captured_logs", "database_files", "kafka_log_dir", "log_server_error", "make_people", "pg_dump",
    "postgres_data_dir", "random_marker", "read_files", "register", "registered", "run_cli", "service_log_files",
    "snapshot_files", "submit", "topic_files", "unique_word", "with_bytea_decoded", "with_role",
]
