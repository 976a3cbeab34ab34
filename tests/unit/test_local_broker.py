"""The local broker's configuration: secured listeners only when asked for (no broker runs)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

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


def test_tls_files_chain_to_the_ca(tmp_path: Path) -> None:
    files = make_tls_files(tmp_path / "tls")
    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    other_ca = x509.load_pem_x509_certificate(files.other_ca.read_bytes())
    broker = x509.load_pem_x509_certificate(files.broker_keystore.read_bytes())  # skips the key
    client = x509.load_pem_x509_certificate(files.client_cert.read_bytes())
    for cert in (broker, client):
        cert.verify_directly_issued_by(ca)  # the name matches and ca's key made the signature
        with pytest.raises(ValueError, match="issuer"):
            cert.verify_directly_issued_by(other_ca)
        # Not just another name: other-ca's key did not make the signature either.
        other_key = other_ca.public_key()
        assert isinstance(other_key, ec.EllipticCurvePublicKey) and cert.signature_hash_algorithm
        with pytest.raises(InvalidSignature):
            other_key.verify(
                cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
            )
    for authority in (ca, other_ca):
        assert authority.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    for cert, usage in (
        (broker, ExtendedKeyUsageOID.SERVER_AUTH),
        (client, ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [usage]

    keystore = files.broker_keystore.read_bytes()
    assert keystore.startswith(b"-----BEGIN PRIVATE KEY-----") and b"CERTIFICATE" in keystore
    broker_key = serialization.load_pem_private_key(keystore, password=None)
    assert broker_key.public_key() == broker.public_key()
    client_pem = files.client_key.read_bytes()
    assert client_pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    with pytest.raises(TypeError, match="encrypted"):
        serialization.load_pem_private_key(client_pem, password=None)
    with pytest.raises(ValueError):
        serialization.load_pem_private_key(client_pem, password=b"wrong")
    password = files.client_key_password.encode()
    client_key = serialization.load_pem_private_key(client_pem, password=password)
    assert client_key.public_key() == client.public_key()

    before = files.ca.read_bytes()
    assert make_tls_files(tmp_path / "tls") == files and files.ca.read_bytes() == before
