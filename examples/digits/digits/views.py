"""The digits project's views: labelled samples, and the annotators who label them.

Declared with evp's public API only (:mod:`projections.view`); evp does the batching,
exactly-once offsets, dead letters, rebuilds, redaction on erasure and masked views.
"""

from __future__ import annotations

from events.errors import InvalidEvent
from events.store.log import LogRecord
from projections.view import Row, View, occurred_at, on, personal, sealed


class SamplesView(View):
    """Every submitted sample that was not retracted, with its current label.

    A re-submission replaces the sample (uncorrected); a correction of a sample that does
    not exist (never submitted, or retracted) changes nothing; ``corrections`` counts the
    corrections, which is what makes a doubled event visible in the view.
    """

    name = "samples"
    key = "sample_id"
    columns = {
        "sample_id": "text",
        "annotator_id": "text",
        "label": "integer",
        "features": "real[]",
        "source": "text",
        "submitted_at": "timestamptz",
        "corrected": "boolean",
        "corrections": "integer",
        "version": "bigint",
    }
    analyst = ("sample_id", "annotator_id", "label", "features", "source", "submitted_at", "corrected", "corrections")
    indexes = ("annotator_id",)

    @on("SampleSubmitted")
    def submitted(self, row: Row | None, record: LogRecord) -> Row:
        data = record.data
        if not isinstance(data.get("annotator_id"), str) or not data["annotator_id"]:
            raise InvalidEvent(record.event_type, "annotator_id", "must be a non-empty string")
        return {
            "annotator_id": data["annotator_id"], "label": int(data["label"]), "features": list(data["features"]),
            "source": str(data.get("source", "")), "submitted_at": occurred_at(record),
            "corrected": False, "corrections": 0, "version": record.version,
        }

    @on("LabelCorrected")
    def corrected(self, row: Row | None, record: LogRecord) -> Row | None:
        if row is None:
            return None
        return row | {"label": int(record.data["label"]), "corrected": True,
                      "corrections": row["corrections"] + 1, "version": record.version}

    @on("SampleRetracted")
    def retracted(self, row: Row | None, record: LogRecord) -> None:
        return None


class AnnotatorsView(View):
    """Who labels the samples; name and email stay sealed under the annotator's key.

    Lookups by email go through the blind index ``email_index``; forgetting an annotator
    clears their name, email and index here (evp's redaction, for every view alike).
    """

    name = "annotators"
    key = "annotator_id"
    columns = {
        "annotator_id": "text",
        "name": personal(subject="annotator_id"),
        "email": personal(subject="annotator_id"),
        "email_index": "text",
        "registered_at": "timestamptz",
    }
    analyst = ("annotator_id", "registered_at")
    indexes = ("email_index",)

    @on("AnnotatorRegistered")
    def registered(self, row: Row | None, record: LogRecord) -> Row:
        return {
            "name": sealed(record, "name"), "email": sealed(record, "email"),
            "email_index": record.data.get("email_index"), "registered_at": occurred_at(record),
        }
