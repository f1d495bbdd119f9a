"""The event catalog: the current schema of every event type a process knows, by name.

The platform's own event types live in ``events/schema/platform/<Name>.avsc`` (namespace
``evp.platform``); a project adds its own (:mod:`events.project`). The catalog is the
producer's and reader's *current* view; the registry keeps every version ever used on the
wire. Schema properties carry the privacy policy (:mod:`events.privacy.policy`), so code
never hard-codes which fields are personal, whose they are, or which are unique.

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
from events.privacy.policy import Policy, policy_of, to_wire


Schema = dict[str, Any]

_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})

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
    """Event schemas by full name ("shop.OrderPlaced") and, where unambiguous, short name.

    Each entry is the schema as **declared** (what producers validate against); the
    :meth:`wire_schema` is what is registered and travels (personal fields sealed, see
    :func:`events.privacy.policy.to_wire`), and :meth:`policy` is the privacy policy.
    Adding a schema validates its Avro and its policy, naming the field that is wrong.
    """

    def __init__(self, schemas: Iterable[Schema]) -> None:
        self._by_full: dict[str, Schema] = {}
        self._by_short: dict[str, list[str]] = {}
        for schema in schemas:
            self._add(schema)

    @classmethod
    def platform(cls) -> Catalog:
        """evp's own event types (namespace ``evp.platform``), loaded once per process."""
        return _platform_catalog()

    @classmethod
    def with_platform(cls, schemas: Iterable[Schema]) -> Catalog:
        """The platform's event types plus ``schemas`` (a project's); a full name defined twice is refused."""
        return cls([*copy.deepcopy(list(_platform_schemas())), *schemas])

    def _add(self, schema: Schema) -> None:
        if not isinstance(schema, dict) or schema.get("type") != "record":
            raise SchemaError(f"an event schema must be an Avro record, got {schema!r:.80}")
        normalize(schema)
        full = full_name(schema)
        if full in self._by_full:
            raise SchemaError(f"event type {full!r} is defined twice")
        for personal in policy_of(schema).personal:  # policy_of raises SchemaError naming the field
            if isinstance(personal.plain_type, str) and personal.plain_type in _PRIMITIVES:
                continue
            try:
                if isinstance(personal.plain_type, str):
                    raise SchemaError(f"{personal.plain_type!r} names a type defined elsewhere in the schema")
                normalize(personal.plain_type)
            except SchemaError as err:
                raise SchemaError(f"{full}: personal field {personal.name!r} must have a self-contained type "
                                  f"(it is encrypted on its own): {err}") from err
        normalize(to_wire(schema))
        self._by_full[full] = schema
        self._by_short.setdefault(full.rsplit(".", 1)[-1], []).append(full)

    def names(self) -> tuple[str, ...]:
        """Full names of every event type, sorted."""
        return tuple(sorted(self._by_full))

    def schema_list(self, prefix: str = "") -> list[Schema]:
        """Copies of the declared schemas whose full name starts with ``prefix``, in name order."""
        return [self.schema(name) for name in self.names() if name.startswith(prefix)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._lookup(name) is not None

    def schema(self, name: str) -> Schema:
        """The declared schema of an event type, by full or short name (a copy: catalogs are shared)."""
        return copy.deepcopy(self._schema(name))

    def wire_schema(self, name: str) -> Schema:
        """The schema that is registered and written: personal fields as sealed strings."""
        return to_wire(self._schema(name))

    def policy(self, name: str) -> Policy:
        """The privacy policy the event type declares."""
        return policy_of(self._schema(name))

    def full_name(self, name: str) -> str:
        return full_name(self._schema(name))

    def _lookup(self, name: str) -> str | None:
        if name in self._by_full:
            return name
        candidates = self._by_short.get(name, [])
        return candidates[0] if len(candidates) == 1 else None

    def _schema(self, name: str) -> Schema:
        full = self._lookup(name)
        if full is None:
            ambiguous = self._by_short.get(name, [])
            if len(ambiguous) > 1:
                raise SchemaError(f"event type {name!r} is ambiguous: use one of {', '.join(sorted(ambiguous))}")
            raise SchemaError(f"unknown event type {name!r}; known: {', '.join(self.names())}")
        return self._by_full[full]


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
