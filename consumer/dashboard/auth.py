"""Who may see the page: loopback only without a token; a bearer or basic-auth token otherwise."""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress

from consumer.config import DashboardSettings

# Host header names that mean "this machine" (a page opened as http://localhost:8080/).
_LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    """Whether listening on `host` keeps the page on this machine."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # another name: it may resolve anywhere


def exposure_problem(settings: DashboardSettings) -> str | None:
    """Why these settings would serve the page to the network unauthenticated, else None.

    Refused rather than warned about: the page shows how identifiable people on camera
    feel, a warning scrolls away in a log, and whoever needs another address can set a
    token in one line (or keep loopback behind their own authenticating proxy).
    """
    if settings.auth_token is not None or is_loopback(settings.host):
        return None
    return (
        f"dashboard.host={settings.host!r} serves the page beyond this machine, but "
        "dashboard.auth_token is not set; set dashboard.auth_token "
        "(EMOTION_WORKER_DASHBOARD__AUTH_TOKEN, at least 16 characters), or keep "
        "dashboard.host = 127.0.0.1 and reach it through an SSH tunnel or "
        "`kubectl port-forward`"
    )


def authorized(header: str | None, token: str) -> bool:
    """Whether an Authorization header carries `token`: `Bearer <token>`, or basic auth
    with `token` as the password and any user name. Compared in constant time."""
    if not header:
        return False
    scheme, _, credentials = header.strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() == "bearer":
        given = credentials
    elif scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        given = decoded.partition(":")[2]
    else:
        return False
    return hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8"))


def local_host_header(header: str | None, bound_host: str) -> bool:
    """Whether a request's Host header names this machine (or the address bound).

    Without a token, a loopback server must still refuse other names: a web page the user
    visits could otherwise point its own domain at 127.0.0.1 (DNS rebinding) and read the
    dashboard from the user's browser.
    """
    if not header:
        return False
    host = header.strip().lower()
    if host.startswith("["):  # [::1]:8080
        name = host[1:].partition("]")[0]
    else:
        name = host.rpartition(":")[0] if host.count(":") == 1 else host
    return name in _LOCAL_NAMES or name == bound_host.strip("[]").lower()
