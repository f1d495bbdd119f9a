"""The ``training`` erasure hook: purge the snapshot shards that hold a forgotten subject's plaintext.

See :mod:`events.ops.erasure` for the protocol. A snapshot folds its records with personal
fields decrypted, so destroying the key does not reach its shards; this hook deletes them.
:func:`purge_snapshots`, called by ``evp forget`` after the key is destroyed:

1. finds the snapshots as the ``training`` lineage source does
   (:func:`trainer.lineage.survey_training`) and takes those that hold rows of the subject's
   reported :data:`~events.ops.lineage.PLAINTEXT` and are not purged yet; a snapshot whose
   dataset cannot be loaded here is :data:`~events.ops.erasure.LEFT`, with what to do
   (which rows came from them cannot be told);
2. purges each (:func:`purge_snapshot`): a marker naming the erasure is written first
   (:func:`begin_purge`; a marker already begun is kept), then every shard file of the
   snapshot is deleted from this machine (:func:`delete_shards`: the snapshot can no longer
   be read whole, and the log no longer gives its rows back), then the marker is finished
   with the time and the count (:func:`finish_purge`). Each write is atomic, so a crash
   leaves every file and no marker, or a marker that the next run finishes;
3. keeps the manifest (``manifest.json`` and the log's ``SnapshotCreated``: the record of
   what the runs trained on it saw);
4. on a dry run, changes nothing and says what it would purge.

Copies of the shards on other machines, and weights trained on them, are out of its reach;
each purge's detail says so and names the runs to retrain.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from events.errors import ErasureHookError
from events.ops.erasure import LEFT, Purge, erasure_store
from events.ops.lineage import SubjectTrace, listed, trace_subject
from events.project import Project
from events.settings import Settings
from trainer.lineage import ELSEWHERE, SnapshotRows, TrainingSurvey, survey_training
from trainer.purge import PURGE_MARKER, PurgeMarker, write_purge
from trainer.snapshot import SnapshotManifest

HOOK = "training"


def purge_snapshots(settings: Settings, project: Project | None, subject_id: str, dry_run: bool) -> list[Purge]:
    """The ``training`` hook: purge every snapshot holding the subject's plaintext (see the module docstring)."""
    with erasure_store(settings) as store:
        trace = trace_subject(store, subject_id)
        survey = survey_training(store, project, trace)
    if not dry_run and any(not key.erased for key in trace.keys.values()):
        raise ErasureHookError(HOOK, f"subject {subject_id!r} still has a live data key: snapshots are purged only "
                                     "after the erasure destroyed it")
    out: list[Purge] = []
    for rows in survey.snapshots:
        if rows.unknown_plaintext:
            out.append(_left(trace, rows))
        elif rows.holds_plaintext:
            out.append(_planned(survey, rows) if dry_run else purge_snapshot(survey, rows))
    return out


def erasure_of(trace: SubjectTrace) -> str:
    """The erasure's record, as a marker names it: its last ``SubjectForgotten`` event."""
    if not trace.erasures:
        return "no erasure event recorded"
    record = trace.erasures[-1].record
    return f"event {record.event_id}, ledger position {record.position}"


def begin_purge(folder: Path, manifest: SnapshotManifest, subject_id: str, erasure: str) -> PurgeMarker:
    """Step 2, first write: the marker naming the erasure and every shard file, before any is deleted."""
    marker = PurgeMarker(manifest.snapshot_id, manifest.declaration, subject_id, erasure, _now(),
                         tuple(s.name for s in manifest.shards))
    write_purge(folder, marker)
    return marker


def delete_shards(folder: Path, marker: PurgeMarker) -> int:
    """Step 2, the deletion: every shard file the marker names; how many were there (a file gone is fine)."""
    deleted = 0
    for name in marker.shards:
        try:
            (folder / name).unlink()
        except FileNotFoundError:
            continue
        deleted += 1
    return deleted


def finish_purge(folder: Path, marker: PurgeMarker, deleted: int) -> PurgeMarker:
    """Step 2, last write: the marker says the files are gone, when, and how many this purge deleted."""
    done = marker.done(datetime.now(timezone.utc), deleted)
    write_purge(folder, done)  # its folder fsync also makes the deletions durable
    return done


def purge_snapshot(survey: TrainingSurvey, rows: SnapshotRows) -> Purge:
    """Purge one snapshot (step 2), finishing a purge a crash interrupted."""
    begun = rows.purge
    marker = begun if begun is not None else begin_purge(rows.folder, rows.manifest, survey.trace.subject_id,
                                                         erasure_of(survey.trace))
    deleted = delete_shards(rows.folder, marker)
    finish_purge(rows.folder, marker, deleted)
    resumed = f"finished the purge begun at {begun.started_at} by the erasure of {begun.subject_id!r}: " \
        if begun is not None else ""
    return Purge(rows.where, "shard files", deleted,
                 f"{resumed}{_what(rows, marker.shards)} deleted from {rows.folder}; "
                 f"{PURGE_MARKER} there names the erasure; {_after(survey, rows)}")


def _planned(survey: TrainingSurvey, rows: SnapshotRows) -> Purge:
    present = [s.name for s in rows.manifest.shards if (rows.folder / s.name).is_file()]
    return Purge(rows.where, "shard files", len(present),
                 f"{_what(rows, present)} in {rows.folder} would be deleted, and {PURGE_MARKER} left "
                 f"there; {_after(survey, rows)}")


def _what(rows: SnapshotRows, shards: tuple[str, ...] | list[str]) -> str:
    manifest = rows.manifest
    return (f"dataset {manifest.dataset} v{manifest.dataset_version}: rows {listed(rows.plaintext)} were folded from "
            f"their decrypted personal fields {listed(rows.fields)}; its shard files "
            f"{listed(shards) if shards else '(none on this machine)'}")


def _after(survey: TrainingSurvey, rows: SnapshotRows) -> str:
    runs = [r.run_id for r in survey.runs_on(rows)]
    retrain = (f"; runs {listed(runs)} were trained on it: retrain them on a snapshot cut after the erasure and retire "
               "their weights") if runs else ""
    return f"the manifest stays in the log; {ELSEWHERE}{retrain}"


def _left(trace: SubjectTrace, rows: SnapshotRows) -> Purge:
    return Purge(rows.where, "shard files", 0,
                 f"not purged: dataset {rows.manifest.declaration} cannot be loaded here ({rows.problem}), so which "
                 f"of its rows came from their personal fields is unknown; with the project that cut it "
                 f"(EVP_PROJECT), run evp forget {trace.subject_id} again, or delete its shard files yourself",
                 state=LEFT)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
