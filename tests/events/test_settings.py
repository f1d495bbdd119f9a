"""Settings: read from the environment once, and never showing a secret."""

from __future__ import annotations

import base64
import string
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import given, strategies as st

from events.errors import ConfigurationError
from events.settings import MASK, Settings, describe_database, has_password

#: Random secrets, marked (``pw~``) so that finding one in a repr means it leaked, not a coincidence.
secrets = st.text(alphabet=string.ascii_letters + string.digits + "!#$%&()*+,-./:;<=>?@[]^_{|}~", min_size=1,
                  max_size=40).map(lambda text: f"pw~{text}")
keks = st.binary(min_size=32, max_size=32).map(lambda raw: base64.b64encode(raw).decode())


@given(kek=keks, password=secrets, host=st.sampled_from(["127.0.0.1", "db.internal", "[::1]"]),
       port=st.integers(1, 65535))
def test_repr_and_str_never_show_the_kek_or_the_database_password(kek: str, password: str, host: str, port: int) -> None:
    url = f"postgresql://evp:{quote(password, safe='')}@{host}:{port}/ledger"
    settings = Settings(kek=kek, database_url=url)
    for shown in (repr(settings), str(settings), f"{settings}", repr([settings])):
        assert kek not in shown and password not in shown and quote(password, safe="") not in shown
        assert f"kek={MASK!r}" in shown
        assert f"{host.strip('[]')}:{port}/ledger" in shown
    assert settings.kek == kek and settings.database_url == url  # masked in the repr only


@given(password=secrets)
def test_a_key_value_connection_string_is_masked_too(password: str) -> None:
    conninfo = f"host=db port=6432 dbname=ledger user=evp password={password.replace(' ', '')}"
    settings = Settings(database_url=conninfo)
    assert password.replace(" ", "") not in repr(settings)
    assert "db:6432/ledger" in repr(settings)


def test_without_secrets_the_repr_still_names_every_field() -> None:
    shown = repr(Settings(topic_prefix="team-a", partitions=5))
    assert "kek=None" in shown and "topic_prefix='team-a'" in shown and "partitions=5" in shown
    assert "database_url='127.0.0.1:15432/evp'" in shown


@pytest.mark.parametrize(("url", "expected", "secret"), [
    ("postgresql://evp@127.0.0.1:15432/evp", "127.0.0.1:15432/evp", False),
    ("postgresql://evp:pw@db:5433/x", "db:5433/x", True),
    ("postgresql:///evp?host=/run/postgresql&port=5432", "/run/postgresql:5432/evp", False),
    ("postgresql://evp@db/x?password=pw", "db:5432/x", True),
    ("host=db dbname=x password=pw", "db:5432/x", True),
    ("host=db dbname=x", "db:5432/x", False),
])
def test_describe_and_has_password(url: str, expected: str, secret: bool) -> None:
    assert describe_database(url) == expected
    assert has_password(url) is secret


def test_to_env_is_for_evps_own_children_and_round_trips() -> None:
    settings = Settings(kek="k" * 44, database_url="postgresql://evp:pw@db/x", kek_file=Path("/keys/kek"))
    env = settings.to_env()
    assert env["EVP_KEK"] == "k" * 44 and env["EVP_DATABASE_URL"] == "postgresql://evp:pw@db/x"
    again = Settings.from_env(env)
    assert (again.kek, again.database_url, again.kek_file) == (settings.kek, settings.database_url, settings.kek_file)


def test_the_default_kek_lives_in_a_keyring_folder_of_its_own(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home")
    assert settings.kek_path == tmp_path / "home" / "keyring" / "kek"
    assert settings.keyring_dir == tmp_path / "home" / "keyring" != settings.home
    assert Settings(kek_file=tmp_path / "k").keyring_dir == tmp_path


@pytest.mark.parametrize("prefix", ["", "a/b", "../x", "-x"])
def test_bad_topic_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(ConfigurationError, match="EVP_TOPIC_PREFIX"):
        Settings(topic_prefix=prefix)
