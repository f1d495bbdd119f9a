"""The ``training`` lineage source: snapshots, their shard files, and the runs trained on them.

See :mod:`events.ops.lineage` for the protocol. A snapshot folds its records with their
personal fields *decrypted* (:mod:`trainer.dataset`), so its shards are plaintext: what a
dataset made of a subject's personal fields stays readable there after the erasure, and no
key deletion reaches it. For each snapshot whose pinned ranges hold events of the subject:

1. the rows those events fold into are found as the fold finds them (the dataset's handlers
   by event type, the row id from the ``row_id`` field) and looked up in the shard headers;
2. a row folded from an event that carried the subject's personal fields is
   :data:`~events.ops.lineage.PLAINTEXT` (the dataset was handed them decrypted; evp cannot
   tell whether a handler wrote them into a column, so it says "may hold"), unless the fold
   provably ran after the key was destroyed: the erasure's record lies in the pinned ranges
   (it was on the topic before the ranges were pinned) and an event in the ranges was
   recorded more than ``Keyring.DEFAULT_CACHE_SECONDS`` after the key was destroyed (no
   process could still hold a cached copy). Other rows of theirs are
   :data:`~events.ops.lineage.KEPT` (features and labels, not personal by schema);
3. the shard files holding those rows are counted with the same state, by name; shards not
   on this machine are named as such (a copy elsewhere, e.g. on a training machine, holds
   what the manifest says);
4. every run trained on such a snapshot is :data:`~events.ops.lineage.DERIVED` when the
   snapshot holds plaintext rows of theirs (its weights were fitted on them), else
   :data:`~events.ops.lineage.KEPT`; its count is the rows of theirs it was trained on.

Without the dataset's code (no project, or the declaration no longer imports) the rows cannot
be told apart: the snapshot is reported by its pinned events, as plaintext when any carried
the subject's personal fields and the fold may have opened them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from events.errors import EvpError, IntegrityError
from events.event import RecordedEvent
from events.ops.lineage import (
    DERIVED, KEPT, PLAINTEXT, Concerning, Holding, SubjectTrace, listed, trace_subject,
)
from events.privacy.keyring import Keyring
from events.project import Project
from events.settings import Settings
from events.store.client import EventStore
from trainer.dataset import Dataset, Fold
from trainer.runs import RunRecord, run_dir
from trainer.shards import decode_shard
from trainer.snapshot import SnapshotManifest, load_dataset, snapshot_dir, snapshot_ids

WHAT_TO_DO = ("no key reaches them: delete the snapshot's shard files (and every copy), cut a new snapshot "
              "after the erasure and retrain on it")


@dataclass(frozen=True)
class _Recorded:
    """A snapshot or run as the log records it, with the record (its place and time)."""

    record: RecordedEvent
    data: dict[str, object]


@dataclass(frozen=True)
class _SnapshotRows:
    """The subject's rows in one snapshot."""

    manifest: SnapshotManifest
    plaintext: tuple[str, ...]  #: row ids folded from their decrypted personal fields
    kept: tuple[str, ...]  #: row ids folded from their events without such fields


def training_holdings(settings: Settings, project: Project | None, subject_id: str) -> list[Holding]:
    """The ``training`` source: per snapshot its rows and shard files of the subject, then the runs."""
    with EventStore.open(settings) as store:
        trace = trace_subject(store, subject_id)
        placed = [e for e in trace.events if e.record.offset is not None]
        if not placed:
            return []  # nothing of theirs ever reached the topic, so no snapshot read any of it
        snapshots = [_first(store, f"snapshot-{s}") for s in snapshot_ids(store)]
        runs = [_first(store, s) for s in store.ledger.streams_with_prefix("training-")]
        known = [e.record for e in trace.events] + [s.record for s in snapshots] + [r.record for r in runs]
        out: list[Holding] = []
        found: list[_SnapshotRows] = []
        for recorded in snapshots:
            manifest = SnapshotManifest.from_event(recorded.data)
            if manifest.topic != settings.events_topic:
                continue  # its offsets are another topic's
            pinned = [e for e in placed if _folded(manifest, e.record)]
            if not pinned:
                continue
            opened = not _folded_after_erasure(manifest, trace, known)
            rows, holdings = _snapshot(store, project, manifest, pinned, opened)
            out += holdings
            if rows is not None and (rows.plaintext or rows.kept):
                found.append(rows)
        records = [RunRecord.from_event(dict(r.data)) for r in runs]
        for rows in found:
            out += [_run(store, run, rows) for run in records if run.snapshot_id == rows.manifest.snapshot_id]
    return out


def _first(store: EventStore, stream_id: str) -> _Recorded:
    event = store.read_stream(stream_id, decrypt=False)[0]
    return _Recorded(event.record, dict(event.data))


def _in_ranges(manifest: SnapshotManifest, record: RecordedEvent) -> bool:
    span = manifest.ranges.get(record.partition)
    return record.offset is not None and span is not None and span[0] <= record.offset < span[1]


def _folded(manifest: SnapshotManifest, record: RecordedEvent) -> bool:
    """In the pinned ranges and admitted by the snapshot's cut (an as-of snapshot skips later positions)."""
    return _in_ranges(manifest, record) and (manifest.cut_position is None or record.position <= manifest.cut_position)


def _folded_after_erasure(manifest: SnapshotManifest, trace: SubjectTrace, known: Sequence[RecordedEvent]) -> bool:
    """Step 2's proof that the fold could not open the subject's fields (see the module docstring)."""
    erased_at = trace.erased_at
    if erased_at is None or not any(_in_ranges(manifest, e.record) for e in trace.erasures):
        return False
    floor = max((r.recorded_at for r in known if _in_ranges(manifest, r)), default=None)
    return floor is not None and floor > erased_at + timedelta(seconds=Keyring.DEFAULT_CACHE_SECONDS)


def _snapshot(store: EventStore, project: Project | None, manifest: SnapshotManifest, pinned: Sequence[Concerning],
              opened: bool) -> tuple[_SnapshotRows | None, list[Holding]]:
    where = f"snapshot {manifest.snapshot_id}"
    personal = [e for e in pinned if e.personal]
    dataset, problem = _dataset(project, manifest)
    if dataset is None:
        state = PLAINTEXT if opened and personal else KEPT
        detail = (f"its pinned ranges hold {len(pinned)} of their events; dataset {manifest.declaration} cannot be "
                  f"loaded here ({problem}), so which rows came from them is unknown")
        if state == PLAINTEXT:
            detail += f"; {listed(f for e in personal for f in e.fields)} were handed to it decrypted: {WHAT_TO_DO}"
        return None, [Holding(where, "pinned events", len(pinned), state, detail)]
    candidates, fields = _candidate_rows(dataset, pinned, opened)
    folder = snapshot_dir(store, manifest.snapshot_id)
    shards, missing = _shard_rows(folder, manifest)
    located = {row: name for name, ids in shards.items() for row in ids}
    unplaced = [r for r in candidates if r not in located] if missing else []
    plaintext = tuple(r for r, p in candidates.items() if p and (r in located or r in unplaced))
    kept = tuple(r for r, p in candidates.items() if not p and (r in located or r in unplaced))
    rows = _SnapshotRows(manifest, plaintext, kept)
    heading = f"dataset {manifest.dataset} v{manifest.dataset_version}"
    out: list[Holding] = []
    if plaintext:
        out.append(Holding(where, "snapshot rows", len(plaintext), PLAINTEXT,
                           f"{heading}: rows {listed(plaintext)} were folded from their personal fields "
                           f"{listed(fields)}, "
                           f"handed to the dataset decrypted: they may hold them in plaintext; {WHAT_TO_DO}"))
    if kept:
        after = " (or from their personal fields after their key was destroyed)" if not opened and personal else ""
        out.append(Holding(where, "snapshot rows", len(kept), KEPT,
                           f"{heading}: rows {listed(kept)} folded from their events without personal data of "
                           f"theirs{after}: features and labels, not personal by schema"))
    if not plaintext and not kept:
        out.append(Holding(where, "pinned events", len(pinned), KEPT,
                           f"{heading}: its pinned ranges hold {len(pinned)} of their events; none of its rows came "
                           "from them"))
    out += _shard_holdings(where, folder, located, missing, rows)
    return rows, out


def _dataset(project: Project | None, manifest: SnapshotManifest) -> tuple[Dataset | None, str]:
    if project is None:
        return None, "no project"
    try:
        dataset = load_dataset(project, manifest.declaration)
    except EvpError as err:
        return None, str(err)
    if (dataset.name, dataset.version) != (manifest.dataset, manifest.dataset_version):
        return None, f"it is now {dataset.name!r} version {dataset.version}, the snapshot was cut by version " \
                     f"{manifest.dataset_version}"
    return dataset, ""


def _candidate_rows(dataset: Dataset, pinned: Sequence[Concerning], opened: bool) -> tuple[dict[str, bool], list[str]]:
    """Step 1: row id -> whether it was folded from their personal fields while they could be
    opened; and those fields (``Type.field``)."""
    wants = Fold(dataset).wants
    rows: dict[str, bool] = {}
    fields: list[str] = []
    for event in pinned:
        if wants(event.record.event_type) is None:
            continue
        row = event.data.get(dataset.row_id)
        if isinstance(row, str) and row:
            rows[row] = rows.get(row, False) or (opened and bool(event.personal))
            fields += event.fields if opened else ()
    return rows, fields


def _shard_rows(folder: Path, manifest: SnapshotManifest) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """``({shard name: row ids}, [shards missing or unreadable here])``."""
    rows: dict[str, tuple[str, ...]] = {}
    missing: list[str] = []
    for info in manifest.shards:
        path = folder / info.name
        try:
            rows[info.name] = decode_shard(path.read_bytes(), str(path)).row_ids
        except (OSError, IntegrityError):
            missing.append(info.name)
    return rows, missing


def _shard_holdings(where: str, folder: Path, located: dict[str, str], missing: Sequence[str],
                    rows: _SnapshotRows) -> list[Holding]:
    out: list[Holding] = []
    plain = sorted({located[r] for r in rows.plaintext if r in located})
    kept = sorted({located[r] for r in rows.kept if r in located} - set(plain))
    if plain:
        out.append(Holding(where, "shard files", len(plain), PLAINTEXT,
                           f"{listed(plain)} in {folder} hold those rows in plaintext; {WHAT_TO_DO}"))
    if kept:
        out.append(Holding(where, "shard files", len(kept), KEPT, f"{listed(kept)} in {folder}"))
    if missing and (rows.plaintext or rows.kept):
        state = PLAINTEXT if rows.plaintext else KEPT
        out.append(Holding(where, "shard files", len(missing), state,
                           f"{listed(missing)} are not on this machine (or unreadable): any copy, e.g. on a training "
                           "machine, may hold their rows" + (f"; {WHAT_TO_DO}" if state == PLAINTEXT else "")))
    return out


def _run(store: EventStore, run: RunRecord, rows: _SnapshotRows) -> Holding:
    weights = run_dir(store, run.run_id) / "weights.pt"
    at = f"its weights {weights}" if weights.is_file() else "its weights (not on this machine)"
    seen = len(rows.plaintext) + len(rows.kept)
    snapshot = rows.manifest.snapshot_id
    if rows.plaintext:
        return Holding(f"run {run.run_id}", "training run", seen, DERIVED,
                       f"trained on snapshot {snapshot}, {len(rows.plaintext)} of its rows folded from their decrypted "
                       f"personal data: {at} may encode them and no key reaches them; retrain on a snapshot cut after "
                       "the erasure and retire these weights")
    return Holding(f"run {run.run_id}", "training run", seen, KEPT,
                   f"trained on snapshot {snapshot}, {seen} of its rows from their events, none from personal data of "
                   f"theirs ({at})")
