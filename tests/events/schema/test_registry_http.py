"""The Confluent Schema Registry REST subset: what a third-party deserializer needs, and the errors.

The point of the façade is the first test: a reader that knows nothing of evp but HTTP,
Kafka and Avro decodes the records evp's SDK wrote.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from fastavro import parse_schema, schemaless_reader
from hypothesis import given, settings as hypothesis_settings, strategies as st
from kafka import KafkaConsumer, TopicPartition

from events.store.client import EventStore
from events.errors import ServiceUnavailable
from events.event import NO_STREAM, Event
from events.schema.registry import KafkaSchemaLog, MemorySchemaLog, SchemaRegistry
from events.schema.registry_http import CONTENT_TYPE, RegistryApi, RegistryHttpServer, serving
from events.privacy.personal import open_fields
from events.settings import Settings

V1 = {"type": "record", "name": "Thing", "namespace": "t", "fields": [{"name": "a", "type": "string"}]}
V2 = {**V1, "fields": [*V1["fields"], {"name": "b", "type": "int", "default": 0}]}
BREAKING = {**V1, "fields": [*V1["fields"], {"name": "missing_default", "type": "int"}]}


def body(schema: Any) -> dict[str, str]:
    return {"schema": json.dumps(schema)}


def call(url: str, method: str = "GET", payload: Any = None, *, raw: bytes | None = None,
         content_type: str = CONTENT_TYPE) -> tuple[int, Any]:
    """Status and decoded JSON body; a body that is not JSON (say, a traceback page) fails the test."""
    data = raw if raw is not None else None if payload is None else json.dumps(payload).encode()
    headers = {"Content-Type": content_type, "Accept": CONTENT_TYPE} if data is not None else {}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.headers["Content-Type"] == CONTENT_TYPE
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        assert err.headers["Content-Type"] == CONTENT_TYPE
        return err.code, json.loads(err.read())


def path(subject: str) -> str:
    return quote(subject, safe="")


@pytest.fixture
def served(services: Settings) -> Iterator[str]:
    """The façade over a schemas topic of its own, on a free port; yields its base URL."""
    log = KafkaSchemaLog(services.with_(topic_prefix=f"t{uuid.uuid4().hex[:10]}"))
    try:
        with serving(RegistryHttpServer(RegistryApi(SchemaRegistry(log)), "127.0.0.1", 0)) as server:
            yield server.url
    finally:
        log.close()


def read_one_record(settings: Settings) -> bytes:
    """The first record on the events topic, read by a plain consumer that knows nothing of evp."""
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka, group_id=None, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(settings.events_topic, p) for p in consumer.partitions_for_topic(settings.events_topic)]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                return bytes(records[0].value)
        raise AssertionError(f"no record on {settings.events_topic} within 20 s")
    finally:
        consumer.close()


# -- against the real broker -----------------------------------------------------------------


@pytest.mark.services
def test_a_reader_that_only_speaks_http_decodes_what_the_sdk_wrote(store: EventStore, settings: Settings) -> None:
    event = Event("AnnotatorRegistered", {"annotator_id": "a1", "name": "Xavier Quint", "email": "xq@example.org"})
    store.append("annotator-a1", event, NO_STREAM)
    store.flush()
    value = read_one_record(settings)
    assert value[0] == 0
    (schema_id,) = struct.unpack(">I", value[1:5])

    # A server of its own over the schemas topic: the log, not the SDK's process, is the truth.
    log = KafkaSchemaLog(settings)
    try:
        with serving(RegistryHttpServer(RegistryApi(SchemaRegistry(log)), "127.0.0.1", 0)) as server:
            status, by_id = call(f"{server.url}/schemas/ids/{schema_id}")
            _, owners = call(f"{server.url}/schemas/ids/{schema_id}/versions")
            subject = f"{settings.events_topic}-digits.AnnotatorRegistered"
            _, latest = call(f"{server.url}/subjects/{path(subject)}/versions/latest")
    finally:
        log.close()

    assert status == 200 and set(by_id) == {"schema"}  # no schemaType for Avro, as Confluent
    datum = schemaless_reader(io.BytesIO(value[5:]), parse_schema(json.loads(by_id["schema"])), None)
    assert isinstance(datum, dict) and datum == store.codec.decode(value).datum
    assert datum["annotator_id"] == "a1"
    for field, plaintext in (("name", "Xavier Quint"), ("email", "xq@example.org")):
        assert datum[field].startswith("evp1:") and plaintext not in datum[field]
    opened = open_fields(store.catalog.policy("AnnotatorRegistered"), str(event.event_id), datum, store.keyring)
    assert (opened["name"], opened["email"]) == ("Xavier Quint", "xq@example.org")  # the real ciphertext
    assert owners == [{"subject": subject, "version": 1}]
    assert latest == {"subject": subject, "version": 1, "id": schema_id, "schema": by_id["schema"]}


@pytest.mark.services
def test_registered_schemas_read_back_by_id_subject_and_version(served: str) -> None:
    subject = "orders.v1-t.Thing"  # dots and dashes, as topic-record-name subjects have
    status, first = call(f"{served}/subjects/{path(subject)}/versions", "POST", body(V1))
    assert status == 200 and set(first) == {"id"}
    assert call(f"{served}/subjects/{path(subject)}/versions", "POST", body(V1)) == (200, first)  # same id
    _, second = call(f"{served}/subjects/{path(subject)}/versions", "POST", body(V2))
    assert second["id"] != first["id"]

    assert call(f"{served}/subjects") == (200, [subject])
    assert call(f"{served}/subjects/{path(subject)}/versions") == (200, [1, 2])
    for version, schema, registered in (("1", V1, first), ("2", V2, second), ("latest", V2, second)):
        status, entry = call(f"{served}/subjects/{path(subject)}/versions/{version}")
        assert status == 200
        assert (entry["subject"], entry["id"], json.loads(entry["schema"])) == (subject, registered["id"], schema)
    _, one = call(f"{served}/subjects/{path(subject)}/versions/1")
    assert one["version"] == 1
    assert call(f"{served}/subjects/{path(subject)}/versions/1/schema") == (200, V1)
    assert call(f"{served}/schemas/ids/{second['id']}") == (200, {"schema": json.dumps(V2, sort_keys=True, separators=(",", ":"))})
    assert call(f"{served}/schemas/ids/{first['id']}/versions") == (200, [{"subject": subject, "version": 1}])
    assert call(f"{served}/config") == (200, {"compatibilityLevel": "BACKWARD"})


@pytest.mark.services
def test_an_incompatible_version_is_refused_with_409_naming_the_field_and_nothing_is_registered(served: str) -> None:
    versions = f"{served}/subjects/s-t.Thing/versions"
    call(versions, "POST", body(V1))

    status, error = call(versions, "POST", body(BREAKING))

    assert status == 409 and error["error_code"] == 409
    assert "missing_default" in error["message"] and "BACKWARD" in error["message"]
    assert call(versions) == (200, [1])
    _, latest = call(f"{versions}/latest")
    assert json.loads(latest["schema"]) == V1
    assert call(versions, "POST", body(V2))[0] == 200 and call(versions) == (200, [1, 2])  # the next one still fits


@pytest.mark.services
def test_lookup_and_compatibility_answer_without_registering(served: str) -> None:
    subject = f"{served}/subjects/s-t.Thing"
    _, registered = call(f"{subject}/versions", "POST", body(V1))
    respelled = {"fields": [{"type": {"type": "string"}, "name": "a"}], "namespace": "t", "name": "Thing", "type": "record"}

    status, found = call(subject, "POST", body(respelled))  # same schema, other spelling
    assert status == 200
    assert (found["id"], found["version"], found["subject"]) == (registered["id"], 1, "s-t.Thing")
    status, missing = call(subject, "POST", body(V2))
    assert (status, missing["error_code"]) == (404, 40403)
    status, no_subject = call(f"{served}/subjects/nobody", "POST", body(V1))
    assert (status, no_subject["error_code"]) == (404, 40401)

    latest = f"{served}/compatibility/subjects/s-t.Thing/versions/latest"
    assert call(latest, "POST", body(V2)) == (200, {"is_compatible": True})
    status, verdict = call(latest, "POST", body(BREAKING))
    assert status == 200 and verdict["is_compatible"] is False
    assert any("missing_default" in message for message in verdict["messages"])
    assert call(f"{subject}/versions") == (200, [1])  # neither lookup nor check registered anything


@pytest.mark.services
def test_errors_carry_confluent_codes_and_clear_messages(served: str) -> None:
    versions = f"{served}/subjects/s-t.Thing/versions"
    call(versions, "POST", body(V1))
    cases: list[tuple[str, str, Any, int, int, str]] = [
        ("GET", f"{served}/subjects/nobody/versions", None, 404, 40401, "nobody"),
        ("GET", f"{served}/subjects/nobody/versions/latest", None, 404, 40401, "nobody"),
        ("GET", f"{versions}/7", None, 404, 40402, "7"),
        ("GET", f"{versions}/zero", None, 422, 42202, "zero"),
        ("GET", f"{served}/schemas/ids/987654", None, 404, 40403, "987654"),
        ("GET", f"{served}/schemas/ids/abc", None, 404, 40403, "abc"),
        ("POST", versions, b"{not json", 422, 42201, "not JSON"),
        ("POST", versions, b"", 422, 42201, "empty"),
        ("POST", versions, {"schema": "{\"type\": \"record\"}"}, 422, 42201, "schema"),
        ("POST", versions, {"schema": 5}, 422, 42201, "string"),
        ("POST", versions, {"schema": json.dumps(V2), "schemaType": "PROTOBUF"}, 422, 42201, "PROTOBUF"),
        ("GET", f"{served}/no/such/thing", None, 404, 404, "/no/such/thing"),
        ("DELETE", f"{versions}/1", None, 405, 405, "GET"),
    ]
    for method, url, payload, status, code, named in cases:
        raw = payload if isinstance(payload, bytes) else None
        got, error = call(url, method, None if raw is not None else payload, raw=raw)
        assert (got, error["error_code"]) == (status, code), (method, url, error)
        assert named in error["message"] and "Traceback" not in error["message"], error
    got, error = call(versions, "POST", raw=json.dumps(body(V2)).encode(), content_type="text/html")
    assert (got, error["error_code"]) == (415, 415) and "application/json" in error["message"]
    assert call(versions, "POST", body(V2), content_type="application/json")[0] == 200  # plain JSON is fine
    assert call(versions) == (200, [1, 2])  # no error registered anything


@pytest.mark.services
def test_the_cli_serves_the_schemas_topic_and_stops_on_sigterm(settings: Settings, tmp_path: Path) -> None:
    subject = f"{settings.events_topic}-t.Thing"
    log = KafkaSchemaLog(settings)
    try:
        SchemaRegistry(log).register(subject, V1)
    finally:
        log.close()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVP_")} | settings.to_env()
    command = [sys.executable, "-m", "events.cli", "registry"]
    server = subprocess.Popen([*command, "serve", "--port", str(port)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        answer = None
        deadline = time.monotonic() + 30
        while answer is None and time.monotonic() < deadline and server.poll() is None:
            try:
                answer = call(f"http://127.0.0.1:{port}/subjects")
            except urllib.error.URLError:
                time.sleep(0.1)
        if answer is None:
            server.kill()
            pytest.fail(f"`evp registry serve` never answered: {server.communicate()}")
        assert answer == (200, [subject])
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=15) == 0
        out, err = server.communicate()
        assert f"http://127.0.0.1:{port}" in out and "stopped" in out, (out, err)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()

    listed = subprocess.run([*command, "subjects", "--json"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == [{"subject": subject, "versions": [1], "ids": [1]}]


# -- pure logic, over a log in memory ----------------------------------------------------------


class UnreachableLog:
    """A schema log whose broker is down, to see what the façade answers then."""

    def append(self, key: bytes, value: bytes) -> None:
        raise ServiceUnavailable("kafka", "127.0.0.1:1", "connection refused")

    def read_all(self) -> list[tuple[bytes, bytes]]:
        raise ServiceUnavailable("kafka", "127.0.0.1:1", "connection refused")


def test_an_unreachable_log_answers_500_naming_the_broker_not_a_traceback() -> None:
    with serving(RegistryHttpServer(RegistryApi(SchemaRegistry(UnreachableLog())), "127.0.0.1", 0)) as server:
        for url, method, payload in ((f"{server.url}/subjects", "GET", None),
                                     (f"{server.url}/schemas/ids/1", "GET", None),
                                     (f"{server.url}/subjects/s/versions", "POST", body(V1))):
            status, error = call(url, method, payload)
            assert (status, error["error_code"]) == (500, 50001), error
            assert "kafka at 127.0.0.1:1" in error["message"]


@hypothesis_settings(max_examples=60, deadline=None)
@given(subject=st.text(min_size=1, max_size=40))
def test_any_subject_name_round_trips_through_an_encoded_path(subject: str) -> None:
    api = RegistryApi(SchemaRegistry(MemorySchemaLog()))
    registered = api.handle("POST", f"/subjects/{path(subject)}/versions", json.dumps(body(V1)).encode())
    assert registered.status == 200, registered.body
    assert api.handle("GET", "/subjects").body == [subject]
    assert api.handle("GET", f"/subjects/{path(subject)}/versions/latest").body["subject"] == subject


SEGMENTS = st.sampled_from(["subjects", "schemas", "ids", "versions", "latest", "config", "compatibility",
                            "schema", "1", "-1", "0", "x", "s-t.Thing", "", "%2F", "%ZZ"])


@hypothesis_settings(max_examples=300, deadline=None)
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]), segments=st.lists(SEGMENTS, max_size=6),
       payload=st.one_of(st.binary(max_size=40), st.just(json.dumps(body(V1)).encode()),
                         st.just(json.dumps(body(BREAKING)).encode())))
def test_every_request_gets_json_and_every_error_a_confluent_code(method: str, segments: list[str], payload: bytes) -> None:
    api = RegistryApi(SchemaRegistry(MemorySchemaLog()))
    api.handle("POST", "/subjects/s-t.Thing/versions", json.dumps(body(V1)).encode())

    reply = api.handle(method, "/" + "/".join(segments), payload)

    json.dumps(reply.body)  # serializable
    if reply.status >= 400:
        assert set(reply.body) == {"error_code", "message"}
        assert str(reply.body["error_code"]).startswith(str(reply.status))
        assert reply.status in {404, 405, 409, 422}, reply  # never a 500 for a request's own faults
