"""Materialized snapshot shards: a small, deterministic binary format with its own hash.

A shard is ``MAGIC | u32 header length | JSON header | float32 features | int64 labels``,
little endian. The same rows always give the same bytes (no timestamps, unlike ``.npz``
zip members), so a shard's sha256 can be recorded in the snapshot and re-checked anywhere,
for example on a GPU machine that has no access to Kafka.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from events.errors import IntegrityError
from events.adapters.files import write_bytes_atomically
from trainer.data import Examples

MAGIC = b"EVPSHRD1"
FEATURES = 64


@dataclass(frozen=True)
class ShardInfo:
    name: str
    sha256: str
    rows: int


def encode_shard(examples: Examples) -> bytes:
    header = json.dumps({"rows": len(examples), "features": FEATURES, "sample_ids": list(examples.sample_ids)},
                        separators=(",", ":")).encode()
    features = np.ascontiguousarray(examples.features, dtype="<f4").tobytes()
    labels = np.ascontiguousarray(examples.labels, dtype="<i8").tobytes()
    return MAGIC + struct.pack("<I", len(header)) + header + features + labels


def decode_shard(blob: bytes, name: str = "shard") -> Examples:
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 4:
        raise IntegrityError(f"{name}: not an evp shard (bad magic)")
    (length,) = struct.unpack_from("<I", blob, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        header = json.loads(blob[start : start + length])
        rows = int(header["rows"])
        ids = tuple(header["sample_ids"])
    except (ValueError, KeyError, TypeError) as err:
        raise IntegrityError(f"{name}: unreadable shard header: {err}") from err
    body = start + length
    feature_bytes = rows * FEATURES * 4
    if len(blob) != body + feature_bytes + rows * 8:
        raise IntegrityError(f"{name}: truncated or padded shard ({len(blob)} bytes for {rows} rows)")
    features = np.frombuffer(blob, dtype="<f4", count=rows * FEATURES, offset=body).reshape(rows, FEATURES)
    labels = np.frombuffer(blob, dtype="<i8", count=rows, offset=body + feature_bytes)
    return Examples(ids, features.astype(np.float32), labels.astype(np.int64))


def write_shards(examples: Examples, folder: Path, rows_per_shard: int = 1024) -> list[ShardInfo]:
    """Write ``examples`` (already in canonical order) as numbered shards; atomic per file."""
    folder.mkdir(parents=True, exist_ok=True)
    infos: list[ShardInfo] = []
    for index, start in enumerate(range(0, max(len(examples), 1), rows_per_shard)):
        part = examples.select(np.arange(start, min(start + rows_per_shard, len(examples))))
        blob = encode_shard(part)
        name = f"shard-{index:05d}.bin"
        write_bytes_atomically(folder / name, blob)
        infos.append(ShardInfo(name, hashlib.sha256(blob).hexdigest(), len(part)))
    return infos


def read_shards(folder: Path, infos: list[ShardInfo]) -> Examples:
    """Read and verify shards against their recorded hashes; refuse any mismatch."""
    parts: list[Examples] = []
    for info in infos:
        path = folder / info.name
        if not path.is_file():
            raise IntegrityError(f"shard {path} is missing")
        blob = path.read_bytes()
        digest = hashlib.sha256(blob).hexdigest()
        if digest != info.sha256:
            raise IntegrityError(f"shard {path} has sha256 {digest[:16]}…, the snapshot recorded {info.sha256[:16]}…")
        parts.append(decode_shard(blob, str(path)))
    return concat(parts)


def concat(parts: list[Examples]) -> Examples:
    if not parts:
        return Examples((), np.zeros((0, FEATURES), np.float32), np.zeros((0,), np.int64))
    return Examples(
        tuple(i for p in parts for i in p.sample_ids),
        np.concatenate([p.features for p in parts]).astype(np.float32),
        np.concatenate([p.labels for p in parts]).astype(np.int64),
    )
