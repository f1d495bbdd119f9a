"""Saga participants: ordinary consumers of command events that answer with events, exactly once.

A participant is a class in the team's project, named in ``evp.toml`` (``[participants]``)::

    class Trainer(Participant):
        name = "trainer"

        @answers("TrainModel")
        def train(self, command: Received) -> list[Answer]:
            run = ...                                  # do the work
            return [Answer(f"model-{command.data['release_id']}", "ModelTrained",
                           {"release_id": command.data["release_id"], "run_id": run})]

It runs on the loop views use (:class:`projections.runner.LogConsumer`). Contract of one
batch, in one PostgreSQL transaction:

1. each record of a type the participant answers is handed to its handler, decrypted, with
   the batch's cursor (``Received.cursor``): effects written with it commit with the answers;
2. each answer is appended to its stream with an event id derived from the command's id and
   the answer's index, so a batch decided again after a crash appends nothing twice;
3. the answers (ledger + outbox) and the participant's offsets commit together.

Effects outside PostgreSQL (a file, a model trained) are at least once: a participant killed
after the effect and before the commit does it again, and its answer is still appended once.
Make such effects idempotent by the command's id (``Received.event_id``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import psycopg

from events.errors import ConfigurationError
from events.event import ANY, Event, ExpectedVersion
from events.settings import Settings
from events.store.client import EventStore
from events.store.ledger import Ledger
from events.store.log import LogRecord
from projections.fold import Refusal
from projections.runner import DEFAULT_BATCH_SIZE, AppendingConsumer
from projections.sagas.declaration import derived_id

_HANDLES = "__evp_answers__"


@dataclass(frozen=True)
class Received:
    """A command handed to a participant: its id (the idempotency key), type, stream and data."""

    event_id: str
    type: str
    stream_id: str
    data: Mapping[str, Any]
    cursor: psycopg.Cursor[Any]  #: the batch's transaction: effects written here commit with the answers
    store: EventStore  #: the runner's store, for work that reads or appends elsewhere (a snapshot, a run)


@dataclass(frozen=True)
class Answer:
    """An event a participant appends in answer to a command."""

    stream_id: str
    type: str
    data: Mapping[str, Any]
    expected_version: ExpectedVersion = ANY


H = TypeVar("H", bound=Callable[..., Any])


def answers(*event_types: str) -> Callable[[H], H]:
    """Mark a method as the handler of the command types ``event_types`` (short or full names)."""

    def mark(function: H) -> H:
        setattr(function, _HANDLES, event_types)
        return function

    return mark


class Participant:
    """Base class of a declared participant; see the module docstring."""

    name: ClassVar[str]
    #: The schema holding the participant's positions (default ``<name>_participant``).
    schema: ClassVar[str | None] = None

    def handlers(self) -> dict[str, Callable[[Received], Sequence[Answer] | Answer | None]]:
        found: dict[str, Callable[[Received], Sequence[Answer] | Answer | None]] = {}
        for attribute in dir(type(self)):
            function = getattr(type(self), attribute, None)
            for event_type in getattr(function, _HANDLES, ()):
                if event_type in found:
                    raise ConfigurationError(f"participant {self.name!r}: two handlers answer {event_type!r}")
                found[event_type] = getattr(self, attribute)
        if not found:
            raise ConfigurationError(f"participant {type(self).__name__}: no @answers(...) handler")
        return found

    def create_tables(self, cur: psycopg.Cursor[Any], schema: str) -> None:
        """Create the participant's own tables in ``schema`` (idempotent); none by default."""


class ParticipantRunner(AppendingConsumer):
    """Runs one participant from the events topic (the contract in the module docstring)."""

    def __init__(self, settings: Settings, participant: Participant, *, schema: str | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE, actor: str | None = None) -> None:
        if not isinstance(participant, Participant) or not getattr(participant, "name", None):
            raise ConfigurationError(f"{participant!r} is not a named projections.sagas.Participant")
        self.participant = participant
        self._handlers = participant.handlers()
        super().__init__(settings, f"participant {participant.name}",
                         schema or participant.schema or f"{participant.name}_participant", batch_size=batch_size)
        self.actor = actor or f"evp.participant:{participant.name}"

    def create_tables(self, cur: psycopg.Cursor[Any]) -> None:
        self.participant.create_tables(cur, self.schema)

    def _handler(self, event_type: str) -> Callable[[Received], Sequence[Answer] | Answer | None] | None:
        return self._handlers.get(event_type) or self._handlers.get(event_type.rsplit(".", 1)[-1])

    def apply(self, cur: psycopg.Cursor[Any], records: Sequence[LogRecord]) -> list[Refusal]:
        ledger = Ledger(cur.connection, self.settings.partitions)
        for record in records:
            handler = self._handler(record.event_type)
            if handler is None:
                continue
            received = Received(str(record.event_id), record.event_type, record.stream_id,
                                self.events.decrypt(record), cur, self.events)
            produced = handler(received)
            given = [] if produced is None else [produced] if isinstance(produced, Answer) else list(produced)
            for index, answer in enumerate(given):
                event = Event(answer.type, answer.data, derived_id(record.event_id, "answer", index), actor=self.actor)
                ledger.append(answer.stream_id, [self.events.prepare(event)], answer.expected_version)
        return []
