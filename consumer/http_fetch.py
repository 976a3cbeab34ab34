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
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from consumer.config import FetchSettings
from consumer.errors import EventError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# Checked (family, sockaddr) pairs, the only places a fetch may connect to.
Pinned = list[tuple[socket.AddressFamily, tuple[str, int] | tuple[str, int, int, int]]]

USER_AGENT = "emotion-worker/0.1"
_READ_CHUNK = 64 * 1024
_REDIRECTS = (301, 302, 303, 307, 308)
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
    deadline = time.monotonic() + settings.timeout_s
    url = uri
    for hop in range(settings.max_redirects + 1):
        target = _parse(url, first=hop == 0)
        addresses = resolve_checked(target.host, target.port, settings.allow_hosts)
        conn = _open(target, addresses, _remaining(deadline, uri, settings))
        try:
            location = _request(conn, target, deadline, uri, settings)
            if isinstance(location, bytes):
                return location
        finally:
            conn.close()
        url = urljoin(url, location)
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


def resolve_checked(host: str, port: int, allow_hosts: Iterable[str]) -> Pinned:
    """Resolve `host` once; every address must be public or allowed, else image_fetch_refused.

    Returns (family, sockaddr) pairs to connect to, in the resolver's order.
    """
    names, networks = _split_allow(allow_hosts)
    host_allowed = host.lower().rstrip(".") in names
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
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
        # typeshed types sockaddr for every family; only AF_INET/AF_INET6 get here.
        checked.append((family, sockaddr))  # type: ignore[arg-type]
    if not checked:
        raise EventError(
            "image_fetch_failed", f"host {host!r} has no IPv4 or IPv6 address", retriable=True
        )
    return checked


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


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTPConnection to `host` (Host header) that connects to pre-checked addresses."""

    def __init__(
        self,
        host: str,
        port: int,
        addresses: Pinned,
        timeout: float,
    ) -> None:
        super().__init__(host, port, timeout=timeout)
        self._addresses = addresses

    def connect(self) -> None:
        """Like socket.create_connection, but with no name lookup: only checked addresses."""
        self.sock = _connect_any(self._addresses, self.timeout)

    def set_timeout(self, timeout: float) -> None:
        """Bound the next socket operation (connect or read) by what is left of the deadline."""
        self.timeout = timeout
        if self.sock is not None:
            self.sock.settimeout(timeout)


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    """TLS over a pinned connection; SNI and certificate checks use the hostname."""

    default_port = http.client.HTTPS_PORT
    # Verification on: system CA store, hostname checked, no TLS below 1.2.
    _tls = ssl.create_default_context()

    def connect(self) -> None:
        raw = _connect_any(self._addresses, self.timeout)
        try:
            self.sock = self._tls.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise


def _connect_any(
    addresses: Pinned,
    timeout: float | None,
) -> socket.socket:
    """Connect to the first address that answers; all of them were checked."""
    last: OSError | None = None
    for family, sockaddr in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    assert last is not None  # resolve_checked never returns an empty list
    raise last


def _open(
    target: _Target,
    addresses: Pinned,
    timeout: float,
) -> _PinnedHTTPConnection:
    cls = _PinnedHTTPSConnection if target.scheme == "https" else _PinnedHTTPConnection
    return cls(target.host, target.port, addresses, timeout)


def _request(
    conn: _PinnedHTTPConnection,
    target: _Target,
    deadline: float,
    uri: str,
    settings: FetchSettings,
) -> bytes | str:
    """One GET: the body (bytes) or, for a redirect, the Location to follow next (str)."""
    try:
        conn.request("GET", target.path, headers={"User-Agent": USER_AGENT})
        conn.set_timeout(_remaining(deadline, uri, settings))
        response = conn.getresponse()
        if response.status in _REDIRECTS:
            location = response.getheader("Location")
            if not location:
                raise EventError(
                    "image_fetch_failed", f"{target.url} redirected without a Location"
                )
            return location
        if response.status in (404, 410):
            raise EventError("image_not_found", f"{target.url} answered HTTP {response.status}")
        if not 200 <= response.status < 300:
            retriable = response.status >= 500 or response.status in (408, 429)
            raise EventError(
                "image_fetch_failed",
                f"{target.url} answered HTTP {response.status}",
                retriable=retriable,
            )
        return _read_body(conn, response, deadline, uri, settings)
    except EventError:
        raise
    except http.client.InvalidURL as exc:
        raise _refused(target.url, f"the URL is malformed ({exc})", fix=False) from exc
    except ssl.SSLCertVerificationError as exc:
        # A bad certificate will not fix itself in a retry.
        raise EventError(
            "image_fetch_failed", f"{target.url}: TLS certificate rejected: {exc}"
        ) from exc
    except (http.client.HTTPException, TimeoutError, ConnectionError, OSError) as exc:
        raise EventError(
            "image_fetch_failed", f"{uri} could not be fetched: {exc}", retriable=True
        ) from exc


def _read_body(
    conn: _PinnedHTTPConnection,
    response: http.client.HTTPResponse,
    deadline: float,
    uri: str,
    settings: FetchSettings,
) -> bytes:
    chunks: list[bytes] = []
    size = 0
    # The cap is enforced while reading: Content-Length may be absent or a lie. read1 does
    # at most one socket read, so each read is bounded by what is left of the deadline.
    while chunk := response.read1(_READ_CHUNK):
        size += len(chunk)
        if size > settings.max_bytes:
            raise EventError("image_too_large", f"{uri} is over {settings.max_bytes} bytes")
        chunks.append(chunk)
        conn.set_timeout(_remaining(deadline, uri, settings))
    return b"".join(chunks)


def _remaining(deadline: float, uri: str, settings: FetchSettings) -> float:
    """Seconds left of the fetch's total budget; a retriable failure once it is spent."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise EventError(
            "image_fetch_failed", f"{uri} took over {settings.timeout_s}s", retriable=True
        )
    return left
