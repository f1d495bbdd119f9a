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

from events.adapters.kafka import producer
from events.errors import ConfigurationError
from events.event import Event
from events.ops import checkpoints
from events.ops.integrity import verify_log
from events.settings import Settings
from events.store.chain import GENESIS, HEADER_CHAIN, link, record_digest
from events.store.client import EventStore
from events.store.log import end_offsets, read_pinned
from tests.support.topics import recreate_events_topic

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
    checkpoints.make_checkpoint(store, private, witness)
    ends = end_offsets(settings, settings.events_topic)
    records = {p: list(read_pinned(settings, settings.events_topic, {p: (0, e)})) for p, e in ends.items() if e}
    target = next(p for p, found in records.items() if len(found) >= 2)
    victim = records[target][0]
    forged_value = victim.value[:-1] + bytes([victim.value[-1] ^ 1])
    conn = store.ledger.connection
    recreate_events_topic(settings)
    kafka = producer(settings)
    heads: dict[int, tuple[int, bytes]] = {}
    for partition, found in sorted(records.items()):
        previous = GENESIS
        for message in found:
            value = forged_value if message is victim else message.value
            headers = [(k, v) for k, v in message.headers if k != HEADER_CHAIN]
            previous = link(previous, record_digest(message.key, value, headers))
            sent = kafka.send(settings.events_topic, key=message.key, value=value, partition=partition,
                              headers=[*headers, (HEADER_CHAIN, previous.hex().encode())]).get(timeout=30)
            conn.execute("UPDATE evp_published SET chain = %s WHERE position = %s",
                         (previous, int(dict(message.headers)["evp.position"])))
            heads[partition] = (sent.offset, previous)
    kafka.close()
    conn.execute("UPDATE evp_events SET value = %s WHERE position = %s",
                 (forged_value, int(dict(victim.headers)["evp.position"])))
    for partition, (offset, chained) in heads.items():
        conn.execute("UPDATE evp_chain_heads SET kafka_offset = %s, chain = %s WHERE partition = %s",
                     (offset, chained, partition))

    assert verify_log(store).intact, "both copies and every chain agree: only the signature can tell"
    report = verify_log(store, public_key=checkpoints.load_public_key(public), witness=witness)
    assert {f.kind for f in report.findings} == {"rewritten"}, report.findings
    assert any(f.detail.startswith(f"partition {target} offset ") for f in report.findings)


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
