"""A worker pointed at an address where no broker listens: a few plain lines, not a flood.

No broker is needed: 127.0.0.1:1 refuses every connection at once.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.support.worker import WorkerProcess

DEAD = "127.0.0.1:1"


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_unreachable_bootstrap_servers_are_said_plainly_and_not_flooded(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    worker = WorkerProcess(
        tmp_path / "worker.log",
        {
            "kafka__bootstrap_servers": DEAD,
            "model__path": str(tiny_checkpoint),
            "health__host": "127.0.0.1",
            "health__port": "0",
            "decode__workers": "1",
        },
    )
    try:
        listening = worker.wait_for_event(
            lambda e: e.get("event") == "health server listening", "the health port"
        )
        url = f"http://127.0.0.1:{listening['port']}"
        worker.wait_for_log("worker starting", timeout_s=120)
        started = time.monotonic()
        plain = worker.wait_for_event(
            lambda e: str(e.get("event", "")).startswith(
                f"cannot reach the bootstrap servers {DEAD}"
            ),
            "the plain unreachable line",
            timeout_s=30,
        )
        code, body = get(url + "/readyz")
        time.sleep(max(0.0, 8.0 - (time.monotonic() - started)))  # ~8 s of refused connects
        code_later, _ = get(url + "/readyz")
    finally:
        worker.kill()
    text = str(plain["event"])
    assert "last error:" in text and "Connection refused" in text, text
    assert "check kafka.bootstrap_servers" in text and "security.protocol" in text, text
    assert code == 503 and f"cannot reach the Kafka bootstrap servers {DEAD}" in body, body
    assert code_later == 503
    # Before the fix: ~20 "Connection refused" lines a second from librdkafka alone.
    noisy = [e for e in worker.log_events() if e.get("level") in ("warning", "error", "critical")]
    assert 1 <= len(noisy) <= 10, "\n".join(str(e) for e in noisy)
    refused = sum("Connection refused" in line for line in worker.log_text().splitlines())
    assert refused <= 4, worker.log_text()[-4000:]
