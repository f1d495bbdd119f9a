"""Which Kafka partition a stream's events go to.

The ledger decides the partition when it writes the outbox, so that relays can hold a lease
per partition. It must agree with Kafka's default partitioner (murmur2 of the key), so that
third-party producers keyed by stream id land on the same partition.
"""

from __future__ import annotations

from kafka.partitioner.default import murmur2


def partition_for(stream_id: str, partitions: int) -> int:
    return int(murmur2(stream_id.encode()) & 0x7FFFFFFF) % partitions
