"""Saga declarations: clear configuration errors, the retry backoff and the commands' idempotency keys.

Pure tests: no services, no fixtures beyond hypothesis.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from events.errors import ConfigurationError
from projections.sagas.declaration import (
    ACTION, COMPENSATION, Builder, Command, Definitions, Retry, Saga, SagaContext, Step, command_id,
)

KINDS = (ACTION, COMPENSATION)
UTF8 = st.characters(codec="utf-8")  #: what an event can carry (no lone surrogates)


def build(name: str) -> Builder:
    def make(ctx: SagaContext) -> Command:
        return Command(name, {"job_id": ctx.key})
    return make


def step(name: str, **changes: Any) -> Step:
    """A valid step with a compensation; ``changes`` override any field."""
    fields: dict[str, Any] = dict(action=build("Do"), compensation=build("Undo"), succeeded_on=("Done",),
                                  failed_on=("Failed",), transient_on=("Flaky",), compensated_on=("Undone",),
                                  compensation_failed_on=("UndoFailed",))
    fields.update(changes)
    return Step(name, **fields)


def saga_class(name: str = "job", version: int = 1, steps: tuple[Any, ...] | None = None,
               previous: tuple[type[Saga], ...] = ()) -> type[Saga]:
    class Job(Saga):
        starts_on = "JobRequested"
        correlation = "job_id"

    Job.name = name
    Job.version = version
    Job.steps = (step("a"), step("b")) if steps is None else steps
    Job.previous = previous
    Job.__name__ = Job.__qualname__ = f"Job_{name}_v{version}"
    return Job


# -- steps ---------------------------------------------------------------------------------
def test_a_valid_step_is_accepted_and_its_replies_mean_what_it_declares() -> None:
    s = step("train")
    assert s.meaning("Done") == "succeeded"
    assert s.meaning("shop.Done") == "succeeded"  # the full name of a declared short name
    assert s.meaning("Failed") == "failed"
    assert s.meaning("Flaky") == "transient"
    assert s.meaning("Undone") == "compensated"
    assert s.meaning("UndoFailed") == "compensation_failed"
    assert s.meaning("Unrelated") is None


def test_a_step_without_succeeded_on_names_the_step_and_the_field() -> None:
    with pytest.raises(ConfigurationError) as err:
        step("train", succeeded_on=())
    assert "'train'" in str(err.value) and "succeeded_on" in str(err.value)


@pytest.mark.parametrize("field", ["compensated_on", "compensation_failed_on"])
def test_compensation_replies_without_a_compensation_are_refused(field: str) -> None:
    changes: dict[str, Any] = {"compensation": None, "compensated_on": (), "compensation_failed_on": ()}
    changes[field] = ("Undone",)
    with pytest.raises(ConfigurationError) as err:
        step("train", **changes)
    assert "'train'" in str(err.value) and "compensation" in str(err.value)


def test_a_step_without_compensation_and_its_replies_is_fine() -> None:
    s = step("notify", compensation=None, compensated_on=(), compensation_failed_on=())
    assert s.compensation is None


def test_a_compensation_without_compensated_on_names_the_step() -> None:
    with pytest.raises(ConfigurationError) as err:
        step("train", compensated_on=())
    assert "'train'" in str(err.value) and "compensated_on" in str(err.value)


@pytest.mark.parametrize("bad", ["retry", "Park", "", "compensated"])
def test_a_bad_exhausted_names_the_step_and_the_value(bad: str) -> None:
    with pytest.raises(ConfigurationError) as err:
        step("erase", exhausted=bad)
    assert "'erase'" in str(err.value) and "exhausted" in str(err.value) and repr(bad) in str(err.value)


@pytest.mark.parametrize("good", ["compensate", "park"])
def test_both_exhausted_policies_are_accepted(good: str) -> None:
    assert step("erase", exhausted=good).exhausted == good


@pytest.mark.parametrize("deadline", [timedelta(0), timedelta(seconds=-1), timedelta(microseconds=-1)])
def test_a_non_positive_deadline_names_the_step(deadline: timedelta) -> None:
    with pytest.raises(ConfigurationError) as err:
        step("train", deadline=deadline)
    assert "'train'" in str(err.value) and "deadline" in str(err.value)


def test_the_smallest_positive_deadline_is_accepted() -> None:
    assert step("train", deadline=timedelta(microseconds=1)).deadline == timedelta(microseconds=1)


@pytest.mark.parametrize("name", ["", "a/b", "/"])
def test_a_step_name_must_be_set_and_have_no_slash(name: str) -> None:
    with pytest.raises(ConfigurationError) as err:
        step(name)
    assert repr(name) in str(err.value)


# -- sagas ---------------------------------------------------------------------------------
def test_duplicate_step_names_are_refused_naming_them() -> None:
    saga = saga_class(steps=(step("a"), step("train"), step("train")))()
    with pytest.raises(ConfigurationError) as err:
        saga.check()
    assert "unique" in str(err.value) and "train" in str(err.value)
    with pytest.raises(ConfigurationError):
        Definitions.of(saga)


@pytest.mark.parametrize("attribute", ["name", "starts_on", "correlation", "steps"])
def test_a_saga_missing_an_attribute_names_it(attribute: str) -> None:
    cls = saga_class()
    setattr(cls, attribute, "" if attribute != "steps" else ())
    with pytest.raises(ConfigurationError) as err:
        cls().check()
    assert attribute in str(err.value) and cls.__name__ in str(err.value)


@pytest.mark.parametrize("version", [0, -1])
def test_a_saga_version_must_be_positive(version: int) -> None:
    with pytest.raises(ConfigurationError) as err:
        saga_class(version=version)().check()
    assert "version" in str(err.value)


def test_steps_that_are_not_step_instances_are_a_configuration_error() -> None:
    """A tuple of names instead of Steps is a declaration mistake: it must read as one, not as an AttributeError."""
    saga = saga_class(steps=("train", "deploy"))()
    with pytest.raises(ConfigurationError) as err:
        saga.check()
    assert "Step" in str(err.value)


def test_a_saga_finds_its_steps_and_names_a_missing_one() -> None:
    saga = saga_class()()
    assert saga.step("b").name == "b"
    with pytest.raises(ConfigurationError) as err:
        saga.step("nope")
    assert "'nope'" in str(err.value) and "'job'" in str(err.value)


def test_keys_starts_and_replies_of_a_saga() -> None:
    saga = saga_class(steps=(step("a"), step("b", succeeded_on=("Other",))))()
    assert saga.key("JobRequested", {"job_id": "j1"}) == "j1"
    assert saga.key("JobRequested", {"job_id": ""}) is None
    assert saga.key("JobRequested", {"job_id": 7}) is None
    assert saga.key("JobRequested", {}) is None
    assert saga.starts("JobRequested") and saga.starts("shop.JobRequested")
    assert not saga.starts("JobRequestedLater") and not saga.starts("Done")
    assert saga.replies() == {"Done", "Other", "Failed", "Flaky", "Undone", "UndoFailed"}
    assert saga.saga_id("j1") != saga.saga_id("j2")
    assert saga.saga_id("j1") == saga.saga_id("j1")


# -- definitions ---------------------------------------------------------------------------
def test_definitions_hold_every_declared_version() -> None:
    v1 = saga_class(version=1)
    v2 = saga_class(version=2, previous=(v1,))
    v3 = saga_class(version=3, previous=(v2, v1))
    definitions = Definitions.of(v3())
    assert definitions.current.version == 3
    assert sorted(definitions.by_version) == [1, 2, 3]
    assert all(definitions.by_version[n].version == n for n in (1, 2, 3))
    assert isinstance(definitions.version(1), v1)
    assert definitions.version(4) is None


def test_a_previous_version_of_another_name_is_refused() -> None:
    other = saga_class(name="other", version=1)
    current = saga_class(name="job", version=2, previous=(other,))
    with pytest.raises(ConfigurationError) as err:
        Definitions.of(current())
    message = str(err.value)
    assert other.__name__ in message and "'other'" in message and "'job'" in message


@pytest.mark.parametrize("versions", [(2, (2,)), (3, (1, 1))])
def test_a_version_declared_twice_is_refused(versions: tuple[int, tuple[int, ...]]) -> None:
    current_version, previous_versions = versions
    previous = tuple(saga_class(version=v) for v in previous_versions)
    current = saga_class(version=current_version, previous=previous)
    with pytest.raises(ConfigurationError) as err:
        Definitions.of(current())
    assert f"version {previous_versions[-1]}" in str(err.value)


def test_a_broken_previous_version_is_refused() -> None:
    old = saga_class(version=1, steps=(step("a"), step("a")))
    with pytest.raises(ConfigurationError):
        Definitions.of(saga_class(version=2, previous=(old,))())


# -- retry bounds --------------------------------------------------------------------------
@pytest.mark.parametrize("changes, field", [
    ({"attempts": 0}, "attempts"),
    ({"attempts": -3}, "attempts"),
    ({"base": timedelta(0)}, "base"),
    ({"base": timedelta(seconds=-1)}, "base"),
    ({"base": timedelta(seconds=10), "cap": timedelta(seconds=9)}, "cap"),
    ({"jitter": -0.01}, "jitter"),
    ({"jitter": 1.01}, "jitter"),
])
def test_retry_bounds_are_checked_naming_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError) as err:
        Retry(**changes)
    assert field in str(err.value)


def test_retry_boundaries_are_accepted() -> None:
    assert Retry(attempts=1).attempts == 1
    assert Retry(base=timedelta(seconds=5), cap=timedelta(seconds=5)).cap == timedelta(seconds=5)
    assert Retry(jitter=0.0).jitter == 0.0 and Retry(jitter=1.0).jitter == 1.0


# -- retry delays --------------------------------------------------------------------------
def full_delay(retry: Retry, attempt: int) -> timedelta:
    """The delay before ``attempt`` without jitter: ``base`` before the second, doubling, capped."""
    doublings: int = 2 ** (attempt - 2)
    return min(retry.cap, retry.base * doublings)


def test_the_delay_doubles_from_base_and_is_capped() -> None:
    retry = Retry(attempts=20, base=timedelta(seconds=3), cap=timedelta(seconds=100), jitter=0.0)
    delays = [retry.delay("saga-job-j1", "train", attempt) for attempt in range(2, 20)]
    assert delays[0] == retry.base
    for before, after in zip(delays, delays[1:]):
        assert after == min(retry.cap, before * 2)
    assert delays[-1] == retry.cap
    assert max(delays) == retry.cap


def test_the_jitter_is_deterministic_and_differs_across_attempts_sagas_and_steps() -> None:
    retry = Retry(attempts=30, base=timedelta(seconds=1), cap=timedelta(seconds=4), jitter=0.5)
    again = Retry(attempts=30, base=timedelta(seconds=1), cap=timedelta(seconds=4), jitter=0.5)
    capped = [retry.delay("saga-job-j1", "train", attempt) for attempt in range(5, 25)]  # all with full == cap
    assert capped == [again.delay("saga-job-j1", "train", attempt) for attempt in range(5, 25)]
    assert len(set(capped)) == len(capped)
    assert retry.delay("saga-job-j1", "train", 9) != retry.delay("saga-job-j2", "train", 9)
    assert retry.delay("saga-job-j1", "train", 9) != retry.delay("saga-job-j1", "deploy", 9)
    assert all(retry.cap * 0.5 <= d <= retry.cap for d in capped)


@settings(max_examples=200, deadline=None)
@given(saga_id=st.text(UTF8, min_size=1, max_size=20), step_name=st.text(UTF8, min_size=1, max_size=10),
       attempt=st.integers(2, 30), base_ms=st.integers(1, 3_600_000), cap_factor=st.integers(1, 10_000),
       jitter=st.floats(0.0, 1.0))
def test_the_delay_lies_within_its_jitter_of_the_capped_exponential(
        saga_id: str, step_name: str, attempt: int, base_ms: int, cap_factor: int, jitter: float) -> None:
    base = timedelta(milliseconds=base_ms)
    retry = Retry(attempts=attempt, base=base, cap=base * cap_factor, jitter=jitter)
    delay = retry.delay(saga_id, step_name, attempt)
    full = full_delay(retry, attempt)
    assert full * (1.0 - jitter) <= delay <= full
    assert delay == retry.delay(saga_id, step_name, attempt)
    if jitter < 1.0:
        assert delay > timedelta(0)
    flat = Retry(attempts=attempt + 1, base=base, cap=retry.cap, jitter=0.0)
    assert flat.delay(saga_id, step_name, attempt) == full
    assert flat.delay(saga_id, step_name, attempt + 1) >= full


@settings(max_examples=100, deadline=None)
@given(attempts=st.integers(2, 200), base_s=st.integers(1, 3600))
def test_every_attempt_a_retry_allows_has_a_delay_within_the_cap(attempts: int, base_s: int) -> None:
    """``Retry(attempts=100)`` is a valid declaration, so each of its retries must have a (capped) delay."""
    retry = Retry(attempts=attempts, base=timedelta(seconds=base_s), cap=timedelta(seconds=base_s) * 10)
    for attempt in range(2, attempts + 1):
        assert timedelta(0) < retry.delay("saga-job-j1", "train", attempt) <= retry.cap


# -- command ids ---------------------------------------------------------------------------
def test_command_ids_are_stable_uuids() -> None:
    first = command_id("saga-job-j1", "train", 1, ACTION)
    assert isinstance(first, uuid.UUID)
    assert first == command_id("saga-job-j1", "train", 1, ACTION)
    assert uuid.UUID(str(first)) == first


def test_command_ids_differ_per_saga_step_attempt_and_kind() -> None:
    grid = [(saga_id, name, attempt, kind) for saga_id in ("saga-job-j1", "saga-job-j2", "saga-other-j1")
            for name in ("train", "deploy") for attempt in (1, 2, 3) for kind in KINDS]
    ids = {command_id(*parts) for parts in grid}
    assert len(ids) == len(grid)


step_names = st.text(st.characters(codec="utf-8", exclude_characters="/"), min_size=1, max_size=8)
parts = st.tuples(st.text(UTF8, min_size=1, max_size=12), step_names, st.integers(1, 50), st.sampled_from(KINDS))


@settings(max_examples=200, deadline=None)
@given(one=parts, other=parts)
def test_different_commands_never_share_an_id(one: tuple[str, str, int, str], other: tuple[str, str, int, str]) -> None:
    assert (command_id(*one) == command_id(*other)) == (one == other)
