"""``evp audit stream ID`` and ``evp audit subject ID``."""

from __future__ import annotations

import argparse

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


def _verify(args: argparse.Namespace, settings: Settings) -> int:
    from events.ops.integrity import verify_log

    with EventStore.open(settings) as store:
        report = verify_log(store)
    if args.json:
        print_json({"intact": report.intact, "records_read": report.records_read,
                    "events_checked": report.events_checked, "findings": [f.__dict__ for f in report.findings]})
    else:
        for finding in report.findings:
            print(f"{finding.kind:8} {finding.detail}")
        verdict = "intact: the topic and the ledger agree" if report.intact else f"{len(report.findings)} findings"
        print(f"{report.events_checked} ledger events, {report.records_read} topic records: {verdict}")
    return 0 if report.intact else 1


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
    verify = group.add_parser("verify", help="was the log tampered with? compare the topic with the ledger")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(func=_verify)
