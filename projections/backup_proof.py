"""View digests as backup proofs: a restore is equal when its rebuilt views hash like the originals.

Registered as the ``views`` provider of :data:`events.ops.backup_set.PROOFS`. Contract:

1. :meth:`ViewProofs.record` (taking a backup): for each view the project declares, read its
   committed offsets and its digest (:func:`projections.tables.digest`) in one snapshot of
   the database, and record the digest only when the offsets are exactly the backup's ends:
   a view behind or ahead of the cut would prove nothing about the backup. Without a project,
   or for a view whose schema does not exist, nothing is recorded;
2. :meth:`ViewProofs.check` (after a restore): catch each recorded view up from the restored
   topic, in the restored database (a fresh schema: every row is rebuilt from the log), and
   compare its digest with the recorded one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg

from events.adapters import postgres
from events.ops.backup_set import ProofCheck
from events.project import find_project
from events.settings import Settings
from projections import tables
from projections.declarations import catch_up_views, load_view
from projections.runner import stored_offsets


def _exists(conn: psycopg.Connection[Any], schema: str) -> bool:
    row = conn.execute("SELECT 1 FROM pg_tables WHERE schemaname = %s AND tablename = 'evp_offsets'", (schema,)).fetchone()
    return row is not None


class ViewProofs:
    """See the module docstring."""

    def record(self, settings: Settings, ends: Mapping[int, int]) -> Mapping[str, Any]:
        """Step 1: ``{view: {schema, rows, sha256}}`` for the views exactly at ``ends``."""
        project = find_project(settings)
        if project is None:
            return {}
        recorded: dict[str, Any] = {}
        with postgres.connect(settings.database_url) as conn:
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            for name in project.names("views"):
                view = load_view(project, name)
                schema = view.layout().schema
                with conn.transaction():
                    if not _exists(conn, schema):
                        continue
                    with conn.cursor() as cur:
                        offsets = stored_offsets(cur, schema, settings.events_topic)
                    if any(offsets.get(p, 0) != end for p, end in ends.items()):
                        continue
                    digest = tables.digest(conn, view)
                recorded[name] = {"schema": digest.schema, "rows": digest.rows, "sha256": digest.sha256}
        return recorded

    def check(self, settings: Settings, recorded: Mapping[str, Any]) -> list[ProofCheck]:
        """Step 2: each recorded view rebuilt in the restored services, its digest compared."""
        project = find_project(settings)
        if project is None or not recorded:
            return [ProofCheck("views", name, str(body.get("sha256")), "not checked",
                               "no project here to rebuild the view from (set EVP_PROJECT)") for name, body in recorded.items()]
        checks: list[ProofCheck] = []
        names = [n for n in recorded if n in project.names("views")]
        catch_up_views(settings, project, names)
        with postgres.connect(settings.database_url, autocommit=True) as conn:
            for name, body in recorded.items():
                if name not in names:
                    checks.append(ProofCheck("views", name, str(body["sha256"]), "not checked",
                                             f"the project no longer declares view {name!r}"))
                    continue
                digest = tables.digest(conn, load_view(project, name))
                checks.append(ProofCheck("views", name, str(body["sha256"]), digest.sha256,
                                         f"{digest.rows} rows rebuilt in {digest.schema}, {body['rows']} recorded"))
        return checks


views = ViewProofs()
