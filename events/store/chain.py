"""The hash chain over each partition of the events topic.

The relay that holds a partition's lease is its only writer, so it chains the records it
publishes, in offset order. Contract:

1. a record's *digest* is SHA-256 over its key, its value and its evp headers, each
   length-prefixed, in the order the record carries them (the chain header left out): the
   bytes a consumer sees, so a reader checks them without the ledger;
2. a record's *link* is ``SHA-256(previous link || digest)``; a partition starts from
   :data:`GENESIS`, or from the head the ledger recorded when its last holder stopped;
3. the link travels on the record (header :data:`HEADER_CHAIN`, hex) and into the ledger
   (``evp_published.chain``), and the partition's head (offset, link) into
   ``evp_chain_heads``, in the transaction that clears the outbox rows;
4. a relay that crashes after Kafka's acknowledgement and before that transaction sends
   the same records again from the same head, so a re-send repeats links already in the
   chain: a reader skips a record whose event and link it has already seen.

The chain alone proves order and completeness against the head it ends in; whoever can
write both the ledger and the topic could recompute it. Signed heads (checkpoints, made with
a key neither system holds) are what make a rewrite detectable.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

#: The header that carries a record's link, hex-encoded.
HEADER_CHAIN = "evp.chain"
#: Where every partition's chain starts.
GENESIS = bytes(32)


def record_digest(key: bytes | None, value: bytes | None, headers: Iterable[tuple[str, bytes]]) -> bytes:
    """Step 1: the digest of one record as Kafka holds it (the chain header excluded)."""
    digest = hashlib.sha256()
    for part in (key or b"", value or b""):
        digest.update(len(part).to_bytes(4, "big"))
        digest.update(part)
    for name, content in headers:
        if name == HEADER_CHAIN:
            continue
        for part in (name.encode(), content or b""):
            digest.update(len(part).to_bytes(4, "big"))
            digest.update(part)
    return digest.digest()


def link(previous: bytes, digest: bytes) -> bytes:
    """Step 2: the link that follows ``previous`` for a record of ``digest``."""
    return hashlib.sha256(previous + digest).digest()


def link_header(headers: Iterable[tuple[str, bytes]]) -> bytes | None:
    """The link a record carries, or None (published before chains, or not by a relay)."""
    for name, content in headers:
        if name == HEADER_CHAIN:
            try:
                return bytes.fromhex(content.decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                return b""  # present but unreadable: never equal to a computed link
    return None


#: What :meth:`Walk.step` found a record to be.
FOLLOWS = "follows"  #: its link follows the partition's head: the chain goes on
RESENT = "re-sent"  #: the same record from the same head again (step 4): nothing new
BROKEN = "broken"  #: its link does not follow: the walk goes on from its link
UNCHAINED = "unchained"  #: no link, after the partition's chain began
BEFORE_CHAINS = "before chains"  #: no link, and none yet in the partition: published before chains


class Walk:
    """Follows each partition's chain record by record, in offset order (steps 2 and 4)."""

    def __init__(self) -> None:
        self.heads: dict[int, bytes] = {}
        self._seen: dict[int, dict[bytes, bytes]] = {}  #: partition -> link -> digest, of the records chained
        self._resync: set[int] = set()

    def head(self, partition: int) -> bytes:
        """The link the partition's next record must follow."""
        return self.heads.get(partition, GENESIS)

    def resync(self, partition: int) -> None:
        """Records were skipped (unreadable): take the next record's link as it is."""
        self._resync.add(partition)

    def step(self, partition: int, key: bytes | None, value: bytes | None,
             headers: Iterable[tuple[str, bytes]]) -> tuple[str, bytes | None, bytes | None]:
        """(what the record is, the link it claims, its digest); the head moves unless it was re-sent."""
        headers = list(headers)
        claimed = link_header(headers)
        if claimed is None:
            return (UNCHAINED if partition in self.heads else BEFORE_CHAINS), None, None
        digest = record_digest(key, value, headers)
        seen = self._seen.setdefault(partition, {})
        follows = partition in self._resync or claimed == link(self.head(partition), digest)
        self._resync.discard(partition)
        if not follows and seen.get(claimed) == digest:
            return RESENT, claimed, digest
        self.heads[partition] = claimed  # a break is followed from the record's own claim: reported once
        seen[claimed] = digest
        return (FOLLOWS if follows else BROKEN), claimed, digest
