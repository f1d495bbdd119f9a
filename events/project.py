"""A team's project: its ``evp.toml``, its schemas and the declarations it names.

evp's packages hold no domain. Everything a domain needs lives in the team's own project,
a directory with an ``evp.toml``::

    [project]
    name = "shop"
    schemas = ["schemas"]          # folders of .avsc files, relative to this file
    registration = "explicit"      # or "auto" (the default): register on first use

    [views]
    orders = "shop.views:Orders"

    [datasets]
    baskets = "shop.datasets:Baskets"

    [recipes]
    spend = "shop.recipes:Spend"

    [sagas]
    fulfilment = "shop.sagas:Fulfilment"

    [participants]
    warehouse = "shop.sagas:Warehouse"

Declarations are named ``module:attribute`` and imported with the project's directory on
``sys.path``, so a project needs no installation. Service addresses never live here: they
stay in ``EVP_*`` variables (:class:`events.settings.Settings`).

Finding the project (:func:`find_project`):

1. ``Settings.project`` (``EVP_PROJECT``): an ``evp.toml`` file or the folder holding one;
2. otherwise ``evp.toml`` in the working directory;
3. otherwise there is no project: evp still runs its platform commands (audit, forget,
   backup, relay) on whatever is in the log, reading every event with the schema it was
   written with.
"""

from __future__ import annotations

import importlib
import json
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from events.errors import ConfigurationError, SchemaError
from events.schema.catalog import Catalog
from events.settings import Settings

PROJECT_FILE = "evp.toml"
Registration = Literal["auto", "explicit"]
#: The declaration kinds a project may name, each a table of ``name = "module:attribute"``.
KINDS = ("views", "datasets", "recipes", "sagas", "participants")
_PROJECT_KEYS = {"name", "schemas", "registration"}


@dataclass(frozen=True)
class Project:
    """A parsed ``evp.toml``. Importing what it names happens on demand (:meth:`load`)."""

    root: Path
    name: str
    schema_paths: tuple[Path, ...] = ()
    registration: Registration = "auto"
    declarations: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    @property
    def file(self) -> Path:
        return self.root / PROJECT_FILE

    # -- reading evp.toml ----------------------------------------------------------------
    @classmethod
    def read(cls, path: Path) -> Project:
        """Parse ``path`` (an ``evp.toml`` or its folder); ConfigurationError names the bad key."""
        file = path / PROJECT_FILE if path.is_dir() else path
        if not file.is_file():
            raise ConfigurationError(f"no {PROJECT_FILE} at {file}")
        try:
            body = tomllib.loads(file.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigurationError(f"{file}: not valid TOML: {err}") from err
        root = file.parent.resolve()
        unknown = sorted(set(body) - {"project", *KINDS})
        if unknown:
            raise ConfigurationError(f"{file}: unknown table(s) {unknown}; known: project, {', '.join(KINDS)}")
        head = body.get("project", {})
        if not isinstance(head, dict):
            raise ConfigurationError(f"{file}: [project] must be a table")
        bad = sorted(set(head) - _PROJECT_KEYS)
        if bad:
            raise ConfigurationError(f"{file}: unknown key(s) {bad} in [project]; known: {sorted(_PROJECT_KEYS)}")
        name = head.get("name", root.name)
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"{file}: project.name must be a non-empty string")
        registration = head.get("registration", "auto")
        if registration not in ("auto", "explicit"):
            raise ConfigurationError(f"{file}: project.registration must be 'auto' or 'explicit', got {registration!r}")
        paths = head.get("schemas", ["schemas"])
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise ConfigurationError(f"{file}: project.schemas must be a list of folder names")
        declarations: dict[str, dict[str, str]] = {}
        for kind in KINDS:
            table = body.get(kind, {})
            if not isinstance(table, dict):
                raise ConfigurationError(f"{file}: [{kind}] must be a table of name = \"module:attribute\"")
            for key, spec in table.items():
                _check_spec(file, f"{kind}.{key}", spec)
            declarations[kind] = dict(table)
        return cls(root, name, tuple(root / p for p in paths), registration, declarations)

    # -- schemas -------------------------------------------------------------------------
    def schema_files(self) -> list[Path]:
        """Every ``.avsc`` under the schema paths, sorted; a missing folder is an error."""
        files: list[Path] = []
        for folder in self.schema_paths:
            if not folder.is_dir():
                raise ConfigurationError(f"{self.file}: schema folder {folder} does not exist")
            files.extend(sorted(folder.rglob("*.avsc")))
        return files

    def schemas(self) -> list[dict[str, Any]]:
        """The project's schemas as parsed JSON (validated by :class:`events.schema.catalog.Catalog`)."""
        return [read_schema_file(path) for path in self.schema_files()]

    def catalog(self) -> Catalog:
        """The platform's event types plus the project's (a name defined twice is refused)."""
        return Catalog.with_platform(self.schemas())

    # -- declarations --------------------------------------------------------------------
    def names(self, kind: str) -> tuple[str, ...]:
        return tuple(sorted(self.declarations.get(kind, {})))

    def load(self, kind: str, name: str) -> Any:
        """The object ``kind.name`` names; ``name`` may also be a ``module:attribute`` spec itself.

        Raises ConfigurationError naming the declaration and what failed (unknown name, a
        module that does not import, a missing attribute).
        """
        table = self.declarations.get(kind, {})
        if name in table:
            spec = table[name]
        elif ":" in name:
            spec = name
        else:
            known = ", ".join(sorted(table)) or "none"
            raise ConfigurationError(f"{self.file}: no {kind[:-1]} named {name!r} (declared: {known})")
        return import_spec(spec, self.root, where=f"{kind}.{name}")


def catalog_for(settings: Settings) -> Catalog:
    """The platform's event types plus the project's, when there is a project."""
    project = find_project(settings)
    return Catalog.platform() if project is None else project.catalog()


def find_project(settings: Settings) -> Project | None:
    """The project for these settings, or None (see the module docstring for the order)."""
    if settings.project is not None:
        return Project.read(settings.project)
    here = Path.cwd() / PROJECT_FILE
    return Project.read(here) if here.is_file() else None


def require_project(settings: Settings, doing: str) -> Project:
    """The project, or a ConfigurationError saying that ``doing`` needs one."""
    project = find_project(settings)
    if project is None:
        raise ConfigurationError(
            f"{doing} needs a project: run it in a folder with an {PROJECT_FILE}, or set EVP_PROJECT to one"
        )
    return project


def import_spec(spec: str, root: Path | None = None, *, where: str = "") -> Any:
    """Import ``module:attribute`` (with ``root`` first on ``sys.path``)."""
    module_name, _, attribute = spec.partition(":")
    label = f"{where} = {spec!r}" if where else repr(spec)
    if root is not None and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigurationError(f"{label}: module {module_name!r} does not import: {err}") from err
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigurationError(f"{label}: module {module_name!r} has no attribute {attribute!r}") from None
    return target


def read_schema_file(path: Path) -> dict[str, Any]:
    """One ``.avsc`` file: valid JSON, and an Avro record named like the file."""
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SchemaError(f"schema file {path} is not valid JSON: {err}") from err
    if not isinstance(schema, dict):
        raise SchemaError(f"schema file {path} must hold one Avro record schema")
    expected = path.name.removesuffix(".avsc")
    if schema.get("name") != expected:
        raise SchemaError(f"schema file {path} defines {schema.get('name')!r}, expected {expected!r} (the file's name)")
    return schema


def _check_spec(file: Path, key: str, spec: object) -> None:
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ConfigurationError(f"{file}: {key} must be \"module:attribute\", got {spec!r}")
