"""The Kafka adapter: clients configured the way evp needs them, errors translated once.

Every kafka-python client evp makes is built here from a :class:`Settings`, so the broker
address and its security (TLS, SASL: :class:`events.settings.KafkaSecurity`) reach all of
them alike; nothing else constructs a ``KafkaProducer``/``KafkaConsumer``/``KafkaAdminClient``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from kafka.admin import ConfigResource
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.errors import (
    IllegalSaslStateError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    NodeNotReadyError,
    SaslAuthenticationFailedError,
    TopicAlreadyExistsError,
    UnsupportedSaslMechanismError,
)

from events.errors import EvpError, Retryable, ServiceUnavailable
from events.settings import Settings

#: Refusals of the credentials themselves: retrying with the same settings cannot help.
_AUTH_ERRORS = (IllegalSaslStateError, SaslAuthenticationFailedError, UnsupportedSaslMechanismError)


def where(settings: Settings) -> str:
    """``127.0.0.1:19092 over SASL_SSL (SCRAM-SHA-512 as evp)``: the broker and how evp talks to it."""
    return f"{settings.kafka} over {settings.kafka_security.describe()}"


#: The longest wait between two attempts to reach a broker. kafka-python doubles the wait up
#: to 30 s by default, so a client that failed through a broker restart of a few seconds
#: went on waiting up to half a minute after the broker was back (the soak's Kafka restarts
#: took 16-50 s to recover). The Java client's default is this: 1 s.
RECONNECT_BACKOFF_MAX_MS = 1000


def client_config(settings: Settings) -> dict[str, Any]:
    """The connection part of every client's configuration: bootstrap servers, TLS and SASL.

    The SASL password is read from its 0600 file here, when a client is built, and handed
    to kafka-python only (never logged, never in an environment).
    """
    security = settings.kafka_security
    config: dict[str, Any] = {"bootstrap_servers": settings.kafka, "security_protocol": security.protocol,
                              "reconnect_backoff_max_ms": RECONNECT_BACKOFF_MAX_MS}
    if security.uses_ssl:
        config["ssl_check_hostname"] = True
        for key, path in (("ssl_cafile", security.ssl_cafile), ("ssl_certfile", security.ssl_certfile),
                          ("ssl_keyfile", security.ssl_keyfile)):
            if path is not None:
                config[key] = str(path)
    if security.uses_sasl:
        config["sasl_mechanism"] = security.sasl_mechanism
        config["sasl_plain_username"] = security.sasl_username
        config["sasl_plain_password"] = security.sasl_password()
    return config


class _BootstrapFailures(logging.Handler):
    """Keeps the last reason kafka-python logged for a failed bootstrap connection.

    kafka-python retries its bootstrap until the timeout and then raises a bare
    "Unable to bootstrap"; the cause (TLS refused, a broker that hung up during SASL)
    is only logged. This keeps it for the error evp raises.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.last: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Bootstrap connection to"):
            self.last = record.getMessage().partition(" failed: ")[2] or record.getMessage()


@contextmanager
def _building(settings: Settings) -> Iterator[None]:
    """Around a client's constructor (where it bootstraps): errors translated, a failed bootstrap explained."""
    failures = _BootstrapFailures()
    logger = logging.getLogger("kafka.net.manager")
    logger.addHandler(failures)
    try:
        with kafka_errors(settings):
            try:
                yield
            except KafkaTimeoutError as err:
                if "bootstrap" not in str(err):
                    raise
                security = settings.kafka_security
                causes = f"it does not speak {security.protocol} (EVP_KAFKA_SECURITY_PROTOCOL)"
                if security.uses_ssl:
                    causes += ", its certificate is not signed by EVP_KAFKA_SSL_CAFILE"
                if security.uses_sasl:
                    causes += ", it refused the credentials (EVP_KAFKA_SASL_USERNAME, EVP_KAFKA_SASL_PASSWORD_FILE)"
                raise ServiceUnavailable(
                    "kafka", where(settings),
                    f"could not connect{' and log in' if security.uses_sasl else ''}: {err}; last attempt: "
                    f"{failures.last or 'no answer'}. The broker is down, or {causes}; try `evp services up`",
                ) from err
    finally:
        logger.removeHandler(failures)


@contextmanager
def kafka_errors(settings: Settings) -> Iterator[None]:
    """Turn kafka-python's exceptions into evp's tree, naming the broker and its security protocol."""
    target = where(settings)
    try:
        yield
    except _AUTH_ERRORS as err:
        raise EvpError(
            f"kafka at {target} refused the credentials: {type(err).__name__}: {err} (check "
            "EVP_KAFKA_SASL_USERNAME, EVP_KAFKA_SASL_PASSWORD_FILE and EVP_KAFKA_SASL_MECHANISM)"
        ) from err
    except (KafkaConnectionError, KafkaTimeoutError, NodeNotReadyError) as err:
        raise ServiceUnavailable(
            "kafka", target, f"{type(err).__name__}: {err} (is the broker running, and does it speak "
            f"{settings.kafka_security.protocol}? try `evp services up`; EVP_KAFKA_SECURITY_PROTOCOL sets it)"
        ) from err
    except KafkaError as err:
        # kafka-python marks the errors a retry can cure (a leader moving, a timeout).
        kind = Retryable if getattr(err, "retriable", False) else EvpError
        raise kind(f"kafka at {target}: {type(err).__name__}: {err}") from err


def producer(settings: Settings, **overrides: Any) -> KafkaProducer:
    """An idempotent producer with ``acks=all``.

    ``enable_idempotence`` is passed explicitly: kafka-python silently drops idempotence
    when ``acks``/``retries``/in-flight settings conflict, but refuses loudly when asked
    for it explicitly.
    """
    config: dict[str, Any] = client_config(settings)
    config.update(
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
    with _building(settings):
        return KafkaProducer(**config)


def consumer(settings: Settings, **overrides: Any) -> KafkaConsumer:
    """A consumer that never commits on its own: evp stores positions where the effects are."""
    config: dict[str, Any] = client_config(settings)
    config.update(
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        bootstrap_timeout_ms=10_000,
        max_poll_records=2000,
        # Catch-ups read far more than 1 MiB a partition per fetch; evp reads no client metrics.
        max_partition_fetch_bytes=8 * 1024 * 1024,
        metrics_enabled=False,
    )
    config.update(overrides)
    with _building(settings):
        return KafkaConsumer(**config)


def admin(settings: Settings, **overrides: Any) -> KafkaAdminClient:
    config = client_config(settings)
    config.update(bootstrap_timeout_ms=10_000, request_timeout_ms=20_000)
    config.update(overrides)
    with _building(settings):
        return KafkaAdminClient(**config)


def ensure_topic(
    settings: Settings, name: str, partitions: int, configs: Mapping[str, str] | None = None, *, enforce: bool = False,
) -> None:
    """Create a topic unless it exists. Topics are created deliberately (auto-create is off).

    ``enforce`` also sets ``configs`` on a topic that exists with other values (one made by
    an older evp), through the same admin connection.
    """
    client = admin(settings)
    try:
        with kafka_errors(settings):
            if name not in client.list_topics():
                try:
                    client.create_topics(
                        {name: {"num_partitions": partitions, "replication_factor": 1, "configs": dict(configs or {})}}
                    )
                    return
                except TopicAlreadyExistsError:
                    pass
            if enforce and configs:
                described = client.describe_configs([ConfigResource("topic", name, list(configs))])
                current = {k: v.get("value") for k, v in described.get("topic", {}).get(name, {}).items()}
                if any(current.get(key) != value for key, value in configs.items()):
                    client.alter_configs([ConfigResource("topic", name, configs=dict(configs))], incremental=True)
    finally:
        client.close()


def ensure_event_topics(settings: Settings) -> None:
    ensure_topic(settings, settings.events_topic, settings.partitions, {"min.insync.replicas": "1"})
    ensure_topic(settings, settings.dead_letter_topic, 1)
