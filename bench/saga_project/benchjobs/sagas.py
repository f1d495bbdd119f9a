"""Three-step jobs, and a worker that fails about one job in ten at a step chosen by the job id.

The worker keeps no state: which job fails, and at which step, follows from the job id
alone (:func:`failing_step`), so the benchmark knows beforehand how many sagas must end
completed and how many compensated. A failing step is answered ``StepFailed`` (a business
failure: nothing applied), so the saga compensates the steps before it in reverse order;
every compensation is answered ``StepUndone``. No retries and no deadlines: no timers.
"""

from __future__ import annotations

import hashlib

from projections.sagas import Command, Saga, SagaContext, Step
from projections.sagas.declaration import Builder
from projections.sagas.participant import Answer, Participant, Received, answers

STEPS = ("s1", "s2", "s3")
#: One job in FAIL_EVERY fails (deterministically from its id).
FAIL_EVERY = 10


def failing_step(job_id: str) -> str | None:
    """The step at which ``job_id`` fails, or None for a job that succeeds (about 9 in 10)."""
    digest = int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:8], "big")
    if digest % FAIL_EVERY:
        return None
    return STEPS[(digest // FAIL_EVERY) % len(STEPS)]


def _command(step: str, kind: str) -> Builder:
    def build(saga: SagaContext) -> Command:
        return Command("StepCommand", {"job_id": saga.key, "step": step, "kind": kind, "attempt": saga.attempt,
                                       "action_command_id": saga.command_id})
    return build


class Job(Saga):
    name = "job"
    starts_on = "JobRequested"
    correlation = "job_id"
    steps = tuple(
        Step(name, action=_command(name, "action"), compensation=_command(name, "compensation"),
             succeeded_on=("StepDone",), failed_on=("StepFailed",), compensated_on=("StepUndone",))
        for name in STEPS
    )


class Worker(Participant):
    name = "worker"

    @answers("StepCommand")
    def work(self, command: Received) -> Answer:
        data = command.data
        job, step, kind = str(data["job_id"]), str(data["step"]), str(data["kind"])
        if kind == "compensation":
            reply, reason = "StepUndone", None
        elif failing_step(job) == step:
            reply, reason = "StepFailed", f"step {step} of job {job} fails (1 job in {FAIL_EVERY})"
        else:
            reply, reason = "StepDone", None
        return Answer(f"work-{job}", reply, {"job_id": job, "step": step, "command_id": command.event_id,
                                             "reason": reason})
