#!/usr/bin/env python3
"""Start, stop and inspect the services evp runs on, without Docker.

    python3 platform/services.py up|down|restart|status|kill|clean [kafka|postgres]

Kafka (Apache Kafka 4.3, one KRaft node, jars resolved by Maven from
platform/kafka/pom.xml) and PostgreSQL (Debian's packages) run as detached processes
whose state lives in one directory, ``$EVP_HOME`` or ``<repo>/.evp``. That is what makes
``up`` idempotent, lets ``down`` find what ``up`` started, and lets ``kill`` simulate a
crash for fault tests. ``EVP_KAFKA`` / ``EVP_DATABASE_URL`` point at services run
elsewhere: they are then only checked, never started or stopped.

Standard library only, because it runs before any virtual environment exists.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import pwd
import re
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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

HOST = "127.0.0.1"
KAFKA_PORT = 19092
KAFKA_CONTROLLER_PORT = 19093
POSTGRES_PORT = 15432
DATABASE = "evp"
DB_USER = "evp"
KAFKA_READY_TIMEOUT_S = 90.0
KAFKA_STOP_TIMEOUT_S = 30.0
KAFKA_STARTED_LINE = "Kafka Server started"
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


def ensure_port_free(service: str, port: int, role: str) -> None:
    if port_open(HOST, port):
        raise ServiceError(
            service,
            f"port {port} ({role}) on {HOST} is in use by a process this runner did not start; "
            f"stop it, or point evp at it with {'EVP_KAFKA' if service == 'kafka' else 'EVP_DATABASE_URL'}",
        )


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


class Kafka(Service):
    """Apache Kafka, one KRaft node that is both broker and controller."""

    name = "kafka"
    needle = "kafka.Kafka"

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

    def _pid(self) -> int | None:
        pid = read_pid(self.pid_file)
        return pid if pid is not None and pid_alive(pid, self.needle) else None

    def status(self) -> Status:
        pid = self._pid()
        detail = f"pid {pid or '-'}  {HOST}:{KAFKA_PORT}  log {self.log}"
        return Status(self.name, local_state(pid, KAFKA_PORT), detail)

    def up(self) -> None:
        pid = self._pid()
        if pid is not None and port_open(HOST, KAFKA_PORT):
            say(self.name, f"already running (pid {pid}) on {HOST}:{KAFKA_PORT}")
            return
        started = time.monotonic()
        if pid is None:
            for port, role in ((KAFKA_PORT, "kafka broker"), (KAFKA_CONTROLLER_PORT, "kafka controller")):
                ensure_port_free(self.name, port, role)
            pid = self._start()
        else:
            say(self.name, f"pid {pid} is still starting; waiting for it")
        self._wait_ready(pid)
        say(self.name, f"ready on {HOST}:{KAFKA_PORT} in {time.monotonic() - started:.1f}s")

    def _start(self) -> int:
        self.paths.ensure_state()
        java = self._java()
        jars = self._jars()
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
        self.paths.cache.mkdir(parents=True, exist_ok=True)
        # Resolve into a private directory and rename it into place: the target either
        # does not exist or is complete, whatever happened to an earlier run.
        for stale in self.paths.cache.glob(f"kafka-{digest}.partial-*"):
            owner = stale.name.rpartition("-")[2]
            if not (owner.isdigit() and int(owner) > 0 and pid_alive(int(owner), "")):  # its resolver is gone
                shutil.rmtree(stale, ignore_errors=True)
        work = self.paths.cache / f"kafka-{digest}.partial-{os.getpid()}"
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

    def _render_properties(self) -> None:
        values = {"host": HOST, "broker_port": KAFKA_PORT, "controller_port": KAFKA_CONTROLLER_PORT}
        values["log_dirs"] = self.data
        try:
            text = string.Template(self.template.read_text()).substitute(values)
        except (KeyError, ValueError) as err:
            raise ServiceError(self.name, f"{self.template} has an unknown or malformed placeholder: {err}") from err
        self.props.write_text(text)

    def _format_storage(self, java: str, jars: Path) -> None:
        """Format the KRaft log directory once; its cluster id is kept in the state dir."""
        if (self.data / "meta.properties").exists():
            return
        tool = [java, *self._java_props(), "-cp", f"{jars}/*", "kafka.tools.StorageTool"]
        cluster_id = self.cluster_id_file.read_text().strip() if self.cluster_id_file.exists() else ""
        if not cluster_id:
            output = run(self.name, [*tool, "random-uuid"], "could not generate a cluster id")
            ids = [line for line in output.split() if CLUSTER_ID.fullmatch(line)]
            if not ids:
                raise ServiceError(self.name, f"StorageTool random-uuid printed no cluster id: {output.strip()[:300]}")
            cluster_id = ids[-1]
            self.cluster_id_file.write_text(cluster_id + "\n")
        say(self.name, f"formatting {self.data} (cluster id {cluster_id})")
        format_cmd = [*tool, "format", "-t", cluster_id, "-c", str(self.props), "--ignore-formatted"]
        run(self.name, format_cmd, "storage format failed")

    def down(self) -> None:
        pid = self._pid()
        if pid is None:
            say(self.name, "not running")
            self.pid_file.unlink(missing_ok=True)
            return
        say(self.name, f"stopping pid {pid}...")
        signal_group(pid, signal.SIGTERM)
        if not wait_until(lambda: not pid_alive(pid, self.needle), KAFKA_STOP_TIMEOUT_S):
            say(self.name, f"still running after {KAFKA_STOP_TIMEOUT_S:.0f}s; sending SIGKILL")
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
                self._ensure_database(self._bindir(self._data_major(self.data)))
                return
            tail = log_tail(self.log)
            raise ServiceError(self.name, f"pid {pid} runs but does not answer on {POSTGRES_PORT}; {tail}")
        ensure_port_free(self.name, POSTGRES_PORT, "postgres")
        if is_root() and shutil.which("runuser") is None:
            raise ServiceError(self.name, "runuser (util-linux) is needed to run the server as the postgres user")
        self.paths.ensure_state()
        data = self._choose_data_dir()
        self._check_data_dir(data)
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
        self._ensure_database(bindir)
        say(self.name, f"ready on {HOST}:{POSTGRES_PORT} in {time.monotonic() - started:.1f}s")

    @staticmethod
    def _data_major(data: Path) -> str | None:
        try:
            return (data / "PG_VERSION").read_text().strip()
        except OSError:
            return None

    def _initdb(self, bindir: Path, data: Path) -> None:
        say(self.name, f"initializing {data}")
        # Trust authentication on loopback: this server is for local development and
        # tests only, and listens on 127.0.0.1 alone. Real deployments set EVP_DATABASE_URL.
        cmd = [str(bindir / "initdb"), "-D", str(data), "-U", DB_USER, "--auth=trust", "-E", "UTF8", "--locale=C"]
        run(self.name, self._as_server_user(cmd), "initdb failed", cwd=data)

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

    def _ensure_database(self, bindir: Path) -> None:
        psql = [str(bindir / "psql"), "-X", "-q", "-h", HOST, "-p", str(POSTGRES_PORT), "-U", DB_USER, "-d", "postgres"]
        psql += ["-tA", "-c"]
        env = scrubbed_env(PGCONNECT_TIMEOUT="5")
        query = f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"
        exists = run(self.name, [*psql, query], "psql failed", env=env)
        if exists.strip() != "1":
            say(self.name, f"creating database {DATABASE}")
            run(self.name, [*psql, f"CREATE DATABASE {DATABASE}"], f"could not create database {DATABASE}", env=env)

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


# --- command line -----------------------------------------------------------------------


def make_services(paths: Paths, env: dict[str, str]) -> dict[str, Service]:
    kafka: Service = Kafka(paths)
    if env.get("EVP_KAFKA"):
        kafka = External("kafka", "EVP_KAFKA", env["EVP_KAFKA"], kafka_addresses(env["EVP_KAFKA"]))
    postgres: Service = Postgres(paths)
    if env.get("EVP_DATABASE_URL"):
        url = env["EVP_DATABASE_URL"]
        postgres = External("postgres", "EVP_DATABASE_URL", url, [database_address(url)])
    return {"kafka": kafka, "postgres": postgres}


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
    parser = argparse.ArgumentParser(prog="services.py", description="Run evp's Kafka and PostgreSQL locally.")
    parser.add_argument("command", choices=["up", "down", "restart", "status", "kill", "clean", "env"])
    parser.add_argument("service", nargs="?", choices=["kafka", "postgres"], help="default: both")
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
