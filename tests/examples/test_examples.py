"""Both example projects end to end against the real services, then scanned for leaks.

Each demo runs as its own process, exactly as ``make demo`` runs it, in the test's private
database and topics. Afterwards every place evp writes to is searched, byte by byte and in
every encoded form, for the personal data the demo fed in: the Kafka log segments, a dump
of the database (``bytea`` values decoded), the snapshot shards, a backup of the log, the
services' logs and the demo's own output. Each scan also has a control: a non-personal
value that travelled the same path and must be found, so a scan of the wrong bytes fails.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest

from events.adapters.storage import Storage
from events.ops.backup import BackupFile
from events.ops.backup_set import create_backup
from events.settings import Settings
from tests.support.examples import CLINIC, DIGITS
from tests.support.plaintext import (
    assert_no_plaintext, folder_files, kafka_segments, pg_dump_files, service_log_files,
)


@dataclass(frozen=True)
class Example:
    folder: Path
    personal: tuple[str, ...]  #: what the demo fed in as personal data
    wire_control: str  #: non-personal text that travels in the same events (log, ledger, backup)
    shard_control: str  #: a row id, written into every snapshot's shards
    sagas: dict[str, list[str]]  #: the saga ids `evp sagas list --state S` finds after the demo, by state


def _digits() -> Example:
    sys.path.insert(0, str(DIGITS))
    import demo as digits_demo  # noqa: PLC0415 - the example's own module, by path

    sys.path.remove(str(DIGITS))
    sys.modules.pop("demo")
    people = tuple(value for _, name, email in digits_demo.ANNOTATORS for value in (name, email))
    return Example(DIGITS, people, "sklearn.load_digits", "digit-0001",
                   {"compensated": ["saga-release-release-2"], "parked": []})


def _clinic() -> Example:
    sys.path.insert(0, str(CLINIC))
    import demo as clinic_demo  # noqa: PLC0415

    sys.path.remove(str(CLINIC))
    sys.modules.pop("demo")
    rng = np.random.default_rng(11)
    patients = [clinic_demo.patient(i, rng) for i in range(569)]
    values = [str(p[field]) for p in patients[:60] for field in ("name", "mrn")]
    values += [p["birth_date"].isoformat() for p in patients[:20] if isinstance(p["birth_date"], dt.date)]
    values += [value for _, name, licence in clinic_demo.CLINICIANS for value in (name, licence)]
    return Example(CLINIC, tuple(values), "second reading", "scan-0001",
                   {"compensated": [], "parked": ["saga-consent-withdrawal-wd-pt-0043"]})


def run_demo(example: Example, settings: Settings, output: Path) -> str:
    """Run the example's demo in ``settings``' private services; its output is kept for the scan."""
    result = subprocess.run(
        [sys.executable, str(example.folder / "demo.py"), "--no-sandbox", "--epochs", "8"],
        env=settings.to_env(), capture_output=True, text=True, timeout=600,
    )
    output.write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.services
@pytest.mark.parametrize("make", [_digits, _clinic], ids=["digits", "clinic"])
def test_the_example_runs_end_to_end_and_leaks_no_personal_data(
    make: Callable[[], Example], settings: Settings, tmp_path: Path
) -> None:
    example = make()
    output = tmp_path / "demo-output.txt"
    stdout = run_demo(example, settings, output)

    summary = stdout.strip().splitlines()[-1]
    assert "demo finished" in summary and "replay identical" in summary and "log intact" in summary, summary
    assert "backup proved equal" in summary, summary
    accuracy = float(summary.split("accuracy ")[1].split(",")[0])
    assert accuracy >= 0.9
    # The demo's sagas, as an operator finds them afterwards with the command line.
    sagas = {state: saga_ids(settings.with_(project=example.folder), state) for state in ("compensated", "parked")}
    assert sagas == example.sagas, sagas

    backup = tmp_path / "backup"
    backup.mkdir()
    made = create_backup(settings.with_(project=example.folder), backup / "set")
    # The container is deflate-compressed: scan its records' bytes as well as the file.
    with BackupFile(Storage(backup / "set"), made.name) as opened, (backup / "records.bin").open("wb") as out:
        for record in opened.records():
            out.write((record.key or b"") + (record.value or b"") + b"".join(v or b"" for _, v in record.headers))
    dump = pg_dump_files(settings.database_url, tmp_path / "dump")

    needles = example.personal
    assert_no_plaintext(kafka_segments(settings), needles, controls=[example.wire_control])
    assert_no_plaintext(dump, needles, controls=[example.wire_control])
    assert_no_plaintext(folder_files(settings.snapshots_dir), needles, controls=[example.shard_control])
    assert_no_plaintext(folder_files(backup), needles, controls=[example.wire_control])
    assert_no_plaintext([output, *service_log_files()], needles, controls=["demo finished"])
    # Nor a secret: the KEK, the backup key, the database and broker passwords.
    assert_no_plaintext([output, *service_log_files()], secrets_of(settings), controls=["demo finished"])


def saga_ids(settings: Settings, state: str) -> list[str]:
    """``evp sagas list --state STATE --json``, run as an operator would, in ``settings``' services."""
    result = subprocess.run([sys.executable, "-m", "events.cli.main", "sagas", "list", "--state", state, "--json"],
                            env=settings.to_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [row["saga_id"] for row in json.loads(result.stdout)]


def secrets_of(settings: Settings) -> list[str]:
    """Every secret value these settings lead to: what a log, an argv or an output must never show."""
    found = [settings.kek_path.read_text().strip(), (settings.kek_path.parent / "backup.key").read_text().strip()]
    for url in (settings.database_url, settings.admin_database_url or ""):
        passfile = parse_qs(urlsplit(url).query).get("passfile", [""])[0]
        if passfile:
            found += [line.rsplit(":", 1)[1] for line in Path(passfile).read_text().splitlines() if ":" in line]
    if settings.kafka_security.sasl_password_file is not None:
        found.append(settings.kafka_security.sasl_password_file.read_text().strip())
    assert len(found) >= 2 and all(len(secret) >= 16 for secret in found), "the secrets scan must have secrets to find"
    return found
