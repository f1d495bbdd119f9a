"""``evp audit stream ID`` and ``evp audit subject ID``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from events.errors import ConfigurationError
from events.ops import checkpoints
from events.ops.audit import AuditEntry, stream_history, subject_history, summarize
from events.cli.common import print_json, print_table
from events.store.client import EventStore
from events.settings import Settings

COLUMNS = ("position", "recorded_at", "actor", "stream_id", "version", "event_type", "kafka", "summary")


def _show(entries: list[AuditEntry], as_json: bool) -> int:
    if as_json:
        print_json([e.as_dict() for e in entries])
    else:
        rows = [{**e.as_dict(), "recorded_at": e.recorded_at[:19], "summary": summarize(e.data)} for e in entries]
        print_table(rows, COLUMNS)
    return 0


def _stream(args: argparse.Namespace, settings: Settings) -> int:
    with EventStore.open(settings) as store:
        return _show(stream_history(store, args.id, decrypt=args.decrypt), args.json)


def _subject(args: argparse.Namespace, settings: Settings) -> int:
    with EventStore.open(settings) as store:
        return _show(subject_history(store, args.id, decrypt=args.decrypt), args.json)


def _path(value: str | None, variable: str) -> Path | None:
    chosen = value or os.environ.get(variable)
    return Path(chosen) if chosen else None


def _verify(args: argparse.Namespace, settings: Settings) -> int:
    from events.ops.integrity import verify_log

    public = _path(args.public_key, "EVP_AUDIT_PUBLIC_KEY_FILE")
    witness = _path(args.witness, "EVP_AUDIT_WITNESS")
    with EventStore.open(settings) as store:
        report = verify_log(store, public_key=checkpoints.load_public_key(public) if public else None, witness=witness)
    if args.json:
        print_json({"intact": report.intact, "records_read": report.records_read, "events_checked": report.events_checked,
                    "checkpoints_checked": report.checkpoints_checked, "findings": [f.__dict__ for f in report.findings]})
    else:
        for finding in report.findings:
            print(f"{finding.kind:9} {finding.detail}")
        verdict = "intact: the topic and the ledger agree" if report.intact else f"{len(report.findings)} findings"
        signed = (f", {report.checkpoints_checked} signed checkpoint(s) reached" if public
                  else " (no audit public key: signed checkpoints not checked)")
        print(f"{report.events_checked} ledger events, {report.records_read} topic records{signed}: {verdict}")
    return 0 if report.intact else 1


def _keygen(args: argparse.Namespace, settings: Settings) -> int:
    private, public = checkpoints.generate_key(Path(args.out))
    print(f"audit key written: {private} (private: keep it off the database and broker hosts) and {public} (public)")
    return 0


def _checkpoint(args: argparse.Namespace, settings: Settings) -> int:
    key_path = _path(args.key, "EVP_AUDIT_KEY_FILE")
    witness = _path(args.witness, "EVP_AUDIT_WITNESS")
    if key_path is None or witness is None:
        raise ConfigurationError("a checkpoint needs the audit key (--key or EVP_AUDIT_KEY_FILE) and a witness folder "
                                 "outside the database and the broker (--witness or EVP_AUDIT_WITNESS)")
    with EventStore.open(settings) as store:
        made = checkpoints.make_checkpoint(store, checkpoints.load_private_key(key_path), witness)
    heads = {p: {"offset": h.offset, "link": h.link} for p, h in made.heads.items()}
    if args.json:
        print_json({"id": made.id, "made_at": made.made_at, "heads": heads, "signature": made.signature})
    else:
        print(f"checkpoint {made.id} signed at {made.made_at}: " +
              ", ".join(f"partition {p} at offset {h['offset']}" for p, h in sorted(heads.items())))
    return 0


def _prove(args: argparse.Namespace, settings: Settings) -> int:
    with EventStore.open(settings) as store:
        proof = checkpoints.prove(store, args.event_id, _path(args.witness, "EVP_AUDIT_WITNESS"))
    if args.out:
        Path(args.out).write_text(proof.to_json() + "\n", encoding="utf-8")
        print(f"proof for event {args.event_id} (partition {proof.record.partition} offset {proof.record.offset}, "
              f"{len(proof.following)} links to checkpoint {proof.checkpoint.id}) written to {args.out}")
    else:
        print(proof.to_json())
    return 0


def _check_proof(args: argparse.Namespace, settings: Settings) -> int:
    proof = checkpoints.Proof.from_json(Path(args.proof).read_text(encoding="utf-8"))
    public = _path(args.public_key, "EVP_AUDIT_PUBLIC_KEY_FILE")
    if public is None:
        raise ConfigurationError("checking a proof needs the audit public key (--public-key or EVP_AUDIT_PUBLIC_KEY_FILE)")
    failure = proof.check(checkpoints.load_public_key(public))
    where = f"{proof.record.topic} partition {proof.record.partition} offset {proof.record.offset}"
    if failure is None:
        print(f"proof holds: the record at {where} is in checkpoint {proof.checkpoint.id} signed at "
              f"{proof.checkpoint.made_at}")
        return 0
    print(f"proof FAILS for the record at {where}: {failure}")
    return 1


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("audit", help="who changed what, when, in order")
    group = parser.add_subparsers(dest="audit_command", metavar="QUERY", required=True)
    for name, func, help_text in (
        ("stream", _stream, "every event of one stream"),
        ("subject", _subject, "every event holding or made by one data subject"),
    ):
        query = group.add_parser(name, help=help_text)
        query.add_argument("id")
        query.add_argument("--json", action="store_true", help="machine-readable output")
        query.add_argument("--decrypt", action="store_true", help="decrypt personal fields (needs the keyring)")
        query.set_defaults(func=func)
    verify = group.add_parser("verify", help="was the log tampered with? the chains, the signed checkpoints, both copies")
    verify.add_argument("--json", action="store_true")
    verify.add_argument("--public-key", help="the audit public key (default: EVP_AUDIT_PUBLIC_KEY_FILE): check signed checkpoints")
    verify.add_argument("--witness", help="the witness folder (default: EVP_AUDIT_WITNESS): checkpoints kept outside the log")
    verify.set_defaults(func=_verify)
    keygen = group.add_parser("keygen", help="make the auditor's Ed25519 key pair (audit-key.pem, audit-key.pub)")
    keygen.add_argument("--out", required=True, help="folder for the two files (never the database's or broker's host)")
    keygen.set_defaults(func=_keygen)
    checkpoint = group.add_parser("checkpoint", help="sign every partition's chain head; record it and witness it")
    checkpoint.add_argument("--key", help="the audit private key (default: EVP_AUDIT_KEY_FILE)")
    checkpoint.add_argument("--witness", help="where the signed checkpoint is also written (default: EVP_AUDIT_WITNESS)")
    checkpoint.add_argument("--json", action="store_true")
    checkpoint.set_defaults(func=_checkpoint)
    prove = group.add_parser("prove", help="a proof that one event is in a signed checkpoint, checkable offline")
    prove.add_argument("event_id")
    prove.add_argument("--witness", help="the witness folder (default: EVP_AUDIT_WITNESS)")
    prove.add_argument("--out", help="write the proof to this file (default: print it)")
    prove.set_defaults(func=_prove)
    check = group.add_parser("check-proof", help="check a proof with the audit public key alone (no database, no broker)")
    check.add_argument("proof")
    check.add_argument("--public-key", help="the audit public key (default: EVP_AUDIT_PUBLIC_KEY_FILE)")
    check.set_defaults(func=_check_proof)
