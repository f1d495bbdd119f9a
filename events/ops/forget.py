"""Forgetting a data subject: crypto-shredding, recorded as an event, then the purge of plaintext copies.

Personal data is stored encrypted under the subject's own data key wherever evp writes it
sealed — the Kafka log, the ledger, views, dead letters, backups — so deleting that key
makes every such copy unreadable at once, without rewriting any of them. What evp itself
decrypted and kept is not reached by the key: aggregate snapshots (deleted here) and the
shards of dataset snapshots, whose rows are folded from decrypted personal fields (purged
by the ``training`` erasure hook, :mod:`trainer.erasure`: the shard files on this machine
are deleted, a marker says which erasure purged them, the manifest stays in the log). What
stays readable is what was never personal: features, labels, counts, pseudonymous ids.

Contract of :func:`forget_subject`:

1. refuse an id that :func:`~events.privacy.keyring.subject_problem` refuses (whitespace at
   either end, control characters, not NFC), naming the id to use instead; find the
   look-alike ids stored before that rule (``"ann-cy "`` beside ``ann-cy``): they are the
   same person and are forgotten with the subject;
2. find what the erasure touches (streams, events, reservations, dataset snapshots,
   aggregate snapshots) for the subject and its look-alikes; on a dry run, ask every
   erasure hook what it would purge (:mod:`events.ops.erasure`) and stop there;
3. destroy the data keys (a tombstone remains, so the subject cannot be
   silently re-keyed); delete the aggregate snapshots of every stream concerned (they hold
   decrypted state, which no key deletion reaches; a save racing the erasure is refused,
   see :func:`events.store.aggregate.save_snapshot`); release the subjects' unique
   reservations and only theirs (their blind indexes would otherwise let a key holder test
   guesses of the values; another person's reservation on the same stream stays); and
   append one ``SubjectForgotten`` event per id, which carries no personal data and tells
   projections to redact their rows;
4. run every erasure hook (entry-point group ``evp.erasure``), which purges the plaintext
   copies its layer keeps (the snapshot shards holding rows folded from their personal
   fields); a hook that fails leaves the erasure standing and raises
   :class:`~events.errors.ErasureIncomplete` after the others ran.

Running it again after a crash finishes the erasure and the purge: every step is idempotent.

What the erasure cannot reach by itself, and how to close it:

- other processes' keyrings may use a cached copy of the key for up to
  ``Keyring.DEFAULT_CACHE_SECONDS`` (10 s) and then find the tombstone;
- the wrapped key stays in PostgreSQL's dead tuples and WAL until they are recycled, and
  in every dump of ``evp_data_keys`` taken before; the KEK still unwraps those copies.
  ``evp keys rotate`` after erasures re-wraps every live key under a new KEK and retires
  (deletes) the old KEK's file, which makes every old wrapped copy useless;
- copies of snapshot shards on other machines (a training machine, an exported dataset),
  and the weights of models trained on them: the purge deletes only this machine's files
  (``EVP_HOME``), and ``evp forget --report`` names the snapshots it purged and the runs
  trained on them, to delete the copies, retrain and retire the weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from events.store.aggregate import count_snapshots, drop_snapshots
from events.store.client import EventStore
from events.errors import EvpError
from events.event import Event, RecordedEvent
from events.ops.erasure import ErasureHook, Purge, Purges, describe_purges, run_erasure_hooks
from events.ops.lineage import events_concerning, subject_ids
from events.project import Project, find_project


@dataclass(frozen=True)
class ErasureReport:
    subject_id: str
    dry_run: bool
    streams: tuple[str, ...]
    events: int
    reservations: int
    snapshots: tuple[str, ...] = field(default=())
    key_destroyed: bool = False
    published: bool = False  #: the SubjectForgotten event is on Kafka (else it waits in the outbox)
    aggregate_snapshots: int = 0  #: aggregate snapshots of the streams (deleted unless dry run)
    lookalikes: tuple[str, ...] = field(default=())  #: ids stored before validation that stand for the subject
    purges: tuple[Purge, ...] = field(default=())  #: what the erasure hooks purged (on a dry run: would purge)
    hooks: tuple[str, ...] = field(default=())  #: the erasure hooks run
    hooks_unavailable: dict[str, str] = field(default_factory=dict)  #: hook -> why it could not be loaded

    def __str__(self) -> str:
        verb = "would touch" if self.dry_run else "touched"
        key = "" if self.dry_run else ("; data key destroyed" if self.key_destroyed else "; no live data key was left")
        if not self.dry_run and not self.published:
            key += "; erasure recorded, its publication to Kafka is pending (the relay will send it)"
        also = f" (and look-alike ids {', '.join(map(repr, self.lookalikes))})" if self.lookalikes else ""
        purged = Purges(self.purges, self.hooks, self.hooks_unavailable)
        return "\n".join([f"erasure of {self.subject_id}{also} {verb} {self.events} events in {len(self.streams)} "
                          f"streams, {self.reservations} reservations, {len(self.snapshots)} snapshots, "
                          f"{self.aggregate_snapshots} aggregate snapshots{key}",
                          *describe_purges(purged, dry_run=self.dry_run)])

    def with_purges(self, purged: Purges) -> ErasureReport:
        return replace(self, purges=purged.purges, hooks=purged.hooks, hooks_unavailable=dict(purged.unavailable))


def erasure_scope(store: EventStore, subject_id: str) -> ErasureReport:
    """What forgetting ``subject_id`` touches (step 1 and 2 of :func:`forget_subject`)."""
    ids = subject_ids(store, subject_id)
    lookalikes = ids[1:]
    events = events_concerning(store, ids)
    streams = tuple(sorted({e.stream_id for e in events}))
    reservations = sum(store.ledger.reservations_of(s) for s in ids)
    return ErasureReport(subject_id, True, streams, len(events), reservations, _snapshots_holding(store, events),
                         aggregate_snapshots=count_snapshots(store, streams), lookalikes=lookalikes)


def _snapshots_holding(store: EventStore, events: list[RecordedEvent]) -> tuple[str, ...]:
    """Snapshots whose pinned ranges include any of the subject's events."""
    placed = [(e.partition, e.offset) for e in events if e.offset is not None]
    found = []
    for stream in store.ledger.streams_with_prefix("snapshot-"):
        data = store.read_stream(stream, decrypt=False)[0].data
        ranges = {r["partition"]: (r["start"], r["end"]) for r in data["ranges"]}
        if any(p in ranges and ranges[p][0] <= o < ranges[p][1] for p, o in placed):
            found.append(str(data["snapshot_id"]))
    return tuple(found)


def forget_subject(
    store: EventStore, subject_id: str, *, reason: str, dry_run: bool = False, actor: str | None = None,
    project: Project | None = None, hooks: Mapping[str, ErasureHook | str] | None = None,
) -> ErasureReport:
    """Forget ``subject_id`` (and its look-alike ids); see the module docstring for the contract.

    ``project`` is handed to the erasure hooks (default: :func:`~events.project.find_project`
    of the store's settings); ``hooks`` replaces the installed ``evp.erasure`` entry points.
    """
    scope = erasure_scope(store, subject_id)
    project = project if project is not None else find_project(store.settings)
    if dry_run:
        would = run_erasure_hooks(store.settings, project, subject_id, dry_run=True, hooks=hooks, store=store)
        return scope.with_purges(would)
    ids = (subject_id, *scope.lookalikes)
    destroyed = any([store.keyring.forget(s) for s in ids])  # the keys first: nothing decrypts from here on
    dropped = drop_snapshots(store, scope.streams)
    for s in ids:
        store.ledger.release_subject(s)
    who = actor or store.settings.actor
    store.append(f"erasure-{subject_id}",
                 [Event("SubjectForgotten", {"subject_id": s, "reason": reason}, actor=who) for s in ids])
    try:
        store.flush()
        published = True
    except EvpError:  # the key is gone and the event is in the outbox: the erasure stands
        published = False
    purged = run_erasure_hooks(store.settings, project, subject_id, dry_run=False, hooks=hooks, store=store)
    return ErasureReport(subject_id, False, scope.streams, scope.events, scope.reservations, scope.snapshots,
                         destroyed, published, dropped, scope.lookalikes).with_purges(purged)
