"""toxiproxy as a project service (platform/services.py) and the client the fault tests use (tests/support)."""

from __future__ import annotations

import json
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.platform.test_services import closed_port, environment_of, secrets_in
from tests.platform.test_services import run as run_runner
from tests.support.toxiproxy import REPO, Proxy, Toxiproxy, ToxiproxyError, opened, runner

services = runner()


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``services.py ARGS``, toxiproxy the local one unless ``env`` names another."""
    return run_runner(*args, **{"EVP_TOXIPROXY_URL": "", **env})


# -- the service ----------------------------------------------------------------------------
@pytest.mark.services
def test_status_and_env_name_toxiproxy_and_its_api() -> None:
    status = run("status", "toxiproxy")
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.startswith("toxiproxy running") and f":{services.TOXIPROXY_PORT} (API)" in status.stdout
    env = run("env", "toxiproxy")
    assert env.stdout.strip() == f"export EVP_TOXIPROXY_URL=http://127.0.0.1:{services.TOXIPROXY_PORT}"


@pytest.mark.services
def test_the_running_toxiproxy_is_the_pinned_build_and_holds_no_secret() -> None:
    assert Toxiproxy().version() == services.TOXIPROXY_VERSION
    paths = services.Paths.from_env({k: v for k, v in os.environ.items() if k == "EVP_HOME"})
    pid = services.Toxiproxy(paths)._pid()
    if pid is None:
        pytest.skip(f"toxiproxy is not run by this runner's state dir {paths.state}")
    env = environment_of(pid)
    assert env and secrets_in(env) == [], f"toxiproxy pid {pid} inherited secrets"


@pytest.mark.parametrize("url, said", [
    (f"http://127.0.0.1:{closed_port()}", "EVP_TOXIPROXY_URL={url} does not accept connections"),
    ("127.0.0.1:8474", "EVP_TOXIPROXY_URL must be http://host:port, got '{url}'"),
], ids=["unreachable", "malformed"])
def test_an_external_toxiproxy_that_is_not_there_is_named_and_nothing_is_started(url: str, said: str) -> None:
    result = run("up", "toxiproxy", EVP_TOXIPROXY_URL=url)
    assert result.returncode == 1 and f"toxiproxy: error: {said.format(url=url)}" in result.stderr, result.stderr


def fake_go(folder: Path, calls: Path, *, fail: bool = False) -> Path:
    """A ``go`` that records its arguments and environment, then writes ``$GOBIN/server`` (or fails)."""
    program = folder / "go"
    body = (
        "import json, os, sys\n"
        f"open({str(calls)!r}, 'a').write(json.dumps({{'argv': sys.argv[1:], 'env': dict(os.environ)}}) + '\\n')\n"
        + ("sys.exit('go: module lookup disabled')\n" if fail else
           "os.makedirs(os.environ['GOBIN'], exist_ok=True)\n"
           "open(os.path.join(os.environ['GOBIN'], 'server'), 'w').write('#!/bin/sh\\n')\n")
    )
    program.write_text(f"#!{sys.executable}\n{body}")
    program.chmod(0o755)
    return program


def test_the_binary_is_built_once_into_the_cache_by_go_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = tmp_path / "calls.jsonl"
    go = fake_go(tmp_path, calls)
    monkeypatch.setattr(services, "require_tool", lambda service, tool, packages: str(go))
    paths = services.Paths(repo=REPO, state=tmp_path / "state", cache=tmp_path / "cache")
    proxy = services.Toxiproxy(paths)
    binary = proxy.binary()
    assert binary == paths.cache / f"toxiproxy-{services.TOXIPROXY_VERSION}" / "toxiproxy-server" and binary.exists()
    (call,) = [json.loads(line) for line in calls.read_text().splitlines()]
    module = f"{services.TOXIPROXY_MODULE}/cmd/server@v{services.TOXIPROXY_VERSION}"
    assert call["argv"][0] == "install" and call["argv"][-1] == module
    assert f"-ldflags=-X {services.TOXIPROXY_MODULE}.Version={services.TOXIPROXY_VERSION}" in call["argv"]
    for variable in ("GOBIN", "GOPATH", "GOMODCACHE", "GOCACHE"):
        assert Path(call["env"][variable]).is_relative_to(paths.cache), variable
    assert not [p for p in paths.cache.iterdir() if ".partial-" in p.name], "the build folder was left behind"
    assert proxy.binary() == binary and len(calls.read_text().splitlines()) == 1, "a second run built again"


def test_a_failed_build_says_so_and_leaves_nothing_that_looks_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    go = fake_go(tmp_path, tmp_path / "calls.jsonl", fail=True)
    monkeypatch.setattr(services, "require_tool", lambda service, tool, packages: str(go))
    paths = services.Paths(repo=REPO, state=tmp_path / "state", cache=tmp_path / "cache")
    with pytest.raises(services.ServiceError, match="go install of toxiproxy failed") as caught:
        services.Toxiproxy(paths).binary()
    assert "module lookup disabled" in str(caught.value)
    assert [p.name for p in paths.cache.iterdir()] in ([], ["go"])


# -- the client, on a proxy in front of a local echo server ---------------------------------
class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def echo_proxy() -> Iterator[Proxy]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = Toxiproxy()
    try:
        client.version()
    except ToxiproxyError as err:
        pytest.fail(str(err))
    try:
        with opened(client, f"evp-echo-{os.getpid()}", f"127.0.0.1:{server.server_address[1]}") as proxy:
            yield proxy
    finally:
        server.shutdown()
        server.server_close()


def round_trip(sock: socket.socket, payload: bytes = b"ping") -> bytes:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


@pytest.mark.services
def test_a_proxy_on_a_free_port_carries_bytes_and_each_toxic_acts(echo_proxy: Proxy) -> None:
    proxy = echo_proxy
    assert proxy.port > 0 and proxy.enabled
    with socket.create_connection((proxy.host, proxy.port), timeout=5) as sock:
        assert round_trip(sock) == b"ping"
        with proxy.toxic("latency", latency=300) as toxic:
            assert [t.name for t in proxy.toxics()] == [toxic.name] and toxic.attributes["latency"] == 300
            started = time.monotonic()
            assert round_trip(sock) == b"ping"
            assert time.monotonic() - started >= 0.28
        assert proxy.toxics() == []
        with proxy.toxic("timeout", stream="upstream", timeout=0):  # a stall: the bytes go nowhere
            sock.settimeout(0.5)
            with pytest.raises(TimeoutError):
                round_trip(sock)
    with socket.create_connection((proxy.host, proxy.port), timeout=5) as sock:
        proxy.reset_peer(0, stream="upstream")
        with pytest.raises((ConnectionResetError, BrokenPipeError, AssertionError)):
            assert round_trip(sock) == b"ping"
        proxy.clear_toxics()
    with socket.create_connection((proxy.host, proxy.port), timeout=5) as sock:
        with proxy.cut():
            assert sock.recv(1) == b"", "a cut closes the open connections"
            with pytest.raises(OSError):
                socket.create_connection((proxy.host, proxy.port), timeout=1).close()
    with socket.create_connection((proxy.host, proxy.port), timeout=5) as sock:
        assert round_trip(sock) == b"ping", "enabled again, on the same port"
