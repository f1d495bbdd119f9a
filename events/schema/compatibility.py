"""BACKWARD compatibility: can the new schema read data written with the old one?

This is the rule Confluent's registry applies by default and the one evp needs: events
are kept forever, so every consumer that upgrades its schema must still read every record
already in the log. The checks follow Avro's schema-resolution rules, and the error names
the first offending field by path (``ranges[].end``; ``[]`` is an array's items, ``{}``
a map's values).
"""

from __future__ import annotations

from typing import Any

from events.schema.catalog import ROOT_PATH, Normalized, full_name, normalize
from events.errors import IncompatibleSchema

#: writer type -> reader types that can read it (Avro's promotions).
_PROMOTIONS: dict[str, frozenset[str]] = {
    "int": frozenset({"long", "float", "double"}),
    "long": frozenset({"float", "double"}),
    "float": frozenset({"double"}),
    "string": frozenset({"bytes"}),
    "bytes": frozenset({"string"}),
}
_NAMED = frozenset({"record", "enum", "fixed"})


def _child(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _kind(schema: Any) -> str:
    if isinstance(schema, list):
        return "union"
    if isinstance(schema, dict):
        return str(schema["type"])
    return str(schema)


def _describe(schema: Any) -> str:
    kind = _kind(schema)
    return f"{kind} {schema['name']}" if kind in _NAMED else kind


class _BackwardChecker:
    def __init__(self, subject: str, reader: Normalized, writer: Normalized) -> None:
        self.subject = subject
        self.reader, self.writer = reader, writer
        self._records_in_progress: set[tuple[str, str]] = set()

    def fail(self, path: str, reason: str) -> IncompatibleSchema:
        return IncompatibleSchema(self.subject, path or ROOT_PATH, reason)

    def check(self, reader: Any, writer: Any, path: str) -> None:
        reader, writer = self.reader.resolve(reader), self.writer.resolve(writer)
        r_kind, w_kind = _kind(reader), _kind(writer)
        if w_kind == "union":
            # Every branch the old schema could have written must still be readable.
            for branch in writer:
                self.check(reader, branch, path)
        elif r_kind == "union":
            self._check_reader_union(reader, writer, path)
        elif r_kind != w_kind:
            if r_kind not in _PROMOTIONS.get(w_kind, frozenset()):
                raise self.fail(path, f"type changed from {_describe(writer)} to {_describe(reader)}, "
                                      "which is not an Avro promotion")
        elif r_kind in _NAMED:
            self._check_same_name(reader, writer, path)
            getattr(self, f"_check_{r_kind}")(reader, writer, path)
        elif r_kind == "array":
            self.check(reader["items"], writer["items"], f"{path}[]")
        elif r_kind == "map":
            self.check(reader["values"], writer["values"], f"{path}{{}}")

    def _check_reader_union(self, reader: list[Any], writer: Any, path: str) -> None:
        for branch in reader:
            try:
                self.check(branch, writer, path)
                return
            except IncompatibleSchema:
                continue
        raise self.fail(path, f"no branch of the new union can read the old {_describe(writer)}")

    def _check_same_name(self, reader: dict[str, Any], writer: dict[str, Any], path: str) -> None:
        old, new = full_name(writer), full_name(reader)
        aliases = {full_name({"name": a, "namespace": reader.get("namespace") or new.rpartition(".")[0]})
                   for a in reader.get("aliases", ())}
        if old != new and old not in aliases:
            raise self.fail(path, f"{reader['type']} renamed from {old} to {new} (add an alias to keep the old name)")

    def _check_record(self, reader: dict[str, Any], writer: dict[str, Any], path: str) -> None:
        pair = (full_name(reader), full_name(writer))
        if pair in self._records_in_progress:  # a recursive type: already being checked
            return
        self._records_in_progress.add(pair)
        try:
            written = {f["name"]: f for f in writer["fields"]}
            for field in reader["fields"]:
                field_path = _child(path, field["name"])
                names = [field["name"], *field.get("aliases", ())]
                old = next((written[n] for n in names if n in written), None)
                if old is not None:
                    self.check(field["type"], old["type"], field_path)
                elif "default" not in field:
                    raise self.fail(field_path, "added without a default, so records written with "
                                                "the old schema have no value for it")
        finally:
            self._records_in_progress.discard(pair)

    def _check_enum(self, reader: dict[str, Any], writer: dict[str, Any], path: str) -> None:
        removed = [s for s in writer["symbols"] if s not in reader["symbols"]]
        if removed and "default" not in reader:
            raise self.fail(path, f"enum symbols removed: {', '.join(removed)} "
                                  "(old records may hold them; or give the enum a default)")

    def _check_fixed(self, reader: dict[str, Any], writer: dict[str, Any], path: str) -> None:
        if reader["size"] != writer["size"]:
            raise self.fail(path, f"fixed size changed from {writer['size']} to {reader['size']}")


def check_backward(subject: str, reader: Any, writer: Any) -> None:
    """Raise IncompatibleSchema unless ``reader`` (new) can read data written with ``writer`` (old)."""
    new, old = normalize(reader), normalize(writer)
    _BackwardChecker(subject, new, old).check(new.root, old.root, "")
