"""The in-memory fold of a batch, pure: net changes equal the one-record-at-a-time fold."""

from __future__ import annotations

import dataclasses

import random
import uuid
from typing import Any

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from events.errors import InvalidEvent
from events.privacy.kek import LocalKek
from events.privacy.keyring import Keyring, MemoryKeyStore
from events.schema.catalog import Catalog
from events.store.log import LogRecord
from projections.fold import Changes, Stored, fold, redact, route
from projections.view import Row, Sealed, View, ViewDefinitionError, on, personal, sealed
from tests.support.views import AnnotatorsView, DiagnosesView, ExpectedSamples, Records, SamplesView, clinic_catalog, random_op

KEYRING = Keyring(MemoryKeyStore(), LocalKek.generate())


def _records(digits_catalog: Catalog) -> Records:
    return Records(KEYRING, digits_catalog)


def _table_after(view: View, table: dict[Any, Stored], records: list[LogRecord], forgotten: set[str]) -> Changes:
    """Apply one batch to a dict standing in for the table, the way projections.tables does."""
    layout = view.layout()
    routed = route(view, layout, records)
    changes = fold(layout, routed, {k: table[k] for k in routed.keys if k in table})
    forgotten |= set(changes.forgotten)
    for key in changes.deletes:
        del table[key]
    for stored in redact(layout, changes.puts, forgotten):
        table[stored.row[layout.key.name]] = stored
    for key, stored in list(table.items()):  # the UPDATE of rows already in the table
        table[key] = redact(layout, [stored], forgotten)[0]
    return changes


def _history(seed: int, count: int, records: Records) -> tuple[list[LogRecord], ExpectedSamples]:
    rng = random.Random(seed)
    expected = ExpectedSamples()
    log: list[LogRecord] = []
    for n in range(count):
        stream, event = random_op(rng, expected, "s", max(2, count // 4), n)
        record = records.make(stream, event.type, event.data, occurred=event.occurred_at)
        expected.fold(stream, event.type, event.data, event.occurred_at)
        log.append(record)
    return log, expected


@hsettings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32), st.integers(0, 40), st.data())
def test_batches_split_anywhere_fold_to_the_independent_oracle(
    digits_catalog: Catalog, seed: int, count: int, data: st.DataObject
) -> None:
    log, expected = _history(seed, count, _records(digits_catalog))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(log)), max_size=6)))
    view, table = SamplesView(), dict[Any, Stored]()
    for start, end in zip([0, *cuts], [*cuts, len(log)]):
        changes = _table_after(view, table, log[start:end], set())
        keys = [s.row["sample_id"] for s in changes.puts] + list(changes.deletes)
        assert len(keys) == len(set(keys)), "a key is put or deleted, never both: the write order cannot matter"
    assert {k: {c: v for c, v in s.row.items() if c != "sample_id"} for k, s in table.items()} == expected.rows


def test_unknown_types_are_ignored_and_bad_keys_refused(digits_catalog: Catalog) -> None:
    records = _records(digits_catalog)
    other = LogRecord(0, 0, "run-1", 1, uuid.uuid4(), "evp.platform.TrainingRunRecorded", 1, "", "", {"run_id": "x"})
    empty = records.make("sample-", "SampleRetracted", {"sample_id": " ", "annotator_id": "a", "reason": ""})
    routed = route(SamplesView(), SamplesView().layout(), [other, empty])
    assert routed.targets == () and [r for r, _ in routed.refused] == [empty]
    assert "sample_id" in str(routed.refused[0][1])


def test_a_refused_record_leaves_its_row_as_it_was(digits_catalog: Catalog) -> None:
    records = _records(digits_catalog)
    good = records.make("sample-a", "SampleSubmitted", {"sample_id": "a", "annotator_id": "x", "features": [1.0], "label": 1, "source": ""})
    bad = records.make("sample-a", "SampleSubmitted", {"sample_id": "a", "annotator_id": "", "features": [2.0], "label": 2, "source": ""})
    view, table = SamplesView(), dict[Any, Stored]()
    changes = _table_after(view, table, [good, bad], set())
    assert [(r.offset, type(e)) for r, e in changes.refused] == [(bad.offset, InvalidEvent)]
    assert table["a"].row["label"] == 1


def test_unchanged_rows_are_not_written(digits_catalog: Catalog) -> None:
    records = _records(digits_catalog)
    retract = records.make("sample-z", "SampleRetracted", {"sample_id": "z", "annotator_id": "x", "reason": ""})
    changes = _table_after(SamplesView(), {}, [retract], set())
    assert changes.puts == () and changes.deletes == ()


def test_erasures_redact_puts_and_stored_rows_alike(digits_catalog: Catalog) -> None:
    records = _records(digits_catalog)
    reg = [records.make(f"annotator-{a}", "AnnotatorRegistered",
                        {"annotator_id": a, "name": a.upper(), "email": f"{a}@x.org", "email_index": "i"}) for a in ("a", "b", "c")]
    erase = [records.make(f"erasure-{s}", "SubjectForgotten", {"subject_id": s, "reason": "r"}) for s in ("a", "c")]
    view, table = AnnotatorsView(), dict[Any, Stored]()
    _table_after(view, table, [reg[0], erase[1]], set())  # c forgotten before it registers
    changes = _table_after(view, table, [erase[0], reg[1], reg[2]], {"c"})
    assert changes.forgotten == ("a",)
    state = {k: (s.erased, s.row["name"] is None, s.row["email"] is None, s.row["email_index"]) for k, s in table.items()}
    assert state == {"a": (True, True, True, "i"), "b": (False, False, False, "i"), "c": (True, True, True, "i")}
    assert isinstance(table["b"].row["name"], Sealed)


class _Bad(View):
    name = "bad"
    key = "k"
    columns = {"k": "text", "who": "text", "secret": personal(subject="who")}

    @on("SampleSubmitted", key="sample_id")
    def unknown_column(self, row: Row | None, record: LogRecord) -> Row:
        return {"nope": 1}

    @on("SampleRetracted", key="sample_id")
    def plaintext(self, row: Row | None, record: LogRecord) -> Row:
        return {"who": "w", "secret": "plain text"}

    @on("LabelCorrected", key="sample_id")
    def other_key(self, row: Row | None, record: LogRecord) -> Row:
        return {"k": "another"}


@pytest.mark.parametrize(("event_type", "words"), [
    ("SampleSubmitted", r"unknown_column for digits.SampleSubmitted: returned column\(s\) \['nope'\]"),
    ("SampleRetracted", "personal column 'secret' must hold projections.view.sealed"),
    ("LabelCorrected", "returned key 'another'"),
])
def test_a_handler_returning_a_bad_row_stops_the_view_naming_it(digits_catalog: Catalog, event_type: str, words: str) -> None:
    records = _records(digits_catalog)
    data = {"sample_id": "s", "annotator_id": "a", "features": [], "label": 1, "previous_label": 0, "reason": "", "source": ""}
    record = records.make("sample-s", event_type, {f["name"]: data[f["name"]] for f in digits_catalog.schema(event_type)["fields"]})
    view = _Bad()
    with pytest.raises(ViewDefinitionError, match=f"view 'bad': handler .*{words}"):
        fold(view.layout(), route(view, view.layout(), [record]), {})


class _WrongSubject(View):
    """Declares the agent-like signature under the record's patient: an erasure of the clinician would miss it."""

    name = "wrong_subject"
    key = "scan_id"
    columns = {"scan_id": "text", "patient_id": "text", "signed_by": personal(subject="patient_id")}

    @on("ScanRecorded")
    def recorded(self, row: Row | None, record: LogRecord) -> Row:
        return {"patient_id": record.data["patient_id"], "signed_by": sealed(record, "signed_by")}


def test_a_personal_column_redacted_by_another_subject_than_it_was_sealed_for_is_refused(keyring: Keyring) -> None:
    catalog = clinic_catalog()
    made = Records(keyring, catalog).make("scan-1", "ScanRecorded", {
        "scan_id": "scan-1", "patient_id": "pt-1", "clinician_id": "cl-1", "features": [1.0], "signed_by": "Dr Q"})
    record = dataclasses.replace(made, policy=catalog.policy("ScanRecorded"))  # as the runner decodes it
    view = _WrongSubject()
    with pytest.raises(ViewDefinitionError, match=r"'signed_by' is redacted with subject column 'patient_id'.*another subject"):
        fold(view.layout(), route(view, view.layout(), [record]), {})
    good = DiagnosesView()  # the example's own view seals the signature under the clinician: accepted
    assert fold(good.layout(), route(good, good.layout(), [record]), {}).puts
