"""A restore drill: restore a backup set into a sandbox of its own and prove it equal.

A backup that was never restored is a hope, not a backup. Contract of :func:`restore_drill`:

1. make a fresh sandbox ``sandbox`` on the same services (:func:`events.ops.sandbox.fresh_sandbox`:
   its own database, topics and home);
2. restore the set's newest chain there (:func:`events.ops.restore.restore_backup`) with
   the deployment's key-encryption key, backup key and project, copying the wrapped data
   keys and tombstones from the live keyring (never plaintext keys);
3. return the sandbox's settings and the restore's report, whose proofs (chain heads, view
   digests) say whether the copy equals what was backed up.

The sandbox stays for inspection until the next drill of the same name replaces it.
"""

from __future__ import annotations

from contextlib import closing
from pathlib import Path

from events.ops.backup import BackupKey, OnProgress
from events.ops.restore import RestoreReport, restore_backup
from events.ops.sandbox import fresh_sandbox
from events.privacy.keyring import PostgresKeyStore
from events.settings import Settings

DEFAULT_SANDBOX = "evp_restore_drill"


def restore_drill(settings: Settings, location: str | Path, *, sandbox: str = DEFAULT_SANDBOX,
                  on_progress: OnProgress | None = None) -> tuple[Settings, RestoreReport]:
    """Steps 1-3 of the module docstring."""
    key = BackupKey.from_settings(settings)
    target = fresh_sandbox(settings, sandbox).with_(kek_file=settings.kek_path, project=settings.project)
    with closing(PostgresKeyStore(settings.keyring_url)) as keys:
        return target, restore_backup(location, target, keys=keys, backup_key=key, on_progress=on_progress)
