"""Checking a project's schemas before anything is written: ``evp check``.

Contract of :func:`check_schemas`, which changes nothing:

1. build the catalog (the platform's event types plus the project's): every schema must be
   valid Avro and declare a valid privacy policy, else the first problem is reported with
   the file and field it is in;
2. for every event type, compare its wire schema with **every** version already registered
   under its subject, oldest first: each version that the new one cannot read (BACKWARD)
   is a problem naming the subject, the version and the field;
3. report which event types are new, unchanged, or would become a new version.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from events.errors import IncompatibleSchema
from events.schema.catalog import Catalog, canonical_json
from events.schema.codec import subject_name
from events.schema.compatibility import check_backward
from events.schema.registry import SchemaRegistry

NEW, UNCHANGED, CHANGED = "new", "unchanged", "new version"


@dataclass(frozen=True)
class SchemaStatus:
    """One event type against the registry."""

    event_type: str
    subject: str
    state: str  #: NEW, UNCHANGED or CHANGED
    registered_versions: int
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class SchemaReport:
    schemas: tuple[SchemaStatus, ...] = field(default=())

    @property
    def problems(self) -> tuple[str, ...]:
        return tuple(p for s in self.schemas for p in s.problems)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_schemas(catalog: Catalog, registry: SchemaRegistry, topic: str) -> SchemaReport:
    """Compare every event type of ``catalog`` with what ``registry`` holds (see the module docstring)."""
    statuses = []
    for name in catalog.names():
        subject = subject_name(topic, name)
        wire = catalog.wire_schema(name)
        versions = registry.versions(subject)
        problems = []
        for version in versions:
            try:
                check_backward(subject, wire, version.schema)
            except IncompatibleSchema as err:
                problems.append(f"{name}: cannot read version {version.version} (id {version.id}): "
                                f"field {err.field!r}: {err.reason}")
        known = {canonical_json(v.schema) for v in versions}
        state = NEW if not versions else UNCHANGED if canonical_json(wire) in known else CHANGED
        statuses.append(SchemaStatus(name, subject, state, len(versions), tuple(problems)))
    return SchemaReport(tuple(statuses))


def register_schemas(catalog: Catalog, registry: SchemaRegistry, topic: str) -> dict[str, int]:
    """Register every event type's wire schema (idempotent); returns the schema id of each.

    Raises IncompatibleSchema naming the field if a schema cannot read its subject's
    latest version; :func:`check_schemas` first finds every such problem at once.
    """
    return {name: registry.register(subject_name(topic, name), catalog.wire_schema(name)) for name in catalog.names()}
