"""The dataset API: a project declares how its events fold into rows; evp does the rest.

A dataset is a class::

    class Scores(Dataset):
        name = "scores"
        version = 1                      # bump whenever the fold changes
        row_id = "item_id"               # the event field naming the row
        columns = (Column("features", "float32", (30,)), Column("target", "float64"))

        @handles("ItemMeasured")
        def measured(self, event: SourceEvent, row: Row) -> None:
            row.set(features=event.data["features"])

        @handles("ItemScored")
        def scored(self, event: SourceEvent, row: Row) -> None:
            row.set(target=event.data["score"])

        @handles("ItemWithdrawn")
        def withdrawn(self, event: SourceEvent, row: Row) -> None:
            row.remove()

The contract of a fold (:meth:`Dataset.fold` via :class:`Fold`):

1. records come in the order a snapshot pinned them (partition by partition, offset
   order), relay duplicates already dropped; a record whose event type (short or full
   name) has no handler is counted and ignored;
2. for a handled record, evp opens its personal fields (the handler sees plaintext; a
   forgotten subject's personal fields read as :data:`REDACTED`, and a dataset should then
   ``row.remove()`` or skip the row: erased data must not reach a shard);
3. evp reads the row id from the field named ``row_id`` (InvalidDataset naming the field
   and the event when it is missing or not a non-empty string) and hands the handler a
   :class:`Row` bound to it;
4. a handler changes that row only through :meth:`Row.put` (replace the whole row),
   :meth:`Row.set` (change some columns, creating the row) and :meth:`Row.remove`; every
   value is checked against its column's dtype and shape, naming the column and the event;
5. at the end, the rows that have a value in **every** column form the table, in row-id
   order; rows still missing a column (a scan never diagnosed, a correction of a row that
   was removed) are left out and counted as ``incomplete_rows``.

Handlers must be deterministic functions of the events they get: no clocks, no random
numbers, no outside state. The snapshot's content hash covers the dataset's name,
version, columns and rows, so a fold that changes without a version bump is caught by
``evp snapshot verify``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np

from events.errors import InvalidDataset
from events.privacy.personal import REDACTED
from trainer.data import Column, Table

__all__ = ["REDACTED", "Column", "Dataset", "Fold", "Row", "SourceEvent", "content_hash", "handles"]

_HANDLES = "__evp_handles__"
Handler = Callable[[Any, "SourceEvent", "Row"], None]
H = TypeVar("H", bound=Callable[..., None])


def handles(*event_types: str) -> Callable[[H], H]:
    """Mark a dataset method as the handler of ``event_types`` (short names like
    ``"ItemScored"`` or full ones like ``"shop.ItemScored"``)."""
    if not event_types or not all(isinstance(t, str) and t for t in event_types):
        raise InvalidDataset("handles", f"needs at least one event type name, got {event_types!r}")

    def mark(method: H) -> H:
        setattr(method, _HANDLES, (*getattr(method, _HANDLES, ()), *event_types))
        return method

    return mark


@dataclass(frozen=True)
class SourceEvent:
    """What a handler sees of one record: its type, plaintext data and coordinates."""

    type: str  #: full name, e.g. "shop.ItemScored"
    data: Mapping[str, Any]
    stream_id: str
    version: int
    actor: str
    occurred_at: str
    partition: int
    offset: int

    @property
    def where(self) -> str:
        return f"{self.type} at partition {self.partition} offset {self.offset}"


class Row:
    """One row while folding, bound to its id. Changes are checked against the columns."""

    def __init__(self, fold: Fold, row_id: str, event: SourceEvent) -> None:
        self._fold, self.row_id, self._event = fold, row_id, event

    @property
    def exists(self) -> bool:
        """Whether the row has any value yet (it may still lack some columns)."""
        return self.row_id in self._fold.rows

    def get(self, column: str) -> Any:
        """The row's current value of ``column`` (a numpy scalar or array), or None."""
        self._fold.column(column, self._event)
        return self._fold.rows.get(self.row_id, {}).get(column)

    def put(self, **values: Any) -> None:
        """Replace the whole row with ``values`` (columns not given become unset)."""
        self._fold.rows[self.row_id] = self._checked(values)

    def set(self, **values: Any) -> None:
        """Set the given columns, keeping the others; creates the row if it does not exist."""
        self._fold.rows.setdefault(self.row_id, {}).update(self._checked(values))

    def remove(self) -> None:
        """Drop the row (nothing happens if it does not exist)."""
        self._fold.rows.pop(self.row_id, None)

    def _checked(self, values: Mapping[str, Any]) -> dict[str, np.ndarray]:
        where = f"row {self.row_id!r} from {self._event.where}"
        return {name: self._fold.column(name, self._event).coerce(value, where) for name, value in values.items()}


class Dataset:
    """Base class of a project's datasets; see the module docstring for the contract.

    Subclasses set ``name``, ``version``, ``row_id`` and ``columns`` and mark handlers
    with :func:`handles`. :meth:`check` validates the declaration (evp calls it before
    folding), naming the attribute at fault.
    """

    name: ClassVar[str]
    version: ClassVar[int]
    row_id: ClassVar[str]
    columns: ClassVar[tuple[Column, ...]]

    @classmethod
    def check(cls) -> None:
        label = f"dataset {cls.__module__}:{cls.__qualname__}"
        for attribute in ("name", "version", "row_id", "columns"):
            if not hasattr(cls, attribute):
                raise InvalidDataset(attribute, f"{label} does not declare {attribute!r}")
        if not isinstance(cls.name, str) or not cls.name:
            raise InvalidDataset("name", f"{label}: must be a non-empty string, got {cls.name!r}")
        if isinstance(cls.version, bool) or not isinstance(cls.version, int) or cls.version < 1:
            raise InvalidDataset("version", f"{label}: must be a whole number >= 1, got {cls.version!r}")
        if not isinstance(cls.row_id, str) or not cls.row_id:
            raise InvalidDataset("row_id", f"{label}: must name the event field holding the row id")
        if not cls.columns or not all(isinstance(c, Column) for c in cls.columns):
            raise InvalidDataset("columns", f"{label}: must be a non-empty tuple of Column")
        names = [c.name for c in cls.columns]
        if len(set(names)) != len(names):
            raise InvalidDataset("columns", f"{label}: column names {names} repeat")
        if not cls.handlers():
            raise InvalidDataset("handles", f"{label}: no method is marked with @handles(...)")

    @classmethod
    def handlers(cls) -> dict[str, Handler]:
        """Event type name -> handler, from the methods marked with :func:`handles`."""
        found: dict[str, Handler] = {}
        for klass in reversed(cls.__mro__):
            for attribute in vars(klass).values():
                for event_type in getattr(attribute, _HANDLES, ()):
                    found[event_type] = attribute
        return found

    @classmethod
    def identity(cls) -> dict[str, Any]:
        """What the content hash covers besides the rows: name, version, row id and columns."""
        return {"name": cls.name, "version": cls.version, "row_id": cls.row_id,
                "columns": [c.describe() for c in cls.columns]}


@dataclass
class Fold:
    """The running state of one dataset's fold over pinned records."""

    dataset: Dataset
    rows: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    records: int = 0  #: records read (after dedupe), handled or not
    handled: int = 0
    schema_ids: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        type(self.dataset).check()
        self._handlers = type(self.dataset).handlers()
        self._columns = {c.name: c for c in self.dataset.columns}

    def wants(self, event_type: str) -> Handler | None:
        """The handler for ``event_type`` (a full name), by full or short name."""
        return self._handlers.get(event_type) or self._handlers.get(event_type.rsplit(".", 1)[-1])

    def column(self, name: str, event: SourceEvent) -> Column:
        try:
            return self._columns[name]
        except KeyError:
            raise InvalidDataset(name, f"{event.where}: not a column of dataset {self.dataset.name!r} "
                                       f"(columns: {', '.join(self._columns)})") from None

    def apply(self, event: SourceEvent, handler: Handler) -> None:
        """Step 3-4 of the contract: bind the row and run the handler."""
        row_id = event.data.get(self.dataset.row_id)
        if not isinstance(row_id, str) or not row_id or row_id == REDACTED:
            raise InvalidDataset(self.dataset.row_id, f"{event.where}: the row id field is {row_id!r}, "
                                                      "not a non-empty string")
        self.handled += 1
        handler(self.dataset, event, Row(self, row_id, event))

    @property
    def incomplete_rows(self) -> int:
        return sum(1 for values in self.rows.values() if len(values) != len(self._columns))

    def table(self) -> Table:
        """Step 5: complete rows, in row-id order."""
        columns = tuple(self.dataset.columns)
        ids = sorted(i for i, values in self.rows.items() if len(values) == len(columns))
        if not ids:
            return Table.empty(columns)
        return Table(columns, tuple(ids),
                     {c.name: np.stack([self.rows[i][c.name] for i in ids]).astype(c.dtype) for c in columns})


def content_hash(identity: Mapping[str, Any], table: Table) -> str:
    """sha256 over the dataset's identity and its rows, in row-id order.

    1. the identity (name, version, row id, columns) as canonical JSON, length-prefixed;
    2. the row count, then every row id, each length-prefixed;
    3. every column's whole array, C order, little endian, in column order.

    Lengths are fixed by (1) and (2), so no two different tables give the same bytes.
    """
    ordered = table.sorted_by_id()
    digest = hashlib.sha256()
    head = json.dumps(dict(identity), sort_keys=True, separators=(",", ":")).encode()
    digest.update(len(head).to_bytes(8, "big") + head)
    digest.update(len(ordered).to_bytes(8, "big"))
    for row_id in ordered.row_ids:
        raw = row_id.encode("utf-8")
        digest.update(len(raw).to_bytes(8, "big") + raw)
    for column in ordered.columns:
        digest.update(np.ascontiguousarray(ordered[column.name], dtype=column.numpy_dtype).tobytes())
    return digest.hexdigest()


def fold_events(dataset: Dataset, events: Iterable[SourceEvent]) -> Table:
    """Fold plaintext events without Kafka (for tests and for checking a dataset's logic)."""
    fold = Fold(dataset)
    for event in events:
        fold.records += 1
        handler = fold.wants(event.type)
        if handler is not None:
            fold.apply(event, handler)
    return fold.table()
