"""Partition leases: several consumers of one schema share the topic's partitions.

A consumer that scales out (``LogConsumer(..., scale_out=True)``) holds, on a session of its
own, a shared *member* lock on its schema and an exclusive lock per partition it reads —
PostgreSQL advisory locks, like the relay's leases, so a consumer that dies (even by SIGKILL)
loses its session and with it its leases.

Contract of :meth:`PartitionLeases.rebalance`:

1. count the members (sessions holding the schema's member lock) and compute the fair share,
   ``ceil(partitions / members)``;
2. holding more than the share: hand back the highest-numbered extras (another member is
   waiting for them);
3. holding fewer: try the free partitions in order until the share is reached;
4. return the partitions held now.

Called between batches, so a lease changes hands only at a commit boundary: the new holder
starts exactly where the last commit of that partition stopped (the offsets are in the
consumer's schema).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import psycopg

from events.adapters import postgres
from events.settings import Settings


def lease_class(schema: str) -> int:
    """The advisory-lock class of a schema's partition leases (a stable 31-bit hash)."""
    return zlib.crc32(f"evp-consumer:{schema}".encode()) & 0x7FFFFFFF


#: objid of the member lock; partitions use their number (>= 0), so the member lock is -1.
MEMBER = -1


class PartitionLeases:
    """The leases one consumer holds on one schema's partitions (the contract above)."""

    def __init__(self, settings: Settings, schema: str) -> None:
        self.settings, self.schema = settings, schema
        self.lease_class = lease_class(schema)
        self._conn: psycopg.Connection | None = None
        self.held: set[int] = set()

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self.held.clear()
            self._conn = postgres.connect(self.settings.database_url, autocommit=True)
            self._conn.execute("SELECT pg_advisory_lock_shared(%s, %s)", (self.lease_class, MEMBER))
        return self._conn

    def members(self) -> int:
        row = self._connection().execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = %s::oid"
            " AND objid = %s::oid AND objsubid = 2", (self.lease_class, MEMBER & 0xFFFFFFFF)).fetchone()
        return max(1, int(row[0]) if row else 1)

    def rebalance(self, partitions: Sequence[int]) -> set[int]:
        """Take or hand back leases towards the fair share; the partitions held after it."""
        conn = self._connection()
        share = math.ceil(len(partitions) / self.members())
        for extra in sorted(self.held, reverse=True)[: max(0, len(self.held) - share)]:
            conn.execute("SELECT pg_advisory_unlock(%s, %s)", (self.lease_class, extra))
            self.held.discard(extra)
        for partition in partitions:
            if len(self.held) >= share:
                break
            if partition in self.held:
                continue
            got = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (self.lease_class, partition)).fetchone()
            if got and got[0]:
                self.held.add(partition)
        return set(self.held)

    def close(self) -> None:
        """Hand everything back (closing the session releases every lock it holds)."""
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None
                self.held.clear()
