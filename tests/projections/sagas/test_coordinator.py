"""The saga coordinator against the real services: completion, compensation, parking, deadlines, idempotency."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
from kafka import TopicPartition

from events.adapters import kafka, postgres
from events.errors import ConfigurationError
from events.event import HEADER_EVENT_ID, Event
from events.settings import Settings
from projections.sagas import Saga
from projections.sagas.coordinator import SagaCoordinator
from projections.sagas.declaration import command_id
from projections.sagas.machine import SagaState
from projections.sagas.store import fold_stream
from tests.support.saga_child import Planned, check_jobs
from tests.support.sagas import PROJECT, Jobs, jobs, jobs_module


def test_a_job_completes_and_its_timeline_is_the_same_in_the_ledger_and_on_the_topic(settings: Settings) -> None:
    with jobs(settings) as h:
        h.start("j1", 3)
        states = h.drive(["j1"])
        assert states["j1"].status == "completed"
        assert h.effects() == [("j1", "s0", "action"), ("j1", "s1", "action"), ("j1", "s2", "action")]
        ledger = h.ledger_timeline("saga-job3-j1")
        assert ledger == h.topic_timeline("saga-job3-j1")
        assert [t for _, t in ledger][:3] == ["evp.platform.SagaStarted", "evp.platform.SagaStepRequested", "jobs.StepCommand"]
        assert ledger[-1][1] == "evp.platform.SagaCompleted"


def test_a_business_failure_compensates_the_applied_steps_in_reverse(settings: Settings) -> None:
    with jobs(settings) as h:
        h.start("j2", 4, {"s2/action": ["fail"]})
        states = h.drive(["j2"])
        assert states["j2"].status == "compensated"
        assert h.effects() == [("j2", "s0", "action"), ("j2", "s1", "action"),
                               ("j2", "s1", "compensation"), ("j2", "s0", "compensation")]


# -- retries, deadlines, parking and the operator ----------------------------------------------
REPO = Path(__file__).resolve().parents[3]
PLATFORM = "evp.platform."


def _types(h: Jobs, saga_id: str) -> list[str]:
    return [t for _, t in h.ledger_timeline(saga_id)]


def test_a_transient_failure_is_retried_and_then_succeeds_with_each_effect_once(settings: Settings) -> None:
    with jobs(settings) as h:
        h.start("t1", 3, {"s1/action": ["transient", "transient", "ok"]})
        states = h.drive(["t1"])
        assert states["t1"].status == "completed"
        assert states["t1"].applied == ("s0", "s1", "s2")
        assert h.effects() == [("t1", "s0", "action"), ("t1", "s1", "action"), ("t1", "s2", "action")]
        stream = h.store.read_stream("saga-job3-t1", decrypt=False)
        commands = [(e.data["step"], e.data["attempt"], e.data["kind"]) for e in stream if e.type == "jobs.StepCommand"]
        assert commands == [("s0", 1, "action"), ("s1", 1, "action"), ("s1", 2, "action"), ("s1", 3, "action"),
                            ("s2", 1, "action")]
        types = _types(h, "saga-job3-t1")
        assert types.count(PLATFORM + "SagaRetryScheduled") == 2
        assert PLATFORM + "SagaCompensationRequested" not in types
        assert h.ledger_timeline("saga-job3-t1") == h.topic_timeline("saga-job3-t1")


def test_a_step_whose_answer_is_lost_is_compensated_after_its_deadline(settings: Settings) -> None:
    with jobs(settings) as h:
        h.start("l1", 3, {"s1/action": ["lost"]})
        states = h.drive(["l1"])
        state = states["l1"]
        assert state.status == "compensated"
        assert state.unknown == ("s1",) and state.compensated == ("s1", "s0")
        # the lost step took effect without saying so: it is undone, then the one before it
        assert h.effects() == [("l1", "s0", "action"), ("l1", "s1", "action"),
                               ("l1", "s1", "compensation"), ("l1", "s0", "compensation")]
        types = _types(h, "saga-job3-l1")
        assert types.count(PLATFORM + "SagaDeadlineFired") == 1
        assert PLATFORM + "SagaStepSucceeded" in types and types[-1] == PLATFORM + "SagaCompensated"
        stream = h.store.read_stream("saga-job3-l1", decrypt=False)
        undo = [e for e in stream if e.type == "jobs.StepCommand" and e.data["kind"] == "compensation"
                and e.data["step"] == "s1"]
        assert [e.data["action_command_id"] for e in undo] == [str(command_id("saga-job3-l1", "s1", 1, "action"))]


def _evp(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m events.cli.main ARGS`` from this checkout with exactly ``settings`` (the jobs project)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVP_")}
    env.update(settings.to_env(), PYTHONPATH=str(REPO))
    assert env["EVP_PROJECT"] == str(PROJECT)
    return subprocess.run([sys.executable, "-m", "events.cli.main", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)


def test_a_compensation_that_keeps_failing_parks_the_saga_until_an_operator_marks_it(settings: Settings) -> None:
    saga_id = "saga-job3-p1"
    with jobs(settings) as h:
        h.start("p1", 3, {"s1/action": ["fail"], "s0/compensation": ["fail"]})
        states = h.drive(["p1"])
        state = states["p1"]
        assert state.status == "parked"
        assert state.step == "s0" and state.phase == "compensation" and state.attempt == 3
        assert state.reason is not None and "'s0'" in state.reason and "planned fail" in state.reason
        assert state.compensated == ()
        types = _types(h, saga_id)
        assert types.count(PLATFORM + "SagaCompensationFailed") == 3
        assert PLATFORM + "SagaCompensated" not in types and types[-1] == PLATFORM + "SagaParked"
        assert h.effects() == [("p1", "s0", "action")]
        h.drive(["p1"], rounds=5)  # time passes: a parked saga stays parked, nothing is issued
        assert h.states()["p1"].status == "parked" and _types(h, saga_id) == types

        listed = _evp(h.settings, "sagas", "list", "--state", "parked", "--json")
        assert listed.returncode == 0, listed.stderr
        rows = json.loads(listed.stdout)
        assert [(r["saga_id"], r["status"], r["step"]) for r in rows] == [(saga_id, "parked", "s0")]
        assert "'s0'" in rows[0]["reason"]

        shown = _evp(h.settings, "sagas", "show", saga_id, "--json")
        assert shown.returncode == 0, shown.stderr
        page = json.loads(shown.stdout)
        assert page["saga"]["status"] == "parked"
        events = [line["event"] for line in page["timeline"]]
        assert events.count("SagaCompensationFailed") == 3 and events[-1] == "SagaParked"
        assert [line["attempt"] for line in page["timeline"] if line["event"] == "SagaCompensationFailed"] == [1, 2, 3]

        marked = _evp(h.settings, "sagas", "mark-compensated", saga_id, "--reason", "ticket 7", "--actor", "alice")
        assert marked.returncode == 0, marked.stderr
        assert "alice" in marked.stdout

        states = h.drive(["p1"])
        assert states["p1"].status == "compensated"
        assert states["p1"].compensated == ("s0",)
        assert h.effects() == [("p1", "s0", "action")]  # compensated by hand: the worker did nothing more
        stream = h.store.read_stream(saga_id, decrypt=False)
        actions = [e for e in stream if e.type == PLATFORM + "SagaOperatorAction"]
        assert [(e.record.actor, e.data["action"], e.data["reason"]) for e in actions] == \
            [("alice", "mark-compensated", "ticket 7")]
        assert [e.type for e in stream][-3:] == [PLATFORM + "SagaOperatorAction", PLATFORM + "SagaCompensationDone",
                                                 PLATFORM + "SagaCompensated"]
        assert h.ledger_timeline(saga_id) == h.topic_timeline(saga_id)
        folded = fold_stream(h.store, saga_id)
        assert folded is not None and folded.status == "compensated"

        assert json.loads(_evp(h.settings, "sagas", "list", "--state", "parked", "--json").stdout) == []
        again = _evp(h.settings, "sagas", "mark-compensated", saga_id, "--reason", "ticket 8", "--actor", "bob")
        assert again.returncode == 1 and "compensated" in again.stderr
        assert len(h.store.read_stream(saga_id, decrypt=False)) == len(stream)  # a refused action writes nothing


# -- idempotency ---------------------------------------------------------------------------------
def _redeliver(settings: Settings, event_id: uuid.UUID, copies: int) -> None:
    """Publish ``copies`` more copies of the record of ``event_id`` (a relay that keeps re-sending it)."""
    reader = kafka.consumer(settings)
    try:
        tps = [TopicPartition(settings.events_topic, p)
               for p in sorted(reader.partitions_for_topic(settings.events_topic) or ())]
        reader.assign(tps)
        reader.seek_to_beginning(*tps)
        ends = reader.end_offsets(tps)
        found = None
        while found is None and any(reader.position(tp) < ends[tp] for tp in tps):
            for messages in reader.poll(timeout_ms=1000).values():
                for message in messages:
                    if dict(message.headers or []).get(HEADER_EVENT_ID) == str(event_id).encode():
                        found = message
        assert found is not None, f"event {event_id} is not on the topic"
    finally:
        reader.close()
    producer = kafka.producer(settings)
    try:
        for _ in range(copies):
            producer.send(settings.events_topic, key=found.key, value=found.value, headers=found.headers,
                          partition=found.partition)
        producer.flush()
    finally:
        producer.close()


def test_a_start_delivered_a_thousand_times_makes_one_saga_and_one_first_command(settings: Settings) -> None:
    with jobs(settings) as h:
        h.coordinator.close()  # small batches: the copies meet the instance within a batch and across batches
        h.coordinator = SagaCoordinator(h.settings, h.sagas, clock=h.clock, batch_size=64)
        data = {"job_id": "many", "steps": 3, "plan": "{}"}
        # the same event id appended 1,000 times, then its record re-published 999 times
        same = uuid.uuid4()
        results = [h.store.append("job-same", Event("JobRequested", {**data, "job_id": "same"}, event_id=same))
                   for _ in range(1000)]
        assert [r.duplicate for r in results] == [False] + [True] * 999
        h.store.flush()
        _redeliver(h.settings, same, 999)
        # 1,000 distinct events starting the same job, on one stream and on many
        h.store.append("job-many", [Event("JobRequested", data) for _ in range(500)])
        for i in range(50):
            h.store.append(f"job-many-{i}", [Event("JobRequested", data) for _ in range(10)])
        h.store.flush()

        first = h.coordinator.catch_up()
        assert first.applied >= 1001 and first.skipped >= 999, first
        states = h.drive(["same", "many"])
        assert {k: s.status for k, s in states.items()} == {"same": "completed", "many": "completed"}
        assert states["same"].trigger_event_id == str(same)
        for key in ("same", "many"):
            saga_id = f"saga-job3-{key}"
            types = _types(h, saga_id)
            assert types.count(PLATFORM + "SagaStarted") == 1
            stream = h.store.read_stream(saga_id, decrypt=False)
            commands = [(e.data["step"], e.data["attempt"], e.data["kind"]) for e in stream if e.type == "jobs.StepCommand"]
            assert commands == [("s0", 1, "action"), ("s1", 1, "action"), ("s2", 1, "action")], key
        with postgres.connect(h.settings.database_url, autocommit=True) as conn:
            rows = conn.execute("SELECT saga, key FROM evp_sagas.evp_sagas ORDER BY key").fetchall()
        assert rows == [("job3", "many"), ("job3", "same")]
        assert sorted(h.effects()) == sorted((k, f"s{i}", "action") for k in ("same", "many") for i in range(3))


MIXED = [
    Planned("a", 3),
    Planned("b", 4, {"s2/action": ["fail"]}),
    Planned("c", 2, {"s0/action": ["transient", "ok"]}),
    Planned("d", 3, {"s1/action": ["lost"]}),
    Planned("e", 3, {"s1/action": ["fail"], "s0/compensation": ["fail"]}),
    Planned("f", 5, {"s3/action": ["silent"], "s1/compensation": ["transient", "ok"]}),
    Planned("g", 1, {"s0/action": ["transient"]}),
    Planned("h", 6),
]


def _start_all(h: Jobs, planned: Sequence[Planned]) -> None:
    for job in planned:
        h.start(job.job_id, job.steps, job.plan)


def _drive_two(h: Jobs, one: SagaCoordinator, two: SagaCoordinator, keys: Sequence[str], *, threaded: bool,
               rounds: int = 60) -> None:
    """Rounds like :meth:`Jobs.drive`, each coordinator catching up over records the other already decided."""

    def both(first: Callable[[], object], second: Callable[[], object]) -> None:
        if not threaded:
            first()
            second()
            return
        with ThreadPoolExecutor(2) as pool:
            for future in [pool.submit(first), pool.submit(second)]:
                future.result()

    idle, before = False, dict[str, SagaState]()
    for number in range(rounds):
        a, b = (one, two) if number % 2 == 0 else (two, one)
        h.store.flush()
        both(a.catch_up, b.catch_up)
        h.store.flush()
        h.worker.catch_up()
        h.store.flush()
        both(b.catch_up, lambda: (a.tick(), a.catch_up()))  # a timer fires while the other reads the replies
        h.clock.advance(timedelta(minutes=2) if idle else timedelta(seconds=5))
        both(a.tick, b.tick)
        h.store.flush()
        states = h.states()
        if len(states) == len(keys) and all(s.status in ("completed", "compensated", "parked") for s in states.values()):
            break
        idle, before = before == states, states
    h.store.flush()
    one.catch_up()
    two.catch_up()


@pytest.mark.parametrize(("threaded", "scale_out"), [(False, False), (True, False), (False, True), (True, True)],
                         ids=["alternating", "threads", "scaled-out-alternating", "scaled-out-threads"])
def test_two_coordinators_never_issue_a_command_twice(settings: Settings, threaded: bool, scale_out: bool) -> None:
    with jobs(settings) as h:
        h.coordinator.close()
        one = SagaCoordinator(h.settings, h.sagas, clock=h.clock, batch_size=7, actor="coordinator-one",
                              scale_out=scale_out)
        two = SagaCoordinator(h.settings, h.sagas, clock=h.clock, batch_size=7, actor="coordinator-two",
                              scale_out=scale_out)
        try:
            if scale_out:  # each reads its share of the partitions: a saga's trigger and replies meet on both
                one.open()
                two.open()
                one.rebalance(force=True)
                two.rebalance(force=True)
                assert one.leases is not None and two.leases is not None
                assert one.leases.held and two.leases.held and not one.leases.held & two.leases.held
            _start_all(h, MIXED)
            _drive_two(h, one, two, [j.job_id for j in MIXED], threaded=threaded)
            counts = check_jobs(h, MIXED, f"two coordinators ({'threads' if threaded else 'alternating'})")
            assert counts == {"completed": 3, "compensated": 4, "parked": 1}
            with postgres.connect(h.settings.database_url, autocommit=True) as conn:
                actors = {r[0]: r[1] for r in conn.execute(
                    "SELECT actor, count(*) FROM evp_events WHERE stream_id LIKE 'saga-%' GROUP BY actor")}
            if not threaded or scale_out:  # alternating, or partitions split: each decided some of it
                assert set(actors) == {"coordinator-one", "coordinator-two"}, actors
        finally:
            one.close()
            two.close()


def test_a_coordinator_without_the_version_open_instances_need_refuses_to_start(settings: Settings) -> None:
    module = jobs_module()
    v1: type[Saga] = module.JOBS[3]

    class JobV2(v1):  # type: ignore[valid-type, misc]
        version = 2

    class JobV2KeepingV1(v1):  # type: ignore[valid-type, misc]
        version = 2
        previous = (v1,)

    with jobs(settings) as h:
        h.start("open", 3, {"s0/action": ["lost"], "s0/compensation": ["fail"]})  # parked: still open
        h.start("done", 3)
        states = h.drive(["open", "done"])
        assert {k: s.status for k, s in states.items()} == {"open": "parked", "done": "completed"}
        h.start("running", 3)  # waits for its first step's answer
        h.store.flush()
        h.coordinator.catch_up()
        assert h.states()["running"].status == "running"
        others = [cls() for n, cls in module.JOBS.items() if n != 3]

        before = h.ledger_timeline("saga-job3-running")
        refusing = SagaCoordinator(h.settings, [*others, JobV2()], clock=h.clock)
        try:
            with pytest.raises(ConfigurationError, match=r"saga 'job3' v1 .*saga-job3-open") as refused:
                refusing.catch_up()
            assert "saga-job3-running" in str(refused.value)
            assert "saga-job3-done" not in str(refused.value)
        finally:
            refusing.close()
        assert h.ledger_timeline("saga-job3-running") == before  # the refusal wrote nothing

        h.coordinator.close()
        h.coordinator = SagaCoordinator(h.settings, [*others, JobV2KeepingV1()], clock=h.clock)
        h.start("new", 3)
        states = h.drive(["open", "done", "running", "new"])
        assert {k: (s.status, s.definition_version) for k, s in states.items()} == {
            "open": ("parked", 1), "done": ("completed", 1), "running": ("completed", 1), "new": ("completed", 2)}
        assert sorted(e for e in h.effects() if e[0] in ("running", "new")) == sorted(
            (k, f"s{i}", "action") for k in ("running", "new") for i in range(3))


def test_a_coordinator_that_refused_to_start_keeps_refusing_when_called_again(settings: Settings) -> None:
    """The refusal must hold for the coordinator object, not only for its first call."""
    module = jobs_module()
    v1: type[Saga] = module.JOBS[3]

    class JobV2(v1):  # type: ignore[valid-type, misc]
        version = 2

    with jobs(settings) as h:
        h.start("open", 3, {"s0/action": ["silent"]})
        h.store.flush()
        h.coordinator.catch_up()
        assert h.states()["open"].status == "running"
        refusing = SagaCoordinator(h.settings, [*(c() for n, c in module.JOBS.items() if n != 3), JobV2()],
                                   clock=h.clock)
        try:
            with pytest.raises(ConfigurationError, match="saga-job3-open"):
                refusing.catch_up()
            h.start("later", 3)
            h.store.flush()
            try:
                refusing.catch_up()  # called again (a supervisor that retries, a test): still refused
            except ConfigurationError as err:
                assert "saga-job3-open" in str(err)
        finally:
            refusing.close()
        later = h.states().get("later")
        assert later is None, f"the coordinator that refused to start went on and started {later}"
