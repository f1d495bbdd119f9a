"""The soak's view: per stream, how many events were applied, the last version and the sum of labels.

Every event of a stream carries the stream id as its ``sample_id``, so one row counts one
stream: an event applied twice makes ``events`` exceed the ledger's count, one applied out
of order leaves ``version`` behind, one lost leaves both short.
"""

from __future__ import annotations

from events.store.log import LogRecord
from projections.view import Row, View, on


class Tally(View):
    name = "tally"
    key = "sample_id"
    columns = {"sample_id": "text", "events": "integer", "version": "bigint", "labels": "bigint"}
    analyst = ("sample_id", "events", "version", "labels")

    @on("SampleSubmitted")
    def submitted(self, row: Row | None, record: LogRecord) -> Row:
        before = row or {"events": 0, "labels": 0}
        return {"events": before["events"] + 1, "version": record.version,
                "labels": before["labels"] + int(record.data["label"])}
