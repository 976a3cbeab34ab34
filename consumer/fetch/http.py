"""HTTP(S) image fetching that cannot be pointed at the worker's own network (SSRF-safe).

`fetch_http` follows redirects itself, one checked hop at a time: the URL's form and every
address its host resolves to are checked first (consumer.fetch.ssrf), the request goes out
on a pooled or new connection pinned to those addresses (consumer.fetch.pool), and the whole
fetch, redirects and body included, is held to ``fetch.timeout_s`` by the shared deadline
watchdog (consumer.fetch.watchdog). The body is capped at ``fetch.max_bytes`` while it is
read, since Content-Length may be absent or a lie.
"""

from __future__ import annotations

import http.client
import ssl
import time
from urllib.parse import urljoin

from consumer import USER_AGENT
from consumer.config import FetchSettings
from consumer.errors import EventError
from consumer.fetch import watchdog
from consumer.fetch.pool import PinnedHTTPConnection, PinnedHTTPSConnection, keep_idle, take_idle
from consumer.fetch.ssrf import Pinned, Target, parse_target, refused, resolve_checked
from consumer.fetch.watchdog import Fetch

_READ_CHUNK = 64 * 1024
_REDIRECTS = (301, 302, 303, 307, 308)
# Redirect and error bodies up to this size (by Content-Length) are read and dropped so
# that their connection can be reused; a longer or unsized one closes the connection.
_DRAIN_MAX = 64 * 1024


def fetch_http(uri: str, settings: FetchSettings) -> bytes:
    """The body of `uri`, following checked redirects; capped, time-limited, SSRF-checked.

    Raises EventError: image_fetch_refused (permanent) for a forbidden URL or address,
    image_not_found, image_too_large or image_fetch_failed otherwise.
    """
    # timeout_s is the total budget of the whole fetch, redirects and body included.
    fetch = Fetch(uri, settings, watchdog.start(time.monotonic() + settings.timeout_s))
    try:
        url = uri
        for hop in range(settings.max_redirects + 1):
            target = parse_target(url, first=hop == 0)
            addresses = resolve_checked(
                target.host, target.port, settings.allow_hosts, fetch.timeout(settings.timeout_s)
            )
            location = _exchange(target, addresses, fetch)
            if isinstance(location, bytes):
                return location
            url = urljoin(url, location)
    finally:
        watchdog.stop(fetch.watch)
    raise EventError(
        "image_fetch_failed",
        f"{uri} redirected more than fetch.max_redirects={settings.max_redirects} times",
    )


class _StaleConnectionError(Exception):
    """A pooled connection turned out to be closed by the server before it answered."""


def _exchange(target: Target, addresses: Pinned, fetch: Fetch) -> bytes | str:
    """One request for `target` on a pooled connection, or a new one: body or Location."""
    conn = take_idle(target, addresses)
    if conn is not None:
        try:
            return _use(conn, target, fetch, reused=True)
        except _StaleConnectionError:
            pass  # a race with the server's idle timeout, not a failure: once more, afresh
    cls = PinnedHTTPSConnection if target.scheme == "https" else PinnedHTTPConnection
    return _use(cls(target, addresses), target, fetch, reused=False)


def _use(conn: PinnedHTTPConnection, target: Target, fetch: Fetch, *, reused: bool) -> bytes | str:
    """Connect (unless pooled), request, read; then pool the connection or close it."""
    conn.fetch = fetch
    try:
        if reused:
            assert conn.sock is not None
            watchdog.attach(fetch.watch, conn.sock)
        else:
            conn.connect()
        return _request(conn, target, fetch)
    except EventError:
        raise
    except (http.client.HTTPException, OSError) as exc:
        if fetch.overdue():
            # A watchdog shutdown looks like the server hanging up: the deadline tells.
            raise fetch.took_over() from exc
        if reused and conn.response is None and isinstance(exc, ConnectionError):
            raise _StaleConnectionError from exc  # RemoteDisconnected, BrokenPipe, ConnectionReset
        if isinstance(exc, http.client.InvalidURL):
            raise refused(target.url, f"the URL is malformed ({exc})", fix=False) from exc
        if isinstance(exc, ssl.SSLCertVerificationError):
            # A bad certificate will not fix itself in a retry.
            raise EventError(
                "image_fetch_failed", f"{target.url}: TLS certificate rejected: {exc}"
            ) from exc
        raise EventError(
            "image_fetch_failed", f"{fetch.uri} could not be fetched: {exc}", retriable=True
        ) from exc
    except ValueError as exc:  # e.g. a read on an SSL socket that is no more
        if fetch.overdue():
            raise fetch.took_over() from exc
        raise
    finally:
        _release(conn, fetch)


def _release(conn: PinnedHTTPConnection, fetch: Fetch) -> None:
    watchdog.detach(fetch.watch)  # before the descriptor is closed or handed on
    conn.fetch = None
    response, conn.response = conn.response, None
    settings = fetch.settings
    if (
        response is not None
        and _body_done(response)
        and not response.will_close
        and conn.sock is not None
        and not fetch.watch.fired
        and settings.pool_max_idle > 0
        and settings.pool_max_idle_per_host > 0
    ):
        response.close()  # http.client sends the next request only once this is closed
        keep_idle(conn, settings.pool_max_idle, settings.pool_max_idle_per_host)
        return
    if response is not None:
        response.close()  # a will_close response holds the socket open past conn.close()
    conn.close()


def _request(conn: PinnedHTTPConnection, target: Target, fetch: Fetch) -> bytes | str:
    """One GET: the body (bytes) or, for a redirect, the Location to follow next (str)."""
    read_timeout = fetch.settings.read_timeout_s
    conn.set_timeout(fetch.timeout(read_timeout))
    conn.request("GET", target.path, headers={"User-Agent": USER_AGENT})
    conn.set_timeout(fetch.timeout(read_timeout))
    response = conn.response = conn.getresponse()
    if fetch.watch.fired:
        # Cut off mid-headers, http.client takes the end of the stream for their end.
        raise fetch.took_over()
    if response.status in _REDIRECTS:
        location = response.getheader("Location")
        _drain(conn, response, fetch)
        if not location:
            raise EventError("image_fetch_failed", f"{target.url} redirected without a Location")
        return location
    if not 200 <= response.status < 300:
        _drain(conn, response, fetch)
        if response.status in (404, 410):
            raise EventError("image_not_found", f"{target.url} answered HTTP {response.status}")
        retriable = response.status >= 500 or response.status in (408, 429)
        raise EventError(
            "image_fetch_failed",
            f"{target.url} answered HTTP {response.status}",
            retriable=retriable,
        )
    return _read_body(conn, response, fetch)


def _read_body(
    conn: PinnedHTTPConnection, response: http.client.HTTPResponse, fetch: Fetch
) -> bytes:
    settings = fetch.settings
    chunks: list[bytes] = []
    size = 0
    # The cap is enforced while reading: Content-Length may be absent or a lie. read1 does
    # at most one socket read, so each read is bounded by the read timeout and what is left
    # of the deadline.
    while True:
        conn.set_timeout(fetch.timeout(settings.read_timeout_s))
        chunk = response.read1(_READ_CHUNK)
        if not chunk:
            break
        size += len(chunk)
        if size > settings.max_bytes:
            raise EventError("image_too_large", f"{fetch.uri} is over {settings.max_bytes} bytes")
        chunks.append(chunk)
    if fetch.watch.fired:
        raise fetch.took_over()
    if not _body_done(response):
        # read1 takes an early end of the stream for the end of the body.
        raise EventError(
            "image_fetch_failed",
            f"{fetch.uri} could not be fetched: the connection closed mid-body",
            retriable=True,
        )
    return b"".join(chunks)


def _drain(conn: PinnedHTTPConnection, response: http.client.HTTPResponse, fetch: Fetch) -> None:
    """Read a small redirect or error body, so that the connection can be reused."""
    if response.will_close or response.length is None or response.length > _DRAIN_MAX:
        return  # unsized or large: closing the connection is cheaper
    try:
        while True:
            conn.set_timeout(fetch.timeout(fetch.settings.read_timeout_s))
            if not response.read1(_READ_CHUNK):
                return
    except (EventError, http.client.HTTPException, OSError, ValueError):
        pass  # not reusable, that is all: the status (or the deadline) decides the fetch


def _body_done(response: http.client.HTTPResponse) -> bool:
    """The whole body was read: all of Content-Length, the last chunk, or the stream's end."""
    if response.length is not None:
        return response.length == 0
    return response.isclosed()
