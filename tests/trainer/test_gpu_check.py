"""`python -m trainer.gpu_check` on a snapshot's folder alone: three equal hashes, or a named failure."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support.examples import DIGITS, REPO
from tests.support.training import DIGIT_COLUMNS, digits
from trainer.dataset import content_hash
from trainer.gpu_check import MISMATCH, USAGE, main
from trainer.shards import write_shards
from trainer.snapshot import MANIFEST, SnapshotManifest

ROWS = 300
HASH_LINE = re.compile(r"^run [123] \(.*\): +([0-9a-f]{64})  ", re.MULTILINE)


def snapshot_folder(folder: Path) -> Path:
    """A small digits snapshot as `evp snapshot create` leaves it: shards (of 128 rows) and manifest.json."""
    table = digits().select(np.arange(ROWS))
    shards = write_shards(table, folder, rows_per_shard=128)
    identity = {"name": "digits", "version": 1, "row_id": "sample_id", "columns": [c.describe() for c in DIGIT_COLUMNS]}
    manifest = SnapshotManifest(
        snapshot_id="snap-0123456789ab", topic="evp.events", dataset="digits", dataset_version=1,
        declaration="digits.datasets:Digits", row_id="sample_id", columns=DIGIT_COLUMNS, ranges={0: (0, ROWS)},
        schema_ids=(1,), content_hash=content_hash(identity, table), record_count=ROWS, row_count=ROWS,
        shards=tuple(shards))
    (folder / MANIFEST).write_text(manifest.to_json())
    return folder


ARGS = ["--recipe", "mlp", "--project", str(DIGITS), "--epochs", "2"]


def test_on_the_cpu_it_trains_three_times_to_the_same_hash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = snapshot_folder(tmp_path / "snap-0123456789ab")
    assert main([str(folder), *ARGS, "--allow-cpu"]) == 0
    out = capsys.readouterr().out
    hashes = HASH_LINE.findall(out)
    assert len(hashes) == 3 and len(set(hashes)) == 1, out
    assert "run 3 (stopped at step 4, resumed)" in out  # 300 rows: 240 train, 4 batches of 64 an epoch, 2 epochs
    assert f"{ROWS:,} rows in 3 shard(s), every shard's sha256 and the content hash verified" in out
    assert "steps/s, GPU n/a (CPU)" in out and "identical: the three weight hashes agree" in out

    assert main([str(folder), *ARGS, "--allow-cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["identical"] is True and [r["weights_sha256"] for r in report["runs"]] == hashes
    assert [r["steps"] for r in report["runs"]] == [8, 8, 8] and report["environment"]["device_type"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_so_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(snapshot_folder(tmp_path)), *ARGS]) == USAGE
    assert "CUDA is not available on this machine" in capsys.readouterr().err


def test_a_damaged_shard_is_named_and_nothing_trains(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = snapshot_folder(tmp_path)
    shard = folder / "shard-00001.bin"
    blob = bytearray(shard.read_bytes())
    blob[-1] ^= 1
    shard.write_bytes(bytes(blob))
    assert main([str(folder), *ARGS, "--allow-cpu"]) == MISMATCH
    err = capsys.readouterr().err
    assert "snapshot snap-0123456789ab: shard shard-00001.bin has sha256" in err and "run 1" not in err


def test_it_runs_as_a_module(tmp_path: Path) -> None:
    folder = snapshot_folder(tmp_path)
    done = subprocess.run([sys.executable, "-m", "trainer.gpu_check", str(folder), "--recipe", "digits.recipes:MLP",
                           "--epochs", "1", "--allow-cpu"], cwd=DIGITS, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert len(set(HASH_LINE.findall(done.stdout))) == 1
