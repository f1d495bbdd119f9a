"""The clinic project end to end, on scikit-learn's bundled breast-cancer scans.

Run it with ``make demo EXAMPLE=clinic`` (or ``python examples/clinic/demo.py``). It uses
only evp's public API. The 569 scans (30 measurements of very different scales, benign or
malignant) belong to synthetic patients; clinicians record them and give diagnoses, one of
them carelessly, so a colleague revises those. Each run gets a fresh sandbox, then:

1. checks and registers the project's schemas (this project registers explicitly);
2. registers clinicians and admits patients (name, record number and birth date sealed
   under each patient's key; the record number is unique);
3. records every scan (its measurements are the patient's health data, the signature the
   clinician's: one event, two people's keys) and its diagnosis, then the revisions;
4. publishes the outbox and folds the project's views;
5. cuts a snapshot of the ``scans`` dataset, trains the ``logistic`` recipe, replays it;
6. two patients withdraw consent, each through the consent-withdrawal saga (forget, cut a
   snapshot without them, retrain every model that saw them, retire the old ones): the
   first completes; the second's retraining keeps failing, so the saga compensates back to
   the erasure and parks for an operator; their view rows are redacted, the next snapshot
   no longer holds their scans;
7. signs the chain heads with an audit key and checks that the log was not tampered with;
8. backs the log up, verifies the backup and restores it into a fresh database, proving the
   copy equal (chain heads, view digests).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer

from events.cli.common import Steps, format_table, print_table
from events.errors import EvpError
from events.event import NO_STREAM, Event
from events.ops.audit import subject_history
from events.ops import checkpoints
from events.ops.backup import BackupKey
from events.ops.backup_set import create_backup, verify_set
from events.ops.drill import restore_drill
from events.ops.integrity import verify_log
from events.ops.sandbox import fresh_sandbox
from events.project import Project
from events.schema.check import check_schemas, register_schemas
from events.schema.registry import KafkaSchemaLog, SchemaRegistry
from events.settings import Settings, database_name
from events.store.client import EventStore
from events.adapters import postgres
from projections.declarations import catch_up_views, load_participant, load_sagas, load_view
from projections.sagas.settle import settle
from projections.sagas.store import TIMELINE_COLUMNS, timeline as saga_timeline
from projections.tables import read_rows
from trainer.progress import bar, step_bar
from trainer.recipe import load_recipe
from trainer.runs import replay_run, runs_of_snapshot, train_snapshot
from trainer.snapshot import create_snapshot, load_dataset, verify_snapshot

HERE = Path(__file__).resolve().parent
#: Fictional clinicians: (id, name, licence). The last one misreads some scans.
CLINICIANS = (
    ("cl-ines", "Ines Varanasi-Holt", "LIC-20417"),
    ("cl-omar", "Omar Kettleby", "LIC-31852"),
    ("cl-tove", "Tove Brannigan", "LIC-47093"),
)
CARELESS = "cl-tove"
REVIEWER = "cl-ines"
WITHDRAWS = "pt-0042"  #: the patient who withdraws consent and is forgotten
STUCK = "pt-0043"  #: withdraws too; the retraining for them is misconfigured and keeps failing
NAMESPACE = uuid.UUID("0b8e3c52-77a4-4d0e-9b61-5f2f1c7d9a43")
_FIRST = ("Alva", "Bertil", "Cosima", "Dario", "Elin", "Fenna", "Goran", "Hedda", "Ivo", "Jora")
_LAST = ("Quennell", "Rasmark", "Sollberg", "Tamberlain", "Udvardy", "Vexholm", "Wintergreen", "Yarrowby")
#: scikit-learn's target: 0 malignant, 1 benign.
FINDING = ("malignant", "benign")
OTHER = {"benign": "malignant", "malignant": "benign"}


def event_id(*parts: object) -> uuid.UUID:
    """Deterministic ids: re-running a step appends nothing twice (the ids are idempotency keys)."""
    return uuid.uuid5(NAMESPACE, "/".join(map(str, parts)))


def patient(i: int, rng: np.random.Generator) -> dict[str, object]:
    """A synthetic patient: a made-up name, a unique record number, a birth date."""
    return {
        "patient_id": f"pt-{i:04d}", "name": f"{_FIRST[i % len(_FIRST)]} {_LAST[(i // len(_FIRST)) % len(_LAST)]}-{i}",
        "mrn": f"MRN-{700000 + 7 * i}", "birth_date": dt.date(1940, 1, 1) + dt.timedelta(days=int(rng.integers(0, 22000))),
        "admitted_by": CLINICIANS[i % len(CLINICIANS)][0],
    }


def run(settings: Settings, epochs: int | None) -> int:
    """The demo in the services of ``settings`` (which :func:`main` points at a fresh sandbox)."""
    step = Steps()
    settings = settings.with_(project=HERE)
    print(f"clinic demo: database {database_name(settings.database_url)}, topics {settings.topic_prefix}.*")
    project = Project.read(HERE)
    scans = load_breast_cancer()
    rng = np.random.default_rng(11)
    patients = [patient(i, rng) for i in range(len(scans.target))]
    names = dict((c[0], c[1]) for c in CLINICIANS)
    recorder = [CLINICIANS[(i * 7) % len(CLINICIANS)][0] for i in range(len(patients))]
    truth = [FINDING[t] for t in scans.target]
    misread = [i for i in range(len(patients)) if recorder[i] == CARELESS and rng.random() < 0.3]

    with step("checking and registering the schemas (registration is explicit for this project)"):
        log = KafkaSchemaLog(settings)
        try:
            catalog = project.catalog()
            report = check_schemas(catalog, SchemaRegistry(log), settings.events_topic)
            if not report.ok:
                raise EvpError("; ".join(report.problems))
            ids = register_schemas(catalog, SchemaRegistry(log), settings.events_topic)
        finally:
            log.close()
        print(f"    check passed; {len(ids)} event types registered")

    with EventStore.open(settings) as store:
        with step(f"registering {len(CLINICIANS)} clinicians and admitting {len(patients)} patients"), \
                bar("appending", total=len(CLINICIANS) + len(patients), unit="ev") as advance:
            for clinician_id, name, licence in CLINICIANS:
                store.append(f"clinician-{clinician_id}", Event("ClinicianRegistered", {
                    "clinician_id": clinician_id, "name": name, "licence": licence},
                    event_id=event_id("clinician", clinician_id), actor=clinician_id), NO_STREAM)
                advance(1)
            for person in patients:
                store.append(f"patient-{person['patient_id']}", Event(
                    "PatientAdmitted", person, event_id=event_id("admit", person["patient_id"]),
                    actor=str(person["admitted_by"])), NO_STREAM)
                advance(1)

        with step(f"recording {len(patients)} scans and their diagnoses ({len(misread)} misread)"), \
                bar("appending", total=len(patients), unit="scan") as advance:
            for i, person in enumerate(patients):
                scan_id, clinician = f"scan-{i:04d}", recorder[i]
                given = OTHER[truth[i]] if i in misread else truth[i]
                store.append(scan_id, [
                    Event("ScanRecorded", {"scan_id": scan_id, "patient_id": person["patient_id"],
                                           "clinician_id": clinician, "features": scans.data[i].tolist(),
                                           "signed_by": names[clinician]},
                          event_id=event_id("scan", i), actor=clinician),
                    Event("DiagnosisRecorded", {"scan_id": scan_id, "patient_id": person["patient_id"],
                                                "clinician_id": clinician, "diagnosis": given},
                          event_id=event_id("diagnose", i), actor=clinician),
                ], NO_STREAM)
                advance(1)

        with step(f"a second reading: {REVIEWER} revises the {len(misread)} misread diagnoses"):
            for i in misread:
                store.append(f"scan-{i:04d}", Event("DiagnosisRevised", {
                    "scan_id": f"scan-{i:04d}", "patient_id": patients[i]["patient_id"], "clinician_id": REVIEWER,
                    "previous": OTHER[truth[i]], "diagnosis": truth[i], "reason": "second reading"},
                    event_id=event_id("revise", i), actor=REVIEWER), 2)

        with step("publishing the outbox to Kafka and folding the project's views"):
            print(f"    {store.flush()} events published")
            for name, result in catch_up_views(settings, project).items():
                print(f"    {name}: {result.applied} events applied, {result.skipped} duplicates skipped")

        dataset = load_dataset(project, "scans")
        with step("cutting a snapshot of the scans dataset and verifying it against Kafka"):
            with bar("reading events", unit="rec") as advance:
                manifest = create_snapshot(store, dataset, advance)
            verified = verify_snapshot(store, manifest.snapshot_id, project)
            print(f"    snapshot {manifest.snapshot_id}: {manifest.row_count} scans, content hash "
                  f"{manifest.content_hash[:16]}…, verified ({verified.shards_checked} shards)")

        recipe = load_recipe(project, "logistic")
        config = recipe.parse_config([] if epochs is None else [f"epochs={epochs}"])
        with step("training the logistic recipe, then replaying the recorded run"):
            with step_bar("training") as progress:
                trained = train_snapshot(store, project, recipe, manifest.snapshot_id, config, progress=progress)
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(trained.metrics.items()))
            print(f"    run {trained.run_id} on {trained.device}: held-out {metrics}")
            outcome = replay_run(store, project, trained.run_id)
            verdict = outcome.verdict
            print(f"    replay {outcome.replay.run_id}: weights {verdict}")
            for difference in outcome.differences():
                print(f"    {difference}")

        with step(f"{WITHDRAWS} withdraws consent: what do we hold, and which models saw it?"):
            entries = subject_history(store, WITHDRAWS)
            print(f"    {len(entries)} events hold their data: "
                  f"{', '.join(sorted({e.event_type for e in entries}))}")
            print(f"    models trained on a snapshot holding them: "
                  f"{', '.join(r.run_id for r in runs_of_snapshot(store, manifest.snapshot_id))}")

        with step(f"{WITHDRAWS} and {STUCK} withdraw consent: one saga each (forget, snapshot, retrain, retire)"):
            # The second withdrawal's retraining is misconfigured: it fails, is retried, then
            # compensated back to the erasure, which cannot be undone: the saga parks.
            for patient_id, overrides in ((WITHDRAWS, []), (STUCK, ["learning_rate=-1"])):
                store.append(f"consent-{patient_id}", Event("ConsentWithdrawn", {
                    "withdrawal_id": f"wd-{patient_id}", "patient_id": patient_id, "retrain_config": overrides},
                    event_id=event_id("withdraw", patient_id), actor=patient_id), NO_STREAM)
            settled = settle(settings, load_sagas(project), [load_participant(project, "consent")], store)
            parked = [s for s in settled if s.status == "parked"]
            print_table([s.to_json() for s in settled], ("saga_id", "status", "step", "attempt"))
            print("    evp sagas list --state parked:")
            for summary in parked:
                print(f"      {summary.saga_id}: parked at {summary.step!r}: {summary.reason}")
            print(f"    the timeline of {parked[0].saga_id} (`evp sagas show {parked[0].saga_id}`):" if parked else "")
            if parked:
                print(textwrap.indent(format_table(saga_timeline(store, parked[0].saga_id), TIMELINE_COLUMNS), "    "))
            withdrawn = sorted(s.status for s in settled) == ["completed", "parked"]
            # The participant forgot them in its own process; this one's cached data keys would
            # expire within the keyring's cache time: drop them now.
            for patient_id in (WITHDRAWS, STUCK):
                store.keyring.evict(patient_id)
            catch_up_views(settings, project)
            patients_view = load_view(project, "patients")
            with postgres.connect(settings.database_url) as conn, conn.cursor() as cur:
                row = read_rows(cur, patients_view)[WITHDRAWS]
            print(f"    patients view: name {row['name']}, mrn {row['mrn']}, birth_date {row['birth_date']}, "
                  f"erased {row['erased']}")
            scan = store.read_stream("scan-0042")[0].data
            print_table([{"field": "features", "reads": str(scan["features"])[:24]},
                         {"field": "signed_by (the clinician's)", "reads": "decrypts" if scan["signed_by"] else "-"}],
                        ("field", "reads"))
            after = create_snapshot(store, dataset)
            print(f"    the next snapshot holds {after.row_count} scans (was {manifest.row_count})")

        with step("audit: was the log tampered with? (signed chain heads, the chains, the topic against the ledger)"):
            private, public = checkpoints.generate_key(settings.home / "auditor")  # the auditor's, kept elsewhere
            witness = settings.home / "witness"
            checkpoints.make_checkpoint(store, checkpoints.load_private_key(private), witness)
            integrity = verify_log(store, public_key=checkpoints.load_public_key(public), witness=witness)
            print(textwrap.indent(str(integrity), "    "))

        with step("backup: the log, its state and the views' digests; verified; restored into a fresh database"):
            backups = settings.home / "backups"
            catch_up_views(settings, project)
            made = create_backup(settings, backups, publish=store.flush)
            verify_set(backups, BackupKey.from_settings(settings))
            print(f"    {made.name}: {made.records} records up to ledger position {made.position}, verified")
            _, drill = restore_drill(settings, backups, sandbox="evp_demo_clinic_restored")
            print(textwrap.indent(str(drill), "    "))
    accuracy = trained.metrics["accuracy"]
    ok = (accuracy >= 0.9 and outcome.identical and integrity.intact and withdrawn
          and after.row_count == manifest.row_count - 2 and drill.proved)
    print(f"\nclinic demo {'finished' if ok else 'FAILED'}: accuracy {accuracy:.4f}, replay {verdict}, "
          f"log {integrity.verdict}, backup {'proved equal' if drill.proved else 'NOT equal'}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the recipe's)")
    parser.add_argument("--sandbox", default="evp_demo_clinic", help="name of the fresh database, topics and home to use")
    parser.add_argument("--no-sandbox", action="store_true",
                        help="use the services EVP_* names as they are (they must be empty)")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        return run(settings if args.no_sandbox else fresh_sandbox(settings, args.sandbox), args.epochs)
    except EvpError as err:
        print(f"clinic demo: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
