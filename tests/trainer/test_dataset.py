"""The dataset API and the shard format, without services: folds, checks, hashes, bytes."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from events.errors import IntegrityError, InvalidDataset
from tests.support.examples import CLINIC, DIGITS, project
from trainer.data import DTYPES, Column, Table
from trainer.dataset import REDACTED, Dataset, Row, SourceEvent, content_hash, fold_events, handles
from trainer.shards import decode_shard, encode_shard, read_shards, write_shards
from trainer.snapshot import load_dataset

DIGITS_DATASET = load_dataset(project(DIGITS), "digits")
SCANS = load_dataset(project(CLINIC), "scans")


def event(kind: str, offset: int = 0, **data: Any) -> SourceEvent:
    return SourceEvent(type=kind, data=data, stream_id="s", version=offset + 1, actor="a", occurred_at="",
                       partition=0, offset=offset)


def submitted(sample: str, label: int, value: float = 1.0, offset: int = 0) -> SourceEvent:
    return event("digits.SampleSubmitted", offset, sample_id=sample, annotator_id="a", features=[value] * 64,
                 label=label)


# --- folding -----------------------------------------------------------------------------


def test_the_digits_fold_applies_corrections_and_retractions() -> None:
    table = fold_events(DIGITS_DATASET, [
        submitted("b", 1), submitted("a", 2), submitted("c", 3),
        event("digits.LabelCorrected", sample_id="b", annotator_id="x", previous_label=1, label=7),
        event("digits.SampleRetracted", sample_id="c", annotator_id="x", reason="blur"),
        event("digits.LabelCorrected", sample_id="c", annotator_id="x", previous_label=3, label=4),
        event("digits.AnnotatorRegistered", annotator_id="x"),  # not handled: ignored
    ])
    assert table.row_ids == ("a", "b")
    assert table["label"].tolist() == [2, 7]
    assert table["features"].dtype == np.float32 and table["features"].shape == (2, 64)


def scan(scan_id: str, features: Any, offset: int = 0) -> SourceEvent:
    return event("clinic.ScanRecorded", offset, scan_id=scan_id, patient_id="p", clinician_id="c",
                 features=features, signed_by="Dr X")


def diagnosis(scan_id: str, finding: str, kind: str = "clinic.DiagnosisRecorded") -> SourceEvent:
    return event(kind, scan_id=scan_id, patient_id="p", clinician_id="c", diagnosis=finding, previous="benign")


def test_the_scans_fold_needs_a_diagnosis_and_drops_erased_measurements() -> None:
    table = fold_events(SCANS, [
        scan("s1", [0.5] * 30), diagnosis("s1", "benign"), diagnosis("s1", "malignant", "clinic.DiagnosisRevised"),
        scan("s2", [1.0] * 30),  # never diagnosed: left out
        diagnosis("s3", "benign"), scan("s3", REDACTED),  # forgotten patient: dropped
        diagnosis("s4", "benign"), scan("s4", [2.0] * 30),  # diagnosis read before the scan
    ])
    assert table.row_ids == ("s1", "s4")
    assert table["label"].tolist() == [1, 0]
    assert table["features"][1].tolist() == [2.0] * 30


@pytest.mark.parametrize(
    "events, message",
    [
        ([event("digits.SampleSubmitted", annotator_id="x")],
         "sample_id: digits.SampleSubmitted at partition 0 offset 0: the row id field is None"),
        ([event("digits.SampleSubmitted", sample_id="a", features=[1.0] * 63, label=1)],
         r"features: row 'a' from digits.SampleSubmitted .*shape must be \(64,\), got \(63,\)"),
        ([event("digits.SampleSubmitted", sample_id="a", features=[1.0] * 64, label=1.5)],
         "label: row 'a' .* is not a whole number"),
        ([event("digits.SampleSubmitted", sample_id="a", features=["x"] * 64, label=1)],
         "features: row 'a' .* is not float32"),
    ],
)
def test_a_bad_event_is_refused_naming_the_field(events: list[SourceEvent], message: str) -> None:
    with pytest.raises(InvalidDataset, match=message):
        fold_events(DIGITS_DATASET, events)


def test_a_handler_writing_an_unknown_column_is_named() -> None:
    class Typo(Dataset):
        name, version, row_id = "typo", 1, "id"
        columns = (Column("x", "float32"),)

        @handles("Thing")
        def thing(self, event: SourceEvent, row: Row) -> None:
            row.set(y=1.0)

    with pytest.raises(InvalidDataset, match="y: Thing at partition 0 offset 0: not a column of dataset 'typo'"):
        fold_events(Typo(), [event("Thing", id="r1")])


@pytest.mark.parametrize(
    "attributes, field",
    [
        ({"version": 0}, "version"),
        ({"name": ""}, "name"),
        ({"columns": ()}, "columns"),
        ({"columns": (Column("x", "float32"), Column("x", "int64"))}, "columns"),
    ],
)
def test_a_malformed_declaration_is_refused_naming_the_attribute(attributes: dict[str, Any], field: str) -> None:
    declared: Any = type("Bad", (Dataset,), {"name": "bad", "version": 1, "row_id": "id",
                                        "columns": (Column("x", "float32"),),
                                        "thing": handles("Thing")(lambda self, event, row: None), **attributes})
    with pytest.raises(InvalidDataset, match=f"^invalid training examples: {field}: "):
        declared.check()


def test_column_declarations_are_checked() -> None:
    with pytest.raises(InvalidDataset, match="dtype 'float16' is not one of"):
        Column("x", "float16")
    with pytest.raises(InvalidDataset, match="shape"):
        Column("x", "float32", (0,))


# --- content hash ------------------------------------------------------------------------


def test_the_content_hash_is_stable_and_sees_every_part() -> None:
    table = fold_events(DIGITS_DATASET, [submitted(f"s{i}", i % 10, float(i % 17)) for i in range(20)])
    identity = DIGITS_DATASET.identity()
    reference = content_hash(identity, table)
    # A fixed value: the same rows hash the same in every process and release; a change to
    # the hashing (or to the fold) must be deliberate.
    assert reference == "093a98e0134fbced1440916468568d33a1b237e498fce214b5fe6b612994a01d"
    assert reference == content_hash(identity, table.select(np.arange(len(table))[::-1]))  # row order: no
    changed_feature = {**table.arrays, "features": table["features"].copy()}
    changed_feature["features"][5, 10] += np.float32(1)
    variants = [
        content_hash({**identity, "version": 2}, table),
        content_hash({**identity, "name": "other"}, table),
        content_hash(identity, Table(table.columns, table.row_ids, changed_feature)),
        content_hash(identity, Table(table.columns, ("x", *table.row_ids[1:]), table.arrays)),
        content_hash(identity, table.select(np.arange(len(table) - 1))),
    ]
    assert len({reference, *variants}) == 1 + len(variants)


# --- shards ------------------------------------------------------------------------------

_COLUMN = st.builds(Column, name=st.sampled_from(["a", "b", "c", "d"]), dtype=st.sampled_from(DTYPES),
                    shape=st.lists(st.integers(1, 3), max_size=2).map(tuple))


@st.composite
def tables(draw: st.DrawFn) -> Table:
    columns = draw(st.lists(_COLUMN, min_size=1, max_size=3, unique_by=lambda c: c.name))
    rows = draw(st.integers(0, 6))
    ids = draw(st.lists(st.text(min_size=1, max_size=6), min_size=rows, max_size=rows, unique=True))
    arrays = {c.name: draw(hnp.arrays(np.dtype(c.dtype), (rows, *c.shape))) for c in columns}
    return Table(tuple(columns), tuple(ids), arrays)


@settings(max_examples=60, deadline=None)
@given(table=tables())
def test_a_shard_describes_its_own_columns_and_round_trips_bit_for_bit(table: Table) -> None:
    blob = encode_shard(table)
    back = decode_shard(blob)
    assert back.columns == table.columns and back.row_ids == table.row_ids
    for column in table.columns:
        assert back[column.name].dtype == np.dtype(column.dtype)
        assert back[column.name].tobytes() == table[column.name].tobytes()  # NaN payloads too
    assert encode_shard(back) == blob


def test_shards_are_checked_for_presence_hash_and_columns(tmp_path: Path) -> None:
    table = fold_events(DIGITS_DATASET, [submitted(f"s{i:02d}", i % 10) for i in range(25)])
    infos = write_shards(table, tmp_path, rows_per_shard=10)
    assert [i.rows for i in infos] == [10, 10, 5]
    assert infos[0].sha256 == hashlib.sha256((tmp_path / infos[0].name).read_bytes()).hexdigest()
    assert read_shards(tmp_path, infos, table.columns).row_ids == table.row_ids
    with pytest.raises(IntegrityError, match="describes 10 rows"):
        read_shards(tmp_path, infos, (Column("features", "float32", (64,)), Column("label", "int32")))
    (tmp_path / infos[1].name).unlink()
    with pytest.raises(IntegrityError, match=f"shard .*{infos[1].name} is missing"):
        read_shards(tmp_path, infos, table.columns)
