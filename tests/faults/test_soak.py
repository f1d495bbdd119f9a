"""The soak's short form: one trial of every fault kind against the real services, with the oracle's table.

``make soak`` runs 200; this runs each kind once (the restarts of Kafka and PostgreSQL
included), so a window that is no longer hit, or a promise that no longer holds, fails
``make test``.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest

from events.settings import Settings
from tests.soak.soak import KINDS, POINTS, soak

pytestmark = pytest.mark.services


def test_one_trial_of_every_fault_kind_loses_nothing_and_hits_every_window(services: Settings, tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    out = io.StringIO()
    report = soak(services, tmp_path, trials=len(KINDS), minutes=None, seed=seed, out=out)
    table = report.table()
    print(f"soak seed {seed}\n{out.getvalue()}{table}")
    assert table["faults"] == {kind: 1 for kind in KINDS}, f"seed {seed}"
    assert (table["lost"], table["half-written"], table["duplicated effects"], table["wrong views"],
            table["order broken"]) == (0, 0, 0, 0, 0), f"seed {seed}: {out.getvalue()}"
    assert table["windows hit"] == f"{len(POINTS)} of {len(POINTS)}", f"seed {seed}: {out.getvalue()}"
    assert table["acknowledged appends"] > 0 and table["committed, unacknowledged"] > 0
    assert table["topic duplicates dropped"] > 0
    assert report.clean
