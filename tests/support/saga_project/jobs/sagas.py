"""Jobs of 1 to 6 steps, and a worker that answers each command as the job's plan says.

A plan (JSON, carried by the job) maps ``"<step>/<kind>"`` to the outcomes of successive
attempts, the last one repeating: ``ok`` (the effect is applied and answered), ``fail`` (a
business failure, nothing applied), ``transient`` (a transient failure, nothing applied),
``silent`` (nothing applied, no answer) and ``lost`` (applied, but no answer: the outcome is
unknown to the saga). Missing entries are ``ok``. The worker records every effect it applies
in ``effects``, in the same transaction as its answers, so a test can count them.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import psycopg
from psycopg import sql

from projections.sagas import Command, Retry, Saga, SagaContext, Step
from projections.sagas.participant import Answer, Participant, Received, answers

MAX_STEPS = 6
DEADLINE = timedelta(minutes=1)


def _command(step: str, kind: str):  # type: ignore[no-untyped-def]
    def build(saga: SagaContext) -> Command:
        return Command("StepCommand", {"job_id": saga.key, "step": step, "kind": kind, "attempt": saga.attempt,
                                       "plan": saga.start["plan"], "action_command_id": saga.command_id})
    return build


def job_saga(steps: int) -> type[Saga]:
    """The saga for jobs of ``steps`` steps (it starts only on jobs of that many steps)."""

    class Job(Saga):
        name = f"job{steps}"
        starts_on = "JobRequested"
        correlation = "job_id"
        compensation_retry = Retry(attempts=3, base=timedelta(seconds=1), cap=timedelta(seconds=4))

        def key(self, event_type: str, data: Any) -> str | None:
            if event_type.endswith("JobRequested") and data.get("steps") != steps:
                return None
            return super().key(event_type, data)

    Job.steps = tuple(
        Step(f"s{i}", action=_command(f"s{i}", "action"), compensation=_command(f"s{i}", "compensation"),
             succeeded_on=("StepDone",), failed_on=("StepFailed",), transient_on=("StepFlaky",),
             compensated_on=("StepUndone",), compensation_failed_on=("UndoFailed",),
             retry=Retry(attempts=3, base=timedelta(seconds=1), cap=timedelta(seconds=4)), deadline=DEADLINE)
        for i in range(steps)
    )
    Job.__name__ = Job.__qualname__ = f"Job{steps}"
    return Job


JOBS = {n: job_saga(n) for n in range(1, MAX_STEPS + 1)}
Job3 = JOBS[3]


def outcome(plan: str, step: str, kind: str, attempt: int) -> str:
    outcomes = json.loads(plan).get(f"{step}/{kind}", ["ok"])
    return str(outcomes[min(attempt, len(outcomes)) - 1])


class Worker(Participant):
    name = "worker"

    def create_tables(self, cur: psycopg.Cursor[Any], schema: str) -> None:
        cur.execute(sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.effects (seq bigserial PRIMARY KEY, job_id text NOT NULL, step text NOT NULL,"
            " kind text NOT NULL, command_id text NOT NULL)").format(sql.Identifier(schema)))

    @answers("StepCommand")
    def work(self, command: Received) -> list[Answer]:
        data = command.data
        job, step, kind = data["job_id"], data["step"], data["kind"]
        result = outcome(data["plan"], step, kind, data["attempt"])
        schema = sql.Identifier(f"{self.name}_participant")
        applied = result in ("ok", "lost")
        if applied and kind == "compensation":
            # Undo only what took effect: compensating an action that never applied is a no-op.
            found = command.cursor.execute(sql.SQL(
                "SELECT count(*) FROM {}.effects WHERE job_id = %s AND step = %s AND kind = 'action'").format(schema),
                (job, step)).fetchone()
            applied = bool(found and found[0])
        if applied:
            command.cursor.execute(sql.SQL(
                "INSERT INTO {}.effects (job_id, step, kind, command_id) VALUES (%s, %s, %s, %s)").format(schema),
                (job, step, kind, command.event_id))
        if result in ("silent", "lost"):
            return []
        reply = {"ok": "StepDone", "fail": "StepFailed", "transient": "StepFlaky"}[result] if kind == "action" else \
            {"ok": "StepUndone", "fail": "UndoFailed", "transient": "UndoFailed"}[result]
        return [Answer(f"worker-{job}", reply, {"job_id": job, "step": step, "command_id": command.event_id,
                                                 "reason": None if result == "ok" else f"planned {result}"})]
