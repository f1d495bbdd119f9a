"""The main job runs end to end: accuracy, identical replay, erasure, an intact log."""

from __future__ import annotations

import pytest

from events.settings import Settings
from trainer.demo import FORGOTTEN, run_demo

pytestmark = pytest.mark.services


def test_the_demo_runs_end_to_end(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_demo(settings, epochs=40) == 0
    out = capsys.readouterr().out
    assert "weights identical" in out
    assert f"erasure of {FORGOTTEN} touched" in out and "1 erased" in out
    assert "[erased]" in out and ": intact" in out
    assert "demo finished" in out
