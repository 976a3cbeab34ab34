"""HTTP(S) image fetching that cannot be pointed at the worker's own network (SSRF-safe).

An event's image URL is chosen by whoever can publish to the input topic. Fetched naively,
``http://169.254.169.254/...`` would read cloud credentials and ``http://10.0.0.5/admin``
would reach internal services. So, for every hop (the first URL and each redirect):

* only http and https, and no ``user:password@`` in the URL;
* the host is resolved exactly once and every address it resolves to must be public
  (not loopback, private, link-local, CGNAT, multicast, unspecified or reserved, in IPv4,
  IPv6, or IPv6 forms that embed an IPv4 address) unless ``fetch.allow_hosts`` allows it;
* the connection goes to an address that was checked: there is no second DNS lookup a
  rebinding DNS server could answer differently. The Host header, TLS SNI and certificate
  verification still use the hostname, so virtual hosts and HTTPS work as before;
* redirects are followed here, not by urllib, so each one is checked the same way, and at
  most ``fetch.max_redirects`` of them.

Environment proxies (``HTTP_PROXY``) are deliberately not used: a proxy would do its own
DNS lookup and connect wherever it resolves, which defeats the check.

Time limits. ``fetch.timeout_s`` bounds the whole fetch (redirects and body included);
``fetch.connect_timeout_s`` bounds the TCP connect to each address (and each TLS handshake
read) and ``fetch.read_timeout_s`` the silence before any one read returns, each never
beyond what is left of ``timeout_s``. Per-read timeouts alone cannot hold the total: a
server that trickles its headers a byte a second satisfies every read. So each fetch also
registers its deadline with one shared watchdog thread (a heap of deadlines, not a thread
per fetch), which shuts down the socket of any fetch still running at its deadline; the
fetch then fails with a retriable ``took over {timeout_s}s``. The watchdog shuts the socket
down through a duplicate descriptor that is closed only under its lock, and leaves closing
the connection to the fetch: it never acts on a descriptor number the fetch has closed and
the process may have reused. (Name resolution cannot be interrupted: a slow DNS answer is
bounded by the resolver's own timeouts, not by these.)

Keep-alive pool. Connections are reused across fetches (and redirect hops) from one shared
pool, keyed by (scheme, host, port, checked address the connection is connected to). The
SSRF check is never skipped: every hop resolves and checks the host first, and only a pooled
connection whose peer is among the freshly checked addresses may be used, so a host that now
resolves elsewhere gets a new connection. A connection goes back to the pool only when its
response body was read to the end (small redirect and error bodies are drained) and the
server did not ask to close it; at most ``fetch.pool_max_idle`` idle connections are kept in
all and ``fetch.pool_max_idle_per_host`` per key (the oldest go first), and none idle for
over 30 s is reused. A pooled connection the server closed while it sat idle is noticed
before use, or, when the server closes it just as the request goes out, the request is
repeated once on a new connection without costing one of the fetch's retries (GET is
idempotent). ``close_idle_connections()`` closes what the pool holds (shutdown, tests).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import heapq
import http.client
import ipaddress
import itertools
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

from consumer.config import FetchSettings
from consumer.errors import EventError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
SockAddr = tuple[str, int] | tuple[str, int, int, int]
# Checked (family, sockaddr) pairs, the only places a fetch may connect to.
Pinned = list[tuple[socket.AddressFamily, SockAddr]]
# A pooled connection's identity: scheme, host (Host header, SNI), port, checked peer address.
PoolKey = tuple[str, str, int, SockAddr]

USER_AGENT = "emotion-worker/0.1"
_READ_CHUNK = 64 * 1024
_REDIRECTS = (301, 302, 303, 307, 308)
# Redirect and error bodies up to this size (by Content-Length) are read and dropped so
# that their connection can be reused; a longer or unsized one closes the connection.
_DRAIN_MAX = 64 * 1024
# An idle pooled connection older than this is closed instead of reused: servers drop idle
# keep-alive connections after a while, and a NAT may drop them without telling anyone.
_IDLE_MAX_AGE_S = 30.0
# Not covered (or not reliably covered) by the ipaddress module's flags.
_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")


@dataclass(frozen=True)
class _Target:
    """One hop's URL, split into what the connection needs."""

    url: str
    scheme: str
    host: str
    port: int
    path: str  # path and query, as sent in the request line


def fetch_http(uri: str, settings: FetchSettings) -> bytes:
    """The body of `uri`, following checked redirects; capped, time-limited, SSRF-checked.

    Raises EventError: image_fetch_refused (permanent) for a forbidden URL or address,
    image_not_found, image_too_large or image_fetch_failed otherwise.
    """
    # timeout_s is the total budget of the whole fetch, redirects and body included.
    fetch = _Fetch(uri, settings, _watchdog.start(time.monotonic() + settings.timeout_s))
    try:
        url = uri
        for hop in range(settings.max_redirects + 1):
            target = _parse(url, first=hop == 0)
            addresses = resolve_checked(
                target.host, target.port, settings.allow_hosts, fetch.timeout(settings.timeout_s)
            )
            location = _exchange(target, addresses, fetch)
            if isinstance(location, bytes):
                return location
            url = urljoin(url, location)
    finally:
        _watchdog.stop(fetch.watch)
    raise EventError(
        "image_fetch_failed",
        f"{uri} redirected more than fetch.max_redirects={settings.max_redirects} times",
    )


def _parse(url: str, *, first: bool) -> _Target:
    """Check the URL's form (scheme, userinfo, host) before anything touches the network."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # a bad port or a malformed IPv6 literal
        raise _refused(url, f"the URL is malformed ({exc})", fix=False) from exc
    what = "the image URL" if first else "a redirect"
    if parts.scheme not in ("http", "https"):
        # A redirect to file:, ftp: or gopher: must not reach other handlers.
        raise _refused(url, f"{what} uses scheme {parts.scheme!r}; only http and https", fix=False)
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        # Credentials in URLs end up in logs and dead letters, and a@b hides the real host.
        raise _refused(url, f"{what} carries user info (user@host)", fix=False)
    if not parts.hostname:
        raise _refused(url, f"{what} has no host", fix=False)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    default = 443 if parts.scheme == "https" else 80
    return _Target(url, parts.scheme, parts.hostname, port or default, path)


def resolve_checked(
    host: str, port: int, allow_hosts: Iterable[str], timeout_s: float | None = None
) -> Pinned:
    """Resolve `host` once; every address must be public or allowed, else image_fetch_refused.

    Returns (family, sockaddr) pairs to connect to, in the resolver's order. With
    `timeout_s`, a lookup that takes longer fails (retriable) instead of holding the fetch.
    """
    names, networks = _split_allow(allow_hosts)
    host_allowed = host.lower().rstrip(".") in names
    try:
        infos = _lookup(host, port, timeout_s)
    except TimeoutError:
        raise EventError(
            "image_fetch_failed",
            f"the DNS lookup of {host!r} took over {timeout_s:.3g}s",
            retriable=True,
        ) from None
    except (socket.gaierror, UnicodeError) as exc:
        # DNS failures are often transient: retriable, like any network error.
        raise EventError(
            "image_fetch_failed", f"host {host!r} could not be resolved: {exc}", retriable=True
        ) from exc
    checked: Pinned = []
    for family, _, _, _, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        # A link-local IPv6 address may come with a zone ("fe80::1%eth0").
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if not host_allowed and not any(address in net for net in networks):
            reason = forbidden_reason(address)
            if reason is not None:
                # One bad address refuses the host: we must not pick and choose, since a
                # later connection attempt could fall through to it.
                raise _refused(f"host {host!r}", f"it resolves to {address}, {reason}")
        # Only AF_INET/AF_INET6 get here: (host, port) or (host, port, flow, scope).
        checked.append((family, sockaddr))
    if not checked:
        raise EventError(
            "image_fetch_failed", f"host {host!r} has no IPv4 or IPv6 address", retriable=True
        )
    return checked


# getaddrinfo cannot be interrupted, and a host under an attacker's domain can have a
# name server that answers slowly on purpose. Lookups run here so that the fetch can
# stop waiting at its deadline; a stuck lookup holds one of these threads until the
# resolver's own timeout (resolv.conf) ends it.
_resolver_pool = concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="dns")
# getaddrinfo's rows; typeshed types the address part per family, read as a plain tuple.
AddrInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[Any, ...]]


def _lookup(host: str, port: int, timeout_s: float | None) -> Sequence[AddrInfo]:
    if timeout_s is None:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    future = _resolver_pool.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        return future.result(timeout_s)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise TimeoutError from None


def forbidden_reason(address: IPAddress) -> str | None:
    """Why the worker must not connect to `address` by default, or None when it is public."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            inner = forbidden_reason(embedded)
            return None if inner is None else f"which embeds {embedded}, {inner}"
    if address.is_loopback:
        return "a loopback address"
    if address.is_unspecified:
        return "the unspecified address"
    if address.is_link_local:
        return "a link-local address (cloud metadata services live here)"
    if address.is_multicast:
        return "a multicast address"
    if isinstance(address, ipaddress.IPv4Address) and address in _CGNAT:
        return "a carrier-grade NAT address (100.64.0.0/10)"
    if isinstance(address, ipaddress.IPv6Address) and address in _NAT64_LOCAL:
        return "a local-use NAT64 address"
    if address.is_reserved:
        return "a reserved address"
    if address.is_private:
        return "a private address"
    if not address.is_global:
        # Benchmarking, documentation, 192.0.0.0/24 and the like: nobody's public server.
        return "not a globally routable address"
    return None


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, 6to4, NAT64, Teredo), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.teredo is not None:
        return address.teredo[1]  # the client's (obfuscation undone) address
    return None


def _split_allow(allow_hosts: Iterable[str]) -> tuple[set[str], list[IPNetwork]]:
    """fetch.allow_hosts as hostnames (lower case) and networks (an address is a /32 or /128)."""
    names: set[str] = set()
    networks: list[IPNetwork] = []
    for entry in allow_hosts:
        try:
            networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
        except ValueError:
            names.add(entry.lower().rstrip("."))
    return names, networks


def _refused(subject: str, reason: str, *, fix: bool = True) -> EventError:
    """image_fetch_refused: permanent, so no retries; the message says how to allow it."""
    message = f"image fetch refused: {subject}: {reason}"
    if fix:
        message += "; if this host is trusted, add it (or its network) to fetch.allow_hosts"
    return EventError("image_fetch_refused", message)


# --- deadlines -----------------------------------------------------------------------------


class _Watch:
    """One fetch's deadline, and the socket it uses now as a duplicate the watchdog owns."""

    __slots__ = ("deadline", "done", "dup", "fired")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.fired = False  # the watchdog found this fetch still running at its deadline
        self.done = False  # fired, or the fetch has finished
        # A dup() of the connection's descriptor: shutting it down stops the connection,
        # and it is only closed under the watchdog's lock, so a descriptor number the fetch
        # has closed (and the process may have reused) is never shut down by mistake.
        self.dup: socket.socket | None = None


class _Watchdog:
    """One daemon thread that shuts down the connection of any fetch past its deadline.

    Socket timeouts bound each read; this bounds their sum. Shutting a socket down (unlike
    closing it) wakes a thread blocked reading it, in plain TCP and under TLS alike.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, _Watch]] = []
        self._order = itertools.count()  # ties: never compare _Watch objects
        self._live = 0  # watches in the heap that are not done
        self._thread: threading.Thread | None = None

    def start(self, deadline: float) -> _Watch:
        watch = _Watch(deadline)
        with self._cond:
            heapq.heappush(self._heap, (deadline, next(self._order), watch))
            self._live += 1
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="http-fetch-deadlines", daemon=True
                )
                self._thread.start()
            elif self._heap[0][2] is watch:
                self._cond.notify()  # an earlier deadline than the one it sleeps towards
        return watch

    def attach(self, watch: _Watch, sock: socket.socket) -> None:
        """`sock` is the fetch's connection now (shut down at once if already too late)."""
        dup = socket.fromfd(sock.fileno(), sock.family, sock.type)
        with self._cond:
            old, watch.dup = watch.dup, dup
            if watch.fired:
                _shutdown(dup)
            if old is not None:
                old.close()

    def detach(self, watch: _Watch) -> None:
        """The fetch is about to close or pool its connection: hands off."""
        with self._cond:
            old, watch.dup = watch.dup, None
            if old is not None:
                old.close()

    def stop(self, watch: _Watch) -> None:
        with self._cond:
            old, watch.dup = watch.dup, None
            if old is not None:
                old.close()
            if not watch.done:
                watch.done = True
                self._live -= 1
                # Finished watches stay in the heap until their deadline; drop them in bulk
                # when they outnumber the live ones, so the heap stays near the in-flight size.
                if len(self._heap) > 2 * self._live + 64:
                    self._heap = [entry for entry in self._heap if not entry[2].done]
                    heapq.heapify(self._heap)

    def _run(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][2].done:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                delay = self._heap[0][0] - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                watch = heapq.heappop(self._heap)[2]
                watch.fired = watch.done = True
                self._live -= 1
                if watch.dup is not None:
                    _shutdown(watch.dup)


def _shutdown(sock: socket.socket) -> None:
    # Not connected (yet, or any more): the fetch's own timeouts and checks apply.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


@dataclass
class _Fetch:
    """What every step of one fetch needs: its URI, settings and deadline."""

    uri: str
    settings: FetchSettings
    watch: _Watch

    def timeout(self, limit: float) -> float:
        """`limit` (connect or read timeout), cut to what is left of the total deadline."""
        left = self.watch.deadline - time.monotonic()
        if left <= 0 or self.watch.fired:
            raise self.took_over()
        return min(limit, left)

    def overdue(self) -> bool:
        return self.watch.fired or time.monotonic() >= self.watch.deadline

    def took_over(self) -> EventError:
        return EventError(
            "image_fetch_failed",
            f"{self.uri} took over {self.settings.timeout_s}s",
            retriable=True,
        )


# --- connections ---------------------------------------------------------------------------


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTPConnection to `host` (Host header) that connects to pre-checked addresses."""

    # Never reconnect behind our back (a pooled connection the server closed): every
    # connection is opened by connect() below, for the fetch that checked its addresses.
    auto_open = 0

    def __init__(self, target: _Target, addresses: Pinned) -> None:
        super().__init__(target.host, target.port)
        self._addresses = addresses
        self._origin = (target.scheme, target.host, target.port)
        self.peer: SockAddr | None = None  # the checked address it is connected to
        self.fetch: _Fetch | None = None  # the fetch using it now
        self.response: http.client.HTTPResponse | None = None  # its latest response
        # The socket (TLS or not). http.client drops `sock` as soon as a response says the
        # connection will close, though the body is still read from it.
        self.io: socket.socket | None = None

    @property
    def key(self) -> PoolKey:
        assert self.peer is not None
        return (*self._origin, self.peer)

    def connect(self) -> None:
        """Like socket.create_connection, but with no name lookup: only checked addresses."""
        assert self.fetch is not None
        self.sock, self.peer = _connect_any(self._addresses, self.fetch)
        self.io = self.sock

    def set_timeout(self, timeout: float) -> None:
        """Bound the next socket operations (connect or reads)."""
        self.timeout = timeout
        # fileno -1: the response already closed the socket with its last body bytes
        # (Python 3.13 does so as soon as read1 reaches the end of a `Connection: close`
        # body); the next read just returns b"".
        if self.io is not None and self.io.fileno() != -1:
            self.io.settimeout(timeout)


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    """TLS over a pinned connection; SNI and certificate checks use the hostname."""

    default_port = http.client.HTTPS_PORT
    # Verification on: system CA store, hostname checked, no TLS below 1.2.
    _tls = ssl.create_default_context()

    def connect(self) -> None:
        super().connect()
        raw = self.sock
        assert raw is not None
        # The handshake's reads keep the connect timeout; the watchdog (attached to the TCP
        # socket, which TLS wraps) bounds the whole handshake by the deadline.
        try:
            self.sock = self.io = self._tls.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            self.sock = self.io = None
            raw.close()
            raise


def _connect_any(addresses: Pinned, fetch: _Fetch) -> tuple[socket.socket, SockAddr]:
    """Connect to the first address that answers; all of them were checked."""
    last: OSError | None = None
    for family, sockaddr in addresses:
        timeout = fetch.timeout(fetch.settings.connect_timeout_s)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            _watchdog.attach(fetch.watch, sock)
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            # As http.client's own connect: requests go out at once, not after an ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock, sockaddr
        except OSError as exc:
            _watchdog.detach(fetch.watch)
            sock.close()
            if fetch.overdue():
                raise fetch.took_over() from exc
            last = exc
    assert last is not None  # resolve_checked never returns an empty list
    raise last


class _Pool:
    """Idle keep-alive connections, shared by all fetch threads; bounds passed per call."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[tuple[PoolKey, _PinnedHTTPConnection, float]] = []  # oldest first

    def take(self, target: _Target, addresses: Pinned) -> _PinnedHTTPConnection | None:
        """The newest usable idle connection to one of the freshly checked `addresses`."""
        wanted = {(target.scheme, target.host, target.port, addr) for _, addr in addresses}
        while True:
            found: _PinnedHTTPConnection | None = None
            with self._lock:
                expired = self._expire_locked()
                for index in range(len(self._idle) - 1, -1, -1):
                    if self._idle[index][0] in wanted:
                        found = self._idle.pop(index)[1]
                        break
            for conn in expired:
                conn.close()
            if found is None or _still_open(found):
                return found
            found.close()  # the server closed it while it sat idle

    def put(self, conn: _PinnedHTTPConnection, max_idle: int, max_per_host: int) -> None:
        """Keep `conn` for reuse; the oldest idle ones go beyond the bounds (or 30 s)."""
        key = conn.key
        with self._lock:
            evicted = self._expire_locked()
            self._idle.append((key, conn, time.monotonic()))
            same = [index for index, entry in enumerate(self._idle) if entry[0] == key]
            for index in reversed(same[: max(len(same) - max_per_host, 0)]):
                evicted.append(self._idle.pop(index)[1])
            while len(self._idle) > max_idle:
                evicted.append(self._idle.pop(0)[1])
        for old in evicted:
            old.close()

    def _expire_locked(self) -> list[_PinnedHTTPConnection]:
        """Takes the connections idle for too long out of the pool; closing them is the
        caller's job, outside the lock."""
        oldest = time.monotonic() - _IDLE_MAX_AGE_S
        if not self._idle or self._idle[0][2] >= oldest:
            return []
        expired = [conn for _, conn, since in self._idle if since < oldest]
        self._idle = [entry for entry in self._idle if entry[2] >= oldest]
        return expired

    def clear(self) -> int:
        with self._lock:
            idle, self._idle = self._idle, []
        for _, conn, _ in idle:
            conn.close()
        return len(idle)

    def __len__(self) -> int:
        return len(self._idle)


def _still_open(conn: _PinnedHTTPConnection) -> bool:
    """An idle connection has nothing to read; if it has, it is EOF (closed) or junk."""
    if conn.sock is None:
        return False
    if isinstance(conn.sock, ssl.SSLSocket) and conn.sock.pending():
        return False  # decrypted bytes nobody asked for
    try:
        poller = select.poll()
        poller.register(conn.sock, select.POLLIN)
        return not poller.poll(0)
    except (OSError, ValueError):
        return False


def close_idle_connections() -> int:
    """Close every idle pooled connection (at shutdown, and between tests); how many."""
    return _pool.clear()


def idle_connections() -> int:
    """How many connections the pool holds now."""
    return len(_pool)


class _StaleConnectionError(Exception):
    """A pooled connection turned out to be closed by the server before it answered."""


def _exchange(target: _Target, addresses: Pinned, fetch: _Fetch) -> bytes | str:
    """One request for `target` on a pooled connection, or a new one: body or Location."""
    conn = _pool.take(target, addresses)
    if conn is not None:
        try:
            return _use(conn, target, fetch, reused=True)
        except _StaleConnectionError:
            pass  # a race with the server's idle timeout, not a failure: once more, afresh
    cls = _PinnedHTTPSConnection if target.scheme == "https" else _PinnedHTTPConnection
    return _use(cls(target, addresses), target, fetch, reused=False)


def _use(
    conn: _PinnedHTTPConnection, target: _Target, fetch: _Fetch, *, reused: bool
) -> bytes | str:
    """Connect (unless pooled), request, read; then pool the connection or close it."""
    conn.fetch = fetch
    try:
        if reused:
            assert conn.sock is not None
            _watchdog.attach(fetch.watch, conn.sock)
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
            raise _refused(target.url, f"the URL is malformed ({exc})", fix=False) from exc
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


def _release(conn: _PinnedHTTPConnection, fetch: _Fetch) -> None:
    _watchdog.detach(fetch.watch)  # before the descriptor is closed or handed on
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
        _pool.put(conn, settings.pool_max_idle, settings.pool_max_idle_per_host)
        return
    if response is not None:
        response.close()  # a will_close response holds the socket open past conn.close()
    conn.close()


def _request(conn: _PinnedHTTPConnection, target: _Target, fetch: _Fetch) -> bytes | str:
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
    conn: _PinnedHTTPConnection, response: http.client.HTTPResponse, fetch: _Fetch
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


def _drain(conn: _PinnedHTTPConnection, response: http.client.HTTPResponse, fetch: _Fetch) -> None:
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


_watchdog = _Watchdog()
_pool = _Pool()


def _reset_after_fork() -> None:
    """A forked child must not share the parent's connections, lock states or thread."""
    global _watchdog, _pool, _resolver_pool
    _watchdog = _Watchdog()
    _pool = _Pool()
    _resolver_pool = concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="dns")


os.register_at_fork(after_in_child=_reset_after_fork)
