"""``evp snapshot create|verify``, ``evp train``, ``evp replay training``."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from events.cli.common import print_json
from events.store.client import EventStore
from events.settings import Settings
from trainer.config import TrainConfig
from trainer.progress import bar, step_bar

# trainer.runs and trainer.snapshot import torch and numpy: they are imported inside the
# commands that need them, so that `evp --help` and every other command start fast.


def _create(args: argparse.Namespace, settings: Settings) -> int:
    from trainer.snapshot import create_snapshot

    with EventStore.open(settings) as store, bar("reading events", unit="rec") as advance:
        manifest = create_snapshot(store, advance)
    if args.json:
        print_json(asdict(manifest))
    else:
        print(f"snapshot {manifest.snapshot_id}: {manifest.sample_count} samples from {manifest.record_count} records, "
              f"content hash {manifest.content_hash}")
    return 0


def _verify(args: argparse.Namespace, settings: Settings) -> int:
    from trainer.snapshot import verify_snapshot

    with EventStore.open(settings) as store, bar("re-reading events", unit="rec") as advance:
        result = verify_snapshot(store, args.snapshot_id, advance)
    print(f"snapshot {result.snapshot_id}: verified ({result.records_read} records re-read, "
          f"{result.shards_checked} shards checked, content hash {result.content_hash})")
    return 0


def _train(args: argparse.Namespace, settings: Settings) -> int:
    from trainer.runs import train_snapshot

    config = TrainConfig(seed=args.seed, epochs=args.epochs, device=args.device)
    with EventStore.open(settings) as store, step_bar("training") as progress:
        record = train_snapshot(store, args.snapshot, config, progress=progress)
    print(f"run {record.run_id}: held-out accuracy {record.heldout_accuracy:.4f} on {record.device}, "
          f"weights sha256 {record.weights_sha256}")
    return 0


def _replay(args: argparse.Namespace, settings: Settings) -> int:
    from trainer.runs import replay_run

    with EventStore.open(settings) as store, step_bar("replaying") as progress:
        outcome = replay_run(store, args.run_id, progress=progress)
    verdict = "identical" if outcome.identical else "DIFFERENT"
    print(f"replay {outcome.replay.run_id} of {args.run_id}: weights {verdict} "
          f"({outcome.original.weights_sha256[:16]}… vs {outcome.replay.weights_sha256[:16]}…)")
    if not outcome.identical and outcome.original.environment != outcome.replay.environment:
        print("note: the software or device differs from the original run; exactness holds only within one of each")
    return 0 if outcome.identical else 1


def register_snapshot(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("snapshot", help="create or verify a versioned dataset snapshot")
    group = parser.add_subparsers(dest="snapshot_command", metavar="ACTION", required=True)
    create = group.add_parser("create", help="pin the topic's offsets and materialize shards")
    create.add_argument("--json", action="store_true")
    create.set_defaults(func=_create)
    verify = group.add_parser("verify", help="re-read Kafka and check the content hash and shards")
    verify.add_argument("snapshot_id")
    verify.set_defaults(func=_verify)


def register_train(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("train", help="train the model on a snapshot and record the run")
    parser.add_argument("--snapshot", required=True)
    defaults = TrainConfig()
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--device", default=defaults.device, help="auto (cuda when present), cpu or cuda")
    parser.set_defaults(func=_train)


def register_replay(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("replay", help="re-run recorded work and prove it gives the same result")
    group = parser.add_subparsers(dest="replay_command", metavar="WHAT", required=True)
    training = group.add_parser("training", help="re-train a run and compare the weights bit for bit")
    training.add_argument("run_id")
    training.set_defaults(func=_replay)


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from trainer.demo import run_demo

    return run_demo(settings, args.epochs)


def register_demo(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("demo", help="run the whole platform end to end on the bundled digits")
    parser.add_argument("--epochs", type=int, default=TrainConfig().epochs)
    parser.set_defaults(func=_demo)
