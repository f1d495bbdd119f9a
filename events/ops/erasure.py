"""Erasure hooks: what an erasure purges beyond the key, in the layers above this one.

Destroying a subject's data key makes every sealed copy of their personal data unreadable,
but not a copy someone decrypted and kept: a dataset snapshot's shards hold rows folded
from decrypted personal fields. The layers that keep such copies purge them through
*hooks*, found through the entry-point group ``evp.erasure`` (as the lineage sources are,
so this base layer imports neither layer above it). A hook is a callable::

    def purge(settings: Settings, project: Project | None, subject_id: str, dry_run: bool) -> list[Purge]

The contract of a hook:

1. :func:`events.ops.forget.forget_subject` calls it after the subject's keys are destroyed
   and the erasure is recorded, so what it reads of the subject is what the erasure left;
   on a dry run it is called before anything changed, and changes nothing;
2. it covers the subject and its look-alike ids (:func:`events.ops.lineage.subject_ids`);
   it reads the log through :func:`erasure_store`, which hands it the erasure's own store:
   an erasure may run inside another transaction of its process (a saga participant
   forgets within its batch's transaction, which holds locks on the ledger's tables), and
   opening another store there would wait on those locks for ever (its migrations);
3. it purges only what holds (or may hold) the subject's personal data in plaintext, as its
   layer's lineage source reports it (:data:`events.ops.lineage.PLAINTEXT`), so that after
   the purge the source reports the place as :data:`~events.ops.lineage.REDACTED`;
4. it returns one :class:`Purge` per place it purged (on a dry run: would purge), or left
   alone with :data:`LEFT` when it cannot tell whether the place holds their data, the
   ``detail`` saying why and what to do;
5. it is idempotent: called again after a crash it finishes a purge it had begun, and a
   place it purged before is not purged again (nor listed).

The hook evp ships: ``training`` (:mod:`trainer.erasure`: the shard files of snapshots that
hold rows folded from the subject's decrypted personal fields). Adding one is one more entry
point in ``pyproject.toml``::

    [project.entry-points."evp.erasure"]
    mine = "mypackage.erasure:purge"
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any

from events.errors import ErasureHookError, ErasureIncomplete, EvpError
from events.ops.lineage import installed
from events.project import Project
from events.settings import Settings
from events.store.client import EventStore

#: The entry-point group of erasure hooks.
ERASURE_GROUP = "evp.erasure"

PURGED = "purged"  #: deleted (on a dry run: would be deleted)
LEFT = "left"  #: not purged: the hook cannot tell whether it holds their data; the detail says what to do
PURGE_STATES = (PURGED, LEFT)

#: The store of the erasure whose hooks are running (see :func:`erasure_store`).
_ERASING: ContextVar[EventStore | None] = ContextVar("evp_erasing_store", default=None)


@dataclass(frozen=True)
class Purge:
    """One place an erasure hook purged of a subject's plaintext (or would, or left alone).

    ``where`` names the place as a lineage holding does (``snapshot snap-…``); ``kind`` says
    what was removed there (``shard files``); ``files`` how many were deleted (on a dry run:
    are there to delete); ``hook`` is filled in with the entry point's name by
    :func:`run_erasure_hooks`.
    """

    where: str
    kind: str
    files: int
    detail: str
    state: str = PURGED
    hook: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"where": self.where, "kind": self.kind, "files": self.files, "detail": self.detail,
                "state": self.state, "hook": self.hook}


#: ``(settings, project, subject_id, dry_run) -> purges``: what an ``evp.erasure`` entry point names.
ErasureHook = Callable[[Settings, Project | None, str, bool], Sequence[Purge]]


@dataclass(frozen=True)
class Purges:
    """What every hook purged, and the hooks that could not be loaded."""

    purges: tuple[Purge, ...] = ()
    hooks: tuple[str, ...] = ()  #: the hooks run, in order
    unavailable: Mapping[str, str] = field(default_factory=dict)  #: hook -> why it could not be loaded


def erasure_hooks() -> dict[str, ErasureHook | str]:
    """The installed hooks by name (sorted); a hook that does not import maps to the reason."""
    return installed(ERASURE_GROUP)


@contextmanager
def erasure_store(settings: Settings) -> Iterator[EventStore]:
    """The store a hook reads through: the erasure's own while :func:`run_erasure_hooks` runs
    the hook with its settings, else one opened for these settings and closed after."""
    current = _ERASING.get()
    if current is not None and current.settings == settings:
        yield current
        return
    with EventStore.open(settings) as opened:
        yield opened


def run_erasure_hooks(settings: Settings, project: Project | None, subject_id: str, *, dry_run: bool,
                      hooks: Mapping[str, ErasureHook | str] | None = None, store: EventStore | None = None) -> Purges:
    """Run every hook (default: :func:`erasure_hooks`) for ``subject_id``.

    1. call each hook in name order, with ``store`` (the erasure's) as what
       :func:`erasure_store` hands it; one that could not be loaded is named in
       ``unavailable`` with the reason, so the report never passes over it in silence;
    2. check what each returned: a list of :class:`Purge` with a known state and a file
       count that is not negative, else :class:`ErasureHookError` naming the hook and the purge;
    3. stamp each purge with its hook's name;
    4. on a dry run a hook's error is raised as it is (nothing changed); after the erasure the
       other hooks still run, then :class:`ErasureIncomplete` names every hook that failed
       (the erasure stands, and running it again finishes the purge).
    """
    done: list[Purge] = []
    ran: list[str] = []
    unavailable: dict[str, str] = {}
    failures: dict[str, str] = {}
    token = _ERASING.set(store)
    try:
        for name, hook in (erasure_hooks() if hooks is None else hooks).items():
            if isinstance(hook, str):
                unavailable[name] = hook
                continue
            try:
                done += _checked(name, hook(settings, project, subject_id, dry_run))
            except (EvpError, OSError) as err:
                if dry_run:
                    raise
                failures[name] = str(err)
            ran.append(name)
    finally:
        _ERASING.reset(token)
    if failures:
        raise ErasureIncomplete(subject_id, failures)
    return Purges(tuple(done), tuple(ran), unavailable)


def _checked(hook: str, answer: object) -> list[Purge]:
    if not isinstance(answer, (list, tuple)):
        raise ErasureHookError(hook, f"returned {type(answer).__name__}, not a list of Purge")
    out: list[Purge] = []
    for purge in answer:
        if not isinstance(purge, Purge):
            raise ErasureHookError(hook, f"returned {purge!r}, not a Purge")
        if purge.state not in PURGE_STATES:
            raise ErasureHookError(hook, f"purge {purge.where!r}: state {purge.state!r} is not one of "
                                         f"{', '.join(PURGE_STATES)}")
        if isinstance(purge.files, bool) or not isinstance(purge.files, int) or purge.files < 0:
            raise ErasureHookError(hook, f"purge {purge.where!r}: files {purge.files!r} is not a whole number >= 0")
        out.append(replace(purge, hook=hook))
    return out


def describe_purges(purges: Purges, *, dry_run: bool) -> list[str]:
    """One line per purge, then each hook that could not be run (for the erasure report's text)."""
    verb = {PURGED: "would purge" if dry_run else "purged", LEFT: "left"}
    lines = [f"  {verb[p.state]} {p.where}: {p.files} {p.kind} ({p.hook}): {p.detail}" for p in purges.purges]
    lines += [f"  not run: erasure hook {name} ({reason})" for name, reason in purges.unavailable.items()]
    return lines
