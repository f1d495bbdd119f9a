"""toxiproxy from the tests: a typed client for its HTTP API, and proxies in front of evp's services.

toxiproxy is a TCP proxy whose faults ("toxics") are set over HTTP. ``platform/services.py
up`` runs it with the other services (``up toxiproxy`` alone; built once from its Go module
into the shared cache), its API at ``EVP_TOXIPROXY_URL`` (``services.py env`` prints it). A
network fault test:

1. opens a proxy in front of a service: :func:`postgres_proxy` (on any free port; it hands
   back a database URL that connects through the proxy, with a passfile for that port) or
   :func:`kafka_proxy` (on the fixed port the broker's ``PROXIED`` listener advertises, so
   the metadata a client is told keeps it behind the proxy; one holder at a time);
2. points evp at the proxy: ``settings.with_(database_url=url)`` or
   ``settings.with_(kafka=proxy.address)``;
3. adds toxics (:meth:`Proxy.latency`, :meth:`Proxy.timeout`, :meth:`Proxy.reset_peer`,
   :meth:`Proxy.bandwidth`, :meth:`Proxy.slicer`, :meth:`Proxy.limit_data`; each also as a
   ``with`` block through :meth:`Proxy.toxic`) or cuts the proxy (:meth:`Proxy.disable`, or
   :meth:`Proxy.cut` for a block), and takes them away again;
4. leaves the proxy deleted (the context managers do it, whatever happened).

A toxic's ``stream`` is toxiproxy's word for a direction: ``downstream`` carries what the
service sends to evp, ``upstream`` what evp sends to the service. Standard library only
(the API is small), so the soak and bench scripts can use it too.
"""

from __future__ import annotations

import fcntl
import http.client
import importlib.util
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any, Literal
from urllib.error import HTTPError
from urllib.parse import parse_qs, quote, urlsplit, urlencode
from urllib.request import ProxyHandler, Request, build_opener

REPO = Path(__file__).resolve().parents[2]
Stream = Literal["upstream", "downstream"]
#: Where a proxy listens unless told otherwise: loopback, any free port (toxiproxy says which).
ANY_PORT = "127.0.0.1:0"
#: How long :func:`kafka_proxy` waits for another holder of its fixed port.
KAFKA_PROXY_WAIT_S = 300.0
#: Loopback URLs are opened directly, whatever ``http_proxy`` says.
_OPENER = build_opener(ProxyHandler({}))


class ToxiproxyError(RuntimeError):
    """toxiproxy refused a call or did not answer; the message names the call and what to do."""


@cache
def runner() -> ModuleType:
    """``platform/services.py`` as a module (``platform`` is also the standard library's name): its ports and URL."""
    spec = importlib.util.spec_from_file_location("evp_services_for_toxiproxy", REPO / "platform" / "services.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def default_url(env: Mapping[str, str] | None = None) -> str:
    """``EVP_TOXIPROXY_URL``, else the API of the toxiproxy ``services.py`` runs."""
    env = os.environ if env is None else env
    return env.get("EVP_TOXIPROXY_URL") or f"http://{runner().HOST}:{runner().TOXIPROXY_PORT}"


@dataclass(frozen=True)
class Toxic:
    """One toxic as toxiproxy reports it; ``attributes`` are the type's own (``latency``, ``timeout``...)."""

    name: str
    type: str
    stream: str
    toxicity: float
    attributes: Mapping[str, int]

    @classmethod
    def of(cls, raw: Mapping[str, Any]) -> Toxic:
        return cls(str(raw["name"]), str(raw["type"]), str(raw["stream"]), float(raw.get("toxicity", 1.0)),
                   dict(raw.get("attributes") or {}))


class Toxiproxy:
    """toxiproxy's HTTP API: proxies by name, and the toxics on each."""

    def __init__(self, url: str | None = None, *, timeout: float = 10.0) -> None:
        self.url = (url or default_url()).rstrip("/")
        self.timeout = timeout

    def call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        """One API call; the decoded JSON answer (None for an empty one).

        Raises :class:`ToxiproxyError` naming the call and toxiproxy's own words when it
        answers an error, or saying how to start it when nothing answers.
        """
        data = None if body is None else json.dumps(body).encode()
        request = Request(f"{self.url}{path}", data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with _OPENER.open(request, timeout=self.timeout) as answer:
                text = answer.read().decode()
        except HTTPError as err:
            said = err.read().decode(errors="replace").strip()
            raise ToxiproxyError(f"toxiproxy at {self.url}: {method} {path} answered {err.code}: {said}") from err
        except (OSError, http.client.HTTPException) as err:
            raise ToxiproxyError(
                f"toxiproxy at {self.url} does not answer ({method} {path}: {err}); start it with "
                "`python3 platform/services.py up toxiproxy`, or point EVP_TOXIPROXY_URL at one"
            ) from err
        return json.loads(text) if text.strip() else None

    def version(self) -> str:
        request = Request(f"{self.url}/version", method="GET")
        try:
            with _OPENER.open(request, timeout=self.timeout) as answer:
                return str(answer.read().decode().strip())
        except (OSError, http.client.HTTPException) as err:
            raise ToxiproxyError(
                f"toxiproxy at {self.url} does not answer ({err}); start it with "
                "`python3 platform/services.py up toxiproxy`, or point EVP_TOXIPROXY_URL at one"
            ) from err

    def proxies(self) -> dict[str, Proxy]:
        return {name: Proxy.of(self, raw) for name, raw in (self.call("GET", "/proxies") or {}).items()}

    def proxy(self, name: str) -> Proxy:
        return Proxy.of(self, self.call("GET", f"/proxies/{quote(name, safe='')}"))

    def create(self, name: str, upstream: str, *, listen: str = ANY_PORT, enabled: bool = True) -> Proxy:
        """A new proxy ``name`` from ``listen`` (default: any free loopback port) to ``upstream``."""
        raw = self.call("POST", "/proxies", {"name": name, "listen": listen, "upstream": upstream, "enabled": enabled})
        return Proxy.of(self, raw)


@dataclass
class Proxy:
    """One proxy; every method is one API call on it (state as of the last call)."""

    client: Toxiproxy = field(repr=False)
    name: str
    listen: str
    upstream: str
    enabled: bool

    @classmethod
    def of(cls, client: Toxiproxy, raw: Mapping[str, Any]) -> Proxy:
        return cls(client, str(raw["name"]), str(raw["listen"]), str(raw["upstream"]), bool(raw["enabled"]))

    @property
    def path(self) -> str:
        return f"/proxies/{quote(self.name, safe='')}"

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]") or "127.0.0.1"

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @property
    def address(self) -> str:
        """``host:port`` to connect to instead of the upstream."""
        return f"{self.host}:{self.port}"

    def _update(self, **changes: Any) -> None:
        raw = self.client.call("POST", self.path, changes)
        self.listen, self.upstream, self.enabled = str(raw["listen"]), str(raw["upstream"]), bool(raw["enabled"])

    def disable(self) -> None:
        """Cut: toxiproxy closes every connection through the proxy and refuses new ones."""
        self._update(enabled=False)

    def enable(self) -> None:
        """Listen again (on the same port); connections made before a cut stay gone."""
        self._update(enabled=True)

    @contextmanager
    def cut(self) -> Iterator[Proxy]:
        """The proxy disabled for the ``with`` block, enabled again after it."""
        self.disable()
        try:
            yield self
        finally:
            self.enable()

    # -- toxics ---------------------------------------------------------------------------
    def add_toxic(self, kind: str, *, stream: Stream = "downstream", toxicity: float = 1.0, name: str | None = None,
                  **attributes: int) -> Toxic:
        """A toxic of type ``kind`` on ``stream`` (toxiproxy's attributes by keyword); applies to open connections too."""
        return self._create_toxic(kind, stream, toxicity, name, attributes)

    def _create_toxic(self, kind: str, stream: Stream, toxicity: float, name: str | None,
                      attributes: Mapping[str, int]) -> Toxic:
        body = {"name": name or f"{kind}_{stream}_{uuid.uuid4().hex[:6]}", "type": kind, "stream": stream,
                "toxicity": toxicity, "attributes": dict(attributes)}
        return Toxic.of(self.client.call("POST", f"{self.path}/toxics", body))

    def update_toxic(self, name: str, **attributes: int) -> Toxic:
        return Toxic.of(self.client.call("POST", f"{self.path}/toxics/{quote(name, safe='')}", {"attributes": attributes}))

    def remove_toxic(self, name: str) -> None:
        self.client.call("DELETE", f"{self.path}/toxics/{quote(name, safe='')}")

    def toxics(self) -> list[Toxic]:
        return [Toxic.of(raw) for raw in self.client.call("GET", f"{self.path}/toxics") or []]

    def clear_toxics(self) -> None:
        for toxic in self.toxics():
            self.remove_toxic(toxic.name)

    @contextmanager
    def toxic(self, kind: str, *, stream: Stream = "downstream", toxicity: float = 1.0,
              **attributes: int) -> Iterator[Toxic]:
        """:meth:`add_toxic` for the ``with`` block; removed after it (if still there)."""
        added = self._create_toxic(kind, stream, toxicity, None, attributes)
        try:
            yield added
        finally:
            if any(t.name == added.name for t in self.toxics()):
                self.remove_toxic(added.name)

    def latency(self, ms: int, *, jitter: int = 0, stream: Stream = "downstream") -> Toxic:
        """Delay every chunk of data by ``ms`` (± ``jitter``) milliseconds."""
        return self.add_toxic("latency", stream=stream, latency=ms, jitter=jitter)

    def timeout(self, ms: int = 0, *, stream: Stream = "downstream") -> Toxic:
        """A stall: drop every byte; close the connection after ``ms`` (0: never, until removed)."""
        return self.add_toxic("timeout", stream=stream, timeout=ms)

    def reset_peer(self, ms: int = 0, *, stream: Stream = "downstream") -> Toxic:
        """Reset the connection ``ms`` after the next data on ``stream`` arrives (that data is dropped)."""
        return self.add_toxic("reset_peer", stream=stream, timeout=ms)

    def bandwidth(self, rate_kb: int, *, stream: Stream = "downstream") -> Toxic:
        """Let ``rate_kb`` KB/s through."""
        return self.add_toxic("bandwidth", stream=stream, rate=rate_kb)

    def slicer(self, average_size: int, *, size_variation: int = 0, delay_us: int = 0,
               stream: Stream = "downstream") -> Toxic:
        """Cut the data into packets of about ``average_size`` bytes, ``delay_us`` microseconds apart."""
        return self.add_toxic("slicer", stream=stream, average_size=average_size, size_variation=size_variation,
                              delay=delay_us)

    def limit_data(self, size: int, *, stream: Stream = "downstream") -> Toxic:
        """Close the connection once ``size`` bytes have passed."""
        return self.add_toxic("limit_data", stream=stream, bytes=size)

    def delete(self) -> None:
        self.client.call("DELETE", self.path)


@contextmanager
def opened(client: Toxiproxy, name: str, upstream: str, *, listen: str = ANY_PORT) -> Iterator[Proxy]:
    """A new proxy for the ``with`` block, deleted after it (one left by a dead holder is replaced)."""
    if name in client.proxies():
        client.proxy(name).delete()
    proxy = client.create(name, upstream, listen=listen)
    try:
        yield proxy
    finally:
        proxy.delete()


# -- evp's services behind a proxy ------------------------------------------------------------
def _server(url: str) -> tuple[str, int, dict[str, str]]:
    """The host, port and other parameters of a libpq URL or key=value string."""
    from psycopg.conninfo import conninfo_to_dict

    params = {k: str(v) for k, v in conninfo_to_dict(url).items() if v is not None}
    return params.pop("host", "localhost"), int(params.pop("port", "5432")), params


def _passfile_for(params: Mapping[str, str], host: str, port: int, proxy: Proxy, folder: Path) -> Path | None:
    """A copy of the URL's passfile whose ``host:port`` entries name the proxy's port too (0600)."""
    source = params.get("passfile") or os.environ.get("PGPASSFILE")
    if not source or not Path(source).exists():
        return None
    lines = []
    for line in Path(source).read_text().splitlines():
        fields = line.split(":", 2)
        if len(fields) == 3 and fields[0] in (host, "*") and fields[1] in (str(port), "*"):
            lines.append(f"{proxy.host}:{proxy.port}:{fields[2]}")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = folder / f"pgpass-{proxy.name}"
    descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write("".join(f"{line}\n" for line in lines))
    return target


def through(url: str, proxy: Proxy, folder: Path) -> str:
    """``url`` connecting through ``proxy`` instead: its host and port, a passfile for them in ``folder``."""
    host, port, params = _server(url)
    passfile = _passfile_for(params, host, port, proxy, folder)
    if passfile is not None:
        params["passfile"] = str(passfile)
    if "://" in url:
        parts = urlsplit(url)
        query = {k: v[0] for k, v in parse_qs(parts.query).items() if k not in ("host", "port", "passfile")}
        if passfile is not None:
            query["passfile"] = str(passfile)
        user = f"{parts.username}@" if parts.username else ""
        return parts._replace(netloc=f"{user}{proxy.host}:{proxy.port}", query=urlencode(query, safe="/")).geturl()
    from psycopg.conninfo import make_conninfo

    return make_conninfo(**params, host=proxy.host, port=str(proxy.port))


@contextmanager
def postgres_proxy(client: Toxiproxy, database_url: str, folder: Path) -> Iterator[tuple[Proxy, str]]:
    """A proxy in front of ``database_url``'s server on a free port, and the URL that goes through it.

    The URL is ``database_url`` with the proxy's address and a passfile of its own (``folder``,
    0600: libpq picks a password by host and port). The proxy is deleted after the block.
    """
    host, port, _ = _server(database_url)
    with opened(client, f"evp-postgres-{uuid.uuid4().hex[:8]}", f"{host}:{port}") as proxy:
        yield proxy, through(database_url, proxy, folder)


@contextmanager
def kafka_proxy(client: Toxiproxy) -> Iterator[Proxy]:
    """The proxy in front of the local broker's ``PROXIED`` listener, for the ``with`` block.

    1. It listens on ``KAFKA_PROXY_PORT``, the address that listener advertises, with the
       listener (``KAFKA_PROXIED_PORT``) as upstream: a client bootstrapped at
       ``proxy.address`` is told that address for the broker, so it never leaves the proxy.
    2. The port is fixed, so one holder at a time: a lock file named by the port, in the
       temporary folder, makes another test (or the soak) wait its turn.
    3. Refused, naming the fix, when the running broker has no such listener (it was started
       before the listener existed: ``python3 platform/services.py restart kafka``).
    """
    services = runner()
    listener = f"{services.HOST}:{services.KAFKA_PROXIED_PORT}"
    if not services.port_open(services.HOST, services.KAFKA_PROXIED_PORT):
        raise ToxiproxyError(f"nothing listens on {listener}, the broker's listener for toxiproxy: the broker was "
                             "started before it had one; `python3 platform/services.py restart kafka` adds it")
    port = services.KAFKA_PROXY_PORT
    with open(Path(tempfile.gettempdir()) / f"evp-toxiproxy-kafka-{port}.lock", "a") as lock:
        deadline = time.monotonic() + KAFKA_PROXY_WAIT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ToxiproxyError(f"another process has held the Kafka proxy on port {port} for "
                                         f"{KAFKA_PROXY_WAIT_S:.0f}s; wait for it to end, or stop it") from None
                time.sleep(0.2)
        with opened(client, "evp-kafka", listener, listen=f"{services.HOST}:{port}") as proxy:
            yield proxy
