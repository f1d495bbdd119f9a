"""Helpers for trainer tests: the example projects' datasets and recipes on scikit-learn's data.

The platform holds no domain, so these tests borrow the examples' (``examples/digits``,
``examples/clinic``), exactly as a team would write its own.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
from sklearn.datasets import load_breast_cancer, load_digits

from tests.support.examples import CLINIC, DIGITS, project
from trainer.data import Column, Table
from trainer.recipe import Recipe, load_recipe

DIGIT_COLUMNS = (Column("features", "float32", (64,)), Column("label", "int64"))
SCAN_COLUMNS = (Column("features", "float32", (30,)), Column("label", "int64"))


@cache
def digits() -> Table:
    """The 1,797 digits as a Table with ids ``digit-0000``..; immutable, so shared safely."""
    data = load_digits()
    ids = tuple(f"digit-{row:04d}" for row in range(len(data.target)))
    return Table(DIGIT_COLUMNS, ids, {"features": data.data.astype(np.float32),
                                      "label": data.target.astype(np.int64)})


@cache
def scans() -> Table:
    """The 569 breast-cancer scans; label 1 is malignant (scikit-learn's target 0)."""
    data = load_breast_cancer()
    ids = tuple(f"scan-{row:04d}" for row in range(len(data.target)))
    return Table(SCAN_COLUMNS, ids, {"features": data.data.astype(np.float32),
                                     "label": (1 - data.target).astype(np.int64)})


def mlp() -> Recipe[Any]:
    return load_recipe(project(DIGITS), "mlp")


def logistic() -> Recipe[Any]:
    return load_recipe(project(CLINIC), "logistic")
