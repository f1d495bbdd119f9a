"""The soak: hundreds of faults against the real services, each followed by an oracle that counts what was lost.

    python -m tests.soak.soak [--trials 200] [--minutes M] [--seed S] [--kinds K,K...] [--json]

The seed is printed first, so a failing run replays with ``--seed``. A fleet runs the whole
time against one fresh database and topic prefix: two writers appending to eight shared
streams with expected versions (so they conflict) and retrying with the same event ids after
an outage; one relay; two projection runners scaling out over the ``tally`` view
(``tests/soak/project``); and, on a database and prefix of their own, the jobs sagas with
their relay, coordinator and worker (:mod:`tests.soak.sagas`). Contract of one trial:

1. the writers run; after a random pause one fault (:data:`KINDS`) is injected at a random
   moment, or, for a fault point, the victim is restarted armed (``EVP_FAULT_POINT``) and
   dies in the window the point names, leaving evidence that the window was hit;
2. whatever died is started again, the writers stop, and the trial waits until every
   process is up, the outbox is empty and the view has read the topic to its end: the time
   from the fault to that moment is the trial's recovery time;
3. the oracle checks, from the writers' journals, the ledger, the topic and the view:
   every acknowledged append is in the ledger once and on the topic; an attempt is all
   there or not at all; versions are gap-free and the topic keeps each stream's order after
   deduplication; the view equals the fold of the ledger (an effect applied twice shows as a
   count too high); every job started settles as its plan's model says, each command once
   and no effect twice (the saga oracle); and the fault point's evidence says its window was hit.

It ends with one table: trials, faults by kind, events, acknowledged appends, lost,
duplicated effects, wrong views, windows hit, max recovery time. ``make soak`` runs the
defaults; ``tests/faults/test_soak.py`` runs one trial of each kind in ``make test``; with
``--sustain MINUTES --rate R`` it holds a fixed append rate instead, with no faults, and
reports lag and every process's memory (:func:`sustain`).

Run as ``python -m tests.soak.soak write ...`` it is one of the fleet's writers.
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
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import psycopg

from events import faults
from events.errors import ConcurrencyError, EvpError
from events.event import NO_STREAM, Event, ExpectedVersion
from events.settings import Settings
from tests.faults.helpers import (
    REPO,
    JournalEntry,
    StreamLog,
    _log,
    assert_gap_free,
    assert_topic_matches_ledger,
    outbox_depth,
    read_journal,
    read_ledger,
    read_topic,
    services,
)

PROJECT = Path(__file__).resolve().parent / "project"
STREAMS = 8
VIEW = "tally"
#: A fault's victim must be back, and everything drained, within this (seconds).
RECOVERY_BOUND = 120.0
SLOW = 30.0  #: a trial that took longer to recover says what it last waited for

#: Writer-side fault points (the writer reaches them; the platform's own are in events.faults).
APPEND_IN_TRANSACTION = "append.in_transaction"  #: inside the append's transaction, before the commit
APPEND_COMMITTED = "append.committed"  #: committed, before the writer recorded the acknowledgement

KILLS = ("kill-writer", "kill-relay", "kill-runner", "kill-coordinator")
POINTS = (APPEND_IN_TRANSACTION, APPEND_COMMITTED, faults.RELAY_ACKNOWLEDGED, faults.VIEW_COMMITTED)
RESTARTS = ("kafka-restart", "postgres-restart-fast", "postgres-restart-immediate")
#: Through toxiproxy, between every fleet process and the service: a cut (every connection closed,
#: new ones refused), latency, and (Kafka) a stall that lets no byte through until it ends.
NETWORK = ("net-postgres-cut", "net-postgres-latency", "net-postgres-reset", "net-kafka-cut", "net-kafka-latency",
           "net-kafka-stall")
#: The relay and both runners restarted with a state directory no one can write (not even root:
#: it lies under a file): they keep no working files, so they must go on as if nothing happened.
STATE = ("unwritable-home",)
#: Two faults in one trial, the second injected while the fleet still recovers from the first
#: (a relay SIGKILLed while PostgreSQL restarts, a runner while Kafka's connections are cut...).
COMPOUND = "compound"
COMPOUNDABLE = (*(k for k in KILLS if k != "kill-coordinator"), *RESTARTS, *NETWORK)
KINDS = (*KILLS, *POINTS, *RESTARTS, *NETWORK, *STATE, COMPOUND)
UNWRITABLE_HOME = "/dev/null/evp-home"


# -- the writer ----------------------------------------------------------------------------
def sample(stream_id: str, label: int) -> Event:
    return Event("SampleSubmitted", {"sample_id": stream_id, "annotator_id": "ann-soak", "features": [0.0] * 64,
                                     "label": label})


def write(settings: Settings, journal: TextIO, rng: random.Random, stop: threading.Event, rate: float = 0.0) -> None:
    """Append batches of 1-3 events to random shared streams until ``stop``; journal intents and acks.

    1. read the stream's version and append with it as the expected version (a conflict is a
       verdict: the batch is dropped, the journal shows an intent without an ack);
    2. on an outage (any other error) reopen the store and retry the *same* events with the
       *same* expected version until it answers: a retry of an append that had in fact
       committed must come back as a duplicate, never as a conflict (asserted);
    3. the fault points of this module fire inside the append's transaction (with the
       backend's state read from ``pg_stat_activity`` as evidence) and after the commit;
    4. with ``rate`` > 0 appends start on a fixed schedule of ``rate`` per second (a writer
       that falls behind does not catch up in a burst).
    """
    from events.store.client import EventStore

    armed = os.environ.get(faults.POINT_VARIABLE, "")
    store = _open(lambda: EventStore.open(settings))
    streams = [f"soak-{i}" for i in range(STREAMS)]
    due = time.monotonic()
    while not stop.is_set():
        if rate > 0:
            due = max(due + 1 / rate, time.monotonic() - 1)
            stop.wait(max(0.0, due - time.monotonic()))
        stream_id = rng.choice(streams)
        events = [sample(stream_id, rng.randrange(10)) for _ in range(rng.randint(1, 3))]
        version, store = _retrying(store, lambda s: s.ledger.version(stream_id), settings)
        expected: ExpectedVersion = NO_STREAM if version is None else version
        _log(journal, "intent", stream_id, events)
        tried = False
        while True:
            try:
                result = _append(store, stream_id, events, expected, armed)
            except ConcurrencyError:
                if tried:  # the first try may have committed: then this must have been a duplicate
                    present = store.ledger.event_by_id(events[0].event_id)
                    assert present is None, f"a retry of committed {stream_id} v{present} was answered as a conflict"
                break
            except (EvpError, psycopg.Error) as err:
                tried = True
                journal.write(json.dumps({"kind": "outage", "stream": stream_id, "ids": [str(e.event_id) for e in events],
                                          "error": type(err).__name__}) + "\n")  # evidence the fault reached the writer
                journal.flush()
                store = _open(lambda: EventStore.open(settings), store)
                continue
            faults.reach(APPEND_COMMITTED, stream=stream_id, positions=list(result.positions))
            if result.duplicate:  # a retry of an append that had committed: answered as the duplicate it is
                _log(journal, "duplicate", stream_id, events)
            _log(journal, "ack", stream_id, events)
            break
        if rate <= 0:
            time.sleep(rng.uniform(0, 0.02))
    store.close()


def _append(store: Any, stream_id: str, events: list[Event], expected: ExpectedVersion, armed: str) -> Any:
    if not armed.startswith(APPEND_IN_TRANSACTION):
        return store.append(stream_id, events, expected)
    conn = store.ledger.connection
    with conn.transaction():
        result = store.append(stream_id, events, expected)
        pid = conn.info.backend_pid
        with psycopg.connect(store.settings.database_url, autocommit=True) as other:
            row = other.execute("SELECT state, backend_xid IS NOT NULL FROM pg_stat_activity WHERE pid = %s",
                                (pid,)).fetchone()
        faults.reach(APPEND_IN_TRANSACTION, stream=stream_id, backend_pid=pid, state=row[0] if row else None,
                     wrote=bool(row and row[1]), event_ids=[str(e.event_id) for e in events])
    return result


def _open(open_store: Callable[[], Any], broken: Any = None, patience: float = RECOVERY_BOUND) -> Any:
    if broken is not None:
        try:
            broken.close()
        except Exception:  # noqa: BLE001 - it is broken already
            pass
    deadline = time.monotonic() + patience
    while True:
        try:
            return open_store()
        except (EvpError, psycopg.Error):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def _retrying(store: Any, read: Callable[[Any], Any], settings: Settings) -> tuple[Any, Any]:
    from events.store.client import EventStore

    while True:
        try:
            return read(store), store
        except (EvpError, psycopg.Error):
            store = _open(lambda: EventStore.open(settings), store)


# -- the fleet -----------------------------------------------------------------------------
@dataclass
class Fleet:
    """The soak's processes, each restartable, its output in a log of its own.

    ``settings`` is how the oracle reaches the services; ``via`` how the fleet's processes
    do (through toxiproxy's proxies when network faults are in the run).
    """

    settings: Settings
    folder: Path
    rng: random.Random
    via: Settings | None = None
    proxies: dict[str, Any] = field(default_factory=dict)  #: "postgres" / "kafka" -> toxiproxy Proxy
    project: Path = PROJECT
    rate: float = 0.0  #: each writer's appends per second (0: as fast as it goes)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    starts: Counter[str] = field(default_factory=Counter)
    crashes: list[str] = field(default_factory=list)

    def env(self, point: str | None = None) -> dict[str, str]:
        env = {**os.environ, **(self.via or self.settings).to_env(), "PYTHONPATH": str(REPO),
               "EVP_PROJECT": str(self.project)}
        env.pop(faults.POINT_VARIABLE, None)
        if point:
            env[faults.POINT_VARIABLE] = point
            env[faults.EVIDENCE_VARIABLE] = str(self.folder / "evidence.jsonl")
        return env

    def start(self, name: str, point: str | None = None, home: str | None = None) -> subprocess.Popen[bytes]:
        role = name.rstrip("0123456789")
        command = {
            "writer": ["-m", "tests.soak.soak", "write", "--journal", str(self.folder / f"{name}.journal"),
                       "--seed", str(self.rng.randrange(2**32)), "--rate", str(self.rate)],
            "relay": ["-m", "tests.faults.helpers", "relay"],
            "runner": ["-m", "projections.cli", "run", VIEW, "--scale-out", "--no-prefetch"],
            "sagarelay": ["-m", "tests.faults.helpers", "relay"],
            "coordinator": ["-m", "events.cli", "sagas", "run"],
            "worker": ["-m", "events.cli", "sagas", "participant", "worker"],
        }[role]
        self.starts[name] += 1
        log = (self.folder / f"{name}.log").open("ab")
        env = self.env(point) | ({"EVP_HOME": home} if home else {})
        process = subprocess.Popen([sys.executable, *command], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.processes[name] = process
        return process

    def kill(self, name: str) -> None:
        process = self.processes[name]
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait()

    def stop(self, name: str, timeout: float = 30.0) -> None:
        process = self.processes.get(name)
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def alive(self, name: str) -> bool:
        process = self.processes.get(name)
        return process is not None and process.poll() is None

    def ensure(self, names: Sequence[str]) -> list[str]:
        """Start again whichever of ``names`` is not running; the names restarted.

        A process that exited by itself with an error (not killed by the soak, nor stopped)
        is recorded in :attr:`crashes` with the end of its log: a promise a process checks
        itself (a writer's duplicate-not-conflict assertion) fails that way.
        """
        restarted = [n for n in names if not self.alive(n)]
        for name in restarted:
            code = self.processes[name].returncode if name in self.processes else None
            if code not in (None, 0, -signal.SIGKILL, -signal.SIGTERM):
                tail = (self.folder / f"{name}.log").read_text(errors="replace").strip().splitlines()[-3:]
                self.crashes.append(f"{name} exited with {code}: {' / '.join(tail)}")
            self.start(name)
        return restarted

    def close(self) -> None:
        for name in list(self.processes):
            self.stop(name, timeout=10)


SERVING = ("relay", "runner1", "runner2")
SAGA_PROCESSES = ("sagarelay", "coordinator", "worker")
WRITERS = ("writer1", "writer2")


# -- the oracle ----------------------------------------------------------------------------
@dataclass
class Verdict:
    """What one trial's oracle found (zeros are what the promises say)."""

    events: int = 0
    acknowledged: int = 0
    committed_unacknowledged: int = 0
    lost: int = 0
    half_written: int = 0
    duplicated_effects: int = 0
    wrong_views: int = 0
    order: int = 0
    topic_duplicates: int = 0
    saga_violations: int = 0  #: jobs that did not settle or broke the saga oracle
    sagas: int = 0  #: jobs started so far
    duplicate_answers: int = 0  #: retries the ledger answered as duplicates (their first try had committed)
    outages: int = 0  #: appends the writers had to retry after an error (the faults reached them)
    errors: dict[str, int] = field(default_factory=dict)  #: those errors by class
    crashes: int = 0  #: processes that died of an error of their own
    problems: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.lost or self.half_written or self.duplicated_effects or self.wrong_views or self.order
                    or self.crashes or self.saga_violations or self.problems)


def judge(settings: Settings, folder: Path) -> Verdict:
    """Step 3 of the module docstring, over everything written so far."""
    verdict = Verdict()
    ledger = read_ledger(settings.database_url)
    verdict.events = sum(len(v) for v in ledger.values())
    try:
        assert_gap_free(ledger)
    except AssertionError as err:
        verdict.order += 1
        verdict.problems.append(str(err))
    try:
        verdict.topic_duplicates = assert_topic_matches_ledger(read_topic(settings), ledger).duplicates
    except AssertionError as err:
        verdict.lost += 1
        verdict.problems.append(f"topic: {err}")
    entries = [e for path in sorted(folder.glob("writer*.journal")) for e in read_journal(path)]
    verdict.errors = dict(Counter(_outage_errors(folder)))
    _journal(entries, ledger, verdict)
    _view(settings, ledger, verdict)
    return verdict


def _outage_errors(folder: Path) -> Iterator[str]:
    """The error class of every outage the writers journaled (a line a SIGKILL cut short is skipped)."""
    for path in sorted(folder.glob("writer*.journal")):
        for line in path.read_text().splitlines():
            if '"kind": "outage"' in line:
                try:
                    yield str(json.loads(line)["error"])
                except (ValueError, KeyError):
                    continue


def _journal(entries: Sequence[JournalEntry], ledger: StreamLog, verdict: Verdict) -> None:
    where = {event_id: stream for stream, events in ledger.items() for _, event_id in events}
    acked = {e.event_ids for e in entries if e.kind == "ack"}
    verdict.duplicate_answers = sum(e.kind == "duplicate" for e in entries)
    verdict.outages = sum(e.kind == "outage" for e in entries)
    for entry in (e for e in entries if e.kind == "intent"):
        present = [i for i in entry.event_ids if where.get(i) == entry.stream_id]
        if entry.event_ids in acked:
            verdict.acknowledged += 1
            if len(present) != len(entry.event_ids):
                verdict.lost += 1
                verdict.problems.append(f"acknowledged append {entry.event_ids[0]} to {entry.stream_id} is not in the ledger")
        elif present:
            verdict.committed_unacknowledged += 1
            if len(present) != len(entry.event_ids):
                verdict.half_written += 1
                verdict.problems.append(f"append {entry.event_ids[0]} to {entry.stream_id} is half-written")


def _view(settings: Settings, ledger: StreamLog, verdict: Verdict) -> None:
    with psycopg.connect(settings.database_url) as conn:
        rows = {r[0]: (r[1], r[2], r[3]) for r in conn.execute(f"SELECT sample_id, events, version, labels FROM {VIEW}_view.{VIEW}")}
    from events.store.client import EventStore

    with EventStore.open(settings) as store:
        for stream, events in ledger.items():
            decoded = store.read_stream(stream, decrypt=False)
            expected = (len(events), max(v for v, _ in events), sum(int(e.data["label"]) for e in decoded))
            found = rows.get(stream)
            if found == expected:
                continue
            if found is not None and found[0] > expected[0]:
                verdict.duplicated_effects += 1
            verdict.wrong_views += 1
            verdict.problems.append(f"view row {stream}: {found}, the ledger folds to {expected}")


def evidence(folder: Path) -> list[dict[str, Any]]:
    path = folder / "evidence.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- a trial -------------------------------------------------------------------------------
@dataclass
class Trial:
    index: int
    kind: str
    recovery: float = 0.0
    window_hit: bool | None = None  #: for fault points: whether its evidence was found
    waited_for: str = "nothing"  #: what recovery last waited for (outbox, lag or an error)
    injected: str = ""  #: what was injected: the kind, or a compound's two faults
    verdict: Verdict = field(default_factory=Verdict)


def run_trial(fleet: Fleet, index: int, kind: str, rng: random.Random, before: Verdict, lane: Any = None,
              lane_fleet: Fleet | None = None) -> Trial:
    """One trial (steps 1-3); ``before`` is the previous trial's verdict, against which a window's evidence shows.

    With a saga ``lane`` (:mod:`tests.soak.sagas`) and its fleet, the trial also starts jobs, and
    ``kill-coordinator`` SIGKILLs the lane's coordinator.
    """
    trial = Trial(index, kind, injected=kind)
    fleet.ensure([*SERVING, *WRITERS])
    if lane is not None and lane_fleet is not None:
        lane_fleet.ensure(SAGA_PROCESSES)
        lane.start_jobs(rng.randint(1, 3))
    time.sleep(rng.uniform(0.3, 1.5))  # step 1: load, then the fault at a random moment
    seen = len(evidence(fleet.folder))
    crashed = len(fleet.crashes)
    started = time.monotonic()
    if kind == "kill-coordinator":
        assert lane_fleet is not None, "kill-coordinator needs the saga lane"
        lane_fleet.kill("coordinator")
        lane_fleet.start("coordinator")
    else:
        trial.injected = _inject(fleet, kind, rng)
    hit = _wait_evidence(fleet, seen, kind) if kind in POINTS else None
    fleet.ensure(SERVING)  # step 2
    time.sleep(rng.uniform(0.2, 0.8))
    for name in WRITERS:
        fleet.stop(name)
    trial.waited_for = _drained(fleet, started)
    trial.recovery = time.monotonic() - started
    trial.verdict = judge(fleet.settings, fleet.folder)  # step 3
    if kind == "unwritable-home":  # they held up; back to the usual home for the next trial
        for name in SERVING:
            fleet.stop(name)
    if lane is not None and lane_fleet is not None:
        lane_fleet.ensure(SAGA_PROCESSES)
        found = lane.violations()
        trial.verdict.saga_violations, trial.verdict.sagas = len(found), len(lane.started)
        trial.verdict.problems += found
    trial.verdict.crashes = len(fleet.crashes) - crashed
    trial.verdict.problems += fleet.crashes[crashed:]
    if kind in POINTS:
        trial.window_hit = hit is not None and _proved(kind, hit, before, trial.verdict, fleet.settings)
    return trial


def _proved(kind: str, hit: dict[str, Any], before: Verdict, after: Verdict, settings: Settings) -> bool:
    """What the window's evidence must show, beyond the victim having died in it."""
    if kind == faults.RELAY_ACKNOWLEDGED:  # the batch went out again, and the view dropped the copies
        return after.topic_duplicates > before.topic_duplicates
    if kind == APPEND_COMMITTED:  # committed, never acknowledged: in the ledger all the same
        return after.committed_unacknowledged > before.committed_unacknowledged
    if kind == APPEND_IN_TRANSACTION:  # PostgreSQL saw it mid-transaction with rows written; none survived
        ledger = read_ledger(settings.database_url)
        ids = {str(i) for events in ledger.values() for _, i in events}
        return (hit.get("state") in ("idle in transaction", "active") and bool(hit.get("wrote"))
                and not ids & set(hit.get("event_ids", [])))
    return True  # view.committed: the oracle's view check after the restart is the proof


def _inject(fleet: Fleet, kind: str, rng: random.Random) -> str:
    """Inject one fault of ``kind``; what was injected (the kind, or a compound's two)."""
    if kind in KILLS:
        role = kind.removeprefix("kill-")
        victim = rng.choice([n for n in fleet.processes if n.startswith(role)])
        fleet.kill(victim)
        fleet.start(victim)
    elif kind in (APPEND_IN_TRANSACTION, APPEND_COMMITTED):
        victim = rng.choice(WRITERS)
        fleet.stop(victim)
        fleet.start(victim, point=f"{kind}@{rng.randint(1, 5)}")
    elif kind == faults.RELAY_ACKNOWLEDGED:
        fleet.kill("relay")
        fleet.start("relay", point=f"{kind}@{rng.randint(1, 3)}")
    elif kind == faults.VIEW_COMMITTED:
        victim = rng.choice(["runner1", "runner2"])
        fleet.kill(victim)
        fleet.start(victim, point=f"{kind}@{rng.randint(1, 3)}")
    elif kind == "kafka-restart":
        services("restart", "kafka")
    elif kind == "postgres-restart-fast":
        services("restart", "postgres")
    elif kind == "postgres-restart-immediate":
        services("kill", "postgres")
        services("up", "postgres")
    elif kind == "unwritable-home":
        for name in SERVING:
            fleet.kill(name)
            fleet.start(name, home=UNWRITABLE_HOME)
    elif kind in NETWORK:
        _network(fleet.proxies[kind.split("-")[1]], kind.split("-", 2)[2], rng)
    elif kind == COMPOUND:
        first, second = rng.sample(COMPOUNDABLE, 2)
        _inject(fleet, first, rng)
        time.sleep(rng.uniform(0.0, 1.0))
        _inject(fleet, second, rng)
        return f"{first} + {second}"
    else:
        raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(KINDS)}")
    return kind


def _network(proxy: Any, fault: str, rng: random.Random) -> None:
    """One network fault through ``proxy`` for 0.5-2.5 s, then the network as it was."""
    lasting = rng.uniform(0.5, 2.5)
    if fault == "cut":
        with proxy.cut():
            time.sleep(lasting)
        return
    toxic = {"latency": lambda: proxy.latency(rng.choice((50, 200, 500)), jitter=20),
             "reset": lambda: proxy.reset_peer(0),
             "stall": lambda: proxy.timeout(0)}[fault]()
    try:
        time.sleep(lasting)
    finally:
        proxy.remove_toxic(toxic.name)


def _wait_evidence(fleet: Fleet, seen: int, point: str, timeout: float = 60.0) -> dict[str, Any] | None:
    """The evidence the armed victim left when it reached its window (and killed itself there), or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in evidence(fleet.folder)[seen:] if e["point"] == point]
        if found:
            return found[0]
        time.sleep(0.1)
    return None


def _drained(fleet: Fleet, started: float) -> str:
    """Wait until the outbox is empty and the view has no lag; what was last still waited for (for a slow trial)."""
    from projections.runner import projection_lag

    deadline = started + RECOVERY_BOUND
    waiting = "nothing"
    while time.monotonic() < deadline:
        fleet.ensure(SERVING)
        try:
            depth = outbox_depth(fleet.settings.database_url)
            lag = sum(lag.lag for lag in projection_lag(fleet.settings, f"{VIEW}_view"))
            if depth == 0 and lag == 0:
                return waiting
            waiting = f"outbox {depth}, view lag {lag} at {time.monotonic() - started:.0f}s"
        except (EvpError, psycopg.Error) as e:
            waiting = f"{type(e).__name__} at {time.monotonic() - started:.0f}s: {str(e).splitlines()[0][:160]}"
        time.sleep(0.2)
    raise AssertionError(f"not recovered within {RECOVERY_BOUND:.0f}s of the fault (last: {waiting})")


# -- the run -------------------------------------------------------------------------------
@dataclass
class Report:
    seed: int
    trials: list[Trial]
    seconds: float

    def table(self) -> dict[str, Any]:
        last = self.trials[-1].verdict if self.trials else Verdict()
        points = [t for t in self.trials if t.window_hit is not None]
        return {
            "seed": self.seed, "trials": len(self.trials),
            "faults": dict(sorted(Counter(t.kind for t in self.trials).items())),
            "in compounds": dict(sorted(Counter(part for t in self.trials if t.kind == COMPOUND
                                                for part in t.injected.split(" + ")).items())),
            "events": last.events, "acknowledged appends": last.acknowledged,
            "committed, unacknowledged": last.committed_unacknowledged,
            "lost": sum(t.verdict.lost for t in self.trials),
            "half-written": sum(t.verdict.half_written for t in self.trials),
            "duplicated effects": sum(t.verdict.duplicated_effects for t in self.trials),
            "wrong views": sum(t.verdict.wrong_views for t in self.trials),
            "sagas run": last.sagas,
            "saga violations": sum(t.verdict.saga_violations for t in self.trials),
            "order broken": sum(t.verdict.order for t in self.trials),
            "topic duplicates dropped": last.topic_duplicates,
            "retries answered as duplicates": last.duplicate_answers,
            "appends retried after an outage": last.outages,
            "errors the writers saw": dict(sorted(last.errors.items())),
            "processes crashed": sum(t.verdict.crashes for t in self.trials),
            "windows hit": f"{sum(bool(t.window_hit) for t in points)} of {len(points)}",
            "max recovery s": round(max((t.recovery for t in self.trials), default=0.0), 2),
            "wall s": round(self.seconds, 1),
        }

    @property
    def clean(self) -> bool:
        return all(t.verdict.clean and t.window_hit is not False for t in self.trials)


@contextmanager
def fresh(base: Settings, folder: Path) -> Iterator[Settings]:
    """A database and topic prefix of the soak's own, removed afterwards."""
    from tests.conftest import create_database, delete_topics, drop_database

    url = create_database(base)
    settings = base.with_(database_url=url, topic_prefix=f"soak{uuid.uuid4().hex[:8]}", home=folder / "home",
                          kek_file=folder / "home" / "kek", project=PROJECT)
    try:
        yield settings
    finally:
        delete_topics(settings)
        drop_database(base, url)


def soak(base: Settings, folder: Path, *, trials: int, minutes: float | None, seed: int,
         kinds: Sequence[str] = KINDS, out: TextIO = sys.stdout) -> Report:
    """Run ``trials`` trials (or until ``minutes``), every kind in turn in a seeded order; the report."""
    rng = random.Random(seed)
    began = time.monotonic()
    done: list[Trial] = []
    with fresh(base, folder) as settings, _proxied(settings, folder, any(k in (*NETWORK, COMPOUND) for k in kinds)) as (via, proxies), \
            _lane(base, folder, rng, "kill-coordinator" in kinds) as (lane, lane_fleet):
        _prepare(settings)
        fleet = Fleet(settings, folder, rng, via, proxies)
        try:
            order = [kinds[i % len(kinds)] for i in range(trials)]
            rng.shuffle(order)
            for index, kind in enumerate(order):
                if minutes is not None and time.monotonic() - began > minutes * 60:
                    break
                trial = run_trial(fleet, index, kind, rng, done[-1].verdict if done else Verdict(), lane, lane_fleet)
                done.append(trial)
                print(f"trial {index + 1}/{len(order)} {trial.injected}: recovered in {trial.recovery:.1f}s, "
                      f"{'clean' if trial.verdict.clean else 'PROBLEMS: ' + '; '.join(trial.verdict.problems[:3])}"
                      + ("" if trial.window_hit is None else f", window {'hit' if trial.window_hit else 'MISSED'}")
                      + (f" (slow: last waited for {trial.waited_for})" if trial.recovery > SLOW else ""),
                      file=out, flush=True)
        finally:
            fleet.close()
    return Report(seed, done, time.monotonic() - began)


def sustain(base: Settings, folder: Path, *, minutes: float, rate: float, seed: int,
            every: float = 5.0, out: TextIO = sys.stdout) -> dict[str, Any]:
    """Load that holds: the fleet at a fixed append rate for ``minutes``, no faults.

    1. every ``every`` seconds sample the outbox's depth, the view's lag and every process's
       resident memory (``VmRSS``);
    2. at the end stop the writers, drain, and run the oracle;
    3. report the peak lag and outbox (also the first and the last minute's peak lag: bounded
       lag does not grow from one to the other), each role's peak memory and its growth from
       the first minute's peak to the last minute's (flat memory grows by little), and the
       oracle's counts.
    """
    from projections.runner import projection_lag

    samples: list[dict[str, Any]] = []
    with fresh(base, folder) as settings:
        _prepare(settings)
        fleet = Fleet(settings, folder, random.Random(seed), rate=rate)
        try:
            fleet.ensure([*SERVING, *WRITERS])
            began = time.monotonic()
            while time.monotonic() - began < minutes * 60:
                time.sleep(every)
                died = fleet.ensure([*SERVING, *WRITERS])
                lag = sum(p.lag for p in projection_lag(settings, f"{VIEW}_view"))
                sample_ = {"t": round(time.monotonic() - began, 1), "outbox": outbox_depth(settings.database_url),
                           "lag": lag, "rss_mib": {n: _rss_mib(p.pid) for n, p in fleet.processes.items()},
                           "restarted": died}
                samples.append(sample_)
                print(json.dumps(sample_), file=out, flush=True)
            for name in WRITERS:
                fleet.stop(name)
            _drained(fleet, time.monotonic())
            verdict = judge(settings, folder)
        finally:
            fleet.close()
    first = [s for s in samples if s["t"] <= 60] or samples[:1]
    last = [s for s in samples if s["t"] >= samples[-1]["t"] - 60] if samples else []

    def peak(group: list[dict[str, Any]], role: str) -> float:
        return max((v for s in group for n, v in s["rss_mib"].items() if n.startswith(role)), default=0.0)

    roles = ("writer", "relay", "runner")
    return {
        "seed": seed, "minutes": minutes, "appends/s target": 2 * rate, "events": verdict.events,
        "acknowledged appends": verdict.acknowledged, "appends/s achieved": round(verdict.acknowledged / (minutes * 60), 1),
        "max outbox": max((s["outbox"] for s in samples), default=0), "max view lag": max((s["lag"] for s in samples), default=0),
        "max view lag, first minute / last": [max((s["lag"] for s in group), default=0) for group in (first, last)],
        "peak MiB": {r: peak(samples, r) for r in roles},
        "MiB growth, first minute to last": {r: round(peak(last, r) - peak(first, r), 1) for r in roles},
        "processes restarted": sum(len(s["restarted"]) for s in samples),
        "lost": verdict.lost, "duplicated effects": verdict.duplicated_effects, "wrong views": verdict.wrong_views,
    }


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


@contextmanager
def _lane(base: Settings, folder: Path, rng: random.Random, wanted: bool) -> Iterator[tuple[Any, Fleet | None]]:
    """When coordinator kills are in the run: the saga lane and the fleet of its processes."""
    if not wanted:
        yield None, None
        return
    from tests.soak.sagas import saga_lane
    from tests.support.sagas import PROJECT as JOBS

    (folder / "sagas").mkdir(exist_ok=True)
    with saga_lane(base, folder / "sagas", rng) as lane:
        lane_fleet = Fleet(lane.settings, folder / "sagas", rng, project=JOBS)
        try:
            yield lane, lane_fleet
        finally:
            lane_fleet.close()


@contextmanager
def _proxied(settings: Settings, folder: Path, wanted: bool) -> Iterator[tuple[Settings | None, dict[str, Any]]]:
    """When network faults are in the run: proxies in front of PostgreSQL and Kafka, and the settings through them."""
    if not wanted:
        yield None, {}
        return
    from tests.support.toxiproxy import Toxiproxy, kafka_proxy, postgres_proxy

    client = Toxiproxy()
    with postgres_proxy(client, settings.database_url, folder) as (pg, url), kafka_proxy(client) as kafka:
        yield settings.with_(database_url=url, kafka=kafka.address), {"postgres": pg, "kafka": kafka}


def _prepare(settings: Settings) -> None:
    """Register the project's schemas and make the topics before any process starts (they all would race to)."""
    from events.store.client import EventStore

    with EventStore.open(settings) as store:
        store.append("soak-prepare", sample("soak-prepare", 0))
        store.flush()


@contextmanager
def _workspace(keep: Path | None) -> Iterator[Path]:
    """The run's folder: ``keep`` (made if missing, left in place), or a temporary one removed afterwards.

    ``keep`` must be empty: the oracle reads every journal in the folder, and an earlier
    run's acknowledgements would count as appends lost from this run's ledger.
    """
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        if any(keep.iterdir()):
            raise SystemExit(f"soak: --keep {keep} is not empty (an earlier run's journals would be judged "
                             "against this run's ledger); name a new folder")
        yield keep
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="evp-soak-") as folder:
        yield Path(folder)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak.soak", description=(__doc__ or "").splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    writer = sub.add_parser("write", help="(internal) one of the fleet's writers")
    writer.add_argument("--journal", type=Path, required=True)
    writer.add_argument("--seed", type=int, required=True)
    writer.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--minutes", type=float, default=None, help="stop starting trials after this long")
    parser.add_argument("--seed", type=int, default=None, help="replay a run (default: a new one, printed first)")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"fault kinds, comma-separated (default: all: {', '.join(KINDS)})")
    parser.add_argument("--sustain", type=float, nargs="?", const=10.0, default=None, metavar="MINUTES",
                        help="instead of trials: hold a fixed append rate this long (default 10 minutes) with no faults, "
                             "sampling lag and memory")
    parser.add_argument("--rate", type=float, default=50.0, help="with --sustain: appends per second per writer (two writers)")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="work in DIR and keep it (journals, evidence, every process's log) instead of a temporary folder")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "write":
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        with args.journal.open("a") as journal:
            write(Settings.from_env(), journal, random.Random(args.seed), stop, args.rate)
        return 0
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    print(f"soak seed {seed} (replay: python -m tests.soak.soak --seed {seed} --trials {args.trials})", flush=True)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"unknown fault kind(s) {unknown}; known: {', '.join(KINDS)}")
    if args.sustain is not None:
        with _workspace(args.keep) as folder:
            held = sustain(Settings.from_env(), folder, minutes=args.sustain, rate=args.rate, seed=seed)
        print(json.dumps(held, indent=2) if args.json else "\n".join(f"| {k} | {v} |" for k, v in held.items()))
        return 0 if held["lost"] == 0 and held["wrong views"] == 0 else 1
    with _workspace(args.keep) as folder:
        report = soak(Settings.from_env(), folder, trials=args.trials, minutes=args.minutes, seed=seed, kinds=kinds)
    table = report.table()
    if args.json:
        print(json.dumps(table, indent=2))
    else:
        print()
        for name, value in table.items():
            print(f"| {name} | {value} |")
    return 0 if report.clean else 1


if __name__ == "__main__":
    sys.exit(main())
