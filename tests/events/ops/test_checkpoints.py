"""Signed checkpoints: a history rewritten consistently in the ledger and the topic is found.

Without the audit key, an attacker who can write both copies can recompute every chain link;
what they cannot make is the signature on the heads the auditor checkpointed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from events.errors import ConfigurationError
from events.event import Event
from events.ops import checkpoints
from events.ops.integrity import verify_log
from events.settings import Settings
from events.store.client import EventStore
from tests.support.cli import verified
from tests.support.topics import make_ledger_agree, republish, topic_records

pytestmark = pytest.mark.services


def submit(store: EventStore, count: int, tag: str) -> None:
    for i in range(count):
        store.append(f"sample-{tag}{i}", Event("SampleSubmitted", {"sample_id": f"{tag}{i}", "annotator_id": "a1",
                                                                    "features": [float(i)] * 64, "label": i % 10}))
    store.flush()


@pytest.fixture
def key(tmp_path: Path) -> tuple[Ed25519PrivateKey, Path, Path]:
    private, public = checkpoints.generate_key(tmp_path / "auditor")
    return checkpoints.load_private_key(private), public, tmp_path / "witness"


def test_a_checkpointed_log_verifies_with_the_public_key(store: EventStore, key: tuple[Ed25519PrivateKey, Path, Path]) -> None:
    private, public, witness = key
    submit(store, 6, "a")
    made = checkpoints.make_checkpoint(store, private, witness)
    submit(store, 4, "b")  # after the checkpoint: chained, not yet signed
    report = verify_log(store, public_key=checkpoints.load_public_key(public), witness=witness)
    assert report.intact, report.findings
    assert report.checkpoints_checked == 1 and len(list((witness / store.settings.events_topic).iterdir())) == 1
    assert made.heads and all(h.offset >= 0 for h in made.heads.values())


def test_an_audit_key_is_never_overwritten(tmp_path: Path) -> None:
    checkpoints.generate_key(tmp_path)
    with pytest.raises(ConfigurationError, match="never overwritten"):
        checkpoints.generate_key(tmp_path)


def test_a_history_rewritten_in_both_copies_misses_the_signed_heads(store: EventStore, settings: Settings,
                                                                    key: tuple[Ed25519PrivateKey, Path, Path]) -> None:
    """Change one event in the ledger and on the topic and recompute every link: without the
    public key the log reads as intact; with it, each signed head after the change is named."""
    private, public, witness = key
    submit(store, 8, "r")
    made = checkpoints.make_checkpoint(store, private, witness)
    records = topic_records(settings)
    target = next(p for p, found in records.items() if len(found) >= 2)
    victim = records[target][0]
    forged = victim._replace(value=(victim.value or b"")[:-1] + bytes([(victim.value or b"\0")[-1] ^ 1]))
    sent = republish(settings, {p: [forged if m is victim else m for m in found] for p, found in records.items()},
                     rechain=True)
    make_ledger_agree(store.ledger.connection, sent)

    assert verified(store).intact, "both copies and every chain agree: only the signature can tell"
    report = verified(store, public_key=public, witness=witness)
    head = made.heads[target]
    assert [(f.kind, f.detail) for f in report.findings] == [(
        "rewritten", f"partition {target} offset {head.offset}, signed by checkpoint {made.id} (made at "
                     f"{made.made_at}): the record there has another link: the history up to it was rewritten")]
    assert report.records_read == sum(map(len, records.values())), "every record was read and checked"


def test_a_checkpoint_signed_with_another_key_is_named(store: EventStore, tmp_path: Path,
                                                       key: tuple[Ed25519PrivateKey, Path, Path]) -> None:
    _, public, witness = key
    submit(store, 3, "f")
    checkpoints.make_checkpoint(store, Ed25519PrivateKey.generate(), witness)  # not the auditor's key
    report = verify_log(store, public_key=checkpoints.load_public_key(public), witness=witness)
    assert [f.kind for f in report.findings] == ["checkpoint"] and "does not verify" in report.findings[0].detail
    assert report.checkpoints_checked == 0


def test_the_commands_make_and_check_a_checkpoint(store: EventStore, settings: Settings, tmp_path: Path) -> None:
    submit(store, 3, "c")
    env = {**settings.to_env(), "PATH": "/usr/bin:/bin", "EVP_AUDIT_WITNESS": str(tmp_path / "witness")}

    def evp(*arguments: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "events.cli", "audit", *arguments], capture_output=True,
                              text=True, env=env, cwd=tmp_path, timeout=120)

    assert evp("keygen", "--out", str(tmp_path / "k")).returncode == 0
    refused = evp("checkpoint")
    assert refused.returncode != 0 and "EVP_AUDIT_KEY_FILE" in refused.stderr
    made = evp("checkpoint", "--key", str(tmp_path / "k" / "audit-key.pem"), "--json")
    assert made.returncode == 0, made.stderr
    verified = evp("verify", "--public-key", str(tmp_path / "k" / "audit-key.pub"), "--json")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    result = json.loads(verified.stdout)
    assert result["intact"] and result["checkpoints_checked"] == 1


def test_a_proof_shows_one_event_in_a_signed_head_and_fails_when_anything_changes(
        store: EventStore, settings: Settings, tmp_path: Path, key: tuple[Ed25519PrivateKey, Path, Path]) -> None:
    private, public, witness = key
    submit(store, 5, "p")
    store.ledger.connection.execute("INSERT INTO evp_outbox (position, partition) SELECT position, partition"
                                    " FROM evp_events WHERE stream_id = 'sample-p1'")
    store.flush()  # a re-publication in between: the chain goes on through it
    submit(store, 5, "q")
    checkpoints.make_checkpoint(store, private, witness)
    event = store.read_stream("sample-p2", decrypt=False)[0].record
    proof = checkpoints.prove(store, str(event.event_id), witness)
    verifier = checkpoints.load_public_key(public)
    assert proof.check(verifier) is None and proof.record.value == event.value
    again = checkpoints.Proof.from_json(proof.to_json())
    assert again.check(verifier) is None, "the proof survives its JSON form"

    changed = replace(proof, record=proof.record._replace(value=(proof.record.value or b"") + b"\x00"))
    assert "record was changed" in (changed.check(verifier) or "")
    if proof.following:
        shortened = replace(proof, following=proof.following[1:])
        assert "does not reach the signed head" in (shortened.check(verifier) or "")
    assert "signature" in (proof.check(Ed25519PrivateKey.generate().public_key()) or "")

    path = tmp_path / "proof.json"
    path.write_text(proof.to_json(), encoding="utf-8")
    offline = subprocess.run([sys.executable, "-m", "events.cli", "audit", "check-proof", str(path), "--public-key",
                              str(public)], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"},
                             cwd=tmp_path, timeout=60)
    assert offline.returncode == 0 and "proof holds" in offline.stdout, offline.stdout + offline.stderr


def test_a_damaged_witness_file_is_a_finding_not_a_crash(store: EventStore,
                                                         key: tuple[Ed25519PrivateKey, Path, Path]) -> None:
    private, public, witness = key
    submit(store, 3, "w")
    checkpoints.make_checkpoint(store, private, witness)
    [kept] = list((witness / store.settings.events_topic).iterdir())
    (kept.parent / "checkpoint-damaged.json").write_text(kept.read_text()[:-40], encoding="utf-8")
    report = verify_log(store, public_key=checkpoints.load_public_key(public), witness=witness)
    assert [f.kind for f in report.findings] == ["checkpoint"], report.findings
    assert report.checkpoints_checked == 1, "the intact checkpoint still counts"


# -- truncation after the last checkpoint ---------------------------------------------------------
def published_after(store: EventStore, position: int) -> list[tuple[str, str, int, int, int]]:
    """(event id, stream, version, partition, offset) of each event published past ledger ``position``."""
    rows = store.ledger.connection.execute(
        "SELECT event_id::text, stream_id, version, partition, kafka_offset FROM evp_event_log WHERE position > %s"
        " ORDER BY partition, kafka_offset", (position,)).fetchall()
    return [(str(e), str(s), int(v), int(p), int(o)) for e, s, v, p, o in rows]


def drop_from_ledger(store: EventStore, position: int) -> None:
    """Delete every event past ledger ``position``, as if the ledger had never recorded them."""
    for table in ("evp_published", "evp_events"):
        store.ledger.connection.execute(f"DELETE FROM {table} WHERE position > %s", (position,))


def checkpoint_position(store: EventStore) -> int:
    """The ledger position of the newest AuditCheckpointed event."""
    return store.read_stream(checkpoints.CHECKPOINT_STREAM, decrypt=False)[-1].record.position


def test_a_topic_truncated_after_the_last_checkpoint_is_named_per_partition(
        store: EventStore, settings: Settings, key: tuple[Ed25519PrivateKey, Path, Path]) -> None:
    """The signed heads are still there; the ledger recorded offsets past each partition's new end."""
    private, public, witness = key
    submit(store, 6, "t")
    made = checkpoints.make_checkpoint(store, private, witness)
    submit(store, 6, "u")
    signed = {p: h.offset for p, h in made.heads.items()}
    republish(settings, {p: [m for m in found if m.offset <= signed[p]]
                         for p, found in topic_records(settings).items() if p in signed})
    gone = [row for row in published_after(store, -1) if row[4] > signed.get(row[3], -1)]
    report = verified(store, public_key=public, witness=witness)
    expected = []
    for partition in sorted({row[3] for row in gone}):
        lost = [row for row in gone if row[3] == partition]
        event_id, stream, version, _, offset = lost[0]
        expected.append(("truncated", f"partition {partition} ends at offset {signed.get(partition, -1) + 1}, but the "
                                      f"ledger recorded {len(lost)} published event(s) at or after it (first: "
                                      f"{event_id}, {stream} v{version} at offset {offset})"))
    assert [(f.kind, f.detail) for f in report.findings] == expected
    assert report.checkpoints_checked == 1 and len(gone) == 7, "the six events after it and the checkpoint's own"


def test_a_ledger_truncated_after_the_last_checkpoint_leaves_each_record_forged(
        store: EventStore, key: tuple[Ed25519PrivateKey, Path, Path]) -> None:
    private, public, witness = key
    submit(store, 6, "t")
    checkpoints.make_checkpoint(store, private, witness)
    submit(store, 6, "u")
    position = checkpoint_position(store)
    gone = published_after(store, position)
    drop_from_ledger(store, position)
    report = verified(store, public_key=public, witness=witness)
    assert [(f.kind, f.detail) for f in report.findings] == [
        ("forged", f"partition {p} offset {o}: event {e} of stream {s!r} is not in the ledger")
        for e, s, _, p, o in gone]
    assert len(gone) == 6 and report.checkpoints_checked == 1 and report.records_read == 13


def test_both_copies_truncated_at_the_signed_heads_leave_the_witness_to_tell(
        store: EventStore, settings: Settings, key: tuple[Ed25519PrivateKey, Path, Path]) -> None:
    """Cut back to the heads, the checkpoint's own event goes too: only the witness still holds it."""
    private, public, witness = key
    submit(store, 6, "t")
    made = checkpoints.make_checkpoint(store, private, witness)
    submit(store, 3, "u")
    signed = {p: h.offset for p, h in made.heads.items()}
    republish(settings, {p: [m for m in found if m.offset <= signed[p]]
                         for p, found in topic_records(settings).items() if p in signed})
    drop_from_ledger(store, checkpoint_position(store) - 1)
    assert verified(store, public_key=public).intact, "without the witness, nothing past the signed heads is missed"
    report = verified(store, public_key=public, witness=witness)
    assert [(f.kind, f.detail) for f in report.findings] == [
        ("missing", f"checkpoint {made.id} (made at {made.made_at}) is in the witness folder but not in the log")]
    assert report.checkpoints_checked == 1 and report.records_read == 6
