"""``evp backup create PATH``, ``evp backup verify PATH`` and ``evp backup restore PATH``.

A restore copies keys from a live keyring whose connection string usually holds a password.
A command line is readable by every local user (``ps``, ``/proc/<pid>/cmdline``), so the
URL comes from an environment variable (``--keys-from-env VAR``) or a private file
(``--keys-from-file PATH``, mode 0600 or stricter); ``--keys-from URL`` is refused when the
URL holds a password.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from events.ops.backup import BackupKey, Manifest, OnProgress, Progress, create_backup, verify_backup
from events.ops.restore import restore_backup
from events.cli.common import print_json
from events.errors import ConfigurationError
from events.store.client import EventStore
from events.privacy.keyring import PostgresKeyStore
from events.settings import Settings, describe_database, has_password

_HOW_TO_PASS = ("put the URL in an environment variable and pass --keys-from-env VAR, or in a file only you can read "
                "(chmod 600) and pass --keys-from-file PATH; or leave the password out and let libpq read ~/.pgpass")


@contextmanager
def _progress() -> Iterator[OnProgress]:
    """One bar per phase on a terminal (stderr, so stdout stays clean); silent otherwise."""
    bars: dict[str, tqdm] = {}

    def update(progress: Progress) -> None:
        bar = bars.get(progress.phase)
        if bar is None:
            for done in bars.values():
                done.close()
            bar = bars[progress.phase] = tqdm(desc=progress.phase, total=progress.total, unit="rec",
                                              disable=None, file=sys.stderr)
        bar.n = progress.done
        bar.refresh()

    try:
        yield update
    finally:
        for bar in bars.values():
            bar.close()


def _describe(path: str, manifest: Manifest) -> str:
    ranges = ", ".join(f"{p}:[{s}, {e})" for p, (s, e) in sorted(manifest.ranges.items()))
    return (f"backup {path}: {manifest.records} records of {manifest.topic} (partitions {ranges}), "
            f"{manifest.schema_records} schema records, taken {manifest.created_at}\nsha256 {manifest.sha256}"
            + (f"\nmac {manifest.mac} (backup key {manifest.mac_key_id})" if manifest.mac else ""))


def _create(args: argparse.Namespace, settings: Settings) -> int:
    if not args.no_flush:  # events still in the outbox belong in the backup
        with EventStore.open(settings) as store:
            store.flush()
    with _progress() as on_progress:
        manifest = create_backup(settings, Path(args.path), on_progress=on_progress)
    if args.json:
        print_json(manifest.as_dict())
    else:
        print(_describe(args.path, manifest))
    return 0


def _verify(args: argparse.Namespace, settings: Settings) -> int:
    key = None if args.corruption_only else BackupKey.from_settings(settings)
    with _progress() as on_progress:
        manifest = verify_backup(Path(args.path), key, on_progress=on_progress)
    if args.json:
        print_json({**manifest.as_dict(), "authenticated": key is not None})
    elif key is None:
        print(f"{_describe(args.path, manifest)}\nverified: counts and hash match (NOT authenticated: "
              "--corruption-only does not detect an edited, re-hashed backup)")
    else:
        print(f"{_describe(args.path, manifest)}\nverified: authentic (MAC under backup key {manifest.mac_key_id}), "
              "counts and hash match")
    return 0


def keys_url_from_argv(url: str) -> str:
    """``--keys-from URL``: refused when the URL holds a password (argv is public)."""
    if has_password(url):
        raise argparse.ArgumentTypeError(
            f"the URL for {describe_database(url)} holds a password, and a command line is readable by every local "
            f"user: {_HOW_TO_PASS}"
        )
    return url


def keys_url_from_file(path: Path) -> str:
    """The URL in ``path``: a regular file of ours that group and others cannot read."""
    try:
        info = path.stat()
    except OSError as err:
        raise ConfigurationError(f"--keys-from-file {path}: cannot read it: {err}") from err
    if not stat.S_ISREG(info.st_mode):
        raise ConfigurationError(f"--keys-from-file {path} is not a regular file")
    if info.st_mode & 0o077:
        raise ConfigurationError(
            f"--keys-from-file {path} has mode {stat.S_IMODE(info.st_mode):04o}: a file holding a database password "
            f"must be readable by its owner only (chmod 600 {path})"
        )
    if info.st_uid != os.geteuid():
        raise ConfigurationError(f"--keys-from-file {path} belongs to uid {info.st_uid}, not to you (uid {os.geteuid()})")
    url = path.read_text(encoding="utf-8").strip()
    if not url:
        raise ConfigurationError(f"--keys-from-file {path} is empty: it must hold the keyring's DATABASE_URL")
    return url


def keys_url(args: argparse.Namespace, env: dict[str, str] | None = None) -> str | None:
    """The live keyring's connection string, from exactly one of the three options (or None)."""
    if args.keys_from_env:
        value = (os.environ if env is None else env).get(args.keys_from_env, "").strip()
        if not value:
            raise ConfigurationError(f"--keys-from-env {args.keys_from_env}: that environment variable is unset or empty")
        return value
    if args.keys_from_file:
        return keys_url_from_file(Path(args.keys_from_file))
    return str(args.keys_from) if args.keys_from else None


def _restore(args: argparse.Namespace, settings: Settings) -> int:
    url = keys_url(args)
    keys = PostgresKeyStore(url) if url else None
    try:
        with _progress() as on_progress:
            report = restore_backup(Path(args.path), settings, keys=keys, on_progress=on_progress)
    finally:
        if keys is not None:
            keys.close()
    if args.json:
        print_json(asdict(report))
        return 0
    print(report)
    if keys is None:
        print("no keys copied: personal fields decrypt only where this database's keyring holds their keys "
              "(use --keys-from-env VAR or --keys-from-file PATH holding the live keyring's DATABASE_URL to copy its "
              "wrapped keys and tombstones)")
    if report.incomplete_streams:
        print(f"warning: {len(report.incomplete_streams)} streams lack early versions (the backup did not start at "
              f"offset 0): {', '.join(report.incomplete_streams[:5])}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("backup", help="back up the event log to one file, verify it, restore it")
    group = parser.add_subparsers(dest="backup_command", metavar="ACTION", required=True)

    create = group.add_parser("create", help="pin the log's end offsets and write the events and schemas to PATH")
    create.add_argument("--no-flush", action="store_true", help="do not publish the outbox first (Kafka only)")
    create.set_defaults(func=_create)

    verify = group.add_parser("verify", help="authenticate PATH (MAC under the backup key), re-read it, check counts and sha256")
    verify.add_argument("--corruption-only", action="store_true",
                        help="without the backup key: check counts and sha256 only (finds corruption, not an edit)")
    verify.set_defaults(func=_verify)

    restore = group.add_parser("restore", help="restore PATH into an empty topic and database (these settings)")
    source = restore.add_mutually_exclusive_group()
    source.add_argument("--keys-from-env", metavar="VAR",
                        help="copy wrapped data keys and tombstones from the keyring at the DATABASE_URL in $VAR")
    source.add_argument("--keys-from-file", metavar="PATH",
                        help="... at the DATABASE_URL in PATH (a file only you can read: chmod 600)")
    source.add_argument("--keys-from", metavar="DATABASE_URL", type=keys_url_from_argv,
                        help="... at this DATABASE_URL, which must hold no password (argv is public)")
    restore.set_defaults(func=_restore)

    for action in (create, verify, restore):
        action.add_argument("path", metavar="PATH")
        action.add_argument("--json", action="store_true", help="machine-readable output")
