"""``evp projections ACTION NAME``: views by their evp.toml name (or module:Class), errors naming them."""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from events.errors import ConfigurationError
from events.settings import Settings
from events.store.client import EventStore
from projections import cli
from tests.support.views import ExpectedSamples, random_ops, registered

pytestmark = pytest.mark.services


@pytest.fixture
def evp(settings: Settings, capsys: pytest.CaptureFixture[str]) -> Any:
    parser = argparse.ArgumentParser(prog="evp")
    cli.register(parser.add_subparsers(dest="command", required=True))

    def run(*argv: str, json_out: bool = True, where: Settings = settings) -> Any:
        args = parser.parse_args(["projections", *argv, *(["--json"] if json_out else [])])
        assert args.func(args, where) == 0
        out = capsys.readouterr().out
        return json.loads(out) if json_out else out

    return run


def test_catch_up_status_and_rebuild_by_name(store: EventStore, evp: Any) -> None:
    expected = ExpectedSamples()
    random_ops(random.Random(8), store, expected, "x", 20)
    store.append("annotator-a1", registered("a1"))
    store.flush()
    total = sum(expected.versions.values()) + 1

    before = evp("status", "samples")
    assert before["schema"] == "samples_view" and sum(p["lag"] for p in before["partitions"]) == total
    assert evp("catch-up", "samples")["applied"] == total  # records of other types count as applied (and ignored)
    assert all(p["lag"] == 0 for p in evp("status", "samples")["partitions"])
    assert evp("rebuild", "samples")["rows"] == {"samples": len(expected.rows)}
    assert evp("catch-up", "digits.views:AnnotatorsView")["applied"] == total + 1  # + the rebuild's own event
    assert evp("rebuild", "digits.views:AnnotatorsView")["rows"] == {"annotators": 1}, "a module:Class spec works as a name"
    assert "roles ready on annotators_view" in evp("grant", "annotators", json_out=False)


def test_an_unknown_view_is_named_with_the_declared_ones(evp: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"no view named 'nope' \(declared: annotators, samples\)"):
        evp("status", "nope")
    with pytest.raises(ConfigurationError, match="view 'events.event:Event' is .* not a projections.view.View subclass"):
        evp("status", "events.event:Event")


def test_without_a_project_the_command_says_it_needs_one(
    evp: Any, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError, match="evp projections status needs a project"):
        evp("status", "samples", where=settings.with_(project=None))


def test_the_module_entry_point_reports_errors_naming_the_view(settings: Settings) -> None:
    env = {**settings.to_env(), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "projections.cli", "catch-up", "missing"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1
    assert "evp projections: error:" in done.stderr and "no view named 'missing'" in done.stderr
