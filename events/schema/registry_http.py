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

Who may write (:class:`WritePolicy`): nobody by default: a server without a policy
answers every write (registering a version, and any PUT or DELETE) with 403. With one, a
write must carry ``Authorization: Bearer <token>`` (compared in constant time; else 401),
a ``Host`` that is the server's own host:port or a localhost form of its port (else 421:
a page in a browser cannot reach it by DNS rebinding) and a JSON ``Content-Type`` (else
415: a browser sends those cross-origin only after a preflight this server never
grants). Every request is bounded: a body over :data:`MAX_BODY_BYTES` is 413, a schema
over the registry's depth or size caps is 422 (:func:`events.schema.registry.check_caps`),
and :class:`RegistryHttpServer` times out idle sockets and runs at most
``max_threads`` connections at once (the next one gets 503).

:class:`RegistryApi` maps (method, path, body) to a status and a JSON value without any
I/O of its own; :class:`RegistryHttpServer` puts it on a socket.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from events.schema.catalog import canonical_json, normalize
from events.schema.compatibility import check_backward
from events.errors import EvpError, IncompatibleSchema, SchemaError, ServiceUnavailable
from events.schema.registry import MAX_SCHEMA_BYTES, MAX_SCHEMA_ID, RegisteredSchema, SchemaRegistry, check_caps, load_json

_log = logging.getLogger(__name__)

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
#: Request media types Confluent's clients send, plus plain JSON for curl and friends; none
#: of them is one a browser may send cross-origin without a preflight.
ACCEPTED_CONTENT_TYPES = frozenset({CONTENT_TYPE, "application/vnd.schemaregistry+json", "application/json"})
COMPATIBILITY_LEVEL = "BACKWARD"
DEFAULT_PORT = 18081
#: Four times the largest schema the registry takes, escaped as a JSON string.
MAX_BODY_BYTES = 1024 * 1024
#: Seconds a socket may stay silent (idle keep-alive included) before the server closes it.
SOCKET_TIMEOUT_S = 15.0
#: Connections served at once; the next one is answered 503 and closed.
MAX_THREADS = 32
#: Host names (with the server's port) a write may name besides the server's own address.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")

# Confluent's error codes (HTTP status * 100 + detail, or the bare status).
SUBJECT_NOT_FOUND = 40401
VERSION_NOT_FOUND = 40402
SCHEMA_NOT_FOUND = 40403
INVALID_SCHEMA = 42201
INVALID_VERSION = 42202
INCOMPATIBLE_SCHEMA = 409
UNAUTHORIZED = 40101
READ_ONLY = 40301
FOREIGN_HOST = 42101
BUSY = 50301
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


@dataclass(frozen=True)
class WritePolicy:
    """Who may write: holders of ``token``, naming the server by one of ``hosts`` ("name:port").

    ``hosts`` is filled in by :class:`RegistryHttpServer` once it knows its port (its own
    address, the localhost forms and any ``extra_hosts``); a bare RegistryApi takes it as given.
    """

    token: str
    hosts: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if len(self.token) < 16:
            raise EvpError("a registry write token must be at least 16 characters")

    def __repr__(self) -> str:  # never the token, in a log or a traceback
        return f"WritePolicy(token=<{len(self.token)} characters>, hosts={sorted(self.hosts)})"

    def serving_at(self, host: str, port: int, extra_hosts: tuple[str, ...] = ()) -> WritePolicy:
        """This policy for a server listening on ``host``:``port``."""
        names = {*LOCAL_HOSTS, *extra_hosts}
        if host not in ("", "0.0.0.0", "::"):
            names.add(f"[{host}]" if ":" in host else host)
        return WritePolicy(self.token, frozenset(f"{name.lower()}:{port}" for name in names) | self.hosts)


def _media_type(headers: Mapping[str, str]) -> str:
    return headers.get("content-type", "").split(";")[0].strip().lower()


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
    """The Avro schema in a ``{"schema": "<json string>"}`` request body; ApiError 42201 if it is not one.

    The body and the schema are held to the registry's caps before any parser that
    recurses sees them, so a deep or huge schema is a 422, never a RecursionError.
    """
    if not body.strip():
        raise _invalid('the request body is empty; expected {"schema": "<the schema as a JSON string>"}')
    try:
        request = load_json(body.decode("utf-8"), "the request body")
    except UnicodeDecodeError as err:
        raise _invalid(f"the request body is not JSON: it is not UTF-8 ({err})") from None
    except SchemaError as err:
        raise _invalid(str(err)) from None
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
    if len(text.encode("utf-8", "surrogatepass")) > MAX_SCHEMA_BYTES:
        raise _invalid(f'field "schema" is over the {MAX_SCHEMA_BYTES}-byte cap on a schema')
    try:
        schema = load_json(text, 'field "schema"')
        check_caps(schema)
        normalize(schema)
    except SchemaError as err:
        raise _invalid(f'field "schema": {err}') from None
    return schema


class RegistryApi:
    """Confluent's REST subset as a pure function of (method, path, headers, body) over a SchemaRegistry.

    ``policy`` None (the default) makes it read-only: see the module's docstring.
    """

    def __init__(self, registry: SchemaRegistry, policy: WritePolicy | None = None) -> None:
        self.registry = registry
        self.policy = policy
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

    def handle(self, method: str, target: str, body: bytes = b"",
               headers: Mapping[str, str] | None = None) -> Reply:
        """The answer to one request; never raises, and no answer carries a traceback."""
        try:
            lowered = {name.lower(): value for name, value in (headers or {}).items()}
            self.admit(method, target, lowered, len(body))
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

    def is_write(self, method: str, target: str) -> bool:
        """Whether the request would change the registry: registering a version, or any PUT, PATCH or DELETE."""
        method = method.upper()
        if method in ("PUT", "PATCH", "DELETE"):
            return True
        parts = urlsplit(target).path.strip("/").split("/")
        return method == "POST" and len(parts) == 3 and parts[0] == "subjects" and parts[2] == "versions"

    def admit(self, method: str, target: str, headers: Mapping[str, str], length: int) -> None:
        """Raise ApiError unless the request may be read and answered; ``headers`` keyed in lower case.

        Checked from the headers alone, before a body is read: 1. a body's size (413);
        2. for a write: writes allowed (403), the Host (421), the token (401); 3. a body's
        media type (415).
        """
        if length > MAX_BODY_BYTES:
            raise ApiError(413, 413, f"request body of {length} bytes is over the {MAX_BODY_BYTES}-byte limit")
        if self.is_write(method, target):
            if self.policy is None:
                raise ApiError(403, READ_ONLY, f"{method.upper()} {urlsplit(target).path}: this registry server is "
                                               "read-only; start it with --allow-writes to register schemas")
            host = headers.get("host", "").strip().lower()
            if host not in self.policy.hosts:
                raise ApiError(421, FOREIGN_HOST, f"Host {host[:100]!r} is not this server: writes must name it as "
                                                  f"one of {', '.join(sorted(self.policy.hosts))}")
            scheme, _, token = headers.get("authorization", "").strip().partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.policy.token.encode()):
                raise ApiError(401, UNAUTHORIZED, "writes need the header 'Authorization: Bearer <token>' "
                                                  "with the token from the server's token file")
        if length:
            media_type = _media_type(headers)
            if media_type not in ACCEPTED_CONTENT_TYPES:
                raise ApiError(415, 415, f"Content-Type {media_type or 'missing'!r} is not accepted; "
                                         f"send one of {', '.join(sorted(ACCEPTED_CONTENT_TYPES))}")

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
        if not raw_id.isdigit() or not raw_id.isascii():
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
        if spec not in ("latest", "-1") and (not spec.isdigit() or not spec.isascii() or len(spec) > 10
                                             or not 1 <= int(spec) <= MAX_SCHEMA_ID):
            raise ApiError(422, INVALID_VERSION, f"version {spec[:40]!r} is not a valid version: "
                                                 f'use a whole number in 1..{MAX_SCHEMA_ID} or "latest"')
        history = self._history(subject)
        if spec in ("latest", "-1"):
            return history[-1]
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
        except ServiceUnavailable:
            raise
        except SchemaError as err:  # a claim the readers would refuse, or ids used up
            raise _invalid(str(err)) from None

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

    def setup(self) -> None:
        self.request.settimeout(self.server.timeout_s)  # a silent client times out, idle keep-alive included
        super().setup()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._answer("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._answer("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._answer("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._answer("DELETE")

    def do_PATCH(self) -> None:  # noqa: N802
        self._answer("PATCH")

    def _answer(self, method: str) -> None:
        headers = {name.lower(): value for name, value in self.headers.items()}
        try:
            length = self._length(headers)
            self.server.api.admit(method, self.path, headers, length)  # before a byte of the body is read
        except ApiError as err:
            self.close_connection = True  # the unread body would be taken for the next request
            self._send(err.reply())
            return
        body = self.rfile.read(length)
        if len(body) < length:
            self.close_connection = True
            return  # the client went away mid-body
        self._send(self.server.api.handle(method, self.path, body, headers))

    @staticmethod
    def _length(headers: Mapping[str, str]) -> int:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise ApiError(411, 411, "chunked request bodies are not supported; send a Content-Length")
        raw_length = headers.get("content-length") or "0"
        if not (raw_length.isascii() and raw_length.isdigit()) or len(raw_length) > 18:
            raise ApiError(400, 400, f"Content-Length {raw_length[:40]!r} is not a whole number")
        return int(raw_length)

    def _send(self, reply: Reply) -> None:
        payload = json.dumps(reply.body).encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(payload)))
        if reply.status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="evp-registry"')
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        _log.debug("%s %s", self.address_string(), format % args)


_BUSY = json.dumps({"error_code": BUSY, "message": "the registry server is serving as many connections as it "
                                                   "may; retry shortly"}).encode()


class RegistryHttpServer(ThreadingHTTPServer):
    """A threaded HTTP server answering with a RegistryApi; port 0 picks a free port.

    At most ``max_threads`` connections are served at once (the next is answered 503 and
    closed); a socket silent for ``timeout_s`` is closed. If the api has a WritePolicy, the
    server adds its own address and the localhost forms of its port (and ``extra_hosts``)
    to the Host names a write may use.
    """

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, api: RegistryApi, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *,
                 extra_hosts: tuple[str, ...] = (), max_threads: int = MAX_THREADS,
                 timeout_s: float = SOCKET_TIMEOUT_S) -> None:
        self.api = api
        self.timeout_s = timeout_s
        self._slots = threading.BoundedSemaphore(max_threads)
        super().__init__((host, port), _Handler)
        if api.policy is not None:
            api.policy = api.policy.serving_at(host, int(self.server_address[1]), extra_hosts)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse_busy(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse_busy(self, request: socket.socket) -> None:
        try:
            request.settimeout(1.0)
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: " + CONTENT_TYPE.encode()
                            + b"\r\nContent-Length: " + str(len(_BUSY)).encode()
                            + b"\r\nRetry-After: 1\r\nConnection: close\r\n\r\n" + _BUSY)
        except OSError:
            pass
        finally:
            self.shutdown_request(request)

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
