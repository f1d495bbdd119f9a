"""A cut: one point of the log, as a ledger position and the topic offsets it maps to.

Time travel (a stream, a view or a snapshot as it was) and backups all need the same
thing: "the log up to here", said once for the ledger and once for Kafka. Contract of
:func:`cut_at`:

1. a time maps to the last ledger position recorded at or before it (``recorded_at`` is
   when the appending transaction began); a position is taken as given; neither means the
   ledger's last position now;
2. every event at or below the position must be published: one still in the outbox has no
   offset yet, so the cut is refused (``NotReady``, retryable: run the relay or flush);
3. each partition's end is one past the highest offset the ledger recorded for its events
   at or below the position (0 for a partition with none).

The ends bound what a reader consumes; they do not make the range exact by themselves: after
a relay crash, a re-sent batch can leave a record of a later position *below* an end. A
reader that needs the log exactly up to the position also skips records whose
``evp.position`` header is above it (:meth:`Cut.admits`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

import psycopg

from events.errors import NotFound, Retryable
from events.event import HEADER_POSITION


class NotReady(Retryable):
    """Events at or below the cut are still in the outbox: publish them, then cut again."""


@dataclass(frozen=True)
class Cut:
    """The log up to ledger ``position``: its records lie below ``ends`` (partition -> offset)."""

    position: int
    ends: Mapping[int, int] = field(default_factory=dict)
    time: datetime | None = None  #: the time asked for, when the cut was made from one

    @property
    def ranges(self) -> dict[int, tuple[int, int]]:
        """``[0, end)`` of every partition: what a reader consumes for this cut."""
        return {p: (0, end) for p, end in sorted(self.ends.items())}

    def admits(self, headers: Iterable[tuple[str, bytes]]) -> bool:
        """Whether a record with these headers is at or below the cut (records without a
        position, not written by evp's relay, are admitted: the ends bound them)."""
        for name, value in headers:
            if name == HEADER_POSITION:
                try:
                    return int(value) <= self.position
                except ValueError:
                    return True
        return True

    def describe(self) -> str:
        asked = f"as of {self.time.isoformat()}: " if self.time is not None else ""
        ends = ", ".join(f"{p}:{e}" for p, e in sorted(self.ends.items()))
        return f"{asked}ledger position {self.position} (topic ends {ends or 'none'})"

    def as_dict(self) -> dict[str, object]:
        return {"position": self.position, "ends": {str(p): e for p, e in sorted(self.ends.items())},
                "time": self.time.isoformat() if self.time is not None else None}


def cut_at(conn: psycopg.Connection, partitions: int, *, position: int | None = None,
           time: datetime | None = None) -> Cut:
    """The cut at ``position`` or ``time`` (at most one), or at the ledger's end; see the module docstring."""
    if position is not None and time is not None:
        raise ValueError("cut at a position or at a time, not both")
    if position is not None and position < 0:
        raise NotFound(f"there is no ledger position {position}: positions start at 1")
    if position is None:  # step 1
        row = conn.execute(
            "SELECT max(position) FROM evp_events WHERE %s::timestamptz IS NULL OR recorded_at <= %s", (time, time),
        ).fetchone()
        if row is None or row[0] is None:
            if time is not None:
                raise NotFound(f"the ledger holds no event recorded at or before {time.isoformat()}")
            return Cut(0, {p: 0 for p in range(partitions)})
        position = int(row[0])
    waiting = conn.execute(  # step 2
        "SELECT count(*), min(o.position) FROM evp_outbox o WHERE o.position <= %s", (position,),
    ).fetchone()
    if waiting is not None and waiting[0]:
        raise NotReady(
            f"{waiting[0]} events at or below ledger position {position} (the first at {waiting[1]}) are not published "
            "yet: run `evp relay run` and cut again"
        )
    ends = {p: 0 for p in range(partitions)}
    for partition, offset in conn.execute(  # step 3
        "SELECT partition, max(kafka_offset) FROM evp_event_log WHERE position <= %s AND kafka_offset IS NOT NULL"
        " GROUP BY partition", (position,),
    ):
        ends[int(partition)] = int(offset) + 1
    return Cut(position, ends, time)
