"""A fresh, isolated place for each demo run: its own database and its own topics."""

from __future__ import annotations

import shutil
import time

import psycopg

from events.adapters import postgres
from events.errors import ServiceUnavailable
from events.adapters.kafka import admin, kafka_errors
from events.settings import Settings

DEMO_DATABASE = "evp_demo"
DEMO_PREFIX = "evpdemo"


def fresh_demo_settings(settings: Settings) -> Settings:
    """Drop and recreate the demo database, delete old demo topics, and use new topic names.

    Topics get a new suffix each run because Kafka deletes topics asynchronously: reusing a
    name right after deleting it can race with the deletion.
    """
    base, _, _ = settings.database_url.rpartition("/")
    with postgres.connect(f"{base}/postgres", autocommit=True) as conn:
        try:
            conn.execute(f'DROP DATABASE IF EXISTS "{DEMO_DATABASE}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{DEMO_DATABASE}"')
        except psycopg.Error as err:
            raise ServiceUnavailable("postgresql", postgres.describe(settings.database_url),
                                     f"cannot create the demo database {DEMO_DATABASE!r}: {err}") from err
    _delete_old_topics(settings)
    home = settings.home / "demo"
    shutil.rmtree(home, ignore_errors=True)
    return settings.with_(
        database_url=f"{base}/{DEMO_DATABASE}",
        topic_prefix=f"{DEMO_PREFIX}{time.strftime('%Y%m%d%H%M%S')}",
        home=home,
        kek_file=home / "keyring" / "kek",
    )


def _delete_old_topics(settings: Settings) -> None:
    client = admin(settings.kafka)
    try:
        with kafka_errors(settings.kafka):
            old = [t for t in client.list_topics() if t.startswith(DEMO_PREFIX)]
            if old:
                client.delete_topics(old)
    finally:
        client.close()
