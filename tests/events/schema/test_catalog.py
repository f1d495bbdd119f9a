"""The packaged schemas: they parse, are documented, and carry their privacy metadata."""

from __future__ import annotations

import pytest
from fastavro import parse_schema

from events.schema.catalog import Catalog, canonical_json
from events.errors import SchemaError

CATALOG = Catalog.default()

EXPECTED = {
    "evp.samples.AnnotatorRegistered",
    "evp.samples.SampleSubmitted",
    "evp.samples.LabelCorrected",
    "evp.samples.SampleRetracted",
    "evp.platform.SnapshotCreated",
    "evp.platform.TrainingRunRecorded",
    "evp.platform.SubjectForgotten",
    "evp.platform.AuditQueried",
    "evp.platform.ProjectionRebuilt",
}


def test_catalog_holds_every_event_type() -> None:
    assert set(CATALOG.names()) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_schema_parses_and_is_documented(name: str) -> None:
    schema = CATALOG.schema(name)
    parsed = parse_schema(schema)
    assert parsed["name"] == name
    assert schema["doc"].strip()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_short_and_full_names_give_the_same_schema(name: str) -> None:
    assert CATALOG.schema(name.rsplit(".", 1)[1]) == CATALOG.schema(name)
    assert CATALOG.full_name(name.rsplit(".", 1)[1]) == name


def test_personal_fields_are_the_tagged_ones() -> None:
    assert CATALOG.personal_fields("AnnotatorRegistered") == ("name", "email")
    assert CATALOG.personal_fields("evp.samples.SampleSubmitted") == ()
    assert CATALOG.personal_fields("SnapshotCreated") == ()


def test_subject_field_is_named_by_the_record() -> None:
    assert CATALOG.subject_field("AnnotatorRegistered") == "annotator_id"
    for name in ("SampleSubmitted", "LabelCorrected", "SampleRetracted"):
        assert CATALOG.subject_field(name) == "annotator_id"
    assert CATALOG.subject_field("TrainingRunRecorded") is None


def test_tags_survive_parsing() -> None:
    parsed = parse_schema(CATALOG.schema("AnnotatorRegistered"))
    tagged = [f["name"] for f in parsed["fields"] if "PII" in f.get("confluent:tags", ())]
    assert tagged == ["name", "email"]


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(SchemaError, match="'SampleDeleted'") as caught:
        CATALOG.schema("SampleDeleted")
    assert "evp.samples.SampleSubmitted" in str(caught.value)


def test_schema_is_a_copy() -> None:
    CATALOG.schema("SampleSubmitted")["fields"].clear()
    assert CATALOG.schema("SampleSubmitted")["fields"]


def test_subject_property_must_name_a_field() -> None:
    bad = {"type": "record", "name": "X", "namespace": "t", "evp.subject": "nobody",
           "fields": [{"name": "a", "type": "string"}]}
    with pytest.raises(SchemaError, match="nobody"):
        Catalog([bad])


def test_duplicate_short_name_refused() -> None:
    one = {"type": "record", "name": "X", "namespace": "a", "fields": []}
    two = {"type": "record", "name": "X", "namespace": "b", "fields": []}
    with pytest.raises(SchemaError, match="'X'"):
        Catalog([one, two])


def test_canonical_json_ignores_spelling_but_not_meaning() -> None:
    short = {"type": "record", "name": "R", "namespace": "n", "fields": [{"name": "a", "type": "int"}]}
    full = {"name": "n.R", "type": "record", "fields": [{"type": {"type": "int"}, "name": "a"}]}
    with_default = {"type": "record", "name": "R", "namespace": "n",
                    "fields": [{"name": "a", "type": "int", "default": 0}]}
    assert canonical_json(short) == canonical_json(full)
    assert canonical_json(short) != canonical_json(with_default)
