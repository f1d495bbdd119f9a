"""Secrets stay out of argv and reprs; ids and schemas that reach paths or ownership are checked first.

Pure checks, no services: the command-line parser of ``evp backup restore``, the keyring URL
file, the backup key, snapshot and run ids, and the views' schema of ``evp projections grant``.
The same promises against real services are in ``tests/events/ops/test_backup.py``
(restore from ``--keys-from-env``/``--keys-from-file``), ``tests/platform/test_services.py``
(the services' environments) and ``tests/privacy/test_roles.py`` (grant on ``public``).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import os
import string
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import pytest
from hypothesis import given, strategies as st

from events.cli import backup as backup_cli
from events.errors import ConfigurationError
from events.ops.backup import BackupKey
from projections.roles import check_views_schema
from trainer.snapshot import check_snapshot_id

passwords = st.text(alphabet=string.ascii_letters + string.digits + "!$&()*+,;=-._~", min_size=1,
                    max_size=30).map(lambda text: f"pw~{text}")


def restore_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evp", exit_on_error=False)
    backup_cli.register(parser.add_subparsers(dest="command", required=True))
    return parser


@given(password=passwords, where=st.sampled_from(["userinfo", "query", "keyvalue"]))
def test_restore_refuses_a_password_on_its_command_line(password: str, where: str) -> None:
    url = {
        "userinfo": f"postgresql://evp:{quote(password, safe='')}@db:5432/evp",
        "query": f"postgresql://evp@db:5432/evp?password={quote(password, safe='')}",
        "keyvalue": f"host=db dbname=evp password={password}",
    }[where]
    printed = io.StringIO()
    with pytest.raises(SystemExit) as exited, contextlib.redirect_stderr(printed):
        restore_parser().parse_args(["backup", "restore", "--keys-from", url, "backup.evpbak"])
    assert exited.value.code == 2
    err = printed.getvalue()
    assert "holds a password" in err and "--keys-from-env VAR" in err and "--keys-from-file PATH" in err
    assert password not in err and quote(password, safe="") not in err


def test_restore_takes_a_passwordless_url_in_argv_and_one_option_at_most() -> None:
    args = restore_parser().parse_args(["backup", "restore", "--keys-from", "postgresql://evp@db/evp", "x.evpbak"])
    assert backup_cli.keys_url(args) == "postgresql://evp@db/evp"
    with pytest.raises((SystemExit, argparse.ArgumentError)):
        restore_parser().parse_args(["backup", "restore", "--keys-from-env", "A", "--keys-from-file", "f", "x"])


def test_the_keyring_url_comes_from_an_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    args = restore_parser().parse_args(["backup", "restore", "--keys-from-env", "EVP_LIVE_KEYRING", "x.evpbak"])
    assert backup_cli.keys_url(args, {"EVP_LIVE_KEYRING": " postgresql://evp:pw~1@db/evp\n"}) == \
        "postgresql://evp:pw~1@db/evp"
    with pytest.raises(ConfigurationError, match="EVP_LIVE_KEYRING: that environment variable is unset"):
        backup_cli.keys_url(args, {})


def test_the_keyring_url_file_must_be_private(tmp_path: Path) -> None:
    path = tmp_path / "keyring-url"
    path.write_text("postgresql://evp:pw~file@db/evp\n")
    args = SimpleNamespace(keys_from_env=None, keys_from_file=str(path), keys_from=None)
    for loose in (0o644, 0o640, 0o604, 0o660):
        path.chmod(loose)
        with pytest.raises(ConfigurationError, match=rf"has mode {loose:04o}.*chmod 600") as refused:
            backup_cli.keys_url(args)  # type: ignore[arg-type]
        assert "pw~file" not in str(refused.value)
    path.chmod(0o600)
    assert backup_cli.keys_url(args) == "postgresql://evp:pw~file@db/evp"  # type: ignore[arg-type]
    path.chmod(0o400)
    assert backup_cli.keys_url(args) == "postgresql://evp:pw~file@db/evp"  # type: ignore[arg-type]
    empty = tmp_path / "empty"
    empty.write_text("\n")
    empty.chmod(0o600)
    with pytest.raises(ConfigurationError, match="is empty"):
        backup_cli.keys_url_from_file(empty)
    with pytest.raises(ConfigurationError, match="not a regular file"):
        backup_cli.keys_url_from_file(tmp_path)
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)
        with pytest.raises(ConfigurationError, match="belongs to uid 65534"):
            backup_cli.keys_url_from_file(path)


def test_a_backup_key_shows_its_fingerprint_only() -> None:
    secret = os.urandom(32)
    key = BackupKey(secret)
    assert repr(key) == f"BackupKey(key_id={key.key_id!r})" and key.key_id.startswith("bk-")
    assert secret.hex() not in repr(key) and base64.b64encode(secret).decode() not in repr(key)
    assert BackupKey(secret)._key == key._key != BackupKey.generate()._key
    assert key._key != secret  # derived, never the stored secret itself
    with pytest.raises(ConfigurationError, match="32 bytes"):
        BackupKey(b"short")


@pytest.mark.parametrize("bad", ["../../etc", "snap-../x", "snap-ABC", "snap-", "snap-a/b", "/abs", "snap-a.b",
                                 "snap-a\x00", "run-0123", "", "snap-" + "a" * 41, "snap-a\n"])
def test_bad_snapshot_ids_are_refused_before_any_path_is_built(bad: str) -> None:
    with pytest.raises(ConfigurationError, match="snapshot id .* is not valid"):
        check_snapshot_id(bad)


def test_snapshot_ids_evp_makes_pass() -> None:
    assert check_snapshot_id("snap-0192f3a4b5c6") == "snap-0192f3a4b5c6"


def test_bad_ids_are_refused_by_the_functions_that_build_paths(tmp_path: Path) -> None:
    from events.settings import Settings
    from trainer.snapshot import load_manifest, snapshot_dir

    store = SimpleNamespace(settings=Settings(home=tmp_path))
    with pytest.raises(ConfigurationError, match=r"snapshot id '\.\./\.\./etc' is not valid"):
        snapshot_dir(store, "../../etc")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="snapshot id"):
        load_manifest(store, "snap-../../x")  # type: ignore[arg-type]
    assert snapshot_dir(store, "snap-abc") == tmp_path / "snapshots" / "snap-abc"  # type: ignore[arg-type]


def test_bad_run_ids_are_refused_before_any_path_is_built(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from events.settings import Settings
    from trainer.runs import check_run_id, load_run, run_dir

    store = SimpleNamespace(settings=Settings(home=tmp_path))
    for bad in ("../weights", "run-../../x", "run-A", "run-", "snap-0123", "run-a/b", "run-a.pt"):
        with pytest.raises(ConfigurationError, match="run id .* is not valid"):
            check_run_id(bad)
        with pytest.raises(ConfigurationError, match="run id"):
            run_dir(store, bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="run id"):
            load_run(store, bad)  # type: ignore[arg-type]
    assert run_dir(store, "run-0192f3a4b5c6") == tmp_path / "runs" / "run-0192f3a4b5c6"  # type: ignore[arg-type]


@pytest.mark.parametrize("schema", ["public", "PUBLIC", "pg_catalog", "pg_toast", "information_schema", "evp_audit"])
def test_grant_refuses_shared_schemas_without_a_database(schema: str) -> None:
    with pytest.raises(ConfigurationError, match=rf"schema '{schema}' cannot hold a view that has roles"):
        check_views_schema(schema)


def test_grant_accepts_a_views_own_schema() -> None:
    check_views_schema("digits_samples")


def test_the_backup_key_lives_beside_the_kek_is_private_and_is_never_created_to_verify(tmp_path: Path) -> None:
    from events.settings import Settings

    settings = Settings(home=tmp_path, kek_file=tmp_path / "keys" / "kek")
    with pytest.raises(ConfigurationError, match="needs the backup key"):
        BackupKey.from_settings(settings)
    made = BackupKey.from_settings(settings, create=True)
    path = tmp_path / "keys" / "backup.key"
    assert path.stat().st_mode & 0o777 == 0o600
    assert BackupKey.from_settings(settings).key_id == made.key_id  # created once, then reused
    path.chmod(0o644)
    with pytest.raises(ConfigurationError, match="readable by others"):
        BackupKey.from_settings(settings)
