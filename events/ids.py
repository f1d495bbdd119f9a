"""Event ids: UUIDv7, so ids sort by creation time and index well in PostgreSQL."""

from __future__ import annotations

import os
import time
import uuid


def uuid7() -> uuid.UUID:
    """A RFC 9562 version-7 UUID: 48-bit Unix milliseconds, then 74 random bits."""
    millis = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (millis & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version
    value |= (rand >> 68) << 64 & (0xFFF << 64)  # 12 random bits (rand_a)
    value |= 0b10 << 62  # variant
    value |= rand & ((1 << 62) - 1)  # 62 random bits (rand_b)
    return uuid.UUID(int=value)


def parse_event_id(value: str | uuid.UUID) -> uuid.UUID:
    """Accept a caller's idempotency key as a UUID or its text form."""
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
