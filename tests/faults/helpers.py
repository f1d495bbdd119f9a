"""Shared tools of the fault tests: the topic-versus-ledger oracle and killable workers.

The oracle states the consistency core's promise in one place: after deduplication by
(stream, version), the topic holds every ledger event exactly once and in version order,
and a duplicate only ever repeats an earlier (stream, version) with the same event id.

Run as a module, this file is also the worker that fault tests start and SIGKILL:

    python -m tests.faults.helpers write --streams P --count N --log FILE --seed S
    python -m tests.faults.helpers relay

Both read their settings from the environment (``Settings.to_env``). They import only the
events layer, so they start in a second, not in the time a full ``evp`` command needs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import psycopg
from kafka import TopicPartition

from events.adapters import postgres
from events.errors import ConcurrencyError, EvpError
from events.event import HEADER_EVENT_ID, HEADER_STREAM_VERSION, NO_STREAM, Event, ExpectedVersion
from events.adapters.kafka import consumer
from events.settings import Settings

REPO = Path(__file__).resolve().parents[2]
SERVICES = REPO / "platform" / "services.py"

#: Per stream, what a log holds: (version, event id) in log order.
StreamLog = dict[str, list[tuple[int, uuid.UUID]]]


# -- reading both sides -------------------------------------------------------------------
def read_topic(settings: Settings, *, timeout: float = 60.0) -> StreamLog:
    """Every record of the events topic, grouped by stream (key), in offset order.

    Uses only the key and the evp headers, so it checks what the relay published without
    depending on the codec. One stream maps to one partition, so offset order within the
    partition is the stream's order on the topic.
    """
    reader = consumer(settings)
    try:
        partitions = reader.partitions_for_topic(settings.events_topic) or set()
        tps = [TopicPartition(settings.events_topic, p) for p in sorted(partitions)]
        reader.assign(tps)
        reader.seek_to_beginning(*tps)
        ends = reader.end_offsets(tps)
        found: StreamLog = defaultdict(list)
        pending = {tp for tp in tps if ends[tp] > 0}
        deadline = time.monotonic() + timeout
        while pending:
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read {settings.events_topic} to its end within {timeout:.0f}s")
            for tp, messages in reader.poll(timeout_ms=500).items():
                for message in messages:
                    if message.offset < ends[tp]:
                        headers = dict(message.headers or [])
                        found[message.key.decode()].append(
                            (int(headers[HEADER_STREAM_VERSION].decode()), uuid.UUID(headers[HEADER_EVENT_ID].decode()))
                        )
            pending = {tp for tp in pending if reader.position(tp) < ends[tp]}
        return dict(found)
    finally:
        reader.close()


def read_ledger(database_url: str) -> StreamLog:
    """Every ledger event, grouped by stream, in version order."""
    with postgres.connect(database_url, autocommit=True) as conn:
        rows = conn.execute("SELECT stream_id, version, event_id FROM evp_events ORDER BY stream_id, version").fetchall()
    found: StreamLog = defaultdict(list)
    for stream_id, version, event_id in rows:
        found[stream_id].append((int(version), event_id))
    return dict(found)


def outbox_depth(database_url: str) -> int:
    with postgres.connect(database_url, autocommit=True) as conn:
        return int(conn.execute("SELECT count(*) FROM evp_outbox").fetchone()[0])  # type: ignore[index]


# -- the oracle ----------------------------------------------------------------------------
@dataclass(frozen=True)
class TopicCheck:
    """What :func:`assert_topic_matches_ledger` saw: how many events, how many re-published."""

    events: int
    duplicates: int


def assert_gap_free(ledger: StreamLog) -> None:
    """Every stream's versions are exactly 1..n: no append was half-written or lost."""
    for stream_id, entries in ledger.items():
        versions = [v for v, _ in entries]
        assert versions == list(range(1, len(versions) + 1)), f"stream {stream_id!r} has versions {versions}"


def dedupe(stream_id: str, entries: Sequence[tuple[int, uuid.UUID]]) -> tuple[list[tuple[int, uuid.UUID]], int]:
    """Drop re-published records the way consumers do; reject a duplicate that is not one.

    A record whose version is not above the highest seen so far is a re-publication: it
    must repeat an earlier (stream, version) with the same event id.
    """
    first_seen: dict[int, uuid.UUID] = {}
    kept: list[tuple[int, uuid.UUID]] = []
    duplicates = 0
    for version, event_id in entries:
        if kept and version <= kept[-1][0]:
            assert first_seen.get(version) == event_id, (
                f"stream {stream_id!r}: version {version} with event id {event_id} repeats no earlier record "
                f"(earlier: {first_seen.get(version)})"
            )
            duplicates += 1
            continue
        first_seen[version] = event_id
        kept.append((version, event_id))
    return kept, duplicates


def assert_topic_matches_ledger(topic: StreamLog, ledger: StreamLog) -> TopicCheck:
    """After dedupe, the topic holds exactly the ledger's events, each once, in version order."""
    assert_gap_free(ledger)
    extra = sorted(set(topic) - set(ledger))
    assert not extra, f"streams on the topic that the ledger does not know: {extra[:5]}"
    duplicates = 0
    for stream_id, expected in ledger.items():
        kept, dups = dedupe(stream_id, topic.get(stream_id, []))
        duplicates += dups
        if kept != expected:
            kept_set = set(kept)
            missing = [v for v, event_id in expected if (v, event_id) not in kept_set]
            raise AssertionError(
                f"stream {stream_id!r}: topic after dedupe has {len(kept)} events, the ledger {len(expected)}; "
                f"ledger versions missing or different on the topic: {missing[:10]}; "
                f"first topic versions: {[v for v, _ in kept[:10]]}"
            )
    return TopicCheck(sum(len(e) for e in ledger.values()), duplicates)


# -- the writer's journal ------------------------------------------------------------------
@dataclass(frozen=True)
class JournalEntry:
    """A line a writer wrote: ``intent`` before an append, ``ack`` after it succeeded."""

    kind: str
    stream_id: str
    event_ids: tuple[uuid.UUID, ...]


def read_journal(path: Path) -> list[JournalEntry]:
    """The journal's complete lines (a SIGKILL may cut the last one short)."""
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            raw = json.loads(line)
        except json.JSONDecodeError:
            continue
        entries.append(JournalEntry(raw["kind"], raw["stream"], tuple(uuid.UUID(i) for i in raw["ids"])))
    return entries


@dataclass(frozen=True)
class JournalCheck:
    acknowledged: int
    committed_unacknowledged: int  # killed (or cut off) after commit, before writing the ack
    never_committed: int  # killed or failed before commit: nothing of it may be in the ledger


def assert_journal_consistent(entries: Iterable[JournalEntry], ledger: StreamLog) -> JournalCheck:
    """Every acknowledged append is in the ledger; every attempted one is all there or not at all."""
    where = {event_id: stream_id for stream_id, events in ledger.items() for _, event_id in events}
    acked = {e.event_ids for e in entries if e.kind == "ack"}
    counts = {"acked": 0, "unacked": 0, "none": 0}
    for entry in entries:
        if entry.kind != "intent":
            continue
        present = [i for i in entry.event_ids if where.get(i) == entry.stream_id]
        if entry.event_ids in acked:
            assert len(present) == len(entry.event_ids), f"acknowledged append {entry} is not (all) in the ledger"
            counts["acked"] += 1
        elif present:
            assert len(present) == len(entry.event_ids), f"append {entry} is half-written: only {present} are there"
            counts["unacked"] += 1
        else:
            counts["none"] += 1
    return JournalCheck(counts["acked"], counts["unacked"], counts["none"])


def _log(out: TextIO, kind: str, stream_id: str, events: Sequence[Event]) -> None:
    out.write(json.dumps({"kind": kind, "stream": stream_id, "ids": [str(e.event_id) for e in events]}) + "\n")
    out.flush()


def sample_event(sample_id: str, label: int = 3) -> Event:
    return Event("SampleSubmitted", {"sample_id": sample_id, "annotator_id": "ann-1", "features": [0.0] * 64, "label": label})


# -- a writer that survives outages --------------------------------------------------------
@dataclass
class WriterStats:
    appended: int = 0
    conflicts: int = 0
    outage_retries: int = 0
    duplicate_retries: int = 0  # retries that found their events already committed
    errors: list[str] = field(default_factory=list)


def write_loop(
    open_store: Callable[[], Any],
    streams: Sequence[str],
    count: int,
    journal: TextIO,
    rng: random.Random,
    *,
    stop: threading.Event | None = None,
    pause: float = 0.01,
    retry_for: float = 60.0,
) -> WriterStats:
    """Append ``count`` batches with expected versions, journaling intents and acks.

    On an outage (:class:`EvpError` that is not a conflict) the store is reopened and the
    *same* events are retried with the *same* expected version: if the first try committed,
    the retry must come back as a duplicate; if not, it must go through.
    """
    stats = WriterStats()
    store = open_store()
    try:
        for _ in range(count):
            if stop is not None and stop.is_set():
                break
            stream_id = rng.choice(streams)
            events = [sample_event(f"{stream_id}-{rng.randrange(10**6)}") for _ in range(rng.randint(1, 3))]
            deadline = time.monotonic() + retry_for
            while True:
                try:
                    version = store.ledger.version(stream_id)
                    break
                except (EvpError, psycopg.Error):
                    store = _reopen(store, open_store, deadline, stats)
            expected: ExpectedVersion = NO_STREAM if version is None else version
            _log(journal, "intent", stream_id, events)
            while True:
                try:
                    result = store.append(stream_id, events, expected)
                except ConcurrencyError:
                    stats.conflicts += 1
                    break
                except (EvpError, psycopg.Error) as err:
                    stats.errors.append(type(err).__name__)
                    store = _reopen(store, open_store, deadline, stats)
                    continue
                stats.duplicate_retries += int(result.duplicate)
                stats.appended += 1
                _log(journal, "ack", stream_id, events)
                break
            time.sleep(rng.uniform(0, pause))
    finally:
        _close_quietly(store)
    return stats


def _reopen(store: Any, open_store: Callable[[], Any], deadline: float, stats: WriterStats) -> Any:
    _close_quietly(store)
    while True:
        if time.monotonic() > deadline:
            raise EvpError("the services did not come back in time")
        time.sleep(0.3)
        try:
            reopened = open_store()
        except (EvpError, psycopg.Error):
            continue
        stats.outage_retries += 1
        return reopened


def _close_quietly(store: Any) -> None:
    try:
        store.close()
    except Exception:  # noqa: BLE001 - it is already broken
        pass


# -- processes -----------------------------------------------------------------------------
def worker(settings: Settings, *args: str, log: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``python -m tests.faults.helpers ARGS`` with ``settings`` in its environment."""
    env = {**os.environ, **settings.to_env(), "PYTHONPATH": str(REPO)}
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - the child owns it
    return subprocess.Popen(
        [sys.executable, "-m", "tests.faults.helpers", *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
    )


def services(command: str, service: str) -> str:
    """``platform/services.py COMMAND SERVICE``; fails the test with the runner's words.

    A failed ``restart`` or ``up`` is followed by one more ``up``: it waits for a broker
    that is still starting, which the runner can misjudge as exited on a loaded machine.
    """

    def run(cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(SERVICES), cmd, service], capture_output=True, text=True, timeout=180)

    result = run(command)
    said = result.stdout + result.stderr
    if result.returncode != 0 and command in ("restart", "up"):
        result = run("up")
        said += result.stdout + result.stderr
    if result.returncode != 0:
        raise AssertionError(f"services.py {command} {service} failed:\n{said}")
    return said


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def summary_line(name: str, facts: Mapping[str, object]) -> str:
    return f"{name}: " + ", ".join(f"{k}={v}" for k, v in facts.items())


# -- entry points of the worker processes --------------------------------------------------
def _main_write(args: argparse.Namespace) -> int:
    from events.store.client import EventStore

    settings = Settings.from_env()
    streams = [f"{args.streams}-{i}" for i in range(args.stream_count)]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with open(args.log, "a") as journal:
        write_loop(lambda: EventStore.open(settings), streams, args.count, journal, random.Random(args.seed), stop=stop)
    return 0


def _main_relay(args: argparse.Namespace) -> int:
    from events.store.relay import Relay

    settings = Settings.from_env()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    relay = Relay(settings, poll_interval=0.2)
    print("relay: started", flush=True)
    try:
        relay.run(stop)
    finally:
        relay.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.helpers")
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write")
    write.add_argument("--streams", required=True, help="stream id prefix")
    write.add_argument("--stream-count", type=int, default=4)
    write.add_argument("--count", type=int, default=10_000)
    write.add_argument("--log", type=Path, required=True)
    write.add_argument("--seed", type=int, default=0)
    write.set_defaults(func=_main_write)
    commands.add_parser("relay").set_defaults(func=_main_relay)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
