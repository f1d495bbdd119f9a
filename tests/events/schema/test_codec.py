"""The wire format, the codec and the validator in front of it."""

from __future__ import annotations

import copy
import struct
from typing import Any

import pytest
from fastavro import parse_schema
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.examples import catalog as examples_catalog
from events.schema.catalog import Catalog, normalize
from events.schema.codec import Codec, DecodedValue, encode_value, split_value
from events.errors import DecodeError, InvalidEvent
from events.schema.registry import MemorySchemaLog, SchemaRegistry
from events.schema.validation import validate

#: A nested record of the test's own: array of records, array of ints, a union.
MANIFEST: dict[str, Any] = {
    "type": "record", "name": "Manifest", "namespace": "test",
    "fields": [
        {"name": "snapshot_id", "type": "string"},
        {"name": "ranges", "type": {"type": "array", "items": {"type": "record", "name": "Range", "fields": [
            {"name": "partition", "type": "int"}, {"name": "start", "type": "long"}, {"name": "end", "type": "long"}]}}},
        {"name": "schema_ids", "type": {"type": "array", "items": "int"}},
        {"name": "shards", "type": {"type": "array", "items": {"type": "record", "name": "Shard", "fields": [
            {"name": "name", "type": "string"}, {"name": "sha256", "type": "string"}, {"name": "rows", "type": "long"}]}}},
        {"name": "replay_of", "type": ["null", "string"], "default": None},
    ],
}
CATALOG = Catalog.with_platform([*examples_catalog().schema_list("digits."), MANIFEST])
TOPIC = "test.events"
NAMES = CATALOG.names()

_PRIMITIVES: dict[str, st.SearchStrategy[Any]] = {
    "null": st.none(),
    "boolean": st.booleans(),
    "int": st.integers(-(2**31), 2**31 - 1),
    "long": st.integers(-(2**63), 2**63 - 1),
    "float": st.floats(width=32, allow_nan=False),
    "double": st.floats(allow_nan=False),
    "string": st.text(max_size=20),
    "bytes": st.binary(max_size=20),
}


def datums(schema: Any) -> st.SearchStrategy[dict[str, Any]]:
    """Valid datums of an Avro schema; fields with a default may be left out."""
    normalized = normalize(schema)

    def build(node: Any) -> st.SearchStrategy[Any]:
        node = normalized.resolve(node)
        if isinstance(node, list):
            return st.one_of([build(branch) for branch in node])
        if isinstance(node, str):
            return _PRIMITIVES[node]
        kind = node["type"]
        if kind == "record":
            required = {f["name"]: build(f["type"]) for f in node["fields"] if "default" not in f}
            optional = {f["name"]: build(f["type"]) for f in node["fields"] if "default" in f}
            return st.fixed_dictionaries(required, optional=optional)
        if kind == "array":
            return st.lists(build(node["items"]), max_size=6)
        if kind == "map":
            return st.dictionaries(st.text(max_size=5), build(node["values"]), max_size=4)
        if kind == "enum":
            return st.sampled_from(node["symbols"])
        if kind == "fixed":
            return st.binary(min_size=node["size"], max_size=node["size"])
        return _PRIMITIVES[kind]

    return build(normalized.root)


def with_defaults(schema: dict[str, Any], datum: dict[str, Any]) -> dict[str, Any]:
    return {f["name"]: datum.get(f["name"], f.get("default")) for f in schema["fields"]}


@pytest.fixture
def codec() -> Codec:
    return Codec(SchemaRegistry(MemorySchemaLog()), CATALOG, TOPIC)


def sample(**changes: Any) -> dict[str, Any]:
    return {"sample_id": "s-1", "annotator_id": "a-1", "features": [0.0] * 64, "label": 7, **changes}


def snapshot(**changes: Any) -> dict[str, Any]:
    return {
        "snapshot_id": "snap-1",
        "ranges": [{"partition": 0, "start": 0, "end": 10}, {"partition": 1, "start": 0, "end": 4}],
        "schema_ids": [1, 2], "shards": [{"name": "s0", "sha256": "cd", "rows": 12}], "replay_of": None,
        **changes,
    }


# -- wire format ------------------------------------------------------------------


def test_frame_is_magic_byte_then_big_endian_id() -> None:
    parsed = parse_schema({"type": "record", "name": "R", "fields": [{"name": "a", "type": "int"}]})
    value = encode_value(258, parsed, {"a": 1})
    assert value == b"\x00\x00\x00\x01\x02" + b"\x02"
    schema_id, body = split_value(value)
    assert (schema_id, bytes(body)) == (258, b"\x02")


@pytest.mark.parametrize(("value", "problem"), [
    (b"", "shorter"), (b"\x00\x00\x01", "shorter"), (b"\x01\x00\x00\x00\x01\x02", "magic byte"),
])
def test_split_refuses_unframed_values(value: bytes, problem: str) -> None:
    with pytest.raises(DecodeError, match=problem):
        split_value(value)


# -- codec ------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_round_trip_every_event_type(codec: Codec, name: str, data: st.DataObject) -> None:
    schema = CATALOG.schema(name)
    datum = data.draw(datums(schema))
    encoded = codec.encode(name, datum)
    assert encoded.event_type == name
    assert encoded.value[:1] == b"\x00"
    decoded = codec.decode(encoded.value)
    assert decoded == DecodedValue(encoded.schema_id, name, with_defaults(schema, datum), CATALOG.policy(name))


def test_schemas_are_registered_under_topic_record_name_subjects(codec: Codec) -> None:
    first = codec.encode("SampleSubmitted", sample())
    other = codec.encode("SampleRetracted", {"sample_id": "s", "annotator_id": "a", "reason": "dup"})
    registered = codec.registry.latest(f"{TOPIC}-digits.SampleSubmitted")
    assert registered is not None and registered.id == first.schema_id
    assert other.schema_id != first.schema_id
    assert codec.encode("SampleSubmitted", sample(label=1)).schema_id == first.schema_id


def test_a_second_codec_decodes_by_id_from_the_shared_registry(codec: Codec) -> None:
    encoded = codec.encode("test.Manifest", snapshot())
    reader = Codec(SchemaRegistry(codec.registry._log), CATALOG, TOPIC)  # noqa: SLF001 - same log, new process
    assert reader.decode(encoded.value).datum == snapshot()


def test_old_records_are_read_with_the_current_schema(codec: Codec) -> None:
    current = CATALOG.schema("SampleSubmitted")
    old = copy.deepcopy(current)
    old["fields"] = [f for f in old["fields"] if f["name"] != "source"]
    old_id = codec.registry.register(codec.subject("SampleSubmitted"), old)
    value = encode_value(old_id, parse_schema(old), {k: v for k, v in sample().items()})
    decoded = codec.decode(value)
    assert decoded.schema_id == old_id
    assert decoded.datum == {**sample(), "source": ""}
    assert codec.encode("SampleSubmitted", sample()).schema_id != old_id


def test_unknown_schema_id_is_a_decode_error_naming_it(codec: Codec) -> None:
    with pytest.raises(DecodeError, match="schema id 4242"):
        codec.decode(b"\x00" + struct.pack(">I", 4242) + b"\x02")


def test_truncated_and_padded_bodies_are_decode_errors(codec: Codec) -> None:
    value = codec.encode("SampleSubmitted", sample()).value
    with pytest.raises(DecodeError, match="schema id 1"):
        codec.decode(value[:-3])
    with pytest.raises(DecodeError, match="unread bytes"):
        codec.decode(value + b"\x00")


def test_encode_refuses_an_invalid_event_before_registering(codec: Codec) -> None:
    with pytest.raises(InvalidEvent) as caught:
        codec.encode("SampleSubmitted", sample(features=[0.0, "bright"]))
    assert caught.value.field == "features[1]"
    assert caught.value.event_type == "digits.SampleSubmitted"
    assert codec.registry.latest(codec.subject("SampleSubmitted")) is None


def registered_codec() -> Codec:
    codec = Codec(SchemaRegistry(MemorySchemaLog()), CATALOG, TOPIC)
    for name in NAMES:
        codec._schema_id(codec._writer_plan(name))  # noqa: SLF001 - register every type up front
    return codec


GARBAGE_CODEC = registered_codec()
framed_garbage = st.builds(
    lambda schema_id, body: b"\x00" + struct.pack(">I", schema_id) + body,
    st.integers(0, len(NAMES) + 2), st.binary(max_size=200),
)


@settings(max_examples=600)
@given(value=st.one_of(st.binary(max_size=64), framed_garbage))
def test_garbage_decodes_or_raises_decode_error_only(value: bytes) -> None:
    try:
        decoded = GARBAGE_CODEC.decode(value)
    except DecodeError:
        return
    assert decoded.event_type in NAMES


@settings(max_examples=300)
@given(data=st.data(), name=st.sampled_from(NAMES))
def test_corrupted_valid_values_decode_or_raise_decode_error_only(data: st.DataObject, name: str) -> None:
    value = bytearray(GARBAGE_CODEC.encode(name, data.draw(datums(CATALOG.schema(name)))).value)
    cut = data.draw(st.integers(0, len(value)))
    flips = data.draw(st.lists(st.tuples(st.integers(5, max(5, len(value) - 1)), st.integers(0, 255)), max_size=3))
    for index, byte in flips:
        if index < len(value):
            value[index] = byte
    try:
        GARBAGE_CODEC.decode(bytes(value[:cut]))
    except DecodeError:
        pass


# -- validation -------------------------------------------------------------------


def invalid(name: str, datum: dict[str, Any]) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as caught:
        validate(name, CATALOG.schema(name), datum)
    assert caught.value.event_type == name
    return caught.value


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=40)
@given(data=st.data())
def test_generated_datums_are_valid(name: str, data: st.DataObject) -> None:
    validate(name, CATALOG.schema(name), data.draw(datums(CATALOG.schema(name))))


@pytest.mark.parametrize(("datum", "field", "reason"), [
    (sample(label="seven"), "label", "expected int"),
    (sample(label=True), "label", "expected int"),
    (sample(label=2**31), "label", "out of range"),
    (sample(features=[1.0, None]), "features[1]", "expected float"),
    (sample(features=[1e39]), "features[0]", "32-bit"),
    (sample(features="0000"), "features", "expected an array"),
    (sample(source=None), "source", "expected string"),
    ({k: v for k, v in sample().items() if k != "label"}, "label", "missing"),
    (sample(colour="red"), "colour", "not in schema"),
])
def test_invalid_sample_names_the_field(datum: dict[str, Any], field: str, reason: str) -> None:
    err = invalid("SampleSubmitted", datum)
    assert err.field == field
    assert reason in err.reason


def test_missing_field_with_default_is_valid() -> None:
    validate("SampleSubmitted", CATALOG.schema("SampleSubmitted"), sample())


@pytest.mark.parametrize(("changes", "field"), [
    ({"ranges": [{"partition": 0, "start": 0, "end": 1}, {"partition": 1, "start": 0, "end": "9"}]}, "ranges[1].end"),
    ({"ranges": [{"partition": 0, "start": 0}]}, "ranges[0].end"),
    ({"ranges": [{"partition": 0, "start": 0, "end": 1, "leader": 1}]}, "ranges[0].leader"),
    ({"shards": [{"name": "s", "sha256": "x", "rows": 2**63}]}, "shards[0].rows"),
    ({"schema_ids": [1, 2.5]}, "schema_ids[1]"),
])
def test_nested_errors_carry_the_path(changes: dict[str, Any], field: str) -> None:
    assert invalid("test.Manifest", snapshot(**changes)).field == field


def test_union_accepts_null_and_its_branch_only() -> None:
    run = {k: v for k, v in snapshot().items() if k != "replay_of"}
    validate("test.Manifest", MANIFEST, run)
    validate("test.Manifest", MANIFEST, {**run, "replay_of": None})
    validate("test.Manifest", MANIFEST, {**run, "replay_of": "r0"})
    assert invalid("test.Manifest", {**run, "replay_of": 3}).field == "replay_of"


def test_a_datum_that_is_not_a_record_is_refused_at_the_root() -> None:
    assert invalid("SampleSubmitted", ["not", "a", "record"]).field == "<root>"  # type: ignore[arg-type]


def test_enums_maps_and_fixed_are_checked() -> None:
    schema = {"type": "record", "name": "R", "fields": [
        {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["A", "B"]}},
        {"name": "m", "type": {"type": "map", "values": "long"}},
        {"name": "f", "type": {"type": "fixed", "name": "F", "size": 2}},
    ]}
    good = {"e": "A", "m": {"x": 1}, "f": b"ab"}
    validate("R", schema, good)
    for changes, field in [({"e": "C"}, "e"), ({"m": {"x": "1"}}, "m['x']"), ({"f": b"abc"}, "f")]:
        with pytest.raises(InvalidEvent) as caught:
            validate("R", schema, {**good, **changes})
        assert caught.value.field == field


def test_floats_accept_ints_nan_and_infinity() -> None:
    validate("SampleSubmitted", CATALOG.schema("SampleSubmitted"),
             sample(features=[1, 2.5, float("nan"), float("inf"), -(2**24)]))
    # both infinities in one array: the fast path's sum is NaN (math.fsum would raise), so it falls back
    validate("SampleSubmitted", CATALOG.schema("SampleSubmitted"), sample(features=[float("-inf"), float("inf")]))


_ITEMS = st.one_of(
    st.floats(width=32), st.floats(), st.integers(-(2**40), 2**40), st.booleans(), st.text(max_size=2),
    st.sampled_from([3.4028234663852886e38, 3.4028235677973366e38, -3.5e38, float("nan"), float("-inf"), float("inf")]),
)


@given(st.lists(_ITEMS, max_size=70))
def test_a_float_array_is_refused_exactly_when_one_of_its_items_is(items: list[Any]) -> None:
    """The whole-array fast path and the item-by-item check agree, and the bad item is named."""
    def item_ok(item: Any) -> bool:
        try:
            validate("SampleSubmitted", CATALOG.schema("SampleSubmitted"), sample(features=[item]))
            return True
        except InvalidEvent:
            return False

    bad = [i for i, item in enumerate(items) if not item_ok(item)]
    if bad:
        with pytest.raises(InvalidEvent) as caught:
            validate("SampleSubmitted", CATALOG.schema("SampleSubmitted"), sample(features=items))
        assert caught.value.field == f"features[{bad[0]}]"
    else:
        validate("SampleSubmitted", CATALOG.schema("SampleSubmitted"), sample(features=items))


LINKED = {"type": "record", "name": "Node", "namespace": "t", "fields": [
    {"name": "value", "type": "int"},
    {"name": "next", "type": ["null", "Node"], "default": None},
]}


def test_recursive_types_are_checked_all_the_way_down() -> None:
    validate("Node", LINKED, {"value": 1, "next": {"value": 2, "next": {"value": 3}}})
    with pytest.raises(InvalidEvent) as caught:
        validate("Node", LINKED, {"value": 1, "next": {"value": 2, "next": {"value": "3"}}})
    assert caught.value.field == "next.next.value"
