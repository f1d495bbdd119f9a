"""``evp services up|down|status``: the local runner in ``platform/services.py``.

The runner is a stdlib-only script (it must run before any virtual environment exists),
so this command only finds it and hands over.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from events.errors import ConfigurationError
from events.settings import Settings


def runner_path() -> Path:
    """``platform/services.py`` of the checkout evp runs from (or ``$EVP_PLATFORM_DIR``)."""
    configured = os.environ.get("EVP_PLATFORM_DIR")
    folder = Path(configured) if configured else Path(__file__).resolve().parents[1] / "platform"
    script = folder / "services.py"
    if not script.is_file():
        raise ConfigurationError(
            f"the local service runner is not at {script}: `evp services` works from a source checkout; "
            "point EVP_PLATFORM_DIR at its platform/ folder, or set EVP_KAFKA and EVP_DATABASE_URL to your own services"
        )
    return script


def _run(args: argparse.Namespace, settings: Settings) -> int:
    unknown = sorted(set(args.names) - {"kafka", "postgres"})
    if unknown:
        raise ConfigurationError(f"unknown service {', '.join(unknown)}: choose kafka or postgres")
    command = [sys.executable, str(runner_path()), args.action, *args.names]
    return subprocess.call(command)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("services", help="start, stop or inspect the local Kafka and PostgreSQL")
    parser.add_argument("action", choices=["up", "down", "status", "restart", "kill"])
    parser.add_argument("names", nargs="*", metavar="SERVICE", help="kafka and/or postgres (default: both)")
    parser.set_defaults(func=_run)
