"""The digits dataset: every submitted sample with its current label.

- ``SampleSubmitted`` puts a row: 64 pixel intensities (0..16) and the annotator's label;
- ``LabelCorrected`` replaces the label of a sample that exists;
- ``SampleRetracted`` removes the sample from later snapshots.
"""

from __future__ import annotations

from trainer.dataset import Column, Dataset, Row, SourceEvent, handles


class Digits(Dataset):
    name = "digits"
    version = 1
    row_id = "sample_id"
    columns = (Column("features", "float32", (64,)), Column("label", "int64"))

    @handles("SampleSubmitted")
    def submitted(self, event: SourceEvent, row: Row) -> None:
        row.put(features=event.data["features"], label=event.data["label"])

    @handles("LabelCorrected")
    def corrected(self, event: SourceEvent, row: Row) -> None:
        if row.exists:  # a correction of a retracted (or never submitted) sample brings nothing back
            row.set(label=event.data["label"])

    @handles("SampleRetracted")
    def retracted(self, event: SourceEvent, row: Row) -> None:
        row.remove()
