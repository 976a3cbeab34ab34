"""The page's HTTP server (stdlib): the page, its events, a JSON snapshot and a probe.

/                the page (static/index.html, with dashboard.js and dashboard.css)
/events          server-sent events: `snapshot` (everything held), then one `summary`
                 per new window summary, and a keep-alive comment when idle
/api/summaries   the snapshot as JSON
/healthz         200 while the summaries reader runs (never asks for the token)
"""

from __future__ import annotations

import errno
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import structlog

from consumer.config import ConfigError
from consumer.dashboard.auth import authorized, local_host_header
from consumer.dashboard.live import LiveSummaries, format_comment, format_event

log = structlog.get_logger("consumer.dashboard.server")

# path -> (file under static/, content type)
_STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
# Only this server's own files: no inline script, no CDN, no fonts or images from elsewhere.
_CSP = (
    "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'none'"
)
_REALM = 'Basic realm="emotion-worker dashboard", charset="UTF-8"'
_TEXT = "text/plain; charset=utf-8"


def static_file(name: str) -> bytes:
    """A file of the page, from the installed package (a wheel includes static/)."""
    return resources.files("consumer.dashboard").joinpath("static", name).read_bytes()


def bind_problem(host: str, port: int, exc: OSError) -> str:
    """Why the page cannot listen on host:port, naming the setting that fixes it."""
    where = f"dashboard.host={host!r} dashboard.port={port}"
    if exc.errno == errno.EADDRINUSE:
        return (
            f"{where}: port {port} is already in use; set dashboard.port (--port) to a free "
            "port, or 0 to pick any free port"
        )
    if exc.errno == errno.EACCES:
        return f"{where}: not allowed to listen on port {port}; use a port above 1023"
    return f"{where}: cannot listen ({exc.strerror or exc}); check dashboard.host (--host)"


class DashboardServer:
    """Serves the page on daemon threads until close(); one thread per open page."""

    def __init__(
        self,
        host: str,
        port: int,
        live: LiveSummaries,
        status: Callable[[], tuple[bool, str]],
        auth_token: str | None = None,
        keepalive_s: float = 15.0,
    ) -> None:
        self.host = host
        self.live = live
        self.status = status
        self.auth_token = auth_token
        self.keepalive_s = keepalive_s
        self._stopping = threading.Event()
        handler = type("Handler", (_Handler,), {"dashboard": self})
        try:
            self._httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise ConfigError(bind_problem(host, port, exc)) from exc
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="dashboard-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        host = "[::1]" if host == "::" else (f"[{host}]" if ":" in host else host)
        return f"http://{host}:{self.port}/"

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def start(self) -> DashboardServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stopping.set()
        self.live.close()  # ends every open event stream
        self._httpd.shutdown()
        self._httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    """One request; `dashboard` is set on a subclass per server."""

    dashboard: DashboardServer
    # A client that sends its request slowly, or stops reading its event stream, is dropped
    # after this long instead of holding a thread for ever.
    timeout = 30
    server_version = "emotion-worker-dashboard"
    sys_version = ""

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        token = self.dashboard.auth_token
        if path == "/healthz":  # the kubelet's probe carries no token
            ok, reason = self.dashboard.status()
            self._send(200 if ok else 503, reason + "\n", _TEXT)
        elif token is None and not local_host_header(self.headers["Host"], self.dashboard.host):
            self._send(403, "forbidden: unknown Host header\n", _TEXT)
        elif token is not None and not authorized(self.headers["Authorization"], token):
            text = "unauthorized: give dashboard.auth_token\n"
            self._send(401, text, _TEXT, {"WWW-Authenticate": _REALM})
        elif path in _STATIC:
            name, content_type = _STATIC[path]
            extra = {"Content-Security-Policy": _CSP} if name.endswith(".html") else {}
            self._send(200, static_file(name), content_type, extra)
        elif path == "/api/summaries":
            body = json.dumps(self.dashboard.live.snapshot(), separators=(",", ":"))
            self._send(200, body, "application/json")
        elif path == "/events":
            self._events()
        else:
            self._send(404, "not found: try / or /events\n", _TEXT)

    def _events(self) -> None:
        live = self.dashboard.live
        subscribed = live.subscribe()
        if subscribed is None:
            self._send(503, "too many open pages\n", _TEXT)
            return
        snapshot, subscription = subscribed
        self.close_connection = True
        try:
            self.send_response(200)
            self._common_headers("text/event-stream; charset=utf-8")
            self.send_header("X-Accel-Buffering", "no")  # nginx: do not buffer the stream
            self.end_headers()
            # retry: how soon the browser reconnects (and gets a fresh snapshot).
            self.wfile.write(b"retry: 2000\n")
            self.wfile.write(format_event(json.dumps(snapshot), event="snapshot"))
            self.wfile.flush()
            while not self.dashboard.stopping:
                items = subscription.next(self.dashboard.keepalive_s)
                if items is None:
                    break  # closed, or fell too far behind: the browser reconnects
                if not items:
                    self.wfile.write(format_comment())  # idle: keep proxies from closing
                for item in items:
                    self.wfile.write(format_event(item, "summary"))
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the page was closed; nothing to tell anyone
        finally:
            live.unsubscribe(subscription)

    def _send(
        self, code: int, body: bytes | str, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        data = body.encode("utf-8") if isinstance(body, str) else body
        self.send_response(code)
        self._common_headers(content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _common_headers(self, content_type: str) -> None:
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")

    def log_message(self, format: str, *args: Any) -> None:
        pass  # an open page reconnecting is not news; the reader logs what matters
