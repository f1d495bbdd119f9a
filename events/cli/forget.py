"""``evp forget SUBJECT``, ``evp forget --dry-run SUBJECT`` and ``evp forget --report SUBJECT``.

- ``--dry-run``: what the erasure would touch and what its hooks would purge (the shard
  files of snapshots holding their plaintext), then the subject's lineage (every place that
  holds their data, with counts and states); changes nothing;
- ``--report``: the lineage alone, as it is now: before an erasure the same places as the
  dry run, after it each one's state (unreadable, redacted, or still plaintext and what to
  do about it); changes nothing;
- neither: the erasure itself, then the purges of the ``evp.erasure`` hooks
  (:mod:`events.ops.erasure`), one line each (``--json``: ``"purges"``).

The lineage comes from the ``evp.lineage`` entry points (:mod:`events.ops.lineage`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import asdict

from events.cli.common import format_table, print_json
from events.ops.erasure import PURGED
from events.ops.forget import forget_subject
from events.ops.lineage import Holding, Lineage, collect_lineage
from events.project import find_project
from events.settings import Settings
from events.store.client import EventStore

_COLUMNS = ("where", "kind", "count", "state", "detail")
_LABEL = len("snapshot")  #: the widest place kind, so that names line up


def _forget(args: argparse.Namespace, settings: Settings) -> int:
    project = find_project(settings)
    if args.report:
        now = collect_lineage(settings, project, args.subject)
        if args.json:
            print_json(now.to_json())
        else:
            print(format_lineage(now))
        return 0
    with EventStore.open(settings) as store:
        report = forget_subject(store, args.subject, reason=args.reason, dry_run=args.dry_run, project=project)
    lineage = collect_lineage(settings, project, args.subject) if args.dry_run else None
    if args.json:
        print_json(asdict(report) | ({"lineage": lineage.to_json()} if lineage is not None else {}))
        return 0
    print(report)
    if lineage is not None:
        print(format_lineage(lineage, purging=[p.where for p in report.purges if p.state == PURGED]))
    else:
        print(f"what holds their data now, and in which state: evp forget --report {args.subject}")
    return 0


def format_lineage(lineage: Lineage, purging: Sequence[str] = ()) -> str:
    """The lineage as text: one aligned line per holding, then what no erasure reaches and who was not asked.

    ``purging`` names the places the erasure's hooks would purge (a dry run): they are said
    to be purged, not out of reach.
    """
    lines = [f"lineage of {lineage.subject_id} (sources: {', '.join(lineage.sources) or 'none'})"]
    if lineage.holdings:
        rows = [{**h.to_json(), "where": _place(h)} for h in lineage.holdings]
        lines += ["  " + line for line in format_table(rows, _COLUMNS).splitlines()]
    else:
        lines.append("  nothing held")
    unreached = list(dict.fromkeys(h.where for h in lineage.unreached))
    purged = [w for w in unreached if w in purging]
    if purged:
        lines.append(f"the erasure would purge on this machine (copies elsewhere stay): {', '.join(purged)}")
    if len(purged) < len(unreached):
        places = ", ".join(w for w in unreached if w not in purging)
        lines.append(f"out of any erasure's reach (plaintext, or derived from it): {places}")
    for name, reason in lineage.unavailable.items():
        lines.append(f"not looked at: source {name} ({reason})")
    return "\n".join(lines)


def _place(holding: Holding) -> str:
    label, _, name = holding.where.partition(" ")
    return f"{label:<{_LABEL}} {name}" if name else label


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("forget", help="erase a data subject by destroying their data key")
    parser.add_argument("subject")
    parser.add_argument("--reason", default="erasure request", help="recorded with the erasure (no personal data)")
    looking = parser.add_mutually_exclusive_group()
    looking.add_argument("--dry-run", action="store_true",
                         help="report what the erasure touches and where their data is; change nothing")
    looking.add_argument("--report", action="store_true",
                         help="where their data is now and in which state (before or after the erasure); change nothing")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=_forget)
