"""The Confluent Schema Registry REST subset: what a third-party deserializer needs, and the errors.

The point of the façade is the first test: a reader that knows nothing of evp but HTTP,
Kafka and Avro decodes the records evp's SDK wrote.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import secrets
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
from kafka import TopicPartition

from events.adapters.kafka import consumer as kafka_consumer
from events.store.client import EventStore
from events.errors import ServiceUnavailable
from events.event import NO_STREAM, Event
from events.schema.registry import MAX_SCHEMA_BYTES, MAX_SCHEMA_ID, KafkaSchemaLog, MemorySchemaLog, SchemaRegistry
from events.schema.registry_http import (
    CONTENT_TYPE, MAX_BODY_BYTES, RegistryApi, RegistryHttpServer, WritePolicy, serving,
)
from events.privacy.personal import open_fields
from events.settings import Settings

REPO = Path(__file__).resolve().parents[3]

V1 = {"type": "record", "name": "Thing", "namespace": "t", "fields": [{"name": "a", "type": "string"}]}
V2 = {**V1, "fields": [*V1["fields"], {"name": "b", "type": "int", "default": 0}]}
BREAKING = {**V1, "fields": [*V1["fields"], {"name": "missing_default", "type": "int"}]}


def body(schema: Any) -> dict[str, str]:
    return {"schema": json.dumps(schema)}


TOKEN = secrets.token_urlsafe(32)


def call(url: str, method: str = "GET", payload: Any = None, *, raw: bytes | None = None,
         content_type: str = CONTENT_TYPE, token: str | None = TOKEN) -> tuple[int, Any]:
    """Status and decoded JSON body; a body that is not JSON (say, a traceback page) fails the test."""
    data = raw if raw is not None else None if payload is None else json.dumps(payload).encode()
    headers = {"Content-Type": content_type, "Accept": CONTENT_TYPE} if data is not None else {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
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
    """The façade over a schemas topic of its own, on a free port, writable with TOKEN; yields its base URL."""
    log = KafkaSchemaLog(services.with_(topic_prefix=f"t{uuid.uuid4().hex[:10]}"))
    try:
        with serving(RegistryHttpServer(RegistryApi(SchemaRegistry(log), WritePolicy(TOKEN)), "127.0.0.1", 0)) as server:
            yield server.url
    finally:
        log.close()


def read_one_record(settings: Settings) -> bytes:
    """The first record on the events topic, read by a consumer that decodes nothing (only connects the evp way)."""
    consumer = kafka_consumer(settings, group_id=None)
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
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVP_")} | settings.to_env() | {"PYTHONPATH": str(REPO)}
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
        status, refused = call(f"http://127.0.0.1:{port}/subjects/{path(subject)}/versions", "POST", body(V2))
        assert (status, refused["error_code"]) == (403, 40301)  # read-only unless --allow-writes
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=15) == 0
        out, err = server.communicate()
        assert f"http://127.0.0.1:{port}" in out and "read-only" in out and "stopped" in out, (out, err)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()

    listed = subprocess.run([*command, "subjects", "--json"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == [{"subject": subject, "versions": [1], "ids": [1]}]


# -- pure logic, over a log in memory ----------------------------------------------------------


WRITE = {"Host": "localhost:18081", "Authorization": f"Bearer {TOKEN}", "Content-Type": CONTENT_TYPE}


def writable_api(log: MemorySchemaLog | None = None) -> RegistryApi:
    """A RegistryApi over a log in memory that takes writes carrying WRITE's headers."""
    registry = SchemaRegistry(log if log is not None else MemorySchemaLog())
    return RegistryApi(registry, WritePolicy(TOKEN).serving_at("127.0.0.1", 18081))


class UnreachableLog:
    """A schema log whose broker is down, to see what the façade answers then."""

    def append(self, key: bytes, value: bytes) -> None:
        raise ServiceUnavailable("kafka", "127.0.0.1:1", "connection refused")

    def read_all(self) -> list[tuple[bytes, bytes]]:
        raise ServiceUnavailable("kafka", "127.0.0.1:1", "connection refused")


def test_an_unreachable_log_answers_500_naming_the_broker_not_a_traceback() -> None:
    api = RegistryApi(SchemaRegistry(UnreachableLog()), WritePolicy(TOKEN))
    with serving(RegistryHttpServer(api, "127.0.0.1", 0)) as server:
        for url, method, payload in ((f"{server.url}/subjects", "GET", None),
                                     (f"{server.url}/schemas/ids/1", "GET", None),
                                     (f"{server.url}/subjects/s/versions", "POST", body(V1))):
            status, error = call(url, method, payload)
            assert (status, error["error_code"]) == (500, 50001), error
            assert "kafka at 127.0.0.1:1" in error["message"]


@hypothesis_settings(max_examples=60, deadline=None)
@given(subject=st.text(min_size=1, max_size=40))
def test_any_subject_name_round_trips_through_an_encoded_path(subject: str) -> None:
    api = writable_api()
    registered = api.handle("POST", f"/subjects/{path(subject)}/versions", json.dumps(body(V1)).encode(), WRITE)
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
    api = writable_api()
    api.handle("POST", "/subjects/s-t.Thing/versions", json.dumps(body(V1)).encode(), WRITE)

    reply = api.handle(method, "/" + "/".join(segments), payload, WRITE)

    json.dumps(reply.body)  # serializable
    if reply.status >= 400:
        assert set(reply.body) == {"error_code", "message"}
        assert str(reply.body["error_code"]).startswith(str(reply.status))
        assert reply.status in {404, 405, 409, 422}, reply  # never a 500 for a request's own faults


# -- who may write, and what any request may cost ----------------------------------------------


def send(port: int, method: str, target: str, headers: dict[str, str], payload: bytes = b"") -> tuple[int, Any]:
    """One request over a raw socket, with exactly these headers (no Host or length added); status and JSON body."""
    lines = [f"{method} {target} HTTP/1.1", *(f"{name}: {value}" for name, value in headers.items()), "", ""]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall("\r\n".join(lines).encode() + payload)
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.getheader("Content-Type") == CONTENT_TYPE
        return response.status, json.loads(response.read())


def write_headers(port: int, payload: bytes, **changes: str | None) -> dict[str, str]:
    headers: dict[str, str | None] = {"Host": f"127.0.0.1:{port}", "Authorization": f"Bearer {TOKEN}",
                                      "Content-Type": CONTENT_TYPE, "Content-Length": str(len(payload))}
    headers.update({name.replace("_", "-").title(): value for name, value in changes.items()})
    return {name: value for name, value in headers.items() if value is not None}


def test_a_read_only_server_refuses_every_write_and_answers_reads() -> None:
    log = MemorySchemaLog()
    SchemaRegistry(log).register("s", V1)
    with serving(RegistryHttpServer(RegistryApi(SchemaRegistry(log)), "127.0.0.1", 0)) as server:
        for method, target in (("POST", "/subjects/s/versions"), ("PUT", "/config"), ("PUT", "/config/s"),
                               ("DELETE", "/subjects/s"), ("DELETE", "/subjects/s/versions/1")):
            status, error = call(f"{server.url}{target}", method, body(V2))  # with the token, even
            assert (status, error["error_code"]) == (403, 40301) and "--allow-writes" in error["message"]
        assert call(f"{server.url}/subjects/s/versions") == (200, [1])
        assert call(f"{server.url}/subjects/s", "POST", body(V1))[0] == 200  # lookup reads
        assert call(f"{server.url}/compatibility/subjects/s/versions/latest", "POST", body(V2))[0] == 200
    assert len(log.read_all()) == 1


def test_a_server_bounds_connections_and_times_out_silent_sockets() -> None:
    api = RegistryApi(SchemaRegistry(MemorySchemaLog()))
    with serving(RegistryHttpServer(api, "127.0.0.1", 0, max_threads=2, timeout_s=1.0)) as server:
        port = int(server.server_address[1])
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        try:
            time.sleep(0.3)  # both are accepted and hold a thread each, waiting for a request line
            status, busy = send(port, "GET", "/subjects", {"Host": f"127.0.0.1:{port}"})
            assert (status, busy["error_code"]) == (503, 50301)
            started = time.monotonic()
            assert idle[0].recv(1) == b""  # the server hung up on the silent socket
            assert time.monotonic() - started < 5
        finally:
            for sock in idle:
                sock.close()
        time.sleep(0.3)
        assert send(port, "GET", "/subjects", {"Host": f"127.0.0.1:{port}"}) == (200, [])


def nested_text(depth: int) -> str:
    return '{"type":"array","items":' * depth + '"int"' + "}" * depth


def bad_requests(port: int) -> st.SearchStrategy[tuple[str, str, dict[str, str], bytes, int]]:
    """(what, target, headers, body, expected status) for every kind of request the server must refuse."""
    versions = "/subjects/fz-t.Thing/versions"

    def write(payload: bytes, **changes: str | None) -> tuple[str, dict[str, str], bytes]:
        return versions, write_headers(port, payload, **changes), payload

    good = json.dumps(body(V1)).encode()
    return st.one_of(
        st.integers(33, 5000).map(lambda d: ("deep", *write(json.dumps({"schema": nested_text(d)}).encode()), 422)),
        st.integers(33, 5000).map(lambda d: ("deep body", *write(b'{"schema": "x", "x": ' + b"[" * d + b"]" * d + b"}"),
                                             422)),
        st.integers(1, 4).map(lambda n: ("huge schema", *write(json.dumps(body({**V1, "doc": "x" * (MAX_SCHEMA_BYTES * n // 4 + MAX_SCHEMA_BYTES)})).encode()), 422)),
        st.integers(1, 10**9).map(lambda n: ("huge body", versions, write_headers(port, b"", content_length=str(MAX_BODY_BYTES + n)), b"", 413)),
        st.binary(max_size=80).map(lambda junk: ("malformed", *write(junk), 422)),
        st.sampled_from(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", "application/octet-stream", None])
            .map(lambda ct: ("content type", *write(good, content_type=ct), 415)),
        st.sampled_from([None, "Bearer", f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x", f"Basic {TOKEN}", TOKEN, "Bearer " + "x" * 5000])
            .map(lambda auth: ("token", *write(good, authorization=auth), 401)),
        st.sampled_from(["evil.example", f"evil.example:{port}", "127.0.0.1", "localhost", f"127.0.0.1:{port + 1}", "", None])
            .map(lambda host: ("host", *write(good, host=host), 421)),
        st.sampled_from([0, MAX_SCHEMA_ID + 1, 2**32 - 1, 10**30]).map(
            lambda n: ("absurd id", f"/schemas/ids/{n}", {"Host": f"127.0.0.1:{port}"}, b"", 404)),
        st.sampled_from([0, MAX_SCHEMA_ID + 1, 2**32 - 1, 10**30]).map(
            lambda n: ("absurd version", f"/subjects/fz-t.Thing/versions/{n}", {"Host": f"127.0.0.1:{port}"}, b"", 422)),
    )


RECORDS: st.SearchStrategy[tuple[str, Any]] = st.one_of(
    st.integers(33, 3000).map(lambda d: ("deep", d)),
    st.sampled_from([0, -1, MAX_SCHEMA_ID, 2**32 - 1, 10**25]).map(lambda n: ("absurd", n)),
    st.binary(max_size=60).map(lambda junk: ("bytes", junk)),
)


def fold_low(log: MemorySchemaLog) -> SchemaRegistry:
    registry, old = SchemaRegistry(log), sys.getrecursionlimit()
    depth, frame = 0, sys._getframe()
    while frame is not None:
        depth, frame = depth + 1, frame.f_back  # type: ignore[assignment]
    sys.setrecursionlimit(depth + 120)
    try:
        registry.ids()
    finally:
        sys.setrecursionlimit(old)
    return registry


@hypothesis_settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_fuzzed_requests_and_records_are_refused_and_every_reader_agrees_on_every_id(data: st.DataObject) -> None:
    """Deep, huge, malformed, wrong-type, tokenless, foreign-Host and absurd-id requests, and raw
    records appended to the log between them: each request gets its status, nothing it sent is
    registered, and fresh readers (one with a lowered recursion limit) fold the same ids."""
    log = MemorySchemaLog()
    server_registry = SchemaRegistry(log)
    with serving(RegistryHttpServer(RegistryApi(server_registry, WritePolicy(TOKEN)), "127.0.0.1", 0)) as server:
        port = int(server.server_address[1])
        registered = 0
        for step in range(data.draw(st.integers(1, 6), label="steps")):
            if data.draw(st.booleans(), label=f"raw record {step}"):
                kind, arg = data.draw(RECORDS, label=f"record {step}")
                if kind == "bytes":
                    value = bytes(arg)
                else:
                    schema_id, text = ((server_registry.highest_id + 1, nested_text(int(arg))) if kind == "deep"
                                       else (arg, json.dumps(V1)))
                    value = json.dumps({"id": schema_id, "subject": "raw", "version": 1, "schema": text}).encode()
                log.append(b"fuzz", value)
                continue
            what, target, headers, payload, expected = data.draw(bad_requests(port), label=f"request {step}")
            status, error = send(port, "GET" if expected == 404 or what == "absurd version" else "POST", target,
                                 headers, payload)
            assert (status, str(error["error_code"])[:3]) == (expected, str(expected)), (what, error)
            assert "Traceback" not in error["message"] and TOKEN not in error["message"]
            good = json.dumps(body({**V1, "name": f"T{step}"})).encode()
            status, answer = send(port, "POST", f"/subjects/fz{step}/versions", write_headers(port, good), good)
            assert status == 200, answer
            registered += 1
        views = [{i: (e.subject, e.version) for i, e in r.ids().items()}
                 for r in (server_registry, SchemaRegistry(log), fold_low(log))]
        assert views[0] == views[1] == views[2]
        assert all(subject.startswith("fz") for subject, _ in views[0].values())  # nothing refused got in
        assert len(views[0]) == registered


def test_the_cli_takes_writes_only_with_the_token_and_never_prints_it(settings: Settings, tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVP_")} | settings.to_env() | {
        "EVP_HOME": str(home), "PYTHONPATH": str(REPO)}
    server = subprocess.Popen([sys.executable, "-m", "events.cli", "registry", "serve", "--port", str(port),
                               "--allow-writes"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        answer = None
        deadline = time.monotonic() + 30
        while answer is None and time.monotonic() < deadline and server.poll() is None:
            try:
                answer = call(f"{url}/subjects")
            except urllib.error.URLError:
                time.sleep(0.1)
        assert answer is not None, server.communicate()
        token_file = home / "registry" / "token"
        assert token_file.stat().st_mode & 0o777 == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 32
        versions = f"{url}/subjects/{path(settings.events_topic)}-t.Thing/versions"
        assert call(versions, "POST", body(V1), token=None)[0] == 401
        assert call(versions, "POST", body(V1), token=TOKEN)[0] == 401
        assert call(versions, "POST", body(V1), token=token)[0] == 200
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=15) == 0
        out, err = server.communicate()
        assert str(token_file) in out and "writes need the bearer token" in out, (out, err)
        assert token not in out + err
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
