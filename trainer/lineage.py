"""The ``training`` lineage source: snapshots, their shard files, and the runs trained on them.

See :mod:`events.ops.lineage` for the protocol. A snapshot folds its records with their
personal fields *decrypted* (:mod:`trainer.dataset`), so its shards are plaintext: what a
dataset made of a subject's personal fields stays readable there after the erasure, and no
key deletion reaches it: the erasure purges those shard files instead (:mod:`trainer.erasure`,
which decides with the same steps, :func:`survey_training`). For each snapshot whose pinned
ranges hold events of the subject:

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
4. a snapshot an erasure purged (its folder's marker, :mod:`trainer.purge`) reports its rows
   of theirs and its shard files as :data:`~events.ops.lineage.REDACTED`, naming the erasure
   that purged it and when, and that copies of the shards on other machines are out of reach;
   a purge begun and not finished is named in the shard files' detail;
5. every run trained on such a snapshot is :data:`~events.ops.lineage.DERIVED` when the
   snapshot holds (or held, before a purge) plaintext rows of theirs (its weights were fitted
   on them, and no purge reaches weights), else :data:`~events.ops.lineage.KEPT`; its count is
   the rows of theirs it was trained on.

Without the dataset's code (no project, or the declaration no longer imports) the rows cannot
be told apart: the snapshot is reported by its pinned events, as plaintext when any carried
the subject's personal fields and the fold may have opened them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from events.errors import EvpError, IntegrityError
from events.event import RecordedEvent
from events.ops.lineage import (
    DERIVED, KEPT, PLAINTEXT, REDACTED, Concerning, Holding, SubjectTrace, listed, trace_subject,
)
from events.privacy.keyring import Keyring
from events.project import Project
from events.settings import Settings
from events.store.client import EventStore
from trainer.dataset import Dataset, Fold
from trainer.purge import PurgeMarker, read_purge
from trainer.runs import RunRecord, run_dir
from trainer.shards import decode_shard
from trainer.snapshot import SnapshotManifest, load_dataset, snapshot_dir, snapshot_ids

#: Where the purge cannot reach: said wherever a snapshot's shards were or are purged.
ELSEWHERE = ("copies of its shard files on other machines (a training machine, an export) are out of the erasure's "
             "reach: delete them there")


def what_to_do(trace: SubjectTrace) -> str:
    """What to do about plaintext shards: before the erasure, it purges them; after it, a rerun does."""
    erase = f"evp forget {trace.subject_id}" + (" again (it finishes the purge)" if trace.forgotten else "")
    return (f"no key reaches them: {erase} deletes this machine's shard files of the snapshot; delete every copy "
            "elsewhere, cut a new snapshot after the erasure and retrain on it")


@dataclass(frozen=True)
class _Recorded:
    """A snapshot or run as the log records it, with the record (its place and time)."""

    record: RecordedEvent
    data: dict[str, object]


@dataclass(frozen=True)
class SnapshotRows:
    """One snapshot whose pinned ranges hold events of the subject, and what its fold made of them.

    Steps 1 to 3 of the module docstring; :mod:`trainer.erasure` purges the snapshots for
    which :attr:`holds_plaintext` is true.
    """

    manifest: SnapshotManifest
    folder: Path
    pinned: tuple[Concerning, ...]  #: their events in the pinned ranges, admitted by the cut
    opened: bool  #: the fold may have been handed their personal fields decrypted
    problem: str  #: why the dataset cannot be loaded here ("" when it was, and the rows are known)
    plaintext: tuple[str, ...] = ()  #: row ids folded from their decrypted personal fields
    kept: tuple[str, ...] = ()  #: row ids folded from their events without such fields
    fields: tuple[str, ...] = ()  #: ``Type.field`` of the personal fields the plaintext rows were folded from
    located: Mapping[str, str] = field(default_factory=dict)  #: row id -> the shard holding it here
    missing: tuple[str, ...] = ()  #: shards missing or unreadable here
    purge: PurgeMarker | None = None  #: the marker of a purge, finished or begun

    @property
    def where(self) -> str:
        return f"snapshot {self.manifest.snapshot_id}"

    @property
    def purged(self) -> bool:
        """An erasure deleted its shard files from this machine."""
        return self.purge is not None and self.purge.finished

    @property
    def holds_plaintext(self) -> bool:
        """Rows of theirs folded from their decrypted personal fields, not purged from this machine."""
        return bool(self.plaintext) and not self.purged

    @property
    def unknown_plaintext(self) -> bool:
        """Its dataset cannot be loaded here, and the fold may have opened their personal fields."""
        return bool(self.problem) and self.opened and any(e.personal for e in self.pinned) and not self.purged


@dataclass(frozen=True)
class TrainingSurvey:
    """The subject's snapshots (:class:`SnapshotRows`) and every training run recorded."""

    trace: SubjectTrace
    snapshots: tuple[SnapshotRows, ...]
    runs: tuple[RunRecord, ...]

    def runs_on(self, snapshot: SnapshotRows) -> list[RunRecord]:
        return [r for r in self.runs if r.snapshot_id == snapshot.manifest.snapshot_id]


def survey_training(store: EventStore, project: Project | None, trace: SubjectTrace) -> TrainingSurvey:
    """Every snapshot whose pinned ranges hold the subject's events, with their rows there (steps 1 to 3)."""
    placed = [e for e in trace.events if e.record.offset is not None]
    if not placed:
        return TrainingSurvey(trace, (), ())  # nothing of theirs ever reached the topic, so no snapshot read any of it
    snapshots = [_first(store, f"snapshot-{s}") for s in snapshot_ids(store)]
    runs = [_first(store, s) for s in store.ledger.streams_with_prefix("training-")]
    known = [e.record for e in trace.events] + [s.record for s in snapshots] + [r.record for r in runs]
    found: list[SnapshotRows] = []
    for recorded in snapshots:
        manifest = SnapshotManifest.from_event(recorded.data)
        if manifest.topic != store.settings.events_topic:
            continue  # its offsets are another topic's
        pinned = tuple(e for e in placed if _folded(manifest, e.record))
        if pinned:
            opened = not _folded_after_erasure(manifest, trace, known)
            found.append(_rows(store, project, manifest, pinned, opened))
    return TrainingSurvey(trace, tuple(found), tuple(RunRecord.from_event(dict(r.data)) for r in runs))


def training_holdings(settings: Settings, project: Project | None, subject_id: str) -> list[Holding]:
    """The ``training`` source: per snapshot its rows and shard files of the subject, then the runs."""
    with EventStore.open(settings) as store:
        survey = survey_training(store, project, trace_subject(store, subject_id))
        out = [h for rows in survey.snapshots for h in _snapshot_holdings(survey.trace, rows)]
        for rows in survey.snapshots:
            if not rows.problem and (rows.plaintext or rows.kept):
                out += [_run(store, run, rows) for run in survey.runs_on(rows)]
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


def _rows(store: EventStore, project: Project | None, manifest: SnapshotManifest, pinned: tuple[Concerning, ...],
          opened: bool) -> SnapshotRows:
    """Steps 1 to 3 for one snapshot: its rows of theirs, found in its shards here."""
    folder = snapshot_dir(store, manifest.snapshot_id)
    purge = read_purge(folder)
    dataset, problem = _dataset(project, manifest)
    if dataset is None:
        return SnapshotRows(manifest, folder, pinned, opened, problem, purge=purge)
    candidates, fields = _candidate_rows(dataset, pinned, opened)
    shards, missing = _shard_rows(folder, manifest)
    located = {row: name for name, ids in shards.items() for row in ids}
    unplaced = [r for r in candidates if r not in located] if missing else []
    plaintext = tuple(r for r, p in candidates.items() if p and (r in located or r in unplaced))
    kept = tuple(r for r, p in candidates.items() if not p and (r in located or r in unplaced))
    return SnapshotRows(manifest, folder, pinned, opened, "", plaintext, kept, tuple(fields), located,
                        tuple(missing), purge)


def _purged_by(purge: PurgeMarker) -> str:
    return f"purged by the erasure of {purge.subject_id!r} ({purge.erasure}) at {purge.when}"


def _snapshot_holdings(trace: SubjectTrace, rows: SnapshotRows) -> list[Holding]:
    where, manifest, pinned = rows.where, rows.manifest, rows.pinned
    personal = [e for e in pinned if e.personal]
    if rows.problem:
        detail = (f"its pinned ranges hold {len(pinned)} of their events; dataset {manifest.declaration} cannot be "
                  f"loaded here ({rows.problem}), so which rows came from them is unknown")
        if rows.purge is not None and rows.purged:
            return [Holding(where, "pinned events", len(pinned), REDACTED,
                            f"{detail}; its shard files were {_purged_by(rows.purge)}; {ELSEWHERE}")]
        state = PLAINTEXT if rows.unknown_plaintext else KEPT
        if state == PLAINTEXT:
            detail += (f"; {listed(f for e in personal for f in e.fields)} were handed to it decrypted: "
                       f"{what_to_do(trace)}")
        return [Holding(where, "pinned events", len(pinned), state, detail)]
    heading = f"dataset {manifest.dataset} v{manifest.dataset_version}"
    if rows.purge is not None and rows.purged and (rows.plaintext or rows.kept):
        theirs = rows.plaintext + rows.kept
        by = _purged_by(rows.purge)
        return [Holding(where, "snapshot rows", len(theirs), REDACTED,
                        f"{heading}: rows {listed(theirs)} were deleted with its shard files, {by}; the manifest "
                        "stays in the log (what the runs trained on it saw); cut a new snapshot to train on"),
                Holding(where, "shard files", len(rows.purge.shards), REDACTED,
                        f"{listed(rows.purge.shards)} in {rows.folder}, {by}; {ELSEWHERE}")]
    out: list[Holding] = []
    if rows.plaintext:
        out.append(Holding(where, "snapshot rows", len(rows.plaintext), PLAINTEXT,
                           f"{heading}: rows {listed(rows.plaintext)} were folded from their personal fields "
                           f"{listed(rows.fields)}, "
                           f"handed to the dataset decrypted: they may hold them in plaintext; {what_to_do(trace)}"))
    if rows.kept:
        after = " (or from their personal fields after their key was destroyed)" if not rows.opened and personal else ""
        out.append(Holding(where, "snapshot rows", len(rows.kept), KEPT,
                           f"{heading}: rows {listed(rows.kept)} folded from their events without personal data of "
                           f"theirs{after}: features and labels, not personal by schema"))
    if not rows.plaintext and not rows.kept:
        out.append(Holding(where, "pinned events", len(pinned), KEPT,
                           f"{heading}: its pinned ranges hold {len(pinned)} of their events; none of its rows came "
                           "from them"))
    return out + _shard_holdings(trace, rows)


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


def _shard_holdings(trace: SubjectTrace, rows: SnapshotRows) -> list[Holding]:
    where, folder, located = rows.where, rows.folder, rows.located
    out: list[Holding] = []
    plain = sorted({located[r] for r in rows.plaintext if r in located})
    kept = sorted({located[r] for r in rows.kept if r in located} - set(plain))
    begun = "" if rows.purge is None or rows.purged else (f"; a purge {_purged_by(rows.purge).removeprefix('purged ')} was begun "
                                           "and not finished")
    if plain:
        out.append(Holding(where, "shard files", len(plain), PLAINTEXT,
                           f"{listed(plain)} in {folder} hold those rows in plaintext{begun}; {what_to_do(trace)}"))
    if kept:
        out.append(Holding(where, "shard files", len(kept), KEPT, f"{listed(kept)} in {folder}"))
    if rows.missing and (rows.plaintext or rows.kept):
        state = PLAINTEXT if rows.plaintext else KEPT
        out.append(Holding(where, "shard files", len(rows.missing), state,
                           f"{listed(rows.missing)} are not on this machine (or unreadable){begun}: any copy, e.g. on a "
                           "training machine, may hold their rows"
                           + (f"; {what_to_do(trace)}" if state == PLAINTEXT else "")))
    return out


def _run(store: EventStore, run: RunRecord, rows: SnapshotRows) -> Holding:
    weights = run_dir(store, run.run_id) / "weights.pt"
    at = f"its weights {weights}" if weights.is_file() else "its weights (not on this machine)"
    seen = len(rows.plaintext) + len(rows.kept)
    snapshot = rows.manifest.snapshot_id
    if rows.plaintext:
        fitted = (f"; the snapshot was {_purged_by(rows.purge)}, but {at} were fitted on data since erased"
                  if rows.purge is not None and rows.purged else f": {at} may encode them")
        return Holding(f"run {run.run_id}", "training run", seen, DERIVED,
                       f"trained on snapshot {snapshot}, {len(rows.plaintext)} of its rows folded from their decrypted "
                       f"personal data{fitted} and no key reaches them; retrain on a snapshot cut after the erasure "
                       "and retire these weights (and every copy of them)")
    return Holding(f"run {run.run_id}", "training run", seen, KEPT,
                   f"trained on snapshot {snapshot}, {seen} of its rows from their events, none from personal data of "
                   f"theirs ({at})")
