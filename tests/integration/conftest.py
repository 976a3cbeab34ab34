"""Fixtures for tests against the real broker.

Each module that needs the broker marks itself (`pytestmark = pytest.mark.kafka`): a
`pytestmark` here would mark nothing.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.kafka.local_broker import LocalKafkaBroker, SaslUser
from tests.conftest import FER_FACES


@pytest.fixture
def junk_files(tmp_path: Path) -> dict[str, Path]:
    """Files that are not images, and a copy of a face, for hostile events."""
    folder = tmp_path / "junk"
    folder.mkdir()
    garbage = folder / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    text = folder / "notes.jpg"
    text.write_text("hello")
    face = folder / "face.png"
    shutil.copy(next(FER_FACES.joinpath("happy").glob("*.png")), face)
    return {"garbage": garbage, "text": text, "face": face}


# The SASL user of `secure_broker` (SCRAM-SHA-512, SCRAM-SHA-256 and PLAIN).
SASL_USER = "worker"
SASL_PASSWORD = "s3cret-Worker-pw-7f3a"


@pytest.fixture(scope="session")
def secure_broker() -> Iterator[LocalKafkaBroker]:
    """A broker of its own with SASL_PLAINTEXT, TLS and mTLS listeners beside PLAINTEXT.

    Shared by the security tests and `check`'s; tooling uses its PLAINTEXT listener.
    """
    with LocalKafkaBroker(sasl_users=[SaslUser(SASL_USER, SASL_PASSWORD)], tls=True) as broker:
        yield broker
