"""``evp sagas run | catch-up | list | show | resume | retry-step | mark-compensated | participant``.

``run`` and ``catch-up`` coordinate every saga the project declares (``[sagas]`` of
``evp.toml``); ``participant NAME`` runs one of its ``[participants]``. ``list`` and ``show``
read the coordinator's status rows and the ledger, and need no project. Operator actions
need ``--reason`` and are recorded as ``SagaOperatorAction`` events with the actor
(``--actor``, default ``EVP_ACTOR``).
"""

from __future__ import annotations

import argparse
import re
import signal
import threading
from datetime import timedelta
from typing import Any

from events.adapters import postgres
from events.cli.common import print_json, print_table
from events.errors import ConfigurationError
from events.project import require_project
from events.settings import Settings
from events.store.client import EventStore
from projections.declarations import load_participant, load_sagas
from projections.runner import BatchOutcome
from projections.sagas import store
from projections.sagas.coordinator import SagaCoordinator, act, utc_now
from projections.sagas.machine import MARK_COMPENSATED, RESUME, RETRY_STEP, STATES, Operator
from projections.sagas.participant import ParticipantRunner

_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_duration(text: str) -> timedelta:
    """``90s``, ``10m``, ``2h``, ``1d``."""
    found = _DURATION.match(text.strip())
    if not found:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 10m, 2h or 1d")
    return timedelta(**{_UNITS[found.group(2)]: int(found.group(1))})


def _coordinator(args: argparse.Namespace, settings: Settings) -> SagaCoordinator:
    project = require_project(settings, f"evp sagas {args.sagas_command}")
    return SagaCoordinator(settings, load_sagas(project), schema=args.schema,
                           scale_out=getattr(args, "scale_out", False))


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _run(args: argparse.Namespace, settings: Settings) -> int:
    stop = _stop_on_signals()
    totals = BatchOutcome()

    def on_batch(outcome: BatchOutcome) -> None:
        nonlocal totals
        totals = totals + outcome

    with _coordinator(args, settings) as coordinator:
        names = ", ".join(sorted(coordinator.definitions))
        print(f"sagas: coordinating {names} from {settings.events_topic} (state in schema {coordinator.schema})",
              flush=True)
        coordinator.run(stop, on_batch)
    print(f"sagas: stopped after {totals.applied} records, {totals.skipped} duplicates skipped", flush=True)
    return 0


def _catch_up(args: argparse.Namespace, settings: Settings) -> int:
    with _coordinator(args, settings) as coordinator:
        result = coordinator.catch_up()
        fired = coordinator.tick().fired
    if args.json:
        print_json({**result.__dict__, "timers_fired": fired})
    else:
        print(f"sagas caught up in {result.seconds:.1f}s: {result.applied} records read, {fired} timers fired")
    return 0


def _participant(args: argparse.Namespace, settings: Settings) -> int:
    project = require_project(settings, "evp sagas participant")
    with ParticipantRunner(settings, load_participant(project, args.name)) as runner:
        if args.catch_up:
            result = runner.catch_up()
            print(f"participant {args.name}: {result.applied} records read in {result.seconds:.1f}s")
            return 0
        print(f"participant {args.name}: answering commands from {settings.events_topic}", flush=True)
        runner.run(_stop_on_signals())
    return 0


def _list(args: argparse.Namespace, settings: Settings) -> int:
    with postgres.connect(settings.database_url, autocommit=True) as conn, conn.cursor() as cur:
        if not _exists(cur, args.schema):
            rows: list[store.Summary] = []
        else:
            rows = store.summaries(cur, args.schema, status=args.state, older_than=args.older_than, now=utc_now())
    if args.json:
        print_json([r.to_json() for r in rows])
        return 0
    if not rows:
        print("no sagas" + (f" in state {args.state}" if args.state else ""))
        return 0
    print_table([{**r.__dict__, "updated_at": r.updated_at.isoformat(timespec="seconds"),
                  "reason": (r.reason or "")[:80]} for r in rows],
                ("saga_id", "status", "step", "attempt", "updated_at", "reason"))
    return 0


def _show(args: argparse.Namespace, settings: Settings) -> int:
    with postgres.connect(settings.database_url, autocommit=True) as conn, conn.cursor() as cur:
        found = store.summaries(cur, args.schema, saga_ids=[args.saga_id]) if _exists(cur, args.schema) else []
    with EventStore.open(settings) as events:
        timeline = store.timeline(events, args.saga_id)
    if args.json:
        print_json({"saga": found[0].to_json() if found else None, "timeline": timeline})
        return 0
    if found:
        head = found[0]
        print(f"{head.saga_id}: {head.status} (saga {head.saga} v{head.definition_version}, key {head.key})"
              + (f" — {head.reason}" if head.reason else ""))
    print_table(timeline, store.TIMELINE_COLUMNS)
    return 0


def _exists(cur: Any, schema: str) -> bool:
    return cur.execute("SELECT 1 FROM pg_tables WHERE schemaname = %s AND tablename = 'evp_sagas'",
                       (schema,)).fetchone() is not None


def _operator(action: str):  # type: ignore[no-untyped-def]
    def run(args: argparse.Namespace, settings: Settings) -> int:
        project = require_project(settings, f"evp sagas {action}")
        actor = args.actor or settings.actor
        if not args.reason.strip():
            raise ConfigurationError("--reason must say why (it is recorded with the action)")
        decision = act(settings, load_sagas(project), args.saga_id,
                       Operator(action, actor, args.reason, getattr(args, "step", None)), schema=args.schema)
        state = decision.state
        assert state is not None
        issued = ", ".join(f"{c.command.type} ({c.step}, attempt {c.attempt})" for c in decision.commands) or "no command"
        if args.json:
            print_json({"saga_id": args.saga_id, "status": state.status, "step": state.step,
                        "transitions": [t.type for t in decision.transitions],
                        "commands": [c.event_id for c in decision.commands]})
        else:
            print(f"{args.saga_id}: {action} recorded by {actor}; now {state.status}; issued {issued}")
        return 0

    return run


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("sagas", help="coordinate sagas, inspect them, and act on stuck ones")
    group = parser.add_subparsers(dest="sagas_command", metavar="ACTION", required=True)

    def add(name: str, help_text: str, func: Any, *, json: bool = True) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = group.add_parser(name, help=help_text)
        sub.add_argument("--schema", default=store.DEFAULT_SCHEMA, help="schema of the coordinator's state")
        if json:
            sub.add_argument("--json", action="store_true")
        sub.set_defaults(func=func)
        return sub

    runner = add("run", "coordinate the declared sagas until SIGTERM/SIGINT", _run, json=False)
    runner.add_argument("--scale-out", action="store_true",
                        help="share the topic's partitions with the other coordinators of this schema (leases)")
    add("catch-up", "coordinate up to the current end of the log, fire due timers, then exit", _catch_up)
    lister = add("list", "instances by state, oldest change first", _list)
    lister.add_argument("--state", choices=STATES, help="only instances in this state")
    lister.add_argument("--older-than", type=parse_duration, metavar="AGE",
                        help="only instances whose last transition is older than AGE (90s, 10m, 2h, 1d)")
    show = add("show", "an instance's timeline from the ledger: steps, attempts, errors, who acted", _show)
    show.add_argument("saga_id", metavar="ID")
    for action, text in ((RESUME, "retry a parked saga's step once more"),
                         (RETRY_STEP, "issue the step in flight again now (a new attempt)"),
                         (MARK_COMPENSATED, "record that the step was compensated by hand, and go on compensating")):
        sub = add(action, text, _operator(action))
        sub.add_argument("saga_id", metavar="ID")
        sub.add_argument("--reason", required=True, help="why (a ticket, an incident); recorded with the action")
        sub.add_argument("--actor", default=None, help="who acts (default: EVP_ACTOR)")
        if action == RETRY_STEP:
            sub.add_argument("--step", default=None, help="the step in flight (checked; default: whichever it is)")
    participant = add("participant", "answer a declared participant's commands until SIGTERM/SIGINT", _participant,
                      json=False)
    participant.add_argument("name", metavar="NAME", help="a participant of the project's evp.toml [participants]")
    participant.add_argument("--catch-up", action="store_true", help="answer up to the current end of the log, then exit")
