"""Poison at scale: mutated records among valid ones, two runners scaling out, and the oracle's table.

    python bench/poison.py [--records N] [--seed S] [--huge H]       (make poison)

Writes N mutated records (default 10,000) straight to the events topic of a throwaway
database and topic prefix, mixed with about as many valid events appended through the SDK,
while two ``evp projections run samples --scale-out`` processes fold the view; then checks
what must hold (``tests/support/poison.py``: every mutated record dead-lettered exactly once
with its reason and source partition and offset, nothing valid dead-lettered, the view equal
to an independent fold of the valid records, the runners never stopped, ``dlq list`` and
``dlq replay --all`` see and re-drive every dead letter) and prints one table: records by
kind, dead-lettered, applied, view equal, wall time. The seed is printed first; the same seed
writes the same records. ``--huge H`` of the oversized records are over the runners' fetch
size (9 MiB; the topic's limit is raised for them). Exit status 1 when the oracle finds
anything.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

from _support import throwaway  # noqa: E402  (also puts the repo on sys.path)
from events.settings import Settings
from tests.support.poison import run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--records", type=int, default=10_000, help="mutated records to write (default 10,000)")
    parser.add_argument("--seed", type=int, default=None, help="reproduce a run (default: a random seed, printed first)")
    parser.add_argument("--huge", type=int, default=2, help="oversized records over the runners' fetch size (default 2)")
    parser.add_argument("--batch-size", type=int, default=1000, help="records per runner transaction (default 1000)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    print(f"seed {seed}", flush=True)
    with throwaway(Settings.from_env()) as settings, tempfile.TemporaryDirectory() as logs:
        report = run(settings, records=args.records, seed=seed, logs=Path(logs), huge=args.huge,
                     batch_size=args.batch_size, timeout_s=1200)
        print(report.table())
        problems = report.problems()
        for problem in problems:
            print(f"PROBLEM: {problem}")
        if problems:
            for log in sorted(Path(logs).glob("runner-*.log")):
                print(f"--- {log.name} (tail)\n{log.read_text()[-2000:]}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
