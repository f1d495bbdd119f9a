"""Running the ``evp`` command in the test's own process, against one test's settings."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass

from events.cli.main import main
from events.settings import Settings


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
