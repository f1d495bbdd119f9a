"""The local PostgreSQL asks every role for its password, and evp's own role is no superuser.

What a local user without the passfile can do: nothing (a connection without the password is
refused). What evp's processes can do: their own database's tables, not the server's
programs or files (no ``COPY ... TO PROGRAM``, no ``pg_read_server_files``).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import psycopg
import psycopg.errors
import pytest

from events.settings import Settings, database_name, with_database
from tests.platform.test_services import RUNNER, load_runner

runner = load_runner()


def local_postgres() -> object:
    paths = runner.Paths.from_env({k: v for k, v in os.environ.items() if k == "EVP_HOME"})
    return runner.Postgres(paths)


def passwords(passfile: Path) -> list[str]:
    return [line.split(":")[4] for line in passfile.read_text().splitlines() if line.count(":") == 4]


# -- without services --------------------------------------------------------------------------
def test_the_passfile_is_made_once_private_and_reused(tmp_path: Path) -> None:
    paths = runner.Paths(repo=RUNNER.parent.parent, state=tmp_path / "state", cache=tmp_path / "cache")
    postgres = runner.Postgres(paths)
    first = postgres._passwords()
    assert set(first) == {runner.ADMIN_USER, runner.DB_USER} and first[runner.ADMIN_USER] != first[runner.DB_USER]
    assert stat.S_IMODE(postgres.passfile.stat().st_mode) == 0o600
    assert stat.S_IMODE(postgres.passfile.parent.stat().st_mode) == 0o700
    assert postgres._passwords() == first  # created once, reused
    for role, password in first.items():
        assert f"127.0.0.1:15432:*:{role}:{password}" in postgres.passfile.read_text()
    env = postgres.client_env()
    assert set(env) == {"EVP_DATABASE_URL", "EVP_ADMIN_DATABASE_URL"}
    assert env["EVP_DATABASE_URL"] == f"postgresql://evp@127.0.0.1:15432/evp?passfile={postgres.passfile}"
    assert env["EVP_ADMIN_DATABASE_URL"].startswith("postgresql://evp_admin@127.0.0.1:15432/evp?passfile=/")
    assert not any(password in value for value in env.values() for password in first.values())


def test_a_shell_pointed_at_the_local_server_still_lets_the_runner_manage_it(tmp_path: Path) -> None:
    paths = runner.Paths(repo=RUNNER.parent.parent, state=tmp_path / "state", cache=tmp_path / "cache")
    ours = runner.Postgres(paths).client_env()
    assert isinstance(runner.make_services(paths, dict(ours))["postgres"], runner.Postgres)
    other = {"EVP_DATABASE_URL": "postgresql://evp@db.example:5432/evp"}
    assert isinstance(runner.make_services(paths, other)["postgres"], runner.External)


def test_the_scram_verifier_is_what_postgresql_computes() -> None:
    """RFC 7677's example: user's password "pencil", salt W22ZaJ0SNY7soEsUEjb6gQ==, 4096 iterations."""
    import base64

    verifier = runner.scram_verifier("pencil", base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ=="), 4096)
    assert verifier == ("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:"
                        "wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=")


def test_urls_keep_their_passfile_when_they_change_database() -> None:
    url = "postgresql://evp@127.0.0.1:15432/evp?passfile=/srv/evp/credentials/pgpass"
    moved = with_database(url, "evp_test_1")
    assert moved == "postgresql://evp@127.0.0.1:15432/evp_test_1?passfile=/srv/evp/credentials/pgpass"
    assert database_name(moved) == "evp_test_1"
    settings = Settings(database_url=moved, admin_database_url="postgresql://evp_admin:s3cret@h:1/evp",
                        keyring_database_url="postgresql://keys:s3cret@k:2/keys")
    assert settings.admin_url("x") == "postgresql://evp_admin:s3cret@h:1/evp_test_1"
    assert settings.keyring_url == "postgresql://keys:s3cret@k:2/keys"
    assert "s3cret" not in repr(settings) and "h:1/evp" in repr(settings) and "k:2/keys" in repr(settings)
    assert Settings(database_url=moved).keyring_url == moved
    with pytest.raises(Exception, match="needs EVP_ADMIN_DATABASE_URL"):
        Settings().admin_url("evp projections grant")


# -- against the running server -----------------------------------------------------------------
@pytest.mark.services
def test_a_connection_without_the_password_is_refused(services: Settings) -> None:
    for user in (runner.DB_USER, runner.ADMIN_USER, "postgres"):
        with pytest.raises(psycopg.OperationalError, match="password|no password supplied"):
            psycopg.connect(f"postgresql://{user}@127.0.0.1:15432/evp?passfile=/dev/null&connect_timeout=5")
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(f"postgresql://{user}:wrong@127.0.0.1:15432/evp?connect_timeout=5")


@pytest.mark.services
def test_evps_role_is_no_superuser_and_cannot_reach_the_servers_programs_or_files(settings: Settings) -> None:
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        row = conn.execute("SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls FROM pg_roles"
                           " WHERE rolname = current_user").fetchone()
        assert row == (False, False, False, False, False)
        for role in ("pg_read_server_files", "pg_write_server_files", "pg_execute_server_program"):
            assert conn.execute("SELECT pg_has_role(current_user, %s, 'MEMBER')", (role,)).fetchone() == (False,)
        conn.execute("CREATE TABLE probe (line text)")
        for statement in (
            "COPY (SELECT 1) TO PROGRAM 'id'",
            "COPY probe FROM PROGRAM 'cat /etc/passwd'",
            "COPY probe FROM '/etc/passwd'",
            "SELECT pg_read_file('postgresql.conf')",
            "SELECT pg_ls_dir('.')",
            "CREATE ROLE planted LOGIN SUPERUSER",
            "CREATE DATABASE planted",
            "ALTER ROLE current_user SUPERUSER",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)


@pytest.mark.services
def test_the_local_passfile_is_0600_in_a_0700_folder(services: Settings) -> None:
    postgres = local_postgres()
    passfile: Path = postgres.passfile  # type: ignore[attr-defined]
    if postgres._pid() is None:  # type: ignore[attr-defined]
        pytest.skip(f"PostgreSQL is not run by this runner's state dir ({passfile.parent.parent})")
    assert stat.S_IMODE(passfile.stat().st_mode) == 0o600 and passfile.stat().st_uid == os.geteuid()
    assert stat.S_IMODE(passfile.parent.stat().st_mode) == 0o700
    assert len(passwords(passfile)) == 2


@pytest.mark.services
def test_no_password_in_the_postmasters_command_line_or_environment(services: Settings) -> None:
    postgres = local_postgres()
    pid = postgres._pid()  # type: ignore[attr-defined]
    if pid is None:
        pytest.skip("PostgreSQL is not run by this runner's state dir")
    secrets = passwords(postgres.passfile)  # type: ignore[attr-defined]
    assert secrets
    for name in ("cmdline", "environ"):
        seen = (Path("/proc") / str(pid) / name).read_bytes()
        assert seen, f"/proc/{pid}/{name} unreadable"
        assert not any(secret.encode() in seen for secret in secrets), f"a password is in /proc/{pid}/{name}"
