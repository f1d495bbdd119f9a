"""Erasure lineage: every place that holds a data subject's data, and in what state.

``evp forget --dry-run SUBJECT`` lists it before an erasure, ``evp forget --report SUBJECT``
at any time (after the erasure: what became unreadable, what was redacted, and what still
holds plaintext that no key deletion reaches).

The report is assembled from *sources*, one per layer, found through the entry-point group
``evp.lineage`` (as the command groups are, so this base layer imports neither layer above
it). A source is a callable::

    def holdings(settings: Settings, project: Project | None, subject_id: str) -> list[Holding]

The contract of a source:

1. it looks only, never changes anything, and opens what it needs itself (an
   :class:`~events.store.client.EventStore`, a database connection, files);
2. it covers the subject and its look-alike ids (:func:`subject_ids`; :func:`trace_subject`
   gives both, with every event concerning them and the state of their keys);
3. it returns one :class:`Holding` per place and state, with ``count > 0``, except that a
   place the erasure emptied may be reported with ``count == 0`` and :data:`REDACTED`;
   a subject the source knows nothing of gives an empty list;
4. a state says what is true of the bytes now (:data:`STATES`): :data:`UNREADABLE` only for
   ciphertext whose key is destroyed, :data:`PLAINTEXT` for anything that holds (or may hold,
   where evp cannot look inside) the subject's personal data decrypted, and the ``detail``
   names what to do about it.

The sources evp ships: ``ledger`` (this module: the data key, unique reservations,
aggregate snapshots, each stream's events in the ledger and their records on the events
topic), ``views`` (:mod:`projections.lineage`: rows of every declared view, per table, and
dead letters), ``training`` (:mod:`trainer.lineage`: snapshots, their shard files and the
runs trained on them) and ``backups`` (:func:`events.ops.backup_set.backup_holdings`: per backup of the set at
``EVP_BACKUP_TARGET``, the subject's events it holds, by state: keys are never in a backup, so
they turn unreadable with the erasure). Adding a source is one more entry point in
``pyproject.toml``::

    [project.entry-points."evp.lineage"]
    mine = "mypackage.lineage:my_holdings"
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from importlib.metadata import entry_points
from typing import Any

from events.errors import LineageError
from events.event import RecordedEvent
from events.privacy import cipher
from events.privacy.keyring import InvalidSubject, PostgresKeyStore, StoredKey, canonical_subject, subject_problem
from events.privacy.policy import Policy
from events.project import Project
from events.settings import Settings
from events.store.aggregate import count_snapshots
from events.store.client import EventStore

#: The entry-point group of lineage sources.
LINEAGE_GROUP = "evp.lineage"
#: The platform's erasure event.
FORGOTTEN_TYPE = "evp.platform.SubjectForgotten"

HOLDS = "holds"  #: personal data sealed under a live key: readable with the keyring; the erasure shreds it
UNREADABLE = "unreadable"  #: personal data sealed under a destroyed key: nothing opens it any more
REDACTED = "redacted"  #: the personal data was removed from this place (cleared, deleted, released, destroyed)
PLAINTEXT = "plaintext"  #: holds (or may hold) the subject's personal data decrypted: no key deletion reaches it
DERIVED = "derived"  #: computed from their plaintext (model weights): no key deletion reaches it
KEPT = "kept"  #: only what is not personal by schema (pseudonymous ids, features, labels): kept by design
STATES = (HOLDS, UNREADABLE, REDACTED, PLAINTEXT, DERIVED, KEPT)
#: States that no erasure reaches: something must be done about them.
UNREACHED = (PLAINTEXT, DERIVED)


@dataclass(frozen=True)
class Holding:
    """One place holding a subject's data, in one state.

    ``where`` starts with the kind of place and names it (``stream order-7``, ``view
    orders (orders_view.orders)``, ``snapshot snap-…``, ``run run-…``, ``keyring``);
    ``kind`` says what is counted there (``events``, ``records``, ``view rows``, ``shard
    files``, …); ``source`` is filled in with the entry point's name by :func:`collect_lineage`.
    """

    where: str
    kind: str
    count: int
    state: str
    detail: str = ""
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"where": self.where, "kind": self.kind, "count": self.count, "state": self.state,
                "detail": self.detail, "source": self.source}


#: ``(settings, project, subject_id) -> holdings``: what an ``evp.lineage`` entry point names.
LineageSource = Callable[[Settings, Project | None, str], Sequence[Holding]]


@dataclass(frozen=True)
class Lineage:
    """A subject's holdings from every source, and the sources that could not be asked."""

    subject_id: str
    holdings: tuple[Holding, ...]
    sources: tuple[str, ...]  #: the sources asked, in order
    unavailable: Mapping[str, str] = field(default_factory=dict)  #: source -> why it could not be loaded

    @property
    def unreached(self) -> tuple[Holding, ...]:
        """Holdings no erasure reaches (:data:`UNREACHED`), each with a count."""
        return tuple(h for h in self.holdings if h.state in UNREACHED and h.count > 0)

    def to_json(self) -> dict[str, Any]:
        return {"subject_id": self.subject_id, "holdings": [h.to_json() for h in self.holdings],
                "sources": list(self.sources), "unavailable": dict(self.unavailable),
                "unreached": len(self.unreached)}


def lineage_sources() -> dict[str, LineageSource | str]:
    """The installed sources by name (sorted); a source that does not import maps to the reason."""
    return installed(LINEAGE_GROUP)


def installed(group: str) -> dict[str, Any]:
    """The entry points of ``group``, loaded, by name (sorted); one that does not import maps
    to the reason, a ``str`` (an optional extra, such as torch for the trainer, is not installed)."""
    found: dict[str, Any] = {}
    for entry in sorted(entry_points(group=group), key=lambda e: e.name):
        try:
            found[entry.name] = entry.load()
        except ImportError as err:
            found[entry.name] = f"{err.name or err} is not installed"
    return found


def collect_lineage(settings: Settings, project: Project | None, subject_id: str,
                    sources: Mapping[str, LineageSource | str] | None = None) -> Lineage:
    """Ask every source (default: :func:`lineage_sources`) where ``subject_id``'s data is.

    1. refuse a look-alike id as :func:`subject_ids` does, before any source runs;
    2. call each source in name order; one that could not be loaded is named in
       ``unavailable`` with the reason, so the report never passes over it in silence;
    3. check what each returned: a list of :class:`Holding` with a known state and a count
       that is not negative, else :class:`LineageError` naming the source and the holding;
    4. stamp each holding with its source's name.
    """
    check_subject_id(subject_id)
    asked: list[str] = []
    holdings: list[Holding] = []
    unavailable: dict[str, str] = {}
    for name, source in (lineage_sources() if sources is None else sources).items():
        if isinstance(source, str):
            unavailable[name] = source
            continue
        answer = source(settings, project, subject_id)
        if not isinstance(answer, (list, tuple)):
            raise LineageError(name, f"returned {type(answer).__name__}, not a list of Holding")
        for holding in answer:
            _check_holding(name, holding)
            holdings.append(replace(holding, source=name))
        asked.append(name)
    return Lineage(subject_id, tuple(holdings), tuple(asked), unavailable)


def _check_holding(source: str, holding: object) -> None:
    if not isinstance(holding, Holding):
        raise LineageError(source, f"returned {holding!r}, not a Holding")
    if holding.state not in STATES:
        raise LineageError(source, f"holding {holding.where!r}: state {holding.state!r} is not one of {', '.join(STATES)}")
    if isinstance(holding.count, bool) or not isinstance(holding.count, int) or holding.count < 0:
        raise LineageError(source, f"holding {holding.where!r}: count {holding.count!r} is not a whole number >= 0")
    if holding.count == 0 and holding.state != REDACTED:
        raise LineageError(source, f"holding {holding.where!r}: a count of 0 is only reported as {REDACTED!r}")


# -- the subject, as the ledger knows them ---------------------------------------------------
def check_subject_id(subject_id: str) -> None:
    """Refuse an id that :func:`~events.privacy.keyring.subject_problem` refuses, naming the id to use."""
    problem = subject_problem(subject_id)
    if problem is not None:
        raise InvalidSubject(subject_id, f"{problem}: forget {canonical_subject(subject_id)!r}, "
                                         "which erases its look-alike ids with it")


def subject_ids(store: EventStore, subject_id: str) -> tuple[str, ...]:
    """``subject_id`` and the look-alike ids stored before ids were checked (the same person).

    Raises :class:`InvalidSubject` for an id that is itself a look-alike (:func:`check_subject_id`).
    """
    check_subject_id(subject_id)
    return (subject_id, *store.keyring.lookalikes(subject_id))


def events_concerning(store: EventStore, ids: Iterable[str]) -> list[RecordedEvent]:
    """Every event concerning any of ``ids``, once each, in log order."""
    found = {e.position: e for s in ids for e in store.ledger.events_concerning(s)}
    return [found[p] for p in sorted(found)]


@dataclass(frozen=True)
class Concerning:
    """One event concerning the subject, decoded but not decrypted."""

    record: RecordedEvent
    data: Mapping[str, Any]  #: personal fields still sealed
    policy: Policy
    personal: tuple[str, ...]  #: its personal fields sealed for one of the subject's ids
    blind_indexes: tuple[str, ...]  #: blind-index values of those fields (HMACs, never plaintext)

    @property
    def fields(self) -> tuple[str, ...]:
        """``Type.field`` of each personal field, for details (short type name)."""
        short = self.record.event_type.rsplit(".", 1)[-1]
        return tuple(f"{short}.{name}" for name in self.personal)


@dataclass(frozen=True)
class SubjectTrace:
    """What the ledger and the keyring know of a subject: ids, events, keys."""

    subject_id: str
    ids: tuple[str, ...]  #: the subject and its look-alike ids
    events: tuple[Concerning, ...]  #: in log order
    keys: Mapping[str, StoredKey]  #: the ids that have a key row (live, or a tombstone)

    @property
    def forgotten(self) -> bool:
        """Every id with a key row has only a tombstone (and there is one)."""
        return bool(self.keys) and all(k.erased for k in self.keys.values())

    @property
    def erased_at(self) -> datetime | None:
        """When the last of the subject's keys was destroyed; None while one lives."""
        if not self.forgotten:
            return None
        times = [k.erased_at for k in self.keys.values() if k.erased_at is not None]
        return max(times) if times else None

    def sealed_state(self, subject: str) -> str:
        """:data:`HOLDS` while ``subject``'s key lives, else :data:`UNREADABLE`."""
        key = self.keys.get(subject)
        return HOLDS if key is not None and not key.erased else UNREADABLE

    def state_of(self, event: Concerning) -> str:
        """:data:`HOLDS` or :data:`UNREADABLE` for an event carrying their personal fields, else :data:`KEPT`."""
        if not event.personal:
            return KEPT
        owners = {str(event.data.get(f.subject_field)) for f in event.policy.personal if f.name in event.personal}
        return HOLDS if any(self.sealed_state(s) == HOLDS for s in owners) else UNREADABLE

    @property
    def erasures(self) -> tuple[Concerning, ...]:
        """The ``SubjectForgotten`` events of the subject's ids."""
        return tuple(e for e in self.events if e.record.event_type == FORGOTTEN_TYPE)

    @property
    def blind_indexes(self) -> frozenset[str]:
        return frozenset(v for e in self.events for v in e.blind_indexes)


def trace_subject(store: EventStore, subject_id: str) -> SubjectTrace:
    """The subject's ids, every event concerning them (decoded, sealed) and their key rows."""
    ids = subject_ids(store, subject_id)
    events = tuple(_concerning(store, record, ids) for record in events_concerning(store, ids))
    keys = PostgresKeyStore(store.settings.keyring_url)
    try:
        rows = {s: k for s in ids if (k := keys.get(s)) is not None}
    finally:
        keys.close()
    return SubjectTrace(subject_id, ids, events, rows)


def _concerning(store: EventStore, record: RecordedEvent, ids: Sequence[str]) -> Concerning:
    decoded = store.codec.decode(record.value)
    data, policy = decoded.datum, decoded.policy
    personal = tuple(f.name for f in policy.personal
                     if data.get(f.name) is not None and data.get(f.subject_field) in ids)
    indexes = tuple(str(data[target]) for target, source in policy.blind_indexes
                    if source in personal and isinstance(data.get(target), str) and not cipher.is_sealed(data[target]))
    return Concerning(record, data, policy, personal, indexes)


def group_by(items: Iterable[Any], key: Callable[[Any], Any]) -> dict[Any, list[Any]]:
    """``items`` grouped by ``key``, groups and their members in first-seen order."""
    groups: dict[Any, list[Any]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


def listed(names: Iterable[str], limit: int = 4) -> str:
    """``a, b, c`` — at most ``limit`` distinct names, then how many more."""
    unique = list(dict.fromkeys(names))
    shown = ", ".join(unique[:limit])
    return shown + (f" and {len(unique) - limit} more" if len(unique) > limit else "")


# -- the ledger's source ---------------------------------------------------------------------
def ledger_holdings(settings: Settings, project: Project | None, subject_id: str) -> list[Holding]:
    """The ``ledger`` source: data key, reservations, aggregate snapshots, streams, topic records.

    1. the keyring: the subject's data key (:data:`HOLDS`), or its tombstone (:data:`REDACTED`);
    2. unique reservations (blind indexes of their unique values), released by the erasure;
    3. aggregate snapshots of the streams their events touch: decrypted state
       (:data:`PLAINTEXT`), deleted by the erasure;
    4. per stream, the events concerning them: those carrying their personal fields
       (:data:`HOLDS` or :data:`UNREADABLE`) apart from the rest (:data:`KEPT`);
    5. the same events' records on the events topic (the published ones; the others wait in
       the outbox and are counted in the detail).
    """
    with EventStore.open(settings) as store:
        trace = trace_subject(store, subject_id)
        reservations = sum(store.ledger.reservations_of(s) for s in trace.ids)
        streams = sorted({e.record.stream_id for e in trace.events})
        aggregates = count_snapshots(store, streams)
    out = _key_holdings(trace)
    if reservations:
        out.append(Holding("ledger", "reservations", reservations, HOLDS,
                           "blind indexes of their unique values (evp_reservations); the erasure releases them"))
    elif trace.forgotten:
        out.append(Holding("ledger", "reservations", 0, REDACTED, "none left: the erasure released them"))
    if aggregates:
        out.append(Holding("ledger", "aggregate snapshots", aggregates, PLAINTEXT,
                           "decrypted aggregate state of their streams (evp_aggregate_snapshots); the erasure deletes it"))
    elif trace.forgotten and streams:
        out.append(Holding("ledger", "aggregate snapshots", 0, REDACTED, "none left: the erasure deletes them"))
    for stream, events in group_by(trace.events, lambda e: e.record.stream_id).items():
        for state, group in group_by(events, trace.state_of).items():
            out.append(Holding(f"stream {stream}", "events", len(group), state, _events_detail(state, group)))
    for state, group in group_by(trace.events, trace.state_of).items():
        published = [e for e in group if e.record.offset is not None]
        waiting = len(group) - len(published)
        detail = _events_detail(state, group) + (f"; {waiting} more wait in the outbox" if waiting else "")
        if published:
            out.append(Holding(f"topic {settings.events_topic}", "records", len(published), state, detail))
    return out


def _key_holdings(trace: SubjectTrace) -> list[Holding]:
    out: list[Holding] = []
    live = [s for s, k in trace.keys.items() if not k.erased]
    gone = [s for s, k in trace.keys.items() if k.erased]
    if live:
        out.append(Holding("keyring", "data key", len(live), HOLDS,
                           f"the key of {listed(map(repr, live))}: opens their sealed personal fields wherever they "
                           "were copied (log, ledger, views, backups); the erasure destroys it"))
    if gone:
        when = trace.erased_at.isoformat(timespec="seconds") if trace.erased_at else "?"
        out.append(Holding("keyring", "data key", len(gone), REDACTED,
                           f"destroyed (last at {when}), a tombstone stays; old copies of the wrapped key in dumps "
                           "and WAL open only with the KEK of their time: run evp keys rotate after erasures"))
    return out


def _events_detail(state: str, events: Sequence[Concerning]) -> str:
    if state == KEPT:
        types = listed(e.record.event_type.rsplit(".", 1)[-1] for e in events)
        return f"{types}: name them, carry no personal field of theirs; readable by design"
    fields = listed(f for e in events for f in e.fields)
    if state == HOLDS:
        return f"{fields} sealed under their key; unreadable once it is destroyed"
    return f"{fields} sealed under their destroyed key: nothing opens them"
