"""Who the platform's own events are recorded as: ``EVP_ACTOR``, never a hard-coded name."""

from __future__ import annotations

from events.event import Event
from events.ops.forget import forget_subject
from events.settings import Settings
from events.store.client import EventStore


def test_events_without_an_actor_and_erasures_are_recorded_as_the_settings_actor(settings: Settings) -> None:
    with EventStore.open(settings.with_(actor="dpo-marta")) as store:
        store.append("annotator-a", Event("AnnotatorRegistered", {"annotator_id": "a", "name": "A", "email": "a@x.org"}))
        store.append("annotator-b", Event("AnnotatorRegistered", {"annotator_id": "b", "name": "B", "email": "b@x.org"},
                                          actor="b"))
        forget_subject(store, "a", reason="request 17")
        assert store.read_stream("annotator-a")[0].record.actor == "dpo-marta"
        assert store.read_stream("annotator-b")[0].record.actor == "b"  # an actor given is kept
        assert store.read_stream("erasure-a")[0].record.actor == "dpo-marta"
