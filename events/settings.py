"""Settings, read from the environment in exactly one place.

Every other module receives a :class:`Settings`; nothing else reads ``os.environ``, so
the same code points at the local runner, a test's private topics, or a real cluster.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from events.errors import ConfigurationError

#: Ports of the local runner (platform/services.py) and compose.yaml.
DEFAULT_KAFKA = "127.0.0.1:19092"
DEFAULT_DATABASE_URL = "postgresql://evp@127.0.0.1:15432/evp"

_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,100}$")
#: What a repr shows instead of a secret.
MASK = "***"


def describe_database(url: str) -> str:
    """``host:port/dbname`` of a libpq URL or key=value string: never its password.

    The stdlib twin of :func:`events.adapters.postgres.describe`, for modules (this one)
    that must not import psycopg.
    """
    if "://" in url:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        try:
            port = parts.port
        except ValueError:
            port = None
        host = query.get("host", [unquote(parts.hostname or "")])[0] or "localhost"
        port_text = query.get("port", [str(port or 5432)])[0]
        dbname = query.get("dbname", [unquote(parts.path.lstrip("/"))])[0] or unquote(parts.username or "")
        return f"{host}:{port_text}/{dbname}"
    params = dict(item.split("=", 1) for item in url.split() if "=" in item)
    host = params.get("host") or params.get("hostaddr") or "localhost"
    return f"{host}:{params.get('port') or 5432}/{params.get('dbname') or params.get('user') or ''}"


def has_password(url: str) -> bool:
    """Whether a libpq URL or key=value string carries a password (``user:pw@``, ``password=``)."""
    if "://" in url:
        parts = urlsplit(url)
        return bool(parts.password) or "password" in parse_qs(parts.query)
    return any(item.split("=", 1)[0].strip() == "password" for item in url.split() if "=" in item)


@dataclass(frozen=True)
class Settings:
    """Where evp's services are and how its topics are named.

    ``topic_prefix`` namespaces every topic evp owns, so that several deployments (or
    test sessions) can share one broker without seeing each other's events.
    """

    kafka: str = DEFAULT_KAFKA
    database_url: str = DEFAULT_DATABASE_URL
    topic_prefix: str = "evp"
    partitions: int = 3
    home: Path = Path(".evp")
    kek: str | None = None
    kek_file: Path | None = None
    actor: str = "evp"  #: who this process acts for, recorded with the events it appends
    project: Path | None = None  #: EVP_PROJECT: an evp.toml or its folder (else ./evp.toml, if any)

    def __post_init__(self) -> None:
        if not _PREFIX.match(self.topic_prefix):
            raise ConfigurationError(f"EVP_TOPIC_PREFIX {self.topic_prefix!r} is not a valid topic prefix")
        if self.partitions < 1:
            raise ConfigurationError(f"EVP_PARTITIONS must be at least 1, got {self.partitions}")

    @property
    def events_topic(self) -> str:
        """The topic every domain event goes to; key = stream id keeps per-stream order."""
        return f"{self.topic_prefix}.events"

    @property
    def schemas_topic(self) -> str:
        """The compacted topic the schema registry keeps its schemas in."""
        return f"{self.topic_prefix}._schemas"

    @property
    def dead_letter_topic(self) -> str:
        return f"{self.topic_prefix}.events.dlq"

    @property
    def snapshots_dir(self) -> Path:
        return self.home / "snapshots"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def kek_path(self) -> Path:
        return self.kek_file if self.kek_file is not None else self.home / "keyring" / "kek"

    @property
    def keyring_dir(self) -> Path:
        """Where the default KEK lives: ``<home>/keyring``, a 0700 folder of its own.

        Not the services' state folder's top level (the runner's logs and the broker's data
        sit there, readable by others): the KEK gets a private folder beside them.
        """
        return self.kek_path.parent

    def __repr__(self) -> str:
        """Every field, the secrets masked: the KEK and the database password never show."""
        shown = []
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name == "kek" and value is not None:
                shown.append(f"kek={MASK!r}")
            elif item.name == "database_url":
                shown.append(f"database_url={describe_database(value)!r}")
            else:
                shown.append(f"{item.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    __str__ = __repr__

    def with_(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]

    def to_env(self) -> dict[str, str]:
        """The environment variables that reproduce these settings in a child process.

        For evp's own children only (they need the KEK and the database password): it holds
        secrets. Third-party programs (the Kafka JVM, the postmaster) are started with an
        environment scrubbed of them (``platform/services.py``: ``scrubbed_env``).
        """
        env = {
            "EVP_KAFKA": self.kafka,
            "EVP_DATABASE_URL": self.database_url,
            "EVP_TOPIC_PREFIX": self.topic_prefix,
            "EVP_PARTITIONS": str(self.partitions),
            "EVP_HOME": str(self.home),
        }
        if self.kek:
            env["EVP_KEK"] = self.kek
        if self.kek_file is not None:
            env["EVP_KEK_FILE"] = str(self.kek_file)
        env["EVP_ACTOR"] = self.actor
        if self.project is not None:
            env["EVP_PROJECT"] = str(self.project)
        return env

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        try:
            partitions = int(env.get("EVP_PARTITIONS", "3"))
        except ValueError as err:
            raise ConfigurationError(f"EVP_PARTITIONS must be a whole number, got {env['EVP_PARTITIONS']!r}") from err
        kek_file = env.get("EVP_KEK_FILE")
        project = env.get("EVP_PROJECT")
        return cls(
            kafka=env.get("EVP_KAFKA") or DEFAULT_KAFKA,
            database_url=env.get("EVP_DATABASE_URL") or DEFAULT_DATABASE_URL,
            topic_prefix=env.get("EVP_TOPIC_PREFIX", "evp"),
            partitions=partitions,
            home=Path(env.get("EVP_HOME", ".evp")),
            kek=env.get("EVP_KEK") or None,
            kek_file=Path(kek_file) if kek_file else None,
            actor=env.get("EVP_ACTOR") or env.get("USER") or env.get("LOGNAME") or "evp",
            project=Path(project) if project else None,
        )
