"""Training examples as plain arrays, their held-out split, and the order they are seen in.

The examples arrive already materialized (from a snapshot's shards); nothing here knows
about Kafka. Features are the raw 0..16 pixel intensities of the 8×8 digits; the model
scales them to 0..1 itself (:class:`trainer.model.ScaleFeatures`), so every consumer of a
trained model feeds it the same raw values the snapshot holds.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from events.errors import IntegrityError, InvalidDataset

FEATURES = 64  #: 8×8 pixels
CLASSES = 10  #: digits 0..9
FEATURE_MAX = 16.0  #: the largest pixel intensity in the digits data


@dataclass(frozen=True, eq=False)
class Examples:
    """Labelled examples, one row per sample id. Arrays are copied and made read-only."""

    sample_ids: tuple[str, ...]
    features: np.ndarray  # float32 [N, 64], values 0..16
    labels: np.ndarray  # int64 [N], values 0..9

    def __post_init__(self) -> None:
        object.__setattr__(self, "sample_ids", _checked_ids(self.sample_ids))
        count = len(self.sample_ids)
        object.__setattr__(self, "features", _checked_features(self.features, count))
        object.__setattr__(self, "labels", _checked_labels(self.labels, count))

    def __len__(self) -> int:
        return len(self.sample_ids)

    def select(self, rows: Sequence[int] | np.ndarray) -> Examples:
        """The given rows, in the given order."""
        index = np.asarray(rows, dtype=np.int64)
        return Examples(tuple(self.sample_ids[i] for i in index), self.features[index], self.labels[index])

    def sorted_by_id(self) -> Examples:
        """Rows in sample-id order, so the order the input arrived in never reaches training."""
        return self.select(sorted(range(len(self)), key=self.sample_ids.__getitem__))

    def split(self, holdout_percent: int) -> tuple[Examples, Examples]:
        """(train, held out), each sorted by sample id.

        A sample is held out when :func:`holdout_bucket` of its id is below
        ``holdout_percent``: the split depends on the id alone, not on row order, the seed
        or which other samples exist, so a sample keeps its side as the dataset grows.
        """
        if not 0 <= holdout_percent <= 100:
            raise InvalidDataset("holdout_percent", f"must be between 0 and 100, got {holdout_percent}")
        ordered = self.sorted_by_id()
        held = np.array([holdout_bucket(sample_id) < holdout_percent for sample_id in ordered.sample_ids], dtype=bool)
        rows = np.arange(len(ordered))
        return ordered.select(rows[~held]), ordered.select(rows[held])


def holdout_bucket(sample_id: str) -> int:
    """0..99 from SHA-256 of the id: stable across processes, unlike Python's salted hash()."""
    digest = hashlib.sha256(sample_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100


class EpochSampler:
    """Mini-batch row indices, epoch after epoch, from one seeded CPU ``torch.Generator``.

    Each epoch draws a fresh permutation of the rows; step ``s`` takes rows
    ``permutation[s*batch_size:(s+1)*batch_size]`` (the last batch may be smaller). The
    permutation is drawn lazily, on the first batch of an epoch, so a sampler restored
    from a checkpoint draws nothing before its state is in place.

    Why not a ``DataLoader``: its workers carry their own RNG streams and prefetch
    batches ahead of the training position, so an exact resume would have to capture
    in-flight queues. The whole dataset already sits on the device as one tensor, so
    indexing is all a loader would do. Here the complete iterator state is (generator
    state, epoch, step, permutation), and a checkpoint holds exactly that. The generator
    lives on the CPU so the batch order is the same on every device type.
    """

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        if size < 1 or batch_size < 1:
            raise InvalidDataset("size", f"need at least one row and a batch of at least 1, got {size}, {batch_size}")
        self.size, self.batch_size = size, batch_size
        self.steps_per_epoch = math.ceil(size / batch_size)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        self.epoch = 0
        self.step = 0
        self.permutation: torch.Tensor | None = None

    def next_batch(self) -> torch.Tensor:
        """The next batch's row indices (int64, CPU); advances the position."""
        if self.permutation is None:
            self.permutation = torch.randperm(self.size, generator=self.generator)
        start = self.step * self.batch_size
        batch = self.permutation[start : start + self.batch_size]
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step, self.permutation = self.epoch + 1, 0, None
        return batch

    def restore(self, epoch: int, step: int, permutation: torch.Tensor | None, generator_state: torch.Tensor) -> None:
        """Put the sampler back at a checkpointed position; refuse a position that cannot be."""
        if not 0 <= step < self.steps_per_epoch or epoch < 0:
            raise IntegrityError(f"sampler position epoch {epoch} step {step} is outside 0..{self.steps_per_epoch - 1}")
        if permutation is None and step > 0:
            raise IntegrityError(f"sampler position step {step} is mid-epoch but no permutation was saved")
        if permutation is not None and not torch.equal(torch.sort(permutation).values, torch.arange(self.size)):
            raise IntegrityError(f"saved permutation is not a permutation of {self.size} rows")
        self.generator.set_state(generator_state)
        self.epoch, self.step = epoch, step
        self.permutation = None if permutation is None else permutation.clone()


def _checked_ids(sample_ids: object) -> tuple[str, ...]:
    if isinstance(sample_ids, str) or not isinstance(sample_ids, (tuple, list)):
        raise InvalidDataset("sample_ids", f"must be a tuple of strings, got {type(sample_ids).__name__}")
    seen: set[str] = set()
    for row, sample_id in enumerate(sample_ids):
        if not isinstance(sample_id, str) or not sample_id:
            raise InvalidDataset("sample_ids", f"row {row} is {sample_id!r}, not a non-empty string")
        if sample_id in seen:
            raise InvalidDataset("sample_ids", f"sample id {sample_id!r} is duplicated (again at row {row})")
        seen.add(sample_id)
    return tuple(sample_ids)


def _checked_features(features: object, count: int) -> np.ndarray:
    if not isinstance(features, np.ndarray) or features.dtype != np.float32:
        raise InvalidDataset("features", f"must be a float32 numpy array, got {_describe(features)}")
    if features.shape != (count, FEATURES):
        raise InvalidDataset("features", f"shape must be ({count}, {FEATURES}), got {features.shape}")
    bad = ~np.isfinite(features) | (features < 0) | (features > FEATURE_MAX)
    if bad.any():
        row, column = (int(i) for i in np.argwhere(bad)[0])
        value = features[row, column]
        raise InvalidDataset("features", f"row {row} column {column} is {value}, outside 0..{FEATURE_MAX:g}")
    return _frozen(features)


def _checked_labels(labels: object, count: int) -> np.ndarray:
    if not isinstance(labels, np.ndarray) or labels.dtype != np.int64:
        raise InvalidDataset("labels", f"must be an int64 numpy array, got {_describe(labels)}")
    if labels.shape != (count,):
        raise InvalidDataset("labels", f"shape must be ({count},), got {labels.shape}")
    bad = (labels < 0) | (labels >= CLASSES)
    if bad.any():
        row = int(np.argmax(bad))
        raise InvalidDataset("labels", f"row {row} has label {labels[row]}, outside 0..{CLASSES - 1}")
    return _frozen(labels)


def _frozen(array: np.ndarray) -> np.ndarray:
    copy = np.array(array, copy=True, order="C")
    copy.flags.writeable = False
    return copy


def _describe(value: object) -> str:
    return f"{value.dtype} array" if isinstance(value, np.ndarray) else type(value).__name__
