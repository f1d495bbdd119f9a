"""What a project writes to declare a saga: steps, their commands, replies, retries and deadlines.

A saga is a class in the team's project, named in ``evp.toml`` (``[sagas] release =
"shop.sagas:Release"``)::

    class Release(Saga):
        name = "release"
        version = 2
        starts_on = "ReleaseRequested"        # the event type that starts one instance
        correlation = "release_id"            # the field every start and reply carries
        steps = (
            Step("train",
                 action=lambda saga: Command("TrainModel", {"release_id": saga.key}),
                 compensation=lambda saga: Command("RetireModel", {"release_id": saga.key}),
                 succeeded_on=("ModelTrained",), failed_on=("TrainingRefused",),
                 transient_on=("TrainingInterrupted",), compensated_on=("ModelRetired",),
                 retry=Retry(attempts=3), deadline=timedelta(minutes=30)),
            ...
        )

The contract between a saga and its participants:

1. a step's **action** and **compensation** build one command each (an ordinary event of the
   project's schemas); evp appends it to the saga's stream with an event id derived from
   ``saga id / step / attempt / kind``, so a participant that dedupes by event id applies
   each effect once;
2. a participant answers with an ordinary event that carries the saga's correlation value;
   the step's ``*_on`` tuples say what each reply type means: the action took effect
   (``succeeded_on``), a business failure (``failed_on``: compensate), a transient failure
   (``transient_on``: retry per ``retry``, then compensate or park per ``exhausted``), the compensation took effect (``compensated_on``)
   or failed (``compensation_failed_on``: retry per the saga's ``compensation_retry``, then
   park);
3. a reply's ``reason`` field, when it has one, is recorded as the reason of a failure; a
   reply's ``command_id`` field, when it has one, must name the command in flight (copy
   ``Received.event_id`` into it), so an answer to an earlier attempt is never taken for
   the current one;
4. a compensation must be a no-op when its action never took effect (the command carries
   the action's command id, ``SagaContext.command_id``, to check against): a step that timed
   out is compensated although its outcome is unknown.

Old versions stay declared while instances started on them are open: ``previous =
(ReleaseV1,)`` on the current class. An instance finishes on the version it started with.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, ClassVar

from events.errors import ConfigurationError

ACTION = "action"
COMPENSATION = "compensation"
#: Namespace of the event ids evp derives for commands and transitions (uuid5).
ID_NAMESPACE = uuid.UUID("6f1c1d0e-4a53-5a8e-9b61-0e7f0b5a9a11")


@dataclass(frozen=True)
class Retry:
    """Attempts and backoff: before attempt n (n >= 2), ``min(cap, base * 2**(n-2))``, less up to ``jitter`` of it.

    ``attempts`` counts the first try. The jitter is derived from the saga id, the step and
    the attempt, so a replay of the same saga schedules the same delays.
    """

    attempts: int = 3
    base: timedelta = timedelta(seconds=1)
    cap: timedelta = timedelta(minutes=5)
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigurationError(f"Retry.attempts must be >= 1, got {self.attempts}")
        if self.base <= timedelta(0) or self.cap < self.base:
            raise ConfigurationError(f"Retry needs 0 < base <= cap, got base={self.base}, cap={self.cap}")
        if not 0.0 <= self.jitter <= 1.0:
            raise ConfigurationError(f"Retry.jitter must be within [0, 1], got {self.jitter}")

    def delay(self, saga_id: str, step: str, attempt: int) -> timedelta:
        """The wait before ``attempt`` (2, 3, ...): exponential, capped, with deterministic jitter."""
        full = self.base
        for _ in range(max(0, attempt - 2)):  # doubling stops at the cap: no overflow for many attempts
            if full >= self.cap:
                break
            full = full * 2
        full = min(self.cap, full)
        digest = hashlib.sha256(f"{saga_id}/{step}/{attempt}".encode()).digest()
        fraction = int.from_bytes(digest[:8], "big") / 2**64
        return full * (1.0 - self.jitter * fraction)


@dataclass(frozen=True)
class Command:
    """A command a step emits: an event of the project's schemas, appended to the saga's stream."""

    type: str
    data: Mapping[str, Any]


@dataclass(frozen=True)
class SagaContext:
    """What a step's action or compensation sees.

    ``start`` is the data of the event that started the saga and ``replies`` the data of
    each succeeded step's reply, by step name (personal fields opened where the keyring
    allows); ``command_id`` is, for a compensation, the id of the action's last command.
    """

    saga_id: str
    key: str
    start: Mapping[str, Any]
    replies: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    step: str = ""
    attempt: int = 1
    command_id: str | None = None


Builder = Callable[[SagaContext], Command]


@dataclass(frozen=True)
class Step:
    """One step: an action, an optional compensation, what replies mean, retries and a deadline."""

    name: str
    action: Builder
    compensation: Builder | None = None
    succeeded_on: tuple[str, ...] = ()
    failed_on: tuple[str, ...] = ()
    transient_on: tuple[str, ...] = ()
    compensated_on: tuple[str, ...] = ()
    compensation_failed_on: tuple[str, ...] = ()
    retry: Retry = Retry(attempts=1)
    deadline: timedelta | None = None
    #: When transient failures exhaust ``retry``: "compensate" (the default) or "park" — for a
    #: step after which undoing is not allowed (an erasure must not be rolled back).
    exhausted: str = "compensate"
    #: The step cannot be undone (an erasure): compensating past it parks the saga for an
    #: operator instead of pretending it was compensated.
    irreversible: bool = False

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigurationError(f"a step needs a name without '/', got {self.name!r}")
        if not self.succeeded_on:
            raise ConfigurationError(f"step {self.name!r}: succeeded_on must name at least one reply event type")
        if self.compensation is None and (self.compensated_on or self.compensation_failed_on):
            raise ConfigurationError(f"step {self.name!r}: compensation replies declared without a compensation")
        if self.compensation is not None and not self.compensated_on:
            raise ConfigurationError(f"step {self.name!r}: compensated_on must name the reply to its compensation")
        if self.irreversible and self.compensation is not None:
            raise ConfigurationError(f"step {self.name!r}: an irreversible step has no compensation")
        if self.exhausted not in ("compensate", "park"):
            raise ConfigurationError(f"step {self.name!r}: exhausted must be 'compensate' or 'park', got {self.exhausted!r}")
        if self.deadline is not None and self.deadline <= timedelta(0):
            raise ConfigurationError(f"step {self.name!r}: deadline must be positive")

    def meaning(self, event_type: str) -> str | None:
        """What a reply of ``event_type`` (full or short name) means for this step, or None."""
        short = event_type.rsplit(".", 1)[-1]
        for meaning, types in (("succeeded", self.succeeded_on), ("failed", self.failed_on),
                               ("transient", self.transient_on), ("compensated", self.compensated_on),
                               ("compensation_failed", self.compensation_failed_on)):
            if event_type in types or short in types:
                return meaning
        return None


class Saga:
    """Base class of a declared saga; see the module docstring for the contract."""

    name: ClassVar[str]
    version: ClassVar[int] = 1
    starts_on: ClassVar[str]
    correlation: ClassVar[str]
    steps: ClassVar[Sequence[Step]]
    #: Retries of a failing compensation before the saga is parked.
    compensation_retry: ClassVar[Retry] = Retry(attempts=5, base=timedelta(seconds=2), cap=timedelta(minutes=10))
    #: Earlier versions whose open instances this coordinator still finishes.
    previous: ClassVar[tuple[type[Saga], ...]] = ()
    #: The field of the start event naming the data subject the saga concerns, if any
    #: (its transitions then show in ``evp audit subject``).
    subject: ClassVar[str | None] = None

    def key(self, event_type: str, data: Mapping[str, Any]) -> str | None:
        """The correlation value of an event, or None when it carries none (default: ``data[correlation]``)."""
        value = data.get(self.correlation)
        return value if isinstance(value, str) and value else None

    def saga_id(self, key: str) -> str:
        """The stream id of the instance for ``key``: one instance per (saga, key), ever."""
        return f"saga-{self.name}-{key}"

    def starts(self, event_type: str) -> bool:
        return event_type in (self.starts_on, ) or event_type.rsplit(".", 1)[-1] == self.starts_on

    def step(self, name: str) -> Step:
        for step in self.steps:
            if step.name == name:
                return step
        raise ConfigurationError(f"saga {self.name!r} v{self.version} has no step {name!r}")

    def replies(self) -> frozenset[str]:
        """Every reply type any step declares (short names as declared)."""
        return frozenset(t for s in self.steps for t in (*s.succeeded_on, *s.failed_on, *s.transient_on,
                                                          *s.compensated_on, *s.compensation_failed_on))

    def check(self) -> None:
        """ConfigurationError naming what is wrong with this declaration."""
        where = f"saga {type(self).__name__}"
        for attribute in ("name", "starts_on", "correlation", "steps"):
            if not getattr(self, attribute, None):
                raise ConfigurationError(f"{where}: {attribute} must be set")
        if not isinstance(self.version, int) or self.version < 1:
            raise ConfigurationError(f"{where}: version must be an integer >= 1")
        if not all(isinstance(s, Step) for s in self.steps):
            raise ConfigurationError(f"{where}: steps must be Step instances")
        names = [s.name for s in self.steps]
        if len(set(names)) != len(names):
            raise ConfigurationError(f"{where}: step names must be unique, got {names}")


def derived_id(*parts: object) -> uuid.UUID:
    """A stable event id from its parts: a retried decision names the same events."""
    return uuid.uuid5(ID_NAMESPACE, "/".join(str(p) for p in parts))


def command_id(saga_id: str, step: str, attempt: int, kind: str) -> uuid.UUID:
    """The idempotency key of a command: ``saga id / step / attempt / kind``."""
    return derived_id(saga_id, step, attempt, kind)


@dataclass(frozen=True)
class Definitions:
    """Every version of one saga a coordinator can run, newest first."""

    current: Saga
    by_version: Mapping[int, Saga]

    @classmethod
    def of(cls, saga: Saga) -> Definitions:
        saga.check()
        versions: dict[int, Saga] = {saga.version: saga}
        for old in type(saga).previous:
            instance = old()
            instance.check()
            if instance.name != saga.name:
                raise ConfigurationError(f"saga {saga.name!r}: previous version {old.__name__} is named {instance.name!r}")
            if instance.version in versions:
                raise ConfigurationError(f"saga {saga.name!r}: version {instance.version} is declared twice")
            versions[instance.version] = instance
        return cls(saga, versions)

    def version(self, number: int) -> Saga | None:
        return self.by_version.get(number)


def definitions_of(sagas: Sequence[Saga]) -> dict[str, Definitions]:
    """Each saga's versions by its name; ConfigurationError for two sagas of one name."""
    found = {d.current.name: d for d in (Definitions.of(s) for s in sagas)}
    if len(found) != len(sagas):
        raise ConfigurationError(f"two sagas share a name: {sorted(s.name for s in sagas)}")
    return found
