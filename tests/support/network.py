"""Test-side network guards and TLS material: everything stays on loopback."""

from __future__ import annotations

import ipaddress
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest


def guard_loopback(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Record every socket connect; fail the test on any address that is not loopback."""
    seen: list[tuple[Any, ...]] = []
    real_connect = socket.socket.connect

    def guarded(sock: socket.socket, address: Any) -> None:
        seen.append(tuple(address))
        if not ipaddress.ip_address(address[0]).is_loopback:
            pytest.fail(f"a connection to {address} was attempted")
        real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    return seen


def self_signed_certificate(folder: Path, host: str = "images.test") -> tuple[Path, Path]:
    """(cert, key) of a self-signed certificate for `host`, made with the openssl CLI."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", f"/CN={host}", "-addext", f"subjectAltName=DNS:{host}"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key
