"""Backups of the event log: a chain of self-checking files in a folder or at any fsspec URL.

A *backup set* is a storage location (:mod:`events.adapters.storage`) holding backups named
``backup-<sequence>-<full|incremental>.evpbak``. A full backup holds the log from the
topic's beginning; an incremental one holds only what came after its parent (the backup
before it), so a restore reads a full backup and the incrementals after it, in order. Each
backup is one Avro object container file (deflate) whose records are, in this order:

1. the schema registry's records in its range (all of them in a full backup, the new ones in
   an incremental), so a restore into an empty cluster decodes what it restores (the wire
   format embeds schema ids);
2. the events topic's records in ``[start, end)`` per partition, partition by partition in
   offset order, relay duplicates included;
3. the ledger's state that is not in the log: unique-value reservations and aggregate
   snapshots, whole in every backup (they grow with streams, not with events).

Each backup is one consistent cut (:func:`create_backup`, steps 1-5): the state is read in
one snapshot of the ledger at position P, the topic's ends are those of the :class:`~events.store.cut.Cut`
at P, and every record below the ends is at or below P (a backup that finds a later one,
re-sent by a crashed relay, cuts again). The file's header metadata holds the
:class:`Manifest`: the cut (P, ranges, chain heads per partition), the parent's sequence
and MAC, record counts, a sha256 over the records in canonical order (the self-check: it
finds corruption), proofs recorded by other layers (view digests) and a MAC over all of it
(the authentication: it finds an edit). The MAC is HMAC-SHA256 under the deployment's backup
key (:class:`BackupKey`, kept beside the KEK but never rotated with it), so whoever edits the
records and re-hashes them cannot make a manifest that verifies without that key; and since
each manifest's MAC covers its parent's MAC, nobody can splice another chain in either.
The records are spooled to a local temporary file, because the hash is known only once
every record was read and a container writes its header first; the backup appears under its
name only complete (:meth:`~events.adapters.storage.Storage.create`).

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
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import IO, Any, TypeVar

import fastavro

from events.adapters.files import write_atomically
from events.adapters.storage import Storage
from events.errors import ConfigurationError, IntegrityError
from events.event import HEADER_POSITION
from events.store.chain import link_header
from events.settings import Settings

FORMAT = "evp-backup"
FORMAT_VERSION = 3  #: 3: chains of backups, the cut and the ledger state; 2: a MAC under the backup key; 1: the sha256 only
BACKUP_KEY_FILE = "backup.key"
READABLE_VERSIONS = (1, 2, 3)
MAC_ALGORITHM = "hmac-sha256"
_MAC_DOMAIN = b"evp-backup-mac-v1"
MANIFEST_KEY = "evp.backup.manifest"
SCHEMAS, EVENTS = "SCHEMAS", "EVENTS"  #: a record's source topic
RESERVATIONS, SNAPSHOTS = "RESERVATIONS", "SNAPSHOTS"  #: ledger state (format 3)
SOURCES = (SCHEMAS, EVENTS, RESERVATIONS, SNAPSHOTS)  #: in file order
FULL, INCREMENTAL = "full", "incremental"
SUFFIX = ".evpbak"

#: How often long steps report progress, in records.
PROGRESS_EVERY = 1000
#: zlib level of the final container: level 1 costs a third of the default's time for ~10% more bytes.
COMPRESSION_LEVEL = 1
#: Records sent before waiting for their acknowledgements during a restore (events.ops.restore).
PRODUCE_CHUNK = 5000

RECORD_SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "BackupRecord",
    "namespace": "evp.backup",
    "doc": "One Kafka record of the events topic or the schema registry's topic, as it was on the log; or one row of the ledger's state (key and value JSON).",
    "fields": [
        {"name": "source", "type": {"type": "enum", "name": "Source", "symbols": list(SOURCES)}},
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
PARSED_SCHEMA = fastavro.parse_schema(RECORD_SCHEMA)

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
        """The canonical order: schema records, events by partition and offset, then the state."""
        return (SOURCES.index(self.source), self.partition, self.offset)

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

    def check(self, manifest: Manifest, path: str) -> None:
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
class Parent:
    """The backup an incremental one continues: its sequence and its manifest's MAC."""

    sequence: int
    mac: str


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
    sequence: int = 1  #: the backup's place in its set (format 3)
    kind: str = FULL
    parent: Parent | None = None  #: the backup this one continues (incremental only)
    position: int | None = None  #: the ledger position of the cut: every event at or below it is in the chain
    chain_heads: Mapping[int, str | None] = field(default_factory=dict)  #: each partition's chain link at its end
    state: Mapping[str, int] = field(default_factory=dict)  #: ledger state rows, per source
    proofs: Mapping[str, Any] = field(default_factory=dict)  #: what other layers recorded at the cut (view digests)

    @property
    def partitions(self) -> int:
        return len(self.ranges)

    @property
    def records(self) -> int:
        return sum(self.counts.values())

    @property
    def total(self) -> int:
        """Every record in the file: schemas, events and state."""
        return self.records + self.schema_records + sum(self.state.values())

    @property
    def name(self) -> str:
        """The backup's file name in its set."""
        return backup_name(self.sequence, self.kind)

    @property
    def ends(self) -> dict[int, int]:
        return {p: end for p, (_, end) in self.ranges.items()}

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "format": FORMAT, "format_version": self.format_version, "topic": self.topic,
            "schemas_topic": self.schemas_topic, "created_at": self.created_at, "sha256": self.sha256,
            "ranges": {str(p): list(r) for p, r in sorted(self.ranges.items())},
            "schema_range": list(self.schema_range),
            "counts": {str(p): n for p, n in sorted(self.counts.items())},
            "schema_records": self.schema_records,
            **({"mac": {"algorithm": MAC_ALGORITHM, "key_id": self.mac_key_id, "value": self.mac}}
               if self.mac is not None else {}),
        }
        if self.format_version >= 3:
            body |= {
                "sequence": self.sequence, "kind": self.kind, "position": self.position,
                "parent": {"sequence": self.parent.sequence, "mac": self.parent.mac} if self.parent else None,
                "chain_heads": {str(p): h for p, h in sorted(self.chain_heads.items())},
                "state": dict(sorted(self.state.items())), "proofs": dict(self.proofs),
            }
        return body

    def signed_bytes(self) -> bytes:
        """What the MAC covers: the whole manifest (its sha256 and its parent's MAC included) but the MAC itself."""
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
            version = body["format_version"]
            if version not in READABLE_VERSIONS:
                raise ValueError(f"format version {version} is not one of {READABLE_VERSIONS}")
            mac = body.get("mac")
            if version >= 2:
                if not isinstance(mac, dict) or mac.get("algorithm") != MAC_ALGORITHM:
                    raise ValueError(f"format version {version} needs a {MAC_ALGORITHM} mac, found {mac!r}")
            parent = body.get("parent")
            kind = str(body.get("kind", FULL))
            if kind not in (FULL, INCREMENTAL) or (kind == INCREMENTAL) != (parent is not None):
                raise ValueError(f"kind {kind!r} with parent {parent!r}: only an incremental backup has a parent")
            return cls(
                topic=str(body["topic"]), schemas_topic=str(body["schemas_topic"]),
                ranges={int(p): (int(r[0]), int(r[1])) for p, r in body["ranges"].items()},
                schema_range=(int(body["schema_range"][0]), int(body["schema_range"][1])),
                counts={int(p): int(n) for p, n in body["counts"].items()},
                schema_records=int(body["schema_records"]), sha256=str(body["sha256"]),
                created_at=str(body["created_at"]), format_version=int(version),
                mac=str(mac["value"]) if mac else None, mac_key_id=str(mac["key_id"]) if mac else None,
                sequence=int(body.get("sequence", 1)), kind=kind,
                parent=Parent(int(parent["sequence"]), str(parent["mac"])) if parent else None,
                position=None if body.get("position") is None else int(body["position"]),
                chain_heads={int(p): (None if h is None else str(h)) for p, h in body.get("chain_heads", {}).items()},
                state={str(k): int(n) for k, n in body.get("state", {}).items()},
                proofs=dict(body.get("proofs", {})),
            )
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            raise IntegrityError(f"the backup's manifest is malformed: {err}") from err


def backup_name(sequence: int, kind: str) -> str:
    return f"backup-{sequence:06d}-{kind}{SUFFIX}"


class Tally:
    """Checks canonical order and pinned ranges, counts and hashes records, and follows chain links.

    Creating and verifying a backup both run records through this one class, so they cannot
    disagree on what the hash covers.
    """

    def __init__(self, ranges: Ranges, schema_range: tuple[int, int], heads: Mapping[int, str | None] | None = None) -> None:
        self._ranges, self._schema_range = ranges, schema_range
        self._hash = hashlib.sha256(f"{FORMAT}/{FORMAT_VERSION}\n".encode())
        self._last: tuple[int, int, int] | None = None
        self.counts: dict[int, int] = {p: 0 for p in ranges}
        self.schema_records = 0
        self.state: dict[str, int] = {}
        self.heads: dict[int, str | None] = {p: None for p in ranges}
        self.heads.update(heads or {})
        self.max_position = 0  #: the highest ``evp.position`` among the event records

    @property
    def seen(self) -> int:
        return self.schema_records + sum(self.counts.values()) + sum(self.state.values())

    def add(self, record: BackupRecord) -> None:
        where = f"record #{self.seen} ({record.source} partition {record.partition} offset {record.offset})"
        if record.source not in SOURCES:
            raise IntegrityError(f"{where} has an unknown source")
        if self._last is not None and record.order <= self._last:
            raise IntegrityError(f"{where} is out of order: records must be schemas, then events by partition and "
                                 "offset, then the ledger's state")
        self._last = record.order
        if record.source == SCHEMAS:
            start, end = self._schema_range
            if record.partition != 0 or not start <= record.offset < end:
                raise IntegrityError(f"{where} is outside the schemas range [{start}, {end}) of partition 0")
            self.schema_records += 1
        elif record.source == EVENTS:
            if record.partition not in self._ranges:
                raise IntegrityError(f"{where}: the manifest pins no range for partition {record.partition}")
            start, end = self._ranges[record.partition]
            if not start <= record.offset < end:
                raise IntegrityError(f"{where} is outside the pinned range [{start}, {end})")
            self.counts[record.partition] += 1
            self._follow(record)
        else:
            if record.partition != 0 or record.offset != self.state.get(record.source, 0):
                raise IntegrityError(f"{where}: state rows are numbered from 0 in partition 0")
            self.state[record.source] = record.offset + 1
        self._hash.update(record.canonical_bytes())

    def _follow(self, record: BackupRecord) -> None:
        headers = [(k, v or b"") for k, v in record.headers]
        claimed = link_header(headers)
        if claimed is not None:
            self.heads[record.partition] = claimed.hex()
        for name, value in headers:
            if name == HEADER_POSITION:
                try:
                    self.max_position = max(self.max_position, int(value))
                except ValueError:
                    pass

    def sha256(self) -> str:
        return self._hash.hexdigest()

    def check(self, manifest: Manifest, where: str) -> None:
        """IntegrityError naming the first thing that differs from the manifest."""
        if self.schema_records != manifest.schema_records:
            raise IntegrityError(f"backup {where}: {self.schema_records} schema records, the manifest says {manifest.schema_records}")
        for partition in sorted(manifest.counts):
            found, recorded = self.counts.get(partition, 0), manifest.counts[partition]
            if found != recorded:
                raise IntegrityError(f"backup {where}: partition {partition} has {found} records, the manifest says {recorded}")
        for source in sorted(set(self.state) | set(manifest.state)):
            if self.state.get(source, 0) != manifest.state.get(source, 0):
                raise IntegrityError(f"backup {where}: {self.state.get(source, 0)} {source} rows, the manifest says "
                                     f"{manifest.state.get(source, 0)}")
        if self.sha256() != manifest.sha256:
            raise IntegrityError(f"backup {where}: records hash to sha256 {self.sha256()}, the manifest says {manifest.sha256}")


Item = TypeVar("Item")


def reporting(items: Iterable[Item], phase: str, total: int, on_progress: OnProgress | None) -> Iterator[Item]:
    """``items`` as they are, reporting progress every :data:`PROGRESS_EVERY` and at the end."""
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

    def __init__(self, storage: Storage, name: str) -> None:
        self.where = storage.describe(name)
        self._file: IO[bytes] = storage.open(name)
        try:
            self._reader = fastavro.reader(self._file, reader_schema=PARSED_SCHEMA)
            text = self._reader.metadata.get(MANIFEST_KEY)
        except Exception as err:  # noqa: BLE001 - fastavro reports a bad header in many ways
            self._file.close()
            raise IntegrityError(f"backup {self.where} is not a readable evp backup: {type(err).__name__}: {err}") from err
        if text is None:
            self._file.close()
            raise IntegrityError(f"backup {self.where} has no manifest ({MANIFEST_KEY!r} is missing from its header)")
        try:
            self.manifest = Manifest.from_json(text)
        except IntegrityError as err:
            self._file.close()
            raise IntegrityError(f"backup {self.where}: {err}") from err

    def records(self) -> Iterator[BackupRecord]:
        read = 0
        try:
            for datum in self._reader:
                yield BackupRecord.from_avro(datum)
                read += 1
        except Exception as err:  # noqa: BLE001 - corrupt or truncated blocks fail in many ways
            raise IntegrityError(f"backup {self.where} is unreadable after record #{read}: {type(err).__name__}: {err}") from err

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> BackupFile:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def read_manifest(storage: Storage, name: str) -> Manifest:
    with BackupFile(storage, name) as backup:
        return backup.manifest


def verify_file(storage: Storage, name: str, key: BackupKey | None, *, on_progress: OnProgress | None = None,
                heads: Mapping[int, str | None] | None = None) -> Manifest:
    """Authenticate one backup's manifest, re-read every record, recompute counts, hash and chain heads.

    1. with ``key``, check the manifest's MAC (an edited backup, re-hashed or not, fails
       here); ``key=None`` skips only this step: a check for corruption, not for tampering;
    2. re-read every record in canonical order within the pinned ranges;
    3. compare counts and the sha256 with the (now authenticated) manifest;
    4. (format 3) follow the chain links from ``heads`` (the parent's) to the manifest's heads.

    IntegrityError names the file and what differs.
    """
    with BackupFile(storage, name) as backup:
        manifest = backup.manifest
        if key is not None:
            key.check(manifest, backup.where)
        tally = Tally(manifest.ranges, manifest.schema_range, heads)
        for record in reporting(backup.records(), f"verify {name}", manifest.total, on_progress):
            try:
                tally.add(record)
            except IntegrityError as err:
                raise IntegrityError(f"backup {backup.where}: {err}") from err
        tally.check(manifest, backup.where)
        if manifest.format_version >= 3 and dict(tally.heads) != dict(manifest.chain_heads):
            raise IntegrityError(f"backup {backup.where}: its records end in chain heads {tally.heads}, the manifest says "
                                 f"{dict(manifest.chain_heads)}")
    return manifest
