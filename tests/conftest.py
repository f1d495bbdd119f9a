"""Fixtures for tests against the real services started by ``platform/services.py``.

Every test that touches a service gets its own topic prefix and its own database, so tests
never see each other's events and can run in any order; both are removed when the test
ends (:func:`private_settings`), so topics do not pile up on the broker.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from events.settings import Settings, database_name, with_database

if TYPE_CHECKING:
    from events.store.client import EventStore

pytest_plugins = ["tests.support.plaintext"]

REPO = Path(__file__).resolve().parents[1]
SERVICES = REPO / "platform" / "services.py"
DIGITS = REPO / "examples" / "digits"  #: the example domain most tests speak


def _admin_url(settings: Settings) -> str:
    """The administrator (EVP_ADMIN_DATABASE_URL) on the server's ``postgres`` database: evp's role creates none."""
    return settings.admin_url("the tests (they create a database per test)", "postgres")


@pytest.fixture(scope="session")
def base_settings() -> Settings:
    """The environment's settings; tests speak the digits example's events unless EVP_PROJECT says otherwise."""
    settings = Settings.from_env()
    return settings if settings.project is not None else settings.with_(project=REPO / "examples" / "digits")


@pytest.fixture(scope="session")
def services(base_settings: Settings) -> Settings:
    """The running services; fails (never skips) with the runner's own words when they are down."""
    result = subprocess.run([sys.executable, str(SERVICES), "status"], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"services are not running (start them with `make services`):\n{result.stdout}{result.stderr}")
    return base_settings


def create_database(settings: Settings) -> str:
    """A new database owned by the role of ``settings.database_url`` (made by the administrator); its URL."""
    name = f"evp_test_{uuid.uuid4().hex[:12]}"
    owner = conninfo_to_dict(settings.database_url).get("user") or "evp"
    with psycopg.connect(_admin_url(settings), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" OWNER "{owner}"')
    return with_database(settings.database_url, name)


def drop_database(settings: Settings, url: str) -> None:
    name = database_name(url)
    with psycopg.connect(_admin_url(settings), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def new_topic_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def delete_topics(settings: Settings) -> list[str]:
    """Delete every topic whose name starts with the settings' ``topic_prefix``; returns their names.

    A failure is a warning, not an error: the test itself has already passed or failed.
    """
    from events.adapters.kafka import admin, kafka_errors
    from events.errors import EvpError

    try:
        client = admin(settings)
        try:
            with kafka_errors(settings):
                names = sorted(t for t in client.list_topics() if t.startswith(settings.topic_prefix))
                if names:
                    client.delete_topics(names, timeout_ms=30_000)
                return names
        finally:
            client.close()
    except EvpError as err:
        warnings.warn(f"topics {settings.topic_prefix}* were not deleted: {err}", stacklevel=2)
        return []


@contextmanager
def private_settings(services: Settings, home: Path, **changes: object) -> Iterator[Settings]:
    """Settings with a new database and a new topic prefix, both removed on exit.

    For fixtures wider than one test (module scope) and for tests that need a second
    deployment (a restore target); ``changes`` override the defaults below.
    """
    url = create_database(services)
    settings = services.with_(**{
        "database_url": url, "topic_prefix": new_topic_prefix(), "home": home, "kek_file": home / "kek",
        "project": DIGITS, **changes,
    })
    try:
        yield settings
    finally:
        try:
            delete_topics(settings)
        finally:
            drop_database(services, url)


@pytest.fixture
def database_url(services: Settings) -> Iterator[str]:
    """A fresh, empty database for one test."""
    url = create_database(services)
    yield url
    drop_database(services, url)


@pytest.fixture
def settings(services: Settings, database_url: str, tmp_path: Path) -> Iterator[Settings]:
    """Settings private to one test: own topics, own database, own home, own key.

    Every topic under the test's prefix is deleted when the test ends (after the fixtures
    that use these settings are torn down, so no client of the test still writes to them).
    """
    private = services.with_(
        database_url=database_url,
        topic_prefix=new_topic_prefix(),
        home=tmp_path / "home",
        kek_file=tmp_path / "home" / "kek",
        project=DIGITS,
    )
    yield private
    delete_topics(private)


@pytest.fixture
def store(settings: Settings) -> Iterator[EventStore]:
    from events.store.client import EventStore

    with EventStore.open(settings) as opened:
        yield opened
