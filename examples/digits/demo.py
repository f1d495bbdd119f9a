"""The digits project end to end, on scikit-learn's bundled handwritten digits.

Run it with ``make demo EXAMPLE=digits`` (or ``python examples/digits/demo.py``). It uses
only evp's public API, as a team's own script would. Each run gets a fresh sandbox (its
own database, topics and home), then:

1. registers annotators (name and email sealed by the SDK; the email is unique);
2. streams the 1,797 digits through the SDK as samples, some mislabelled;
3. corrects the mislabelled ones and retracts a few;
4. publishes the outbox and folds the project's views;
5. cuts a snapshot of the ``digits`` dataset and verifies it against Kafka;
6. trains the ``mlp`` recipe, then replays the run and compares the weights;
7. runs two model releases as sagas (one misses its bar and is compensated) and prints the
   compensated one's timeline;
8. answers audit queries, forgets one annotator and shows the redacted view;
9. takes a full backup (the log, the ledger's state and the views' digests at its cut);
10. signs the chain heads with an audit key and checks that the log was not tampered with;
11. takes an incremental backup, verifies the set and restores it into a fresh database,
    proving the copy equal (chain heads, view digests).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from events.cli.common import Steps, format_table, print_table
from events.errors import EvpError
from events.event import NO_STREAM, Event
from events.ops.audit import subject_history, summarize
from events.ops.forget import forget_subject
from events.ops import checkpoints
from events.ops.backup_set import create_backup, verify_set
from events.ops.backup import BackupKey
from events.ops.drill import restore_drill
from events.ops.integrity import verify_log
from events.ops.sandbox import fresh_sandbox
from events.privacy.personal import REDACTED
from events.project import Project
from events.settings import Settings, database_name
from events.store.client import EventStore
from projections.declarations import catch_up_views, load_participant, load_sagas
from projections.sagas.settle import settle
from projections.sagas.store import TIMELINE_COLUMNS, timeline as saga_timeline
from trainer.progress import bar, step_bar
from trainer.recipe import load_recipe
from trainer.runs import replay_run, runs_of_snapshot, train_snapshot
from trainer.snapshot import create_snapshot, load_dataset, verify_snapshot

HERE = Path(__file__).resolve().parent
#: Fictional people; their names and emails must never appear in plaintext anywhere.
ANNOTATORS = (
    ("ann-ada", "Ada Quillfeather", "ada.quillfeather@example.org"),
    ("ann-bo", "Bo Marchetti", "bo.marchetti@example.org"),
    ("ann-cy", "Cyrus Vanterpool", "cyrus.vanterpool@example.org"),
    ("ann-di", "Dinah Oyelaran", "dinah.oyelaran@example.org"),
)
SLOPPY = "ann-di"  #: mislabels some samples; the others correct them
FORGOTTEN = "ann-cy"  #: asks to be forgotten at the end
NAMESPACE = uuid.UUID("6f1c3f1e-8a0e-4c55-9d0b-2c7f3e9a1d10")


def event_id(*parts: object) -> uuid.UUID:
    """Deterministic ids: re-running a step appends nothing twice (the ids are idempotency keys)."""
    return uuid.uuid5(NAMESPACE, "/".join(map(str, parts)))


def run(settings: Settings, epochs: int | None) -> int:
    """The demo in the services of ``settings`` (which :func:`main` points at a fresh sandbox)."""
    step = Steps()
    settings = settings.with_(project=HERE)
    print(f"digits demo: database {database_name(settings.database_url)}, topics {settings.topic_prefix}.*")
    project = Project.read(HERE)
    digits = load_digits()
    features, labels = digits.data.astype(np.float32), digits.target.astype(int)
    rng = np.random.default_rng(7)
    owners = [ANNOTATORS[i % len(ANNOTATORS)][0] for i in range(len(labels))]
    sloppy = [i for i in range(len(labels)) if owners[i] == SLOPPY and rng.random() < 0.25]
    retracted = sorted(rng.choice(len(labels), size=25, replace=False).tolist())

    with EventStore.open(settings) as store:
        with step(f"registering {len(ANNOTATORS)} annotators (name and email sealed; the email is unique)"):
            for annotator_id, name, email in ANNOTATORS:
                store.append(f"annotator-{annotator_id}", Event(
                    "AnnotatorRegistered", {"annotator_id": annotator_id, "name": name, "email": email},
                    event_id=event_id("register", annotator_id), actor=annotator_id), NO_STREAM)

        with step(f"streaming {len(labels)} digits through the SDK ({len(sloppy)} mislabelled)"), \
                bar("appending", total=len(labels), unit="ev") as advance:
            for i, (row, label) in enumerate(zip(features, labels)):
                given = (label + 1) % 10 if i in sloppy else label
                store.append(f"sample-{i:04d}", Event("SampleSubmitted", {
                    "sample_id": f"digit-{i:04d}", "annotator_id": owners[i], "features": row.tolist(),
                    "label": int(given), "source": "sklearn.load_digits"},
                    event_id=event_id("submit", i), actor=owners[i]), NO_STREAM)
                advance(1)

        with step(f"correcting {len(sloppy)} labels and retracting {len(retracted)} samples"):
            for i in sloppy:
                reviewer = ANNOTATORS[(i + 1) % 3][0]
                store.append(f"sample-{i:04d}", Event("LabelCorrected", {
                    "sample_id": f"digit-{i:04d}", "annotator_id": reviewer,
                    "previous_label": int((labels[i] + 1) % 10), "label": int(labels[i]), "reason": "review"},
                    event_id=event_id("correct", i), actor=reviewer), 1)
            for i in retracted:
                store.append(f"sample-{i:04d}", Event("SampleRetracted", {
                    "sample_id": f"digit-{i:04d}", "annotator_id": owners[i], "reason": "blurred scan"},
                    event_id=event_id("retract", i), actor=owners[i]))

        with step("publishing the outbox to Kafka (idempotent producer, acks=all)"):
            print(f"    {store.flush()} events published")

        with step("folding the project's views into PostgreSQL"):
            for name, result in catch_up_views(settings, project).items():
                print(f"    {name}: {result.applied} events applied, {result.skipped} duplicates skipped")

        with step("cutting a snapshot of the digits dataset and verifying it against Kafka"):
            with bar("reading events", unit="rec") as advance:
                manifest = create_snapshot(store, load_dataset(project, "digits"), advance)
            with bar("re-reading events", unit="rec") as advance:
                verified = verify_snapshot(store, manifest.snapshot_id, project, advance)
            print(f"    snapshot {manifest.snapshot_id}: {manifest.row_count} rows, content hash "
                  f"{manifest.content_hash[:16]}…, verified ({verified.shards_checked} shards)")

        recipe = load_recipe(project, "mlp")
        config = recipe.parse_config([] if epochs is None else [f"epochs={epochs}"])
        with step("training the mlp recipe on the snapshot"):
            with step_bar("training") as progress:
                trained = train_snapshot(store, project, recipe, manifest.snapshot_id, config, progress=progress)
            accuracy = trained.metrics["accuracy"]
            print(f"    run {trained.run_id} on {trained.device}: held-out accuracy {accuracy:.4f}")

        with step("replaying the training from the recorded run"):
            with step_bar("replaying") as progress:
                outcome = replay_run(store, project, trained.run_id, progress=progress)
            verdict = outcome.verdict
            print(f"    weights {verdict}: {outcome.original.weights_sha256[:16]}… vs "
                  f"{outcome.replay.weights_sha256[:16]}…")
            for difference in outcome.differences():
                print(f"    {difference}")

        with step("two model releases as sagas: snapshot, train, promote, evaluate against a bar"):
            releases = {"release-1": 0.90, "release-2": 0.999}  # the second bar is out of reach: it compensates
            for release_id, release_bar in releases.items():
                store.append(release_id, Event("ReleaseRequested", {
                    "release_id": release_id, "bar": release_bar, "epochs": config.epochs},
                    event_id=event_id("release", release_id)), NO_STREAM)
            sagas = load_sagas(project)
            settled = settle(settings, sagas, [load_participant(project, "releaser")], store)
            print_table([s.to_json() for s in settled], ("saga_id", "status", "step", "reason"))
            compensated = next(s for s in settled if s.status == "compensated")
            print(f"    the timeline of {compensated.saga_id}, from the ledger (`evp sagas show {compensated.saga_id}`):")
            print(textwrap.indent(format_table(saga_timeline(store, compensated.saga_id), TIMELINE_COLUMNS), "    "))
            released = [s.status for s in settled] == ["completed", "compensated"]

        with step(f"audit: what did {FORGOTTEN} do, and which models saw it"):
            entries = subject_history(store, FORGOTTEN)  # personal fields stay sealed here
            print(f"    {len(entries)} events; the first five:")
            print_table([{**e.as_dict(), "summary": summarize(e.data, 48)} for e in entries[:5]],
                        ("position", "actor", "stream_id", "event_type", "kafka", "summary"))
            models = runs_of_snapshot(store, manifest.snapshot_id)
            print(f"    models trained on data they touched: {', '.join(r.run_id for r in models)}")

        with step(f"forgetting {FORGOTTEN} (crypto-shredding)"):
            print(f"    dry run: {forget_subject(store, FORGOTTEN, reason='erasure request', dry_run=True)}")
            print(f"    {forget_subject(store, FORGOTTEN, reason='erasure request')}")
            catch_up_views(settings, project)
            rows = []
            for annotator_id, _, _ in ANNOTATORS:
                data = store.read_stream(f"annotator-{annotator_id}")[0].data
                rows.append({"annotator": annotator_id, "name": masked(data["name"]), "email": masked(data["email"])})
            print("    the annotators, decrypted with the keyring after the erasure (masked for this printout):")
            print_table(rows, ("annotator", "name", "email"))

        backups = settings.home / "backups"  # any fsspec URL works too: s3://bucket/evp, ...
        with step(f"backup: a full backup into {backups.name}/ (the log, reservations, the views' digests at the cut)"):
            catch_up_views(settings, project)
            full = create_backup(settings, backups, publish=store.flush)
            print(f"    {full.name}: {full.records} records up to ledger position {full.position}, "
                  f"{full.state.get('RESERVATIONS', 0)} reservations, digests of {', '.join(full.proofs['views'])}")

        with step("audit: was the log tampered with? (signed chain heads, the chains, the topic against the ledger)"):
            # The auditor's key belongs on another machine; the demo keeps it in its sandbox.
            private, public = checkpoints.generate_key(settings.home / "auditor")
            witness = settings.home / "witness"
            signed = checkpoints.make_checkpoint(store, checkpoints.load_private_key(private), witness)
            print(f"    checkpoint {signed.id} signed with the audit key: "
                  + ", ".join(f"partition {p} up to offset {h.offset}" for p, h in sorted(signed.heads.items())))
            integrity = verify_log(store, public_key=checkpoints.load_public_key(public), witness=witness)
            print(textwrap.indent(str(integrity), "    "))

        with step("backup: an incremental backup, the set verified, a restore drill into a fresh database"):
            catch_up_views(settings, project)
            incremental = create_backup(settings, backups, incremental=True, publish=store.flush)
            print(f"    {incremental.name}: {incremental.records} new records, continuing backup {full.sequence}")
            verified = verify_set(backups, BackupKey.from_settings(settings))
            print(f"    verified {len(verified.backups)} backups: MACs, hashes, chain links, parents")
            restored, drill = restore_drill(settings, backups, sandbox="evp_demo_digits_restored")
            print(textwrap.indent(str(drill), "    "))
    ok = accuracy >= 0.90 and outcome.identical and integrity.intact and released and drill.proved
    print(f"\ndigits demo {'finished' if ok else 'FAILED'}: accuracy {accuracy:.4f}, replay {verdict}, "
          f"log {integrity.verdict}, backup {'proved equal' if drill.proved else 'NOT equal'}")
    return 0 if ok else 1


def masked(value: str) -> str:
    """Show that a value decrypted without printing personal data: first and last character."""
    if value == REDACTED or len(value) < 3:
        return value
    return value[0] + "*" * (len(value) - 2) + value[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the recipe's)")
    parser.add_argument("--sandbox", default="evp_demo_digits", help="name of the fresh database, topics and home to use")
    parser.add_argument("--no-sandbox", action="store_true",
                        help="use the services EVP_* names as they are (they must be empty)")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        return run(settings if args.no_sandbox else fresh_sandbox(settings, args.sandbox), args.epochs)
    except EvpError as err:
        print(f"digits demo: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
