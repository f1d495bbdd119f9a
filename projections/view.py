"""Views as declarations: a team says what a view holds, evp does the rest for every view alike.

A view is a class::

    class Accounts(View):
        name = "accounts"                        # what `evp projections ... NAME` calls it
        key = "account_id"                       # the primary-key column
        columns = {
            "account_id": "text",
            "email": personal(subject="account_id"),   # sealed personal data of that subject
            "plan": "text",
            "opened_at": "timestamptz",
        }
        analyst = ("account_id", "plan", "opened_at")   # what the masked analyst view shows

        @on("AccountOpened")
        def opened(self, row: Row | None, record: LogRecord) -> Row | None:
            return {"email": sealed(record, "email"), "plan": record.data["plan"],
                    "opened_at": occurred_at(record)}

What evp does with it (:mod:`projections.runner`, :mod:`projections.tables`): batching with
COPY, exactly-once offsets, dedupe by stream version, dead letters, rebuild and swap,
redaction on erasure, masked views and grants (:mod:`projections.roles`).

The handler contract, per record whose type a handler is declared for (by short name,
``"AccountOpened"``, or full name, ``"shop.AccountOpened"``):

1. the runner reads the row key from the record's ``key`` field (``@on(..., key="...")``,
   by default the field named like the key column); a missing or empty key refuses the
   record (it is dead-lettered);
2. the handler gets the current row (a dict of the declared columns, personal columns as
   :class:`Sealed` or None) or None when there is no row, and the record;
3. it returns the new row, or None to delete it. Columns it leaves out become NULL; the key
   column is filled in by the runner. It may raise :class:`events.errors.InvalidEvent` to
   refuse a record the view cannot hold: that record is dead-lettered, the row stays as it was;
4. a returned row with an undeclared column, another key, or anything but :class:`Sealed`
   (or None) in a personal column is a bug in the view: :class:`ViewDefinitionError` stops
   the runner, naming the handler (every record would hit it, so none is dead-lettered);
5. records of other types are ignored (their stream versions still count as applied).

Why "current row in, new row out" rather than SQL or a diff: a handler is then a pure
function the runner can call many times in memory, so a batch of thousands of records
costs one SELECT, one COPY, one merge and one DELETE, and a rebuild is the same fold from
the start. Handlers must therefore be deterministic and use only the row and the record.

Personal columns hold what arrived: the sealed ``"evp1:..."`` string, plus the event id,
event type and field it was sealed for (its associated data), so a reader with the keyring
can open it later (:meth:`View.open`). When the subject is forgotten, every personal
column whose subject column names them becomes NULL and the row's ``erased`` flag is set,
also for rows that arrive after the erasure. No view writes that by hand.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, ClassVar, TypeVar

from events.errors import ConfigurationError, CryptoError, InvalidEvent, NotFound
from events.privacy import cipher
from events.privacy.keyring import Keyring
from events.privacy.personal import open_fields
from events.privacy.policy import Policy
from events.schema.catalog import Catalog
from events.store.log import LogRecord

#: A view row: column name -> value (personal columns: :class:`Sealed` or None).
Row = dict[str, Any]
Handler = Callable[[Any, "Row | None", LogRecord], "Row | None"]
H = TypeVar("H", bound=Callable[..., Any])

#: The platform's erasure event: the runner redacts on it, for every view.
FORGOTTEN = "evp.platform.SubjectForgotten"
#: The generated flag of a view with personal columns: some personal column was redacted.
ERASED = "erased"
#: Generated columns next to each personal column ``c``: ``c_event_id``, ``c_event_type``, ``c_field``.
PROVENANCE = ("event_id", "event_type", "field")
MASKED_SUFFIX = "_masked"
KEY_TYPES = ("text", "integer", "bigint")

_MAX_IDENTIFIER = 63
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]*$")
_SQL_TYPE = re.compile(r"^[a-z][a-z0-9_ ]*(\(\s*\d+\s*(,\s*\d+\s*)?\))?(\[\])*$")
_HANDLERS_ATTRIBUTE = "__evp_on__"


class ViewDefinitionError(ConfigurationError):
    """A view declaration (or what one of its handlers returned) is wrong: a bug, not bad data.

    It stops the runner instead of dead-lettering, because every record would hit it.
    """

    def __init__(self, view: str, field: str, reason: str) -> None:
        self.view, self.field, self.reason = view, field, reason
        super().__init__(f"view {view!r}: {field}: {reason}")


# -- the pieces of a declaration -----------------------------------------------------------
@dataclass(frozen=True)
class Personal:
    """A column of sealed personal data; ``subject`` is the column holding whose data it is."""

    subject: str


def personal(subject: str) -> Personal:
    """Declare a personal column: ``"email": personal(subject="account_id")``."""
    return Personal(subject)


@dataclass(frozen=True)
class Sealed:
    """A personal value as it arrived, with what opening it needs (the cipher's associated data)."""

    value: str  #: ``"evp1:..."``
    event_id: uuid.UUID
    event_type: str  #: full name, as sealed
    field: str
    #: whom it was sealed for, when the writer's policy was at hand (not stored: the row's subject column is)
    subject: str | None = dataclasses.field(default=None, compare=False)

    def open(self, subject: str, keyring: Keyring, policy: Policy | None = None) -> Any:
        """The plaintext, for ``subject`` (the subject it was sealed for).

        1. the subject's data key opens the value, bound to (event id, event type, field, subject);
        2. without ``policy`` the plaintext is read as UTF-8 text (a string field); with the
           event type's policy (``catalog.policy(sealed.event_type)``) it is decoded to the
           field's declared type (a date, a number, an array).

        Raises :class:`events.errors.KeyErased` for a forgotten subject, and
        :class:`events.errors.CryptoError` when the subject has no key or is not the one it
        was sealed for, or the value was tampered with.
        """
        try:
            key = keyring.data_key(subject, create=False)
        except NotFound as err:
            raise CryptoError(f"{self.event_type} field {self.field!r}: subject {subject!r} has no data key") from err
        if policy is None:
            return cipher.open_text(key, self.value, cipher.field_aad(str(self.event_id), self.event_type, self.field, subject))
        spec = next((f for f in policy.personal if f.name == self.field), None)
        if spec is None:
            raise CryptoError(f"{policy.event_type}: field {self.field!r} is not personal in this policy")
        opened = open_fields(policy, str(self.event_id), {self.field: self.value, spec.subject_field: subject}, keyring)
        return opened[self.field]


def sealed(record: LogRecord, field: str) -> Sealed | None:
    """The personal ``field`` of ``record`` for a personal column; None when the field is null.

    Raises :class:`InvalidEvent` (the record is dead-lettered) when the value is not sealed:
    a view stores only ciphertext.
    """
    value = record.data.get(field)
    if value is None:
        return None
    if not isinstance(value, str) or not cipher.is_sealed(value):
        raise InvalidEvent(record.event_type, field, "personal data arrived unencrypted; a view stores only ciphertext")
    spec = next((f for f in record.policy.personal if f.name == field), None) if record.policy is not None else None
    subject = record.data.get(spec.subject_field) if spec is not None else None
    return Sealed(value, record.event_id, record.event_type, field, subject if isinstance(subject, str) else None)


def occurred_at(record: LogRecord) -> datetime | None:
    """The record's ``evp.occurred_at`` header as a datetime (None when absent).

    Raises :class:`InvalidEvent` naming the header when it is not ISO 8601.
    """
    if not record.occurred_at:
        return None
    try:
        parsed = datetime.fromisoformat(record.occurred_at)
    except ValueError as err:
        raise InvalidEvent(record.event_type, "evp.occurred_at", f"header {record.occurred_at!r} is not ISO 8601") from err
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class _On:
    event_types: tuple[str, ...]
    key: str | None


def on(*event_types: str, key: str | None = None) -> Callable[[H], H]:
    """Mark a method as the handler of ``event_types`` (short or full names).

    ``key`` names the record field holding the row key (default: the key column's name).
    """
    if not event_types or not all(isinstance(t, str) and t for t in event_types):
        raise ConfigurationError(f"@on needs one or more event type names, got {event_types!r}")

    def mark(function: H) -> H:
        setattr(function, _HANDLERS_ATTRIBUTE, _On(tuple(event_types), key))
        return function

    return mark


# -- the compiled declaration --------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    name: str
    sql_type: str  #: ``text`` for a personal column (it holds sealed text)
    subject: str | None = None  #: personal columns: the column naming their subject

    @property
    def personal(self) -> bool:
        return self.subject is not None


@dataclass(frozen=True)
class Layout:
    """A view's tables as placed in one PostgreSQL schema: everything the SQL is generated from."""

    view: str
    schema: str
    table: str
    key: Column
    columns: tuple[Column, ...]  #: declared order, the key included
    analyst: tuple[str, ...]
    indexes: tuple[str, ...]

    @functools.cached_property
    def personal(self) -> tuple[Column, ...]:
        return tuple(c for c in self.columns if c.personal)

    @functools.cached_property
    def names(self) -> frozenset[str]:
        """Every declared column's name (computed once: the fold checks each row against it)."""
        return frozenset(c.name for c in self.columns)

    @property
    def masked(self) -> str:
        """The analyst's view of the table: only :attr:`analyst` columns, plus ``erased``."""
        return self.table + MASKED_SUFFIX

    def subjects(self) -> dict[str, tuple[str, ...]]:
        """subject column -> the personal columns it governs."""
        out: dict[str, list[str]] = {}
        for column in self.personal:
            assert column.subject is not None
            out.setdefault(column.subject, []).append(column.name)
        return {s: tuple(cs) for s, cs in out.items()}

    def stored(self) -> tuple[tuple[str, str], ...]:
        """(name, SQL type) of every table column, generated ones included, in table order."""
        out: list[tuple[str, str]] = []
        for column in self.columns:
            out.append((column.name, column.sql_type))
            if column.personal:
                out += [(provenance(column.name, part), "uuid" if part == "event_id" else "text") for part in PROVENANCE]
        if self.personal:
            out.append((ERASED, "boolean"))
        return tuple(out)

    def with_schema(self, schema: str) -> Layout:
        _check_identifier(self.view, "schema", schema)
        return Layout(self.view, schema, self.table, self.key, self.columns, self.analyst, self.indexes)


def provenance(column: str, part: str) -> str:
    """The generated column holding ``part`` (event_id, event_type, field) of a personal column."""
    return f"{column}_{part}"


# -- the base class ------------------------------------------------------------------------
class View:
    """Base class of a declared view; subclasses are checked when they are defined.

    Declare, as class attributes: ``name``, ``key``, ``columns`` (name -> SQL type or
    :func:`personal`), optionally ``schema`` (default ``<name>_view``), ``table`` (default
    ``name``), ``analyst`` (columns the masked view shows, default none) and ``indexes``
    (extra indexed columns; subject columns are always indexed). A subclass meant only to
    be subclassed again says ``class Base(View, abstract=True)``.

    Raises :class:`ViewDefinitionError` at class definition, naming the view and the bad
    attribute, column or handler.
    """

    name: ClassVar[str]
    key: ClassVar[str]
    columns: ClassVar[Mapping[str, str | Personal]]
    schema: ClassVar[str | None] = None
    table: ClassVar[str | None] = None
    analyst: ClassVar[tuple[str, ...]] = ()
    indexes: ClassVar[tuple[str, ...]] = ()

    _layout: ClassVar[Layout]
    _handlers: ClassVar[dict[str, tuple[str, Handler]]]

    def __init_subclass__(cls, abstract: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if abstract:
            return
        cls._layout = _compile(cls)
        cls._handlers = _collect_handlers(cls, cls._layout)

    # -- what the runner asks ------------------------------------------------------------
    @property
    def default_schema(self) -> str:
        return self._layout.schema

    def layout(self, schema: str | None = None) -> Layout:
        """The tables of this view in ``schema`` (default: the declared one)."""
        return self._layout if schema is None or schema == self._layout.schema else self._layout.with_schema(schema)

    def handler_for(self, event_type: str) -> tuple[str, Callable[[Row | None, LogRecord], Row | None]] | None:
        """(key field, bound handler) for a record type, by full then short name; None: ignored."""
        found = self._handlers.get(event_type) or self._handlers.get(event_type.rsplit(".", 1)[-1])
        if found is None:
            return None
        key_field, function = found
        return key_field, functools.partial(function, self)

    # -- what readers ask ----------------------------------------------------------------
    def open(self, row: Mapping[str, Any], column: str, keyring: Keyring, catalog: Catalog | None = None) -> Any:
        """The plaintext of personal ``column`` of ``row`` (as :func:`projections.tables.read_rows` gives it).

        1. None when the value is NULL (never set, or redacted after an erasure);
        2. otherwise the keyring's data key of the subject in the row's subject column opens
           it: as text, or, given a ``catalog`` that knows the event type, as the field's
           declared type (:meth:`Sealed.open`).

        Raises :class:`ViewDefinitionError` for a column that is not personal,
        :class:`events.errors.KeyErased` for a forgotten subject whose row is not redacted
        yet, :class:`events.errors.CryptoError` for a value that does not open.
        """
        spec = next((c for c in self._layout.columns if c.name == column), None)
        if spec is None or spec.subject is None:
            raise ViewDefinitionError(self.name, column, "is not a personal column of this view")
        value = row.get(column)
        if value is None:
            return None
        if not isinstance(value, Sealed):
            raise ViewDefinitionError(self.name, column, f"expected a Sealed value, got {type(value).__name__}")
        policy = catalog.policy(value.event_type) if catalog is not None else None
        return value.open(str(row[spec.subject]), keyring, policy)


def _compile(cls: type[View]) -> Layout:
    name = getattr(cls, "name", None)
    if not isinstance(name, str):
        raise ViewDefinitionError(cls.__qualname__, "name", "declare the view's name (a lower-case identifier)")
    _check_identifier(name, "name", name)
    columns_decl = getattr(cls, "columns", None)
    if not isinstance(columns_decl, Mapping) or not columns_decl:
        raise ViewDefinitionError(name, "columns", "declare a non-empty mapping of column name -> SQL type or personal(...)")
    columns: list[Column] = []
    for column, kind in columns_decl.items():
        _check_identifier(name, f"column {column!r}", column)
        if isinstance(kind, Personal):
            columns.append(Column(column, "text", kind.subject))
        elif isinstance(kind, str) and _SQL_TYPE.match(kind.strip().lower()):
            columns.append(Column(column, kind.strip().lower()))
        else:
            raise ViewDefinitionError(name, f"column {column!r}", f"type must be an SQL type name or personal(...), got {kind!r}")
    by_name = {c.name: c for c in columns}
    key_name = getattr(cls, "key", None)
    if not isinstance(key_name, str) or key_name not in by_name:
        raise ViewDefinitionError(name, "key", f"must name one of the columns {sorted(by_name)}, got {key_name!r}")
    key = by_name[key_name]
    if key.personal or key.sql_type not in KEY_TYPES:
        raise ViewDefinitionError(name, "key", f"column {key_name!r} must be one of {list(KEY_TYPES)}, not personal")
    for column in columns:
        if column.subject is None:
            continue
        subject = by_name.get(column.subject)
        if subject is None or subject.personal or subject.sql_type != "text":
            raise ViewDefinitionError(
                name, f"column {column.name!r}", f"subject {column.subject!r} must be a non-personal text column of the view"
            )
    generated = {provenance(c.name, p) for c in columns if c.personal for p in PROVENANCE}
    if any(c.personal for c in columns):
        generated.add(ERASED)
    clash = sorted(generated & set(by_name))
    if clash:
        raise ViewDefinitionError(name, f"column {clash[0]!r}", "is a name evp generates for personal columns; rename it")
    analyst = tuple(getattr(cls, "analyst", ()))
    for column in analyst:
        if column not in by_name:
            raise ViewDefinitionError(name, "analyst", f"{column!r} is not a column of the view")
        if by_name[column].personal:
            raise ViewDefinitionError(name, "analyst", f"{column!r} is personal: analysts never see personal columns")
    indexes = tuple(getattr(cls, "indexes", ()))
    for column in indexes:
        if column not in by_name:
            raise ViewDefinitionError(name, "indexes", f"{column!r} is not a column of the view")
    table = getattr(cls, "table", None) or name
    schema = getattr(cls, "schema", None) or f"{name}_view"
    _check_identifier(name, "table", table)
    _check_identifier(name, "table", table + MASKED_SUFFIX)
    _check_identifier(name, "schema", schema)
    return Layout(name, schema, table, key, tuple(columns), analyst, indexes)


def _collect_handlers(cls: type[View], layout: Layout) -> dict[str, tuple[str, Handler]]:
    handlers: dict[str, tuple[str, Handler]] = {}
    for klass in reversed(cls.__mro__):  # a subclass's handler replaces its base's
        here: dict[str, str] = {}
        for attribute, function in vars(klass).items():
            mark = getattr(function, _HANDLERS_ATTRIBUTE, None)
            if not isinstance(mark, _On):
                continue
            for event_type in mark.event_types:
                if event_type in (FORGOTTEN, FORGOTTEN.rsplit(".", 1)[-1]):
                    raise ViewDefinitionError(layout.view, attribute,
                                              "erasures are handled by evp for every view; remove the handler")
                if event_type in here:
                    raise ViewDefinitionError(layout.view, attribute, f"{event_type!r} already has handler {here[event_type]!r}")
                here[event_type] = attribute
                handlers[event_type] = (mark.key or layout.key.name, function)
    return handlers


def _check_identifier(view: str, what: str, value: str) -> None:
    if not isinstance(value, str) or not _IDENTIFIER.match(value) or len(value.encode()) > _MAX_IDENTIFIER:
        raise ViewDefinitionError(
            view, what, f"{value!r} must be a lower-case SQL identifier (letters, numbers, '_') of at most {_MAX_IDENTIFIER} bytes"
        )
