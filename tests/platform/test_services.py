"""The local service runner reports clearly (which service, where, why) and hands no secret to a service."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, strategies as st

RUNNER = Path(__file__).resolve().parents[2] / "platform" / "services.py"


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("EVP_KAFKA", "EVP_DATABASE_URL")}
    return subprocess.run([sys.executable, str(RUNNER), *args], capture_output=True, text=True,
                          env={**clean, **env}, timeout=120)


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.services
def test_status_names_both_running_services_and_their_logs() -> None:
    result = run("status")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("kafka") and "running" in line and "19092" in line for line in lines)
    assert any(line.startswith("postgres") and "running" in line and "15432" in line for line in lines)
    assert all("log " in line for line in lines)


@pytest.mark.services
def test_up_is_idempotent_when_everything_runs() -> None:
    result = run("up")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "already running" in result.stdout


def test_an_unreachable_external_kafka_is_named_and_nothing_is_started() -> None:
    port = closed_port()
    result = run("up", "kafka", EVP_KAFKA=f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert f"kafka: error: EVP_KAFKA=127.0.0.1:{port} does not accept connections" in result.stderr


def test_status_of_an_unreachable_external_database_exits_non_zero() -> None:
    port = closed_port()
    result = run("status", "postgres", EVP_DATABASE_URL=f"postgresql://evp@127.0.0.1:{port}/evp")
    assert result.returncode == 3
    assert f"unreachable external at 127.0.0.1:{port} (EVP_DATABASE_URL)" in result.stdout


def test_a_malformed_database_url_is_refused_by_name() -> None:
    result = run("status", "postgres", EVP_DATABASE_URL="mysql://somewhere/db")
    assert result.returncode != 0
    assert "EVP_DATABASE_URL must start with postgresql://" in result.stdout + result.stderr


def test_an_unknown_service_is_refused() -> None:
    result = run("up", "zookeeper")
    assert result.returncode == 2 and "invalid choice: 'zookeeper'" in result.stderr


# -- secrets never reach a service, a predictable path never holds the database ----------------
def load_runner() -> ModuleType:
    """platform/services.py as a module (``platform`` is also the standard library's name)."""
    spec = importlib.util.spec_from_file_location("evp_services_runner", RUNNER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


services = load_runner()

SECRETS = {
    "EVP_KEK": "a2V5LW1hdGVyaWFsLW5vdC1mb3ItdGhlLWJyb2tlci0hIQ==",
    "EVP_KEK_FILE": "/keys/kek",
    "EVP_KEK_NEXT": "bmV4dA==",
    "EVP_DB_PASSWORD": "pw~db",
    "EVP_ADMIN_PASSWORD_FILE": "/run/pw",
    "PGPASSWORD": "pw~pg",
    "EVP_VAULT_TOKEN": "pw~vault",
    "GITHUB_TOKEN": "pw~gh",
    "EVP_DATABASE_URL": "postgresql://evp:pw~url@db:5432/evp",
}
HARMLESS = {"PATH": "/usr/bin:/bin", "HOME": "/root", "EVP_HOME": "/srv/evp", "LANG": "C.UTF-8",
            "EVP_KAFKA": "127.0.0.1:19092", "PGCONNECT_TIMEOUT": "5"}


def test_the_scrubbed_environment_holds_no_secret_and_keeps_the_rest() -> None:
    scrubbed = services.scrubbed_env({**SECRETS, **HARMLESS}, EXTRA="1")
    assert scrubbed == {**HARMLESS, "EXTRA": "1"}
    no_password = "postgresql://evp@db:5432/evp"
    assert services.scrubbed_env({"EVP_DATABASE_URL": no_password}) == {"EVP_DATABASE_URL": no_password}


@given(st.sampled_from(["EVP_KEK", "EVP_KEK_", "EVP_", "PG", "EVP_X_", "MY_", ""]),
       st.sampled_from(["PASSWORD", "TOKEN", "SECRET", "KEK", "PASSWD"]),
       st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ_0123456789", max_size=8))
def test_every_kek_password_and_token_variable_is_scrubbed(head: str, word: str, tail: str) -> None:
    name = f"{head}{word}{tail}" if word != "KEK" else f"EVP_KEK{tail}"
    assert name not in services.scrubbed_env({name: "pw~value", "PATH": "/bin"})


def environment_of(pid: int) -> dict[str, str]:
    raw = (Path("/proc") / str(pid) / "environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def secrets_in(env: dict[str, str]) -> list[str]:
    return sorted(name for name in env if services.SECRET_VARIABLE.match(name) or "pw~" in env[name])


@pytest.mark.services
def test_the_running_broker_and_postmaster_hold_no_secret_in_their_environment() -> None:
    """The pids the runner recorded for the shared services (read only: they are not restarted)."""
    paths = services.Paths.from_env({k: v for k, v in os.environ.items() if k == "EVP_HOME"})
    kafka, postgres = services.Kafka(paths), services.Postgres(paths)
    pids = {"kafka": kafka._pid(), "postgres": postgres._pid()}
    if None in pids.values():
        pytest.skip(f"the services are not run by this runner's state dir {paths.state}: {pids}")
    for service, pid in pids.items():
        env = environment_of(pid)
        assert env, f"{service} pid {pid}: environment unreadable"
        assert secrets_in(env) == [], f"{service} pid {pid} inherited secrets"
        assert not any(name.startswith("EVP_KEK") for name in env)


def dumping_program(folder: Path, name: str, out: Path) -> Path:
    """An executable that writes its environment to ``out`` and exits: stands in for java or pg_ctl."""
    program = folder / name
    program.write_text(f"#!{sys.executable}\nimport json, os\nopen({str(out)!r}, 'w').write(json.dumps(dict(os.environ)))\n")
    program.chmod(0o755)
    return program


def test_the_broker_is_started_without_evps_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner's own start path, with the KEK and passwords in its environment; only java is a stand-in."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "kafka-env.json"
    paths = services.Paths(repo=RUNNER.parent.parent, state=tmp_path / "state", cache=tmp_path / "cache")
    kafka = services.Kafka(paths)
    java = dumping_program(tmp_path, "java", out)
    monkeypatch.setattr(kafka, "_java", lambda: str(java))
    monkeypatch.setattr(kafka, "_jars", lambda: tmp_path)
    monkeypatch.setattr(kafka, "_format_storage", lambda java, jars: None)
    pid = kafka._start()
    assert wait_for(out), "the stand-in broker did not run"
    env = json.loads(out.read_text())
    assert secrets_in(env) == [] and env["PATH"] == os.environ["PATH"]
    assert read_int(kafka.pid_file) == pid


def test_the_postmaster_is_started_without_evps_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "pg-env.json"
    paths = services.Paths(repo=RUNNER.parent.parent, state=tmp_path / "state", cache=tmp_path / "cache")
    paths.ensure_state()
    postgres = services.Postgres(paths)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    dumping_program(bindir, "pg_ctl", out)
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setattr(services, "is_root", lambda: False)  # no runuser: the stand-in runs as us
    monkeypatch.setattr(services, "port_open", lambda host, port, timeout=0.5: True)
    postgres._start(bindir, data)
    env = json.loads(out.read_text())
    assert secrets_in(env) == [] and env["PATH"] == os.environ["PATH"]


def test_short_commands_run_without_secrets_too(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    printed = services.run("probe", [sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"], "probe")
    assert secrets_in(json.loads(printed)) == []


def wait_for(path: Path, seconds: float = 20.0) -> bool:
    return bool(services.wait_until(lambda: path.exists() and path.stat().st_size > 0, seconds))


def read_int(path: Path) -> int:
    return int(path.read_text().split()[0])


def test_an_external_database_url_is_never_printed_with_its_password() -> None:
    port = closed_port()
    result = run("up", "postgres", EVP_DATABASE_URL=f"postgresql://evp:pw~hidden@127.0.0.1:{port}/evp")
    assert result.returncode == 1
    assert "pw~hidden" not in result.stdout + result.stderr
    assert f"EVP_DATABASE_URL=postgresql://evp:***@127.0.0.1:{port}/evp does not accept connections" in result.stderr
    bad = run("status", "postgres", EVP_DATABASE_URL="mysql://evp:pw~hidden@somewhere/db")
    assert "pw~hidden" not in bad.stdout + bad.stderr


def test_the_fallback_data_directory_is_private_and_unpredictable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(services, "FALLBACK_PARENT", str(tmp_path))
    paths = services.Paths(repo=RUNNER.parent.parent, state=tmp_path / "state", cache=tmp_path / "cache")
    paths.ensure_state()
    postgres = services.Postgres(paths)
    first, second = postgres._fallback(), postgres._fallback()
    assert first != second and first.name.startswith("evp-postgres-") and first.parent == tmp_path
    for made in (first, second):
        info = made.lstat()
        assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.geteuid()
    # the name is not derived from the state dir: nobody can create it in advance
    assert hashlib.sha256(str(paths.state).encode()).hexdigest()[:12] not in first.name

    # when the postgres user cannot reach the state dir, a fresh one is chosen and recorded
    monkeypatch.setattr(services, "is_root", lambda: True)
    monkeypatch.setattr(postgres, "_as_server_user", lambda cmd: ["false"])
    chosen = postgres._choose_data_dir()
    assert chosen.parent == tmp_path and chosen not in (first, second)
    assert postgres.location_file.read_text().strip() == str(chosen) and postgres.data == chosen


def test_a_data_directory_planted_by_someone_else_or_readable_by_others_is_refused(tmp_path: Path) -> None:
    paths = services.Paths(repo=RUNNER.parent.parent, state=tmp_path / "state", cache=tmp_path / "cache")
    postgres = services.Postgres(paths)
    postgres._check_data_dir(tmp_path / "absent")  # not there yet: fine, up creates it
    ours = tmp_path / "ours"
    ours.mkdir(mode=0o700)
    ours.chmod(0o700)
    postgres._check_data_dir(ours)
    ours.chmod(0o755)
    with pytest.raises(services.ServiceError, match=r"has mode 0755, wider than 0700"):
        postgres._check_data_dir(ours)
    link = tmp_path / "link"
    link.symlink_to(ours)
    with pytest.raises(services.ServiceError, match="not a directory"):
        postgres._check_data_dir(link)
    if os.geteuid() == 0:
        planted = tmp_path / "planted"
        planted.mkdir(mode=0o700)
        os.chown(planted, 65534, 65534)  # nobody
        with pytest.raises(services.ServiceError, match=r"belongs to uid 65534.*refusing it"):
            postgres._check_data_dir(planted)
