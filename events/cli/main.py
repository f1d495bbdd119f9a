"""The ``evp`` command. Each package registers its own subcommand group.

Groups are found through the ``evp.commands`` entry points, so this base layer never
imports the layers above it. A group is a callable ``register(subparsers)`` that adds its
parsers and sets ``func(args, settings) -> int`` on each.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from events.errors import EvpError
from events.settings import Settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evp", description="evp: an event-sourced data platform.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug output")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for entry in sorted(entry_points(group="evp.commands"), key=lambda e: e.name):
        try:
            register = entry.load()
        except ImportError as err:  # an optional extra (e.g. torch for the trainer) is not installed
            placeholder = subparsers.add_parser(entry.name, help=f"(unavailable: {err.name} is not installed)")
            placeholder.set_defaults(func=_unavailable(entry.name, str(err)))
            continue
        register(subparsers)
    return parser


def _unavailable(name: str, reason: str):  # type: ignore[no-untyped-def]
    def run(args: argparse.Namespace, settings: Settings) -> int:
        print(f"evp {name} needs an optional dependency: {reason} (install evp[trainer] or evp[demo])", file=sys.stderr)
        return 2

    return run


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # kafka-python warns about its own event loop on a busy machine; evp reports what matters.
        logging.getLogger("kafka").setLevel(logging.ERROR)
    try:
        return int(args.func(args, Settings.from_env()) or 0)
    except EvpError as err:
        print(f"evp: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
