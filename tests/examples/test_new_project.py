"""A team starts a project of a domain evp has never seen, outside the repository, and runs it.

The project is written into a temporary folder (so nothing of it is importable from evp or
the examples): an ``evp.toml``, one schema, one view, one dataset and one regression recipe
— the README's "your own project", completed. Everything then goes through the ``evp``
command, as the team would run it: check, register, project, snapshot, train, replay.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from events.event import NO_STREAM, Event
from events.settings import Settings
from events.store.client import EventStore

SCHEMA = {
    "type": "record", "name": "OrderPlaced", "namespace": "shop", "evp.subject": "customer_id",
    "fields": [
        {"name": "order_id", "type": "string"},
        {"name": "customer_id", "type": "string"},
        {"name": "email", "type": "string", "confluent:tags": ["PII"], "evp.unique": "customer-email"},
        {"name": "items", "type": {"type": "array", "items": "float"}},
        {"name": "total", "type": "double"},
    ],
}

FILES = {
    "evp.toml": """
        [project]
        name = "shop"
        schemas = ["schemas"]
        registration = "explicit"
        [views]
        orders = "shop.views:Orders"
        [datasets]
        baskets = "shop.datasets:Baskets"
        [recipes]
        spend = "shop.recipes:Spend"
    """,
    "shop/__init__.py": "",
    "shop/views.py": """
        from projections.view import View, on, personal, sealed

        class Orders(View):
            name, key = "orders", "order_id"
            columns = {"order_id": "text", "customer_id": "text", "email": personal(subject="customer_id"),
                       "total": "double precision"}
            analyst = ("order_id", "total")

            @on("OrderPlaced")
            def placed(self, row, record):
                return {"customer_id": record.data["customer_id"], "email": sealed(record, "email"),
                        "total": record.data["total"]}
    """,
    "shop/datasets.py": """
        from trainer.dataset import Column, Dataset, handles

        class Baskets(Dataset):
            name, version, row_id = "baskets", 1, "order_id"
            columns = (Column("items", "float32", (8,)), Column("total", "float32"))

            @handles("OrderPlaced")
            def placed(self, event, row):
                row.put(items=event.data["items"], total=event.data["total"])
    """,
    "shop/recipes.py": """
        from dataclasses import dataclass

        import torch
        import torch.nn.functional as F
        from torch import nn

        from trainer.config import TrainConfig
        from trainer.recipe import Recipe

        @dataclass(frozen=True)
        class SpendConfig(TrainConfig):
            epochs: int = 30
            learning_rate: float = 0.01

        class Spend(Recipe[SpendConfig]):
            config, inputs, target = SpendConfig, "items", "total"

            def model(self, config, train):
                return nn.Linear(8, 1)

            def optimizer(self, config, model):
                return torch.optim.SGD(model.parameters(), lr=config.learning_rate)

            def loss(self, outputs, targets):
                return F.mse_loss(outputs.squeeze(1), targets)

            def metrics(self, outputs, targets):
                return {"mse": F.mse_loss(outputs.squeeze(1), targets).item()}
    """,
}


def write_shop(root: Path) -> Path:
    (root / "schemas").mkdir(parents=True)
    (root / "schemas" / "OrderPlaced.avsc").write_text(json.dumps(SCHEMA))
    for name, text in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text).lstrip())
    return root


def evp(settings: Settings, root: Path, *args: str) -> str:
    env = settings.to_env()
    env.pop("EVP_PROJECT", None)  # the team runs evp in its project's folder
    result = subprocess.run([sys.executable, "-m", "events.cli", *args], cwd=root, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"evp {' '.join(args)}: {result.stdout[-2000:]}{result.stderr[-2000:]}"
    return result.stdout


@pytest.mark.services
def test_a_new_domain_runs_end_to_end_through_the_evp_command(settings: Settings, tmp_path: Path) -> None:
    root = write_shop(tmp_path / "shop-project")
    shop = settings.with_(project=root)
    assert json.loads(evp(shop, root, "check", "--json"))["ok"]
    evp(shop, root, "schemas", "register")

    with EventStore.open(shop) as store:
        for i in range(120):
            items = [float((i * 7 + j) % 5) for j in range(8)]
            store.append(f"order-{i:03d}", Event("OrderPlaced", {
                "order_id": f"o-{i:03d}", "customer_id": f"c-{i % 30}", "email": f"c{i}@example.org",
                "items": items, "total": sum(items) * 2.0 + 1.0}, actor=f"c-{i % 30}"), NO_STREAM)
        store.flush()

    caught_up = json.loads(evp(shop, root, "projections", "catch-up", "orders", "--json"))
    assert caught_up["applied"] == 120
    snapshot = json.loads(evp(shop, root, "snapshot", "create", "--dataset", "baskets", "--json"))
    assert snapshot["row_count"] == 120 and snapshot["dataset"] == "baskets"
    assert snapshot["columns"] == [{"name": "items", "dtype": "float32", "shape": [8]},
                                   {"name": "total", "dtype": "float32", "shape": []}]
    run = json.loads(evp(shop, root, "train", "--recipe", "spend", "--snapshot", snapshot["snapshot_id"],
                         "--set", "epochs=40", "--json"))
    assert run["metrics"]["mse"] < 5.0  # learned something: the variance of total is far larger
    replay = json.loads(evp(shop, root, "replay", "training", run["run_id"], "--json"))
    assert replay["identical"], replay["differences"]
