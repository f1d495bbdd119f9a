"""Backups of the event log: one self-checking file, restorable into empty services.

A backup is an Avro object container file (deflate) whose records are, in this order:

1. every record of the schema registry's topic, so a restore into an empty cluster can
   decode what it restores (the wire format embeds schema ids);
2. every record of the events topic in ranges ``[start, end)`` per partition, partition by
   partition in offset order, relay duplicates included. The end offsets are read once, at
   the start, so the backup is a snapshot of the log however busy it is; the schemas topic
   is pinned *after* the events topic, so every schema id an event uses is in the file.

The file's header metadata holds the :class:`Manifest`: format version, topics, ranges,
record counts, creation time, a sha256 over the records in that canonical order (the
self-check: it finds corruption) and a MAC over the manifest, sha256 included (the
authentication: it finds an edit). The MAC is HMAC-SHA256 under the deployment's backup
key (:class:`BackupKey`, kept beside the KEK but never rotated with it), so whoever edits
the records and re-hashes them cannot make a manifest that verifies without that key;
verifying needs the key for the same reason.
The hash is only known once every record was read, and a container writes its header first,
so the records are spooled to a temporary file next to the target and copied into the final
container behind the manifest; the file appears under its name only complete (``fsync``,
then ``os.replace``).

Keys are never in a backup. Personal fields are ciphertext under each subject's data key,
so forgetting a subject after a backup was taken makes that backup's copy of their data
unreadable too, like every other copy.

Restoring is :mod:`events.ops.restore`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import struct
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import fastavro
from kafka import TopicPartition

from events.errors import ConfigurationError, EvpError, IntegrityError, NotFound
from events.adapters.files import write_atomically
from events.adapters.kafka import consumer, kafka_errors
from events.store.log import read_pinned
from events.settings import Settings

FORMAT = "evp-backup"
FORMAT_VERSION = 2  #: 2: the manifest carries a MAC under the backup key; 1 had only the sha256 self-check
BACKUP_KEY_FILE = "backup.key"
READABLE_VERSIONS = (1, 2)
MAC_ALGORITHM = "hmac-sha256"
_MAC_DOMAIN = b"evp-backup-mac-v1"
MANIFEST_KEY = "evp.backup.manifest"
SCHEMAS, EVENTS = "SCHEMAS", "EVENTS"  #: a record's source topic, in file order

#: How often long steps report progress, in records.
PROGRESS_EVERY = 1000
#: Records sent before waiting for their acknowledgements during a restore (events.ops.restore).
PRODUCE_CHUNK = 5000

RECORD_SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "BackupRecord",
    "namespace": "evp.backup",
    "doc": "One Kafka record of the events topic or the schema registry's topic, as it was on the log.",
    "fields": [
        {"name": "source", "type": {"type": "enum", "name": "Source", "symbols": [SCHEMAS, EVENTS]}},
        {"name": "partition", "type": "int"},
        {"name": "offset", "type": "long"},
        {"name": "timestamp", "type": "long", "doc": "The record's Kafka timestamp, epoch milliseconds."},
        {"name": "key", "type": ["null", "bytes"]},
        {"name": "value", "type": ["null", "bytes"]},
        {"name": "headers", "type": {"type": "array", "items": {
            "type": "record", "name": "Header",
            "fields": [{"name": "key", "type": "string"}, {"name": "value", "type": ["null", "bytes"]}],
        }}},
    ],
}
_PARSED = fastavro.parse_schema(RECORD_SCHEMA)

Ranges = Mapping[int, tuple[int, int]]


@dataclass(frozen=True)
class Progress:
    """Where a long step is: ``done`` of ``total`` records in ``phase``."""

    phase: str
    done: int
    total: int


OnProgress = Callable[[Progress], None]


# -- records and the manifest --------------------------------------------------------------
@dataclass(frozen=True)
class BackupRecord:
    """One Kafka record as the backup keeps it: coordinates, key, value, headers, timestamp."""

    source: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...] = ()

    @classmethod
    def from_message(cls, source: str, message: Any) -> BackupRecord:
        """From a kafka-python ConsumerRecord."""
        return cls(source, message.partition, message.offset, message.timestamp, message.key, message.value,
                   tuple((k, v) for k, v in (message.headers or [])))

    def to_avro(self) -> dict[str, Any]:
        return {"source": self.source, "partition": self.partition, "offset": self.offset, "timestamp": self.timestamp,
                "key": self.key, "value": self.value, "headers": [{"key": k, "value": v} for k, v in self.headers]}

    @classmethod
    def from_avro(cls, datum: Any) -> BackupRecord:
        """From a datum fastavro read with :data:`RECORD_SCHEMA`."""
        return cls(datum["source"], datum["partition"], datum["offset"], datum["timestamp"], datum["key"],
                   datum["value"], tuple((h["key"], h["value"]) for h in datum["headers"]))

    @property
    def order(self) -> tuple[int, int, int]:
        """The canonical order: schema records first, then events by partition and offset."""
        return (0 if self.source == SCHEMAS else 1, self.partition, self.offset)

    def canonical_bytes(self) -> bytes:
        """What the manifest's hash covers, independent of how the container encodes or compresses it."""
        parts = [self.source.encode(), struct.pack(">iqq", self.partition, self.offset, self.timestamp),
                 _framed(self.key), _framed(self.value), struct.pack(">i", len(self.headers))]
        for key, value in self.headers:
            parts += [_framed(key.encode()), _framed(value)]
        return b"".join(parts)


def _framed(data: bytes | None) -> bytes:
    return struct.pack(">i", -1) if data is None else struct.pack(">i", len(data)) + data


class BackupKey:
    """The key that authenticates backups: HMAC-SHA256 under a backup key of its own.

    The key is 32 random bytes in ``backup.key`` beside the KEK file (0600, created with the first
    backup), apart from the key-encryption key on purpose: ``evp keys rotate`` retires old
    KEKs, and a backup must stay verifiable after that. ``key_id`` (a fingerprint, not the
    key) is recorded in the manifest, so a backup checked under another key is reported as
    such, not as tampered with.
    """

    __slots__ = ("_key", "key_id")

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 32:
            raise ConfigurationError(f"a backup key needs at least 32 bytes, got {len(secret)}")
        self._key = hmac.new(secret, _MAC_DOMAIN, hashlib.sha256).digest()
        self.key_id = "bk-" + hashlib.sha256(b"evp-backup-key-id\0" + secret).hexdigest()[:16]

    def __repr__(self) -> str:  # never show the key
        return f"BackupKey(key_id={self.key_id!r})"

    @classmethod
    def generate(cls) -> BackupKey:
        return cls(os.urandom(32))

    @classmethod
    def from_settings(cls, settings: Settings, *, create: bool = False) -> BackupKey:
        """The deployment's backup key (``backup.key`` beside the KEK file).

        ``create`` makes it when it is missing (taking a backup); verifying never does:
        without the key a backup cannot be authenticated, and a new key could only say
        that it was not made under it.
        """
        path = settings.kek_path.parent / BACKUP_KEY_FILE
        if not path.exists():
            if not create:
                raise ConfigurationError(
                    f"verifying a backup needs the backup key it was made with, and there is none here ({path} "
                    "does not exist): copy that file from the deployment that took the backup (mode 0600)"
                )
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomically(path, lambda out: out.write(base64.b64encode(os.urandom(32)) + b"\n"), mode=0o600)
            print(f"evp: created the backup key {path} (keep it with the key-encryption key)", file=sys.stderr)
        if path.stat().st_mode & 0o077:
            raise ConfigurationError(f"backup key {path} is readable by others: chmod 600 {path}")
        try:
            return cls(base64.b64decode(path.read_bytes().strip(), validate=True))
        except ValueError as err:
            raise ConfigurationError(f"backup key {path} is not base64: {err}") from err

    def mac(self, manifest: Manifest) -> str:
        return hmac.new(self._key, manifest.signed_bytes(), hashlib.sha256).hexdigest()

    def check(self, manifest: Manifest, path: Path) -> None:
        """IntegrityError unless ``manifest`` carries a MAC made with this key."""
        if manifest.mac is None:
            raise IntegrityError(
                f"backup {path} is format version {manifest.format_version}, without a MAC: it cannot be "
                "authenticated (only checked for corruption, with --corruption-only); take a new backup"
            )
        if manifest.mac_key_id != self.key_id:
            raise IntegrityError(
                f"backup {path} was authenticated under backup key {manifest.mac_key_id}, but the key "
                f"given is {self.key_id}: verify it with the backup key it was made under"
            )
        if not hmac.compare_digest(self.mac(manifest), manifest.mac):
            raise IntegrityError(
                f"backup {path} fails authentication: its manifest's MAC does not match under backup key "
                f"{self.key_id}, so the manifest or the records it hashes were edited after the backup was made"
            )


@dataclass(frozen=True)
class Manifest:
    """What a backup holds; stored in the container's header, checked by :func:`verify_backup`."""

    topic: str
    schemas_topic: str
    ranges: Ranges  #: events topic, per partition
    schema_range: tuple[int, int]
    counts: Mapping[int, int]  #: event records per partition (duplicates included)
    schema_records: int
    sha256: str  #: the records' self-check (corruption), unkeyed
    created_at: str
    format_version: int = FORMAT_VERSION
    mac: str | None = None  #: HMAC-SHA256 of :meth:`signed_bytes` under a :class:`BackupKey` (None in version 1)
    mac_key_id: str | None = None  #: the fingerprint of the backup key that made the MAC

    @property
    def partitions(self) -> int:
        return len(self.ranges)

    @property
    def records(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "format_version": self.format_version, "topic": self.topic,
            "schemas_topic": self.schemas_topic, "created_at": self.created_at, "sha256": self.sha256,
            "ranges": {str(p): list(r) for p, r in sorted(self.ranges.items())},
            "schema_range": list(self.schema_range),
            "counts": {str(p): n for p, n in sorted(self.counts.items())},
            "schema_records": self.schema_records,
            **({"mac": {"algorithm": MAC_ALGORITHM, "key_id": self.mac_key_id, "value": self.mac}}
               if self.mac is not None else {}),
        }

    def signed_bytes(self) -> bytes:
        """What the MAC covers: the whole manifest (its sha256 included) but the MAC itself."""
        body = self.as_dict()
        body.pop("mac", None)
        body["mac_key_id"] = self.mac_key_id
        return f"{FORMAT}/{self.format_version}/{MAC_ALGORITHM}\n".encode() + json.dumps(body, sort_keys=True).encode()

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        try:
            body = json.loads(text)
            if body.get("format") != FORMAT:
                raise ValueError(f"format is {body.get('format')!r}, not {FORMAT!r}")
            if body["format_version"] not in READABLE_VERSIONS:
                raise ValueError(f"format version {body['format_version']} is not one of {READABLE_VERSIONS}")
            mac = body.get("mac")
            if body["format_version"] >= 2:
                if not isinstance(mac, dict) or mac.get("algorithm") != MAC_ALGORITHM:
                    raise ValueError(f"format version {body['format_version']} needs a {MAC_ALGORITHM} mac, found {mac!r}")
            return cls(
                topic=str(body["topic"]), schemas_topic=str(body["schemas_topic"]),
                ranges={int(p): (int(r[0]), int(r[1])) for p, r in body["ranges"].items()},
                schema_range=(int(body["schema_range"][0]), int(body["schema_range"][1])),
                counts={int(p): int(n) for p, n in body["counts"].items()},
                schema_records=int(body["schema_records"]), sha256=str(body["sha256"]),
                created_at=str(body["created_at"]), format_version=int(body["format_version"]),
                mac=str(mac["value"]) if mac else None, mac_key_id=str(mac["key_id"]) if mac else None,
            )
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise IntegrityError(f"the backup's manifest is malformed: {err}") from err


class _Tally:
    """Checks canonical order and pinned ranges, counts and hashes records as they pass.

    Creating and verifying a backup both run records through this one class, so they cannot
    disagree on what the hash covers.
    """

    def __init__(self, ranges: Ranges, schema_range: tuple[int, int]) -> None:
        self._ranges, self._schema_range = ranges, schema_range
        self._hash = hashlib.sha256(f"{FORMAT}/{FORMAT_VERSION}\n".encode())
        self._last: tuple[int, int, int] | None = None
        self.counts: dict[int, int] = {p: 0 for p in ranges}
        self.schema_records = 0

    @property
    def seen(self) -> int:
        return self.schema_records + sum(self.counts.values())

    def add(self, record: BackupRecord) -> None:
        where = f"record #{self.seen} ({record.source} partition {record.partition} offset {record.offset})"
        if self._last is not None and record.order <= self._last:
            raise IntegrityError(f"{where} is out of order: records must be schemas first, then events by partition and offset")
        self._last = record.order
        if record.source == SCHEMAS:
            start, end = self._schema_range
            if record.partition != 0 or not start <= record.offset < end:
                raise IntegrityError(f"{where} is outside the schemas range [{start}, {end}) of partition 0")
            self.schema_records += 1
        else:
            if record.partition not in self._ranges:
                raise IntegrityError(f"{where}: the manifest pins no range for partition {record.partition}")
            start, end = self._ranges[record.partition]
            if not start <= record.offset < end:
                raise IntegrityError(f"{where} is outside the pinned range [{start}, {end})")
            self.counts[record.partition] += 1
        self._hash.update(record.canonical_bytes())

    def sha256(self) -> str:
        return self._hash.hexdigest()

    def check(self, manifest: Manifest, path: Path) -> None:
        """IntegrityError naming the first thing that differs from the manifest."""
        if self.schema_records != manifest.schema_records:
            raise IntegrityError(f"backup {path}: {self.schema_records} schema records, the manifest says {manifest.schema_records}")
        for partition in sorted(manifest.counts):
            found, recorded = self.counts.get(partition, 0), manifest.counts[partition]
            if found != recorded:
                raise IntegrityError(f"backup {path}: partition {partition} has {found} records, the manifest says {recorded}")
        if self.sha256() != manifest.sha256:
            raise IntegrityError(f"backup {path}: records hash to sha256 {self.sha256()}, the manifest says {manifest.sha256}")


def reporting(items: Iterable[BackupRecord], phase: str, total: int, on_progress: OnProgress | None) -> Iterator[BackupRecord]:
    done = 0
    for done, item in enumerate(items, 1):
        if on_progress is not None and done % PROGRESS_EVERY == 0:
            on_progress(Progress(phase, done, total))
        yield item
    if on_progress is not None:
        on_progress(Progress(phase, done, total))


# -- reading a backup file -----------------------------------------------------------------
class BackupFile:
    """A backup opened for reading: its manifest, then its records in file order.

    Anything unreadable — a bad header, a corrupt block, a cut-off end — is an
    :class:`IntegrityError` naming the file. One pass per instance (a container streams).
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            self._file: IO[bytes] = self.path.open("rb")
        except FileNotFoundError as err:
            raise NotFound(f"backup {self.path} does not exist") from err
        try:
            self._reader = fastavro.reader(self._file, reader_schema=_PARSED)
            text = self._reader.metadata.get(MANIFEST_KEY)
        except Exception as err:  # noqa: BLE001 - fastavro reports a bad header in many ways
            self._file.close()
            raise IntegrityError(f"backup {self.path} is not a readable evp backup: {type(err).__name__}: {err}") from err
        if text is None:
            self._file.close()
            raise IntegrityError(f"backup {self.path} has no manifest ({MANIFEST_KEY!r} is missing from its header)")
        try:
            self.manifest = Manifest.from_json(text)
        except IntegrityError as err:
            self._file.close()
            raise IntegrityError(f"backup {self.path}: {err}") from err

    def records(self) -> Iterator[BackupRecord]:
        read = 0
        try:
            for datum in self._reader:
                yield BackupRecord.from_avro(datum)
                read += 1
        except Exception as err:  # noqa: BLE001 - corrupt or truncated blocks fail in many ways
            raise IntegrityError(f"backup {self.path} is unreadable after record #{read}: {type(err).__name__}: {err}") from err

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> BackupFile:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def verify_backup(path: Path | str, key: BackupKey | None, *, on_progress: OnProgress | None = None) -> Manifest:
    """Authenticate the manifest, re-read every record, recompute counts and the hash.

    1. with ``key``, check the manifest's MAC (an edited backup, re-hashed or not, fails
       here); ``key=None`` skips only this step: a check for corruption, not for tampering;
    2. re-read every record in canonical order within the pinned ranges;
    3. compare counts and the sha256 with the (now authenticated) manifest.

    IntegrityError names what differs.
    """
    with BackupFile(path) as backup:
        manifest = backup.manifest
        if key is not None:
            key.check(manifest, backup.path)
        tally = _Tally(manifest.ranges, manifest.schema_range)
        total = manifest.records + manifest.schema_records
        for record in reporting(backup.records(), "verify", total, on_progress):
            try:
                tally.add(record)
            except IntegrityError as err:
                raise IntegrityError(f"backup {backup.path}: {err}") from err
        tally.check(manifest, backup.path)
    return manifest


# -- creating a backup ---------------------------------------------------------------------
def _pin(settings: Settings, topic: str) -> dict[int, tuple[int, int]]:
    """``[beginning, end)`` of every partition right now; NotFound if the topic does not exist."""
    reader = consumer(settings)
    try:
        with kafka_errors(settings):
            partitions = reader.partitions_for_topic(topic)
            if not partitions:
                raise NotFound(f"topic {topic!r} does not exist on {settings.kafka}")
            tps = [TopicPartition(topic, p) for p in sorted(partitions)]
            starts, ends = reader.beginning_offsets(tps), reader.end_offsets(tps)
            return {tp.partition: (starts[tp], ends[tp]) for tp in tps}
    finally:
        reader.close()


def _read_pinned(settings: Settings, topic: str, source: str, ranges: Ranges) -> Iterator[BackupRecord]:
    """Every record in ``[start, end)`` of each partition, undecoded (see :func:`events.store.log.read_pinned`)."""
    for message in read_pinned(settings, topic, ranges, max_poll_records=5000):
        yield BackupRecord.from_message(source, message)


def create_backup(settings: Settings, path: Path | str, *, on_progress: OnProgress | None = None,
                  key: BackupKey | None = None) -> Manifest:
    """Back up the events topic (pinned now) and the schema registry's topic into ``path``.

    Refuses to overwrite an existing file. Reads Kafka only: publish the outbox first (the
    ``evp backup create`` command does) to include events still waiting there. The manifest
    is authenticated with ``key``, by default the deployment's backup key (created if missing).
    """
    path = Path(path)
    key = key if key is not None else BackupKey.from_settings(settings, create=True)
    if path.exists():
        raise EvpError(f"backup {path} already exists; a backup is never overwritten")
    path.parent.mkdir(parents=True, exist_ok=True)
    ranges = _pin(settings, settings.events_topic)
    try:  # pinned after the events: every schema id a pinned event uses is below this end
        schema_range = _pin(settings, settings.schemas_topic)[0]
    except NotFound:
        schema_range = (0, 0)
    created_at = datetime.now(UTC).isoformat()
    tally = _Tally(ranges, schema_range)

    def tallied() -> Iterator[dict[str, Any]]:
        sources = (_read_pinned(settings, settings.schemas_topic, SCHEMAS, {0: schema_range}),
                   _read_pinned(settings, settings.events_topic, EVENTS, ranges))
        total = schema_range[1] - schema_range[0] + sum(end - start for start, end in ranges.values())
        for record in reporting((r for source in sources for r in source), "read", total, on_progress):
            tally.add(record)
            yield record.to_avro()

    with tempfile.TemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".spool") as spool:
        fastavro.writer(spool, _PARSED, tallied(), codec="null")
        spool.seek(0)
        manifest = Manifest(
            topic=settings.events_topic, schemas_topic=settings.schemas_topic, ranges=dict(ranges),
            schema_range=schema_range, counts=dict(tally.counts), schema_records=tally.schema_records,
            sha256=tally.sha256(), created_at=created_at, mac_key_id=key.key_id,
        )
        manifest = replace(manifest, mac=key.mac(manifest))
        spooled = (BackupRecord.from_avro(d) for d in fastavro.reader(spool, reader_schema=_PARSED))
        records = (r.to_avro() for r in reporting(spooled, "write", tally.seen, on_progress))
        write_atomically(path, lambda out: fastavro.writer(
            out, _PARSED, records, codec="deflate", metadata={MANIFEST_KEY: manifest.to_json()},
        ))
    return manifest
