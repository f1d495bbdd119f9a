"""``evp backup create | list | verify | restore [LOCATION]``: a backup set in a folder or at any fsspec URL.

``LOCATION`` defaults to ``EVP_BACKUP_TARGET``. ``create`` writes a full backup, or with
``--incremental`` only what changed since the set's newest backup; ``verify`` checks every
backup of the set and the links between them; ``restore`` restores a chain (the newest, or
``--backup N``) into empty services and proves it equal (chain heads, view digests);
``drill`` does that into a fresh sandbox of the same services (a restore test to run often).

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

from events.adapters.storage import Storage
from events.ops.backup import BackupKey, Manifest, OnProgress, Progress
from events.ops.backup_set import create_backup, manifests, verify_set
from events.ops.drill import DEFAULT_SANDBOX, restore_drill
from events.ops.restore import restore_backup
from events.cli.common import print_json, print_table
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


def _location(args: argparse.Namespace) -> str:
    chosen = args.location or os.environ.get("EVP_BACKUP_TARGET")
    if not chosen:
        raise ConfigurationError("no backup location: pass LOCATION (a folder or an fsspec URL such as s3://bucket/evp) "
                                 "or set EVP_BACKUP_TARGET")
    return str(chosen)


def _describe(where: str, manifest: Manifest) -> str:
    ranges = ", ".join(f"{p}:[{s}, {e})" for p, (s, e) in sorted(manifest.ranges.items()))
    parent = f", continuing backup {manifest.parent.sequence}" if manifest.parent else ""
    return (f"backup {where}: {manifest.kind}{parent}, cut at ledger position {manifest.position}: "
            f"{manifest.records} records of {manifest.topic} (partitions {ranges}), {manifest.schema_records} schema "
            f"records, {sum(manifest.state.values())} state rows, taken {manifest.created_at}\nsha256 {manifest.sha256}"
            + (f"\nmac {manifest.mac} (backup key {manifest.mac_key_id})" if manifest.mac else ""))


def _create(args: argparse.Namespace, settings: Settings) -> int:
    location = _location(args)
    with EventStore.open(settings) as store, _progress() as on_progress:
        # events still in the outbox belong in the backup: the cut publishes them first
        publish = None if args.no_flush else store.flush
        manifest = create_backup(settings, location, incremental=args.incremental, on_progress=on_progress,
                                 publish=publish)
    if args.json:
        print_json(manifest.as_dict())
    else:
        print(_describe(Storage(location).describe(manifest.name), manifest))
        for name, proof in sorted(manifest.proofs.items()):
            print(f"recorded {name}: {', '.join(sorted(proof)) or 'none at the cut'}")
    return 0


def _list(args: argparse.Namespace, settings: Settings) -> int:
    found = manifests(Storage(_location(args)))
    if args.json:
        print_json({"location": _location(args), "backups": [m.as_dict() for m in found]})
        return 0
    print_table([{"backup": m.sequence, "kind": m.kind, "parent": m.parent.sequence if m.parent else "-",
                  "position": m.position, "records": m.records, "taken": m.created_at} for m in found],
                ("backup", "kind", "parent", "position", "records", "taken"))
    return 0


def _verify(args: argparse.Namespace, settings: Settings) -> int:
    key = None if args.corruption_only else BackupKey.from_settings(settings)
    location = _location(args)
    with _progress() as on_progress:
        report = verify_set(location, key, on_progress=on_progress)
    if args.json:
        print_json({"location": location, "authenticated": key is not None,
                    "backups": [m.as_dict() for m in report.backups]})
        return 0
    storage = Storage(location)
    for manifest in report.backups:
        print(_describe(storage.describe(manifest.name), manifest))
    how = (f"authentic (MACs under backup key {report.backups[-1].mac_key_id})" if key is not None else
           "NOT authenticated (--corruption-only does not detect an edited, re-hashed backup)")
    print(f"verified {len(report.backups)} backups ({report.records} records): {how}, counts, hashes, chain links "
          "and every incremental's link to its parent match")
    return 0


def _drill(args: argparse.Namespace, settings: Settings) -> int:
    location = _location(args)
    with _progress() as on_progress:
        target, report = restore_drill(settings, location, sandbox=args.sandbox, on_progress=on_progress)
    if args.json:
        print_json({**asdict(report), "proved": report.proved, "database": describe_database(target.database_url)})
    else:
        print(report)
        print(f"the restored copy stays in database {describe_database(target.database_url)}, topics "
              f"{target.topic_prefix}.* (until the next drill named {args.sandbox})")
    return 0 if report.proved else 1


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
            report = restore_backup(_location(args), settings, keys=keys, on_progress=on_progress, sequence=args.backup)
    finally:
        if keys is not None:
            keys.close()
    if args.json:
        print_json({**asdict(report), "proved": report.proved})
        return 0 if report.proved else 1
    print(report)
    if keys is None:
        print("no keys copied: personal fields decrypt only where this database's keyring holds their keys "
              "(use --keys-from-env VAR or --keys-from-file PATH holding the live keyring's DATABASE_URL to copy its "
              "wrapped keys and tombstones)")
    if report.incomplete_streams:
        print(f"warning: {len(report.incomplete_streams)} streams lack early versions (the backup did not start at "
              f"offset 0): {', '.join(report.incomplete_streams[:5])}")
    return 0 if report.proved else 1


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("backup", help="full and incremental backups of the log, verified, restorable")
    group = parser.add_subparsers(dest="backup_command", metavar="ACTION", required=True)

    create = group.add_parser("create", help="cut the log at one point and write it to LOCATION as the next backup")
    create.add_argument("--incremental", action="store_true",
                        help="only what changed since the newest backup at LOCATION (which it continues)")
    create.add_argument("--no-flush", action="store_true",
                        help="do not publish the outbox: wait for a running relay instead")
    create.set_defaults(func=_create)

    listing = group.add_parser("list", help="the backups at LOCATION: sequence, kind, parent, cut, records")
    listing.set_defaults(func=_list)

    verify = group.add_parser("verify", help="authenticate every backup at LOCATION, re-read it, check hashes and links")
    verify.add_argument("--corruption-only", action="store_true",
                        help="without the backup key: check counts and sha256 only (finds corruption, not an edit)")
    verify.set_defaults(func=_verify)

    restore = group.add_parser("restore", help="restore a chain from LOCATION into an empty topic and database, prove it equal")
    restore.add_argument("--backup", type=int, metavar="N", help="restore up to backup N (default: the newest)")
    source = restore.add_mutually_exclusive_group()
    source.add_argument("--keys-from-env", metavar="VAR",
                        help="copy wrapped data keys and tombstones from the keyring at the DATABASE_URL in $VAR")
    source.add_argument("--keys-from-file", metavar="PATH",
                        help="... at the DATABASE_URL in PATH (a file only you can read: chmod 600)")
    source.add_argument("--keys-from", metavar="DATABASE_URL", type=keys_url_from_argv,
                        help="... at this DATABASE_URL, which must hold no password (argv is public)")
    restore.set_defaults(func=_restore)

    drill = group.add_parser("drill", help="restore LOCATION into a fresh sandbox of these services and prove it equal")
    drill.add_argument("--sandbox", default=DEFAULT_SANDBOX,
                       help=f"the sandbox's name: its database, topics and home (default: {DEFAULT_SANDBOX})")
    drill.set_defaults(func=_drill)

    for action in (create, listing, verify, restore, drill):
        action.add_argument("location", metavar="LOCATION", nargs="?",
                            help="a folder or fsspec URL (memory://, s3://...); default: EVP_BACKUP_TARGET")
        action.add_argument("--json", action="store_true", help="machine-readable output")
