"""Serve a folder of images over HTTP/1.1 on 127.0.0.1, in a process of its own.

The worker rows fetch their images from here, so the worker's real fetch path (HTTP client,
SSRF check with `fetch.allow_hosts=["127.0.0.1"]`, keep-alive pool) is part of what they
measure, as it would be against an image store. Loopback only: nothing here talks to any
other address.

    python -m bench._image_server FOLDER      # prints the port, then serves until killed

A subprocess rather than a thread: the server's Python work must not take the GIL from the
worker being measured, and a plain `-m` child imports nothing heavy (multiprocessing's
spawn would re-import the bench and torch).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

REPO = Path(__file__).resolve().parent.parent
SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def url_path(root: Path, path: Path) -> str:
    """The URL path `path` (a file under `root`) is served at."""
    return "/" + quote(path.resolve().relative_to(root.resolve()).as_posix())


def _load(root: Path) -> dict[str, tuple[bytes, str]]:
    """Every image under `root`, read once up front so the disk is not part of a fetch."""
    return {
        url_path(root, path): (path.read_bytes(), SUFFIXES[path.suffix.lower()])
        for path in sorted(root.rglob("*"))
        if path.suffix.lower() in SUFFIXES and path.is_file()
    }


def serve(root: Path) -> None:
    files = _load(root)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as image stores and CDNs answer
        # Headers and body go out in two writes: without TCP_NODELAY the body can wait for
        # the client's delayed ACK (tens of ms) and the bench would time the kernel.
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            found = files.get(self.path)
            if found is None:
                self.send_error(404)
                return
            body, media_type = found
            self.send_response(200)
            self.send_header("Content-Type", media_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    print(httpd.server_address[1], flush=True)
    httpd.serve_forever()


@contextlib.contextmanager
def image_server(root: Path) -> Iterator[str]:
    """The base URL (http://127.0.0.1:PORT) of a server for `root`, while the block runs."""
    from bench._bench_core import CLEANUPS  # here: the server process must not import torch

    process = subprocess.Popen(
        [sys.executable, "-m", "bench._image_server", str(root)],
        stdout=subprocess.PIPE,
        cwd=REPO,
        text=True,
    )
    # The watchdog's hard exit must not leave the server running.
    CLEANUPS.append(process.kill)
    try:
        assert process.stdout is not None
        # readline blocks until the port is printed, or returns "" if the child died.
        port = process.stdout.readline().strip()
        if not port.isdigit():
            raise RuntimeError(f"the image server did not start (exit {process.poll()})")
        yield f"http://127.0.0.1:{port}"
    finally:
        CLEANUPS.remove(process.kill)
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        if process.stdout is not None:
            process.stdout.close()


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
