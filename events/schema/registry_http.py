"""The subset of the Confluent Schema Registry REST API that serializers use, over evp's registry.

evp's records carry the Confluent wire format, so any Kafka tool can read them once it can
turn a schema id into a schema. This façade answers exactly those questions (schema by id,
versions of a subject, register, lookup, compatibility) over :class:`SchemaRegistry`, with
Confluent's paths, media type and error codes, so a stock deserializer pointed at it reads
evp's topics. It holds no state of its own: the compacted schemas topic stays the only
truth, and any number of servers and SDK processes register through the same arbitration.

What it leaves out on purpose: deletes (events are kept forever, so their schemas must
resolve forever), writable configuration (the level is BACKWARD, the rule evp's registry
enforces), schema references, and schema types other than Avro.

:class:`RegistryApi` maps (method, path, body) to a status and a JSON value without any
I/O of its own; :class:`RegistryHttpServer` puts it on a socket.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from events.schema.catalog import canonical_json, normalize
from events.schema.compatibility import check_backward
from events.errors import EvpError, IncompatibleSchema, SchemaError, ServiceUnavailable
from events.schema.registry import RegisteredSchema, SchemaRegistry

_log = logging.getLogger(__name__)

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
#: Request media types Confluent's clients send, plus plain JSON for curl and friends.
ACCEPTED_CONTENT_TYPES = frozenset({
    CONTENT_TYPE, "application/vnd.schemaregistry+json", "application/json", "application/octet-stream",
})
COMPATIBILITY_LEVEL = "BACKWARD"
DEFAULT_PORT = 18081
#: Far above any real schema; a bound keeps one bad client from filling the server's memory.
MAX_BODY_BYTES = 16 * 1024 * 1024

# Confluent's error codes (HTTP status * 100 + detail, or the bare status).
SUBJECT_NOT_FOUND = 40401
VERSION_NOT_FOUND = 40402
SCHEMA_NOT_FOUND = 40403
INVALID_SCHEMA = 42201
INVALID_VERSION = 42202
INCOMPATIBLE_SCHEMA = 409
INTERNAL_ERROR = 50000
BACKEND_ERROR = 50001


@dataclass(frozen=True)
class Reply:
    """One HTTP answer: a status and the JSON value of its body."""

    status: int
    body: Any


class ApiError(Exception):
    """A request answered with a Confluent error body; an answer, not a failure of evp."""

    def __init__(self, status: int, code: int, message: str) -> None:
        self.status, self.code, self.message = status, code, message
        super().__init__(message)

    def reply(self) -> Reply:
        return Reply(self.status, {"error_code": self.code, "message": self.message})


Params = dict[str, str]
Handler = Callable[[Params, bytes], Any]


@dataclass(frozen=True)
class _Route:
    method: str
    pattern: tuple[str, ...]  #: literal segments, or ``{name}`` for a non-empty parameter
    handler: Handler

    def match(self, parts: list[str]) -> Params | None:
        if len(parts) != len(self.pattern):
            return None
        params: Params = {}
        for expected, actual in zip(self.pattern, parts):
            if expected.startswith("{"):
                if not actual:
                    return None
                params[expected.strip("{}")] = actual
            elif expected != actual:
                return None
        return params


def schema_text(schema: Any) -> str:
    """A schema as the JSON string Confluent's API carries (keys sorted, no spaces)."""
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))


def _entry(entry: RegisteredSchema) -> dict[str, Any]:
    # schemaType is omitted for Avro, as Confluent does.
    return {"subject": entry.subject, "version": entry.version, "id": entry.id, "schema": schema_text(entry.schema)}


def _invalid(message: str) -> ApiError:
    return ApiError(422, INVALID_SCHEMA, message)


def request_schema(body: bytes) -> Any:
    """The Avro schema in a ``{"schema": "<json string>"}`` request body; ApiError 42201 if it is not one."""
    if not body.strip():
        raise _invalid('the request body is empty; expected {"schema": "<the schema as a JSON string>"}')
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _invalid(f"the request body is not JSON: {err}") from None
    if not isinstance(request, dict):
        raise _invalid(f'the request body must be a JSON object with a "schema" field, got {type(request).__name__}')
    schema_type = request.get("schemaType") or "AVRO"
    if str(schema_type).upper() != "AVRO":
        raise _invalid(f"schemaType {schema_type!r} is not supported: this registry holds Avro schemas only")
    if request.get("references"):
        raise _invalid('"references" are not supported: send the schema with its named types inline')
    text = request.get("schema")
    if not isinstance(text, str):
        raise _invalid('field "schema" must be a string holding the schema\'s JSON, '
                       f"got {'nothing' if text is None else type(text).__name__}")
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as err:
        raise _invalid(f'field "schema" is not JSON: {err}') from None
    try:
        normalize(schema)
    except SchemaError as err:
        raise _invalid(f'field "schema": {err}') from None
    return schema


class RegistryApi:
    """Confluent's REST subset as a pure function of (method, path, body) over a SchemaRegistry."""

    def __init__(self, registry: SchemaRegistry) -> None:
        self.registry = registry
        self._routes = (
            _Route("GET", ("schemas", "ids", "{id}"), self._schema_by_id),
            _Route("GET", ("schemas", "ids", "{id}", "versions"), self._versions_of_id),
            _Route("GET", ("subjects",), self._subjects),
            _Route("GET", ("subjects", "{subject}", "versions"), self._version_numbers),
            _Route("GET", ("subjects", "{subject}", "versions", "{version}"), self._version),
            _Route("GET", ("subjects", "{subject}", "versions", "{version}", "schema"), self._version_schema),
            _Route("POST", ("subjects", "{subject}", "versions"), self._register),
            _Route("POST", ("subjects", "{subject}"), self._lookup),
            _Route("POST", ("compatibility", "subjects", "{subject}", "versions", "{version}"), self._compatible),
            _Route("POST", ("compatibility", "subjects", "{subject}", "versions"), self._compatible_with_all),
            _Route("GET", ("config",), self._config),
        )

    def handle(self, method: str, target: str, body: bytes = b"") -> Reply:
        """The answer to one request; never raises, and no answer carries a traceback."""
        try:
            handler, params = self._route(method.upper(), target)
            return Reply(200, handler(params, body))
        except ApiError as err:
            return err.reply()
        except ServiceUnavailable as err:
            return Reply(500, {"error_code": BACKEND_ERROR, "message": f"the schema log cannot be read: {err}"})
        except EvpError as err:
            return Reply(500, {"error_code": INTERNAL_ERROR, "message": str(err)})
        except Exception as err:  # noqa: BLE001 - the server must answer, and log the cause for its operator
            _log.exception("registry request %s %s failed", method, target)
            return Reply(500, {"error_code": INTERNAL_ERROR,
                               "message": f"internal error ({type(err).__name__}); the server log has the details"})

    def _route(self, method: str, target: str) -> tuple[Handler, Params]:
        # Split before decoding, so a subject holding an encoded "/" stays one segment.
        path = urlsplit(target).path
        parts = [unquote(part) for part in path.strip("/").split("/")]
        allowed = []
        for route in self._routes:
            params = route.match(parts)
            if params is None:
                continue
            if route.method == method:
                return route.handler, params
            allowed.append(route.method)
        if allowed:
            raise ApiError(405, 405, f"{method} is not allowed on {path}; allowed: {', '.join(sorted(set(allowed)))}")
        raise ApiError(404, 404, f"no such resource: {path}")

    # -- lookups ----------------------------------------------------------------------
    def _registered(self, raw_id: str) -> RegisteredSchema:
        if not raw_id.isdigit():
            raise ApiError(404, SCHEMA_NOT_FOUND, f"schema id {raw_id!r} not found: ids are positive whole numbers")
        try:
            return self.registry.get(int(raw_id))
        except SchemaError:
            raise ApiError(404, SCHEMA_NOT_FOUND, f"schema id {int(raw_id)} not found") from None

    def _history(self, subject: str) -> tuple[RegisteredSchema, ...]:
        history = self.registry.versions(subject)
        if not history:
            raise ApiError(404, SUBJECT_NOT_FOUND, f"subject {subject!r} not found")
        return history

    def _find_version(self, subject: str, spec: str) -> RegisteredSchema:
        history = self._history(subject)
        if spec in ("latest", "-1"):
            return history[-1]
        if not spec.isdigit() or int(spec) < 1:
            raise ApiError(422, INVALID_VERSION, f"version {spec!r} is not a valid version: "
                                                 'use a positive whole number or "latest"')
        found = next((entry for entry in history if entry.version == int(spec)), None)
        if found is None:
            raise ApiError(404, VERSION_NOT_FOUND, f"version {int(spec)} of subject {subject!r} not found "
                                                   f"(it has versions 1 to {history[-1].version})")
        return found

    # -- handlers ---------------------------------------------------------------------
    def _schema_by_id(self, params: Params, body: bytes) -> Any:
        return {"schema": schema_text(self._registered(params["id"]).schema)}

    def _versions_of_id(self, params: Params, body: bytes) -> Any:
        # An id belongs to exactly one (subject, version): evp's log never reuses one.
        entry = self._registered(params["id"])
        return [{"subject": entry.subject, "version": entry.version}]

    def _subjects(self, params: Params, body: bytes) -> Any:
        return list(self.registry.subjects())

    def _version_numbers(self, params: Params, body: bytes) -> Any:
        return [entry.version for entry in self._history(params["subject"])]

    def _version(self, params: Params, body: bytes) -> Any:
        return _entry(self._find_version(params["subject"], params["version"]))

    def _version_schema(self, params: Params, body: bytes) -> Any:
        return self._find_version(params["subject"], params["version"]).schema

    def _register(self, params: Params, body: bytes) -> Any:
        schema = request_schema(body)
        try:
            return {"id": self.registry.register(params["subject"], schema)}
        except IncompatibleSchema as err:
            raise ApiError(409, INCOMPATIBLE_SCHEMA, str(err)) from None

    def _lookup(self, params: Params, body: bytes) -> Any:
        subject, wanted = params["subject"], canonical_json(request_schema(body))
        for entry in self._history(subject):
            if canonical_json(entry.schema) == wanted:
                return _entry(entry)
        raise ApiError(404, SCHEMA_NOT_FOUND, f"this schema is not registered under subject {subject!r}")

    def _compatible(self, params: Params, body: bytes) -> Any:
        schema = request_schema(body)
        return _compatibility(params["subject"], schema, self._find_version(params["subject"], params["version"]))

    def _compatible_with_all(self, params: Params, body: bytes) -> Any:
        # BACKWARD (not transitive) compares with the latest only; no versions yet: anything goes.
        schema = request_schema(body)
        latest = self.registry.latest(params["subject"])
        return {"is_compatible": True} if latest is None else _compatibility(params["subject"], schema, latest)

    def _config(self, params: Params, body: bytes) -> Any:
        return {"compatibilityLevel": COMPATIBILITY_LEVEL}


def _compatibility(subject: str, schema: Any, against: RegisteredSchema) -> dict[str, Any]:
    try:
        check_backward(subject, schema, against.schema)
    except IncompatibleSchema as err:
        return {"is_compatible": False, "messages": [f"{err} (checked against version {against.version})"]}
    return {"is_compatible": True}


class _Handler(BaseHTTPRequestHandler):
    """Reads a request, asks the server's RegistryApi, writes its reply as JSON."""

    protocol_version = "HTTP/1.1"  # keep-alive: deserializers fetch many ids over one connection
    server_version = "evp-registry"
    server: RegistryHttpServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._answer("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._answer("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._answer("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._answer("DELETE")

    def _answer(self, method: str) -> None:
        try:
            body = self._read_body()
        except ApiError as err:
            self.close_connection = True  # the unread body would be taken for the next request
            self._send(err.reply())
            return
        self._send(self.server.api.handle(method, self.path, body))

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise ApiError(411, 411, "chunked request bodies are not supported; send a Content-Length")
        raw_length = self.headers.get("Content-Length") or "0"
        if not raw_length.isdigit():
            raise ApiError(400, 400, f"Content-Length {raw_length!r} is not a whole number")
        length = int(raw_length)
        if length > MAX_BODY_BYTES:
            raise ApiError(413, 413, f"request body of {length} bytes is over the {MAX_BODY_BYTES}-byte limit")
        body = self.rfile.read(length)
        media_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if body and media_type and media_type not in ACCEPTED_CONTENT_TYPES:
            raise ApiError(415, 415, f"Content-Type {media_type!r} is not accepted; "
                                     f"send one of {', '.join(sorted(ACCEPTED_CONTENT_TYPES))}")
        return body

    def _send(self, reply: Reply) -> None:
        payload = json.dumps(reply.body).encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(payload)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        _log.debug("%s %s", self.address_string(), format % args)


class RegistryHttpServer(ThreadingHTTPServer):
    """A threaded HTTP server answering with a RegistryApi; port 0 picks a free port."""

    daemon_threads = True

    def __init__(self, api: RegistryApi, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
        self.api = api
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Only socket trouble gets here (RegistryApi answers everything else): a client went away.
        _log.debug("connection from %s ended abruptly", client_address, exc_info=True)


@contextmanager
def serving(server: RegistryHttpServer) -> Iterator[RegistryHttpServer]:
    """Answer requests in a background thread until the block ends, then close the socket."""
    thread = threading.Thread(target=server.serve_forever, args=(0.1,), name="evp-registry-http", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
