"""The packaged schemas: they parse, are documented, and carry their privacy metadata."""

from __future__ import annotations

import io

import pytest
from fastavro import parse_schema, schemaless_reader, schemaless_writer

from tests.support.examples import catalog as examples_catalog
from events.schema.catalog import Catalog, canonical_json
from events.schema.compatibility import check_backward
from events.errors import SchemaError
from projections.sagas.machine import TRANSITIONS

CATALOG = examples_catalog()

EXPECTED = {
    "digits.AnnotatorRegistered",
    "digits.SampleSubmitted",
    "digits.LabelCorrected",
    "digits.SampleRetracted",
    "evp.platform.SnapshotCreated",
    "evp.platform.TrainingRunRecorded",
    "evp.platform.SubjectForgotten",
    "evp.platform.AuditQueried",
    "evp.platform.AuditCheckpointed",
    "evp.platform.ProjectionRebuilt",
    # the digits release saga's commands and answers
    *(f"digits.{name}" for name in (
        "ReleaseRequested", "CutReleaseSnapshot", "ReleaseSnapshotCut", "UnreleaseSnapshot", "SnapshotUnreleased",
        "TrainCandidate", "CandidateTrained", "RetireModel", "ModelRetired", "PromoteModel", "ModelPromoted",
        "WithdrawPromotion", "PromotionWithdrawn", "EvaluateModel", "EvaluationPassed", "EvaluationFailed")),
    # every saga transition the machine records has its platform schema
    *(f"evp.platform.{name}" for name in TRANSITIONS),
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
    assert [f.name for f in CATALOG.policy("AnnotatorRegistered").personal] == ["name", "email"]
    assert CATALOG.policy("digits.SampleSubmitted").personal == ()
    assert CATALOG.policy("SnapshotCreated").personal == ()


def test_subject_field_is_named_by_the_record() -> None:
    assert CATALOG.policy("AnnotatorRegistered").subject_field == "annotator_id"
    for name in ("SampleSubmitted", "LabelCorrected", "SampleRetracted"):
        assert CATALOG.policy(name).subject_field == "annotator_id"
    assert CATALOG.policy("TrainingRunRecorded").subject_field is None


def test_the_platform_catalog_holds_only_the_platform_namespace() -> None:
    assert all(name.startswith("evp.platform.") for name in Catalog.platform().names())


def test_a_short_name_two_namespaces_share_is_ambiguous_and_says_so() -> None:
    other = {"type": "record", "name": "SampleSubmitted", "namespace": "other", "fields": []}
    catalog = Catalog.with_platform([*(CATALOG.schema(n) for n in CATALOG.names() if n.startswith("digits.")), other])
    with pytest.raises(SchemaError, match="ambiguous"):
        catalog.schema("SampleSubmitted")
    assert catalog.schema("other.SampleSubmitted")["fields"] == []


def test_a_bad_policy_is_refused_when_the_catalog_is_built_naming_the_field() -> None:
    bad = {"type": "record", "name": "Leak", "namespace": "x",
           "fields": [{"name": "name", "type": "string", "confluent:tags": ["PII"]}]}
    with pytest.raises(SchemaError, match="'name'"):
        Catalog([bad])


def test_tags_survive_parsing() -> None:
    parsed = parse_schema(CATALOG.schema("AnnotatorRegistered"))
    tagged = [f["name"] for f in parsed["fields"] if "PII" in f.get("confluent:tags", ())]
    assert tagged == ["name", "email"]


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(SchemaError, match="'SampleDeleted'") as caught:
        CATALOG.schema("SampleDeleted")
    assert "digits.SampleSubmitted" in str(caught.value)


def test_schema_is_a_copy() -> None:
    CATALOG.schema("SampleSubmitted")["fields"].clear()
    assert CATALOG.schema("SampleSubmitted")["fields"]


def test_subject_property_must_name_a_field() -> None:
    bad = {"type": "record", "name": "X", "namespace": "t", "evp.subject": "nobody",
           "fields": [{"name": "a", "type": "string"}]}
    with pytest.raises(SchemaError, match="nobody"):
        Catalog([bad])


def test_duplicate_full_name_refused() -> None:
    one = {"type": "record", "name": "X", "namespace": "a", "fields": []}
    with pytest.raises(SchemaError, match="'a.X'"):
        Catalog([one, dict(one)])


def test_canonical_json_ignores_spelling_but_not_meaning() -> None:
    short = {"type": "record", "name": "R", "namespace": "n", "fields": [{"name": "a", "type": "int"}]}
    full = {"name": "n.R", "type": "record", "fields": [{"type": {"type": "int"}, "name": "a"}]}
    with_default = {"type": "record", "name": "R", "namespace": "n",
                    "fields": [{"name": "a", "type": "int", "default": 0}]}
    assert canonical_json(short) == canonical_json(full)
    assert canonical_json(short) != canonical_json(with_default)


def test_a_personal_field_must_carry_its_whole_type_since_it_is_encrypted_alone() -> None:
    schema = {"type": "record", "name": "Visit", "namespace": "x", "evp.subject": "who", "fields": [
        {"name": "who", "type": "string"},
        {"name": "kind", "type": {"type": "enum", "name": "Kind", "symbols": ["a", "b"]}},
        {"name": "secret_kind", "type": "Kind", "confluent:tags": ["PII"]},
    ]}
    with pytest.raises(SchemaError, match="secret_kind"):
        Catalog([schema])


def test_snapshots_recorded_before_cuts_still_decode_without_a_cut_position() -> None:
    current = CATALOG.schema("SnapshotCreated")
    older = {**current, "fields": [f for f in current["fields"] if f["name"] != "cut_position"]}
    check_backward("SnapshotCreated", current, older)  # the field has a null default: BACKWARD compatible
    datum = {"snapshot_id": "snap-0", "topic": "t", "dataset": "d", "dataset_version": 1, "declaration": "m:D",
             "row_id": "id", "columns": [], "ranges": [{"partition": 0, "start": 0, "end": 3}], "schema_ids": [1],
             "content_hash": "h", "record_count": 3, "row_count": 2, "shards": []}
    out = io.BytesIO()
    schemaless_writer(out, parse_schema(older), datum)
    read = schemaless_reader(io.BytesIO(out.getvalue()), parse_schema(older), parse_schema(current))
    assert read == {**datum, "cut_position": None}
