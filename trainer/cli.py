"""``evp snapshot create|verify``, ``evp train``, ``evp replay training``.

Each command needs a project (``evp.toml`` here or ``EVP_PROJECT``): datasets and recipes
are the project's.
"""

from __future__ import annotations

import argparse
import json

from events.cli.common import add_point_options, point_of, print_json
from events.project import require_project
from events.settings import Settings
from events.store.client import EventStore
from trainer.progress import bar, step_bar

# trainer.runs and trainer.snapshot import torch and numpy: they are imported inside the
# commands that need them, so that `evp --help` and every other command start fast.


def _create(args: argparse.Namespace, settings: Settings) -> int:
    from trainer.snapshot import create_snapshot, load_dataset

    position, as_of = point_of(args)
    project = require_project(settings, "evp snapshot create")
    dataset = load_dataset(project, args.dataset)
    with EventStore.open(settings) as store, bar("reading events", unit="rec") as advance:
        manifest = create_snapshot(store, dataset, advance, position=position, as_of=as_of)
    if args.json:
        print_json(manifest.to_event())
    else:
        ends = ", ".join(f"{p}:{end}" for p, (_, end) in sorted(manifest.ranges.items()))
        then = "" if manifest.cut_position is None else \
            f" as of ledger position {manifest.cut_position} (topic ends {ends or 'none'})"
        print(f"snapshot {manifest.snapshot_id}: dataset {manifest.dataset} v{manifest.dataset_version}{then}, "
              f"{manifest.row_count} rows from {manifest.record_count} records, content hash {manifest.content_hash}")
    return 0


def _verify(args: argparse.Namespace, settings: Settings) -> int:
    from trainer.snapshot import verify_snapshot

    project = require_project(settings, "evp snapshot verify")
    with EventStore.open(settings) as store, bar("re-reading events", unit="rec") as advance:
        result = verify_snapshot(store, args.snapshot_id, project, advance)
    print(f"snapshot {result.snapshot_id}: verified ({result.records_read} records re-read, "
          f"{result.shards_checked} shards checked, content hash {result.content_hash})")
    return 0


def _train(args: argparse.Namespace, settings: Settings) -> int:
    from trainer.recipe import load_recipe
    from trainer.runs import train_snapshot

    project = require_project(settings, "evp train")
    recipe = load_recipe(project, args.recipe)
    config = recipe.parse_config(args.set)
    with EventStore.open(settings) as store, step_bar("training") as progress:
        record = train_snapshot(store, project, recipe, args.snapshot, config, progress=progress, nproc=args.nproc,
                                workers=args.workers)
    if args.json:
        print_json({**record.to_event(), "environment": record.environment})
    else:
        metrics = ", ".join(f"{name} {value:.4f}" for name, value in record.metrics.items())
        world = int(record.environment.get("world_size", 1))
        on = f"{record.device}" + (f" x {world} processes ({record.environment.get('backend')})" if world > 1 else "")
        print(f"run {record.run_id}: {metrics} on {on}, weights sha256 {record.weights_sha256}")
    return 0


def _replay(args: argparse.Namespace, settings: Settings) -> int:
    from trainer.runs import replay_run

    project = require_project(settings, "evp replay training")
    with EventStore.open(settings) as store, step_bar("replaying") as progress:
        outcome = replay_run(store, project, args.run_id, allow_code_change=args.allow_code_change,
                             progress=progress)
    differences, causes, explanation = outcome.differences(), outcome.causes(), outcome.explanation()
    if args.json:
        print(json.dumps({"run_id": args.run_id, "replay_id": outcome.replay.run_id, "identical": outcome.identical,
                          "differences": differences, "causes": [cause.to_json() for cause in causes],
                          "explanation": explanation, "broken_promise": not outcome.identical and not causes},
                         indent=2, sort_keys=True))
        return 0 if outcome.identical else 1
    if outcome.identical:
        print(f"replay {outcome.replay.run_id} of {args.run_id}: weights identical ({outcome.replay.weights_sha256})")
    else:
        print(f"replay {outcome.replay.run_id} of {args.run_id}: weights DIFFERENT")
    for line in differences:
        print(f"  differs: {line}")
    if explanation:
        print("why, most likely cause first:" if causes else "why:")
        for rank, line in enumerate(explanation, 1):
            print(f"  {rank}. {line}" if causes else f"  {line}")
    return 0 if outcome.identical else 1


def register_snapshot(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("snapshot", help="create or verify a versioned dataset snapshot")
    group = parser.add_subparsers(dest="snapshot_command", metavar="ACTION", required=True)
    create = group.add_parser("create", help="pin the topic's offsets, fold a dataset, write shards")
    create.add_argument("--dataset", required=True, help="a dataset of the project (evp.toml name or module:attr)")
    create.add_argument("--json", action="store_true")
    add_point_options(create, "the dataset")
    create.set_defaults(func=_create)
    verify = group.add_parser("verify", help="re-read Kafka and check the content hash and every shard")
    verify.add_argument("snapshot_id")
    verify.set_defaults(func=_verify)


def register_train(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("train", help="train a recipe on a snapshot and record the run")
    parser.add_argument("--recipe", required=True, help="a recipe of the project (evp.toml name or module:attr)")
    parser.add_argument("--snapshot", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change one field of the recipe's config (repeatable), e.g. --set epochs=5")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="train data-parallel on N processes (gloo on CPU, NCCL on CUDA: one GPU per process); "
                             "the run records the world size, and its replay uses it")
    parser.add_argument("--workers", type=int, default=0, metavar="W",
                        help="processes that gather the next batches from the shards ahead of training (default 0)")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=_train)


def register_replay(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("replay", help="re-run recorded work and prove it gives the same result")
    group = parser.add_subparsers(dest="replay_command", metavar="WHAT", required=True)
    training = group.add_parser("training", help="re-train a run and compare the weights bit for bit")
    training.add_argument("run_id")
    training.add_argument("--allow-code-change", action="store_true",
                          help="replay even if the recipe's or dataset's source changed since the run")
    training.add_argument("--json", action="store_true")
    training.set_defaults(func=_replay)
