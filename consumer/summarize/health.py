"""The summarizer's metrics and its one HTTP port: /metrics, /readyz and /livez.

Its own CollectorRegistry, names prefixed `emotion_summarizer_`; the port and the
liveness bound are the worker's settings (`health.host`, `health.port`,
`health.loop_stall_s`): one summarizer per pod, like one worker per pod.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

from consumer.config import ConfigError


class SummarizerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        p = "emotion_summarizer_"
        self.results = Counter(
            p + "results",
            "Result records read, by outcome: counted, duplicate (result_id already in its "
            "window), late (its window closed or past the grace period), future (captured_at "
            "past processed_at + summarize.max_clock_skew_s), invalid (not a result).",
            ["outcome"],
            registry=r,
        )
        self.windows_closed = Counter(
            p + "windows_closed",
            "Window summaries published (committed), by why the window closed: watermark "
            "(a later result of the stream, plus the grace period) or idle.",
            ["reason"],
            registry=r,
        )
        self.transactions = Counter(
            p + "transactions", "Transactions, by outcome (ok, failed).", ["outcome"], registry=r
        )
        self.open_windows = Gauge(
            p + "open_windows", "Windows open in the assigned partitions.", registry=r
        )
        self.restored_records = Counter(
            p + "restored_records",
            "State records read back from the state topic on partition assignment.",
            registry=r,
        )
        self.ready = Gauge(p + "ready", "1 while /readyz answers 200.", registry=r)


class SummarizerHealth:
    """Liveness: the loop turned lately. Readiness: subscribed, and no restore running."""

    def __init__(self, loop_stall_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.loop_stall_s = loop_stall_s
        self._clock = clock
        self.last_loop = clock()
        self.subscribed = False
        self.restoring = False

    def turned(self) -> None:
        self.last_loop = self._clock()

    def liveness(self) -> tuple[bool, str]:
        stalled = self._clock() - self.last_loop
        if stalled > self.loop_stall_s:
            return False, f"the loop has not turned for {stalled:.0f} s"
        return True, "ok"

    def readiness(self) -> tuple[bool, str]:
        if not self.subscribed:
            return False, "not subscribed yet"
        if self.restoring:
            return False, "restoring window state"
        return self.liveness()


class ProbeServer:
    """Serves /metrics, /readyz and /livez on a daemon thread until close()."""

    def __init__(
        self, host: str, port: int, metrics: SummarizerMetrics, health: SummarizerHealth
    ) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
                elif path in ("/readyz", "/livez"):
                    ok, why = health.readiness() if path == "/readyz" else health.liveness()
                    if path == "/readyz":
                        metrics.ready.set(1 if ok else 0)
                    self._send(200 if ok else 503, (why + "\n").encode(), "text/plain")
                else:
                    self._send(404, b"not found: try /metrics, /readyz or /livez\n", "text/plain")

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        try:
            self._httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise ConfigError(
                f"health.host={host!r} health.port={port}: cannot listen ({exc.strerror or exc});"
                " set health.port to a free port (0: any), or health.enabled = false"
            ) from exc
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="probes", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> ProbeServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
