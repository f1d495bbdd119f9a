"""The keyring: one data key per data subject, wrapped by a key-encryption key.

Forgetting a subject deletes its data key (crypto-shredding): every copy of its personal
data — in Kafka, views, snapshots and backups — becomes unreadable at once. The store
keeps a tombstone, so "erased" stays distinguishable from "never existed" and a later
request never silently creates a fresh key for a forgotten person.

:class:`KeyStore` is the port; :class:`MemoryKeyStore` and :class:`PostgresKeyStore` are
its adapters; :class:`Keyring` holds the policy (create, cache, forget, rotate).
"""

from __future__ import annotations

import secrets
import time
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

import psycopg
import psycopg.errors

from events.privacy.cipher import KEY_BYTES
from events.adapters import postgres
from events.adapters.postgres import describe
from events.errors import ConfigurationError, CryptoError, KeyErased, NotFound, ServiceUnavailable
from events.privacy.kek import KeyEncryptionKey, kek_mismatch

#: Subject ids starting with this prefix belong to evp itself and cannot be forgotten.
RESERVED_PREFIX = "evp:"
#: Where the blind-index key lives: in the same store, so KEK rotation re-wraps it too.
INDEX_KEY_SUBJECT = "evp:blind-index"


@dataclass(frozen=True)
class StoredKey:
    """One row of the key store; ``wrapped is None`` means the key was erased."""

    subject_id: str
    kek_id: str
    wrapped: bytes | None
    created_at: datetime
    erased_at: datetime | None = None

    @property
    def erased(self) -> bool:
        return self.wrapped is None


#: ``(subject_id, kek_id, wrapped)`` — one re-wrapped key for :meth:`KeyStore.replace_wrapped`.
Rewrapped = tuple[str, str, bytes]


class KeyStore(Protocol):
    """Durable storage of wrapped data keys; never sees a plaintext key."""

    def get(self, subject_id: str) -> StoredKey | None:
        """The row for ``subject_id`` (possibly a tombstone), or None if it never existed."""
        ...

    def put_if_absent(self, key: StoredKey) -> StoredKey:
        """Insert ``key`` unless a row exists; return the row that is stored (the race winner)."""
        ...

    def erase(self, subject_id: str) -> bool:
        """Delete the wrapped key, keeping a tombstone (also for a subject never seen).

        Returns True if a live key was destroyed, False if there was none.
        """
        ...

    def all(self) -> Iterator[StoredKey]:
        """Every row, tombstones included, ordered by subject id."""
        ...

    def replace_wrapped(self, rewrapped: Sequence[Rewrapped]) -> int:
        """Replace wrapped keys in one transaction; skip rows erased meanwhile; return rows changed."""
        ...


class MemoryKeyStore:
    """A :class:`KeyStore` in a dict, for unit tests and throwaway runs."""

    def __init__(self) -> None:
        self._rows: dict[str, StoredKey] = {}
        self._lock = threading.Lock()

    def get(self, subject_id: str) -> StoredKey | None:
        with self._lock:
            return self._rows.get(subject_id)

    def put_if_absent(self, key: StoredKey) -> StoredKey:
        with self._lock:
            return self._rows.setdefault(key.subject_id, key)

    def erase(self, subject_id: str) -> bool:
        now = datetime.now(UTC)
        with self._lock:
            row = self._rows.get(subject_id)
            if row is None:
                self._rows[subject_id] = StoredKey(subject_id, "", None, now, now)
                return False
            if row.erased:
                return False
            self._rows[subject_id] = replace(row, wrapped=None, erased_at=now)
            return True

    def all(self) -> Iterator[StoredKey]:
        with self._lock:
            rows = sorted(self._rows.values(), key=lambda row: row.subject_id)
        return iter(rows)

    def replace_wrapped(self, rewrapped: Sequence[Rewrapped]) -> int:
        with self._lock:
            live = [item for item in rewrapped if item[0] in self._rows and not self._rows[item[0]].erased]
            for subject_id, kek_id, wrapped in live:
                self._rows[subject_id] = replace(self._rows[subject_id], kek_id=kek_id, wrapped=wrapped)
            return len(live)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS evp_data_keys (
    subject_id  text PRIMARY KEY,
    kek_id      text NOT NULL,
    wrapped_key bytea,
    created_at  timestamptz NOT NULL DEFAULT now(),
    erased_at   timestamptz
)
"""
_COLUMNS = "subject_id, kek_id, wrapped_key, created_at, erased_at"


class PostgresKeyStore:
    """A :class:`KeyStore` in the ``evp_data_keys`` table.

    Keeps one connection, used under a lock (safe to share between threads), and reopens it
    after a failure: a restarted server costs one failed call, not a broken keyring. Each
    operation is its own transaction. A new subject needs two operations, so reusing the
    connection is what keeps first appends for new subjects fast.
    """

    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo
        self._target = describe(conninfo)
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def ensure_schema(self) -> None:
        with self._connect() as conn:
            postgres.migration_lock(conn)
            conn.execute(_SCHEMA)

    def get(self, subject_id: str) -> StoredKey | None:
        with self._connect() as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM evp_data_keys WHERE subject_id = %s", (subject_id,)).fetchone()
        return None if row is None else _stored(row)

    def put_if_absent(self, key: StoredKey) -> StoredKey:
        with self._connect() as conn:
            row = conn.execute(
                f"INSERT INTO evp_data_keys ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s) "
                f"ON CONFLICT (subject_id) DO NOTHING RETURNING {_COLUMNS}",
                (key.subject_id, key.kek_id, key.wrapped, key.created_at, key.erased_at),
            ).fetchone()
            if row is None:  # lost the race: the winner's row is committed by now
                row = conn.execute(
                    f"SELECT {_COLUMNS} FROM evp_data_keys WHERE subject_id = %s", (key.subject_id,)
                ).fetchone()
        if row is None:
            raise CryptoError(f"data key of subject {key.subject_id!r} vanished while it was being created")
        return _stored(row)

    def erase(self, subject_id: str) -> bool:
        with self._connect() as conn:
            erased = conn.execute(
                "UPDATE evp_data_keys SET wrapped_key = NULL, erased_at = now() "
                "WHERE subject_id = %s AND wrapped_key IS NOT NULL",
                (subject_id,),
            ).rowcount
            conn.execute(  # a tombstone even for a subject never seen: it must stay forgotten
                "INSERT INTO evp_data_keys (subject_id, kek_id, wrapped_key, erased_at) "
                "VALUES (%s, '', NULL, now()) ON CONFLICT (subject_id) DO NOTHING",
                (subject_id,),
            )
        return erased > 0

    def all(self) -> Iterator[StoredKey]:
        with self._connect() as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM evp_data_keys ORDER BY subject_id").fetchall()
        return iter([_stored(row) for row in rows])

    def replace_wrapped(self, rewrapped: Sequence[Rewrapped]) -> int:
        changed = 0
        with self._connect() as conn:
            for subject_id, kek_id, wrapped in rewrapped:
                changed += conn.execute(
                    "UPDATE evp_data_keys SET kek_id = %s, wrapped_key = %s "
                    "WHERE subject_id = %s AND wrapped_key IS NOT NULL",
                    (kek_id, wrapped, subject_id),
                ).rowcount
        return changed

    @contextmanager
    def _connect(self) -> Iterator[psycopg.Connection[Any]]:
        """The shared connection inside a transaction that commits on success; driver errors become evp errors."""
        try:
            with self._lock:
                try:
                    if self._conn is None or self._conn.closed:
                        self._conn = psycopg.connect(self._conninfo, autocommit=True)
                    with self._conn.transaction():
                        yield self._conn
                except psycopg.OperationalError:
                    if self._conn is not None:
                        self._conn.close()
                    self._conn = None
                    raise
        except psycopg.errors.UndefinedTable as err:
            raise ConfigurationError(
                f"table evp_data_keys does not exist in {self._target}: create it with ensure_schema()"
            ) from err
        except psycopg.OperationalError as err:
            raise ServiceUnavailable("postgresql", self._target, str(err).strip() or type(err).__name__) from err


def _stored(row: tuple[Any, ...]) -> StoredKey:
    subject_id, kek_id, wrapped, created_at, erased_at = row
    return StoredKey(subject_id, kek_id, None if wrapped is None else bytes(wrapped), created_at, erased_at)


class Keyring:
    """Data keys per subject, plus the blind-index key, behind one KEK.

    Plaintext data keys are cached per instance for ``cache_seconds``. :meth:`forget` drops
    the subject from this cache at once; another process's keyring re-reads the store when
    its cached copy expires (or on :meth:`evict`), so an erasure stops every writer and
    reader within ``cache_seconds`` without a message bus.
    """

    #: How long another process may go on using a key that was just forgotten.
    DEFAULT_CACHE_SECONDS = 10.0

    def __init__(self, store: KeyStore, kek: KeyEncryptionKey, *, cache_seconds: float = DEFAULT_CACHE_SECONDS) -> None:
        self._store = store
        self._kek = kek
        self._cache: dict[str, tuple[bytes, float]] = {}  # subject -> (data key, fetched at)
        self.cache_seconds = cache_seconds
        self._lock = threading.RLock()

    @property
    def kek_id(self) -> str:
        return self._kek.key_id

    def data_key(self, subject_id: str, *, create: bool) -> bytes:
        """The subject's 32-byte data key, created on first use when ``create``.

        Raises :class:`KeyErased` for a forgotten subject (never a new key), and
        :class:`NotFound` when there is no key and ``create`` is false.
        """
        _check_subject(subject_id)
        return self._key(subject_id, create=create)

    def index_key(self) -> bytes:
        """The blind-index key, created once; rotated with the KEK, never forgettable."""
        return self._key(INDEX_KEY_SUBJECT, create=True)

    def forget(self, subject_id: str) -> bool:
        """Erase the subject's data key for good; True if a live key was destroyed."""
        _check_subject(subject_id)
        with self._lock:
            erased = self._store.erase(subject_id)
            self._cache.pop(subject_id, None)
        return erased

    def evict(self, subject_id: str) -> None:
        """Drop a cached key, e.g. after another process forgot the subject."""
        with self._lock:
            self._cache.pop(subject_id, None)

    def rotate(self, new_kek: KeyEncryptionKey) -> int:
        """Re-wrap every live key (the blind-index key included) under ``new_kek``.

        1. unwrap all live keys with the current KEK — any failure changes nothing;
        2. wrap them under ``new_kek`` and replace them in one store transaction;
        3. use ``new_kek`` from now on: the old KEK is no longer needed.

        Returns the number of keys re-wrapped. Keys created by other processes still
        holding the old KEK during the rotation stay under it: rotate while writers are
        stopped or already given the new KEK.
        """
        with self._lock:
            rewrapped: list[Rewrapped] = []
            for stored in self._store.all():
                if stored.wrapped is None:
                    continue
                old = self._kek if stored.kek_id != new_kek.key_id else new_kek
                data_key = _unwrap(old, stored)
                rewrapped.append(
                    (stored.subject_id, new_kek.key_id, new_kek.wrap(data_key, subject_id=stored.subject_id))
                )
            changed = self._store.replace_wrapped(rewrapped)
            self._kek = new_kek
        return changed

    def _key(self, subject_id: str, *, create: bool) -> bytes:
        with self._lock:
            cached = self._cache.get(subject_id)
            if cached is not None and time.monotonic() - cached[1] < self.cache_seconds:
                return cached[0]
            stored = self._store.get(subject_id)
            if stored is None:
                if not create:
                    raise NotFound(f"no data key for subject {subject_id!r}")
                fresh = secrets.token_bytes(KEY_BYTES)
                stored = self._store.put_if_absent(
                    StoredKey(
                        subject_id,
                        self._kek.key_id,
                        self._kek.wrap(fresh, subject_id=subject_id),
                        datetime.now(UTC),
                    )
                )
            data_key = _unwrap(self._kek, stored)
            self._cache[subject_id] = (data_key, time.monotonic())
            return data_key


def _unwrap(kek: KeyEncryptionKey, stored: StoredKey) -> bytes:
    if stored.wrapped is None:
        raise KeyErased(stored.subject_id)
    if stored.kek_id != kek.key_id:
        raise kek_mismatch(stored.subject_id, stored.kek_id, kek.key_id)
    return kek.unwrap(stored.wrapped, subject_id=stored.subject_id)


def _check_subject(subject_id: str) -> None:
    if not subject_id:
        raise CryptoError("a data subject id must not be empty")
    if subject_id.startswith(RESERVED_PREFIX):
        raise CryptoError(f"subject id {subject_id!r} is reserved: ids starting with {RESERVED_PREFIX!r} belong to evp")
