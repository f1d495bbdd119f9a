"""Kafka security: settings validated by name, secrets never shown, every client over TLS + SASL.

The local runner's broker speaks SASL_SSL (SCRAM-SHA-512) and nothing else; the tests
against it get their settings from ``services.py env`` like every other client.
"""

from __future__ import annotations

import socket
import ssl
import struct
from pathlib import Path

import psycopg
import pytest

from events.adapters.kafka import admin, client_config, consumer
from events.errors import ConfigurationError, EvpError, ServiceUnavailable
from events.event import Event
from events.settings import KafkaSecurity, Settings
from events.store.client import EventStore
from projections.runner import ProjectionRunner
from tests.support.examples import DIGITS, project
from tests.support.views import SamplesView, sample_rows
from trainer.snapshot import create_snapshot, load_dataset, verify_snapshot

MARKER = "pw~kafka-5ecret-marker"


def password_file(folder: Path, text: str = MARKER, mode: int = 0o600) -> Path:
    path = folder / "kafka-password"
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


def sasl_ssl(folder: Path, **changes: object) -> KafkaSecurity:
    values: dict[str, object] = dict(protocol="SASL_SSL", sasl_username="evp",
                                     sasl_password_file=password_file(folder), ssl_cafile=folder / "ca.pem")
    values.update(changes)
    return KafkaSecurity(**values)  # type: ignore[arg-type]


# -- settings, pure ------------------------------------------------------------------------


def test_the_default_is_plaintext_and_reads_no_file() -> None:
    security = Settings.from_env({}).kafka_security
    assert security == KafkaSecurity() and security.protocol == "PLAINTEXT" and not security.uses_sasl
    assert client_config(Settings()) == {"bootstrap_servers": "127.0.0.1:19092", "security_protocol": "PLAINTEXT",
                                         "reconnect_backoff_max_ms": 1000}


@pytest.mark.parametrize(("env", "named"), [
    ({"EVP_KAFKA_SECURITY_PROTOCOL": "TLS"}, "EVP_KAFKA_SECURITY_PROTOCOL 'TLS' is not one of"),
    ({"EVP_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "EVP_KAFKA_SASL_MECHANISM": "GSSAPI",
      "EVP_KAFKA_SASL_USERNAME": "evp", "EVP_KAFKA_SASL_PASSWORD_FILE": "/pw"}, "EVP_KAFKA_SASL_MECHANISM 'GSSAPI'"),
    ({"EVP_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "EVP_KAFKA_SASL_PASSWORD_FILE": "/pw"}, "needs EVP_KAFKA_SASL_USERNAME"),
    ({"EVP_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "EVP_KAFKA_SASL_USERNAME": "evp"},
     "needs EVP_KAFKA_SASL_PASSWORD_FILE"),
    ({"EVP_KAFKA_SASL_USERNAME": "evp"}, "EVP_KAFKA_SECURITY_PROTOCOL=PLAINTEXT does not use SASL"),
    ({"EVP_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "EVP_KAFKA_SASL_USERNAME": "evp",
      "EVP_KAFKA_SASL_PASSWORD_FILE": "/pw", "EVP_KAFKA_SSL_CAFILE": "/ca.pem"}, "does not use TLS"),
    ({"EVP_KAFKA_SECURITY_PROTOCOL": "SSL", "EVP_KAFKA_SSL_KEYFILE": "/key.pem"}, "without EVP_KAFKA_SSL_CERTFILE"),
    ({"EVP_KAFKA_SASL_PASSWORD": MARKER}, "EVP_KAFKA_SASL_PASSWORD is not read"),
])
def test_bad_security_settings_are_refused_naming_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigurationError, match=named) as raised:
        Settings.from_env(env)
    assert MARKER not in str(raised.value)


def test_the_settings_travel_to_a_child_and_back(tmp_path: Path) -> None:
    security = sasl_ssl(tmp_path, sasl_mechanism="SCRAM-SHA-256", ssl_certfile=tmp_path / "c.pem",
                        ssl_keyfile=tmp_path / "k.pem")
    settings = Settings(kafka_security=security)
    env = settings.to_env()
    assert env["EVP_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL" and env["EVP_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-256"
    assert env["EVP_KAFKA_SASL_PASSWORD_FILE"] == str(tmp_path / "kafka-password")
    assert Settings.from_env(env).kafka_security == security
    assert MARKER not in " ".join(env.values())


def test_the_password_is_in_no_repr_and_reaches_only_the_client(tmp_path: Path) -> None:
    settings = Settings(kafka_security=sasl_ssl(tmp_path))
    for shown in (repr(settings), str(settings), repr(settings.kafka_security), settings.kafka_security.describe()):
        assert MARKER not in shown
    assert "kafka_security=KafkaSecurity(protocol='SASL_SSL'" in repr(settings)
    config = client_config(settings)
    assert config["sasl_plain_password"] == MARKER  # read from the file, for kafka-python only
    assert (config["security_protocol"], config["sasl_mechanism"], config["sasl_plain_username"]) == (
        "SASL_SSL", "SCRAM-SHA-512", "evp")
    assert config["ssl_cafile"] == str(tmp_path / "ca.pem") and config["ssl_check_hostname"] is True


def test_a_password_file_others_can_read_is_refused(tmp_path: Path) -> None:
    security = sasl_ssl(tmp_path)
    assert security.sasl_password_file is not None
    security.sasl_password_file.chmod(0o644)
    with pytest.raises(ConfigurationError, match=r"EVP_KAFKA_SASL_PASSWORD_FILE .* readable by others \(mode 0644\)"):
        security.sasl_password()
    security.sasl_password_file.unlink()
    with pytest.raises(ConfigurationError, match="EVP_KAFKA_SASL_PASSWORD_FILE .* cannot be read"):
        security.sasl_password()


# -- against the running broker ------------------------------------------------------------


def require_sasl_ssl(settings: Settings) -> KafkaSecurity:
    security = settings.kafka_security
    assert security.protocol == "SASL_SSL", (
        f"the tests' broker should be the runner's SASL_SSL one; got {security.describe()} "
        "(run the tests with `eval \"$(python3 platform/services.py env)\"`, as `make test` does)"
    )
    return security


def host_port(settings: Settings) -> tuple[str, int]:
    host, _, port = settings.kafka.split(",")[0].rpartition(":")
    return host.strip("[]"), int(port)


@pytest.mark.services
def test_the_broker_listens_only_with_tls_and_refuses_a_plaintext_kafka_request(services: Settings) -> None:
    security = require_sasl_ssl(services)
    address = host_port(services)
    context = ssl.create_default_context(cafile=str(security.ssl_cafile) if security.ssl_cafile else None)
    with socket.create_connection(address, timeout=10) as raw, context.wrap_socket(raw, server_hostname=address[0]) as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")  # the certificate verifies against EVP_KAFKA_SSL_CAFILE
    # ApiVersions v0 in the clear: a PLAINTEXT listener answers it; this one never does.
    client_id = b"evp-test"
    body = struct.pack(">hhih", 18, 0, 7, len(client_id)) + client_id
    with socket.create_connection(address, timeout=10) as raw:
        raw.sendall(struct.pack(">i", len(body)) + body)
        try:
            answer = raw.recv(4096)
        except (ConnectionResetError, TimeoutError):
            answer = b""
    assert not (len(answer) >= 8 and struct.unpack(">i", answer[4:8])[0] == 7), "a PLAINTEXT request was answered"


@pytest.mark.services
def test_a_client_without_credentials_is_refused_naming_the_broker_and_protocol(services: Settings) -> None:
    security = require_sasl_ssl(services)
    for anonymous in (KafkaSecurity(), KafkaSecurity(protocol="SSL", ssl_cafile=security.ssl_cafile)):
        with pytest.raises(ServiceUnavailable) as raised:
            consumer(services.with_(kafka_security=anonymous), bootstrap_timeout_ms=3000)
        message = str(raised.value)
        assert f"kafka at {services.kafka} over {anonymous.protocol} is unavailable" in message
        assert "EVP_KAFKA_SECURITY_PROTOCOL" in message


@pytest.mark.services
def test_a_wrong_password_is_refused_naming_the_broker_protocol_and_the_password_file(
    services: Settings, tmp_path: Path
) -> None:
    security = require_sasl_ssl(services)
    wrong = KafkaSecurity("SASL_SSL", security.sasl_mechanism, security.sasl_username,
                          password_file(tmp_path, "not-the-password"), security.ssl_cafile)
    with pytest.raises(EvpError) as raised:
        admin(services.with_(kafka_security=wrong), bootstrap_timeout_ms=3000)
    message = str(raised.value)
    assert f"{services.kafka} over SASL_SSL ({security.sasl_mechanism} as {security.sasl_username})" in message
    assert "EVP_KAFKA_SASL_PASSWORD_FILE" in message and "not-the-password" not in message


@pytest.mark.services
def test_append_relay_view_and_snapshot_all_run_over_sasl_ssl(store: EventStore, settings: Settings) -> None:
    """One deployment end to end on the secured broker: ledger → relay → view and snapshot."""
    require_sasl_ssl(settings)
    for i in range(12):
        features = [float((i * 5 + k) % 13) for k in range(64)]
        store.append(f"sample-{i}", Event("SampleSubmitted", {"sample_id": f"s{i:03d}", "annotator_id": "a1",
                                                               "features": features, "label": i % 10}, actor="a1"))
    assert store.flush() == 12  # the relay's producer, over SASL_SSL
    with ProjectionRunner(settings, SamplesView()) as runner:  # its consumer and admin, too
        assert runner.catch_up().applied == 12
    with psycopg.connect(settings.database_url) as conn:
        assert sorted(sample_rows(conn)) == [f"s{i:03d}" for i in range(12)]
    digits = project(DIGITS)
    manifest = create_snapshot(store, load_dataset(digits, "digits"))  # pinned end offsets + a pinned read
    assert manifest.row_count == 12 and manifest.record_count == 12
    assert verify_snapshot(store, manifest.snapshot_id, digits).content_hash == manifest.content_hash
