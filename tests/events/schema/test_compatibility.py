"""BACKWARD compatibility: what a new schema may and may not change."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.support.examples import catalog as examples_catalog
from events.schema.compatibility import check_backward
from events.errors import IncompatibleSchema


def record(*fields: dict[str, Any], name: str = "R") -> dict[str, Any]:
    return {"type": "record", "name": name, "namespace": "t", "fields": list(fields)}


def refused(reader: Any, writer: Any) -> IncompatibleSchema:
    with pytest.raises(IncompatibleSchema) as caught:
        check_backward("s", reader, writer)
    assert caught.value.subject == "s"
    return caught.value


OLD = record({"name": "a", "type": "string"})


def test_adding_a_field_with_default_is_compatible() -> None:
    check_backward("s", record({"name": "a", "type": "string"}, {"name": "b", "type": "int", "default": 0}), OLD)


def test_adding_a_field_without_default_is_refused_naming_it() -> None:
    err = refused(record({"name": "a", "type": "string"}, {"name": "b", "type": "int"}), OLD)
    assert err.field == "b"
    assert "default" in err.reason


def test_removing_a_field_is_compatible() -> None:
    check_backward("s", record(), OLD)


@pytest.mark.parametrize(("old", "new"), [
    ("int", "long"), ("int", "float"), ("int", "double"), ("long", "float"), ("long", "double"),
    ("float", "double"), ("string", "bytes"), ("bytes", "string"),
])
def test_promotions_are_compatible(old: str, new: str) -> None:
    check_backward("s", record({"name": "x", "type": new}), record({"name": "x", "type": old}))


@pytest.mark.parametrize(("old", "new"), [
    ("long", "int"), ("double", "float"), ("string", "int"), ("int", "string"), ("boolean", "int"),
])
def test_narrowing_or_unrelated_changes_are_refused(old: str, new: str) -> None:
    err = refused(record({"name": "x", "type": new}), record({"name": "x", "type": old}))
    assert err.field == "x"
    assert old in err.reason and new in err.reason


def test_union_widening_is_compatible_and_narrowing_is_not() -> None:
    plain = record({"name": "x", "type": "string"})
    optional = record({"name": "x", "type": ["null", "string"], "default": None})
    check_backward("s", optional, plain)
    assert refused(plain, optional).field == "x"


def test_reader_union_accepts_a_promoted_writer_type() -> None:
    check_backward("s", record({"name": "x", "type": ["null", "long"]}), record({"name": "x", "type": "int"}))


def enum(*symbols: str, **extra: Any) -> dict[str, Any]:
    return record({"name": "e", "type": {"type": "enum", "name": "E", "symbols": list(symbols), **extra}})


def test_enum_symbol_added_is_compatible_and_removed_is_refused() -> None:
    check_backward("s", enum("A", "B", "C"), enum("A", "B"))
    err = refused(enum("A"), enum("A", "B"))
    assert err.field == "e"
    assert "B" in err.reason


def test_enum_symbol_removal_allowed_when_reader_has_a_default() -> None:
    check_backward("s", enum("A", "UNKNOWN", default="UNKNOWN"), enum("A", "B"))


def test_record_rename_is_refused_unless_aliased() -> None:
    renamed = record({"name": "a", "type": "string"}, name="Other")
    assert "renamed" in refused(renamed, OLD).reason
    check_backward("s", {**renamed, "aliases": ["R"]}, OLD)


def test_field_rename_with_alias_is_compatible() -> None:
    check_backward("s", record({"name": "b", "type": "string", "aliases": ["a"]}), OLD)


def nested(end_type: str, extra: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    inner = {"type": "record", "name": "PartitionRange",
             "fields": [{"name": "start", "type": "long"}, {"name": "end", "type": end_type}, *(extra or [])]}
    return record({"name": "ranges", "type": {"type": "array", "items": inner}},
                  {"name": "again", "type": {"type": "array", "items": "PartitionRange"}})


def test_nested_change_is_refused_with_its_path() -> None:
    err = refused(nested("int"), nested("long"))
    assert err.field == "ranges[].end"


def test_nested_field_without_default_is_refused_with_its_path() -> None:
    err = refused(nested("long", [{"name": "leader", "type": "int"}]), nested("long"))
    assert err.field == "ranges[].leader"


def test_nested_compatible_change_passes_through_named_references() -> None:
    check_backward("s", nested("double"), nested("long"))


def test_map_values_are_checked() -> None:
    new = record({"name": "m", "type": {"type": "map", "values": "int"}})
    old = record({"name": "m", "type": {"type": "map", "values": "long"}})
    assert refused(new, old).field == "m{}"


@pytest.mark.parametrize("name", examples_catalog().names())
def test_every_catalog_schema_is_compatible_with_itself_and_an_optional_addition(name: str) -> None:
    current = examples_catalog().schema(name)
    check_backward("s", current, current)
    evolved = copy.deepcopy(current)
    evolved["fields"].append({"name": "added_later", "type": ["null", "string"], "default": None})
    check_backward("s", evolved, current)
    evolved["fields"][-1].pop("default")
    assert refused(evolved, current).field == "added_later"


def test_recursive_records_are_checked_without_looping() -> None:
    def linked(value_type: str) -> dict[str, Any]:
        return record({"name": "value", "type": value_type},
                      {"name": "next", "type": ["null", "R"], "default": None})

    check_backward("s", linked("long"), linked("int"))
    assert refused(linked("int"), linked("long")).field == "value"
