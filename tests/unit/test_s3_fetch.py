"""s3:// fetching against a real moto server, and a scripted endpoint for what moto won't do.

moto answers like S3 (NoSuchKey, NoSuchBucket, and with require_auth() the credential
errors); the scripted endpoint sends what a flaky or odd server sends: a chunked body
without Content-Length, 503 SlowDown, a truncated body, a stall. Every socket connect in
this process is checked: nothing but 127.0.0.1 is ever reached.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import SecretStr, ValidationError

from consumer.config import ConfigError, FetchSettings, S3Settings, load_settings
from consumer.errors import EventError
from consumer.fetch.references import fetch_with_retries
from consumer.fetch.s3 import clear_clients, fetch_s3, parse_s3_uri, s3_client
from schemas import FrameEvent
from tests.support.network import guard_loopback
from tests.support.s3_server import DUMMY_KEY_ID, DUMMY_SECRET, S3Server, free_port

BUCKET = "frames"
# More than one read chunk (64 KiB), random so that any reordering or loss shows.
PAYLOAD = random.Random(7).randbytes(200_000)
SMALL = b"\x89PNG" + bytes(range(256)) * 20  # 5124 bytes
_READ_CHUNK = 64 * 1024
TRICKLE = random.Random(8).randbytes(5 * _READ_CHUNK)  # five read-sized pieces
ODD_KEY = "dir/odd name%41+&=é.png"  # spaces, a percent escape, non-ASCII: all literal


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with S3Server(log_path=log) as server:
        server.create_bucket(BUCKET)
        server.put(BUCKET, "faces/payload.bin", PAYLOAD)
        server.put(BUCKET, "small.png", SMALL)
        server.put(BUCKET, ODD_KEY, SMALL[::-1])
        yield server


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Fails the test on any connect to an address other than loopback (e.g. IMDS)."""
    return guard_loopback(monkeypatch)


@pytest.fixture
def fresh_clients() -> Iterator[None]:
    """No cached clients before or after: default-chain credentials are read at creation."""
    clear_clients()
    yield
    clear_clients()


def settings_for(endpoint: str, **fetch: Any) -> FetchSettings:
    """Fetch settings for `endpoint`, path-style, with moto's dummy keys unless given."""
    s3: dict[str, Any] = {
        "endpoint_url": endpoint,
        "addressing_style": "path",
        "access_key_id": SecretStr(DUMMY_KEY_ID),
        "secret_access_key": SecretStr(DUMMY_SECRET),
        **fetch.pop("s3", {}),
    }
    return FetchSettings(s3=S3Settings(**s3), **fetch)


def failure(uri: str, settings: FetchSettings) -> EventError:
    with pytest.raises(EventError) as info:
        fetch_s3(uri, settings)
    return info.value


# --- moto: the happy path, addressing and the client -------------------------------------


def test_object_is_fetched_byte_identical(s3: S3Server) -> None:
    assert fetch_s3(f"s3://{BUCKET}/faces/payload.bin", settings_for(s3.endpoint_url)) == PAYLOAD


def test_key_is_the_rest_of_the_uri_taken_literally(s3: S3Server) -> None:
    assert parse_s3_uri(f"s3://{BUCKET}/{ODD_KEY}") == (BUCKET, ODD_KEY)
    data = fetch_s3(f"s3://{BUCKET}/{ODD_KEY}", settings_for(s3.endpoint_url))
    assert data == SMALL[::-1]


@pytest.mark.parametrize("uri", ["s3://", "s3://frames", "s3://frames/", "s3:///key", "x://a/b"])
def test_uri_without_bucket_and_key_is_an_invalid_event(uri: str) -> None:
    with pytest.raises(EventError) as info:
        parse_s3_uri(uri)
    assert info.value.kind == "invalid_event" and not info.value.retriable
    assert "s3://bucket/key" in info.value.message


@pytest.mark.parametrize("style", ["path", "auto"])
def test_addressing_styles_with_explicit_credentials(s3: S3Server, style: str) -> None:
    settings = settings_for(s3.endpoint_url, s3={"addressing_style": style, "region": "eu-west-1"})
    assert fetch_s3(f"s3://{BUCKET}/small.png", settings) == SMALL


def test_object_of_exactly_max_bytes_is_fetched(s3: S3Server) -> None:
    settings = settings_for(s3.endpoint_url, max_bytes=len(SMALL))
    assert fetch_s3(f"s3://{BUCKET}/small.png", settings) == SMALL


@pytest.mark.usefixtures("fresh_clients")
def test_client_is_cached_per_configuration(s3: S3Server) -> None:
    settings = settings_for(s3.endpoint_url, threads=5, timeout_s=2.0, read_timeout_s=7.0)
    client = s3_client(settings)
    assert s3_client(settings) is client
    # An equal but separately built configuration gets the same client.
    same = settings_for(s3.endpoint_url, threads=5, timeout_s=2.0, read_timeout_s=7.0)
    assert same is not settings and s3_client(same) is client
    assert s3_client(settings_for(s3.endpoint_url, threads=6)) is not client
    other_keys = settings_for(s3.endpoint_url, threads=5, timeout_s=2.0, read_timeout_s=7.0)
    other_keys = other_keys.model_copy(
        update={"s3": other_keys.s3.model_copy(update={"secret_access_key": SecretStr("x")})}
    )
    assert s3_client(other_keys) is not client

    config = client.meta.config
    assert config.max_pool_connections == 5  # one connection per fetch thread
    assert config.connect_timeout == 2.0  # min(connect_timeout_s=3, timeout_s=2)
    assert config.read_timeout == 2.0  # min(read_timeout_s=7, timeout_s=2)
    assert config.retries == {"total_max_attempts": 1, "mode": "standard"}  # one attempt
    assert config.s3 == {"addressing_style": "path"}
    assert config.signature_version == "s3v4"
    assert client.meta.endpoint_url == s3.endpoint_url


@pytest.mark.usefixtures("fresh_clients")
def test_concurrent_first_use_builds_one_client(s3: S3Server) -> None:
    settings = settings_for(s3.endpoint_url)
    start = threading.Barrier(8)
    clients: list[Any] = []

    def grab() -> None:
        start.wait()
        clients.append(s3_client(settings))

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(clients) == 8 and all(c is clients[0] for c in clients)


def test_many_threads_share_the_client(s3: S3Server) -> None:
    settings = settings_for(s3.endpoint_url, threads=4)
    results: list[bytes] = []
    lock = threading.Lock()

    def fetch() -> None:
        data = fetch_s3(f"s3://{BUCKET}/faces/payload.bin", settings)
        with lock:
            results.append(data)

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [PAYLOAD] * 8


def test_fetch_with_retries_reads_s3(s3: S3Server) -> None:
    data, attempts = fetch_with_retries(f"s3://{BUCKET}/small.png", settings_for(s3.endpoint_url))
    assert (data, attempts) == (SMALL, 1)


# --- moto: not found and too large --------------------------------------------------------


def test_missing_key_is_not_found_and_not_retried(s3: S3Server) -> None:
    uri = f"s3://{BUCKET}/faces/nobody.png"
    settings = settings_for(s3.endpoint_url, retries=3, retry_backoff_s=0)
    with pytest.raises(EventError) as info:
        fetch_with_retries(uri, settings)
    error = info.value
    assert error.kind == "image_not_found" and not error.retriable
    assert error.attempts == 1
    assert uri in error.message and "NoSuchKey" in error.message


def test_missing_bucket_is_not_found(s3: S3Server) -> None:
    uri = "s3://no-such-bucket/faces/a.png"
    error = failure(uri, settings_for(s3.endpoint_url))
    assert error.kind == "image_not_found" and not error.retriable
    assert uri in error.message and "NoSuchBucket" in error.message


def test_object_over_max_bytes_is_refused_by_its_content_length(s3: S3Server) -> None:
    uri = f"s3://{BUCKET}/small.png"
    error = failure(uri, settings_for(s3.endpoint_url, max_bytes=len(SMALL) - 1))
    assert error.kind == "image_too_large" and not error.retriable
    assert uri in error.message
    assert f"is {len(SMALL)} bytes" in error.message  # known from the header, not by reading


# --- moto with IAM checks: credential problems name the setting to fix ---------------------


def test_credentials_the_server_accepts_work_when_checked(s3: S3Server) -> None:
    key_id, secret = s3.create_user("reader", may_read=BUCKET)
    settings = settings_for(
        s3.endpoint_url,
        s3={"access_key_id": SecretStr(key_id), "secret_access_key": SecretStr(secret)},
    )
    with s3.require_auth():
        assert fetch_s3(f"s3://{BUCKET}/small.png", settings) == SMALL


@pytest.mark.parametrize(
    ("which", "code", "fix"),
    [
        ("unknown key", "InvalidAccessKeyId", "fetch.s3.access_key_id"),
        ("wrong secret", "SignatureDoesNotMatch", "fetch.s3.secret_access_key"),
        ("no permission", "AccessDenied", "s3:GetObject"),
    ],
)
def test_rejected_credentials_are_permanent_and_say_what_to_fix(
    s3: S3Server, which: str, code: str, fix: str
) -> None:
    key_id, secret = s3.create_user(f"user-{code.lower()}", may_read=None)
    if which == "unknown key":
        key_id = "AKIAUNKNOWNKEY000000"
    elif which == "wrong secret":
        secret = "not-" + secret
    settings = settings_for(
        s3.endpoint_url,
        s3={"access_key_id": SecretStr(key_id), "secret_access_key": SecretStr(secret)},
    )
    uri = f"s3://{BUCKET}/small.png"
    with s3.require_auth():
        error = failure(uri, settings)
    assert error.kind == "image_fetch_failed" and not error.retriable
    assert uri in error.message and code in error.message and fix in error.message
    assert secret not in error.message


@pytest.fixture
def no_aws_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_clients: None) -> None:
    """No credentials anywhere boto3 looks, and no instance-metadata lookups."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    empty = tmp_path / "empty"
    empty.write_text("")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("BOTO_CONFIG", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("HOME", str(tmp_path))


@pytest.mark.usefixtures("no_aws_config")
def test_no_credentials_anywhere_is_permanent_and_says_what_to_set(
    s3: S3Server, loopback_only: list[tuple[Any, ...]]
) -> None:
    settings = settings_for(s3.endpoint_url, s3={"access_key_id": None, "secret_access_key": None})
    uri = f"s3://{BUCKET}/small.png"
    error = failure(uri, settings)
    assert error.kind == "image_fetch_failed" and not error.retriable
    assert uri in error.message
    assert "fetch.s3.access_key_id" in error.message and "AWS_ACCESS_KEY_ID" in error.message
    assert loopback_only == []  # refused before any request was sent


@pytest.mark.usefixtures("no_aws_config")
def test_default_chain_reads_the_environment(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    key_id, secret = s3.create_user("env-reader", may_read=BUCKET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    settings = settings_for(s3.endpoint_url, s3={"access_key_id": None, "secret_access_key": None})
    with s3.require_auth():
        assert fetch_s3(f"s3://{BUCKET}/small.png", settings) == SMALL


# --- network failures ----------------------------------------------------------------------


def test_endpoint_down_is_retriable(loopback_only: list[tuple[Any, ...]]) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    uri = f"s3://{BUCKET}/small.png"
    settings = settings_for(endpoint, retries=1, retry_backoff_s=0)
    with pytest.raises(EventError) as info:
        fetch_with_retries(uri, settings)
    error = info.value
    assert error.kind == "image_fetch_failed" and error.retriable
    assert error.attempts == 2  # the worker retried; botocore itself tried once per attempt
    assert uri in error.message and endpoint in error.message
    assert len(loopback_only) == 2  # one connect per attempt: botocore does not retry


class _Scripted(BaseHTTPRequestHandler):
    """An S3-like endpoint: GET /<bucket>/<behaviour> answers as the behaviour says."""

    protocol_version = "HTTP/1.1"
    paths: ClassVar[list[str]] = []
    release = threading.Event()  # ends any stall when the server stops

    def do_GET(self) -> None:
        self.paths.append(self.path)
        behaviour = self.path.rsplit("/", 1)[1]
        if behaviour.startswith("chunked-"):
            self._chunked(PAYLOAD[: int(behaviour.split("-")[1])])
        elif behaviour == "slowdown":
            self._error(503, "SlowDown", "Please reduce your request rate.")
        elif behaviour == "internal":
            self._error(500, "InternalError", "We encountered an internal error.")
        elif behaviour == "archived":
            self._error(403, "InvalidObjectState", "The operation is not valid for the class.")
        elif behaviour == "truncated":
            self._head(len(SMALL))
            self.wfile.write(SMALL[:1000])
            self.close_connection = True
        elif behaviour == "trickle-then-stall":
            # Steady progress (each gap well under any read timeout), then silence.
            self._head(len(TRICKLE) * 2)
            for start in range(0, len(TRICKLE), _READ_CHUNK):
                self.wfile.write(TRICKLE[start : start + _READ_CHUNK])
                self.wfile.flush()
                if self.release.wait(0.3):
                    break
            self.release.wait(10)
            self.close_connection = True
        else:
            self._error(404, "NoSuchKey", "The specified key does not exist.")

    def _head(self, length: int | None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if length is None:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(length))
        self.end_headers()

    def _chunked(self, data: bytes) -> None:
        self._head(None)
        for start in range(0, len(data), 8192):
            piece = data[start : start + 8192]
            self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")

    def _error(self, status: int, code: str, message: str) -> None:
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>'
            f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[str]:
    """The scripted endpoint's URL."""
    _Scripted.paths.clear()
    _Scripted.release.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        _Scripted.release.set()
        server.shutdown()
        server.server_close()


def test_body_without_content_length_is_read_whole(scripted: str) -> None:
    data = fetch_s3(f"s3://{BUCKET}/chunked-150000", settings_for(scripted))
    assert data == PAYLOAD[:150_000]
    assert _Scripted.paths == [f"/{BUCKET}/chunked-150000"]  # path-style addressing


def test_cap_is_enforced_while_reading_a_body_without_content_length(scripted: str) -> None:
    uri = f"s3://{BUCKET}/chunked-150000"
    error = failure(uri, settings_for(scripted, max_bytes=100_000))
    assert error.kind == "image_too_large" and not error.retriable
    assert uri in error.message and "fetch.max_bytes=100000" in error.message


@pytest.mark.parametrize(
    ("behaviour", "code"), [("slowdown", "SlowDown"), ("internal", "InternalError")]
)
def test_throttling_and_server_errors_are_retriable(
    scripted: str, behaviour: str, code: str
) -> None:
    uri = f"s3://{BUCKET}/{behaviour}"
    error = failure(uri, settings_for(scripted))
    assert error.kind == "image_fetch_failed" and error.retriable
    assert uri in error.message and code in error.message
    assert len(_Scripted.paths) == 1  # botocore did not retry on its own


def test_archived_object_is_permanent(scripted: str) -> None:
    error = failure(f"s3://{BUCKET}/archived", settings_for(scripted))
    assert error.kind == "image_fetch_failed" and not error.retriable
    assert "restore" in error.message


def test_truncated_body_is_retriable(scripted: str) -> None:
    uri = f"s3://{BUCKET}/truncated"
    error = failure(uri, settings_for(scripted))
    assert error.kind == "image_fetch_failed" and error.retriable
    assert uri in error.message


def test_stall_late_in_the_body_is_cut_off_at_timeout_s(scripted: str) -> None:
    # 1.5 s of steady progress, then silence: the fetch must end when its 2 s budget is
    # spent, not a full read timeout (also 2 s, capped by timeout_s) after the last byte.
    uri = f"s3://{BUCKET}/trickle-then-stall"
    settings = settings_for(scripted, timeout_s=2.0, read_timeout_s=30)
    started = time.monotonic()
    error = failure(uri, settings)
    took = time.monotonic() - started
    assert error.kind == "image_fetch_failed" and error.retriable
    assert uri in error.message and "fetch.timeout_s=2.0" in error.message
    assert 1.9 < took < 5 * 2.0  # a hang limit, not a speed figure


# --- settings and event validation ---------------------------------------------------------


@pytest.mark.parametrize(
    ("s3_settings", "words"),
    [
        ({"access_key_id": "AKIAEXAMPLE"}, "fetch.s3.access_key_id and fetch.s3.secret_access_key"),
        ({"secret_access_key": "shh"}, "fetch.s3.access_key_id and fetch.s3.secret_access_key"),
        ({"session_token": "tok"}, "fetch.s3.session_token needs fetch.s3.access_key_id"),
        ({"endpoint_url": "ftp://minio:9000"}, "fetch.s3.endpoint_url"),
        ({"endpoint_url": "http://user:pw@minio:9000"}, "fetch.s3.endpoint_url"),
        ({"addressing_style": "sideways"}, "fetch.s3.addressing_style"),
        ({"bucket": "frames"}, "fetch.s3.bucket"),
    ],
)
def test_bad_s3_settings_are_config_errors_naming_the_field(
    s3_settings: dict[str, str], words: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(overrides={"fetch": {"s3": s3_settings}})
    assert words in str(info.value)


def test_config_errors_do_not_echo_s3_secrets() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(overrides={"fetch": {"s3": {"secret_access_key": "hunter2-secret"}}})
    assert "hunter2-secret" not in str(info.value)
    assert "fetch.s3" in str(info.value) and "'***'" in str(info.value)


def test_config_errors_do_not_echo_kafka_passwords() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(overrides={"kafka": {"common_config": {"sasl.password": ["hunter2-list"]}}})
    assert "hunter2-list" not in str(info.value)
    assert "kafka.common_config" in str(info.value)


def test_good_s3_settings_load() -> None:
    settings = load_settings(
        overrides={
            "fetch": {
                "s3": {
                    "endpoint_url": "http://minio.storage:9000",
                    "access_key_id": "AKIAEXAMPLE",
                    "secret_access_key": "shh",
                    "addressing_style": "path",
                }
            }
        }
    )
    s3 = settings.fetch.s3
    assert s3.secret_access_key is not None and s3.secret_access_key.get_secret_value() == "shh"
    assert "shh" not in repr(settings)


def _event(image: str) -> str:
    """A frame event's JSON, as it arrives from Kafka."""
    return json.dumps(
        {
            "event_id": "e1",
            "stream_id": "cam-1",
            "captured_at": "2026-01-01T00:00:00+00:00",
            "image": image,
        }
    )


@pytest.mark.parametrize(
    "image",
    [
        "s3://Bad_Bucket/key.png",
        "s3://ab/key.png",  # under 3 characters
        "s3:///key.png",
        "s3://frames",
        "s3://frames/",
        "s3://frames/key.png?versionId=3",
        "s3://frames/key.png#part",
    ],
)
def test_frame_event_refuses_malformed_s3_uris(image: str) -> None:
    with pytest.raises(ValidationError) as info:
        FrameEvent.model_validate_json(_event(image))
    assert "s3" in str(info.value)


@pytest.mark.parametrize("image", ["s3://frames/a.png", "s3://my.frames-2/cam 1/0001.png"])
def test_frame_event_accepts_s3_uris(image: str) -> None:
    assert FrameEvent.model_validate_json(_event(image)).image == image
