"""Training rows streamed from snapshot shards: verified, memory-mapped, batched in an exact order.

A snapshot larger than memory trains: its rows stay in their shard files and only the
batches being trained on are read. Contract:

1. :class:`ShardSet` opens a snapshot's shard folder: each shard is hashed in chunks and
   compared with the sha256 the snapshot recorded, its header checked against the recorded
   columns and row count, and each column memory-mapped read-only at its byte offset.
   :meth:`ShardSet.open` checks every shard before it returns, so a corrupted or missing
   shard is refused, by name, before a training step runs. While it checks, it copies each
   column into one file of its own in a private cache folder (memory-mapped too), so a batch
   of rows from anywhere in the snapshot is one indexed read, not one per shard it touches;
   the cache is file-backed (the page cache, not the process's memory) and removed with the set;
2. rows are addressed by a global index, shard after shard; :meth:`ShardSet.split` splits
   them by row id exactly as :meth:`trainer.data.Table.split` does (the held-out bucket of
   each id, rows in row-id order), from the headers alone;
3. :class:`ShardRows` is one side of that split: ``len``, the columns, the row ids, any
   column gathered on demand (``rows[name]``, what a recipe's ``model()`` may read) and
   :meth:`ShardRows.batch`, the rows of a batch in the batch's order;
4. :class:`Prefetcher` gathers the next batches in worker processes while one trains
   (``workers=0``: in this process); it only ever gathers the indices it is given, in
   order, so workers change the speed and never the result.

The order batches are drawn in is :class:`trainer.data.EpochSampler`'s, whatever holds the
rows, so a run on shards and one on an in-memory table of the same snapshot are the same run.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from events.errors import IntegrityError, InvalidDataset
from trainer.data import Column, holdout_bucket
from trainer.shards import MAGIC, ShardInfo

#: Bytes hashed per read while verifying a shard: constant memory whatever the shard's size.
HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class _Shard:
    """One verified shard: its rows' ids and a read-only memory map per column."""

    name: str
    row_ids: tuple[str, ...]
    columns: Mapping[str, np.ndarray]


def _verify(path: Path, info: ShardInfo, columns: Sequence[Column], owner: str) -> _Shard:
    """Step 1 for one shard; IntegrityError naming it and what differs."""
    name = f"{owner}: shard {info.name}"
    if not path.is_file():
        raise IntegrityError(f"{name} is missing from {path.parent}")
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(HASH_CHUNK):
            digest.update(chunk)
        if digest.hexdigest() != info.sha256:
            raise IntegrityError(f"{name} has sha256 {digest.hexdigest()}, the snapshot recorded {info.sha256}")
        file.seek(0)
        head = file.read(len(MAGIC) + 4)
        if not head.startswith(MAGIC) or len(head) < len(MAGIC) + 4:
            raise IntegrityError(f"{name}: not an evp shard (bad magic)")
        (length,) = struct.unpack_from("<I", head, len(MAGIC))
        try:
            header = json.loads(file.read(length))
            found = tuple(Column.from_description(c) for c in header["columns"])
            row_ids = tuple(str(i) for i in header["row_ids"])
        except (ValueError, KeyError, TypeError) as err:
            raise IntegrityError(f"{name}: unreadable shard header: {err}") from err
    if found != tuple(columns) or len(row_ids) != info.rows:
        raise IntegrityError(f"{name} describes {len(row_ids)} rows of {[c.describe() for c in found]}, the snapshot "
                             f"recorded {info.rows} of {[c.describe() for c in columns]}")
    offset = len(MAGIC) + 4 + length
    maps: dict[str, np.ndarray] = {}
    for column in columns:
        count = len(row_ids) * math.prod(column.shape)
        maps[column.name] = (np.memmap(path, dtype=column.numpy_dtype, mode="r", offset=offset,
                                       shape=(len(row_ids), *column.shape)) if count else
                             np.zeros((0, *column.shape), column.dtype))
        offset += count * column.numpy_dtype.itemsize
    return _Shard(info.name, row_ids, maps)


class ShardSet:
    """A snapshot's shards, verified, with their columns cached whole (steps 1 and 2)."""

    def __init__(self, columns: Sequence[Column], row_ids: Sequence[str], arrays: Mapping[str, np.ndarray],
                 cache: tempfile.TemporaryDirectory[str] | None = None) -> None:
        self.columns = tuple(columns)
        self.row_ids: tuple[str, ...] = tuple(row_ids)
        self._arrays = dict(arrays)
        self._cache = cache  # removed when the set is

    @classmethod
    def open(cls, folder: Path, infos: Sequence[ShardInfo], columns: Sequence[Column], *, owner: str) -> ShardSet:
        """Verify every shard of ``infos`` in ``folder`` (all of them, naming each that fails) and cache its columns."""
        total = sum(info.rows for info in infos)
        cache = tempfile.TemporaryDirectory(prefix="evp-shards-")
        arrays = {c.name: _cache_file(Path(cache.name), c, total) for c in columns}
        row_ids: list[str] = []
        problems: list[str] = []
        for info in infos:
            try:
                shard = _verify(Path(folder) / info.name, info, columns, owner)
            except IntegrityError as err:
                problems.append(str(err))
                continue
            start = len(row_ids)
            for name, array in shard.columns.items():
                arrays[name][start:start + len(shard.row_ids)] = array
            row_ids.extend(shard.row_ids)
        if problems:
            cache.cleanup()
            raise IntegrityError("; ".join(problems))
        for array in arrays.values():
            if isinstance(array, np.memmap):
                array.flush()
        return cls(columns, row_ids, {name: _read_only(a) for name, a in arrays.items()}, cache)

    def __len__(self) -> int:
        return len(self.row_ids)

    def gather(self, column: str, index: np.ndarray) -> np.ndarray:
        """Rows ``index`` (global) of ``column``, in that order, as one array."""
        try:
            return np.asarray(self._arrays[column][index])
        except KeyError:
            raise InvalidDataset(column, f"no such column; the shards have {[c.name for c in self.columns]}") from None

    def split(self, holdout_percent: int) -> tuple[ShardRows, ShardRows]:
        """Step 2: (train, held out), each in row-id order, as :meth:`trainer.data.Table.split` would."""
        if not 0 <= holdout_percent <= 100:
            raise InvalidDataset("holdout_percent", f"must be between 0 and 100, got {holdout_percent}")
        ordered = np.array(sorted(range(len(self.row_ids)), key=self.row_ids.__getitem__), dtype=np.int64)
        held = np.array([holdout_bucket(self.row_ids[i]) < holdout_percent for i in ordered], dtype=bool)
        return ShardRows(self, ordered[~held]), ShardRows(self, ordered[held])


def _cache_file(folder: Path, column: Column, rows: int) -> np.ndarray:
    if rows == 0 or math.prod(column.shape) == 0:
        return np.zeros((rows, *column.shape), column.dtype)
    return np.memmap(folder / f"{column.name}.bin", dtype=column.dtype, mode="w+", shape=(rows, *column.shape))


def _read_only(array: np.ndarray) -> np.ndarray:
    if isinstance(array, np.memmap) and array.filename is not None:
        return np.memmap(array.filename, dtype=array.dtype, mode="r", shape=array.shape)
    return array


class ShardRows:
    """Some of a :class:`ShardSet`'s rows, in a fixed order (step 3)."""

    def __init__(self, shards: ShardSet, index: np.ndarray) -> None:
        self.shards, self.index = shards, index
        self.columns = shards.columns

    def __len__(self) -> int:
        return len(self.index)

    @property
    def row_ids(self) -> tuple[str, ...]:
        return tuple(self.shards.row_ids[i] for i in self.index)

    def __getitem__(self, column: str) -> np.ndarray:
        """The whole column for these rows (read from the shards now: for a recipe's ``model()``)."""
        return self.shards.gather(column, self.index)

    def column(self, name: str) -> Column:
        for column in self.columns:
            if column.name == name:
                return column
        raise InvalidDataset(name, f"no such column; the rows have {[c.name for c in self.columns]}")

    def batch(self, positions: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The rows at ``positions`` (0..len-1, the sampler's indices) of each column, in that order."""
        index = self.index[positions.numpy()]
        return {name: torch.from_numpy(self.shards.gather(name, index)) for name in names}


class _Batches(Dataset[dict[str, torch.Tensor]]):
    """The batches of a plan, by their place in it (what the prefetching workers gather)."""

    def __init__(self, rows: ShardRows, plan: Sequence[torch.Tensor], names: Sequence[str]) -> None:
        self.rows, self.plan, self.names = rows, plan, tuple(names)

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        return self.rows.batch(self.plan[step], self.names)


class Prefetcher:
    """Step 4: the batches of ``plan`` gathered ahead by ``workers`` processes, handed out in plan order."""

    def __init__(self, rows: ShardRows, plan: Sequence[torch.Tensor], names: Sequence[str], *, workers: int = 0,
                 prefetch: int = 2) -> None:
        if workers < 0 or prefetch < 1:
            raise InvalidDataset("workers", f"need workers >= 0 and prefetch >= 1, got {workers}, {prefetch}")
        options: dict[str, Any] = {"prefetch_factor": prefetch, "multiprocessing_context": "fork"} if workers else {}
        self._loader = DataLoader(_Batches(rows, plan, names), batch_size=None, shuffle=False, num_workers=workers,
                                  **options)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self._loader)
