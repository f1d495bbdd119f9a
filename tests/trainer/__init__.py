"""Tests of the trainer, on scikit-learn's real digits data."""

from __future__ import annotations

from functools import cache

import numpy as np
from sklearn.datasets import load_digits

from trainer.data import Examples


@cache
def digits() -> Examples:
    """The 1,797 digits as Examples with ids ``digit-0000``..; immutable, so shared safely."""
    data = load_digits()
    ids = tuple(f"digit-{row:04d}" for row in range(len(data.target)))
    return Examples(ids, data.data.astype(np.float32), data.target.astype(np.int64))
