"""Materialized snapshot shards: a small, deterministic, self-describing binary format.

A shard is, little endian::

    MAGIC | u32 header length | JSON header | column 0 bytes | column 1 bytes | ...

The header (canonical JSON: sorted keys, no whitespace) holds the format version, the
columns (name, dtype, shape), the row count and the row ids; then each column follows as
one C-ordered little-endian array ``[rows, *shape]``, in header order. The same rows always
give the same bytes (no timestamps, unlike ``.npz`` zip members), so a shard's sha256 can
be recorded in the snapshot and re-checked anywhere, for example on a GPU machine that has
no access to Kafka; and a shard can be read without the dataset's code.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from events.adapters.files import write_bytes_atomically
from events.errors import IntegrityError
from trainer.data import Column, Table

MAGIC = b"EVPSHRD2"
FORMAT = 2
ROWS_PER_SHARD = 1024


@dataclass(frozen=True)
class ShardInfo:
    name: str
    sha256: str
    rows: int


def encode_shard(table: Table) -> bytes:
    """The shard bytes of ``table`` (already in canonical order)."""
    header = json.dumps(
        {"format": FORMAT, "columns": [c.describe() for c in table.columns], "rows": len(table),
         "row_ids": list(table.row_ids)},
        sort_keys=True, separators=(",", ":"), ensure_ascii=True,
    ).encode()
    body = b"".join(np.ascontiguousarray(table[c.name], dtype=c.numpy_dtype).tobytes() for c in table.columns)
    return MAGIC + struct.pack("<I", len(header)) + header + body


def decode_shard(blob: bytes, name: str = "shard") -> Table:
    """Parse a shard using only its own header; IntegrityError naming the shard on any flaw."""
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 4:
        raise IntegrityError(f"{name}: not an evp shard of format {FORMAT} (bad magic)")
    (length,) = struct.unpack_from("<I", blob, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        header = json.loads(blob[start : start + length])
        rows = int(header["rows"])
        ids = tuple(header["row_ids"])
        columns = tuple(Column.from_description(c) for c in header["columns"])
    except (ValueError, KeyError, TypeError) as err:
        raise IntegrityError(f"{name}: unreadable shard header: {err}") from err
    offset = start + length
    sizes = [rows * math.prod(c.shape) * c.numpy_dtype.itemsize for c in columns]
    if len(blob) != offset + sum(sizes):
        raise IntegrityError(f"{name}: truncated or padded shard ({len(blob)} bytes for {rows} rows)")
    arrays: dict[str, np.ndarray] = {}
    for column, size in zip(columns, sizes):
        flat = np.frombuffer(blob, dtype=column.numpy_dtype, count=rows * math.prod(column.shape), offset=offset)
        arrays[column.name] = flat.reshape(rows, *column.shape).astype(column.dtype)
        offset += size
    return Table(columns, ids, arrays)


def write_shards(table: Table, folder: Path, rows_per_shard: int = ROWS_PER_SHARD) -> list[ShardInfo]:
    """Write ``table`` (already in canonical order) as numbered shards; atomic per file.

    An empty table still gets one (empty) shard, so every snapshot has at least one file
    whose hash describes its columns.
    """
    folder.mkdir(parents=True, exist_ok=True)
    infos: list[ShardInfo] = []
    for index, start in enumerate(range(0, max(len(table), 1), rows_per_shard)):
        part = table.select(np.arange(start, min(start + rows_per_shard, len(table))))
        blob = encode_shard(part)
        name = f"shard-{index:05d}.bin"
        write_bytes_atomically(folder / name, blob)
        infos.append(ShardInfo(name, hashlib.sha256(blob).hexdigest(), len(part)))
    return infos


def read_shards(folder: Path, infos: Sequence[ShardInfo], columns: Sequence[Column], *,
                owner: str | None = None) -> Table:
    """Read and verify shards against their recorded hashes and columns; refuse any mismatch.

    1. every listed shard must exist (a missing one is an IntegrityError, never skipped);
    2. its sha256 must equal the recorded one;
    3. its header must describe exactly ``columns`` and its row count the recorded one.
    Every shard is checked even after one failed; one IntegrityError names each failure by
    the shard's file name, with the recorded and found values, after ``owner`` (what the
    shards belong to, e.g. ``snapshot snap-…``; default: the shard's path).
    """
    parts: list[Table] = []
    problems: list[str] = []
    for info in infos:
        path = folder / info.name
        name = f"{owner}: shard {info.name}" if owner else f"shard {path}"
        if not path.is_file():
            problems.append(f"{name} is missing" + (f" from {folder}" if owner else ""))
            continue
        blob = path.read_bytes()
        digest = hashlib.sha256(blob).hexdigest()
        if digest != info.sha256:
            problems.append(f"{name} has sha256 {digest}, the snapshot recorded {info.sha256}")
            continue
        try:
            part = decode_shard(blob, name)
        except IntegrityError as err:
            problems.append(str(err))
            continue
        if part.columns != tuple(columns) or len(part) != info.rows:
            problems.append(f"{name} describes {len(part)} rows of {[c.describe() for c in part.columns]}, "
                            f"the snapshot recorded {info.rows} of {[c.describe() for c in columns]}")
            continue
        parts.append(part)
    if problems:
        raise IntegrityError("; ".join(problems))
    return Table.concat(columns, parts)
