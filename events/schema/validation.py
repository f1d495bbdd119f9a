"""Check an event against its Avro schema before anything is sent.

fastavro's writer fails late and vaguely (or, for some values, silently writes something
else). Checking against the schema ourselves lets the SDK refuse an invalid event up
front with an :class:`~events.errors.InvalidEvent` that names the exact field, e.g.
``features[3]`` or ``ranges[0].end``.

A schema is compiled once into nested check functions; the path of a bad field is only
built when a check fails, so valid events (the common case) pay for no string work.
"""

from __future__ import annotations

import json
import math
import re
import struct
import uuid
from collections.abc import Callable, Mapping
from datetime import date, datetime
from decimal import Decimal
from functools import lru_cache
from typing import Any

from events.schema.catalog import ROOT_PATH, Normalized, normalize
from events.errors import InvalidEvent, SchemaError
from events.privacy.policy import PII_TAG, TAGS_PROPERTY

_TOP_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

Check = Callable[[Any], None]

_INT_RANGE = {"int": (-(2**31), 2**31 - 1), "long": (-(2**63), 2**63 - 1)}
_FLOAT32_MAX = struct.unpack(">f", b"\x7f\x7f\xff\xff")[0]
#: Python values fastavro converts for a logical type, accepted besides the base type.
_LOGICAL_VALUES: dict[str, tuple[type, ...]] = {
    "uuid": (uuid.UUID,),
    "date": (date,),
    "timestamp-millis": (datetime,),
    "timestamp-micros": (datetime,),
    "local-timestamp-millis": (datetime,),
    "local-timestamp-micros": (datetime,),
    "decimal": (Decimal,),
}


class _Mismatch(Exception):
    """Internal: why a value does not fit; containers prepend their part of the path."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason, self.path = reason, ""

    def under(self, segment: str) -> _Mismatch:
        """Prefix the path with a field name or an ``[index]`` segment."""
        joiner = "." if self.path and not self.path.startswith("[") else ""
        self.path = f"{segment}{joiner}{self.path}"
        return self


def _expected(kind: str, value: Any) -> _Mismatch:
    return _Mismatch(f"expected {kind}, got {type(value).__name__}")


def _check_null(value: Any) -> None:
    if value is not None:
        raise _expected("null", value)


def _check_boolean(value: Any) -> None:
    if not isinstance(value, bool):
        raise _expected("boolean", value)


def _integer_check(kind: str) -> Check:
    low, high = _INT_RANGE[kind]

    def check(value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _expected(kind, value)
        if not low <= value <= high:
            raise _Mismatch(f"{value} is out of range for Avro {kind} [{low}, {high}]")

    return check


def _real_check(kind: str) -> Check:
    limit = _FLOAT32_MAX if kind == "float" else math.inf
    width = "32-bit" if kind == "float" else "64-bit"

    def check(value: Any) -> None:
        if type(value) is not float:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise _expected(kind, value)
            try:
                value = float(value)
            except OverflowError:
                raise _Mismatch(f"{value} does not fit an Avro {kind} ({width})") from None
        if not -limit <= value <= limit and math.isfinite(value):
            raise _Mismatch(f"{value} does not fit an Avro {kind} ({width})")

    return check


def _check_string(value: Any) -> None:
    if not isinstance(value, str):
        raise _expected("string", value)
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _Mismatch("string is not encodable as UTF-8") from None


def _check_bytes(value: Any) -> None:
    if not isinstance(value, (bytes, bytearray)):
        raise _expected("bytes", value)


_PRIMITIVES: dict[str, Check] = {
    "null": _check_null,
    "boolean": _check_boolean,
    "int": _integer_check("int"),
    "long": _integer_check("long"),
    "float": _real_check("float"),
    "double": _real_check("double"),
    "string": _check_string,
    "bytes": _check_bytes,
}

#: Whole-array shortcuts for the common item types (64 floats per sample): True means
#: every item is fine; False means "check item by item" to find and name the bad one.
def _all_float32(items: Any) -> bool:
    """Every item a float within float32's range, in C loops (~3 µs for 64, not ~13 item by item).

    A NaN or an infinity makes the plain sum non-finite (float32-range values cannot overflow
    it; ``math.fsum`` would raise on ``-inf + inf`` instead), and min/max bound the rest.
    """
    return (set(map(type, items)) == {float} and math.isfinite(sum(items))
            and -_FLOAT32_MAX <= min(items) and max(items) <= _FLOAT32_MAX)


_ARRAY_SHORTCUTS: dict[Check, Callable[[Any], bool]] = {
    _PRIMITIVES["float"]: _all_float32,
    _PRIMITIVES["double"]: lambda items: set(map(type, items)) == {float},
    _PRIMITIVES["int"]: lambda items: all(type(x) is int and -(2**31) <= x < 2**31 for x in items),
    _PRIMITIVES["long"]: lambda items: all(type(x) is int and -(2**63) <= x < 2**63 for x in items),
    _PRIMITIVES["string"]: lambda items: all(type(x) is str and x.isascii() for x in items),
}


def _type_name(schema: Any) -> str:
    if isinstance(schema, list):
        return "union"
    if isinstance(schema, dict):
        return str(schema.get("name") or schema["type"])
    return str(schema)


class _Compiler:
    """Turns a normalized schema into check functions, one per named type."""

    def __init__(self, schema: Normalized) -> None:
        self._schema = schema
        self._named: dict[str, Check] = {}

    def compile(self, node: Any) -> Check:
        if isinstance(node, str) and node in self._schema.named:
            return self._named_check(node)
        if isinstance(node, list):
            return self._union(node)
        if isinstance(node, str):
            return self._primitive(node)
        check = self._complex(node)
        accepted = _LOGICAL_VALUES.get(str(node.get("logicalType")), ())
        if not accepted:
            return check

        def check_logical(value: Any) -> None:
            if not isinstance(value, accepted):
                check(value)

        return check_logical

    def _named_check(self, name: str) -> Check:
        """Named types compile once; a recursive type refers to itself through a lookup."""
        compiled = self._named.get(name)
        if compiled is None:
            self._named[name] = _unfinished
            compiled = self._named[name] = self._complex(self._schema.named[name])
        if compiled is _unfinished:
            return lambda value: self._named[name](value)
        return compiled

    @staticmethod
    def _primitive(kind: str) -> Check:
        try:
            return _PRIMITIVES[kind]
        except KeyError:
            raise SchemaError(f"schema uses unknown type {kind!r}") from None

    def _complex(self, node: dict[str, Any]) -> Check:
        kind = node["type"]
        if kind == "record":
            return self._record(node)
        if kind == "array":
            return self._array(self.compile(node["items"]))
        if kind == "map":
            return self._map(self.compile(node["values"]))
        if kind == "enum":
            return self._enum(node["symbols"])
        if kind == "fixed":
            return self._fixed(node["size"])
        return self._primitive(kind)

    def _record(self, node: dict[str, Any]) -> Check:
        name = node["name"]
        fields = [(f["name"], self.compile(f["type"]), "default" in f) for f in node["fields"]]
        known = frozenset(f[0] for f in fields)

        def check(value: Any) -> None:
            if not isinstance(value, Mapping):
                raise _Mismatch(f"expected a {name} record (a mapping), got {type(value).__name__}")
            if not known.issuperset(value):
                extra = sorted(str(k) for k in value if k not in known)[0]
                raise _Mismatch("not in schema").under(extra)
            for field, check_field, has_default in fields:
                if field in value:
                    try:
                        check_field(value[field])
                    except _Mismatch as err:
                        raise err.under(field) from None
                elif not has_default:
                    raise _Mismatch("missing, and the schema gives no default").under(field)

        return check

    @staticmethod
    def _array(check_item: Check) -> Check:
        shortcut = _ARRAY_SHORTCUTS.get(check_item)

        def check(value: Any) -> None:
            if not isinstance(value, (list, tuple)):
                raise _Mismatch(f"expected an array, got {type(value).__name__}")
            if shortcut is not None and shortcut(value):
                return
            for index, item in enumerate(value):
                try:
                    check_item(item)
                except _Mismatch as err:
                    raise err.under(f"[{index}]") from None

        return check

    @staticmethod
    def _map(check_value: Check) -> Check:
        def check(value: Any) -> None:
            if not isinstance(value, Mapping):
                raise _Mismatch(f"expected a map, got {type(value).__name__}")
            for key, item in value.items():
                if not isinstance(key, str):
                    raise _Mismatch(f"map keys must be strings, got {key!r}")
                try:
                    check_value(item)
                except _Mismatch as err:
                    raise err.under(f"[{key!r}]") from None

        return check

    @staticmethod
    def _enum(symbols: list[str]) -> Check:
        allowed = frozenset(symbols)

        def check(value: Any) -> None:
            if not isinstance(value, str) or value not in allowed:
                raise _Mismatch(f"{value!r} is not one of {symbols}")

        return check

    @staticmethod
    def _fixed(size: int) -> Check:
        def check(value: Any) -> None:
            if not isinstance(value, (bytes, bytearray)) or len(value) != size:
                raise _Mismatch(f"expected exactly {size} bytes")

        return check

    def _union(self, branches: list[Any]) -> Check:
        nullable = "null" in branches
        candidates = [self.compile(b) for b in branches if b != "null"]
        names = ", ".join(_type_name(self._schema.resolve(b)) for b in branches)

        def check(value: Any) -> None:
            if value is None and nullable:
                return
            failures = []
            for candidate in candidates:
                try:
                    candidate(value)
                    return
                except _Mismatch as err:
                    failures.append(err)
            if len(failures) == 1:  # one real branch: its own error is the precise one
                raise failures[0]
            raise _Mismatch(f"{type(value).__name__} value matches no branch of union [{names}]")

        return check


def _unfinished(value: Any) -> None:  # pragma: no cover - a marker, never called
    raise AssertionError("a named type was checked before it was compiled")


class Validator:
    """A schema compiled once, checking many datums (keep one per event type)."""

    def __init__(self, event_type: str, schema: Any) -> None:
        self.event_type = event_type
        normalized = normalize(schema)
        self._check = _Compiler(normalized).compile(normalized.root)
        fields = schema.get("fields", []) if isinstance(schema, Mapping) else []
        self._personal = frozenset(f["name"] for f in fields if PII_TAG in f.get(TAGS_PROPERTY, ()))

    def validate(self, datum: Mapping[str, Any]) -> None:
        """Raise InvalidEvent naming the first field that does not fit the schema.

        For a personal field the reason is withheld: it would quote the value (``'HIV-positive'
        is not one of [...]``), and a map's keys sit in the path; errors end up in logs and
        dead letters. Only the top-level field is named then.
        """
        try:
            self._check(datum)
        except _Mismatch as err:
            top = _TOP_FIELD.match(err.path or "")
            if top is not None and top.group(0) in self._personal:
                raise InvalidEvent(self.event_type, top.group(0), "does not match its declared type "
                                   "(personal data: the value is not repeated here)") from None
            raise InvalidEvent(self.event_type, err.path or ROOT_PATH, err.reason) from None


@lru_cache(maxsize=256)
def _validator(event_type: str, schema_json: str) -> Validator:
    return Validator(event_type, json.loads(schema_json))


def validate(event_type: str, schema: Any, datum: Mapping[str, Any]) -> None:
    """Raise InvalidEvent(event_type, field_path, reason) unless ``datum`` fits ``schema``.

    Compiled validators are cached by the schema's JSON, so calling this per event is cheap.
    """
    _validator(event_type, json.dumps(schema, sort_keys=True)).validate(datum)
