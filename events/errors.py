"""One error tree for evp.

Every failure evp raises on purpose derives from :class:`EvpError`; those worth trying
again derive from :class:`Retryable`. Driver errors (kafka-python, psycopg) are translated
once, at the adapter boundary, with ``raise ... from err`` so that callers never catch a
third-party exception.
"""

from __future__ import annotations


class EvpError(Exception):
    """Root of every error evp raises on purpose."""


class ConfigurationError(EvpError):
    """A setting is missing or malformed."""


class Retryable(EvpError):
    """A failure that may pass when the same call is made again: a service restarting, a
    lost connection, a leader moving. :mod:`events.adapters.retry` retries exactly these;
    every other :class:`EvpError` is a verdict, and retrying it would only repeat it."""


class ServiceUnavailable(Retryable):
    """Kafka or PostgreSQL cannot be reached; the message names which and where."""

    def __init__(self, service: str, target: str, reason: str) -> None:
        self.service, self.target, self.reason = service, target, reason
        super().__init__(f"{service} at {target} is unavailable: {reason}")


class OutcomeUnknown(Retryable):
    """An append was sent, then the connection broke before its answer came: it may have committed.

    The ledger's rule makes the retry safe: appending the same event ids again answers with
    their original positions and ``duplicate=True`` when the first try committed (never a
    :class:`ConcurrencyError`, whatever the expected version), and appends them once when it
    did not.
    """

    def __init__(self, stream_id: str, event_ids: tuple[object, ...], reason: str) -> None:
        self.stream_id, self.event_ids, self.reason = stream_id, event_ids, reason
        shown = f"event {event_ids[0]}" if len(event_ids) == 1 else f"{len(event_ids)} events from {event_ids[0]}"
        super().__init__(
            f"append to {stream_id!r} ({shown}): the outcome is unknown: the connection to PostgreSQL broke after the "
            f"append was sent ({reason}), so it may or may not have committed. Retrying it with the same event ids "
            "(on a new connection) is safe: if it had committed, the ledger answers the retry as a duplicate "
            "(duplicate=True, the original positions), never as a conflict; if not, the retry appends it"
        )


class SchemaError(EvpError):
    """A schema is unknown, malformed or cannot be registered."""


class IncompatibleSchema(SchemaError):
    """A new schema version would break readers of the versions before it."""

    def __init__(self, subject: str, field: str, reason: str) -> None:
        self.subject, self.field, self.reason = subject, field, reason
        super().__init__(f"schema for {subject!r} is not BACKWARD compatible: field {field!r}: {reason}")


class InvalidEvent(EvpError):
    """An event does not match its schema; nothing was written or sent."""

    def __init__(self, event_type: str, field: str, reason: str) -> None:
        self.event_type, self.field, self.reason = event_type, field, reason
        super().__init__(f"invalid {event_type}: field {field!r}: {reason}")


class DecodeError(EvpError):
    """Bytes read from Kafka are not a record evp can decode."""


class ConcurrencyError(EvpError):
    """An append's expected version did not match the stream; nothing was written."""

    def __init__(self, stream_id: str, expected: object, actual: int | None) -> None:
        self.stream_id, self.expected, self.actual = stream_id, expected, actual
        shown = "no stream" if actual is None else actual
        super().__init__(f"stream {stream_id!r}: expected version {expected}, actual {shown}")


class UniquenessViolation(EvpError):
    """A unique reservation is already held by another stream."""


class CryptoError(EvpError):
    """A key is missing or wrong, or a ciphertext was tampered with or moved."""


class KeyErased(CryptoError):
    """The data subject's key was deleted: the value is erased, not corrupt."""

    def __init__(self, subject: str) -> None:
        self.subject = subject
        super().__init__(f"personal data of subject {subject!r} was erased")


class NotFound(EvpError):
    """A stream, snapshot, run or other named thing does not exist."""


class IntegrityError(EvpError):
    """A hash or chain did not match what was recorded."""


class InvalidDataset(EvpError):
    """Training examples are malformed (shape, type, range, duplicate id); nothing was trained."""

    def __init__(self, field: str, reason: str) -> None:
        self.field, self.reason = field, reason
        super().__init__(f"invalid training examples: {field}: {reason}")


class LineageError(EvpError):
    """A lineage source (entry-point group ``evp.lineage``) answered something that is not a report."""

    def __init__(self, source: str, reason: str) -> None:
        self.source, self.reason = source, reason
        super().__init__(f"lineage source {source!r}: {reason}")


class ErasureHookError(EvpError):
    """An erasure hook (entry-point group ``evp.erasure``) answered something that is not a list of purges."""

    def __init__(self, hook: str, reason: str) -> None:
        self.hook, self.reason = hook, reason
        super().__init__(f"erasure hook {hook!r}: {reason}")


class ErasureIncomplete(EvpError):
    """The erasure stands (key destroyed, erasure recorded) but an erasure hook failed to purge."""

    def __init__(self, subject_id: str, failures: dict[str, str]) -> None:
        self.subject_id, self.failures = subject_id, dict(failures)
        failed = "; ".join(f"hook {hook!r}: {reason}" for hook, reason in self.failures.items())
        super().__init__(f"the erasure of {subject_id!r} stands (its data key is destroyed and the erasure recorded), "
                         f"but its purge is not finished: {failed}; fix that and run evp forget {subject_id} again, "
                         "which finishes the purge")


class SnapshotPurged(EvpError):
    """A snapshot's shard files were deleted by an erasure: it cannot be read, verified or re-materialized."""

    def __init__(self, snapshot_id: str, subject_id: str, erasure: str, when: str, *, finished: bool,
                 dataset: str, doing: str = "") -> None:
        self.snapshot_id, self.subject_id, self.erasure, self.when = snapshot_id, subject_id, erasure, when
        self.finished, self.dataset = finished, dataset
        purge = (f"was purged by the erasure of {subject_id!r} ({erasure}) at {when}" if finished else
                 f"is being purged by the erasure of {subject_id!r} ({erasure}), begun at {when} and not finished "
                 f"(run evp forget {subject_id} again to finish it)")
        super().__init__(f"{doing + ': ' if doing else ''}snapshot {snapshot_id} {purge}: its shard files held that "
                         "subject's personal data decrypted and were deleted, so it can no longer be loaded, verified "
                         f"or re-materialized; cut a new snapshot (evp snapshot create --dataset {dataset}) and train "
                         "on it")
