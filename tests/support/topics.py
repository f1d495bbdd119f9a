"""Doing to the events topic what an attacker or an accident would: deleting it and making it again."""

from __future__ import annotations

import time

from events.adapters.kafka import admin, ensure_event_topics
from events.errors import EvpError
from events.settings import Settings


def recreate_events_topic(settings: Settings, timeout: float = 30.0) -> None:
    """Delete the settings' events topic and make it again, empty (deletion is asynchronous in the broker)."""
    client = admin(settings)
    try:
        client.delete_topics([settings.events_topic])
    finally:
        client.close()
    deadline = time.monotonic() + timeout
    while True:
        try:
            ensure_event_topics(settings)
            return
        except EvpError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
