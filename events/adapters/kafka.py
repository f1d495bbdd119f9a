"""The Kafka adapter: clients configured the way evp needs them, errors translated once."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError, NodeNotReadyError, TopicAlreadyExistsError

from events.errors import EvpError, Retryable, ServiceUnavailable
from events.settings import Settings


@contextmanager
def kafka_errors(bootstrap: str) -> Iterator[None]:
    """Turn kafka-python's exceptions into evp's tree, naming the broker."""
    try:
        yield
    except (KafkaConnectionError, KafkaTimeoutError, NodeNotReadyError) as err:
        raise ServiceUnavailable(
            "kafka", bootstrap, f"{type(err).__name__}: {err} (is the broker running? try `evp services up`)"
        ) from err
    except KafkaError as err:
        # kafka-python marks the errors a retry can cure (a leader moving, a timeout).
        kind = Retryable if getattr(err, "retriable", False) else EvpError
        raise kind(f"kafka at {bootstrap}: {type(err).__name__}: {err}") from err


def producer(bootstrap: str, **overrides: Any) -> KafkaProducer:
    """An idempotent producer with ``acks=all``.

    ``enable_idempotence`` is passed explicitly: kafka-python silently drops idempotence
    when ``acks``/``retries``/in-flight settings conflict, but refuses loudly when asked
    for it explicitly.
    """
    config: dict[str, Any] = dict(
        bootstrap_servers=bootstrap,
        enable_idempotence=True,
        acks="all",
        linger_ms=5,
        batch_size=256 * 1024,
        max_in_flight_requests_per_connection=5,
        request_timeout_ms=15_000,
        delivery_timeout_ms=60_000,
        bootstrap_timeout_ms=10_000,
    )
    config.update(overrides)
    with kafka_errors(bootstrap):
        return KafkaProducer(**config)


def consumer(bootstrap: str, **overrides: Any) -> KafkaConsumer:
    """A consumer that never commits on its own: evp stores positions where the effects are."""
    config: dict[str, Any] = dict(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        bootstrap_timeout_ms=10_000,
        max_poll_records=2000,
    )
    config.update(overrides)
    with kafka_errors(bootstrap):
        return KafkaConsumer(**config)


def admin(bootstrap: str) -> KafkaAdminClient:
    with kafka_errors(bootstrap):
        return KafkaAdminClient(bootstrap_servers=bootstrap, bootstrap_timeout_ms=10_000, request_timeout_ms=20_000)


def ensure_topic(bootstrap: str, name: str, partitions: int, configs: Mapping[str, str] | None = None) -> None:
    """Create a topic unless it exists. Topics are created deliberately (auto-create is off)."""
    client = admin(bootstrap)
    try:
        with kafka_errors(bootstrap):
            if name in client.list_topics():
                return
            try:
                client.create_topics(
                    {name: {"num_partitions": partitions, "replication_factor": 1, "configs": dict(configs or {})}}
                )
            except TopicAlreadyExistsError:
                pass
    finally:
        client.close()


def ensure_event_topics(settings: Settings) -> None:
    ensure_topic(settings.kafka, settings.events_topic, settings.partitions, {"min.insync.replicas": "1"})
    ensure_topic(settings.kafka, settings.dead_letter_topic, 1)
