"""Rows as plain arrays, described by their columns; their held-out split; the order they are seen in.

A :class:`Table` is what a snapshot materializes and what training reads: one array per
column, one row per row id, rows in row-id order. Nothing here knows about Kafka or about
any domain; a dataset declares its :class:`Column` s and the table checks every row
against them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from events.errors import IntegrityError, InvalidDataset

#: Column dtypes a dataset may declare: fixed-size numbers, stored little endian.
DTYPES = ("bool", "uint8", "int32", "int64", "float32", "float64")


@dataclass(frozen=True)
class Column:
    """One column: its name, its numpy dtype (one of :data:`DTYPES`) and the shape of one row's value.

    ``shape=()`` is a scalar per row (a label), ``(30,)`` a vector of 30, ``(8, 8)`` a matrix.
    """

    name: str
    dtype: str
    shape: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise InvalidDataset("columns", f"column name {self.name!r} must be a Python identifier")
        if self.dtype not in DTYPES:
            raise InvalidDataset(f"columns.{self.name}", f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        shape = tuple(self.shape)
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape):
            raise InvalidDataset(f"columns.{self.name}", f"shape {self.shape!r} must be positive whole numbers")
        object.__setattr__(self, "shape", shape)

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        """The little-endian dtype the column is stored and hashed in."""
        return np.dtype(self.dtype).newbyteorder("<")

    def describe(self) -> dict[str, Any]:
        """Plain JSON form (what shards, snapshots and hashes carry)."""
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_description(cls, body: Mapping[str, Any]) -> Column:
        return cls(str(body["name"]), str(body["dtype"]), tuple(int(n) for n in body["shape"]))

    def coerce(self, value: object, where: str) -> np.ndarray:
        """``value`` as one row's array of this column; InvalidDataset naming ``where`` and the column."""
        try:
            array = np.asarray(value, dtype=self.numpy_dtype)
        except (TypeError, ValueError) as err:
            raise InvalidDataset(self.name, f"{where}: {value!r:.60} is not {self.dtype}: {err}") from err
        if array.shape != self.shape:
            raise InvalidDataset(self.name, f"{where}: shape must be {self.shape}, got {array.shape}")
        if self.dtype != "bool" and np.issubdtype(array.dtype, np.integer):
            original = np.asarray(value)
            if original.dtype.kind == "f" and not np.array_equal(original, array):
                raise InvalidDataset(self.name, f"{where}: {value!r:.60} is not a whole number")
        return array


class Columned(Protocol):
    """Anything that describes its columns (a table, a shard set, rows streamed from shards)."""

    @property
    def columns(self) -> tuple[Column, ...]: ...


class Rows(Columned, Protocol):
    """What a recipe's ``model()`` may read of its training rows: a :class:`Table`, or rows
    streamed from a snapshot's shards (:class:`trainer.loader.ShardRows`, whose columns are
    read from the shards when asked for)."""

    @property
    def row_ids(self) -> tuple[str, ...]: ...

    def __len__(self) -> int: ...

    def __getitem__(self, column: str) -> np.ndarray: ...


@dataclass(frozen=True, eq=False)
class Table:
    """Rows with ids, one read-only array per column (``[N, *column.shape]``).

    ``row_ids`` are unique, non-empty strings. Arrays are copied and made read-only.
    """

    columns: tuple[Column, ...]
    row_ids: tuple[str, ...]
    arrays: Mapping[str, np.ndarray]

    def __post_init__(self) -> None:
        columns = tuple(self.columns)
        names = [c.name for c in columns]
        if not columns or len(set(names)) != len(names):
            raise InvalidDataset("columns", f"need at least one column and unique names, got {names}")
        object.__setattr__(self, "columns", columns)
        object.__setattr__(self, "row_ids", _checked_ids(self.row_ids))
        if set(self.arrays) != set(names):
            raise InvalidDataset("columns", f"arrays {sorted(self.arrays)} do not match the columns {names}")
        count = len(self.row_ids)
        arrays: dict[str, np.ndarray] = {}
        for column in columns:
            array = self.arrays[column.name]
            if not isinstance(array, np.ndarray) or array.dtype != np.dtype(column.dtype):
                raise InvalidDataset(column.name, f"must be a {column.dtype} numpy array, got {_describe(array)}")
            if array.shape != (count, *column.shape):
                raise InvalidDataset(column.name, f"shape must be {(count, *column.shape)}, got {array.shape}")
            arrays[column.name] = _frozen(array)
        object.__setattr__(self, "arrays", arrays)

    def __len__(self) -> int:
        return len(self.row_ids)

    def __getitem__(self, column: str) -> np.ndarray:
        try:
            return self.arrays[column]
        except KeyError:
            raise InvalidDataset(column, f"no such column; the table has {[c.name for c in self.columns]}") from None

    def column(self, name: str) -> Column:
        for column in self.columns:
            if column.name == name:
                return column
        raise InvalidDataset(name, f"no such column; the table has {[c.name for c in self.columns]}")

    @classmethod
    def empty(cls, columns: Sequence[Column]) -> Table:
        return cls(tuple(columns), (), {c.name: np.zeros((0, *c.shape), c.dtype) for c in columns})

    @classmethod
    def concat(cls, columns: Sequence[Column], parts: Sequence[Table]) -> Table:
        if not parts:
            return cls.empty(columns)
        return cls(tuple(columns), tuple(i for p in parts for i in p.row_ids),
                   {c.name: np.concatenate([p.arrays[c.name] for p in parts]) for c in columns})

    def select(self, rows: Sequence[int] | np.ndarray) -> Table:
        """The given rows, in the given order."""
        index = np.asarray(rows, dtype=np.int64)
        return Table(self.columns, tuple(self.row_ids[i] for i in index),
                     {name: array[index] for name, array in self.arrays.items()})

    def sorted_by_id(self) -> Table:
        """Rows in row-id order, so the order the input arrived in never reaches training."""
        return self.select(sorted(range(len(self)), key=self.row_ids.__getitem__))

    def split(self, holdout_percent: int) -> tuple[Table, Table]:
        """(train, held out), each sorted by row id.

        A row is held out when :func:`holdout_bucket` of its id is below
        ``holdout_percent``: the split depends on the id alone, not on row order, the seed
        or which other rows exist, so a row keeps its side as the dataset grows.
        """
        if not 0 <= holdout_percent <= 100:
            raise InvalidDataset("holdout_percent", f"must be between 0 and 100, got {holdout_percent}")
        ordered = self.sorted_by_id()
        held = np.array([holdout_bucket(row_id) < holdout_percent for row_id in ordered.row_ids], dtype=bool)
        rows = np.arange(len(ordered))
        return ordered.select(rows[~held]), ordered.select(rows[held])


def holdout_bucket(row_id: str) -> int:
    """0..99 from SHA-256 of the id: stable across processes, unlike Python's salted hash()."""
    digest = hashlib.sha256(row_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100


class EpochSampler:
    """Mini-batch row indices, epoch after epoch, from one seeded CPU ``torch.Generator``.

    1. each epoch draws a fresh permutation of the rows, lazily, on the epoch's first batch
       (so a sampler restored from a checkpoint draws nothing before its state is in place);
    2. step ``s`` covers ``permutation[s*batch_size:(s+1)*batch_size]``: the whole batch in
       one process (the last batch may be smaller), or, among ``world_size`` data-parallel
       ranks, an equal contiguous slice of it for each rank, ``batch_size / world_size``
       rows (then an epoch has ``rows // batch_size`` steps: every rank takes every step, so
       a last, partial batch is left out);
    3. every rank draws the same permutations (the generator is seeded alike), so the ranks
       together see each batch exactly once.

    Why not a ``DataLoader`` sampler: its workers carry their own RNG streams and prefetch
    batches ahead of the training position, so an exact resume would have to capture
    in-flight queues. Here the complete iterator state is (generator state, epoch, step,
    permutation), and a checkpoint holds exactly that; prefetching (trainer/loader.py)
    gathers rows for indices drawn here, ahead of time, and changes nothing. The generator
    lives on the CPU so the batch order is the same on every device type.
    """

    def __init__(self, size: int, batch_size: int, seed: int, *, world_size: int = 1, rank: int = 0) -> None:
        if size < 1 or batch_size < 1:
            raise InvalidDataset("size", f"need at least one row and a batch of at least 1, got {size}, {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise InvalidDataset("world_size", f"rank {rank} of a world of {world_size} does not exist")
        if batch_size % world_size:
            raise InvalidDataset("batch_size", f"batch_size {batch_size} does not split evenly over {world_size} "
                                               "ranks: make it a multiple of the number of processes")
        if world_size > 1 and size < batch_size:
            raise InvalidDataset("batch_size", f"{size} rows do not fill one batch of {batch_size} over {world_size} ranks")
        self.size, self.batch_size, self.world_size, self.rank = size, batch_size, world_size, rank
        self.steps_per_epoch = math.ceil(size / batch_size) if world_size == 1 else size // batch_size
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        self.epoch = 0
        self.step = 0
        self.permutation: torch.Tensor | None = None

    def remaining(self) -> list[torch.Tensor]:
        """This rank's row indices for every step left in the current epoch (step 2); moves nothing."""
        return [self._indices(s) for s in range(self.step, self.steps_per_epoch)]

    def _indices(self, step: int) -> torch.Tensor:
        if self.permutation is None:
            self.permutation = torch.randperm(self.size, generator=self.generator)
        share = self.batch_size // self.world_size
        start = step * self.batch_size + self.rank * share
        return self.permutation[start:start + share]

    def advance(self) -> None:
        """One step taken: the next one, or the next epoch's first."""
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step, self.permutation = self.epoch + 1, 0, None

    def next_batch(self) -> torch.Tensor:
        """The next batch's row indices (int64, CPU); advances the position."""
        batch = self._indices(self.step)
        self.advance()
        return batch

    #: Bump when :meth:`state_dict`'s layout changes; :meth:`load_state_dict` refuses any other.
    STATE_VERSION = 1

    def state_dict(self) -> dict[str, Any]:
        """Where this sampler is, and what it was made for: everything an exact resume needs."""
        return {"version": self.STATE_VERSION, "rows": self.size, "batch_size": self.batch_size,
                "world_size": self.world_size, "rank": self.rank, "epoch": self.epoch, "step": self.step,
                "permutation": None if self.permutation is None else self.permutation.clone(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`; refuse a state of another version, world or dataset, naming what differs."""
        if state.get("version") != self.STATE_VERSION:
            raise IntegrityError(f"sampler state version {state.get('version')!r}; this version reads {self.STATE_VERSION}")
        if (state.get("world_size"), state.get("rank")) != (self.world_size, self.rank):
            raise IntegrityError(
                f"sampler state of rank {state.get('rank')} of {state.get('world_size')} process(es) cannot resume rank "
                f"{self.rank} of {self.world_size}: the batches each rank takes depend on the world size")
        for name, mine in (("rows", self.size), ("batch_size", self.batch_size)):
            if state.get(name) != mine:
                raise IntegrityError(f"sampler state for {name} {state.get(name)!r} cannot resume a sampler of {mine}")
        self.restore(int(state["epoch"]), int(state["step"]), state["permutation"], state["generator"])

    def restore(self, epoch: int, step: int, permutation: torch.Tensor | None, generator_state: torch.Tensor) -> None:
        """Put the sampler back at a checkpointed position; refuse a position that cannot be."""
        if not 0 <= step < self.steps_per_epoch or epoch < 0:
            raise IntegrityError(f"sampler position epoch {epoch} step {step} is outside 0..{self.steps_per_epoch - 1}")
        if permutation is None and step > 0:
            raise IntegrityError(f"sampler position step {step} is mid-epoch but no permutation was saved")
        if permutation is not None and not torch.equal(torch.sort(permutation).values, torch.arange(self.size)):
            raise IntegrityError(f"saved permutation is not a permutation of {self.size} rows")
        self.generator.set_state(generator_state)
        self.epoch, self.step = epoch, step
        self.permutation = None if permutation is None else permutation.clone()


def _checked_ids(row_ids: object) -> tuple[str, ...]:
    if isinstance(row_ids, str) or not isinstance(row_ids, (tuple, list)):
        raise InvalidDataset("row_ids", f"must be a tuple of strings, got {type(row_ids).__name__}")
    seen: set[str] = set()
    for row, row_id in enumerate(row_ids):
        if not isinstance(row_id, str) or not row_id:
            raise InvalidDataset("row_ids", f"row {row} is {row_id!r}, not a non-empty string")
        if row_id in seen:
            raise InvalidDataset("row_ids", f"row id {row_id!r} is duplicated (again at row {row})")
        seen.add(row_id)
    return tuple(row_ids)


def _frozen(array: np.ndarray) -> np.ndarray:
    copy = np.array(array, copy=True, order="C")
    copy.flags.writeable = False
    return copy


def _describe(value: object) -> str:
    return f"{value.dtype} array" if isinstance(value, np.ndarray) else type(value).__name__
