"""The purge marker: a snapshot folder whose shard files an erasure deleted.

:mod:`trainer.erasure` purges a snapshot whose shards hold rows folded from a forgotten
subject's decrypted personal fields; this module is the marker it leaves, which every
reader of the snapshot checks (:func:`refuse_purged`), so that a purged snapshot is refused
by name, never read as a snapshot with missing files (and so never re-materialized).

The marker is ``purged.json`` in the snapshot's folder, beside ``manifest.json`` (which
stays, as the ``SnapshotCreated`` event in the log does: the record of what a model saw).
A purge writes it twice, each time atomically:

1. ``"state": "purging"``, naming the erasure and the shard files, *before* any file is
   deleted: a crash from here on leaves the marker, and a rerun of the erasure finishes;
2. ``"state": "purged"``, with the time and the count of files deleted, once they are gone.

So a crash leaves either every shard file and no marker (the rerun purges it as if for the
first time) or a marker (the rerun finishes what it names).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from events.adapters.files import write_bytes_atomically
from events.errors import IntegrityError, SnapshotPurged

PURGE_MARKER = "purged.json"
PURGING = "purging"  #: begun: the shard files may be partly deleted
PURGED = "purged"  #: finished: the shard files are gone from this folder
FORMAT = 1


@dataclass(frozen=True)
class PurgeMarker:
    """Which erasure purged a snapshot, when, and what it deleted."""

    snapshot_id: str
    declaration: str  #: ``module:attribute`` of the dataset, to say how to cut it again
    subject_id: str  #: the subject whose erasure purged it
    erasure: str  #: the erasure's record: ``SubjectForgotten`` event id and ledger position
    started_at: str  #: ISO 8601, when the purge began
    shards: tuple[str, ...]  #: the snapshot's shard files, every one of which is deleted
    state: str = PURGING
    purged_at: str | None = None  #: ISO 8601, when the last file was gone
    deleted: int = 0  #: files the purge found and deleted (a file already gone is not counted)

    @property
    def finished(self) -> bool:
        return self.state == PURGED

    @property
    def when(self) -> str:
        """When it was purged (or, while unfinished, when the purge began)."""
        return self.purged_at if self.finished and self.purged_at else self.started_at

    def done(self, at: datetime, deleted: int) -> PurgeMarker:
        return replace(self, state=PURGED, purged_at=at.isoformat(timespec="seconds"), deleted=self.deleted + deleted)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self), "shards": list(self.shards)}

    def refusal(self, doing: str = "") -> SnapshotPurged:
        """The error every reader of the purged snapshot raises."""
        return SnapshotPurged(self.snapshot_id, self.subject_id, self.erasure, self.when, finished=self.finished,
                              dataset=self.declaration, doing=doing)


def read_purge(folder: Path) -> PurgeMarker | None:
    """The marker in a snapshot folder, or None; IntegrityError naming it when it is not one."""
    path = folder / PURGE_MARKER
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        marker = PurgeMarker(
            snapshot_id=str(data["snapshot_id"]), declaration=str(data["declaration"]), subject_id=str(data["subject_id"]),
            erasure=str(data["erasure"]), started_at=str(data["started_at"]),
            shards=tuple(str(s) for s in data["shards"]), state=str(data["state"]),
            purged_at=None if data.get("purged_at") is None else str(data["purged_at"]),
            deleted=int(data.get("deleted", 0)),
        )
    except (ValueError, KeyError, TypeError) as err:
        raise IntegrityError(f"{path} is not a readable purge marker ({err!r}): the snapshot's shard files may be "
                             "partly deleted; do not use it") from err
    if marker.state not in (PURGING, PURGED):
        raise IntegrityError(f"{path}: state {marker.state!r} is not {PURGING!r} or {PURGED!r}")
    return marker


def write_purge(folder: Path, marker: PurgeMarker) -> None:
    write_bytes_atomically(folder / PURGE_MARKER, json.dumps(marker.to_json(), indent=2, sort_keys=True).encode())


def refuse_purged(folder: Path, doing: str = "") -> None:
    """Raise :class:`~events.errors.SnapshotPurged` when the snapshot in ``folder`` was
    purged (or is being purged); ``doing`` says what was refused (``replay of run-…``)."""
    marker = read_purge(folder)
    if marker is not None:
        raise marker.refusal(doing)
