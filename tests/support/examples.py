"""The example projects as test fixtures: their folders and catalogs.

Most tests speak the digits example's events (``examples/digits``): the platform's packages
hold no domain, so a test that needs one borrows an example's, exactly as a team would.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from events.project import Project
from events.schema.catalog import Catalog

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "examples" / "digits"
CLINIC = REPO / "examples" / "clinic"


@cache
def project(folder: Path) -> Project:
    return Project.read(folder)


@cache
def catalog(folder: Path = DIGITS) -> Catalog:
    """The platform's event types plus the example's."""
    return Catalog.with_platform(project(folder).schemas())
