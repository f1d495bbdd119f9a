"""Signed chain heads: the checkpoints an auditor's key makes, and what they prove.

Whoever can write both the ledger and the topic can recompute every hash chain
(:mod:`events.store.chain`). A checkpoint is a statement of every partition's chain head —
the offset of its last recorded record and that record's link — signed with an Ed25519 key
that neither PostgreSQL nor Kafka holds. Contract:

1. :func:`generate_key` writes the key pair: ``audit-key.pem`` (the private key, mode 0600,
   for whoever makes checkpoints) and ``audit-key.pub`` (the public key, hex, for whoever
   verifies); the platform stores neither;
2. :func:`make_checkpoint` reads the heads (``evp_chain_heads``), signs the statement's
   canonical JSON, records it as an ``AuditCheckpointed`` event (stream
   :data:`CHECKPOINT_STREAM`) and writes the same file to a *witness* folder outside both
   systems (another disk, a mounted bucket), so deleting the event does not delete it;
3. :func:`gather` collects the checkpoints of the log and of the witness, one per id;
4. :meth:`Checkpoint.valid` checks a signature against the public key; a checkpoint whose
   signature fails was not made with the auditor's key.

5. :func:`prove` writes, for one published event, the chain from its record to the
   earliest signed head after it; :meth:`Proof.check` verifies it with the public key alone.

``evp audit verify --public-key`` then requires each valid checkpoint's heads to be on the
topic, in the chain it follows: a history rewritten before a signed head no longer reaches
it. Events after the newest checkpoint are chained but not yet signed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from events.adapters.files import write_bytes_atomically
from events.errors import ConfigurationError, NotFound
from events.event import Event
from events.store import chain
from events.store.client import EventStore
from events.store.log import read_pinned
from events.store.source import Message

CHECKPOINT_STREAM = "audit-checkpoints"
PRIVATE_KEY_FILE, PUBLIC_KEY_FILE = "audit-key.pem", "audit-key.pub"
FORMAT = 1


@dataclass(frozen=True)
class Head:
    """One partition's chain head: the record at ``offset`` carries ``link``."""

    offset: int
    link: str  #: hex


@dataclass(frozen=True)
class Checkpoint:
    """A signed statement of the heads (step 2); ``statement`` is exactly the signed text."""

    statement: str
    signature: str  #: hex

    @property
    def body(self) -> dict[str, Any]:
        """The statement parsed; empty when it is not a JSON object (then it cannot be valid either)."""
        try:
            parsed = json.loads(self.statement)
        except ValueError:
            return {}
        return parsed if isinstance(parsed, dict) else {}

    @property
    def id(self) -> str:
        return hashlib.sha256(self.statement.encode()).hexdigest()[:16]

    @property
    def made_at(self) -> str:
        return str(self.body.get("made_at", "?"))

    @property
    def heads(self) -> dict[int, Head]:
        return {int(p): Head(int(h["offset"]), str(h["link"])) for p, h in self.body.get("heads", {}).items()}

    def valid(self, public_key: Ed25519PublicKey) -> bool:
        """Step 4: made with the private key of ``public_key``, and of this format."""
        try:
            public_key.verify(bytes.fromhex(self.signature), self.statement.encode())
        except (InvalidSignature, ValueError):
            return False
        return self.body.get("format") == FORMAT

    def to_json(self) -> str:
        return json.dumps({"statement": self.statement, "signature": self.signature}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Checkpoint:
        """A witness file read back; a damaged one becomes a checkpoint that does not verify."""
        try:
            data = json.loads(text)
            return cls(str(data["statement"]), str(data["signature"]))
        except (ValueError, KeyError, TypeError):
            return cls(text, "")


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


# -- keys ----------------------------------------------------------------------------------
def generate_key(folder: Path) -> tuple[Path, Path]:
    """Step 1: a new key pair in ``folder``; refuses to overwrite one."""
    folder.mkdir(parents=True, exist_ok=True)
    private_path, public_path = folder / PRIVATE_KEY_FILE, folder / PUBLIC_KEY_FILE
    if private_path.exists():
        raise ConfigurationError(f"{private_path} exists: an audit key is never overwritten (checkpoints need it)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as out:
        out.write(pem)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    public_path.write_text(raw.hex() + "\n", encoding="ascii")
    return private_path, public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError as err:
        raise ConfigurationError(f"no audit key at {path} (make one with `evp audit keygen`)") from err
    except ValueError as err:
        raise ConfigurationError(f"{path} is not a PEM private key: {err}") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigurationError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(path.read_text(encoding="ascii").strip()))
    except FileNotFoundError as err:
        raise ConfigurationError(f"no audit public key at {path}") from err
    except ValueError as err:
        raise ConfigurationError(f"{path} is not an Ed25519 public key in hex: {err}") from err


# -- checkpoints -----------------------------------------------------------------------------
def make_checkpoint(store: EventStore, key: Ed25519PrivateKey, witness: Path) -> Checkpoint:
    """Step 2: publish what is pending, sign every partition's head, record it, witness it."""
    store.flush()
    rows = store.ledger.connection.execute("SELECT partition, kafka_offset, chain FROM evp_chain_heads ORDER BY 1").fetchall()
    if not rows:
        raise NotFound("no partition has a chain head yet: publish events before making a checkpoint")
    made_at = datetime.now(timezone.utc).isoformat()
    body: dict[str, Any] = {
        "format": FORMAT, "topic": store.settings.events_topic,
        "heads": {str(p): {"offset": int(o), "link": bytes(c).hex()} for p, o, c in rows},
        "made_at": made_at, "key_id": key_id(key.public_key()),
    }
    statement = json.dumps(body, sort_keys=True, separators=(",", ":"))
    checkpoint = Checkpoint(statement, key.sign(statement.encode()).hex())
    folder = witness_folder(witness, store.settings.events_topic)
    folder.mkdir(parents=True, exist_ok=True)
    write_bytes_atomically(folder / f"checkpoint-{made_at[:19].replace(':', '')}-{checkpoint.id}.json",
                           checkpoint.to_json().encode())
    store.append(CHECKPOINT_STREAM, Event("AuditCheckpointed", {
        "statement": statement, "signature": checkpoint.signature, "key_id": str(body["key_id"]),
    }, actor=store.settings.actor))
    store.flush()
    return checkpoint


def witness_folder(witness: Path, topic: str) -> Path:
    return witness / topic


def gather(store: EventStore, witness: Path | None) -> tuple[list[Checkpoint], set[str]]:
    """Step 3: every checkpoint, and the ids of those only the witness holds."""
    logged: dict[str, Checkpoint] = {}
    try:
        for stored in store.read_stream(CHECKPOINT_STREAM, decrypt=False):
            found = Checkpoint(str(stored.data["statement"]), str(stored.data["signature"]))
            logged[found.id] = found
    except NotFound:
        pass
    witnessed: dict[str, Checkpoint] = {}
    if witness is not None:
        for path in sorted(witness_folder(witness, store.settings.events_topic).glob("checkpoint-*.json")):
            found = Checkpoint.from_json(path.read_text(encoding="utf-8"))
            witnessed[found.id] = found
    return [*logged.values(), *(c for i, c in witnessed.items() if i not in logged)], set(witnessed) - set(logged)


def watched_offsets(checkpoints: Iterable[Checkpoint]) -> dict[int, set[int]]:
    """partition -> the offsets some checkpoint signed a head at."""
    out: dict[int, set[int]] = {}
    for checkpoint in checkpoints:
        for partition, head in checkpoint.heads.items():
            out.setdefault(partition, set()).add(head.offset)
    return out


def unmet_heads(checkpoint: Checkpoint, links_at: Mapping[tuple[int, int], bytes],
                ends: Mapping[int, int]) -> list[tuple[int, Head, str, str]]:
    """Each head of ``checkpoint`` the topic does not have: (partition, head, finding kind, why)."""
    out: list[tuple[int, Head, str, str]] = []
    for partition, head in sorted(checkpoint.heads.items()):
        if head.offset >= ends.get(partition, 0):
            out.append((partition, head, "truncated", f"the partition ends at offset {ends.get(partition, 0)}, before it"))
        elif links_at.get((partition, head.offset), b"").hex() != head.link:
            out.append((partition, head, "rewritten",
                        "the record there has another link: the history up to it was rewritten"))
    return out


# -- proofs --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Proof:
    """That one record is in a signed head: checkable with the public key alone.

    ``previous`` is the link before the record; ``following`` the digests of the records that
    advanced the chain after it, up to the head the checkpoint signed. Folding them with
    :func:`events.store.chain.link` from ``previous`` must reach the signed link.
    """

    record: Message
    previous: bytes
    following: tuple[bytes, ...]
    checkpoint: Checkpoint

    def to_json(self) -> str:
        r = self.record
        return json.dumps({
            "format": FORMAT, "topic": r.topic, "partition": r.partition, "offset": r.offset,
            "record": {"key": _b64(r.key), "value": _b64(r.value),
                       "headers": [[name, _b64(content)] for name, content in r.headers]},
            "previous": self.previous.hex(), "following": [d.hex() for d in self.following],
            "checkpoint": {"statement": self.checkpoint.statement, "signature": self.checkpoint.signature},
        }, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Proof:
        data = json.loads(text)
        record = data["record"]
        return cls(Message(str(data["topic"]), int(data["partition"]), int(data["offset"]), _unb64(record["key"]),
                           _unb64(record["value"]), tuple((str(n), _unb64(c) or b"") for n, c in record["headers"])),
                   bytes.fromhex(data["previous"]), tuple(bytes.fromhex(d) for d in data["following"]),
                   Checkpoint(str(data["checkpoint"]["statement"]), str(data["checkpoint"]["signature"])))

    def check(self, public_key: Ed25519PublicKey) -> str | None:
        """None when the proof holds; else what fails. Needs no database and no broker."""
        r = self.record
        if not self.checkpoint.valid(public_key):
            return "the checkpoint's signature does not verify with this public key"
        head = self.checkpoint.heads.get(r.partition)
        if head is None or self.checkpoint.body.get("topic") != r.topic:
            return f"the checkpoint signs no head of {r.topic} partition {r.partition}"
        reached = chain.link(self.previous, chain.record_digest(r.key, r.value, r.headers))
        if chain.link_header(r.headers) != reached:
            return "the record's own link does not follow the previous link: the record was changed"
        for digest in self.following:
            reached = chain.link(reached, digest)
        if reached.hex() != head.link:
            return "the chain from the record does not reach the signed head"
        return None


def prove(store: EventStore, event_id: str, witness: Path | None) -> Proof:
    """The proof that ``event_id``'s published record is in the earliest checkpoint after it.

    Reads the record's partition from its start to the signed head (the chain is followed
    record by record, re-sends skipped), so it costs the partition's length up to there.
    """
    row = store.ledger.connection.execute(
        "SELECT partition, kafka_offset FROM evp_event_log WHERE event_id = %s::uuid", (event_id,)).fetchone()
    if row is None:
        raise NotFound(f"no event {event_id} in the ledger")
    partition, offset = int(row[0]), row[1]
    if offset is None:
        raise NotFound(f"event {event_id} is not published yet: no chain holds it")
    later = [c for c in gather(store, witness)[0] if c.heads.get(partition, Head(-1, "")).offset >= offset]
    if not later:
        raise NotFound(f"no checkpoint covers partition {partition} offset {offset} yet (run `evp audit checkpoint`)")
    checkpoint = min(later, key=lambda c: c.heads[partition].offset)
    head = checkpoint.heads[partition]
    walk, previous, found, following = chain.Walk(), chain.GENESIS, None, []
    for message in read_pinned(store.settings, store.settings.events_topic, {partition: (0, head.offset + 1)}):
        before = walk.head(partition)
        kind, _, digest = walk.step(partition, message.key, message.value, message.headers or [])
        if digest is None or kind == chain.RESENT:
            continue
        if message.offset == offset:
            previous, found = before, message
        elif found is not None:
            following.append(digest)
    if found is None:
        raise NotFound(f"event {event_id}'s record at partition {partition} offset {offset} is not on the topic")
    record = Message(store.settings.events_topic, partition, offset, found.key, found.value,
                     tuple((k, v or b"") for k, v in (found.headers or [])))
    return Proof(record, previous, tuple(following), checkpoint)


def _b64(value: bytes | None) -> str | None:
    return None if value is None else base64.b64encode(value).decode()


def _unb64(value: str | None) -> bytes | None:
    return None if value is None else base64.b64decode(value)
