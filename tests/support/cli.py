"""Running the ``evp`` command in the test's own process, against one test's settings."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

from events.cli.main import main
from events.ops.checkpoints import load_public_key
from events.ops.integrity import IntegrityReport, verify_log
from events.settings import Settings
from events.store.client import EventStore


@dataclass(frozen=True)
class Outcome:
    code: int
    out: str
    err: str


@contextmanager
def environment(settings: Settings) -> Iterator[None]:
    """``os.environ`` with every ``EVP_*`` variable replaced by those of ``settings``, restored after."""
    saved = dict(os.environ)
    try:
        for name in [n for n in os.environ if n.startswith("EVP_")]:
            del os.environ[name]
        os.environ.update(settings.to_env())
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def evp(settings: Settings, *argv: str) -> Outcome:
    """``evp ARGV`` through :func:`events.cli.main.main`: its exit status and what it printed."""
    out, err = io.StringIO(), io.StringIO()
    with environment(settings), redirect_stdout(out), redirect_stderr(err):
        code = main(list(argv))
    return Outcome(code, out.getvalue(), err.getvalue())


def verified(store: EventStore, *, public_key: Path | None = None, witness: Path | None = None) -> IntegrityReport:
    """:func:`verify_log`'s report, once `evp audit verify --json` was found to say the same: the same
    findings, in order, and exit status 1 with any finding (0 without)."""
    report = verify_log(store, public_key=None if public_key is None else load_public_key(public_key), witness=witness)
    options = [*(["--public-key", str(public_key)] if public_key else []),
               *(["--witness", str(witness)] if witness else [])]
    outcome = evp(store.settings, "audit", "verify", "--json", *options)
    printed = json.loads(outcome.out)
    assert [(f["kind"], f["detail"]) for f in printed["findings"]] == [(f.kind, f.detail) for f in report.findings]
    assert outcome.code == (0 if report.intact else 1) and printed["intact"] is report.intact, outcome
    return report
