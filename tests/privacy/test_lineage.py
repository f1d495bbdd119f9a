"""Erasure lineage: ``evp forget --dry-run`` and ``--report`` name every place a subject's data is.

Checked from the outside, against real services: before the erasure the dry run lists the
subject's data key, reservations, streams and events, topic records, view rows, snapshot
rows and shard files and training runs, with their counts, and changes nothing; after it
the report shows each as unreadable or redacted (the snapshot shards that held their
measurements decrypted were purged by the erasure), except the model trained on them,
which it names as out of the erasure's reach. A subject with no data holds nothing. Holdings a narrower search would
miss are found: rows of a view that declares no subject column, look-alike ids, a field's
own subject, aggregate snapshots, dead letters, a blind index left in a view.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

import psycopg
import pytest
from kafka import TopicPartition

from events.adapters.kafka import consumer
from events.errors import LineageError
from events.event import Event
from events.ops.forget import forget_subject
from events.ops.lineage import (
    DERIVED, HOLDS, KEPT, PLAINTEXT, REDACTED, UNREADABLE, Holding, collect_lineage, ledger_holdings,
)
from events.privacy import personal
from events.privacy.keyring import InvalidSubject, Keyring
from events.settings import Settings
from events.store.aggregate import save_snapshot
from events.store.client import EventStore
from projections.deadletter import STAGE_APPLY, DeadLetterQueue
from projections.declarations import catch_up_views
from projections.lineage import view_holdings
from tests.privacy.test_forget import durable_state
from tests.support.examples import CLINIC, DIGITS, catalog, project
from tests.support.plaintext import make_people, register, registered, run_cli, submit, unique_word
from tests.support.training import logistic, mlp, scans
from trainer.lineage import training_holdings
from trainer.runs import train_snapshot
from trainer.snapshot import create_snapshot, load_dataset

pytestmark = pytest.mark.services

PATIENTS = 8
SCANS = 48  #: six for each patient, every one diagnosed


Held = dict[tuple[str, str, str], int]


def held(report: Mapping[str, Any]) -> Held:
    """``{(where, kind, state): count}`` of a ``--json`` report."""
    return {(h["where"], h["kind"], h["state"]): h["count"] for h in report["holdings"]}


def report_json(settings: Settings, *args: str) -> dict[str, Any]:
    cli = run_cli(settings, "forget", *args, "--json")
    assert cli.returncode == 0, cli.stderr
    parsed: dict[str, Any] = json.loads(cli.stdout)
    return parsed


# -- the clinic: measurements are personal and reach the snapshot decrypted ------------------
@pytest.fixture
def clinic_settings(settings: Settings) -> Settings:
    return settings.with_(project=CLINIC)


@pytest.fixture
def clinic(clinic_settings: Settings) -> Iterator[EventStore]:
    with EventStore.open(clinic_settings, catalog(CLINIC), registration="auto") as opened:
        yield opened


def admitted(patient: str, n: int) -> Event:
    return Event("PatientAdmitted", {"patient_id": patient, "name": f"Patient {unique_word(random.Random(n))}",
                                     "mrn": f"mrn-{patient}", "birth_date": dt.date(1960, 1, 1 + n % 28),
                                     "admitted_by": "c1"})


def seed_clinic(store: EventStore, settings: Settings) -> tuple[list[str], list[str]]:
    """Patients with six diagnosed scans each, both views caught up; returns (patients, scan ids)."""
    patients = [f"patient-{unique_word(random.Random(), 8).lower()}" for _ in range(PATIENTS)]
    for n, patient in enumerate(patients):
        store.append(patient, admitted(patient, n))
    table, ids = scans(), []
    for i in range(SCANS):
        scan_id, patient = f"{table.row_ids[i]}-{patients[0][-4:]}", patients[i % PATIENTS]
        ids.append(scan_id)
        store.append(scan_id, [
            Event("ScanRecorded", {"scan_id": scan_id, "patient_id": patient, "clinician_id": "c1",
                                   "features": [float(v) for v in table["features"][i]], "signed_by": "Dr One"}),
            Event("DiagnosisRecorded", {"scan_id": scan_id, "patient_id": patient, "clinician_id": "c1",
                                        "diagnosis": "malignant" if table["label"][i] else "benign"}),
        ])
    store.flush()
    catch_up_views(settings, project(CLINIC))
    return patients, ids


def test_the_dry_run_names_every_holding_and_the_report_shows_what_the_erasure_did(
    clinic: EventStore, clinic_settings: Settings,
) -> None:
    patients, scan_ids = seed_clinic(clinic, clinic_settings)
    target = patients[0]
    theirs = [s for i, s in enumerate(scan_ids) if i % PATIENTS == 0]
    snapshot = create_snapshot(clinic, load_dataset(project(CLINIC), "scans")).snapshot_id
    recipe = logistic()
    run = train_snapshot(clinic, project(CLINIC), recipe, snapshot, recipe.parse_config(["device=cpu", "epochs=5"]))
    topic = clinic_settings.events_topic
    with psycopg.connect(clinic_settings.database_url) as conn:
        before = durable_state(conn)

    dry = report_json(clinic_settings, "--dry-run", target)
    text = run_cli(clinic_settings, "forget", "--dry-run", target)

    assert dry["dry_run"] and not dry["key_destroyed"]  # the erasure report stays as it was, the lineage is added
    lineage = dry["lineage"]
    assert lineage["subject_id"] == target and lineage["sources"] == ["backups", "ledger", "training", "views"]
    assert lineage["unavailable"] == {}
    expected_before: Held = {
        ("keyring", "data key", HOLDS): 1,
        ("ledger", "reservations", HOLDS): 1,  # the record number's blind index
        (f"stream {target}", "events", HOLDS): 1,
        **{(f"stream {s}", "events", HOLDS): 1 for s in theirs},  # the scan: measurements sealed
        **{(f"stream {s}", "events", KEPT): 1 for s in theirs},  # the diagnosis: nothing personal
        (f"topic {topic}", "records", HOLDS): 1 + len(theirs),
        (f"topic {topic}", "records", KEPT): len(theirs),
        ("view patients (patients_view.patients)", "view rows", HOLDS): 1,
        ("view diagnoses (diagnoses_view.diagnoses)", "view rows", KEPT): len(theirs),
        (f"snapshot {snapshot}", "snapshot rows", PLAINTEXT): len(theirs),
        (f"snapshot {snapshot}", "shard files", PLAINTEXT): 1,
        (f"run {run.run_id}", "training run", DERIVED): len(theirs),
    }
    assert held(lineage) == expected_before
    assert lineage["unreached"] == 3
    assert text.returncode == 0, text.stderr
    assert f"snapshot {snapshot}" in text.stdout and f"stream   {target}" in text.stdout
    assert f"the erasure would purge on this machine (copies elsewhere stay): snapshot {snapshot}\n" in text.stdout
    assert f"out of any erasure's reach (plaintext, or derived from it): run {run.run_id}" in text.stdout
    shards = next(h for h in lineage["holdings"] if h["kind"] == "shard files")
    assert "shard-00000.bin" in shards["detail"] and "delete" in shards["detail"]
    rows = next(h for h in lineage["holdings"] if h["kind"] == "snapshot rows")
    assert "ScanRecorded.features" in rows["detail"] and "PatientAdmitted" not in rows["detail"]

    with psycopg.connect(clinic_settings.database_url) as conn:  # the dry run changed nothing
        assert durable_state(conn) == before
    with EventStore.open(clinic_settings, catalog(CLINIC)) as fresh:
        assert fresh.read_stream(target)[0].data["mrn"] == f"mrn-{target}"  # the key still opens their data

    forget_subject(clinic, target, reason="request 7")
    after = create_snapshot(clinic, load_dataset(project(CLINIC), "scans")).snapshot_id  # drops their scans

    # The views have not applied the erasure yet: the sealed row is unreadable, not redacted.
    early = held(report_json(clinic_settings, "--report", target))
    assert early[("view patients (patients_view.patients)", "view rows", UNREADABLE)] == 1
    catch_up_views(clinic_settings, project(CLINIC))
    report = report_json(clinic_settings, "--report", target)

    assert held(report) == {
        ("keyring", "data key", REDACTED): 1,
        ("ledger", "reservations", REDACTED): 0,
        ("ledger", "aggregate snapshots", REDACTED): 0,
        (f"stream {target}", "events", UNREADABLE): 1,
        **{(f"stream {s}", "events", UNREADABLE): 1 for s in theirs},
        **{(f"stream {s}", "events", KEPT): 1 for s in theirs},
        (f"stream erasure-{target}", "events", KEPT): 1,  # the erasure's own record, nothing personal
        (f"topic {topic}", "records", UNREADABLE): 1 + len(theirs),
        (f"topic {topic}", "records", KEPT): len(theirs) + 1,
        ("view patients (patients_view.patients)", "view rows", REDACTED): 1,
        ("view diagnoses (diagnoses_view.diagnoses)", "view rows", KEPT): len(theirs),
        # the erasure purged the old snapshot's shards, which held their measurements; the
        # weights fitted on them are out of its reach
        (f"snapshot {snapshot}", "snapshot rows", REDACTED): len(theirs),
        (f"snapshot {snapshot}", "shard files", REDACTED): 1,
        (f"run {run.run_id}", "training run", DERIVED): len(theirs),
        # the one cut after the erasure pinned their events, and folded none of them into rows
        (f"snapshot {after}", "pinned events", KEPT): 2 + 2 * len(theirs),
    }
    assert report["unreached"] == 1


def test_a_fields_own_subject_is_traced_and_a_fold_after_the_erasure_holds_no_plaintext(
    clinic: EventStore, clinic_settings: Settings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The clinician is not the subject of any record, only of the signature each scan carries."""
    seed_clinic(clinic, clinic_settings)
    before = create_snapshot(clinic, load_dataset(project(CLINIC), "scans")).snapshot_id
    found = held({"holdings": [h.to_json() for h in view_holdings(clinic_settings, project(CLINIC), "c1")]})
    assert found == {("view diagnoses (diagnoses_view.diagnoses)", "view rows", HOLDS): SCANS}  # signed_by

    forget_subject(clinic, "c1", reason="request 8")
    after = create_snapshot(clinic, load_dataset(project(CLINIC), "scans")).snapshot_id

    def training() -> Held:
        return held({"holdings": [h.to_json() for h in training_holdings(clinic_settings, project(CLINIC), "c1")]})

    # The dataset was handed the signature decrypted: evp cannot see that it dropped it, so the
    # erasure purged the snapshot cut before it.
    assert training()[(f"snapshot {before}", "snapshot rows", REDACTED)] == SCANS
    # Cut right after the erasure, another process could still have held the key: not proven safe.
    assert training()[(f"snapshot {after}", "snapshot rows", PLAINTEXT)] == SCANS
    # Once no cached key can have outlived the erasure (no cache here), the later fold is proven
    # to have been handed [erased]: its rows hold nothing personal of theirs.
    monkeypatch.setattr(Keyring, "DEFAULT_CACHE_SECONDS", 0.0)
    proven = training()
    assert proven[(f"snapshot {after}", "snapshot rows", KEPT)] == SCANS
    assert (f"snapshot {after}", "snapshot rows", PLAINTEXT) not in proven
    assert proven[(f"snapshot {before}", "snapshot rows", REDACTED)] == SCANS  # cut before: purged


# -- the digits: what a narrower search would miss --------------------------------------------
def dead_letter(settings: Settings, stream_partition: int, offset: int) -> None:
    """Copy the record at ``offset`` to the dead-letter topic, as a view that refused it does."""
    reader = consumer(settings)
    tp = TopicPartition(settings.events_topic, stream_partition)
    try:
        reader.assign([tp])
        reader.seek(tp, offset)
        messages: list[Any] = []
        for _ in range(30):
            messages += reader.poll(timeout_ms=1000).get(tp, [])
            if messages:
                break
    finally:
        reader.close()
    assert messages and messages[0].offset == offset
    message = messages[0]
    letters = DeadLetterQueue(settings, "annotators")
    try:
        letters.send(message, "InvalidEvent: refused for the test", STAGE_APPLY)
        letters.flush()
    finally:
        letters.close()


def test_holdings_a_narrower_search_would_miss_are_found(
    store: EventStore, settings: Settings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    person, other = make_people(random.Random(), 2)
    samples = [f"{person.annotator_id}-s{i}" for i in range(4)]
    register(store, person)
    register(store, other)
    submit(store, person, samples, "digits")
    submit(store, other, [f"{other.annotator_id}-s{i}" for i in range(40)], "digits")
    twin = replace(person, annotator_id=person.annotator_id + " ", email="twin." + person.email)
    with monkeypatch.context() as old_sdk:  # an SDK from before subject ids were checked
        old_sdk.setattr(personal, "subject_problem", lambda subject_id: None)
        old_sdk.setattr("events.privacy.keyring.subject_problem", lambda subject_id: None)
        store.append(f"{person.stream_id}-twin", registered(twin))
    save_snapshot(store, person.stream_id, 1, {"name": person.name})  # decrypted aggregate state
    store.flush()
    registration = store.ledger.read_stream(person.stream_id)[0]
    assert registration.offset is not None
    dead_letter(settings, registration.partition, registration.offset)
    catch_up_views(settings, project(DIGITS))
    snapshot = create_snapshot(store, load_dataset(project(DIGITS), "digits")).snapshot_id
    recipe = mlp()
    run = train_snapshot(store, project(DIGITS), recipe, snapshot, recipe.parse_config(["epochs=1", "device=cpu"]))

    with pytest.raises(InvalidSubject, match=repr(person.annotator_id)):  # the look-alike names the id to use
        collect_lineage(settings, project(DIGITS), twin.annotator_id)
    before = held(report_json(settings, "--report", person.annotator_id))

    annotators, samples_view = "view annotators (annotators_view.annotators)", "view samples (samples_view.samples)"
    assert before[("keyring", "data key", HOLDS)] == 2  # the subject and the look-alike id
    assert before[(f"stream {person.stream_id}-twin", "events", HOLDS)] == 1
    assert before[("ledger", "aggregate snapshots", PLAINTEXT)] == 1
    assert before[(f"topic {settings.dead_letter_topic}", "dead letters", HOLDS)] == 1
    assert before[(annotators, "view rows", HOLDS)] == 2
    assert before[(annotators, "blind indexes", KEPT)] == 2
    assert before[(samples_view, "view rows", KEPT)] == len(samples)  # the view names no subject column
    assert before[(f"snapshot {snapshot}", "snapshot rows", KEPT)] == len(samples)  # features and labels only
    assert before[(f"run {run.run_id}", "training run", KEPT)] == len(samples)
    assert not any(state in (PLAINTEXT, DERIVED) for (where, _, state) in before if where.startswith(("snapshot", "run")))

    forget_subject(store, person.annotator_id, reason="request 9")
    catch_up_views(settings, project(DIGITS))
    after = held(report_json(settings, "--report", person.annotator_id))

    assert after[("keyring", "data key", REDACTED)] == 2
    assert after[("ledger", "aggregate snapshots", REDACTED)] == 0  # deleted by the erasure
    assert after[(f"stream {person.stream_id}-twin", "events", UNREADABLE)] == 1
    assert after[(f"topic {settings.dead_letter_topic}", "dead letters", UNREADABLE)] == 1
    assert after[(annotators, "view rows", REDACTED)] == 2
    assert after[(annotators, "blind indexes", KEPT)] == 2  # redaction clears personal columns only
    assert after[(samples_view, "view rows", KEPT)] == len(samples)
    other_report = held(report_json(settings, "--report", other.annotator_id))
    assert other_report[("keyring", "data key", HOLDS)] == 1 and other_report[(annotators, "view rows", HOLDS)] == 1


def test_a_subject_with_no_data_holds_nothing_and_the_json_has_one_shape(settings: Settings, store: EventStore) -> None:
    (person,) = make_people(random.Random(), 1)
    register(store, person)
    store.flush()
    catch_up_views(settings, project(DIGITS))
    nobody = f"ann-{unique_word(random.Random(), 8).lower()}"

    empty = report_json(settings, "--report", nobody)
    text = run_cli(settings, "forget", "--report", nobody)
    dry = report_json(settings, "--dry-run", nobody)
    full = report_json(settings, "--report", person.annotator_id)

    assert empty == {"subject_id": nobody, "holdings": [], "sources": ["backups", "ledger", "training", "views"],
                     "unavailable": {}, "unreached": 0}
    assert text.returncode == 0 and "nothing held" in text.stdout
    assert dry["events"] == 0 and dry["lineage"]["holdings"] == []
    assert full["holdings"] and all(
        set(h) == {"where", "kind", "count", "state", "detail", "source"} and isinstance(h["count"], int)
        and h["state"] in (HOLDS, KEPT) and h["source"] in full["sources"] and h["detail"]
        for h in full["holdings"]
    )
    assert {h["source"] for h in full["holdings"]} == {"ledger", "views"}  # no snapshot was cut
    with psycopg.connect(settings.database_url) as conn:  # nothing was made for the one who is not there
        assert conn.execute("SELECT count(*) FROM evp_keyring.evp_data_keys WHERE subject_id = %s",
                            (nobody,)).fetchone() == (0,)
    assert ledger_holdings(settings, None, nobody) == []


def test_a_source_that_answers_wrongly_is_named_and_one_that_cannot_load_is_reported(base_settings: Settings) -> None:
    def bad(settings: Settings, project: object, subject: str) -> list[Holding]:
        return [Holding("somewhere", "rows", 1, "gone")]

    def good(settings: Settings, project: object, subject: str) -> list[Holding]:
        return [Holding("backup b-1", "backup", 1, UNREADABLE, "covers positions 1..9")]

    with pytest.raises(LineageError, match="lineage source 'bad': holding 'somewhere': state 'gone'"):
        collect_lineage(base_settings, None, "ann-1", {"bad": bad})
    lineage = collect_lineage(base_settings, None, "ann-1", {"backups": good, "training": "torch is not installed"})
    assert lineage.holdings == (Holding("backup b-1", "backup", 1, UNREADABLE, "covers positions 1..9", "backups"),)
    assert lineage.sources == ("backups",) and lineage.unavailable == {"training": "torch is not installed"}
    with pytest.raises(LineageError, match="a count of 0"):
        collect_lineage(base_settings, None, "ann-1", {"zero": lambda s, p, x: [Holding("x", "rows", 0, KEPT)]})
