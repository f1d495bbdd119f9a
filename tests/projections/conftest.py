"""Fixtures for projection tests; the helpers they use live in :mod:`tests.support.views`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from events.privacy.kek import LocalKek
from events.privacy.keyring import Keyring, MemoryKeyStore
from events.schema.catalog import Catalog
from events.settings import Settings
from events.store.client import EventStore
from tests.support.views import DIGITS, Project

# -- fixtures ------------------------------------------------------------------------------
@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The test's private settings, in the digits project (as `cd examples/digits` would be)."""
    return settings.with_(project=DIGITS)


@pytest.fixture(scope="session")
def digits_catalog() -> Catalog:
    return Catalog.with_platform(Project.read(DIGITS).schemas())


@pytest.fixture
def store(settings: Settings, digits_catalog: Catalog) -> Iterator[EventStore]:
    with EventStore.open(settings, digits_catalog) as opened:
        yield opened


@pytest.fixture
def conn(settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to the test's own database."""
    with psycopg.connect(settings.database_url, autocommit=True) as c:
        yield c


@pytest.fixture
def keyring() -> Keyring:
    """An in-memory keyring for records sealed by the tests themselves (no event store)."""
    return Keyring(MemoryKeyStore(), LocalKek.generate())


# -- events through the SDK ----------------------------------------------------------------
