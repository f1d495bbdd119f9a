"""Runners that share a view's partitions: each takes a share through a lease; one SIGKILLed mid-catch-up loses nothing.

Two ``python -m projections.cli run samples --scale-out`` processes fold one view. The
leases split the topic's partitions between them; each commits only its partitions'
offsets. One is SIGKILLed while it is applying batches; its session dies with its leases,
the survivor takes them over at the offsets the dead one committed, and in the end the view
equals the one-event-at-a-time fold of everything appended.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from events.settings import Settings
from events.store.client import EventStore
from projections.declarations import load_view
from projections.leases import MEMBER, lease_class
from projections.runner import ProjectionRunner, projection_lag
from tests.support.examples import DIGITS, project
from tests.support.views import SAMPLES_SCHEMA, ExpectedSamples, assert_samples, random_ops

REPO = Path(__file__).resolve().parents[2]


def _start(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, **settings.to_env(), "PYTHONPATH": str(REPO)}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "projections.cli", "run", "samples", "--batch-size", "20", "--scale-out"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )


def _leases(settings: Settings) -> dict[int, int]:
    """partition -> pid of the backend holding its lease."""
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute(
            "SELECT objid::int, pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = %s::oid"
            " AND objsubid = 2 AND objid <> %s::oid", (lease_class(SAMPLES_SCHEMA), MEMBER & 0xFFFFFFFF)).fetchall()
    return {int(p): int(pid) for p, pid in rows}


def _wait(condition, what: str, log: Path, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


@pytest.mark.services
@pytest.mark.faults
def test_two_runners_share_the_partitions_and_the_survivor_of_a_sigkill_finishes_exactly(
        store: EventStore, settings: Settings, tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    expected = ExpectedSamples()
    random_ops(rng, store, expected, "r0", 6, pool=25)  # the topic exists before the runners start
    store.flush()
    assert settings.partitions >= 2

    log = tmp_path / "runners.log"
    log.touch()
    first, second = _start(settings, log), _start(settings, log)
    writing, errors = threading.Event(), []

    def write() -> None:
        rounds = 0
        try:
            while writing.is_set() or rounds < 20:
                random_ops(rng, store, expected, f"w{rounds}", 20, pool=25)
                store.flush()
                rounds += 1
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    writer = threading.Thread(target=write)
    try:
        # Both hold leases at once: the partitions are shared, not all taken by one.
        _wait(lambda: len(set(_leases(settings).values())) == 2 and len(_leases(settings)) == settings.partitions,
              "both runners to hold a share of the leases", log)
        shares = _leases(settings)
        writing.set()
        writer.start()
        _wait(lambda: sum(_offsets(settings).values()) > 20, "the runners to commit batches", log)
        first.send_signal(signal.SIGKILL)  # mid-catch-up: the writer keeps the partitions behind
        first.wait(timeout=10)
        at_kill = _offsets(settings)
        _wait(lambda: len(set(_leases(settings).values())) == 1 and len(_leases(settings)) == settings.partitions,
              "the survivor to take over every lease", log)
        survivor = next(iter(set(_leases(settings).values())))
        writing.clear()
        writer.join(timeout=120)
        assert not errors, f"the writer failed: {errors[0]!r}"
        store.flush()
        _wait(lambda: all(l.lag == 0 for l in projection_lag(settings, SAMPLES_SCHEMA)), "the survivor to catch up", log)
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=20) == 0, log.read_text()[-2000:]
    finally:
        writing.clear()
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()
    victims = {p for p, pid in shares.items() if pid != survivor}
    final = _offsets(settings)
    taken_over = {p for p in victims if final.get(p, 0) > at_kill.get(p, 0)}
    assert taken_over, f"seed {seed}: no partition of the killed runner ({victims}) moved after the kill: {at_kill} -> {final}"
    with psycopg.connect(settings.database_url) as conn:
        assert_samples(conn, expected.rows)
        versions: dict[str, int] = dict(conn.execute("SELECT stream_id, version FROM samples_view.evp_stream_versions").fetchall())
    assert versions == expected.versions, f"seed {seed}"
    print(f"seed {seed}: leases {shares} before the kill; {sum(expected.versions.values())} events folded exactly once")


def _offsets(settings: Settings) -> dict[int, int]:
    with psycopg.connect(settings.database_url) as conn:
        if conn.execute("SELECT to_regclass('samples_view.evp_offsets')").fetchone() is None:
            return {}
        rows = conn.execute("SELECT partition, next_offset FROM samples_view.evp_offsets").fetchall()
    return {int(p): int(o) for p, o in rows}


def test_runners_scaling_out_in_one_process_fold_the_view_as_one_runner_does(store: EventStore, settings: Settings) -> None:
    rng = random.Random(7)
    expected = ExpectedSamples()
    for round_ in range(10):
        random_ops(rng, store, expected, f"q{round_}", 12, pool=20)
    store.flush()
    view = load_view(project(DIGITS), "samples")
    with ProjectionRunner(settings, view, scale_out=True, batch_size=7) as a, \
            ProjectionRunner(settings, view, scale_out=True, batch_size=7) as b:
        a.open()
        b.open()
        a.rebalance(force=True)  # a held every partition: it hands back the extra one
        b.rebalance(force=True)  # and b takes it
        held_a, held_b = set(a.leases.held), set(b.leases.held)  # type: ignore[union-attr]
        assert held_a and held_b and not held_a & held_b and held_a | held_b == set(range(settings.partitions))
        a.catch_up()
        b.catch_up()
    with psycopg.connect(settings.database_url) as conn:
        assert_samples(conn, expected.rows)
