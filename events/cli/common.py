"""Small helpers the subcommands and scripts share: numbered steps, tables, JSON, points in time."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any
from uuid import UUID

from events.errors import ConfigurationError


def _default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (UUID, bytes)):
        return str(value) if isinstance(value, UUID) else value.hex()
    return str(value)


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, default=_default, sort_keys=True)
    sys.stdout.write("\n")


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A plain aligned table: readable in a terminal, stable for grep."""
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    print(format_table(rows, columns))


class Steps:
    """Numbered, timed steps for a long script: ``with steps("loading"): ...`` prints
    ``[1] loading`` before and ``done in 1.2s`` after, so a reader sees where time goes."""

    def __init__(self) -> None:
        self.number = 0

    @contextmanager
    def __call__(self, title: str) -> Iterator[None]:
        self.number += 1
        print(f"\n[{self.number}] {title}", flush=True)
        started = time.perf_counter()
        yield
        print(f"    done in {time.perf_counter() - started:.1f}s", flush=True)


# -- points of the log (time travel) -------------------------------------------------------
def parse_time(text: str, option: str = "--as-of") -> datetime:
    """``text`` as an ISO 8601 time (UTC when it names no zone); ConfigurationError naming ``option``."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as err:
        raise ConfigurationError(f"{option} {text!r} is not an ISO 8601 time (for example 2026-12-01T15:30:00+00:00)") from err
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def add_point_options(parser: argparse.ArgumentParser, what: str, time_option: str = "--as-of") -> None:
    """``--position P`` or ``time_option TIME`` (one at most): ``what`` as it was then."""
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--position", type=int, help=f"{what} as it was at this ledger position")
    when.add_argument(time_option, help=f"{what} as it was at this time (ISO 8601; events recorded at or before it)")


def point_of(args: argparse.Namespace, time_option: str = "--as-of") -> tuple[int | None, datetime | None]:
    """The ``(position, time)`` the options of :func:`add_point_options` name (None, None: none given)."""
    text = getattr(args, time_option.removeprefix("--").replace("-", "_"))
    position: int | None = args.position
    return position, parse_time(text, time_option) if text else None
