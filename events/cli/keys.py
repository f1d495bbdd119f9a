"""``evp keys rotate``: every data key moves to a new key-encryption key, and no key is ever lost.

Run it after erasures: ``evp forget`` deletes a subject's wrapped key, but copies of it
stay in PostgreSQL's dead tuples and WAL and in every dump of ``evp_data_keys`` taken
before, and the KEK still unwraps them. Rotation re-wraps every live key under a new KEK
and then retires (deletes) the old KEK's file, which makes the old KEK and every old
wrapped copy useless. (With ``EVP_KEK`` in the environment, replacing that value is yours.)

Contract of :func:`rotate_kek` — resumable: the key store records the rotation
(``evp_kek_state``), so running the command again after a crash at any step finishes the
rotation with the key it started with, never a new one:

1. **write the keys**: the current KEK (unless it comes from ``EVP_KEK``) and a new one
   each go to a file of their own, ``<kek file>.<key id>`` (0600, fsynced with its
   folder); an existing key file is never overwritten. A crash here leaves a new key file
   nothing uses yet; the next run takes that key (never a retired one) instead of making
   another;
2. **record**: check that the current KEK unwraps every live key, then, in one
   transaction, make the new KEK the store's current one and record the rotation. From
   here on no key can be created under the old KEK (the store checks it when it inserts),
   and a process still holding it is refused (or follows, see :class:`Keyring`);
3. **re-wrap** every live key still under the old KEK, a batch per transaction (resumable:
   it takes whatever is still under the old KEK);
4. **verify** that every live key is wrapped by the new KEK and unwraps with it — only then
   is anything retired;
5. **switch** the configured key file (a symbolic link) to the new key file, atomically;
6. **retire** the old KEK: delete its files and record it as retired in the store, which
   ends the rotation.

If the new key's file is gone when a run resumes (someone deleted it) and no key was moved
to it yet, the rotation is rolled back: the old KEK is current again and nothing was lost.
"""

from __future__ import annotations

import argparse
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from events.errors import ConfigurationError, CryptoError
from events.privacy.kek import KeyEncryptionKey, KeyFiles, LocalKek, kek_finder
from events.privacy.keyring import Keyring, PostgresKeyStore
from events.settings import Settings

#: Where :func:`rotate_kek` calls its checkpoint, in order: after each numbered step, and in
#: step 3 after each batch.
STEPS = ("key-written", "recorded", "rewrap-batch", "rewrapped", "verified", "switched", "retired")
Checkpoint = Callable[[str], None]


@dataclass(frozen=True)
class RotationReport:
    old_kek_id: str
    new_kek_id: str
    keys: int  #: live keys now wrapped by the new KEK (verified)
    rewrapped: int  #: how many of them this run moved
    resumed: bool  #: this run finished a rotation an earlier run started
    key_file: Path  #: the new key's own file
    retired_files: tuple[Path, ...]


def rotate_kek(
    settings: Settings, *, write_to: Path | None = None, batch: int = 500, checkpoint: Checkpoint | None = None,
) -> RotationReport:
    """Rotate the KEK, or finish the rotation an earlier run started; see the module docstring."""
    if batch < 1:
        raise ConfigurationError(f"--batch-size must be at least 1, got {batch}")
    if write_to is not None and Path(write_to).absolute() != settings.kek_path.absolute():
        # A pointer elsewhere would leave the configured key file stranded (retired, or still
        # naming the old key): every process reads the KEK from settings.kek_path.
        raise ConfigurationError(
            f"--write-to {write_to} is not the configured key file {settings.kek_path}: point EVP_KEK_FILE at "
            f"{write_to} and run the rotation again without --write-to"
        )
    step = checkpoint or (lambda name: None)
    files = KeyFiles(write_to or settings.kek_path)
    old_files = KeyFiles(settings.kek_path)
    find = kek_finder(settings, files.pointer)
    store = PostgresKeyStore(settings.keyring_url)
    try:
        store.ensure_schema()
        state = store.kek_state()
        resumed = state.rotating_to is not None
        new: KeyEncryptionKey
        if state.rotating_to is None:
            old = _current_kek(settings)
            if state.current not in (None, old.key_id):  # before any file is written
                raise CryptoError(
                    f"the key-encryption key does not match: the key store is wrapped by key-encryption key "
                    f"{state.current}, but the key given is {old.key_id}"
                )
            known = {old.key_id, *state.retired} | ({state.current} if state.current else set())
            fresh = _new_kek(files, known=known)
            new = fresh
            if not settings.kek:
                old_files.write(old)  # 1. the old key too gets its own file: the pointer may be replaced
            files.write(fresh)
            step("key-written")
            keyring = Keyring(store, old)
            keyring.begin_rotation(new)  # 2.
            step("recorded")
        else:
            old_id, new_id = state.rotating_from or "", state.rotating_to
            found = find(new_id)
            if found is None:
                return _roll_back(store, settings, old_id, new_id, find)
            new = found
            keyring = Keyring(store, find(old_id) or new)
        count = keyring.rewrap(new, batch=batch, after_batch=lambda: step("rewrap-batch"))  # 3.
        step("rewrapped")
        keys = keyring.verify_rotation(new)  # 4.
        step("verified")
        old_id = store.kek_state().rotating_from or ""
        files.point_to(new.key_id)  # 5.
        store.set_rotation_step(new.key_id, "retire")
        step("switched")
        retired = [*old_files.retire(old_id), *(files.retire(old_id) if files.pointer != old_files.pointer else [])]  # 6.
        step("retired")
        keyring.end_rotation(new)
        return RotationReport(old_id, new.key_id, keys, count, resumed, files.path_of(new.key_id), tuple(retired))
    finally:
        store.close()


def _current_kek(settings: Settings) -> LocalKek:
    """The KEK in use: ``EVP_KEK`` or the key file. Rotation never creates one."""
    current = LocalKek.from_base64(settings.kek, source="EVP_KEK") if settings.kek else KeyFiles(settings.kek_path).current()
    if current is None:
        raise ConfigurationError(
            f"there is no key-encryption key to rotate: EVP_KEK is unset and {settings.kek_path} does not exist"
        )
    return current


def _new_kek(files: KeyFiles, *, known: set[str]) -> LocalKek:
    """A key file left by a run that died in step 1 (never used, never retired), else a fresh key."""
    left = files.unused(known)
    return left[0] if left else LocalKek.generate()


def _roll_back(
    store: PostgresKeyStore, settings: Settings, old_id: str, new_id: str,
    find: Callable[[str], KeyEncryptionKey | None],
) -> RotationReport:
    """The new key is missing: undo the rotation if nothing depends on it, else refuse naming both keys."""
    if store.live_under(new_id, 1):
        raise CryptoError(
            f"the rotation from key-encryption key {old_id} to {new_id} cannot finish: keys are wrapped by "
            f"{new_id}, but its file {KeyFiles(settings.kek_path).path_of(new_id)} is missing; restore that file"
        )
    if find(old_id) is None:
        raise CryptoError(f"neither key-encryption key {old_id} nor {new_id} of the pending rotation is at hand")
    store.abort_rotation(old_id, new_id)
    return RotationReport(old_id, old_id, 0, 0, True, KeyFiles(settings.kek_path).path_of(old_id), ())


def _kill_hook() -> Checkpoint | None:
    """Tests only: ``EVP_TEST_KILL_AT=<step>`` SIGKILLs this process at that checkpoint (one of :data:`STEPS`).

    The one place this variable is read; without it the procedure runs straight through.
    """
    target = os.environ.get("EVP_TEST_KILL_AT")
    if not target:
        return None
    if target not in STEPS:
        raise ConfigurationError(f"EVP_TEST_KILL_AT must be one of {', '.join(STEPS)}, got {target!r}")

    def kill(name: str) -> None:
        if name == target:
            os.kill(os.getpid(), signal.SIGKILL)

    return kill


def _rotate(args: argparse.Namespace, settings: Settings) -> int:
    report = rotate_kek(settings, write_to=Path(args.write_to) if args.write_to else None,
                        batch=args.batch_size, checkpoint=_kill_hook())
    if report.old_kek_id == report.new_kek_id:
        print(f"rolled back the unfinished rotation: its new key file was missing and no key used it; "
              f"key-encryption key {report.old_kek_id} stays current. Run `evp keys rotate` again to rotate.")
        return 0
    note = f" (finished a rotation an earlier run started; {report.rewrapped} moved by this run)" if report.resumed else ""
    print(f"re-wrapped {report.keys} keys from key-encryption key {report.old_kek_id} to {report.new_kek_id}{note}; "
          f"new key in {report.key_file}; old key retired")
    for path in report.retired_files:
        print(f"  deleted {path}")
    if settings.kek:
        print(f"note: EVP_KEK is set in the environment and holds the retired key {report.old_kek_id}; "
              f"replace it with the new key (base64 in {report.key_file})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("keys", help="manage the key-encryption key")
    group = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    rotate = group.add_parser(
        "rotate", help="re-wrap every data key under a new key-encryption key and retire the old one "
                       "(run it after erasures; run it again to finish an interrupted rotation)")
    rotate.add_argument("--write-to", help="the key file to switch to the new key (default: the configured key file)")
    rotate.add_argument("--batch-size", type=int, default=500, help="keys re-wrapped per transaction")
    rotate.set_defaults(func=_rotate)
