"""The runner's broker: SASL_SSL by default, its credentials private files, no secret in a process listing."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

RUNNER = Path(__file__).resolve().parents[2] / "platform" / "services.py"


def load_runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("evp_services_runner_kafka", RUNNER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


services = load_runner()


def local_kafka(state: Path | None = None) -> object:
    env = {k: v for k, v in os.environ.items() if k == "EVP_HOME"}
    paths = services.Paths.from_env(env)
    if state is not None:
        paths = services.Paths(repo=paths.repo, state=state, cache=paths.cache)
    return services.Kafka(paths)


def test_env_points_clients_at_the_files_never_at_a_secret(tmp_path: Path) -> None:
    kafka = local_kafka(tmp_path / "state")
    env = kafka.client_env()  # type: ignore[attr-defined]
    assert env == {
        "EVP_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "EVP_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "EVP_KAFKA_SASL_USERNAME": "evp",
        "EVP_KAFKA_SASL_PASSWORD_FILE": str(tmp_path / "state" / "kafka-security" / "evp-password"),
        "EVP_KAFKA_SSL_CAFILE": str(tmp_path / "state" / "kafka-security" / "ca.pem"),
    }


def test_credentials_are_generated_once_private_and_reused(tmp_path: Path) -> None:
    kafka = local_kafka(tmp_path / "state")
    kafka.paths.ensure_state()  # type: ignore[attr-defined]
    java = kafka._java()  # type: ignore[attr-defined]
    kafka._ensure_credentials(java)  # type: ignore[attr-defined]
    folder: Path = kafka.security  # type: ignore[attr-defined]
    assert folder.stat().st_mode & 0o777 == 0o700
    made = {path.name: path.read_bytes() for path in folder.iterdir()}
    assert set(made) == {"ca.p12", "ca.pem", "broker.p12", "keystore-password", "evp-password"}
    assert all(path.stat().st_mode & 0o777 == 0o600 for path in folder.iterdir())
    assert made["ca.pem"].startswith(b"-----BEGIN CERTIFICATE-----")
    kafka._ensure_credentials(java)  # type: ignore[attr-defined]
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == made  # reused, not regenerated
    kafka._render_properties()  # type: ignore[attr-defined]
    props: Path = kafka.props  # type: ignore[attr-defined]
    text = props.read_text()
    assert props.stat().st_mode & 0o777 == 0o600  # it holds the keystore's and the SCRAM user's passwords
    assert "listeners=SASL_SSL://127.0.0.1:19092,PROXIED://127.0.0.1:19094,CONTROLLER://127.0.0.1:19093" in text
    # The listener for toxiproxy speaks SASL_SSL too, and advertises the proxy's port, not its own.
    assert "advertised.listeners=SASL_SSL://127.0.0.1:19092,PROXIED://127.0.0.1:19095" in text
    assert "listener.security.protocol.map=SASL_SSL:SASL_SSL,PROXIED:SASL_SSL,CONTROLLER:PLAINTEXT" in text
    assert "PLAINTEXT://" not in text and "sasl.enabled.mechanisms=SCRAM-SHA-512" in text


def test_format_passes_the_scram_password_in_a_private_file_and_moves_a_plaintext_log_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    kafka = local_kafka(tmp_path / "state")
    security: Path = kafka.security  # type: ignore[attr-defined]
    security.mkdir(parents=True, mode=0o700)
    (security / "evp-password").write_text("pw~scram-marker\n")
    kafka.cluster_id_file.write_text("AAAAAAAAAAAAAAAAAAAAAA\n")  # type: ignore[attr-defined]
    data: Path = kafka.data  # type: ignore[attr-defined]
    data.mkdir()
    (data / "meta.properties").write_text("cluster.id=AAAAAAAAAAAAAAAAAAAAAA\n")  # formatted before SASL_SSL
    calls: list[tuple[list[str], str, int]] = []

    def fake_run(service: str, cmd: list[str], what: str, **kwargs: object) -> str:
        args_file = Path(cmd[-1][1:])
        calls.append((cmd, args_file.read_text(), args_file.stat().st_mode & 0o777))
        return ""

    monkeypatch.setattr(services, "run", fake_run)
    kafka._format_storage("java", tmp_path)  # type: ignore[attr-defined]
    (cmd, arguments, mode), = calls
    assert cmd[-1].startswith("@") and not any("pw~scram-marker" in part for part in cmd)
    assert mode == 0o600 and "--add-scram\nSCRAM-SHA-512=[name=evp,password=pw~scram-marker]\n" in arguments
    assert not Path(cmd[-1][1:]).exists()  # removed once the format ran
    assert not data.exists() and len(list(data.parent.glob("kafka.before-sasl-*"))) == 1
    assert "formatted before the broker required SASL_SSL" in capsys.readouterr().out
    (data).mkdir()
    (data / "meta.properties").write_text("cluster.id=AAAAAAAAAAAAAAAAAAAAAA\n")
    kafka._format_storage("java", tmp_path)  # type: ignore[attr-defined]
    assert len(calls) == 1  # formatted with the SCRAM user: left alone


@pytest.mark.services
def test_no_kafka_secret_shows_in_a_process_listing_or_the_brokers_environment() -> None:
    kafka = local_kafka()
    pid = kafka._pid()  # type: ignore[attr-defined]
    if pid is None:
        pytest.skip("the broker is not run by this runner's state dir")
    folder: Path = kafka.security  # type: ignore[attr-defined]
    secrets = [(folder / name).read_text().strip() for name in ("evp-password", "keystore-password")]
    listing = subprocess.run(["ps", "-eww", "-o", "pid=,args="], capture_output=True, text=True, check=True).stdout
    assert f"kafka.Kafka {kafka.props}" in listing  # type: ignore[attr-defined]
    cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace")
    environ = (Path("/proc") / str(pid) / "environ").read_bytes().decode(errors="replace")
    for secret in secrets:
        assert len(secret) >= 40
        assert secret not in listing and secret not in cmdline and secret not in environ
