"""A real HTTP image server on 127.0.0.1 for tests: files from a folder, optional delay."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class ImageServer:
    """Serves GET /<name> from `root`; `delay_s` per request.

    /status/<code> answers that code; /sleep/<seconds>/<name> waits first.
    """

    def __init__(self, root: Path, delay_s: float = 0.0) -> None:
        self.root = root
        self.delay_s = delay_s
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests += 1
                if server.delay_s:
                    time.sleep(server.delay_s)
                if self.path.startswith("/sleep/"):  # /sleep/<seconds>/<name>
                    _, _, seconds, name = self.path.split("/", 3)
                    time.sleep(float(seconds))
                    self.path = "/" + name
                if self.path.startswith("/status/"):
                    self.send_error(int(self.path.rsplit("/", 1)[1]))
                    return
                path = server.root / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout under test): nothing to serve

            def log_message(self, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> ImageServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
