"""The keyring: one data key per data subject, wrapped by a key-encryption key.

Forgetting a subject deletes its data key (crypto-shredding): every copy of its personal
data — in Kafka, views, snapshots and backups — becomes unreadable at once. The store
keeps a tombstone, so "erased" stays distinguishable from "never existed" and a later
request never silently creates a fresh key for a forgotten person. The wrapped key itself
outlives the erasure in PostgreSQL's dead tuples, its WAL and any dump taken before, and
the KEK still unwraps those copies: ``evp keys rotate`` after erasures re-wraps every live
key and retires the old KEK, which makes all of them useless.

The store records the current KEK's id (``evp_kek_state``). A key is only ever created
under that KEK (checked in the inserting transaction), so a process still holding a KEK
that a rotation retired is refused (:class:`KekRetired`, naming both ids) — or follows the
rotation, when its keyring was given a ``find_kek``.

Subject ids are identifiers, not display text: a new key is refused for an id with
leading or trailing whitespace, control or format characters, or text not in Unicode NFC
(:func:`subject_problem`), so ``"ann-cy "`` cannot get a key of its own beside ``ann-cy``.

:class:`KeyStore` is the port; :class:`MemoryKeyStore` and :class:`PostgresKeyStore` are
its adapters; :class:`Keyring` holds the policy (create, cache, forget, rotate).
"""

from __future__ import annotations

import hashlib
import secrets
import time
import threading
import unicodedata
from collections.abc import Callable, Iterator, Sequence
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
from events.privacy.kek import KeyEncryptionKey, KekFinder, kek_mismatch

#: Subject ids starting with this prefix belong to evp itself and cannot be forgotten.
RESERVED_PREFIX = "evp:"
#: Where the blind-index key lives: in the same store, so KEK rotation re-wraps it too.
INDEX_KEY_SUBJECT = "evp:blind-index"
_INDEX_KEY_ID_DOMAIN = b"evp-index-key-id"
#: Characters an id must not hold: control, format (zero-width), surrogate, line/paragraph separators.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


class KekRetired(CryptoError):
    """This process holds a KEK that a rotation retired; no key was created under it."""

    def __init__(self, held: str, current: str) -> None:
        self.held, self.current = held, current
        super().__init__(
            f"key-encryption key {held} was retired by `evp keys rotate`: the key store is now wrapped by "
            f"key-encryption key {current}; nothing was wrapped under {held}. Restart with the new key "
            f"(the configured key file now links to it)"
        )


class InvalidSubject(CryptoError):
    """A data subject id that could pass for another one (whitespace, control characters, not NFC)."""

    def __init__(self, subject_id: str, reason: str) -> None:
        self.subject_id, self.reason = subject_id, reason
        super().__init__(f"data subject id {subject_id!r} {reason}")


def subject_problem(subject_id: str) -> str | None:
    """Why ``subject_id`` may not get a data key, or None: the one rule for the SDK and the keyring."""
    if not subject_id:
        return "is empty"
    if subject_id != subject_id.strip():
        return "has leading or trailing whitespace"
    bad = next((c for c in subject_id if unicodedata.category(c) in _REFUSED_CATEGORIES), None)
    if bad is not None:
        return f"contains the control or invisible character U+{ord(bad):04X}"
    if unicodedata.normalize("NFC", subject_id) != subject_id:
        return f"is not in Unicode NFC form (write it as {unicodedata.normalize('NFC', subject_id)!r})"
    return None


def canonical_subject(subject_id: str) -> str:
    """The id a look-alike stands for: stripped, without refused characters, in NFC."""
    kept = "".join(c for c in subject_id if unicodedata.category(c) not in _REFUSED_CATEGORIES)
    return unicodedata.normalize("NFC", kept.strip())


def index_key_id(index_key: bytes) -> str:
    """The blind-index key's version: a fingerprint stored with it (not secret, never the key)."""
    return hashlib.sha256(_INDEX_KEY_ID_DOMAIN + index_key).hexdigest()[:16]


@dataclass(frozen=True)
class StoredKey:
    """One row of the key store; ``wrapped is None`` means the key was erased."""

    subject_id: str
    kek_id: str
    wrapped: bytes | None
    created_at: datetime
    erased_at: datetime | None = None
    key_id: str | None = None  #: the key's own version, kept for the blind-index key (None: not recorded)

    @property
    def erased(self) -> bool:
        return self.wrapped is None


#: ``(subject_id, kek_id, wrapped)`` — one re-wrapped key for :meth:`KeyStore.replace_wrapped`.
Rewrapped = tuple[str, str, bytes]

#: Steps of a rotation as the store records them (see :mod:`events.cli.keys`).
ROTATION_STEPS = ("rewrap", "verify", "switch", "retire")


@dataclass(frozen=True)
class KekState:
    """What the store records about its KEKs (one row, ``evp_kek_state``)."""

    current: str | None  #: every new key must be wrapped by this KEK; None until a keyring claims it
    rotating_from: str | None = None  #: a rotation in progress: from this KEK ...
    rotating_to: str | None = None  #: ... to this one (already ``current``)
    step: str | None = None  #: the next step of that rotation, one of :data:`ROTATION_STEPS`
    retired: tuple[str, ...] = ()  #: KEKs retired by earlier rotations, never to be used again


class KeyStore(Protocol):
    """Durable storage of wrapped data keys; never sees a plaintext key."""

    def get(self, subject_id: str) -> StoredKey | None:
        """The row for ``subject_id`` (possibly a tombstone), or None if it never existed."""
        ...

    def put_if_absent(self, key: StoredKey) -> StoredKey:
        """Insert ``key`` unless a row exists; return the row that is stored (the race winner).

        Raises :class:`KekRetired` for a live key wrapped by another KEK than the recorded
        current one, checked in the inserting transaction.
        """
        ...

    def erase(self, subject_id: str) -> bool:
        """Delete the wrapped key, keeping a tombstone (also for a subject never seen).

        Returns True if a live key was destroyed, False if there was none.
        """
        ...

    def all(self) -> Iterator[StoredKey]:
        """Every row, tombstones included, ordered by subject id."""
        ...

    def replace_wrapped(self, rewrapped: Sequence[Rewrapped], from_kek_id: str) -> int:
        """Replace wrapped keys still wrapped by ``from_kek_id`` in one transaction; skip rows erased
        meanwhile; return rows changed."""
        ...

    def live_under(self, kek_id: str, limit: int) -> list[StoredKey]:
        """Up to ``limit`` live keys wrapped by ``kek_id``, ordered by subject id."""
        ...

    def record_key_id(self, subject_id: str, key_id: str) -> None:
        """Record the version of a key stored before versions were (only where none is recorded)."""
        ...

    def lookalikes(self, subject_id: str) -> list[str]:
        """Other ids stored whose :func:`canonical_subject` is ``subject_id`` (legacy look-alikes)."""
        ...

    def kek_state(self) -> KekState: ...

    def claim_kek(self, kek_id: str) -> KekState:
        """Record ``kek_id`` as current if none is and no live key is wrapped by another; return the state."""
        ...

    def begin_rotation(self, from_kek_id: str, to_kek_id: str) -> KekState:
        """Atomically: ``to`` becomes current, the rotation is recorded at step ``rewrap``.

        Idempotent for the same pair; raises :class:`CryptoError` if ``from`` is not current
        or another rotation is pending.
        """
        ...

    def set_rotation_step(self, to_kek_id: str, step: str) -> None: ...

    def end_rotation(self, to_kek_id: str) -> None:
        """Clear the finished rotation to ``to``; its ``from`` KEK is recorded as retired."""
        ...

    def abort_rotation(self, from_kek_id: str, to_kek_id: str) -> None:
        """Undo a rotation before any key moved: ``from`` is current again."""
        ...


class MemoryKeyStore:
    """A :class:`KeyStore` in a dict, for unit tests and throwaway runs."""

    def __init__(self) -> None:
        self._rows: dict[str, StoredKey] = {}
        self._state = KekState(None)
        self._lock = threading.Lock()

    def get(self, subject_id: str) -> StoredKey | None:
        with self._lock:
            return self._rows.get(subject_id)

    def put_if_absent(self, key: StoredKey) -> StoredKey:
        with self._lock:
            existing = self._rows.get(key.subject_id)
            if existing is not None:
                return existing
            current = self._state.current
            if key.wrapped is not None and current is not None and key.kek_id != current:
                raise refused_kek(self._state, key.kek_id)
            self._rows[key.subject_id] = key
            return key

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

    def replace_wrapped(self, rewrapped: Sequence[Rewrapped], from_kek_id: str) -> int:
        with self._lock:
            live = [item for item in rewrapped if item[0] in self._rows and not self._rows[item[0]].erased
                    and self._rows[item[0]].kek_id == from_kek_id]
            for subject_id, kek_id, wrapped in live:
                self._rows[subject_id] = replace(self._rows[subject_id], kek_id=kek_id, wrapped=wrapped)
            return len(live)

    def live_under(self, kek_id: str, limit: int) -> list[StoredKey]:
        with self._lock:
            rows = sorted((r for r in self._rows.values() if not r.erased and r.kek_id == kek_id),
                          key=lambda row: row.subject_id)
        return rows[:limit]

    def record_key_id(self, subject_id: str, key_id: str) -> None:
        with self._lock:
            row = self._rows.get(subject_id)
            if row is not None and row.key_id is None:
                self._rows[subject_id] = replace(row, key_id=key_id)

    def lookalikes(self, subject_id: str) -> list[str]:
        with self._lock:
            return sorted(s for s in self._rows if s != subject_id and canonical_subject(s) == subject_id)

    def kek_state(self) -> KekState:
        with self._lock:
            return self._state

    def claim_kek(self, kek_id: str) -> KekState:
        with self._lock:
            if self._state.current is None and all(r.erased or r.kek_id == kek_id for r in self._rows.values()):
                self._state = replace(self._state, current=kek_id)
            return self._state

    def begin_rotation(self, from_kek_id: str, to_kek_id: str) -> KekState:
        with self._lock:
            state = self._state
            if state.rotating_to == to_kek_id and state.rotating_from == from_kek_id:
                return state
            _check_can_begin(state, from_kek_id, to_kek_id)
            self._state = replace(state, current=to_kek_id, rotating_from=from_kek_id, rotating_to=to_kek_id,
                                  step=ROTATION_STEPS[0])
            return self._state

    def set_rotation_step(self, to_kek_id: str, step: str) -> None:
        with self._lock:
            if self._state.rotating_to == to_kek_id:
                self._state = replace(self._state, step=step)

    def end_rotation(self, to_kek_id: str) -> None:
        with self._lock:
            state = self._state
            if state.rotating_to == to_kek_id and state.rotating_from is not None:
                self._state = KekState(to_kek_id, retired=(*state.retired, state.rotating_from))

    def abort_rotation(self, from_kek_id: str, to_kek_id: str) -> None:
        with self._lock:
            if self._state.rotating_to == to_kek_id:
                self._state = replace(self._state, current=from_kek_id, rotating_from=None, rotating_to=None,
                                      step=None)


def refused_kek(state: KekState, kek_id: str) -> CryptoError:
    """Why no key may be wrapped by ``kek_id`` in a store whose current KEK is another one."""
    current = state.current or ""
    if kek_id in state.retired or kek_id == state.rotating_from:
        return KekRetired(kek_id, current)
    return CryptoError(
        f"the key-encryption key does not match: the key store is wrapped by key-encryption key {current}, "
        f"but the key given is {kek_id}"
    )


def _check_can_begin(state: KekState, from_kek_id: str, to_kek_id: str) -> None:
    if state.rotating_to is not None:
        raise CryptoError(
            f"a rotation from key-encryption key {state.rotating_from} to {state.rotating_to} is in progress "
            f"(step {state.step}): run `evp keys rotate` again to finish it"
        )
    if state.current not in (None, from_kek_id):
        raise refused_kek(state, from_kek_id)
    if to_kek_id == from_kek_id or to_kek_id in state.retired:
        raise CryptoError(f"key-encryption key {to_kek_id} is not new: a rotation needs a key never used before")


#: The keyring's tables live in a schema of their own, which only its owner (evp's role) may use:
#: the projection roles get no privilege on it (projections/roles.py reads tombstones through a view).
KEYRING_SCHEMA = "evp_keyring"
#: Runs before :data:`_SCHEMA`, whose unqualified names the connection's search path puts in this schema.
_KEYRING_SCHEMA_DDL = f"""
CREATE SCHEMA IF NOT EXISTS {KEYRING_SCHEMA};
REVOKE ALL ON SCHEMA {KEYRING_SCHEMA} FROM PUBLIC;
DO $$ BEGIN  -- a keyring made before it had a schema of its own moves into it, once
  IF to_regclass('{KEYRING_SCHEMA}.evp_data_keys') IS NULL AND to_regclass('public.evp_data_keys') IS NOT NULL THEN
    ALTER TABLE public.evp_data_keys SET SCHEMA {KEYRING_SCHEMA};
  END IF;
  IF to_regclass('{KEYRING_SCHEMA}.evp_kek_state') IS NULL AND to_regclass('public.evp_kek_state') IS NOT NULL THEN
    ALTER TABLE public.evp_kek_state SET SCHEMA {KEYRING_SCHEMA};
  END IF;
END $$;
"""
_SCHEMA = """
CREATE TABLE IF NOT EXISTS evp_data_keys (
    subject_id  text PRIMARY KEY,
    kek_id      text NOT NULL,
    wrapped_key bytea,
    created_at  timestamptz NOT NULL DEFAULT now(),
    erased_at   timestamptz
);
ALTER TABLE evp_data_keys ADD COLUMN IF NOT EXISTS key_id text;
CREATE INDEX IF NOT EXISTS evp_data_keys_live_kek ON evp_data_keys (kek_id, subject_id) WHERE wrapped_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS evp_kek_state (
    id             smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    current_kek_id text,
    rotating_from  text,
    rotating_to    text,
    rotation_step  text,
    retired        text[] NOT NULL DEFAULT '{}',
    updated_at     timestamptz NOT NULL DEFAULT now()
);
INSERT INTO evp_kek_state (id) VALUES (1) ON CONFLICT (id) DO NOTHING;
"""
_COLUMNS = "subject_id, kek_id, wrapped_key, created_at, erased_at, key_id"
_STATE = "current_kek_id, rotating_from, rotating_to, rotation_step, retired"
#: Ids that may be look-alikes (a space at either end, anything but printable ASCII): only these
#: few are compared in Python, so finding look-alikes needs no scan of every id.
_SUSPECT_ID = "subject_id ~ '^ | $|[^ -~]'"


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
            postgres.apply_once(conn, "events.privacy.keyring", _KEYRING_SCHEMA_DDL + _SCHEMA)

    def get(self, subject_id: str) -> StoredKey | None:
        with self._connect() as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM evp_data_keys WHERE subject_id = %s", (subject_id,)).fetchone()
        return None if row is None else _stored(row)

    def put_if_absent(self, key: StoredKey) -> StoredKey:
        with self._connect() as conn:
            # FOR SHARE: a rotation's switch of the current KEK waits for this insert, and an
            # insert after the switch sees the new KEK: no key is ever created under a retired one.
            state = _state(conn.execute(f"SELECT {_STATE} FROM evp_kek_state WHERE id = 1 FOR SHARE").fetchone())
            current = state.current
            row = None
            if key.wrapped is None or current is None or current == key.kek_id:
                row = conn.execute(
                    f"INSERT INTO evp_data_keys ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s) "
                    f"ON CONFLICT (subject_id) DO NOTHING RETURNING {_COLUMNS}",
                    (key.subject_id, key.kek_id, key.wrapped, key.created_at, key.erased_at, key.key_id),
                ).fetchone()
            if row is None:  # lost the race (the winner's row is committed by now), or refused
                row = conn.execute(
                    f"SELECT {_COLUMNS} FROM evp_data_keys WHERE subject_id = %s", (key.subject_id,)
                ).fetchone()
                if row is None and current is not None and current != key.kek_id:
                    raise refused_kek(state, key.kek_id)
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

    def replace_wrapped(self, rewrapped: Sequence[Rewrapped], from_kek_id: str) -> int:
        changed = 0
        with self._connect() as conn:
            for subject_id, kek_id, wrapped in rewrapped:
                changed += conn.execute(
                    "UPDATE evp_data_keys SET kek_id = %s, wrapped_key = %s "
                    "WHERE subject_id = %s AND kek_id = %s AND wrapped_key IS NOT NULL",
                    (kek_id, wrapped, subject_id, from_kek_id),
                ).rowcount
        return changed

    def live_under(self, kek_id: str, limit: int) -> list[StoredKey]:
        with self._connect() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM evp_data_keys WHERE kek_id = %s AND wrapped_key IS NOT NULL "
                "ORDER BY subject_id LIMIT %s",
                (kek_id, limit),
            ).fetchall()
        return [_stored(row) for row in rows]

    def record_key_id(self, subject_id: str, key_id: str) -> None:
        with self._connect() as conn:
            conn.execute("UPDATE evp_data_keys SET key_id = %s WHERE subject_id = %s AND key_id IS NULL",
                         (key_id, subject_id))

    def lookalikes(self, subject_id: str) -> list[str]:
        with self._connect() as conn:
            rows = conn.execute(
                f"SELECT subject_id FROM evp_data_keys WHERE subject_id <> %s AND ({_SUSPECT_ID}) ORDER BY 1",
                (subject_id,),
            ).fetchall()
        return [r[0] for r in rows if canonical_subject(r[0]) == subject_id]

    def kek_state(self) -> KekState:
        with self._connect() as conn:
            return _state(conn.execute(f"SELECT {_STATE} FROM evp_kek_state WHERE id = 1").fetchone())

    def claim_kek(self, kek_id: str) -> KekState:
        with self._connect() as conn:
            conn.execute(
                "UPDATE evp_kek_state SET current_kek_id = %s, updated_at = now() WHERE id = 1 "
                "AND current_kek_id IS NULL AND NOT EXISTS "
                "(SELECT 1 FROM evp_data_keys WHERE wrapped_key IS NOT NULL AND kek_id <> %s)",
                (kek_id, kek_id),
            )
            return _state(conn.execute(f"SELECT {_STATE} FROM evp_kek_state WHERE id = 1").fetchone())

    def begin_rotation(self, from_kek_id: str, to_kek_id: str) -> KekState:
        with self._connect() as conn:
            state = _state(conn.execute(f"SELECT {_STATE} FROM evp_kek_state WHERE id = 1 FOR UPDATE").fetchone())
            if state.rotating_to == to_kek_id and state.rotating_from == from_kek_id:
                return state
            _check_can_begin(state, from_kek_id, to_kek_id)
            conn.execute(
                "UPDATE evp_kek_state SET current_kek_id = %s, rotating_from = %s, rotating_to = %s, "
                "rotation_step = %s, updated_at = now() WHERE id = 1",
                (to_kek_id, from_kek_id, to_kek_id, ROTATION_STEPS[0]),
            )
            return _state(conn.execute(f"SELECT {_STATE} FROM evp_kek_state WHERE id = 1").fetchone())

    def set_rotation_step(self, to_kek_id: str, step: str) -> None:
        with self._connect() as conn:
            conn.execute("UPDATE evp_kek_state SET rotation_step = %s, updated_at = now() "
                         "WHERE id = 1 AND rotating_to = %s", (step, to_kek_id))

    def end_rotation(self, to_kek_id: str) -> None:
        with self._connect() as conn:
            conn.execute(
                "UPDATE evp_kek_state SET retired = array_append(retired, rotating_from), rotating_from = NULL, "
                "rotating_to = NULL, rotation_step = NULL, updated_at = now() WHERE id = 1 AND rotating_to = %s",
                (to_kek_id,),
            )

    def abort_rotation(self, from_kek_id: str, to_kek_id: str) -> None:
        """Undo the rotation in one transaction, refusing when a key was wrapped by the new KEK.

        The state row is locked first (``FOR UPDATE`` conflicts with the ``FOR SHARE`` every
        key insert takes), so no process can wrap a key under ``to`` between the check and
        the undo: that key would be stranded under a KEK whose file is gone.
        """
        with self._connect() as conn:
            conn.execute("SELECT 1 FROM evp_kek_state WHERE id = 1 FOR UPDATE")
            if conn.execute("SELECT 1 FROM evp_data_keys WHERE kek_id = %s AND wrapped_key IS NOT NULL LIMIT 1",
                            (to_kek_id,)).fetchone() is not None:
                raise CryptoError(f"cannot undo the rotation from key-encryption key {from_kek_id} to {to_kek_id}: "
                                  f"keys are already wrapped by {to_kek_id}; restore its key file and run it again")
            conn.execute(
                "UPDATE evp_kek_state SET current_kek_id = %s, rotating_from = NULL, rotating_to = NULL, "
                "rotation_step = NULL, updated_at = now() WHERE id = 1 AND rotating_to = %s",
                (from_kek_id, to_kek_id),
            )

    @contextmanager
    def _connect(self) -> Iterator[psycopg.Connection[Any]]:
        """The shared connection inside a transaction that commits on success; driver errors become evp errors."""
        try:
            with self._lock:
                try:
                    if self._conn is None or self._conn.closed:
                        self._conn = psycopg.connect(self._conninfo, autocommit=True)
                        self._conn.execute(f"SET search_path = {KEYRING_SCHEMA}")  # the keyring's own schema
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
    subject_id, kek_id, wrapped, created_at, erased_at, key_id = row
    return StoredKey(subject_id, kek_id, None if wrapped is None else bytes(wrapped), created_at, erased_at, key_id)


def _state(row: tuple[Any, ...] | None) -> KekState:
    if row is None:
        return KekState(None)
    current, rotating_from, rotating_to, step, retired = row
    return KekState(current, rotating_from, rotating_to, step, tuple(retired or ()))


class Keyring:
    """Data keys per subject, plus the blind-index key, behind one KEK.

    Plaintext data keys are cached per instance for ``cache_seconds``. :meth:`forget` drops
    the subject from this cache at once; another process's keyring re-reads the store when
    its cached copy expires (or on :meth:`evict`), so an erasure stops every writer and
    reader within ``cache_seconds`` (10 s by default) without a message bus.

    Before it creates or unwraps a key from the store, the keyring compares its KEK with the
    store's current one, at most every ``kek_check_seconds`` (and always when a row names
    another KEK). After a rotation it loads the new KEK through ``find_kek`` if it was given
    one and finds it; otherwise it refuses to create any key (:class:`KekRetired`). The
    store checks the same in the inserting transaction, so a new subject is never wrapped
    under a retired KEK even within those seconds.
    """

    #: How long another process may go on using a key that was just forgotten.
    DEFAULT_CACHE_SECONDS = 10.0
    #: How often a keyring looks at the store's current KEK id (creations are checked every time).
    DEFAULT_KEK_CHECK_SECONDS = 5.0

    def __init__(
        self, store: KeyStore, kek: KeyEncryptionKey, *, cache_seconds: float = DEFAULT_CACHE_SECONDS,
        kek_check_seconds: float = DEFAULT_KEK_CHECK_SECONDS, find_kek: KekFinder | None = None,
    ) -> None:
        self._store = store
        self._kek = kek
        self._previous: KeyEncryptionKey | None = None  # the KEK before a rotation this keyring followed
        self._find_kek = find_kek
        self._cache: dict[str, tuple[bytes, float]] = {}  # subject -> (data key, fetched at)
        self.cache_seconds = cache_seconds
        self.kek_check_seconds = kek_check_seconds
        self._state = KekState(None)  # the store's KEK state, as last read
        self._checked_at = float("-inf")
        self._lock = threading.RLock()

    @property
    def kek_id(self) -> str:
        return self._kek.key_id

    def data_key(self, subject_id: str, *, create: bool) -> bytes:
        """The subject's 32-byte data key, created on first use when ``create``.

        Raises :class:`KeyErased` for a forgotten subject (never a new key), :class:`NotFound`
        when there is no key and ``create`` is false, :class:`InvalidSubject` when a key would
        be created for an id that :func:`subject_problem` refuses (reading a key stored before
        that rule stays possible), and :class:`KekRetired` when this keyring's KEK was retired.
        """
        _check_subject(subject_id, create=create)
        return self._key(subject_id, create=create)

    def index_key(self) -> bytes:
        """The blind-index key, created once; rotated with the KEK, never forgettable."""
        return self._key(INDEX_KEY_SUBJECT, create=True)

    def index_key_id(self) -> str:
        """The blind-index key's version, as stored with it (recorded now for a key from before versions)."""
        return index_key_id(self.index_key())

    def forget(self, subject_id: str) -> bool:
        """Erase the subject's data key for good; True if a live key was destroyed."""
        _check_subject(subject_id, create=False)
        with self._lock:
            erased = self._store.erase(subject_id)
            self._cache.pop(subject_id, None)
        return erased

    def lookalikes(self, subject_id: str) -> list[str]:
        """Stored ids that differ from ``subject_id`` only by what :func:`subject_problem` refuses."""
        return self._store.lookalikes(subject_id)

    def evict(self, subject_id: str) -> None:
        """Drop a cached key, e.g. after another process forgot the subject."""
        with self._lock:
            self._cache.pop(subject_id, None)

    # -- rotation: steps 2-4 and the end of the procedure in events.cli.keys ---------------
    def rotate(self, new_kek: KeyEncryptionKey, *, batch: int = 500) -> int:
        """Re-wrap every live key (the blind-index key included) under ``new_kek``, in one go.

        :meth:`begin_rotation`, :meth:`rewrap`, :meth:`verify_rotation`,
        :meth:`end_rotation`; returns the number of keys re-wrapped. ``evp keys rotate``
        runs the same steps around the key files, resumably.
        """
        self.begin_rotation(new_kek)
        changed = self.rewrap(new_kek, batch=batch)
        self.verify_rotation(new_kek)
        self.end_rotation(new_kek)
        return changed

    def begin_rotation(self, new_kek: KeyEncryptionKey) -> KekState:
        """Step 2: check every live key unwraps, then record the rotation; ``new_kek`` becomes current.

        Any failure before the record changes nothing. From the record on, no key can be
        created under the old KEK, and a rotation run again resumes with ``new_kek``.
        """
        with self._lock:
            state = self._store.kek_state()
            if state.rotating_to == new_kek.key_id and state.rotating_from == self._kek.key_id:
                return state
            if state.current is None:
                state = self._store.claim_kek(self._kek.key_id)
            _check_can_begin(state, self._kek.key_id, new_kek.key_id)
            for stored in self._store.all():
                if stored.wrapped is not None:
                    _unwrap(self._kek, stored)  # a key the current KEK cannot open is never moved
            state = self._store.begin_rotation(self._kek.key_id, new_kek.key_id)
            self._state, self._checked_at = state, time.monotonic()
            return state

    def rewrap(self, new_kek: KeyEncryptionKey, *, batch: int = 500,
               after_batch: Callable[[], None] | None = None) -> int:
        """Step 3: move every live key still under the old KEK to ``new_kek``, ``batch`` keys per transaction.

        Resumable: it picks up whatever is still under the old KEK. A key erased meanwhile
        stays erased. The old KEK is needed only while keys remain under it.
        """
        with self._lock:
            state = self._store.kek_state()
            old_id = state.rotating_from
            if state.rotating_to != new_kek.key_id or old_id is None:
                raise CryptoError(f"no rotation to key-encryption key {new_kek.key_id} is recorded")
            changed = 0
            while rows := self._store.live_under(old_id, batch):
                old = self._kek_named(old_id)
                if old is None:
                    raise CryptoError(
                        f"{len(rows)} or more keys are still wrapped by key-encryption key {old_id}, "
                        f"which is not at hand: give it (EVP_KEK or its key file) to finish the rotation"
                    )
                moved = [(r.subject_id, new_kek.key_id, new_kek.wrap(_unwrap(old, r), subject_id=r.subject_id))
                         for r in rows]
                changed += self._store.replace_wrapped(moved, old_id)
                if after_batch is not None:
                    after_batch()
            if self._kek.key_id != new_kek.key_id:
                self._previous, self._kek = self._kek, new_kek
            self._store.set_rotation_step(new_kek.key_id, "verify")
            return changed

    def verify_rotation(self, new_kek: KeyEncryptionKey) -> int:
        """Step 4: every live key is wrapped by ``new_kek`` and unwraps with it; returns how many."""
        with self._lock:
            count = 0
            for stored in self._store.all():
                if stored.wrapped is None:
                    continue
                if stored.kek_id != new_kek.key_id:
                    raise CryptoError(
                        f"the data key of subject {stored.subject_id!r} is still wrapped by key-encryption key "
                        f"{stored.kek_id}, not {new_kek.key_id}: the rotation is not complete, nothing is retired"
                    )
                new_kek.unwrap(stored.wrapped, subject_id=stored.subject_id)
                count += 1
            self._store.set_rotation_step(new_kek.key_id, "switch")
            return count

    def end_rotation(self, new_kek: KeyEncryptionKey) -> None:
        """The last step: the rotation is over and its old KEK is recorded as retired."""
        with self._lock:
            self._store.end_rotation(new_kek.key_id)
            self._previous = None
            if self._kek.key_id != new_kek.key_id:
                self._kek = new_kek

    # -- internals ------------------------------------------------------------------------
    def _key(self, subject_id: str, *, create: bool) -> bytes:
        with self._lock:
            cached = self._cache.get(subject_id)
            if cached is not None and time.monotonic() - cached[1] < self.cache_seconds:
                return cached[0]
            self._follow_store_kek(force=False)
            stored = self._store.get(subject_id)
            if stored is None:
                if not create:
                    raise NotFound(f"no data key for subject {subject_id!r}")
                stored = self._create(subject_id)
            data_key = self._unwrap_stored(stored)
            if subject_id == INDEX_KEY_SUBJECT:
                self._check_index_key_id(stored, data_key)
            self._cache[subject_id] = (data_key, time.monotonic())
            return data_key

    def _create(self, subject_id: str) -> StoredKey:
        fresh = secrets.token_bytes(KEY_BYTES)
        key_id = index_key_id(fresh) if subject_id == INDEX_KEY_SUBJECT else None
        for attempt in (1, 2):
            if self._state.current not in (None, self._kek.key_id):
                raise refused_kek(self._state, self._kek.key_id)
            row = StoredKey(subject_id, self._kek.key_id, self._kek.wrap(fresh, subject_id=subject_id),
                            datetime.now(UTC), key_id=key_id)
            try:
                return self._store.put_if_absent(row)
            except CryptoError:  # refused: the KEK changed since the last look
                if attempt == 2:
                    raise
                self._follow_store_kek(force=True)  # a rotation happened since the last look
        raise AssertionError("unreachable")

    def _unwrap_stored(self, stored: StoredKey) -> bytes:
        kek = self._kek_named(stored.kek_id) if stored.wrapped is not None else self._kek
        if kek is None:
            self._follow_store_kek(force=True)
            kek = self._kek_named(stored.kek_id)
        if kek is None and stored.kek_id == self._state.current and self._state.current != self._kek.key_id:
            raise refused_kek(self._state, self._kek.key_id)
        return _unwrap(kek or self._kek, stored)

    def _kek_named(self, kek_id: str) -> KeyEncryptionKey | None:
        for kek in (self._kek, self._previous):
            if kek is not None and kek.key_id == kek_id:
                return kek
        return None

    def _follow_store_kek(self, *, force: bool) -> None:
        """Read the store's current KEK id (at most every ``kek_check_seconds`` unless ``force``).

        The first look claims the store for this KEK if none is recorded yet. When the store
        names another KEK, load it through ``find_kek`` if possible (the old one is kept for
        keys a rotation has not moved yet).
        """
        now = time.monotonic()
        if not force and now - self._checked_at < self.kek_check_seconds:
            return
        state = self._store.kek_state()
        if state.current is None:
            state = self._store.claim_kek(self._kek.key_id)
        self._state, self._checked_at = state, now
        current = state.current
        if current is None or current == self._kek.key_id or self._find_kek is None:
            return
        successor = self._find_kek(current)
        if successor is not None and successor.key_id == current:
            self._previous, self._kek = self._kek, successor

    def _check_index_key_id(self, stored: StoredKey, data_key: bytes) -> None:
        version = index_key_id(data_key)
        if stored.key_id is None:
            self._store.record_key_id(stored.subject_id, version)
        elif stored.key_id != version:
            raise CryptoError(
                f"the blind-index key is recorded as version {stored.key_id} but unwraps to version {version}"
            )


def _unwrap(kek: KeyEncryptionKey, stored: StoredKey) -> bytes:
    if stored.wrapped is None:
        raise KeyErased(stored.subject_id)
    if stored.kek_id != kek.key_id:
        raise kek_mismatch(stored.subject_id, stored.kek_id, kek.key_id)
    return kek.unwrap(stored.wrapped, subject_id=stored.subject_id)


def _check_subject(subject_id: str, *, create: bool) -> None:
    if not subject_id:
        raise InvalidSubject(subject_id, "is empty")
    if subject_id.startswith(RESERVED_PREFIX):
        raise CryptoError(f"subject id {subject_id!r} is reserved: ids starting with {RESERVED_PREFIX!r} belong to evp")
    problem = subject_problem(subject_id) if create else None
    if problem is not None:
        raise InvalidSubject(subject_id, problem)
