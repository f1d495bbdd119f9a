"""SIGKILL relays and writers at random points; the topic must still equal the ledger.

Each trial starts a relay process and a writer process, kills one or both at random
moments (mid-append and mid-publish happen often, since both are busy), restarts them,
and finally kills both. Afterwards one drain publishes what is left and the oracle checks:
nothing lost, no effect duplicated, per-stream order kept, no append half-written, and
every append the writer acknowledged is in the ledger.
"""

from __future__ import annotations

import random
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from events.store.client import EventStore
from events.settings import Settings
from tests.faults.helpers import (
    assert_journal_consistent,
    assert_topic_matches_ledger,
    read_journal,
    read_ledger,
    read_topic,
    summary_line,
    wait_for,
    worker,
)

pytestmark = [pytest.mark.faults, pytest.mark.services]

TRIALS = 6
INJECTIONS_PER_TRIAL = 2


def kill(process: subprocess.Popen[bytes]) -> bool:
    """SIGKILL; True if it was still running (so the kill really interrupted it)."""
    alive = process.poll() is None
    process.kill()
    process.wait(10)
    return alive


def test_sigkilled_relays_and_writers_lose_nothing_and_duplicate_no_effect(
    store: EventStore, settings: Settings, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    journal = tmp_path / "journal.jsonl"
    injected: Counter[str] = Counter()

    def start_writer() -> subprocess.Popen[bytes]:
        return worker(
            settings, "write", "--streams", "sample-fault", "--log", str(journal), "--seed", str(rng.randrange(2**32)),
            log=tmp_path / "writer.out",
        )

    def start_relay() -> subprocess.Popen[bytes]:
        return worker(settings, "relay", log=tmp_path / "relay.out")

    for _ in range(TRIALS):
        relay, writer = start_relay(), start_writer()
        journal_size = len(read_journal(journal))
        wait_for(lambda: len(read_journal(journal)) > journal_size + 4, 60, "the writer to start appending", interval=0.05)
        for _ in range(INJECTIONS_PER_TRIAL):
            time.sleep(rng.uniform(0.05, 1.0))
            victim = rng.choice(["relay", "writer", "both"])
            if victim in ("relay", "both"):
                injected["relay killed"] += kill(relay)
                relay = start_relay()
            if victim in ("writer", "both"):
                injected["writer killed"] += kill(writer)
                writer = start_writer()
        time.sleep(rng.uniform(0.5, 1.5))
        injected["relay killed"] += kill(relay)
        injected["writer killed"] += kill(writer)

    store.flush(timeout=60)
    ledger = read_ledger(settings.database_url)
    check = assert_topic_matches_ledger(read_topic(settings), ledger)
    journal_check = assert_journal_consistent(read_journal(journal), ledger)
    assert journal_check.acknowledged > TRIALS * 5
    assert injected["relay killed"] >= TRIALS and injected["writer killed"] >= TRIALS

    facts = {
        "seed": seed,
        "trials": TRIALS,
        **{k.replace(" ", "_"): v for k, v in sorted(injected.items())},
        "streams": len(ledger),
        "events": check.events,
        "republished_duplicates": check.duplicates,
        "acked_appends": journal_check.acknowledged,
        "committed_but_unacked": journal_check.committed_unacknowledged,
        "never_committed": journal_check.never_committed,
    }
    for key, value in facts.items():
        record_property(key, value)
    print("\n" + summary_line("relay faults", facts))
