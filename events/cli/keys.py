"""``evp keys rotate``: re-wrap every data key under a new key-encryption key."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from events.adapters.files import write_bytes_atomically
from events.privacy.kek import LocalKek, kek_from_settings
from events.privacy.keyring import Keyring, PostgresKeyStore
from events.settings import Settings


def _rotate(args: argparse.Namespace, settings: Settings) -> int:
    store = PostgresKeyStore(settings.database_url)
    store.ensure_schema()
    old = kek_from_settings(settings)
    new = LocalKek.generate()
    target = Path(args.write_to) if args.write_to else settings.kek_path
    # The new key is on disk before any data key is re-wrapped under it: a crash in
    # between leaves `<file>.next` holding the key that the store now needs.
    pending = target.with_name(target.name + ".next")
    write_bytes_atomically(pending, (new.export_base64() + "\n").encode(), mode=0o600)
    count = Keyring(store, old).rotate(new)
    os.replace(pending, target)
    print(f"re-wrapped {count} keys from key-encryption key {old.key_id} to {new.key_id}; new key written to {target}")
    if settings.kek:
        print("note: EVP_KEK is set in the environment; replace it with the new key (base64 in the file above)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("keys", help="manage the key-encryption key")
    group = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    rotate = group.add_parser("rotate", help="re-wrap every data key under a new key-encryption key")
    rotate.add_argument("--write-to", help="where to write the new key (default: the configured key file)")
    rotate.set_defaults(func=_rotate)
