"""Where an image fetch may go: URL form checks and resolved-address policy (SSRF).

An event's image URL is chosen by whoever can publish to the input topic. Fetched naively,
``http://169.254.169.254/...`` would read cloud credentials and ``http://10.0.0.5/admin``
would reach internal services. So, for every hop (the first URL and each redirect):

* only http and https, and no ``user:password@`` in the URL (`parse_target`);
* the host is resolved exactly once and every address it resolves to must be public
  (not loopback, private, link-local, CGNAT, multicast, unspecified or reserved, in IPv4,
  IPv6, or IPv6 forms that embed an IPv4 address) unless ``fetch.allow_hosts`` allows it
  (`resolve_checked`);
* the connection goes to an address that was checked (consumer.fetch.pool connects only to
  what `resolve_checked` returned): there is no second DNS lookup a rebinding DNS server
  could answer differently. The Host header, TLS SNI and certificate verification still use
  the hostname, so virtual hosts and HTTPS work as before;
* redirects are followed by consumer.fetch.http, not by urllib, so each one is checked the
  same way, and at most ``fetch.max_redirects`` of them.

Environment proxies (``HTTP_PROXY``) are deliberately not used: a proxy would do its own
DNS lookup and connect wherever it resolves, which defeats the check.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from consumer.errors import EventError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
SockAddr = tuple[str, int] | tuple[str, int, int, int]
# Checked (family, sockaddr) pairs, the only places a fetch may connect to.
Pinned = list[tuple[socket.AddressFamily, SockAddr]]

# Not covered (or not reliably covered) by the ipaddress module's flags.
_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")


@dataclass(frozen=True)
class Target:
    """One hop's URL, split into what the connection needs."""

    url: str
    scheme: str
    host: str
    port: int
    path: str  # path and query, as sent in the request line


def parse_target(url: str, *, first: bool) -> Target:
    """Check the URL's form (scheme, userinfo, host) before anything touches the network."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # a bad port or a malformed IPv6 literal
        raise refused(url, f"the URL is malformed ({exc})", fix=False) from exc
    what = "the image URL" if first else "a redirect"
    if parts.scheme not in ("http", "https"):
        # A redirect to file:, ftp: or gopher: must not reach other handlers.
        raise refused(url, f"{what} uses scheme {parts.scheme!r}; only http and https", fix=False)
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        # Credentials in URLs end up in logs and dead letters, and a@b hides the real host.
        raise refused(url, f"{what} carries user info (user@host)", fix=False)
    if not parts.hostname:
        raise refused(url, f"{what} has no host", fix=False)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    default = 443 if parts.scheme == "https" else 80
    return Target(url, parts.scheme, parts.hostname, port or default, path)


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
                raise refused(f"host {host!r}", f"it resolves to {address}, {reason}")
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


def refused(subject: str, reason: str, *, fix: bool = True) -> EventError:
    """image_fetch_refused: permanent, so no retries; the message says how to allow it."""
    message = f"image fetch refused: {subject}: {reason}"
    if fix:
        message += "; if this host is trusted, add it (or its network) to fetch.allow_hosts"
    return EventError("image_fetch_refused", message)


def _reset_after_fork() -> None:
    """A forked child must not share the parent's resolver threads."""
    global _resolver_pool
    _resolver_pool = concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="dns")


os.register_at_fork(after_in_child=_reset_after_fork)
