"""bench/synthetic.py: rows from a seed alone, appended through the SDK, snapshotted alike anywhere."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from events.errors import ConfigurationError
from events.project import Project
from events.settings import Settings
from events.store.client import EventStore
from tests.conftest import private_settings
from tests.support.examples import REPO
from trainer.data import Table
from trainer.snapshot import SnapshotManifest, create_snapshot, load_dataset, load_table


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_synthetic", REPO / "bench" / "synthetic.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


SYNTHETIC = generator()
ROWS = 2000


def expected(seed: int, first: int, count: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    ids, features, labels = zip(*((SYNTHETIC.row_id(i), f, label) for i, f, label in SYNTHETIC.rows(seed, first, count)))
    return list(ids), np.stack(features), np.array(labels)


def test_a_row_depends_on_the_seed_and_its_index_alone() -> None:
    ids, features, labels = expected(7, 0, 3000)
    part_ids, part_features, part_labels = expected(7, 1500, 1000)
    assert part_ids == ids[1500:2500] and part_ids[0] == "r0001500"
    assert np.array_equal(part_features, features[1500:2500]) and np.array_equal(part_labels, labels[1500:2500])
    assert features.dtype == np.float32 and features.shape == (3000, 32)
    assert np.array_equal(features * 256, np.rint(features * 256)) and np.abs(features).max() <= 4
    assert set(labels.tolist()) == set(range(10))  # every class occurs
    _, other_features, other_labels = expected(8, 0, 3000)
    assert not np.array_equal(other_features, features) and not np.array_equal(other_labels, labels)


def snapshot(settings: Settings, **options: int) -> tuple[SnapshotManifest, int, Table]:
    """Generate ROWS rows into these settings' fresh database and snapshot them: (manifest, events published, rows)."""
    generated = SYNTHETIC.generate(settings, rows_wanted=ROWS, seed=7, **options)
    project = Project.read(SYNTHETIC.PROJECT)
    with EventStore.open(settings.with_(project=SYNTHETIC.PROJECT)) as store:
        manifest = create_snapshot(store, load_dataset(project, "synthetic"))
        table = load_table(store, manifest.snapshot_id)
    return manifest, generated.events_published, table


@pytest.mark.services
def test_the_same_seed_gives_the_same_snapshot_in_two_fresh_databases(services: Settings, tmp_path: Path) -> None:
    with private_settings(services, tmp_path / "a") as first, private_settings(services, tmp_path / "b") as second:
        (one, published_one, table), (two, published_two, _) = snapshot(first), snapshot(second, batch=700,
                                                                                         flush_every=900)
        with pytest.raises(ConfigurationError, match="rows r0000500..r0000999 cannot be appended to stream "
                                                     "synthetic-0000000: it holds 1000 rows"):
            SYNTHETIC.generate(second, rows_wanted=500, first=500)
    # other appends (700 a batch) and other publications (every 900 rows) in the second: the same rows
    assert one.content_hash == two.content_hash
    assert one.row_count == two.row_count == one.record_count == published_one == published_two == ROWS
    ids, features, labels = expected(7, 0, ROWS)
    assert list(table.row_ids) == ids
    assert np.array_equal(table["features"], features) and np.array_equal(table["label"], labels)
