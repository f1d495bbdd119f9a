"""Recorded runs replay to identical weights; a changed recipe or dataset refuses to replay; CLI."""

from __future__ import annotations

import argparse
import json
import uuid
from pathlib import Path

import pytest

from events.errors import ConfigurationError
from events.event import Event
from events.project import Project
from events.settings import Settings
from events.store.client import EventStore
from tests.support.examples import DIGITS, project
from tests.support.training import digits
from tests.trainer.regression import Linear, diabetes
from trainer import cli
from trainer.recipe import load_recipe
from trainer.runs import ReplayRefused, load_run, replay_run, runs_of_snapshot, train_snapshot
from trainer.snapshot import create_snapshot, load_dataset
from trainer.training import train

PROJECT = project(DIGITS)


def fill(store: EventStore, rows: int = 300) -> str:
    table = digits()
    for i in range(rows):
        store.append(f"sample-{i}", Event("SampleSubmitted", {
            "sample_id": table.row_ids[i], "annotator_id": "a1", "features": table["features"][i].tolist(),
            "label": int(table["label"][i])}))
    return create_snapshot(store, load_dataset(PROJECT, "digits")).snapshot_id


@pytest.mark.services
def test_replay_gives_identical_weights_and_is_recorded(store: EventStore) -> None:
    snapshot = fill(store)
    recipe = load_recipe(PROJECT, "mlp")
    config = recipe.parse_config(["epochs=3", "device=cpu"])
    run = train_snapshot(store, PROJECT, recipe, snapshot, config)
    outcome = replay_run(store, PROJECT, run.run_id)

    assert outcome.identical and outcome.differences() == []
    assert outcome.replay.run_id != run.run_id and outcome.replay.replay_of == run.run_id
    assert load_run(store, run.run_id) == run
    assert (run.recipe, run.dataset) == ("digits.recipes:MLP", "digits.datasets:Digits")
    assert set(run.code_digest) == {"digits.recipes", "digits.datasets"} and set(run.metrics) == {"accuracy"}
    assert store.read_stream(f"training-{run.run_id}")[0].record.actor == store.settings.actor
    assert {r.run_id for r in runs_of_snapshot(store, snapshot)} == {run.run_id, outcome.replay.run_id}
    # a different seed is a different model: the comparison is not trivially true
    other = train_snapshot(store, PROJECT, recipe, snapshot, recipe.parse_config(["epochs=3", "device=cpu",
                                                                                  "seed=99"]))
    assert other.weights_sha256 != run.weights_sha256


def lab_project(tmp_path: Path) -> tuple[Project, Path, str]:
    """A team's own project: its recipe lives in a module of its own, which the test then edits."""
    package = f"lab_{uuid.uuid4().hex[:8]}"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    source = tmp_path / package / "recipes.py"
    source.write_text("from digits.recipes import MLP\n\n\nclass Small(MLP):\n    pass\n")
    (tmp_path / "evp.toml").write_text(
        f'[project]\nname = "lab"\nschemas = ["{DIGITS / "schemas"}"]\n\n'
        f'[datasets]\ndigits = "digits.datasets:Digits"\n\n[recipes]\nsmall = "{package}.recipes:Small"\n'
    )
    return Project.read(tmp_path), source, f"{package}.recipes"


@pytest.mark.services
def test_replay_is_refused_when_the_recipes_code_changed_naming_the_module(store: EventStore, tmp_path: Path) -> None:
    snapshot = fill(store, 120)
    lab, source, module = lab_project(tmp_path)
    recipe = load_recipe(lab, "small")
    run = train_snapshot(store, lab, recipe, snapshot, recipe.parse_config(["epochs=2", "device=cpu"]))
    assert set(run.code_digest) == {module, "digits.datasets"}

    source.write_text(source.read_text() + "# tuned\n")
    with pytest.raises(ReplayRefused, match=f"code changed since it was recorded: {module} .*--allow-code-change"):
        replay_run(store, lab, run.run_id)
    outcome = replay_run(store, lab, run.run_id, allow_code_change=True)
    assert outcome.identical  # a comment changes no weight, but the record says the code moved
    assert outcome.differences() == [f"code of module {module} changed"]


def test_a_regression_recipe_trains_and_replays_bit_for_bit() -> None:
    recipe = Linear()
    config = recipe.default_config()
    first, second = train(recipe, diabetes(), config), train(recipe, diabetes(), config)
    assert first.weights_sha256 == second.weights_sha256
    assert set(first.metrics) == {"r2", "rmse"}
    assert first.metrics["r2"] > 0.3 and first.metrics["rmse"] < 65  # the target's std is 77


def test_a_recipe_refuses_a_table_without_its_columns() -> None:
    from events.errors import InvalidDataset

    with pytest.raises(InvalidDataset, match="reads column 'target' as its target; the snapshot has"):
        train(Linear(), digits(), Linear().default_config())


def test_a_project_declaration_that_is_no_recipe_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="not a subclass of trainer.recipe.Recipe"):
        load_recipe(PROJECT, "digits.datasets:Digits")


def run_cli(settings: Settings, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="evp")
    commands = parser.add_subparsers(dest="command", required=True)
    for register in (cli.register_snapshot, cli.register_train, cli.register_replay):
        register(commands)
    args = parser.parse_args(argv)
    return int(args.func(args, settings))


@pytest.mark.services
def test_the_commands_cut_verify_train_and_replay(store: EventStore, settings: Settings,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(80):
        store.append(f"sample-{i}", Event("SampleSubmitted", {
            "sample_id": f"d{i:03d}", "annotator_id": "a1", "features": digits()["features"][i].tolist(),
            "label": int(digits()["label"][i])}))
    store.flush()
    assert run_cli(settings, "snapshot", "create", "--dataset", "digits", "--json") == 0
    created = json.loads(capsys.readouterr().out)
    assert created["row_count"] == 80 and created["dataset"] == "digits" and "sample_count" not in created
    assert run_cli(settings, "snapshot", "verify", created["snapshot_id"]) == 0
    assert "verified" in capsys.readouterr().out
    assert run_cli(settings, "train", "--recipe", "mlp", "--snapshot", created["snapshot_id"], "--set", "epochs=2",
                   "--set", "device=cpu", "--json") == 0
    run = json.loads(capsys.readouterr().out)
    assert json.loads(run["config_json"])["epochs"] == 2
    assert run_cli(settings, "replay", "training", run["run_id"]) == 0
    assert "weights identical" in capsys.readouterr().out
    with pytest.raises(ConfigurationError, match="no field 'epoch'"):
        run_cli(settings, "train", "--recipe", "mlp", "--snapshot", created["snapshot_id"], "--set", "epoch=2")


@pytest.mark.services
def test_a_data_parallel_run_records_its_world_and_replays_on_it(store: EventStore, settings: Settings,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    snapshot = fill(store, rows=200)
    assert run_cli(settings, "train", "--recipe", "mlp", "--snapshot", snapshot, "--set", "epochs=2", "--set",
                   "device=cpu", "--nproc", "2", "--workers", "1", "--json") == 0
    run = json.loads(capsys.readouterr().out)
    assert (run["environment"]["world_size"], run["environment"]["backend"]) == (2, "gloo")
    assert run_cli(settings, "replay", "training", run["run_id"]) == 0  # on two processes again
    assert "weights identical" in capsys.readouterr().out
    alone = train_snapshot(store, PROJECT, load_recipe(PROJECT, "mlp"), snapshot,
                           load_recipe(PROJECT, "mlp").parse_config(["epochs=2", "device=cpu"]))
    assert alone.environment["world_size"] == 1 and alone.weights_sha256 != run["weights_sha256"]
