"""Keep-alive connections pinned to checked addresses, shared by all fetch threads.

Connections are reused across fetches (and redirect hops) from one shared pool, keyed by
(scheme, host, port, checked address the connection is connected to). The SSRF check is
never skipped: every hop resolves and checks the host first (consumer.fetch.ssrf), and only
a pooled connection whose peer is among the freshly checked addresses may be used, so a host
that now resolves elsewhere gets a new connection. A connection goes back to the pool only
when its response body was read to the end (small redirect and error bodies are drained)
and the server did not ask to close it; at most ``fetch.pool_max_idle`` idle connections
are kept in all and ``fetch.pool_max_idle_per_host`` per key (the oldest go first), and none
idle for over 30 s is reused. A pooled connection the server closed while it sat idle is
noticed before use, or, when the server closes it just as the request goes out, the request
is repeated once on a new connection without costing one of the fetch's retries (GET is
idempotent). ``close_idle_connections()`` closes what the pool holds (shutdown, tests).
"""

from __future__ import annotations

import http.client
import os
import select
import socket
import ssl
import threading
import time

from consumer.fetch import watchdog
from consumer.fetch.ssrf import Pinned, SockAddr, Target
from consumer.fetch.watchdog import Fetch

# A pooled connection's identity: scheme, host (Host header, SNI), port, checked peer address.
PoolKey = tuple[str, str, int, SockAddr]
# An idle pooled connection older than this is closed instead of reused: servers drop idle
# keep-alive connections after a while, and a NAT may drop them without telling anyone.
_IDLE_MAX_AGE_S = 30.0


class PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTPConnection to `host` (Host header) that connects to pre-checked addresses."""

    # Never reconnect behind our back (a pooled connection the server closed): every
    # connection is opened by connect() below, for the fetch that checked its addresses.
    auto_open = 0

    def __init__(self, target: Target, addresses: Pinned) -> None:
        super().__init__(target.host, target.port)
        self._addresses = addresses
        self._origin = (target.scheme, target.host, target.port)
        self.peer: SockAddr | None = None  # the checked address it is connected to
        self.fetch: Fetch | None = None  # the fetch using it now
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


class PinnedHTTPSConnection(PinnedHTTPConnection):
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


def _connect_any(addresses: Pinned, fetch: Fetch) -> tuple[socket.socket, SockAddr]:
    """Connect to the first address that answers; all of them were checked."""
    last: OSError | None = None
    for family, sockaddr in addresses:
        timeout = fetch.timeout(fetch.settings.connect_timeout_s)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            watchdog.attach(fetch.watch, sock)
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            # As http.client's own connect: requests go out at once, not after an ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock, sockaddr
        except OSError as exc:
            watchdog.detach(fetch.watch)
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
        self._idle: list[tuple[PoolKey, PinnedHTTPConnection, float]] = []  # oldest first

    def take(self, target: Target, addresses: Pinned) -> PinnedHTTPConnection | None:
        """The newest usable idle connection to one of the freshly checked `addresses`."""
        wanted = {(target.scheme, target.host, target.port, addr) for _, addr in addresses}
        while True:
            found: PinnedHTTPConnection | None = None
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

    def put(self, conn: PinnedHTTPConnection, max_idle: int, max_per_host: int) -> None:
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

    def _expire_locked(self) -> list[PinnedHTTPConnection]:
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


def _still_open(conn: PinnedHTTPConnection) -> bool:
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


def take_idle(target: Target, addresses: Pinned) -> PinnedHTTPConnection | None:
    """The newest usable idle connection to one of the freshly checked `addresses`."""
    return _pool.take(target, addresses)


def keep_idle(conn: PinnedHTTPConnection, max_idle: int, max_per_host: int) -> None:
    """Keep `conn` for reuse; the oldest idle ones go beyond the bounds (or 30 s)."""
    _pool.put(conn, max_idle, max_per_host)


def close_idle_connections() -> int:
    """Close every idle pooled connection (at shutdown, and between tests); how many."""
    return _pool.clear()


def idle_connections() -> int:
    """How many connections the pool holds now."""
    return len(_pool)


_pool = _Pool()


def _reset_after_fork() -> None:
    """A forked child must not share the parent's connections or lock state."""
    global _pool
    _pool = _Pool()


os.register_at_fork(after_in_child=_reset_after_fork)
