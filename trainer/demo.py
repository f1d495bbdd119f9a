"""``evp demo``: the whole platform, end to end, on scikit-learn's bundled digits.

Each run gets a fresh demo database and fresh topics (a demo must be safe to run twice and
must not touch anything else in the same services), then:

1. registers annotators (personal data encrypted by the SDK, one per email);
2. streams the 1,797 digits through the SDK as samples, some mislabelled;
3. corrects the mislabelled ones and retracts a few;
4. publishes the outbox and runs the samples projection;
5. cuts a snapshot and verifies it against Kafka;
6. trains, then replays the training and compares the weights;
7. answers audit queries, forgets one annotator and shows the redacted view;
8. checks that the log was not tampered with.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from events.adapters import postgres
from events.ops.audit import subject_history, summarize
from events.cli.common import print_table
from events.store.client import EventStore
from events.event import NO_STREAM, Event
from events.ops.forget import forget_subject
from events.ops.integrity import verify_log
from events.privacy.personal import REDACTED
from events.settings import Settings
from trainer.config import TrainConfig
from trainer.demo_reset import fresh_demo_settings
from trainer.progress import bar, step_bar
from trainer.runs import replay_run, runs_of_snapshot, train_snapshot
from trainer.snapshot import create_snapshot, verify_snapshot

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


@dataclass
class Step:
    number: int = 0

    @contextmanager
    def __call__(self, title: str) -> Iterator[None]:
        self.number += 1
        print(f"\n[{self.number}] {title}", flush=True)
        started = time.perf_counter()
        yield
        print(f"    done in {time.perf_counter() - started:.1f}s", flush=True)


def _event_id(*parts: object) -> uuid.UUID:
    """Deterministic ids: re-running a step appends nothing twice (the ids are idempotency keys)."""
    return uuid.uuid5(NAMESPACE, "/".join(map(str, parts)))


def run_demo(settings: Settings, epochs: int) -> int:
    from sklearn.datasets import load_digits  # the demo extra; data ships inside the package

    step = Step()
    with step("fresh demo database and topics"):
        settings = fresh_demo_settings(settings)
        print(f"    database {settings.database_url.rsplit('/', 1)[-1]}, topics {settings.topic_prefix}.*")
    digits = load_digits()
    features = digits.data.astype(np.float32)
    labels = digits.target.astype(int)
    rng = np.random.default_rng(7)
    owners = [ANNOTATORS[i % len(ANNOTATORS)][0] for i in range(len(labels))]
    sloppy = [i for i in range(len(labels)) if owners[i] == SLOPPY and rng.random() < 0.25]
    retracted = sorted(rng.choice(len(labels), size=25, replace=False).tolist())

    with EventStore.open(settings) as store:
        with step(f"registering {len(ANNOTATORS)} annotators (name and email encrypted by the SDK)"):
            for annotator_id, name, email in ANNOTATORS:
                store.append(
                    f"annotator-{annotator_id}",
                    Event("AnnotatorRegistered", {"annotator_id": annotator_id, "name": name, "email": email},
                          event_id=_event_id("register", annotator_id), actor=annotator_id),
                    NO_STREAM, reservations=[store.reserve_email(email)],
                )

        with step(f"streaming {len(labels)} digits through the SDK ({len(sloppy)} mislabelled)"), \
                bar("appending", total=len(labels), unit="ev") as advance:
            for i, (row, label) in enumerate(zip(features, labels)):
                given = (label + 1) % 10 if i in sloppy else label
                data = {"sample_id": f"digit-{i:04d}", "annotator_id": owners[i], "features": row.tolist(),
                        "label": int(given), "source": "sklearn.load_digits"}
                store.append(f"sample-{i:04d}", Event("SampleSubmitted", data, event_id=_event_id("submit", i),
                                                       actor=owners[i]), NO_STREAM)
                advance(1)

        with step(f"correcting {len(sloppy)} labels and retracting {len(retracted)} samples"), \
                bar("appending", total=len(sloppy) + len(retracted), unit="ev") as advance:
            for i in sloppy:
                reviewer = ANNOTATORS[(i + 1) % 3][0]
                data = {"sample_id": f"digit-{i:04d}", "annotator_id": reviewer,
                        "previous_label": int((labels[i] + 1) % 10), "label": int(labels[i]), "reason": "review"}
                store.append(f"sample-{i:04d}", Event("LabelCorrected", data, event_id=_event_id("correct", i),
                                                       actor=reviewer), 1)
                advance(1)
            for i in retracted:
                data = {"sample_id": f"digit-{i:04d}", "annotator_id": owners[i], "reason": "blurred scan"}
                store.append(f"sample-{i:04d}", Event("SampleRetracted", data, event_id=_event_id("retract", i),
                                                       actor=owners[i]))
                advance(1)

        with step("publishing the outbox to Kafka (idempotent producer, acks=all)"):
            sent = store.flush()
            print(f"    {sent} events published")

        with step("running the samples projection into PostgreSQL"):
            view = _project(settings)
            print(f"    view holds {view['samples']} samples and {view['annotators']} annotators "
                  f"({view['applied']} events applied)")

        with step("cutting a snapshot and verifying it against Kafka"):
            with bar("reading events", unit="rec") as advance:
                manifest = create_snapshot(store, advance)
            with bar("re-reading events", unit="rec") as advance:
                verification = verify_snapshot(store, manifest.snapshot_id, advance)
            print(f"    snapshot {manifest.snapshot_id}: {manifest.sample_count} samples, "
                  f"content hash {manifest.content_hash[:16]}…, verified ({verification.shards_checked} shards)")

        config = TrainConfig(epochs=epochs)
        with step("training on the snapshot"):
            with step_bar("training") as progress:
                run = train_snapshot(store, manifest.snapshot_id, config, progress=progress)
            print(f"    run {run.run_id} on {run.device}: held-out accuracy {run.heldout_accuracy:.4f}")

        with step("replaying the training from the recorded run"):
            with step_bar("replaying") as progress:
                outcome = replay_run(store, run.run_id, progress=progress)
            verdict = "identical" if outcome.identical else "DIFFERENT"
            print(f"    weights {verdict}: {outcome.original.weights_sha256[:16]}… vs {outcome.replay.weights_sha256[:16]}…")

        with step(f"audit: what did {FORGOTTEN} do, and which models saw it"):
            entries = subject_history(store, FORGOTTEN)  # personal fields stay ciphertext here
            print(f"    {len(entries)} events; the first five:")
            print_table([{**e.as_dict(), "summary": summarize(e.data, 48)} for e in entries[:5]],
                        ("position", "actor", "stream_id", "event_type", "kafka", "summary"))
            models = runs_of_snapshot(store, manifest.snapshot_id)
            print(f"    models trained on data they touched: {', '.join(r.run_id for r in models)}")

        _forget_step(step, store, settings)

        with step("audit: was the log tampered with? (the topic against the ledger)"):
            integrity = verify_log(store)
            for finding in integrity.findings:
                print(f"    {finding.kind}: {finding.detail}")
            print(f"    {integrity.events_checked} events, {integrity.records_read} records: "
                  f"{'intact' if integrity.intact else 'NOT intact'}")
    ok = run.heldout_accuracy >= 0.90 and outcome.identical and integrity.intact
    print(f"\ndemo {'finished' if ok else 'FAILED'}: accuracy {run.heldout_accuracy:.4f}, replay {verdict}, "
          f"log {'intact' if integrity.intact else 'NOT intact'}")
    return 0 if ok else 1


def _project(settings: Settings) -> dict[str, int]:
    """Catch the samples view up with the log; return what it now holds."""
    from projections.runner import ProjectionRunner
    from projections.samples import DEFAULT_SCHEMA, SamplesView

    with step_bar("projecting", unit="rec") as progress, ProjectionRunner(settings, SamplesView()) as runner:
        result = runner.catch_up(lambda done: progress(done.consumed, done.total))
    with postgres.connect(settings.database_url, autocommit=True) as conn:
        counts = conn.execute(
            f"SELECT (SELECT count(*) FROM {DEFAULT_SCHEMA}.samples), (SELECT count(*) FROM {DEFAULT_SCHEMA}.annotators),"
            f" (SELECT count(*) FROM {DEFAULT_SCHEMA}.annotators WHERE erased)"
        ).fetchone()
    assert counts is not None
    return {"samples": counts[0], "annotators": counts[1], "erased": counts[2], "applied": result.applied}


def _forget_step(step: Step, store: EventStore, settings: Settings) -> None:
    with step(f"forgetting {FORGOTTEN} (crypto-shredding)"):
        print(f"    dry run: {forget_subject(store, FORGOTTEN, reason='erasure request', dry_run=True)}")
        print(f"    {forget_subject(store, FORGOTTEN, reason='erasure request')}")
        view = _project(settings)
        print(f"    view: {view['annotators']} annotators, {view['erased']} erased, {view['samples']} samples kept")
        rows = []
        for annotator_id, _, _ in ANNOTATORS:
            data = store.read_stream(f"annotator-{annotator_id}")[0].data
            rows.append({"annotator": annotator_id, "name": _masked(data["name"]), "email": _masked(data["email"])})
        print("    the annotators, decrypted with the keyring after the erasure (masked for this printout):")
        print_table(rows, ("annotator", "name", "email"))


def _masked(value: str) -> str:
    """Show that a value decrypted without printing personal data: first and last character."""
    if value == REDACTED or len(value) < 3:
        return value
    return value[0] + "*" * (len(value) - 2) + value[-1]
