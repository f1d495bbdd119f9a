"""Fixtures for tests against the real services started by ``platform/services.py``.

Every test that touches a service gets its own topic prefix and its own database, so tests
never see each other's events and can run in any order.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING
from pathlib import Path

import psycopg
import pytest

from events.settings import Settings

if TYPE_CHECKING:
    from events.store.client import EventStore

REPO = Path(__file__).resolve().parents[1]
SERVICES = REPO / "platform" / "services.py"


def _admin_url(database_url: str) -> str:
    base, _, _ = database_url.rpartition("/")
    return f"{base}/postgres"


@pytest.fixture(scope="session")
def base_settings() -> Settings:
    return Settings.from_env()


@pytest.fixture(scope="session")
def services(base_settings: Settings) -> Settings:
    """The running services; fails (never skips) with the runner's own words when they are down."""
    result = subprocess.run([sys.executable, str(SERVICES), "status"], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"services are not running (start them with `make services`):\n{result.stdout}{result.stderr}")
    return base_settings


def create_database(settings: Settings) -> str:
    name = f"evp_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_admin_url(settings.database_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = settings.database_url.rpartition("/")
    return f"{base}/{name}"


def drop_database(settings: Settings, url: str) -> None:
    name = url.rpartition("/")[2]
    with psycopg.connect(_admin_url(settings.database_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database_url(services: Settings) -> Iterator[str]:
    """A fresh, empty database for one test."""
    url = create_database(services)
    yield url
    drop_database(services, url)


@pytest.fixture
def settings(services: Settings, database_url: str, tmp_path: Path) -> Settings:
    """Settings private to one test: own topics, own database, own home, own key."""
    return services.with_(
        database_url=database_url,
        topic_prefix=f"t{uuid.uuid4().hex[:10]}",
        home=tmp_path / "home",
        kek_file=tmp_path / "home" / "kek",
    )


@pytest.fixture
def store(settings: Settings) -> Iterator[EventStore]:
    from events.store.client import EventStore

    with EventStore.open(settings) as opened:
        yield opened
