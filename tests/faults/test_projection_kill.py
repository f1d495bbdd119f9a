"""SIGKILL the projection runner at random points while events keep arriving.

The runner is started as its own process (``python -m projections.cli run``, the same
actions as ``evp projections run`` without importing the trainer's torch), killed without
warning several times, restarted, and finally stopped with SIGTERM. Meanwhile a writer
appends, flushes, and now and then makes the relay re-publish events it already sent. In
the end the view must equal the one-event-at-a-time fold of everything appended: a batch
lost or applied twice by any of the kills shows up as a difference.
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

from events.store.client import EventStore
from events.settings import Settings
from projections.runner import ProjectionRunner, projection_lag
from projections.declarations import load_view
from tests.support.examples import DIGITS, project
from tests.support.views import ExpectedSamples, assert_samples, random_ops

REPO = Path(__file__).resolve().parents[2]
KILLS = 5


def _start_runner(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, **settings.to_env(), "PYTHONPATH": str(REPO)}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "projections.cli", "run", "samples", "--batch-size", "50"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )


def _wait_for_applied(settings: Settings, before: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until the runner has committed a batch of its own."""
    deadline = time.monotonic() + 60
    while _applied_offsets(settings) <= before:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the runner applied nothing (exit code {proc.poll()}):\n{log.read_text()[-2000:]}")
        time.sleep(0.05)


def _applied_offsets(settings: Settings) -> int:
    with psycopg.connect(settings.database_url) as conn:
        exists = conn.execute("SELECT to_regclass('samples_view.evp_offsets')").fetchone()[0]
        return int(conn.execute("SELECT coalesce(sum(next_offset), 0) FROM samples_view.evp_offsets").fetchone()[0]) if exists else 0


@pytest.mark.services
@pytest.mark.faults
def test_a_runner_killed_at_random_points_loses_and_doubles_nothing(store: EventStore, settings: Settings, tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    expected = ExpectedSamples()
    writing = threading.Event()
    writing.set()
    writer_errors: list[BaseException] = []
    republished = 0

    def write() -> None:
        nonlocal republished
        wrng = random.Random(seed + 1)
        rounds = 0
        try:
            while writing.is_set():
                random_ops(wrng, store, expected, "k", 6, pool=40)
                rounds += 1
                if rounds % 4 == 0:  # a relay that crashed after sending: the last events go out again
                    with psycopg.connect(settings.database_url, autocommit=True) as conn:
                        republished += conn.execute(
                            "INSERT INTO evp_outbox (position, partition) SELECT position, partition FROM evp_events"
                            " WHERE position > (SELECT max(position) - 15 FROM evp_events) ON CONFLICT DO NOTHING"
                        ).rowcount
                store.flush()
        except BaseException as err:  # noqa: BLE001 - reported by the test thread
            writer_errors.append(err)

    log = tmp_path / "runner.log"
    log.touch()
    writer = threading.Thread(target=write)
    writer.start()
    kills = 0
    try:
        for _ in range(KILLS):
            before = _applied_offsets(settings)
            proc = _start_runner(settings, log)
            _wait_for_applied(settings, before, proc, log)  # kill during the work, not during the imports
            time.sleep(rng.uniform(0.0, 1.0))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            kills += 1
    finally:
        writing.clear()
        writer.join(timeout=60)
    assert not writer_errors, f"the writer failed: {writer_errors[0]!r}"
    store.flush()

    # one last run, stopped politely once it has caught up
    proc = _start_runner(settings, log)
    deadline = time.monotonic() + 60
    while not (lags := projection_lag(settings, "samples_view")) or any(l.lag for l in lags):
        assert time.monotonic() < deadline, f"the last run did not catch up: {lags}"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0, log.read_text()[-2000:]
    assert "stopped after" in log.read_text()

    print(f"seed {seed}: {kills} SIGKILLs, each after the run had committed batches; "
          f"{sum(expected.versions.values())} events appended, {republished} re-published")
    with ProjectionRunner(settings, load_view(project(DIGITS), "samples")) as runner:
        final = runner.catch_up()
    assert final.applied == 0, "the SIGTERMed run had caught up: nothing may be left"
    with psycopg.connect(settings.database_url) as conn:
        assert_samples(conn, expected.rows)
        versions = dict(conn.execute("SELECT stream_id, version FROM samples_view.evp_stream_versions").fetchall())
    assert versions == expected.versions
