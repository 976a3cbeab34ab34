"""The local broker's configuration: secured listeners only when asked for (no broker runs)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from deploy.kafka.local_broker import (
    BrokerError,
    LocalKafkaBroker,
    SaslUser,
    _scram_arguments,
    _server_properties,
    main,
    make_tls_files,
)


def _props(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines())


def test_default_broker_has_only_the_plaintext_listener(tmp_path: Path) -> None:
    props = _props(_server_properties(tmp_path, 9092, 9093))
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:9092"
    assert props["listener.security.protocol.map"] == "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
    assert not [key for key in props if "sasl" in key or key.startswith(("ssl.", "listener.name"))]
    broker = LocalKafkaBroker(data_dir=tmp_path)
    assert broker.sasl_port is None and broker.tls_ports is None
    with pytest.raises(BrokerError, match="sasl_users"):
        _ = broker.sasl_bootstrap_servers
    with pytest.raises(BrokerError, match="tls=True"):
        _ = broker.tls_files


def test_sasl_listener_enables_the_users_mechanisms(tmp_path: Path) -> None:
    users = [SaslUser("worker", "pw-1"), SaslUser("app", "pw-2", mechanisms=("SCRAM-SHA-512",))]
    props = _props(_server_properties(tmp_path, 9092, 9093, 9094, users))
    assert props["listeners"].endswith(",SASL://127.0.0.1:9094")
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:9092,SASL://127.0.0.1:9094"
    assert "SASL:SASL_PLAINTEXT" in props["listener.security.protocol.map"]
    assert props["inter.broker.listener.name"] == "PLAINTEXT"
    mechanisms = props["listener.name.sasl.sasl.enabled.mechanisms"]
    assert mechanisms == "SCRAM-SHA-512,SCRAM-SHA-256,PLAIN"
    scram = props["listener.name.sasl.scram-sha-256.sasl.jaas.config"]
    assert scram.endswith("ScramLoginModule required;")  # checks stored credentials
    plain = props["listener.name.sasl.plain.sasl.jaas.config"]
    assert 'user_worker="pw-1"' in plain and "user_app" not in plain  # app has no PLAIN

    only = [SaslUser("app", "pw-2", mechanisms=("SCRAM-SHA-256",))]
    props = _props(_server_properties(tmp_path, 9092, 9093, 9094, only))
    assert props["listener.name.sasl.sasl.enabled.mechanisms"] == "SCRAM-SHA-256"
    assert "listener.name.sasl.plain.sasl.jaas.config" not in props


def test_scram_users_are_stored_at_format_time() -> None:
    users = [SaslUser("worker", "pw-1"), SaslUser("app", "pw-2", mechanisms=("PLAIN",))]
    assert _scram_arguments(users) == [
        "--add-scram=SCRAM-SHA-512=[name=worker,password=pw-1]",
        "--add-scram=SCRAM-SHA-256=[name=worker,password=pw-1]",
    ]


@pytest.mark.parametrize("password", ["a,b", "a]b", 'a"b', "a b", "a\\b", "a=b", ""])
def test_credentials_the_broker_cannot_quote_are_refused(password: str) -> None:
    with pytest.raises(ValueError, match="password"):
        SaslUser("worker", password)
    with pytest.raises(ValueError, match="mechanisms"):
        SaslUser("worker", "ok", mechanisms=("GSSAPI",))


def test_user_repr_hides_the_password() -> None:
    assert "hunter2" not in repr(SaslUser("worker", "hunter2"))


def test_cli_refuses_a_user_without_password(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--sasl-user", "worker"])
    assert "NAME:PASSWORD" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_tls_files_chain_to_the_ca(tmp_path: Path) -> None:
    files = make_tls_files(tmp_path / "tls")

    def openssl(*args: str) -> str:
        return subprocess.run(["openssl", *args], capture_output=True, text=True, check=True).stdout

    for cert in (files.broker_keystore, files.client_cert):
        assert ": OK" in openssl("verify", "-CAfile", str(files.ca), str(cert))
    with pytest.raises(subprocess.CalledProcessError):
        openssl("verify", "-CAfile", str(files.other_ca), str(files.client_cert))
    assert "IP Address:127.0.0.1" in openssl("x509", "-in", str(files.broker_keystore), "-text")
    keystore = files.broker_keystore.read_text()
    assert keystore.startswith("-----BEGIN PRIVATE KEY-----") and "CERTIFICATE" in keystore
    assert "ENCRYPTED PRIVATE KEY" in files.client_key.read_text()
    openssl("pkey", "-in", str(files.client_key), "-passin", f"pass:{files.client_key_password}")
    before = files.ca.read_bytes()
    assert make_tls_files(tmp_path / "tls") == files and files.ca.read_bytes() == before
