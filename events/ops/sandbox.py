"""A fresh, isolated place for one run: its own database, topics and home folder.

For demos, evaluations and smoke tests that must be safe to run twice and must not touch
anything else on the same services. Contract of :func:`fresh_sandbox`:

1. drop and recreate the database ``<name>`` on the settings' PostgreSQL server, as the
   administrator (``EVP_ADMIN_DATABASE_URL``), owned by the role of ``database_url``;
2. delete the topics of earlier sandboxes of the same name;
3. empty the home folder ``<home>/<name>`` (snapshots, runs, the key-encryption key);
4. return settings that point at all three, with a topic prefix new to this run (Kafka
   deletes topics asynchronously: reusing a name right after deleting it races).
"""

from __future__ import annotations

import re
import shutil
import time

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from events.adapters import postgres
from events.adapters.kafka import admin, kafka_errors
from events.errors import ConfigurationError, ServiceUnavailable
from events.settings import Settings, with_database

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,40}$")


def fresh_sandbox(settings: Settings, name: str) -> Settings:
    """Settings for a new, empty sandbox called ``name`` (see the module docstring)."""
    if not _NAME.match(name):
        raise ConfigurationError(f"sandbox name {name!r} must be lower-case letters, numbers and '_' (at most 41)")
    # Creating databases is the administrator's (EVP_ADMIN_DATABASE_URL); evp's role owns them.
    owner = str(conninfo_to_dict(settings.database_url).get("user") or "")
    with postgres.connect(settings.admin_url("a sandbox (it creates a database)", "postgres"), autocommit=True) as conn:
        try:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
                         + (sql.SQL(" OWNER {}").format(sql.Identifier(owner)) if owner else sql.SQL("")))
        except psycopg.Error as err:
            raise ServiceUnavailable("postgresql", postgres.describe(settings.database_url),
                                     f"cannot create the sandbox database {name!r}: {err}") from err
    prefix = name.replace("_", "")
    client = admin(settings)
    try:
        with kafka_errors(settings):
            old = [t for t in client.list_topics() if t.startswith(prefix + "-")]
            if old:
                client.delete_topics(old)
    finally:
        client.close()
    home = settings.home / name
    shutil.rmtree(home, ignore_errors=True)
    return settings.with_(
        database_url=with_database(settings.database_url, name),
        keyring_database_url=None,  # the sandbox's keyring: its own database's evp_keyring schema
        topic_prefix=f"{prefix}-{time.strftime('%Y%m%d%H%M%S')}",
        home=home,
        kek_file=home / "keyring" / "kek",
    )
