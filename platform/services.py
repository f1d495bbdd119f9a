#!/usr/bin/env python3
"""Start, stop and inspect the services evp runs on, without Docker.

    python3 platform/services.py up|down|restart|status|kill|clean [kafka|postgres|toxiproxy]

Kafka (Apache Kafka 4.3, one KRaft node, jars resolved by Maven from
platform/kafka/pom.xml), PostgreSQL (Debian's packages) and toxiproxy (the fault proxy the
network fault tests put between evp and the other two, built once from its Go module) run
as detached processes whose state lives in one directory, ``$EVP_HOME`` or
``<repo>/.evp``. That is what makes ``up`` idempotent, lets ``down`` find what ``up``
started, and lets ``kill`` simulate a crash for fault tests. ``EVP_KAFKA`` /
``EVP_DATABASE_URL`` / ``EVP_TOXIPROXY_URL`` point at services run elsewhere: they are then
only checked, never started or stopped.

Standard library only, because it runs before any virtual environment exists.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import hashlib
import hmac
import http.client
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat as stat_module
import string
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

HOST = "127.0.0.1"
KAFKA_PORT = 19092
KAFKA_CONTROLLER_PORT = 19093
#: The broker's second client listener (SASL_SSL too), for traffic that must cross toxiproxy:
#: it advertises :data:`KAFKA_PROXY_PORT`, where a fault test's toxiproxy proxy listens with
#: this port as its upstream, so a client bootstrapped through the proxy stays behind it.
KAFKA_PROXIED_PORT = 19094
KAFKA_PROXY_PORT = 19095
POSTGRES_PORT = 15432
#: toxiproxy's HTTP API; the proxies it opens take ports of their own (0: any free one).
TOXIPROXY_PORT = 18474
TOXIPROXY_MODULE = "github.com/Shopify/toxiproxy/v2"
TOXIPROXY_VERSION = "2.5.0"
TOXIPROXY_READY_TIMEOUT_S = 15.0
TOXIPROXY_STOP_TIMEOUT_S = 10.0
DATABASE = "evp"
DB_USER = "evp"  #: the app role: owns the database evp, no superuser, no CREATEDB, no CREATEROLE
ADMIN_USER = "evp_admin"  #: the cluster's superuser: the runner, `evp projections grant`, test fixtures
#: ``<state>/credentials/pgpass``: the libpq passfile with both roles' passwords (folder 0700, file 0600).
CREDENTIALS_DIR = "credentials"
PASSFILE = "pgpass"
#: Client authentication of the local server: passwords (SCRAM) over loopback TCP, nothing else.
PG_HBA = (
    "# Written by platform/services.py on every `up`: edits here are lost.\n"
    "# TCP on 127.0.0.1 only (no Unix socket, see evp.conf), every role with its SCRAM password.\n"
    "host all all 127.0.0.1/32 scram-sha-256\n"
)
KAFKA_READY_TIMEOUT_S = 90.0
KAFKA_STOP_TIMEOUT_S = 30.0
KAFKA_STARTED_LINE = "Kafka Server started"
#: The local broker's client listener: TLS with a generated CA, SCRAM users created at format time.
KAFKA_SECURITY_PROTOCOL = "SASL_SSL"
KAFKA_SASL_MECHANISM = "SCRAM-SHA-512"
KAFKA_SASL_USER = "evp"
#: Validity of the generated local CA and broker certificate, in days.
KAFKA_CERT_DAYS = 3650
MIN_JAVA = 17
STATE_MARKER = ".evp-state"
#: Where the database goes when the postgres user cannot reach the state dir.
FALLBACK_PARENT = "/var/tmp"
#: A KRaft cluster id: 16 random bytes, URL-safe base64 without padding.
CLUSTER_ID = re.compile(r"[A-Za-z0-9_-]{22}")

#: Exit status of ``status`` when some service is not running.
EXIT_NOT_RUNNING = 3

#: Environment variables no service process may inherit: evp's KEK, any password or token,
#: libpq's password variables. The runner is started from a shell holding evp's secrets.
SECRET_VARIABLE = re.compile(
    r"^(EVP_KEK.*|EVP_.*(PASSWORD|SECRET|TOKEN).*|PG.*PASSWORD.*|.*(PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL).*)$",
    re.IGNORECASE,
)
#: Variables whose value is a connection string: kept only without a password in it.
URL_VARIABLES = ("EVP_DATABASE_URL", "DATABASE_URL")


class ServiceError(Exception):
    """A service could not be brought to the requested state; the message says why."""

    def __init__(self, service: str, message: str) -> None:
        super().__init__(message)
        self.service = service


@dataclass(frozen=True)
class Paths:
    """Where the runner keeps state (per clone) and downloads (shared between clones)."""

    repo: Path
    state: Path
    cache: Path

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    @classmethod
    def from_env(cls, env: dict[str, str]) -> Paths:
        repo = Path(__file__).resolve().parent.parent
        state = Path(env["EVP_HOME"]).resolve() if env.get("EVP_HOME") else repo / ".evp"
        if env.get("EVP_CACHE"):
            cache = Path(env["EVP_CACHE"])
        elif env.get("XDG_CACHE_HOME"):
            cache = Path(env["XDG_CACHE_HOME"]) / "evp"
        else:
            cache = Path.home() / ".cache" / "evp"
        return cls(repo=repo, state=state, cache=cache.resolve())

    def ensure_state(self) -> None:
        """Create the state directory, marked so that ``clean`` knows it may delete it."""
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.state / STATE_MARKER).touch()


@dataclass(frozen=True)
class Status:
    service: str
    state: str  # running, starting (process up, port not yet answering) or stopped
    detail: str

    @property
    def running(self) -> bool:
        return self.state == "running"

    def line(self) -> str:
        return f"{self.service:<9} {self.state:<8} {self.detail}"


def local_state(pid: int | None, port: int) -> str:
    if pid is None:
        return "stopped"
    return "running" if port_open(HOST, port) else "starting"


# --- small process and network helpers ---------------------------------------------


def scrubbed_env(env: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """``env`` (default: ours) without any secret, plus ``extra``: what a service process gets.

    Drops every variable :data:`SECRET_VARIABLE` matches (``EVP_KEK*``, ``EVP_*PASSWORD*``,
    ``PG*PASSWORD``, tokens, secrets) and a database URL carrying a password.
    """
    source = dict(os.environ) if env is None else env
    kept = {
        name: value for name, value in source.items()
        if not SECRET_VARIABLE.match(name) and not (name in URL_VARIABLES and url_has_password(value))
    }
    return {**kept, **extra}


def url_has_password(url: str) -> bool:
    """Whether a libpq URL or key=value string carries a password."""
    if "://" in url:
        parts = urlsplit(url)
        return bool(parts.password) or "password" in parse_qs(parts.query)
    return any(item.split("=", 1)[0].strip() == "password" for item in url.split() if "=" in item)


def masked_url(url: str) -> str:
    """A connection string fit for a message: any password replaced by ``***``."""
    if "://" not in url:
        return re.sub(r"(password\s*=\s*)\S+", r"\1***", url)
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def scram_verifier(password: str, salt: bytes | None = None, iterations: int = 4096) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (RFC 5802, RFC 7677).

    Computed here so that the server is only ever sent the verifier (``ALTER ROLE ...
    PASSWORD 'SCRAM-SHA-256$...'`` is stored as is): the password itself never reaches
    the server, its statement log or a process's argv. ``password`` must be ASCII (SASLprep
    leaves it unchanged), as :func:`new_password` makes it.
    """
    salt = os.urandom(16) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("ascii"), salt, iterations)
    stored_key = hashlib.sha256(hmac.new(salted, b"Client Key", "sha256").digest()).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    salt_text, stored_text, server_text = (base64.b64encode(raw).decode("ascii") for raw in (salt, stored_key, server_key))
    return f"SCRAM-SHA-256${iterations}:{salt_text}${stored_text}:{server_text}"


def new_password() -> str:
    """32 random bytes, URL-safe base64: no ``:`` or ``\\`` to escape in a libpq passfile."""
    return secrets.token_urlsafe(32)


def say(service: str, message: str) -> None:
    print(f"{service}: {message}", flush=True)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def unix_socket_open(path: str, timeout: float = 0.5) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            return True
        except OSError:
            return False


def pid_alive(pid: int, cmdline_needle: str) -> bool:
    """True if ``pid`` runs and is the program we started (pids get reused after a crash)."""
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our own exited child
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user (the postgres user)
    proc = Path("/proc") / str(pid)
    try:
        stat = (proc / "stat").read_text()
        if stat[stat.rindex(")") + 2 :].startswith(("Z", "X")):
            return False
        return cmdline_needle.encode() in (proc / "cmdline").read_bytes()
    except OSError:
        return True  # no /proc here: trust the signal check


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"(no log at {path})"
    return f"last lines of {path}:\n" + "\n".join("    " + line for line in text)


def rotate_log(path: Path) -> None:
    """Keep the previous run's log next to the new one, so a crash stays readable."""
    if path.exists():
        path.replace(path.with_name(path.name + ".1"))


def run(service: str, cmd: Sequence[str], what: str, **kwargs: object) -> str:
    """Run a short command; on failure raise with its output, never a bare traceback.

    The command gets a scrubbed environment (:func:`scrubbed_env`) unless ``env`` is given.
    """
    kwargs.setdefault("env", scrubbed_env())
    try:
        done = subprocess.run(
            list(cmd), stdin=subprocess.DEVNULL, capture_output=True, text=True, **kwargs  # type: ignore[call-overload]
        )
    except OSError as err:
        raise ServiceError(service, f"{what}: cannot run {cmd[0]}: {err}") from err
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip().splitlines()[-30:]
        raise ServiceError(service, f"{what} ({' '.join(cmd[:3])} ... exited {done.returncode}):\n" + "\n".join(output))
    return str(done.stdout)


def is_root() -> bool:
    return os.geteuid() == 0


def apt_install(service: str, packages: Sequence[str], missing: str) -> None:
    """Install Debian packages when we may (root); otherwise say the exact command."""
    command = f"apt-get install -y {' '.join(packages)}"
    if not is_root() or not shutil.which("apt-get"):
        raise ServiceError(service, f"{missing} is not installed; install it with: sudo {command}")
    say(service, f"{missing} is missing: running {command} ...")
    env = scrubbed_env(DEBIAN_FRONTEND="noninteractive")
    run(service, ["apt-get", "update", "-q"], "apt-get update failed", env=env)
    run(service, ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages], f"{command} failed", env=env)


def require_tool(service: str, tool: str, packages: Sequence[str]) -> str:
    found = shutil.which(tool)
    if found is None:
        apt_install(service, packages, tool)
        found = shutil.which(tool)
    if found is None:
        raise ServiceError(service, f"{tool} is still not on PATH after installing {' '.join(packages)}")
    return found


@contextmanager
def exclusive(paths: Paths, service: str) -> Iterator[None]:
    """Serialize runners acting on one service: two concurrent ``up``s would start two brokers."""
    paths.ensure_state()
    with open(paths.state / f"{service}.lock", "w") as handle:  # children do not inherit it
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(service, "another services.py is acting on it; waiting for it to finish")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


#: The variable that points evp at a service run elsewhere, by service.
EXTERNAL_VARIABLE = {"kafka": "EVP_KAFKA", "postgres": "EVP_DATABASE_URL", "toxiproxy": "EVP_TOXIPROXY_URL"}


def ensure_port_free(service: str, port: int, role: str) -> None:
    if port_open(HOST, port):
        raise ServiceError(
            service,
            f"port {port} ({role}) on {HOST} is in use by a process this runner did not start; "
            f"stop it, or point evp at it with {EXTERNAL_VARIABLE[service]}",
        )


def partial_folder(cache: Path, name: str) -> Path:
    """Where this process may build ``cache/name`` before renaming it into place (not created here).

    ``<name>.partial-<pid>``: the folders of earlier builders that are gone (an interrupted
    first run) are deleted first; a running one's is left to it.
    """
    cache.mkdir(parents=True, exist_ok=True)
    for stale in cache.glob(f"{name}.partial-*"):
        owner = stale.name.rpartition("-")[2]
        if not (owner.isdigit() and int(owner) > 0 and pid_alive(int(owner), "")):  # its builder is gone
            shutil.rmtree(stale, ignore_errors=True)
    return cache / f"{name}.partial-{os.getpid()}"


def signal_group(pid: int, sig: int) -> None:
    """Signal the whole process group when ``pid`` leads one (our services do), else ``pid``."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


# --- services -------------------------------------------------------------------------


class Service:
    """What every service offers the command line."""

    name: str

    def up(self) -> None:
        raise NotImplementedError

    def down(self) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError

    def status(self) -> Status:
        raise NotImplementedError

    def clean(self) -> None:
        """Delete state kept outside the state directory (the state directory goes anyway)."""

    def client_env(self) -> dict[str, str]:
        """The ``EVP_*`` variables evp's clients need to reach this service (``services.py env``).

        Paths of credential files, never a secret's value: the files are 0600 in the state
        directory. A service someone else runs needs none (its variables are already set).
        """
        return {}


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def reachable(self) -> bool:
        if self.host.startswith("/"):
            return unix_socket_open(f"{self.host}/.s.PGSQL.{self.port}")
        return port_open(self.host, self.port, timeout=3.0)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def kafka_addresses(bootstrap: str) -> list[Address]:
    addresses = []
    for item in filter(None, (part.strip() for part in bootstrap.split(","))):
        host, sep, port = item.rpartition(":")
        if not sep or not port.isdigit():
            raise ServiceError("kafka", f"EVP_KAFKA entry {item!r} is not host:port")
        addresses.append(Address(host.strip("[]") or HOST, int(port)))
    if not addresses:
        raise ServiceError("kafka", "EVP_KAFKA is set but names no host:port")
    return addresses


def database_address(url: str) -> Address:
    """The host and port a libpq URL connects to (a Unix socket directory for host=/path)."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ServiceError("postgres", f"EVP_DATABASE_URL must start with postgresql://, got {masked_url(url)!r}")
    query = parse_qs(parts.query)
    host = query.get("host", [unquote(parts.hostname or "")])[0] or "localhost"
    try:
        port = int(query.get("port", [parts.port or 5432])[0])
    except ValueError as err:
        raise ServiceError("postgres", f"EVP_DATABASE_URL has a bad port: {err}") from err
    return Address(host, port)


class External(Service):
    """A service someone else runs: we only check that it answers."""

    def __init__(self, name: str, variable: str, value: str, addresses: list[Address]) -> None:
        self.name = name
        self.variable = variable
        self.value = masked_url(value)  # shown in messages: never a password
        self.addresses = addresses

    def _reachable(self) -> Address | None:
        return next((address for address in self.addresses if address.reachable()), None)

    def up(self) -> None:
        address = self._reachable()
        if address is None:
            raise ServiceError(self.name, f"{self.variable}={self.value} does not accept connections")
        say(self.name, f"using external {self.name} at {address} ({self.variable})")

    def down(self) -> None:
        say(self.name, f"external ({self.variable}): nothing to stop")

    def kill(self) -> None:
        raise ServiceError(self.name, f"external ({self.variable}): not killing a service this runner does not own")

    def status(self) -> Status:
        address = self._reachable()
        where = address or ",".join(map(str, self.addresses))
        state = "unreachable" if address is None else "running"
        return Status(self.name, state, f"external at {where} ({self.variable})")


class Detached(Service):
    """A service run as one detached process group, its pid kept in ``pid_file``."""

    needle: str  #: in the process's command line: a pid reused by another program is not ours
    pid_file: Path
    stop_timeout: float  #: seconds ``down`` waits after SIGTERM before SIGKILL

    address: str  #: where it answers, for messages
    ports: tuple[tuple[int, str], ...]  #: what it listens on, each with its role: free before a start

    def _pid(self) -> int | None:
        pid = read_pid(self.pid_file)
        return pid if pid is not None and pid_alive(pid, self.needle) else None

    def _answers(self) -> bool:
        raise NotImplementedError

    def _start(self) -> int:
        """Start the process (its own session, a scrubbed environment), record its pid; return it."""
        raise NotImplementedError

    def _wait_ready(self, pid: int) -> None:
        """Return once ``pid`` serves; raise ServiceError (with its log's tail) if it exits or never does."""
        raise NotImplementedError

    def up(self) -> None:
        pid = self._pid()
        if pid is not None and self._answers():
            say(self.name, f"already running (pid {pid}) on {self.address}")
            return
        started = time.monotonic()
        if pid is None:
            for port, role in self.ports:
                ensure_port_free(self.name, port, role)
            pid = self._start()
        else:
            say(self.name, f"pid {pid} is still starting; waiting for it")
        self._wait_ready(pid)
        say(self.name, f"ready on {self.address} in {time.monotonic() - started:.1f}s")

    def down(self) -> None:
        pid = self._pid()
        if pid is None:
            say(self.name, "not running")
            self.pid_file.unlink(missing_ok=True)
            return
        say(self.name, f"stopping pid {pid}...")
        signal_group(pid, signal.SIGTERM)
        if not wait_until(lambda: not pid_alive(pid, self.needle), self.stop_timeout):
            say(self.name, f"still running after {self.stop_timeout:.0f}s; sending SIGKILL")
            signal_group(pid, signal.SIGKILL)
            wait_until(lambda: not pid_alive(pid, self.needle), 10.0)
        self.pid_file.unlink(missing_ok=True)
        say(self.name, "stopped")

    def kill(self) -> None:
        pid = self._pid()
        if pid is None:
            raise ServiceError(self.name, "not running; nothing to kill")
        signal_group(pid, signal.SIGKILL)
        if not wait_until(lambda: not pid_alive(pid, self.needle), 10.0):
            raise ServiceError(self.name, f"pid {pid} survived SIGKILL")
        say(self.name, f"killed pid {pid} (SIGKILL)")  # the pid file stays, as after a real crash


class Kafka(Detached):
    """Apache Kafka, one KRaft node that is both broker and controller."""

    name = "kafka"
    needle = "kafka.Kafka"
    stop_timeout = KAFKA_STOP_TIMEOUT_S
    address = f"{HOST}:{KAFKA_PORT}"
    ports = ((KAFKA_PORT, "kafka broker"), (KAFKA_PROXIED_PORT, "kafka listener for toxiproxy"),
             (KAFKA_CONTROLLER_PORT, "kafka controller"))

    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self.pom = paths.repo / "platform" / "kafka" / "pom.xml"
        self.template = paths.repo / "platform" / "kafka" / "server.properties.in"
        self.log4j = paths.repo / "platform" / "kafka" / "log4j2.xml"
        self.pid_file = paths.state / "kafka.pid"
        self.log = paths.logs / "kafka.log"
        self.data = paths.state / "kafka"
        self.props = paths.state / "kafka-server.properties"
        self.cluster_id_file = paths.state / "kafka-cluster-id"
        #: Credentials, a 0700 folder of 0600 files, generated once and reused.
        self.security = paths.state / "kafka-security"
        self.ca_p12 = self.security / "ca.p12"  # the local CA's key: signs the broker certificate
        self.ca_pem = self.security / "ca.pem"  # EVP_KAFKA_SSL_CAFILE
        self.keystore = self.security / "broker.p12"  # the broker's key and certificate chain
        self.store_password_file = self.security / "keystore-password"
        self.password_file = self.security / f"{KAFKA_SASL_USER}-password"  # EVP_KAFKA_SASL_PASSWORD_FILE
        #: Written after a format that created the SCRAM user: holds the cluster id it was for.
        self.scram_stamp = self.security / "scram-formatted"

    def client_env(self) -> dict[str, str]:
        """Where the broker's CA and evp's SCRAM password are: file paths, never the password."""
        return {
            "EVP_KAFKA_SECURITY_PROTOCOL": KAFKA_SECURITY_PROTOCOL,
            "EVP_KAFKA_SASL_MECHANISM": KAFKA_SASL_MECHANISM,
            "EVP_KAFKA_SASL_USERNAME": KAFKA_SASL_USER,
            "EVP_KAFKA_SASL_PASSWORD_FILE": str(self.password_file),
            "EVP_KAFKA_SSL_CAFILE": str(self.ca_pem),
        }

    def status(self) -> Status:
        pid = self._pid()
        detail = f"pid {pid or '-'}  {HOST}:{KAFKA_PORT} {KAFKA_SECURITY_PROTOCOL}  log {self.log}"
        if pid is not None and port_open(HOST, KAFKA_PORT) and not port_open(HOST, KAFKA_PROXIED_PORT):
            detail += f"  (no listener on {KAFKA_PROXIED_PORT} for toxiproxy: started before it existed; restart kafka)"
        return Status(self.name, local_state(pid, KAFKA_PORT), detail)

    def _answers(self) -> bool:
        return port_open(HOST, KAFKA_PORT)

    def _start(self) -> int:
        self.paths.ensure_state()
        java = self._java()
        jars = self._jars()
        self._ensure_credentials(java)
        self._render_properties()
        self._format_storage(java, jars)
        rotate_log(self.log)
        say(self.name, f"starting (log {self.log})")
        cmd = [java, "-Xmx768m", "-Djava.awt.headless=true", *self._java_props(), "-cp", f"{jars}/*"]
        with open(self.log, "ab") as out:
            proc = subprocess.Popen(
                [*cmd, "kafka.Kafka", str(self.props)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.paths.state,
                env=scrubbed_env(),  # the broker never sees evp's KEK or a password
                start_new_session=True,  # Ctrl-C in the caller's terminal must not reach the broker
            )
        self.pid_file.write_text(f"{proc.pid}\n")
        return proc.pid

    def _java_props(self) -> list[str]:
        return [f"-Dlog4j2.configurationFile={self.log4j}"]

    def _wait_ready(self, pid: int) -> None:
        def ready() -> bool:
            if not pid_alive(pid, self.needle):
                raise ServiceError(self.name, f"the broker exited during startup; {log_tail(self.log)}")
            try:
                started = KAFKA_STARTED_LINE in self.log.read_text(errors="replace")
            except OSError:
                started = False
            return started and port_open(HOST, KAFKA_PORT)

        if not wait_until(ready, KAFKA_READY_TIMEOUT_S):
            raise ServiceError(
                self.name,
                f"not ready after {KAFKA_READY_TIMEOUT_S:.0f}s (pid {pid} left running; rerun `up` to keep waiting "
                f"or `down kafka` to stop it); {log_tail(self.log)}",
            )

    def _java(self) -> str:
        java = require_tool(self.name, "java", ["default-jdk-headless"])
        probe = subprocess.run([java, "-version"], capture_output=True, text=True, env=scrubbed_env())
        major = _java_major(probe.stderr + probe.stdout)
        if major is not None and major < MIN_JAVA:
            raise ServiceError(self.name, f"Kafka 4.3 needs Java {MIN_JAVA} or newer; {java} is Java {major}")
        return java

    def _jars(self) -> Path:
        """The broker's jars, resolved once per pom.xml version into the shared cache."""
        digest = hashlib.sha256(self.pom.read_bytes()).hexdigest()[:12]
        target = self.paths.cache / f"kafka-{digest}"
        stamp = target / ".resolved"
        if stamp.exists():
            return target
        mvn = require_tool(self.name, "mvn", ["maven"])
        say(self.name, "resolving jars with Maven (first run only)...")
        started = time.monotonic()
        # Resolve into a private directory and rename it into place: the target either
        # does not exist or is complete, whatever happened to an earlier run.
        work = partial_folder(self.paths.cache, target.name)
        if target.exists():
            shutil.rmtree(target)  # left by an interrupted resolve without its stamp
        run(
            self.name,
            [mvn, "-q", "-B", "-f", str(self.pom), "dependency:copy-dependencies"]
            + ["-DincludeScope=runtime", f"-DoutputDirectory={work}"],
            "Maven could not resolve the Kafka jars (is Maven Central reachable?)",
        )
        if not any(work.glob("kafka_2.13-*.jar")):
            raise ServiceError(self.name, f"Maven finished but {work} holds no kafka_2.13 jar")
        (work / ".resolved").write_text(f"resolved from {self.pom}\n")
        try:
            work.rename(target)
        except OSError:
            shutil.rmtree(work, ignore_errors=True)  # a concurrent run got there first
            if not stamp.exists():
                raise
        say(self.name, f"jars in {target} ({time.monotonic() - started:.1f}s)")
        return target

    @staticmethod
    def _write_private(path: Path, text: str) -> None:
        """Write ``text`` to ``path`` readable by its owner only (0600), whatever the umask."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            os.fchmod(out.fileno(), 0o600)
            out.write(text)

    def _ensure_credentials(self, java: str) -> None:
        """Create, once, the broker's TLS material and evp's SCRAM password; reuse them after.

        1. A 0700 folder ``kafka-security`` in the state directory; every file in it 0600.
        2. Two random passwords (the keystores', user ``evp``'s), written to files before use.
        3. With ``keytool`` (from the JDK that runs the broker): a local CA (``ca.p12``,
           exported as ``ca.pem`` for clients) and a broker key in ``broker.p12`` whose
           certificate the CA signs for ``127.0.0.1``/``localhost``. Keystore passwords go
           to keytool as ``-storepass:file``, never in its argv.
        A half-made set (an interrupted first run) is made again whole.
        """
        self.security.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.security.chmod(0o700)
        for secret in (self.store_password_file, self.password_file):
            if not secret.exists():
                self._write_private(secret, secrets.token_urlsafe(32) + "\n")
        if all(path.exists() for path in (self.ca_p12, self.ca_pem, self.keystore)):
            return
        sibling = Path(java).resolve().parent / "keytool"
        keytool = str(sibling) if sibling.exists() else require_tool(self.name, "keytool", ["default-jdk-headless"])
        say(self.name, f"generating a local CA and broker certificate in {self.security} (first run only)")
        work = Path(tempfile.mkdtemp(prefix=".certs-", dir=self.security))
        try:
            store = ["-storetype", "PKCS12", "-storepass:file", str(self.store_password_file)]
            ca, broker = work / "ca.p12", work / "broker.p12"
            san = f"SAN=ip:{HOST},dns:localhost"
            steps = [
                ["-genkeypair", "-alias", "evp-ca", "-keyalg", "RSA", "-keysize", "2048", "-dname",
                 "CN=evp local development CA", "-ext", "bc:c=ca:true", "-ext", "ku:c=keyCertSign,cRLSign",
                 "-validity", str(KAFKA_CERT_DAYS), "-keystore", str(ca)],
                ["-exportcert", "-rfc", "-alias", "evp-ca", "-keystore", str(ca), "-file", str(work / "ca.pem")],
                ["-genkeypair", "-alias", "broker", "-keyalg", "RSA", "-keysize", "2048", "-dname", f"CN={HOST}",
                 "-ext", san, "-validity", str(KAFKA_CERT_DAYS), "-keystore", str(broker)],
                ["-certreq", "-alias", "broker", "-keystore", str(broker), "-file", str(work / "broker.csr")],
                ["-gencert", "-rfc", "-alias", "evp-ca", "-keystore", str(ca), "-infile", str(work / "broker.csr"),
                 "-outfile", str(work / "broker.pem"), "-ext", san, "-ext", "ku:c=digitalSignature,keyEncipherment",
                 "-ext", "eku=serverAuth", "-validity", str(KAFKA_CERT_DAYS)],
                ["-importcert", "-noprompt", "-alias", "evp-ca", "-keystore", str(broker), "-file", str(work / "ca.pem")],
                ["-importcert", "-noprompt", "-alias", "broker", "-keystore", str(broker), "-file", str(work / "broker.pem")],
            ]
            for step in steps:
                run(self.name, [keytool, *step, *store], f"keytool {step[0]} failed")
            for made, target in ((ca, self.ca_p12), (work / "ca.pem", self.ca_pem), (broker, self.keystore)):
                made.chmod(0o600)
                made.replace(target)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _render_properties(self) -> None:
        """Render the template into a 0600 file: it holds the keystore's and the SCRAM user's passwords."""
        values: dict[str, object] = {"host": HOST, "broker_port": KAFKA_PORT, "controller_port": KAFKA_CONTROLLER_PORT,
                                     "proxied_port": KAFKA_PROXIED_PORT, "proxy_port": KAFKA_PROXY_PORT}
        values["log_dirs"] = self.data
        values.update(
            security_protocol=KAFKA_SECURITY_PROTOCOL, sasl_mechanism=KAFKA_SASL_MECHANISM,
            sasl_username=KAFKA_SASL_USER, sasl_password=self.password_file.read_text().strip(),
            keystore=self.keystore, keystore_password=self.store_password_file.read_text().strip(), cafile=self.ca_pem,
        )
        try:
            text = string.Template(self.template.read_text()).substitute(values)
        except (KeyError, ValueError) as err:
            raise ServiceError(self.name, f"{self.template} has an unknown or malformed placeholder: {err}") from err
        self._write_private(self.props, text)

    def _format_storage(self, java: str, jars: Path) -> None:
        """Format the KRaft log directory once, creating user ``evp``'s SCRAM credential in it.

        The cluster id is kept in the state dir. A log directory formatted before the broker
        spoke SASL_SSL has no SCRAM user, and nothing could log in: it is moved aside (not
        deleted) and a new one formatted. ``--add-scram`` carries the password, so the
        arguments go to StorageTool in a 0600 ``@file`` (argparse4j reads it), never in argv.
        """
        meta = self.data / "meta.properties"
        cluster_id = self.cluster_id_file.read_text().strip() if self.cluster_id_file.exists() else ""
        stamped = self.scram_stamp.exists() and self.scram_stamp.read_text().strip() == cluster_id != ""
        if meta.exists() and stamped:
            return
        if meta.exists():
            aside = self.data.with_name(f"kafka.before-sasl-{time.strftime('%Y%m%d-%H%M%S')}")
            self.data.rename(aside)
            say(self.name, f"{self.data} was formatted before the broker required SASL_SSL (it has no SCRAM user "
                           f"{KAFKA_SASL_USER!r}): moved it to {aside} (local dev data; delete it when done) and "
                           "formatting a new one")
        tool = [java, *self._java_props(), "-cp", f"{jars}/*", "kafka.tools.StorageTool"]
        if not cluster_id:
            output = run(self.name, [*tool, "random-uuid"], "could not generate a cluster id")
            ids = [line for line in output.split() if CLUSTER_ID.fullmatch(line)]
            if not ids:
                raise ServiceError(self.name, f"StorageTool random-uuid printed no cluster id: {output.strip()[:300]}")
            cluster_id = ids[-1]
            self.cluster_id_file.write_text(cluster_id + "\n")
        say(self.name, f"formatting {self.data} (cluster id {cluster_id}, SCRAM user {KAFKA_SASL_USER!r})")
        password = self.password_file.read_text().strip()
        scram = f"{KAFKA_SASL_MECHANISM}=[name={KAFKA_SASL_USER},password={password}]"
        arguments = ["format", "-t", cluster_id, "-c", str(self.props), "--ignore-formatted", "--add-scram", scram]
        args_file = self.security / "format-arguments"
        self._write_private(args_file, "\n".join(arguments) + "\n")
        try:
            run(self.name, [*tool, f"@{args_file}"], "storage format failed")
        finally:
            args_file.unlink(missing_ok=True)
        self._write_private(self.scram_stamp, cluster_id + "\n")

def _java_major(version_output: str) -> int | None:
    """17 from 'openjdk version "17.0.15"', 8 from 'java version "1.8.0_392"'."""
    for token in version_output.split('"')[1:2]:
        parts = token.split(".")
        try:
            return int(parts[1]) if parts[0] == "1" and len(parts) > 1 else int(parts[0].split("-")[0])
        except ValueError:
            return None
    return None


class Postgres(Service):
    """PostgreSQL from Debian's packages, run as the ``postgres`` user when we are root."""

    name = "postgres"
    needle = "postgres"
    system_user = "postgres"

    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self.log = paths.logs / "postgres.log"
        self.location_file = paths.state / "postgres-location"
        self.conf = paths.repo / "platform" / "postgres" / "evp.conf"
        self.passfile = paths.state / CREDENTIALS_DIR / PASSFILE

    # credentials -------------------------------------------------------------------
    def url(self, user: str = DB_USER, dbname: str = DATABASE) -> str:
        """A libpq URL for ``user`` naming the passfile (its path, never a password)."""
        return f"postgresql://{user}@{HOST}:{POSTGRES_PORT}/{dbname}?passfile={quote(str(self.passfile), safe='/')}"

    def client_env(self) -> dict[str, str]:
        """``EVP_DATABASE_URL`` (the app role) and ``EVP_ADMIN_DATABASE_URL`` (the superuser).

        Keeps ``EVP_KEYRING_URL`` unset: the keyring is the same database's ``evp_keyring``
        schema, which the projection roles cannot reach.
        """
        return {"EVP_DATABASE_URL": self.url(DB_USER), "EVP_ADMIN_DATABASE_URL": self.url(ADMIN_USER)}

    def _passwords(self) -> dict[str, str]:
        """The roles' passwords from the passfile; a role missing from it gets a new one, stored.

        The folder is 0700 and the file 0600, both made before anything is written to them
        and refused if they are links; the file is created once and reused by every ``up``.
        """
        folder = self.passfile.parent
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        for path in (folder, self.passfile):
            if path.is_symlink():
                raise ServiceError(self.name, f"{path} is a symbolic link: refusing to keep passwords there")
        folder.chmod(0o700)
        passwords: dict[str, str] = {}
        if self.passfile.exists():
            self.passfile.chmod(0o600)
            for line in self.passfile.read_text().splitlines():
                fields = line.split(":")
                if len(fields) == 5 and not line.startswith("#"):
                    passwords[fields[3]] = fields[4]
        missing = [role for role in (ADMIN_USER, DB_USER) if role not in passwords]
        if missing:
            passwords.update({role: new_password() for role in missing})
            lines = "".join(f"{HOST}:{POSTGRES_PORT}:*:{role}:{passwords[role]}\n" for role in (ADMIN_USER, DB_USER))
            temporary = self.passfile.with_name(f".{PASSFILE}.{os.getpid()}")
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(f"# evp: the local PostgreSQL's roles (platform/services.py); libpq passfile format\n{lines}")
            temporary.replace(self.passfile)
            say(self.name, f"new password(s) for {', '.join(missing)} in {self.passfile} (0600)")
        return passwords

    # where the data lives --------------------------------------------------------
    @property
    def data(self) -> Path:
        """The recorded data directory, or where a first ``up`` would put it."""
        if self.location_file.exists():
            return Path(self.location_file.read_text().strip())
        return self.paths.state / "postgres"

    def _fallback(self) -> Path:
        """A new private directory under ``/var/tmp`` with an unguessable name (0700, ours).

        Never a predictable name: another local user could create it first, or link it
        elsewhere, and be handed the database. The choice is recorded in the state dir.
        """
        return Path(tempfile.mkdtemp(prefix="evp-postgres-", dir=FALLBACK_PARENT))

    def _owners(self) -> set[int]:
        """Who may own the data directory: this process, and the server user when we run it as that."""
        owners = {os.geteuid()}
        if is_root():
            try:
                owners.add(pwd.getpwnam(self.system_user).pw_uid)
            except KeyError:
                pass
        return owners

    def _check_data_dir(self, data: Path) -> None:
        """Refuse an existing data directory that someone else could have planted or can read.

        It must be a real directory (no symlink), owned by us or the server user, with no
        access for group or others (0700).
        """
        try:
            info = data.lstat()
        except FileNotFoundError:
            return
        if not stat_module.S_ISDIR(info.st_mode):
            raise ServiceError(self.name, f"the data directory {data} is not a directory (a link or a file): refusing it")
        if info.st_uid not in self._owners():
            raise ServiceError(
                self.name,
                f"the data directory {data} belongs to uid {info.st_uid}, not to this runner or {self.system_user}: "
                f"refusing it; remove it, or delete {self.location_file} to choose a new one",
            )
        if info.st_mode & 0o077:
            raise ServiceError(
                self.name,
                f"the data directory {data} has mode {stat_module.S_IMODE(info.st_mode):04o}, wider than 0700: "
                f"refusing it; chmod 700 it if it is yours",
            )

    def _as_server_user(self, cmd: Sequence[str]) -> list[str]:
        return ["runuser", "-u", self.system_user, "--", *cmd] if is_root() else list(cmd)

    def _choose_data_dir(self) -> Path:
        """``<state>/postgres``, unless the postgres user cannot reach it (a 0700 parent)."""
        if self.location_file.exists():
            return self.data
        chosen = self.paths.state / "postgres"
        if is_root():
            probe = subprocess.run(self._as_server_user(["test", "-x", str(self.paths.state)]), cwd="/",
                                   env=scrubbed_env())
            if probe.returncode != 0:
                chosen = self._fallback()
                say(self.name, f"{self.system_user} cannot reach {self.paths.state}; keeping the data in {chosen}")
        self.location_file.write_text(f"{chosen}\n")
        return chosen

    def _prepare_data_dir(self, data: Path) -> None:
        data.mkdir(parents=True, exist_ok=True)
        if is_root():
            shutil.chown(data, self.system_user, self.system_user)
        data.chmod(0o700)

    # binaries ----------------------------------------------------------------------
    def _bindir(self, wanted_major: str | None) -> Path:
        """The server binaries: the data directory's own major version if installed, else the newest."""
        installed = Path("/usr/lib/postgresql").glob("*/bin")
        candidates = {path.parent.name: path for path in installed if (path / "initdb").exists()}
        if wanted_major in candidates:
            return candidates[wanted_major]
        if candidates:
            return candidates[max(candidates, key=lambda major: int(major) if major.isdigit() else 0)]
        pg_config = shutil.which("pg_config")
        if pg_config:
            bindir = Path(run(self.name, [pg_config, "--bindir"], "pg_config --bindir failed").strip())
            if (bindir / "initdb").exists():
                return bindir
        apt_install(self.name, ["postgresql"], "the PostgreSQL server")
        return self._bindir(wanted_major)

    @staticmethod
    def _major(bindir: Path) -> str:
        version = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True,
                                 env=scrubbed_env()).stdout
        return version.split()[-1].split(".")[0] if version.strip() else bindir.parent.name

    # lifecycle -----------------------------------------------------------------------
    def _pid(self) -> int | None:
        pid = read_pid(self.data / "postmaster.pid")
        return pid if pid is not None and pid_alive(pid, self.needle) else None

    def status(self) -> Status:
        pid = self._pid()
        detail = f"pid {pid or '-'}  {HOST}:{POSTGRES_PORT}  log {self.log}  data {self.data}"
        return Status(self.name, local_state(pid, POSTGRES_PORT), detail)

    def up(self) -> None:
        started = time.monotonic()
        pid = self._pid()
        if pid is not None:
            if wait_until(lambda: port_open(HOST, POSTGRES_PORT), 30.0):
                say(self.name, f"already running (pid {pid}) on {HOST}:{POSTGRES_PORT}")
                self._ensure_roles(self._bindir(self._data_major(self.data)), self.data)
                return
            tail = log_tail(self.log)
            raise ServiceError(self.name, f"pid {pid} runs but does not answer on {POSTGRES_PORT}; {tail}")
        ensure_port_free(self.name, POSTGRES_PORT, "postgres")
        if is_root() and shutil.which("runuser") is None:
            raise ServiceError(self.name, "runuser (util-linux) is needed to run the server as the postgres user")
        self.paths.ensure_state()
        data = self._choose_data_dir()
        self._check_data_dir(data)
        stale = data / "postmaster.pid"
        if stale.exists():
            # No server of ours runs (checked above), so the pid it names is gone, another program, or a
            # zombie: a crashed postmaster whose parent never reaped it. The server would take a zombie
            # for a live postmaster and refuse to start ("lock file already exists").
            say(self.name, f"removing the stale {stale.name} (pid {read_pid(stale)} is not a running server)")
            stale.unlink()
        data_major = self._data_major(data)
        bindir = self._bindir(data_major)
        server_major = self._major(bindir)
        if data_major is not None and data_major != server_major:
            raise ServiceError(
                self.name,
                f"{data} holds a PostgreSQL {data_major} cluster but the server installed here is {server_major}. "
                f"Keep it: apt-get install -y postgresql-{data_major}; or start afresh (deletes the local data): "
                f"python3 platform/services.py clean",
            )
        self._prepare_data_dir(data)
        if data_major is None:
            self._initdb(bindir, data)
        self._install_conf(data)
        self._start(bindir, data)
        self._ensure_roles(bindir, data)
        say(self.name, f"ready on {HOST}:{POSTGRES_PORT} in {time.monotonic() - started:.1f}s")

    @staticmethod
    def _data_major(data: Path) -> str | None:
        try:
            return (data / "PG_VERSION").read_text().strip()
        except OSError:
            return None

    def _initdb(self, bindir: Path, data: Path) -> None:
        """A new cluster whose superuser is ``evp_admin``, with its SCRAM verifier, and our pg_hba.conf.

        initdb reads the password from a file the server user can read: it gets the
        verifier (not the password) in a private temporary folder, deleted at once.
        """
        say(self.name, f"initializing {data}")
        verifier = scram_verifier(self._passwords()[ADMIN_USER])
        folder = Path(tempfile.mkdtemp(prefix="evp-initdb-"))
        try:
            pwfile = folder / "pwfile"
            descriptor = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(verifier + "\n")
            if is_root():
                shutil.chown(folder, self.system_user, self.system_user)
                shutil.chown(pwfile, self.system_user, self.system_user)
            cmd = [str(bindir / "initdb"), "-D", str(data), "-U", ADMIN_USER, "--auth=scram-sha-256",
                   f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C"]
            run(self.name, self._as_server_user(cmd), "initdb failed", cwd=data)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self._write_hba(data)

    def _hba_is_ours(self, data: Path) -> bool:
        try:
            return (data / "pg_hba.conf").read_text() == PG_HBA
        except OSError:
            return False

    def _write_hba(self, data: Path) -> None:
        """Replace pg_hba.conf with :data:`PG_HBA` (owned by the server user, 0600)."""
        temporary = data / ".pg_hba.conf.evp"
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(PG_HBA)
        if is_root():
            shutil.chown(temporary, self.system_user, self.system_user)
        temporary.replace(data / "pg_hba.conf")

    def _install_conf(self, data: Path) -> None:
        """Copy evp.conf into the data directory and include it from postgresql.conf once."""
        target = data / "evp.conf"
        shutil.copyfile(self.conf, target)
        if is_root():
            shutil.chown(target, self.system_user, self.system_user)
        main_conf = data / "postgresql.conf"
        include = "include_if_exists 'evp.conf'"
        if include not in main_conf.read_text():
            with open(main_conf, "a") as conf:
                conf.write(f"\n# evp: settings from platform/postgres/evp.conf\n{include}\n")

    def _start(self, bindir: Path, data: Path) -> None:
        rotate_log(self.log)
        say(self.name, f"starting (log {self.log})")
        # No `pg_ctl -l`: the server inherits this file descriptor, opened here, so the
        # postgres user needs no write access to our logs directory.
        cmd = self._as_server_user([str(bindir / "pg_ctl"), "-w", "-t", "60", "-D", str(data), "start"])
        with open(self.log, "ab") as out:
            done = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=data, start_new_session=True,
                env=scrubbed_env(),  # the postmaster (and every backend) never sees evp's KEK or a password
            )
        if done.returncode != 0 or not wait_until(lambda: port_open(HOST, POSTGRES_PORT), 10.0):
            tail = log_tail(self.log)
            raise ServiceError(self.name, f"the server did not start (pg_ctl exited {done.returncode}); {tail}")

    def _psql(self, bindir: Path, script: str, what: str, *, user: str = ADMIN_USER, dbname: str = "postgres") -> str:
        """Run ``script`` through psql's stdin as ``user``, the password from the passfile.

        Statements go through stdin, never argv (a verifier is in some of them); the
        environment names the passfile's path, never a password.
        """
        cmd = [str(bindir / "psql"), "-X", "-q", "-w", "-v", "ON_ERROR_STOP=1", "-tA", "-h", HOST,
               "-p", str(POSTGRES_PORT), "-U", user, "-d", dbname, "-f", "-"]
        env = scrubbed_env(PGCONNECT_TIMEOUT="5", PGPASSFILE=str(self.passfile))
        try:
            done = subprocess.run(cmd, input=script, capture_output=True, text=True, env=env, cwd="/")
        except OSError as err:
            raise ServiceError(self.name, f"{what}: cannot run psql: {err}") from err
        if done.returncode != 0:
            raise ServiceError(self.name, f"{what} (psql as {user} exited {done.returncode}):\n{done.stderr.strip()}")
        return done.stdout.strip()

    def _ensure_roles(self, bindir: Path, data: Path) -> None:
        """Bring the cluster to scram-sha-256 and the two roles, then make sure the database exists.

        1. a cluster made before passwords (pg_hba.conf not ours: ``trust``, superuser
           ``evp``) is converted first (:meth:`_secure_legacy_cluster`);
        2. the app role ``evp`` is (re)pinned: LOGIN, its passfile password, and no
           SUPERUSER, CREATEDB, CREATEROLE, REPLICATION or BYPASSRLS;
        3. the database ``evp`` exists and is owned by it.
        """
        passwords = self._passwords()
        if not self._hba_is_ours(data):
            self._secure_legacy_cluster(bindir, data, passwords)
        try:
            self._psql(bindir, "SELECT 1", "the superuser cannot log in")
        except ServiceError as err:
            raise ServiceError(
                self.name,
                f"{ADMIN_USER} cannot log in with the password in {self.passfile} (was the passfile deleted or "
                f"replaced?). Start afresh (deletes the local data): python3 platform/services.py clean\n{err}",
            ) from err
        self._psql(bindir, _app_role_sql(passwords[DB_USER]), f"could not set up the role {DB_USER}")
        exists = self._psql(bindir, f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'", "psql failed")
        if exists != "1":
            say(self.name, f"creating database {DATABASE} (owner {DB_USER})")
            self._psql(bindir, f'CREATE DATABASE "{DATABASE}" OWNER "{DB_USER}"', f"could not create database {DATABASE}")

    def _secure_legacy_cluster(self, bindir: Path, data: Path, passwords: dict[str, str]) -> None:
        """Move a cluster made before this runner used passwords to scram-sha-256 and two roles.

        Such a cluster trusts every local connection and its bootstrap superuser is ``evp``,
        the role evp's processes use. Each step is safe to repeat if one before it failed:

        1. (over ``trust`` still) rename the bootstrap superuser to ``evp_admin`` (through a
           temporary superuser: a session cannot rename its own user) and give it its
           password; create the app role ``evp`` without superuser;
        2. give the database ``evp`` and every object in it the superuser owned to the app role;
        3. write pg_hba.conf (scram-sha-256 on 127.0.0.1 only) and reload the server.
        """
        say(self.name, f"securing a cluster made before passwords (trust, superuser {DB_USER}): {ADMIN_USER} becomes "
                       f"the superuser, {DB_USER} a role without superuser owning the database {DATABASE}, "
                       f"passwords in {self.passfile}. Clients need: eval \"$(python3 platform/services.py env)\"")
        who = "SELECT rolname FROM pg_roles WHERE oid = 10"
        try:
            bootstrap = self._psql(bindir, who, "psql failed", user=ADMIN_USER)
        except ServiceError:
            bootstrap = self._psql(bindir, who, f"cannot log in as {DB_USER} or {ADMIN_USER} to secure the cluster: "
                                                f"its pg_hba.conf is neither trust nor ours", user=DB_USER)
        if bootstrap == DB_USER:
            helper = "evp_migrate"
            self._psql(bindir, f'DROP ROLE IF EXISTS "{helper}"; CREATE ROLE "{helper}" SUPERUSER LOGIN',
                       "could not create a temporary superuser", user=DB_USER)
            self._psql(bindir, f'ALTER ROLE "{DB_USER}" RENAME TO "{ADMIN_USER}"', f"could not rename {DB_USER}",
                       user=helper)
            self._psql(bindir, f'DROP ROLE "{helper}"', "could not drop the temporary superuser")
        elif bootstrap != ADMIN_USER:
            raise ServiceError(self.name, f"the cluster's superuser is {bootstrap!r}, neither {DB_USER} nor {ADMIN_USER}")
        verifier = scram_verifier(passwords[ADMIN_USER])
        self._psql(bindir, f"ALTER ROLE \"{ADMIN_USER}\" PASSWORD '{verifier}'", f"could not set {ADMIN_USER}'s password")
        self._psql(bindir, _app_role_sql(passwords[DB_USER]), f"could not set up the role {DB_USER}")
        exists = self._psql(bindir, f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'", "psql failed")
        if exists == "1":
            self._psql(bindir, f'ALTER DATABASE "{DATABASE}" OWNER TO "{DB_USER}"', "could not change the owner")
            self._psql(bindir, _REASSIGN_SQL.replace("{role}", DB_USER), f"could not give {DB_USER} its objects",
                       dbname=DATABASE)
        self._write_hba(data)
        self._psql(bindir, "SELECT pg_reload_conf()", "could not reload the server's configuration")
        rules = self._psql(bindir, "SELECT count(*) FROM pg_hba_file_rules WHERE error IS NOT NULL", "psql failed")
        if rules != "0":
            raise ServiceError(self.name, f"the new pg_hba.conf has errors: see {self.log}")
        say(self.name, f"now scram-sha-256 on {HOST} only; {DB_USER} is no superuser")

    def down(self) -> None:
        pid = self._pid()
        if pid is None:
            say(self.name, "not running")
            return
        say(self.name, f"stopping pid {pid}...")
        bindir = self._bindir(self._data_major(self.data))
        cmd = self._as_server_user([str(bindir / "pg_ctl"), "-w", "-D", str(self.data), "stop", "-m", "fast"])
        run(self.name, cmd, "pg_ctl stop failed", cwd="/")
        say(self.name, "stopped")

    def kill(self) -> None:
        pid = self._pid()
        if pid is None:
            raise ServiceError(self.name, "not running; nothing to kill")
        signal_group(pid, signal.SIGKILL)  # the postmaster and its backends, like a power cut
        if not wait_until(lambda: not pid_alive(pid, self.needle), 10.0):
            raise ServiceError(self.name, f"pid {pid} survived SIGKILL")
        say(self.name, f"killed pid {pid} (SIGKILL)")

    def clean(self) -> None:
        data = self.data
        if not data.is_relative_to(self.paths.state) and data.name.startswith("evp-postgres-"):
            shutil.rmtree(data, ignore_errors=True)


class Toxiproxy(Detached):
    """toxiproxy, the TCP fault proxy: built once from its Go module, run with its API on loopback.

    Its proxies (and their toxics) live in the process's memory: tests create the ones they
    need and delete them after (tests/support/toxiproxy.py); a restart starts with none.
    """

    name = "toxiproxy"
    needle = "toxiproxy-server"
    stop_timeout = TOXIPROXY_STOP_TIMEOUT_S
    url = address = f"http://{HOST}:{TOXIPROXY_PORT}"
    ports = ((TOXIPROXY_PORT, "toxiproxy API"),)
    _child: subprocess.Popen[bytes] | None = None  #: the server this object started, if it did

    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self.pid_file = paths.state / "toxiproxy.pid"
        self.log = paths.logs / "toxiproxy.log"

    def client_env(self) -> dict[str, str]:
        """``EVP_TOXIPROXY_URL``: where the fault tests find toxiproxy's API."""
        return {"EVP_TOXIPROXY_URL": self.url}

    def status(self) -> Status:
        pid = self._pid()
        detail = f"pid {pid or '-'}  {self.url} (API)  log {self.log}"
        return Status(self.name, local_state(pid, TOXIPROXY_PORT), detail)

    def _answers(self) -> bool:
        return toxiproxy_version(self.url) is not None

    def _start(self) -> int:
        self.paths.ensure_state()
        binary = self.binary()
        rotate_log(self.log)
        say(self.name, f"starting (log {self.log})")
        with open(self.log, "ab") as out:
            proc = subprocess.Popen(
                [str(binary), "-host", HOST, "-port", str(TOXIPROXY_PORT)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.paths.state,
                env=scrubbed_env(),
                start_new_session=True,
            )
        self.pid_file.write_text(f"{proc.pid}\n")
        self._child = proc
        return proc.pid

    def _wait_ready(self, pid: int) -> None:
        # Our own child: ask it whether it exited (a check of /proc by name can catch the
        # process before its command line reads as the server's, and fail a healthy start).
        own = self._child if self._child is not None and self._child.pid == pid else None

        def ready() -> bool:
            if own.poll() is not None if own is not None else not pid_alive(pid, self.needle):
                code = f" (exit status {own.returncode})" if own is not None else ""
                raise ServiceError(self.name, f"toxiproxy exited during startup{code}; {log_tail(self.log)}")
            return self._answers()

        if not wait_until(ready, TOXIPROXY_READY_TIMEOUT_S):
            raise ServiceError(self.name, f"its API did not answer on {self.url} within "
                                          f"{TOXIPROXY_READY_TIMEOUT_S:.0f}s; {log_tail(self.log)}")

    def binary(self) -> Path:
        """``toxiproxy-server`` at :data:`TOXIPROXY_VERSION`, built once into the shared cache.

        1. ``<cache>/toxiproxy-<version>/toxiproxy-server`` exists: it is used as it is.
        2. Otherwise ``go install <module>/cmd/server@v<version>`` builds it (Go from PATH, or
           Debian's ``golang-go`` when we may install it) with ``GOBIN`` in a private folder
           of the cache, the module downloads in ``<cache>/go/mod`` (kept: a rebuild does not
           fetch again), the build cache in that folder (deleted with it), and the version
           stamped into the binary as its ``/version`` answers.
        3. The folder is renamed into place complete, so an interrupted build leaves nothing
           that a later run would take for a binary.
        """
        target = self.paths.cache / f"toxiproxy-{TOXIPROXY_VERSION}"
        binary = target / "toxiproxy-server"
        if binary.exists():
            return binary
        go = require_tool(self.name, "go", ["golang-go"])
        say(self.name, f"building {TOXIPROXY_MODULE}/cmd/server@v{TOXIPROXY_VERSION} with {go} (first run only)...")
        started = time.monotonic()
        work = partial_folder(self.paths.cache, target.name)
        go_env = scrubbed_env(
            GOBIN=str(work), GOPATH=str(self.paths.cache / "go"), GOMODCACHE=str(self.paths.cache / "go" / "mod"),
            GOCACHE=str(work / ".build-cache"), GOFLAGS="-modcacherw", GOTOOLCHAIN="local",
            CGO_ENABLED="0",
        )
        try:
            run(
                self.name,
                [go, "install", f"-ldflags=-X {TOXIPROXY_MODULE}.Version={TOXIPROXY_VERSION}",
                 f"{TOXIPROXY_MODULE}/cmd/server@v{TOXIPROXY_VERSION}"],
                "go install of toxiproxy failed (is the Go module proxy reachable, and Go 1.17 or newer?)",
                env=go_env, cwd=self.paths.cache,
            )
            built = work / "server"
            if not built.exists():
                raise ServiceError(self.name, f"go install finished but {built} does not exist")
            built.rename(work / "toxiproxy-server")
            shutil.rmtree(work / ".build-cache", ignore_errors=True)
            try:
                work.rename(target)
            except OSError:
                if not binary.exists():  # not a concurrent build that got there first
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        say(self.name, f"built {binary} ({time.monotonic() - started:.1f}s)")
        return binary


#: Opens loopback URLs directly, whatever ``http_proxy`` says.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def toxiproxy_version(url: str) -> str | None:
    """What toxiproxy at ``url`` answers on ``GET /version``; None when nothing answers there."""
    try:
        with _DIRECT.open(f"{url}/version", timeout=2.0) as answer:
            return str(answer.read().decode("utf-8", "replace")).strip() or "unknown"
    except (OSError, http.client.HTTPException, ValueError):
        return None


def _app_role_sql(password: str) -> str:
    """Create the app role if absent, then pin its attributes and password (only its verifier is sent)."""
    return (
        f"SELECT 'CREATE ROLE \"{DB_USER}\" LOGIN' WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{DB_USER}')"
        " \\gexec\n"
        f"DO $$ BEGIN IF (SELECT oid FROM pg_roles WHERE rolname = '{DB_USER}') = 10 THEN"
        f" RAISE EXCEPTION '{DB_USER} is the bootstrap superuser: it cannot lose SUPERUSER'; END IF; END $$;\n"
        f"ALTER ROLE \"{DB_USER}\" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"
        f" PASSWORD '{scram_verifier(password)}';\n"
    )


#: Hand every object the bootstrap superuser (oid 10) owns outside the system schemas to ``{role}``:
#: ``REASSIGN OWNED`` refuses the bootstrap superuser, which owns the system catalogs too.
_REASSIGN_SQL = """
DO $$
DECLARE r record;
BEGIN
  FOR r IN SELECT n.nspname FROM pg_namespace n WHERE n.nspowner = 10
      AND n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema' LOOP
    EXECUTE format('ALTER SCHEMA %I OWNER TO %I', r.nspname, '{role}');
  END LOOP;
  FOR r IN SELECT c.oid::regclass::text AS name, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE c.relowner = 10 AND n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema'
        AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
        AND NOT (c.relkind = 'S' AND EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                 AND d.objid = c.oid AND d.deptype IN ('a', 'i'))) LOOP
    EXECUTE format('ALTER %s %s OWNER TO %I', CASE r.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                   WHEN 'f' THEN 'FOREIGN TABLE' WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END, r.name, '{role}');
  END LOOP;
  FOR r IN SELECT p.oid::regprocedure::text AS name FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
      WHERE p.proowner = 10 AND n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema' LOOP
    EXECUTE format('ALTER ROUTINE %s OWNER TO %I', r.name, '{role}');
  END LOOP;
END $$;
"""


# --- command line -----------------------------------------------------------------------


def make_services(paths: Paths, env: dict[str, str]) -> dict[str, Service]:
    kafka: Service = Kafka(paths)
    if env.get("EVP_KAFKA"):
        kafka = External("kafka", "EVP_KAFKA", env["EVP_KAFKA"], kafka_addresses(env["EVP_KAFKA"]))
    local = Postgres(paths)
    postgres: Service = local
    # A shell that ran `eval "$(services.py env)"` names our own server: still ours to run.
    if env.get("EVP_DATABASE_URL") and env["EVP_DATABASE_URL"] != local.client_env()["EVP_DATABASE_URL"]:
        url = env["EVP_DATABASE_URL"]
        postgres = External("postgres", "EVP_DATABASE_URL", url, [database_address(url)])
    toxiproxy: Service = Toxiproxy(paths)
    if env.get("EVP_TOXIPROXY_URL") and env["EVP_TOXIPROXY_URL"] != toxiproxy.client_env()["EVP_TOXIPROXY_URL"]:
        url = env["EVP_TOXIPROXY_URL"]
        toxiproxy = External("toxiproxy", "EVP_TOXIPROXY_URL", url, [toxiproxy_address(url)])
    return {"kafka": kafka, "postgres": postgres, "toxiproxy": toxiproxy}


def toxiproxy_address(url: str) -> Address:
    """The host and port of toxiproxy's API URL (``http://host:port``)."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError as err:
        raise ServiceError("toxiproxy", f"EVP_TOXIPROXY_URL has a bad port: {err}") from err
    if parts.scheme != "http" or not parts.hostname or port is None:
        raise ServiceError("toxiproxy", f"EVP_TOXIPROXY_URL must be http://host:port, got {url!r}")
    return Address(parts.hostname, port)


def clean_state(paths: Paths, services: Sequence[Service]) -> None:
    """Delete all local state (broker log, database, snapshots, keys); caches stay."""
    for service in services:
        service.clean()
    if not paths.state.exists():
        print(f"clean: {paths.state} does not exist")
        return
    if not (paths.state / STATE_MARKER).exists():
        message = f"{paths.state} has no {STATE_MARKER} marker: not deleting what this runner did not make"
        raise ServiceError("clean", message)
    shutil.rmtree(paths.state)
    print(f"clean: removed {paths.state}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="services.py",
                                     description="Run evp's Kafka, PostgreSQL and toxiproxy locally.")
    parser.add_argument("command", choices=["up", "down", "restart", "status", "kill", "clean", "env"])
    parser.add_argument("service", nargs="?", choices=["kafka", "postgres", "toxiproxy"], help="default: all three")
    args = parser.parse_args(argv)
    env = dict(os.environ)
    paths = Paths.from_env(env)
    try:
        everything = make_services(paths, env)
    except ServiceError as err:
        print(f"{err.service}: error: {err}", file=sys.stderr)
        return 1
    chosen = [everything[args.service]] if args.service else list(everything.values())

    if args.command == "env":
        # `eval "$(python3 platform/services.py env)"` points evp's clients at these services.
        for service in chosen:
            for variable, value in sorted(service.client_env().items()):
                print(f"export {variable}={shlex.quote(value)}")
        return 0

    if args.command == "status":
        statuses = [service.status() for service in chosen]
        for status in statuses:
            print(status.line())
        return 0 if all(status.running for status in statuses) else EXIT_NOT_RUNNING

    if args.command == "clean":
        if args.service:
            parser.error("clean takes no service name: it removes the whole state directory")
        chosen = list(everything.values())
    steps = {"up": ["up"], "down": ["down"], "restart": ["down", "up"], "kill": ["kill"], "clean": ["down"]}
    failed = False
    for service in chosen:
        try:
            with exclusive(paths, service.name):
                for step in steps[args.command]:
                    getattr(service, step)()
        except ServiceError as err:
            print(f"{err.service}: error: {err}", file=sys.stderr)
            failed = True
    if args.command == "clean" and not failed:
        try:
            clean_state(paths, chosen)
        except ServiceError as err:
            print(f"{err.service}: error: {err}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
