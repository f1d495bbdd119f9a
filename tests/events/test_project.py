"""A team's project: evp.toml, its schemas, `evp check`, `evp schemas register`, explicit registration."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from events.errors import ConfigurationError, SchemaError
from events.event import Event
from events.project import Project, find_project, import_spec
from events.schema.catalog import Catalog
from events.settings import Settings
from events.store.client import EventStore

ORDER = {
    "type": "record", "name": "OrderPlaced", "namespace": "shop", "evp.subject": "customer_id",
    "fields": [
        {"name": "order_id", "type": "string"},
        {"name": "customer_id", "type": "string"},
        {"name": "email", "type": "string", "confluent:tags": ["PII"], "evp.unique": "customer-email"},
        {"name": "total", "type": "double"},
    ],
}


def write_project(root: Path, *, registration: str = "auto", schema: dict[str, object] | None = None) -> Path:
    """A minimal project of a domain evp has never seen, with one importable view class."""
    (root / "schemas").mkdir(parents=True, exist_ok=True)
    (root / "schemas" / "OrderPlaced.avsc").write_text(json.dumps(schema or ORDER))
    (root / "shop_views.py").write_text("class Orders:\n    name = 'orders'\n")
    (root / "evp.toml").write_text(textwrap.dedent(f"""\
        [project]
        name = "shop"
        schemas = ["schemas"]
        registration = "{registration}"

        [views]
        orders = "shop_views:Orders"
        """))
    return root


def evp(settings: Settings, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**settings.to_env(), "PATH": "/usr/bin:/bin"}
    env.pop("EVP_PROJECT", None)  # found in the working directory
    return subprocess.run([sys.executable, "-m", "events.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


# -- reading evp.toml -------------------------------------------------------------------------
def test_a_project_is_read_with_its_schemas_and_declarations(tmp_path: Path) -> None:
    project = Project.read(write_project(tmp_path))
    assert project.name == "shop" and project.registration == "auto"
    assert [s["name"] for s in project.schemas()] == ["OrderPlaced"]
    assert project.load("views", "orders").name == "orders"
    assert project.load("views", "shop_views:Orders").name == "orders"  # a spec works as a name too
    catalog = Catalog.with_platform(project.schemas())
    assert "shop.OrderPlaced" in catalog.names() and "evp.platform.SubjectForgotten" in catalog.names()


@pytest.mark.parametrize(("toml", "named"), [
    ('[project]\nregistration = "sometimes"\n', "registration"),
    ('[project]\ncolour = "blue"\n', "colour"),
    ('[views]\norders = "no_colon"\n', "views.orders"),
    ('[widgets]\nx = "a:b"\n', "widgets"),
    ("[project\n", "not valid TOML"),
])
def test_a_bad_project_file_is_refused_naming_the_key(tmp_path: Path, toml: str, named: str) -> None:
    (tmp_path / "evp.toml").write_text(toml)
    with pytest.raises(ConfigurationError, match=named):
        Project.read(tmp_path)


def test_declarations_that_do_not_import_are_named(tmp_path: Path) -> None:
    project = Project.read(write_project(tmp_path))
    with pytest.raises(ConfigurationError, match="no view named 'invoices'.*orders"):
        project.load("views", "invoices")
    with pytest.raises(ConfigurationError, match="has no attribute 'Missing'"):
        import_spec("shop_views:Missing", tmp_path)
    with pytest.raises(ConfigurationError, match="does not import"):
        import_spec("no_such_module_anywhere:X", tmp_path)


def test_a_schema_file_must_define_the_record_it_is_named_after(tmp_path: Path) -> None:
    write_project(tmp_path)
    (tmp_path / "schemas" / "Refund.avsc").write_text(json.dumps(ORDER))
    with pytest.raises(SchemaError, match="Refund.avsc defines 'OrderPlaced'"):
        Project.read(tmp_path).schemas()


def test_the_project_comes_from_evp_project_or_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_project(tmp_path / "shop")
    assert find_project(Settings(project=tmp_path / "shop")).name == "shop"  # type: ignore[union-attr]
    assert find_project(Settings(project=tmp_path / "shop" / "evp.toml")).name == "shop"  # type: ignore[union-attr]
    monkeypatch.chdir(tmp_path)
    assert find_project(Settings()) is None
    monkeypatch.chdir(tmp_path / "shop")
    assert find_project(Settings()).name == "shop"  # type: ignore[union-attr]


# -- against the services ---------------------------------------------------------------------
def test_check_passes_then_names_an_incompatible_change_and_changes_nothing(settings: Settings, tmp_path: Path) -> None:
    root = write_project(tmp_path / "shop")
    assert evp(settings, "schemas", "register", cwd=root).returncode == 0
    ok = evp(settings, "check", "--json", cwd=root)
    assert ok.returncode == 0, ok.stderr
    states = {s["event_type"]: s["state"] for s in json.loads(ok.stdout)["schemas"]}
    assert states["shop.OrderPlaced"] == "unchanged"
    # A new required field without a default cannot read the old events.
    changed = {**ORDER, "fields": [*ORDER["fields"], {"name": "currency", "type": "string"}]}  # type: ignore[list-item]
    write_project(root, schema=changed)
    bad = evp(settings, "check", cwd=root)
    assert bad.returncode == 1
    assert "currency" in bad.stdout and "version 1" in bad.stdout
    with EventStore.open(settings, Catalog.platform()) as store:  # check wrote nothing to the registry
        assert len(store.codec.registry.versions(f"{settings.events_topic}-shop.OrderPlaced")) == 1


def test_explicit_registration_refuses_an_unregistered_schema_and_says_what_to_run(settings: Settings, tmp_path: Path) -> None:
    root = write_project(tmp_path / "shop", registration="explicit")
    shop = settings.with_(project=root)
    order = Event("OrderPlaced", {"order_id": "o-1", "customer_id": "c-1", "email": "c@example.org", "total": 9.5})
    with EventStore.open(shop) as store, pytest.raises(SchemaError, match="evp schemas register"):
        store.append("order-o-1", order)
    assert evp(shop, "schemas", "register", cwd=root).returncode == 0
    with EventStore.open(shop) as store:
        assert store.append("order-o-1", order).last_version == 1
        assert store.read_stream("order-o-1")[0].data["email"] == "c@example.org"


def test_without_a_project_platform_commands_still_read_the_log(settings: Settings, tmp_path: Path) -> None:
    root = write_project(tmp_path / "shop")
    shop = settings.with_(project=root)
    with EventStore.open(shop) as store:
        store.append("order-o-1", Event("OrderPlaced", {"order_id": "o-1", "customer_id": "c-1",
                                                        "email": "c@example.org", "total": 1.0}))
        store.flush()
    bare = tmp_path / "elsewhere"
    bare.mkdir()
    shown = evp(settings.with_(project=None), "audit", "stream", "order-o-1", "--json", "--decrypt", cwd=bare)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)[0]["data"]["email"] == "c@example.org"  # the policy came from the registry
    assert evp(settings.with_(project=None), "check", cwd=bare).returncode == 1  # check needs a project
