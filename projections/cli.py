"""``evp projections run | catch-up | rebuild | status | digest | grant NAME``, ``evp projections dlq list | replay NAME``.

``NAME`` is a view declared in the project's ``evp.toml`` (``[views]``), or a
``module:Class`` spec; the project is found by :func:`events.project.require_project`.

``python -m projections.cli ACTION`` runs the same actions without loading the other
command groups (the trainer's import torch, which takes seconds): handy for a runner
process that is restarted often.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime

from tqdm import tqdm

from events.cli.common import add_point_options, point_of, print_json, print_table
from events.errors import ConfigurationError, EvpError
from events.project import catalog_for, require_project
from events.settings import Settings
from events.adapters import postgres
from events.store.cut import cut_at
from projections import tables
from projections.deadletter import (
    DeadLetter, DeadRecord, as_dict, dead_records, originals, read_dead_letters, select, source_message,
)
from projections.rebuild import PastRebuild, rebuild, rebuild_as_of, shadow_name
from projections.roles import DEFAULT_PREFIX, check_views_schema, roles_exist, setup_roles
from projections.runner import (
    REPLAY_APPLIED, REPLAY_CONFLICT, REPLAY_DUPLICATE, REPLAY_FAILED, BatchOutcome, CatchUpResult, Progress,
    ProjectionRunner, Replayed, applied_since, projection_lag,
)
from events.store.source import Message, open_codec
from projections.declarations import load_view
from projections.view import View

REPORT_EVERY_S = 10.0


def _view(args: argparse.Namespace, settings: Settings) -> View:
    project = require_project(settings, f"evp projections {args.projections_command}")
    return load_view(project, args.view)


@contextmanager
def _progress_bar(description: str) -> Iterator[Callable[[Progress], None]]:
    """A progress callback drawing a bar on a terminal, silent otherwise."""
    bar = tqdm(desc=description, unit="rec", disable=None, file=sys.stderr)
    try:
        def update(progress: Progress) -> None:
            bar.total = progress.total
            bar.n = progress.consumed
            bar.refresh()

        yield update
    finally:
        bar.close()


def _run(args: argparse.Namespace, settings: Settings) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    projection = _view(args, settings)
    totals = BatchOutcome()
    last_report = time.monotonic()

    def on_batch(outcome: BatchOutcome) -> None:
        nonlocal totals, last_report
        totals = totals + outcome
        if time.monotonic() - last_report >= REPORT_EVERY_S:
            last_report = time.monotonic()
            print(f"projection {projection.name}: {totals.applied} applied, {totals.skipped} duplicates skipped, "
                  f"{totals.dead_lettered} dead-lettered", flush=True)

    with ProjectionRunner(settings, projection, schema=args.schema, batch_size=args.batch_size,
                          catalog=catalog_for(settings), scale_out=args.scale_out, prefetch=args.prefetch) as runner:
        shared = " (sharing the partitions with the view's other runners)" if args.scale_out else ""
        print(f"projection {projection.name}: folding {settings.events_topic} into schema {runner.schema}{shared}",
              flush=True)
        runner.run(stop, on_batch)
    print(f"projection {projection.name}: stopped after {totals.applied} applied, {totals.skipped} skipped, "
          f"{totals.dead_lettered} dead-lettered", flush=True)
    return 0


def _catch_up(args: argparse.Namespace, settings: Settings) -> int:
    projection = _view(args, settings)
    with ProjectionRunner(settings, projection, schema=args.schema, batch_size=args.batch_size,
                          catalog=catalog_for(settings), prefetch=args.prefetch) as runner:
        with _progress_bar(f"catch-up {runner.schema}") as on_progress:
            result = runner.catch_up(on_progress)
    if args.json:
        print_json(result.__dict__)
    else:
        print(f"caught up in {result.seconds:.1f}s: {_counts(result)}")
    return 0


def _counts(result: CatchUpResult) -> str:
    return f"{result.applied} applied, {result.skipped} duplicates skipped, {result.dead_lettered} dead-lettered"


def _rebuild(args: argparse.Namespace, settings: Settings) -> int:
    """A live rebuild (swapped in), or with ``--into``, the view as it was at a cut (never swapped)."""
    position, until = point_of(args, "--until")
    if args.into is not None:
        return _rebuild_past(args, settings, position, until)
    if position is not None or until is not None:
        raise ConfigurationError(
            f"{'--position' if position is not None else '--until'} rebuilds the view as it was, and needs --into SCHEMA: "
            "a past view is replayed into a schema of its own and never replaces the live one"
        )
    projection = _view(args, settings)
    schema = projection.layout(args.schema).schema
    prefix = args.role_prefix
    with postgres.connect(settings.database_url, autocommit=True) as conn:
        has_roles = roles_exist(conn, prefix)
    # A swapped-in schema has no grants: give the shadow the roles' grants before the swap,
    # so analysts never lose access (or gain any) during a rebuild. Granting is the admin's.
    admin_url = settings.admin_url(f"rebuilding a view with roles ({prefix}*)") if has_roles else None
    with (postgres.connect(admin_url, autocommit=True) if admin_url else _no_connection()) as admin:

        def regrant() -> None:
            assert admin is not None
            setup_roles(admin, [projection.layout(shadow_name(schema))], prefix=prefix)

        keep_grants = regrant if admin is not None else None
        with _progress_bar(f"rebuild {schema}") as on_progress:
            result = rebuild(settings, projection, schema=args.schema, on_progress=on_progress, before_swap=keep_grants,
                             prefetch=args.prefetch)
    if args.json:
        print_json({"schema": result.schema, "replay": result.replay.__dict__, "rows": result.rows, "seconds": result.seconds})
        return 0
    rows = ", ".join(f"{table} {count}" for table, count in result.rows.items())
    print(f"rebuilt {result.schema} in {result.seconds:.1f}s: {_counts(result.replay)}; rows: {rows}")
    return 0


def _rebuild_past(args: argparse.Namespace, settings: Settings, position: int | None, until: datetime | None) -> int:
    projection = _view(args, settings)
    with postgres.connect(settings.database_url, autocommit=True) as conn:
        cut = cut_at(conn, settings.partitions, position=position, time=until)
    with _progress_bar(f"rebuild {args.into} up to position {cut.position}") as on_progress:
        result = rebuild_as_of(settings, projection, cut, into=args.into, schema=args.schema, on_progress=on_progress,
                               prefetch=args.prefetch)
    if args.json:
        print_json({"view": projection.name, **result.as_dict()})
        return 0
    print(_past_summary(projection.name, result))
    return 0


def _past_summary(view: str, result: PastRebuild) -> str:
    replay = result.replay
    rows = ", ".join(f"{table} {count}" for table, count in result.rows.items())
    return (f"view {view} {replay.cut.describe()} rebuilt into schema {result.schema} in {result.seconds:.1f}s "
            f"(the live schema {result.live} untouched): {_counts(replay)}, {replay.beyond_cut} beyond the cut skipped; "
            f"rows: {rows}")


@contextmanager
def _no_connection() -> Iterator[None]:
    yield None


def _grant(args: argparse.Namespace, settings: Settings) -> int:
    """Roles are the administrator's: EVP_ADMIN_DATABASE_URL, on the ledger's database (evp's role may not)."""
    layout = _view(args, settings).layout(args.schema)
    check_views_schema(layout.schema)  # before connecting; setup_roles also refuses the ledger's schema
    admin_url = settings.admin_url("evp projections grant (it creates roles and grants on the ledger and keyring)")
    with postgres.connect(admin_url, autocommit=True) as conn:
        roles = setup_roles(conn, [layout], prefix=args.role_prefix)
    print(f"roles ready on {layout.schema}: {roles.projector} (writes views), {roles.analyst} (masked views only), "
          f"{roles.auditor} (audit view of the ledger)")
    return 0


def _digest(args: argparse.Namespace, settings: Settings) -> int:
    """A hash of the view's rows in key order: equal for two copies exactly when their rows are."""
    projection = _view(args, settings)
    with postgres.connect(settings.database_url, autocommit=True) as conn:
        result = tables.digest(conn, projection, args.schema)
    if args.json:
        print_json({"view": projection.name, "schema": result.schema, "rows": result.rows, "sha256": result.sha256})
    else:
        print(f"view {projection.name} in schema {result.schema}: {result.rows} rows, sha256 {result.sha256}")
    return 0


def _status(args: argparse.Namespace, settings: Settings) -> int:
    projection = _view(args, settings)
    schema = projection.layout(args.schema).schema
    lags = projection_lag(settings, schema)
    if args.json:
        print_json({"schema": schema, "partitions": [dict(l.__dict__, lag=l.lag) for l in lags]})
        return 0
    if not lags:
        print(f"topic {settings.events_topic} does not exist yet on {settings.kafka}: nothing to project")
        return 0
    print(f"projection {projection.name} in schema {schema}: total lag {sum(l.lag for l in lags)}")
    print_table(
        [{"partition": l.partition, "next_offset": "-" if l.next_offset is None else l.next_offset,
          "end_offset": l.end_offset, "lag": l.lag} for l in lags],
        ("partition", "next_offset", "end_offset", "lag"),
    )
    return 0


def _dead(settings: Settings, view: View) -> list[DeadRecord]:
    """The view's dead records (one per source record of the events topic), in source order."""
    letters = read_dead_letters(settings, settings.dead_letter_topic, projection=view.name)
    return [r for r in dead_records(letters) if r.latest.source_topic == settings.events_topic]


def _messages(settings: Settings, letters: Sequence[DeadLetter]) -> tuple[list[Message], dict[tuple[int, int], str]]:
    """The refused records as the runner read them (read back from the topic for letters sent without
    their content), and why some cannot be, by (partition, offset)."""
    fetched = originals(settings, letters)
    messages: list[Message] = []
    missing: dict[tuple[int, int], str] = {}
    for letter in letters:
        place = (letter.source_partition, letter.source_offset)
        found = fetched[place] if letter.omitted else source_message(letter)
        if isinstance(found, str):
            missing[place] = found
        else:
            messages.append(found)
    return messages, missing


def _dlq_list(args: argparse.Namespace, settings: Settings) -> int:
    """The view's dead records: why, from where, when, and whether a replay (or a re-send) has applied them since."""
    projection = _view(args, settings)
    schema = projection.layout(args.schema).schema
    records = _dead(settings, projection)
    messages, missing = _messages(settings, [r.latest for r in records])
    applied = applied_since(settings, schema, open_codec(settings, catalog_for(settings)), messages)
    state = {place: "unavailable" for place in missing} | {place: "applied" for place in applied}
    rows = [as_dict(r, state) for r in records]
    if args.json:
        print_json({"view": projection.name, "schema": schema, "topic": settings.dead_letter_topic,
                    "dead": sum(1 for row in rows if row["state"] == "dead"), "records": rows})
        return 0
    dead = sum(1 for row in rows if row["state"] == "dead")
    print(f"view {projection.name} (schema {schema}): {len(rows)} dead-lettered records in {settings.dead_letter_topic}, "
          f"{dead} still dead")
    if rows:
        print_table([dict(row, reason=str(row["reason"])[:100], event_id=row["event_id"] or "-") for row in rows],
                    ("letter_offset", "source_partition", "source_offset", "stage", "state", "event_id", "dead_at",
                     "letters", "reason"))
    return 0


def _dlq_replay(args: argparse.Namespace, settings: Settings) -> int:
    """Re-drive dead records through the view's handlers; exit 1 when some are still dead."""
    projection = _view(args, settings)
    letters = [r.latest for r in select(_dead(settings, projection), offset=args.offset, topic=settings.dead_letter_topic)]
    messages, missing = _messages(settings, letters)
    with ProjectionRunner(settings, projection, schema=args.schema, catalog=catalog_for(settings)) as runner:
        outcome = runner.replay(messages, {(l.source_partition, l.source_offset): l.attempts for l in letters})
        schema = runner.schema
    done = {(r.partition, r.offset): r for r in outcome.records}
    results = [done.get(place) or Replayed(*place, "unavailable", missing[place])
               for place in ((l.source_partition, l.source_offset) for l in letters)]
    counts = {kind: sum(1 for r in results if r.outcome == kind)
              for kind in (REPLAY_APPLIED, REPLAY_DUPLICATE, REPLAY_FAILED, REPLAY_CONFLICT, "unavailable")}
    if args.json:
        print_json({"view": projection.name, "schema": schema, "replayed": len(results), **counts,
                    "records": [dict(r.__dict__, letter_offset=l.letter_offset) for r, l in zip(results, letters)]})
    else:
        print(f"view {projection.name} (schema {schema}): replayed {len(results)} dead records: "
              f"{counts[REPLAY_APPLIED]} applied, {counts[REPLAY_DUPLICATE]} applied already (nothing done), "
              f"{counts[REPLAY_FAILED]} failed again and {counts[REPLAY_CONFLICT]} conflicting (new letters in "
              f"{settings.dead_letter_topic}), {counts['unavailable']} unavailable")
        for r in results:
            if r.outcome not in (REPLAY_APPLIED, REPLAY_DUPLICATE):
                print(f"  partition {r.partition} offset {r.offset}: {r.outcome}: {r.reason}")
    return 1 if counts[REPLAY_FAILED] + counts[REPLAY_CONFLICT] + counts["unavailable"] else 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("projections", help="fold the events topic into PostgreSQL views")
    group = parser.add_subparsers(dest="projections_command", metavar="ACTION", required=True)

    def add(name: str, help_text: str, func: Callable[[argparse.Namespace, Settings], int], *, batch: bool = False,
            json: bool = True) -> None:
        sub = group.add_parser(name, help=help_text)
        sub.add_argument("view", metavar="NAME", help="a view of the project's evp.toml [views], or module:Class")
        sub.add_argument("--schema", default=None, help="PostgreSQL schema of the view (default: the declared one)")
        if batch:
            sub.add_argument("--batch-size", type=int, default=5000, help="records per transaction")
        if json:
            sub.add_argument("--json", action="store_true")
        sub.set_defaults(func=func)

    add("run", "apply new events continuously until SIGTERM/SIGINT", _run, batch=True, json=False)
    group.choices["run"].add_argument("--scale-out", action="store_true",
                                      help="share the topic's partitions with the view's other runners (leases)")
    add("catch-up", "apply everything up to the current end of the log, then exit", _catch_up, batch=True)
    add("rebuild", "replay the log into a shadow schema and swap it in atomically; with --into, the view as it was, "
                   "beside the live one", _rebuild)
    rebuild_parser = group.choices["rebuild"]
    rebuild_parser.add_argument("--into", metavar="SCHEMA", default=None,
                                help="replay only up to --until/--position (default: the ledger's last position) into "
                                     "SCHEMA, a new or empty schema beside the live one; nothing is swapped")
    add_point_options(rebuild_parser, "the view (with --into)", "--until")
    # A long-running runner prefetches by default; a one-off job starts the process only when asked
    # (it takes about a second to start: worth it for a long replay, not for a short one).
    for name, default in (("run", True), ("catch-up", False), ("rebuild", False)):
        group.choices[name].add_argument(
            "--prefetch", action=argparse.BooleanOptionalAction, default=default,
            help="fetch and decode the next batch in a process of its own while this one applies"
                 f" (default: {'on' if default else 'off'})")
    add("status", "per-partition lag of the view behind the events topic", _status)
    add("digest", "a SHA-256 of the view's rows in key order (compare two copies of a view)", _digest)
    add("grant", "create or refresh the projector, analyst and auditor roles and their grants", _grant, json=False)
    for name in ("rebuild", "grant"):
        group.choices[name].add_argument("--role-prefix", default=DEFAULT_PREFIX,
                                         help="names the roles <prefix>projector, <prefix>analyst, <prefix>auditor")
    dlq = group.add_parser("dlq", help="the view's dead letters: list them, replay them once the cause is fixed")
    actions = dlq.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)
    for name, help_text, func in (
        ("list", "one line per dead-lettered record: why, source partition and offset, event id, when, state", _dlq_list),
        ("replay", "re-drive dead records through the view's handlers: applied once, or a new letter (exit 1 when "
                   "some are still dead)", _dlq_replay),
    ):
        sub = actions.add_parser(name, help=help_text)
        sub.add_argument("view", metavar="NAME", help="a view of the project's evp.toml [views], or module:Class")
        sub.add_argument("--schema", default=None, help="PostgreSQL schema of the view (default: the declared one)")
        sub.add_argument("--json", action="store_true")
        sub.set_defaults(func=func)
    which = actions.choices["replay"].add_mutually_exclusive_group(required=True)
    which.add_argument("--offset", type=int, default=None, metavar="O",
                       help="the dead record whose latest letter is at offset O of the dead-letter topic (dlq list)")
    which.add_argument("--all", action="store_true", help="every dead record of the view, in source order")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m projections.cli ACTION ...``: the same as ``evp projections ACTION ...``."""
    parser = argparse.ArgumentParser(prog="python -m projections.cli")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["projections", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args, Settings.from_env()) or 0)
    except EvpError as err:
        print(f"evp projections: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
