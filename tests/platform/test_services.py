"""The local service runner reports clearly: which service, where, and why."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

RUNNER = Path(__file__).resolve().parents[2] / "platform" / "services.py"


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("EVP_KAFKA", "EVP_DATABASE_URL")}
    return subprocess.run([sys.executable, str(RUNNER), *args], capture_output=True, text=True,
                          env={**clean, **env}, timeout=120)


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.services
def test_status_names_both_running_services_and_their_logs() -> None:
    result = run("status")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("kafka") and "running" in line and "19092" in line for line in lines)
    assert any(line.startswith("postgres") and "running" in line and "15432" in line for line in lines)
    assert all("log " in line for line in lines)


@pytest.mark.services
def test_up_is_idempotent_when_everything_runs() -> None:
    result = run("up")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "already running" in result.stdout


def test_an_unreachable_external_kafka_is_named_and_nothing_is_started() -> None:
    port = closed_port()
    result = run("up", "kafka", EVP_KAFKA=f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert f"kafka: error: EVP_KAFKA=127.0.0.1:{port} does not accept connections" in result.stderr


def test_status_of_an_unreachable_external_database_exits_non_zero() -> None:
    port = closed_port()
    result = run("status", "postgres", EVP_DATABASE_URL=f"postgresql://evp@127.0.0.1:{port}/evp")
    assert result.returncode == 3
    assert f"unreachable external at 127.0.0.1:{port} (EVP_DATABASE_URL)" in result.stdout


def test_a_malformed_database_url_is_refused_by_name() -> None:
    result = run("status", "postgres", EVP_DATABASE_URL="mysql://somewhere/db")
    assert result.returncode != 0
    assert "EVP_DATABASE_URL must start with postgresql://" in result.stdout + result.stderr


def test_an_unknown_service_is_refused() -> None:
    result = run("up", "zookeeper")
    assert result.returncode == 2 and "invalid choice: 'zookeeper'" in result.stderr
