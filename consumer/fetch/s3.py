"""s3:// image fetching through one shared, bounded boto3 client per configuration.

``s3://bucket/key``: the bucket is everything between ``s3://`` and the next ``/``, and
the key is the rest of the URI, taken literally. It is not percent-decoded (as with the
AWS CLI), so ``s3://frames/cam%201.png`` names the key ``cam%201.png``, and a key may hold
any character S3 allows. (FrameEvent refuses ``?`` and ``#`` in s3 URIs, so events never
rely on that.)

The endpoint (``fetch.s3.endpoint_url``) is trusted configuration chosen by the operator,
not by whoever publishes events, so the SSRF guard for http(s) URLs does not apply here;
an event can only choose a bucket and a key on that endpoint.

Retries are the worker's (``fetch.retries`` in consumer.fetch.references.fetch_with_retries), so
botocore makes exactly one attempt and every failure becomes an EventError whose
``retriable`` flag says whether another attempt could succeed.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any

import boto3.session
from botocore.compat import set_socket_timeout
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    FlexibleChecksumError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
    SSLError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from consumer import USER_AGENT
from consumer.config import FetchSettings, S3Settings
from consumer.errors import EventError

_READ_CHUNK = 64 * 1024
# The longest server message quoted in an error (they end up in dead letters and logs).
_MAX_SERVER_MESSAGE = 200

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
# Worth another attempt: the server is busy, failing or timed out waiting for us.
_RETRIABLE_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
    }
)
_NO_CREDENTIALS_FIX = (
    "set fetch.s3.access_key_id and fetch.s3.secret_access_key (EMOTION_WORKER_FETCH__S3__...), "
    "or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or give the worker a role "
    "(EKS IRSA, ECS task role, EC2 instance profile)"
)
# What to fix for each credential problem S3 reports; these never fix themselves.
_CREDENTIAL_FIXES = {
    "AccessDenied": (
        "the credentials in use may not read this object; grant s3:GetObject on it to "
        "the user or role (S3 also says AccessDenied for a missing key when s3:ListBucket "
        "is not granted), or fix fetch.s3.access_key_id / AWS_ACCESS_KEY_ID"
    ),
    "AllAccessDisabled": "all access to this bucket is disabled by its owner",
    "InvalidAccessKeyId": (
        "the server does not know the access key id; fix fetch.s3.access_key_id or "
        "AWS_ACCESS_KEY_ID (and fetch.s3.endpoint_url, if the key belongs to another server)"
    ),
    "SignatureDoesNotMatch": (
        "the secret key does not match the access key id; fix fetch.s3.secret_access_key "
        "or AWS_SECRET_ACCESS_KEY"
    ),
    "InvalidToken": "the session token is malformed; fix fetch.s3.session_token or "
    "AWS_SESSION_TOKEN",
    "ExpiredToken": (
        "the session token has expired; renew fetch.s3.session_token or AWS_SESSION_TOKEN, "
        "or use a role whose credentials boto3 refreshes itself"
    ),
    "TokenRefreshRequired": "the session token must be refreshed; renew "
    "fetch.s3.session_token or AWS_SESSION_TOKEN",
    "AuthorizationHeaderMalformed": (
        "the request was signed for the wrong region; set fetch.s3.region (or AWS_REGION) "
        "to the bucket's region"
    ),
    "PermanentRedirect": (
        "the bucket lives elsewhere; set fetch.s3.region (or AWS_REGION) to the bucket's "
        "region, or fix fetch.s3.endpoint_url"
    ),
    "RequestTimeTooSkewed": "this machine's clock is too far off; fix its time (NTP)",
}


@dataclass(frozen=True)
class _ClientKey:
    """Everything a client is built from: equal keys share one client."""

    s3: S3Settings
    max_pool_connections: int
    connect_timeout_s: float
    read_timeout_s: float


# boto3 clients are thread-safe and hold the connection pool, so all fetch threads share
# one per configuration. Sessions are not thread-safe: each client gets its own, created
# under the lock.
_clients: dict[_ClientKey, Any] = {}
_clients_lock = threading.Lock()


def fetch_s3(uri: str, settings: FetchSettings) -> bytes:
    """The object's bytes, capped at settings.max_bytes and limited to settings.timeout_s.

    Raises EventError: invalid_event (not s3://bucket/key), image_not_found,
    image_too_large or image_fetch_failed (``retriable`` for transient failures only).
    """
    deadline = time.monotonic() + settings.timeout_s
    bucket, key = parse_s3_uri(uri)
    client = s3_client(settings)
    try:
        response = client.get_object(Bucket=bucket, Key=key)
    except (ClientError, BotoCoreError, OSError) as exc:
        raise _translate(exc, uri, settings) from exc
    body = response["Body"]
    try:
        length = response.get("ContentLength")
        if length is not None and length > settings.max_bytes:
            # Refused before reading a byte; the cap is still enforced while reading,
            # since the header may be absent (chunked) or wrong.
            raise EventError(
                "image_too_large",
                f"{uri} is {length} bytes, over fetch.max_bytes={settings.max_bytes}",
            )
        return _read_capped(body, uri, deadline, settings)
    except (ClientError, BotoCoreError, OSError) as exc:
        raise _translate(exc, uri, settings, deadline) from exc
    finally:
        # After a complete read the connection is already back in the pool; after a
        # refusal or error this drops it instead of draining the rest of the body.
        body.close()


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, key) of ``s3://bucket/key``; the key is literal (not percent-decoded)."""
    rest = uri[len("s3://") :] if uri[:5].lower() == "s3://" else None
    bucket, slash, key = (rest or "").partition("/")
    if rest is None or not bucket or not slash or not key:
        raise EventError("invalid_event", f"image {uri!r} is not of the form s3://bucket/key")
    return bucket, key


def s3_client(settings: FetchSettings) -> Any:
    """The shared client for these settings, created on first use."""
    key = _ClientKey(
        s3=settings.s3,
        max_pool_connections=settings.threads,
        # No single wait may outlast the whole fetch's budget.
        connect_timeout_s=min(settings.connect_timeout_s, settings.timeout_s),
        read_timeout_s=min(settings.read_timeout_s, settings.timeout_s),
    )
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _make_client(key)
            _clients[key] = client
        return client


def clear_clients() -> None:
    """Forget the cached clients, so the next fetch builds new ones.

    Credentials from the default chain are looked up when a client is built (role
    credentials then refresh themselves); tests that change the environment call this.
    """
    with _clients_lock:
        _clients.clear()


def _make_client(key: _ClientKey) -> Any:
    config = Config(
        # Each fetch thread holds at most one connection: this bounds the pool.
        max_pool_connections=key.max_pool_connections,
        connect_timeout=key.connect_timeout_s,
        read_timeout=key.read_timeout_s,
        # One attempt: the worker retries retriable failures itself, with its own backoff.
        # (botocore's "max_attempts" here would count retries, not attempts: 1 meant two.)
        retries={"total_max_attempts": 1, "mode": "standard"},
        s3={"addressing_style": key.s3.addressing_style},
        signature_version="s3v4",
        user_agent_extra=USER_AGENT,
    )
    s3 = key.s3
    credentials: dict[str, str] = {}
    if s3.access_key_id is not None and s3.secret_access_key is not None:
        credentials["aws_access_key_id"] = s3.access_key_id.get_secret_value()
        credentials["aws_secret_access_key"] = s3.secret_access_key.get_secret_value()
        if s3.session_token is not None:
            credentials["aws_session_token"] = s3.session_token.get_secret_value()
    # Without explicit keys boto3's default chain applies: environment, shared files,
    # web identity (EKS IRSA), container and instance roles.
    session = boto3.session.Session()
    return session.client(
        "s3", endpoint_url=s3.endpoint_url, region_name=s3.region, config=config, **credentials
    )


def _read_capped(body: Any, uri: str, deadline: float, settings: FetchSettings) -> bytes:
    """The body, refused once it passes max_bytes or the deadline.

    Reads go through botocore's StreamingBody, so its length and checksum checks still
    apply. Before each read the socket timeout is lowered to what is left of the
    deadline, so a server that stalls costs at most the rest of the budget. (One read
    may wait for several packets, so a server trickling bytes just under that timeout
    could overrun it within one 64 KiB read; the endpoint is trusted configuration, not
    chosen by event publishers. urllib3 resets the timeout when it reuses a connection.)
    """
    chunks: list[bytes] = []
    size = 0
    while True:
        left = _remaining(deadline, uri, settings)
        _bound_next_read(body, min(settings.read_timeout_s, left))
        # Never ask for more than one byte past the cap.
        chunk = body.read(min(_READ_CHUNK, settings.max_bytes + 1 - size))
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > settings.max_bytes:
            raise EventError(
                "image_too_large", f"{uri} is over fetch.max_bytes={settings.max_bytes} bytes"
            )
        chunks.append(chunk)


def _bound_next_read(body: Any, seconds: float) -> None:
    """Set the response socket's timeout; a no-op once the response is read to its end."""
    # AttributeError: the response closed itself at its end (no socket left), or
    # botocore's internals changed; then the client's read_timeout still bounds each read.
    with contextlib.suppress(AttributeError):
        set_socket_timeout(body._raw_stream, seconds)


def _remaining(deadline: float, uri: str, settings: FetchSettings) -> float:
    """Seconds left of the fetch's total budget; a retriable failure once it is spent."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise _timed_out(uri, settings)
    return left


def _timed_out(uri: str, settings: FetchSettings) -> EventError:
    return EventError(
        "image_fetch_failed",
        f"{uri} took over fetch.timeout_s={settings.timeout_s}s",
        retriable=True,
    )


def _translate(
    exc: Exception, uri: str, settings: FetchSettings, deadline: float | None = None
) -> EventError:
    """The EventError for a botocore failure: kind, a message naming the fix, retriable."""
    if isinstance(exc, ClientError):
        return _client_error(exc, uri)
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return EventError(
            "image_fetch_failed", f"{uri}: no usable AWS credentials ({exc}); {_NO_CREDENTIALS_FIX}"
        )
    if isinstance(exc, CredentialRetrievalError):
        return EventError(
            "image_fetch_failed", f"{uri}: AWS credentials could not be loaded ({exc})"
        )
    endpoint = settings.s3.endpoint_url or "AWS S3"
    if isinstance(exc, SSLError):
        # A certificate that does not verify will not verify on the next attempt either.
        return EventError(
            "image_fetch_failed",
            f"{uri}: TLS with {endpoint} failed ({exc}); check fetch.s3.endpoint_url and, "
            "for a private CA, AWS_CA_BUNDLE",
        )
    if isinstance(exc, ReadTimeoutError) and deadline is not None and time.monotonic() >= deadline:
        return _timed_out(uri, settings)  # the socket timeout was the rest of the budget
    if isinstance(exc, BotoConnectionError):  # endpoint unreachable, connect timeout, proxy
        return EventError(
            "image_fetch_failed",
            f"{uri}: could not connect to {endpoint} ({exc}); if this persists, check "
            "fetch.s3.endpoint_url and fetch.s3.region",
            retriable=True,
        )
    if isinstance(
        exc,
        HTTPClientError  # read timeouts, connections closed mid-response
        | IncompleteReadError
        | FlexibleChecksumError  # corrupted on the way
        | OSError,
    ):
        return EventError(
            "image_fetch_failed", f"{uri}: reading from {endpoint} failed ({exc})", retriable=True
        )
    return EventError("image_fetch_failed", f"{uri}: {type(exc).__name__}: {exc}")


def _client_error(exc: ClientError, uri: str) -> EventError:
    """S3 answered with an error: not found, a credential problem, or a server failure."""
    error = exc.response.get("Error", {})
    code = str(error.get("Code") or "")
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    said = str(error.get("Message") or "")[:_MAX_SERVER_MESSAGE]
    shown = f"{code or 'HTTP ' + str(status)}" + (f": {said}" if said else "")
    if code in _NOT_FOUND_CODES or status == 404:
        what = "bucket does not exist" if code == "NoSuchBucket" else "object does not exist"
        return EventError("image_not_found", f"{uri}: {what} ({shown})")
    fix = _CREDENTIAL_FIXES.get(code)
    if fix is not None:
        return EventError("image_fetch_failed", f"{uri}: S3 refused ({shown}); {fix}")
    if code == "InvalidObjectState":
        return EventError(
            "image_fetch_failed",
            f"{uri}: the object is archived ({shown}); restore it before it can be read",
        )
    if status == 403:
        return EventError(
            "image_fetch_failed",
            f"{uri}: S3 refused ({shown}); {_CREDENTIAL_FIXES['AccessDenied']}",
        )
    retriable = code in _RETRIABLE_CODES or status >= 500 or status in (408, 429)
    return EventError("image_fetch_failed", f"{uri}: S3 answered {shown}", retriable=retriable)
