"""The synthetic dataset: every generated row, as it was generated (rows are never changed)."""

from __future__ import annotations

from trainer.dataset import Column, Dataset, Row, SourceEvent, handles

FEATURES = 32
CLASSES = 10


class Synthetic(Dataset):
    name = "synthetic"
    version = 1
    row_id = "row_id"
    columns = (Column("features", "float32", (FEATURES,)), Column("label", "int64"))

    @handles("RowGenerated")
    def generated(self, event: SourceEvent, row: Row) -> None:
        row.put(features=event.data["features"], label=event.data["label"])
