"""The event catalog: the Avro schemas evp ships, looked up by name.

Each record lives in ``events/schema/platform/<Name>.avsc``. The catalog is the producer's and
reader's *current* view of every event type; the registry keeps every version ever used
on the wire. Schema properties carry privacy metadata so that code never hard-codes it:

- ``"confluent:tags": ["PII"]`` on a field marks personal data (the ecosystem's tag
  convention, so third-party tools see the same classification);
- ``"evp.subject": "<field>"`` on a record names the field holding the data subject's id.

This module is also the one place a schema dict is parsed (:func:`normalize`), so the
validator, the compatibility checker and the registry agree on names and canonical form.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from fastavro import parse_schema
from fastavro.schema import SchemaParseException, UnknownType

from events.errors import SchemaError

PII_TAG = "PII"
TAGS_PROPERTY = "confluent:tags"
SUBJECT_PROPERTY = "evp.subject"

Schema = dict[str, Any]

#: How error messages name the whole datum or schema rather than one field of it.
ROOT_PATH = "<root>"


@dataclass(frozen=True)
class Normalized:
    """A schema with every name made full, plus the named types it defines.

    ``root`` references named types by full name (a plain string), ``named`` maps each
    full name to its definition, so walkers resolve references without re-parsing.
    """

    root: Any
    named: Mapping[str, Any] = field(default_factory=dict)

    def resolve(self, schema: Any) -> Any:
        """Follow a reference to a named type; anything else is returned as is."""
        if isinstance(schema, str) and schema in self.named:
            return self.named[schema]
        return schema


def normalize(schema: Any) -> Normalized:
    """Parse ``schema`` with fastavro; raise SchemaError (not a fastavro error) if it is bad."""
    named: dict[str, Any] = {}
    try:
        root = parse_schema(schema, named_schemas=named, _write_hint=False)
    except (SchemaParseException, UnknownType, ValueError, TypeError, KeyError, AttributeError) as err:
        raise SchemaError(f"not a valid Avro schema: {err}") from err
    return Normalized(root=root, named=named)


def canonical_json(schema: Any) -> str:
    """Stable JSON of the parsed schema: equal for schemas that only differ in spelling.

    Unlike Avro's Parsing Canonical Form this keeps defaults, docs and custom properties,
    because a changed default or PII tag is a real change that deserves a new version.
    """
    return json.dumps(_collapse(normalize(schema).root), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _collapse(node: Any) -> Any:
    """Write ``{"type": "int"}`` as ``"int"`` wherever a schema stands (not in defaults)."""
    if isinstance(node, list):
        return [_collapse(branch) for branch in node]
    if not isinstance(node, dict):
        return node
    if set(node) == {"type"} and isinstance(node["type"], str):
        return node["type"]
    out = dict(node)
    for key in ("items", "values"):
        if key in out:
            out[key] = _collapse(out[key])
    if isinstance(out.get("type"), (dict, list)):
        out["type"] = _collapse(out["type"])
    if "fields" in out:
        out["fields"] = [{**f, "type": _collapse(f["type"])} for f in out["fields"]]
    return out


def full_name(schema: Mapping[str, Any]) -> str:
    """Full name of a named schema (``namespace.name``)."""
    name = str(schema["name"])
    namespace = schema.get("namespace")
    return name if "." in name or not namespace else f"{namespace}.{name}"


class Catalog:
    """Event schemas by full name ("evp.samples.SampleSubmitted") and short name."""

    def __init__(self, schemas: Iterable[Schema]) -> None:
        self._by_name: dict[str, Schema] = {}
        self._full_names: list[str] = []
        for schema in schemas:
            self._add(schema)

    @classmethod
    def platform(cls) -> Catalog:
        """evp's own event types (namespace ``evp.platform``), loaded once per process."""
        return _platform_catalog()

    @classmethod
    def with_platform(cls, schemas: Iterable[Schema]) -> Catalog:
        """The platform's event types plus ``schemas`` (a project's); a name defined twice is refused."""
        return cls([*_platform_schemas(), *schemas])

    def _add(self, schema: Schema) -> None:
        if not isinstance(schema, dict) or schema.get("type") != "record":
            raise SchemaError(f"an event schema must be an Avro record, got {schema!r:.80}")
        normalize(schema)
        full = full_name(schema)
        short = full.rsplit(".", 1)[-1]
        for name in {full, short}:
            if name in self._by_name:
                raise SchemaError(f"event name {name!r} is defined twice in the catalog")
        subject = schema.get(SUBJECT_PROPERTY)
        if subject is not None and subject not in {f["name"] for f in schema["fields"]}:
            raise SchemaError(f"{full}: {SUBJECT_PROPERTY} names {subject!r}, which is not a field")
        self._by_name[full] = self._by_name[short] = schema
        self._full_names.append(full)

    def names(self) -> tuple[str, ...]:
        """Full names of every event type, sorted."""
        return tuple(sorted(self._full_names))

    def schema(self, name: str) -> Schema:
        """The current schema of an event type, by full or short name.

        A copy: the default catalog is shared by the whole process, so a caller that
        edits its schema must not change everyone else's.
        """
        return copy.deepcopy(self._schema(name))

    def _schema(self, name: str) -> Schema:
        try:
            return self._by_name[name]
        except KeyError:
            raise SchemaError(f"unknown event type {name!r}; known: {', '.join(self.names())}") from None

    def full_name(self, name: str) -> str:
        return full_name(self._schema(name))

    def personal_fields(self, name: str) -> tuple[str, ...]:
        """Top-level fields tagged as personal data, in schema order."""
        return tuple(
            f["name"] for f in self._schema(name)["fields"] if PII_TAG in f.get(TAGS_PROPERTY, ())
        )

    def subject_field(self, name: str) -> str | None:
        """The field holding the data subject's id, or None if the event has no subject."""
        subject = self._schema(name).get(SUBJECT_PROPERTY)
        return None if subject is None else str(subject)


@cache
def _platform_schemas() -> tuple[Schema, ...]:
    folder = resources.files("events.schema").joinpath("platform")
    schemas = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".avsc"):
            continue
        try:
            schema = json.loads(entry.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise SchemaError(f"schema file {entry.name} is not valid JSON: {err}") from err
        expected = entry.name.removesuffix(".avsc")
        if schema.get("name") != expected:
            raise SchemaError(f"schema file {entry.name} defines {schema.get('name')!r}, expected {expected!r}")
        schemas.append(schema)
    return tuple(schemas)


@cache
def _platform_catalog() -> Catalog:
    return Catalog(copy.deepcopy(list(_platform_schemas())))
