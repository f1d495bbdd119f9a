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
from urllib.parse import parse_qs, quote, unquote, urlsplit

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


def with_database(url: str, dbname: str) -> str:
    """``url`` (a libpq URL or key=value string) naming the database ``dbname`` instead.

    Keeps the user, host and every parameter (``passfile=...``): not a split at the last
    ``/``, which a passfile's path in the query would break.
    """
    if "://" in url:
        parts = urlsplit(url)
        query = "&".join(item for item in parts.query.split("&") if item and not item.startswith("dbname="))
        return parts._replace(path="/" + quote(dbname, safe=""), query=query).geturl()
    kept = [item for item in url.split() if not item.startswith("dbname=")]
    return " ".join([*kept, f"dbname={dbname}"])


def database_name(url: str) -> str:
    """The database a libpq URL or key=value string names."""
    return describe_database(url).split("/", 1)[1]


def has_password(url: str) -> bool:
    """Whether a libpq URL or key=value string carries a password (``user:pw@``, ``password=``)."""
    if "://" in url:
        parts = urlsplit(url)
        return bool(parts.password) or "password" in parse_qs(parts.query)
    return any(item.split("=", 1)[0].strip() == "password" for item in url.split() if "=" in item)


KAFKA_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
KAFKA_SASL_MECHANISMS = ("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN")


@dataclass(frozen=True)
class KafkaSecurity:
    """How evp's Kafka clients authenticate and encrypt: one value for every client.

    The SASL password is never held here: only the path of a 0600 file, read by
    :meth:`sasl_password` when a client is built, so no repr, argv or environment shows it.
    """

    protocol: str = "PLAINTEXT"  #: EVP_KAFKA_SECURITY_PROTOCOL
    sasl_mechanism: str = "SCRAM-SHA-512"  #: EVP_KAFKA_SASL_MECHANISM
    sasl_username: str | None = None  #: EVP_KAFKA_SASL_USERNAME
    sasl_password_file: Path | None = None  #: EVP_KAFKA_SASL_PASSWORD_FILE
    ssl_cafile: Path | None = None  #: EVP_KAFKA_SSL_CAFILE (else the system's CAs)
    ssl_certfile: Path | None = None  #: EVP_KAFKA_SSL_CERTFILE (a client certificate, for mTLS)
    ssl_keyfile: Path | None = None  #: EVP_KAFKA_SSL_KEYFILE

    def __post_init__(self) -> None:
        if self.protocol not in KAFKA_SECURITY_PROTOCOLS:
            raise ConfigurationError(
                f"EVP_KAFKA_SECURITY_PROTOCOL {self.protocol!r} is not one of {', '.join(KAFKA_SECURITY_PROTOCOLS)}"
            )
        if self.sasl_mechanism not in KAFKA_SASL_MECHANISMS:
            raise ConfigurationError(
                f"EVP_KAFKA_SASL_MECHANISM {self.sasl_mechanism!r} is not one of {', '.join(KAFKA_SASL_MECHANISMS)}"
            )
        if self.uses_sasl:
            if not self.sasl_username:
                raise ConfigurationError(f"EVP_KAFKA_SECURITY_PROTOCOL={self.protocol} needs EVP_KAFKA_SASL_USERNAME")
            if self.sasl_password_file is None:
                raise ConfigurationError(
                    f"EVP_KAFKA_SECURITY_PROTOCOL={self.protocol} needs EVP_KAFKA_SASL_PASSWORD_FILE (a 0600 file)"
                )
        elif self.sasl_username or self.sasl_password_file is not None:
            raise ConfigurationError(
                f"EVP_KAFKA_SASL_USERNAME/EVP_KAFKA_SASL_PASSWORD_FILE are set but EVP_KAFKA_SECURITY_PROTOCOL="
                f"{self.protocol} does not use SASL (SASL_SSL or SASL_PLAINTEXT do)"
            )
        if not self.uses_ssl and any(p is not None for p in (self.ssl_cafile, self.ssl_certfile, self.ssl_keyfile)):
            raise ConfigurationError(
                f"EVP_KAFKA_SSL_* files are set but EVP_KAFKA_SECURITY_PROTOCOL={self.protocol} does not use TLS "
                "(SSL or SASL_SSL do)"
            )
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise ConfigurationError("EVP_KAFKA_SSL_KEYFILE is set without EVP_KAFKA_SSL_CERTFILE")

    @property
    def uses_sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    @property
    def uses_ssl(self) -> bool:
        return self.protocol.endswith("SSL")

    def describe(self) -> str:
        """``SASL_SSL (SCRAM-SHA-512 as evp)``: for messages, never a secret."""
        if self.uses_sasl:
            return f"{self.protocol} ({self.sasl_mechanism} as {self.sasl_username})"
        return self.protocol

    def sasl_password(self) -> str:
        """The password from EVP_KAFKA_SASL_PASSWORD_FILE, refused unless only its owner can read it."""
        path = self.sasl_password_file
        if path is None:
            raise ConfigurationError(f"EVP_KAFKA_SECURITY_PROTOCOL={self.protocol} has no EVP_KAFKA_SASL_PASSWORD_FILE")
        try:
            mode = path.stat().st_mode & 0o777
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigurationError(f"EVP_KAFKA_SASL_PASSWORD_FILE {path} cannot be read: {err.strerror}") from err
        if mode & 0o077:
            raise ConfigurationError(
                f"EVP_KAFKA_SASL_PASSWORD_FILE {path} is readable by others (mode {mode:04o}): chmod 600 it"
            )
        password = text.rstrip("\r\n")
        if not password:
            raise ConfigurationError(f"EVP_KAFKA_SASL_PASSWORD_FILE {path} is empty")
        return password

    def to_env(self) -> dict[str, str]:
        env = {"EVP_KAFKA_SECURITY_PROTOCOL": self.protocol, "EVP_KAFKA_SASL_MECHANISM": self.sasl_mechanism}
        for variable, value in (
            ("EVP_KAFKA_SASL_USERNAME", self.sasl_username),
            ("EVP_KAFKA_SASL_PASSWORD_FILE", self.sasl_password_file),
            ("EVP_KAFKA_SSL_CAFILE", self.ssl_cafile),
            ("EVP_KAFKA_SSL_CERTFILE", self.ssl_certfile),
            ("EVP_KAFKA_SSL_KEYFILE", self.ssl_keyfile),
        ):
            if value is not None:
                env[variable] = str(value)
        return env

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> KafkaSecurity:
        if env.get("EVP_KAFKA_SASL_PASSWORD"):
            raise ConfigurationError(
                "EVP_KAFKA_SASL_PASSWORD is not read: put the password in a 0600 file and set "
                "EVP_KAFKA_SASL_PASSWORD_FILE to its path"
            )

        def path(variable: str) -> Path | None:
            value = env.get(variable)
            return Path(value) if value else None

        return cls(
            protocol=(env.get("EVP_KAFKA_SECURITY_PROTOCOL") or "PLAINTEXT").upper(),
            sasl_mechanism=(env.get("EVP_KAFKA_SASL_MECHANISM") or "SCRAM-SHA-512").upper(),
            sasl_username=env.get("EVP_KAFKA_SASL_USERNAME") or None,
            sasl_password_file=path("EVP_KAFKA_SASL_PASSWORD_FILE"),
            ssl_cafile=path("EVP_KAFKA_SSL_CAFILE"),
            ssl_certfile=path("EVP_KAFKA_SSL_CERTFILE"),
            ssl_keyfile=path("EVP_KAFKA_SSL_KEYFILE"),
        )


@dataclass(frozen=True)
class Settings:
    """Where evp's services are and how its topics are named.

    ``topic_prefix`` namespaces every topic evp owns, so that several deployments (or
    test sessions) can share one broker without seeing each other's events.
    """

    kafka: str = DEFAULT_KAFKA
    kafka_security: KafkaSecurity = KafkaSecurity()  #: EVP_KAFKA_SECURITY_PROTOCOL, EVP_KAFKA_SASL_*, EVP_KAFKA_SSL_*
    database_url: str = DEFAULT_DATABASE_URL
    #: EVP_ADMIN_DATABASE_URL: a role that may create databases and roles (``evp projections grant``,
    #: sandboxes, test fixtures); never what evp's processes run as. None: unavailable.
    admin_database_url: str | None = None
    #: EVP_KEYRING_URL: where the keyring's ``evp_keyring`` schema lives; None: ``database_url``.
    keyring_database_url: str | None = None
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
    def keyring_url(self) -> str:
        """The keyring's database: EVP_KEYRING_URL, else the ledger's (its own schema, ``evp_keyring``)."""
        return self.keyring_database_url or self.database_url

    def admin_url(self, purpose: str, dbname: str | None = None) -> str:
        """EVP_ADMIN_DATABASE_URL on the ledger's database (or ``dbname``), for ``purpose``.

        The admin URL names the server and the administrator; what it acts on is the
        database of ``database_url`` (a test's, a sandbox's), so one admin URL serves them all.
        Raises ConfigurationError, saying what ``purpose`` needs, when it is unset.
        """
        if not self.admin_database_url:
            raise ConfigurationError(
                f"{purpose} needs EVP_ADMIN_DATABASE_URL: a role that may create databases and roles and grant on "
                "the ledger's tables (evp's own role may not); locally: eval \"$(python3 platform/services.py env)\""
            )
        return with_database(self.admin_database_url, dbname or database_name(self.database_url))

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
            elif item.name in ("database_url", "admin_database_url", "keyring_database_url") and value is not None:
                shown.append(f"{item.name}={describe_database(value)!r}")
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
            **self.kafka_security.to_env(),
            "EVP_DATABASE_URL": self.database_url,
            **({"EVP_ADMIN_DATABASE_URL": self.admin_database_url} if self.admin_database_url else {}),
            **({"EVP_KEYRING_URL": self.keyring_database_url} if self.keyring_database_url else {}),
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
            kafka_security=KafkaSecurity.from_env(env),
            database_url=env.get("EVP_DATABASE_URL") or DEFAULT_DATABASE_URL,
            admin_database_url=env.get("EVP_ADMIN_DATABASE_URL") or None,
            keyring_database_url=env.get("EVP_KEYRING_URL") or None,
            topic_prefix=env.get("EVP_TOPIC_PREFIX", "evp"),
            partitions=partitions,
            home=Path(env.get("EVP_HOME", ".evp")),
            kek=env.get("EVP_KEK") or None,
            kek_file=Path(kek_file) if kek_file else None,
            actor=env.get("EVP_ACTOR") or env.get("USER") or env.get("LOGNAME") or "evp",
            project=Path(project) if project else None,
        )
