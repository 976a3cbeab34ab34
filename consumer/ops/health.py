"""The worker's one HTTP port: /metrics for Prometheus, /readyz and /livez for Kubernetes."""

from __future__ import annotations

import errno
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from consumer.config import ConfigError
from consumer.ops.metrics import HealthState, WorkerMetrics

log = structlog.get_logger("consumer.ops.health")


def _bind_problem(host: str, port: int, exc: OSError) -> str:
    """Why the health server could not listen on host:port, and which setting fixes it."""
    where = f"health.host={host!r} health.port={port}"
    if exc.errno == errno.EADDRINUSE:
        return (
            f"{where}: port {port} is already in use (another worker or program on this "
            "host?); set health.port (EMOTION_WORKER_HEALTH__PORT) to a free port, 0 to "
            "pick any free port, or health.enabled = false to serve no probes"
        )
    if exc.errno == errno.EACCES:
        return (
            f"{where}: not allowed to listen on port {port} (ports below 1024 need "
            "privileges); set health.port above 1023, or 0 to pick any free port"
        )
    if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT) or isinstance(exc, socket.gaierror):
        return (
            f"{where}: cannot listen on host {host!r} ({exc.strerror or exc}); set "
            "health.host to an address of this machine, e.g. 0.0.0.0 or 127.0.0.1"
        )
    return f"{where}: cannot listen ({exc.strerror or exc}); check health.host and health.port"


class HealthServer:
    """Serves the probes and metrics on a daemon thread until close()."""

    def __init__(self, host: str, port: int, metrics: WorkerMetrics, health: HealthState) -> None:
        self.metrics = metrics
        self.health = health
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body = generate_latest(server.metrics.registry)
                    self._send(200, body, CONTENT_TYPE_LATEST)
                elif path in ("/readyz", "/livez"):
                    ok, reason = (
                        server.health.readiness() if path == "/readyz" else server.health.liveness()
                    )
                    if path == "/readyz":
                        server.metrics.ready.set(1 if ok else 0)
                    self._send(200 if ok else 503, (reason + "\n").encode(), "text/plain")
                else:
                    self._send(404, b"not found: try /metrics, /readyz or /livez\n", "text/plain")

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass  # probes every few seconds would drown the worker's own log

        try:
            self._httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise ConfigError(_bind_problem(host, port, exc)) from exc
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="health", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> HealthServer:
        self._thread.start()
        log.info("health server listening", port=self.port, paths=["/metrics", "/readyz", "/livez"])
        return self

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
