"""``evp check`` and ``evp schemas register|list``: a project's schemas against the registry."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from events.cli.common import print_json, print_table
from events.project import KINDS, Project, require_project
from events.schema.check import check_schemas, register_schemas
from events.schema.registry import KafkaSchemaLog, SchemaRegistry
from events.settings import Settings


def _with_registry(settings: Settings, use: Callable[[SchemaRegistry], int]) -> int:
    log = KafkaSchemaLog(settings)
    try:
        return use(SchemaRegistry(log))
    finally:
        log.close()


def _import_declarations(project: Project) -> list[dict[str, str]]:
    """Import every declaration; ConfigurationError names the first that fails."""
    found = []
    for kind in KINDS:
        for name in project.names(kind):
            target: Any = project.load(kind, name)
            found.append({"kind": kind[:-1], "name": name, "object": f"{target.__module__}.{target.__qualname__}"})
    return found


def _check(args: argparse.Namespace, settings: Settings) -> int:
    """1. read evp.toml, 2. validate every schema, 3. import every declaration, 4. compare with the registry."""
    project = require_project(settings, "evp check")
    catalog = project.catalog()
    declarations = _import_declarations(project)

    def run(registry: SchemaRegistry) -> int:
        report = check_schemas(catalog, registry, settings.events_topic)
        if args.json:
            print_json({"project": project.name, "ok": report.ok, "declarations": declarations,
                        "schemas": [s.__dict__ for s in report.schemas]})
            return 0 if report.ok else 1
        print(f"project {project.name} ({project.file}): {len(catalog.names())} event types, "
              f"{len(declarations)} declarations imported")
        print_table([{"event_type": s.event_type, "state": s.state, "registered": s.registered_versions,
                      "problems": len(s.problems)} for s in report.schemas],
                    ("event_type", "state", "registered", "problems"))
        for problem in report.problems:
            print(f"incompatible: {problem}")
        print("check passed: nothing was changed" if report.ok else f"check FAILED: {len(report.problems)} problem(s)")
        return 0 if report.ok else 1

    return _with_registry(settings, run)


def _register(args: argparse.Namespace, settings: Settings) -> int:
    project = require_project(settings, "evp schemas register")
    catalog = project.catalog()

    def run(registry: SchemaRegistry) -> int:
        ids = register_schemas(catalog, registry, settings.events_topic)
        if args.json:
            print_json(ids)
        else:
            print_table([{"event_type": name, "schema_id": i} for name, i in sorted(ids.items())],
                        ("event_type", "schema_id"))
            print(f"registered {len(ids)} event types of project {project.name} on {settings.schemas_topic}")
        return 0

    return _with_registry(settings, run)


def _list(args: argparse.Namespace, settings: Settings) -> int:
    project = require_project(settings, "evp schemas list")
    catalog = project.catalog()
    rows = [{"event_type": name, "personal": ",".join(f.name for f in catalog.policy(name).personal),
             "unique": ",".join(u.name for u in catalog.policy(name).unique)} for name in catalog.names()]
    if args.json:
        print_json(rows)
    else:
        print_table(rows, ("event_type", "personal", "unique"))
    return 0


def register_check(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "check", help="validate the project's schemas and declarations against the registry; changes nothing")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=_check)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("schemas", help="register or list the project's event schemas")
    group = parser.add_subparsers(dest="schemas_command", metavar="ACTION", required=True)
    for name, help_text, func in (("register", "register every event type's schema (for CI)", _register),
                                  ("list", "the event types with their personal and unique fields", _list)):
        sub = group.add_parser(name, help=help_text)
        sub.add_argument("--json", action="store_true")
        sub.set_defaults(func=func)
