"""The worker as a real process: `emotion-worker run` with settings in its environment."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parent.parent.parent


class WorkerProcess:
    """Starts `python -m consumer.cli run`; its log goes to a file the test can print."""

    def __init__(
        self, log_path: Path, settings: dict[str, str], module: str = "consumer.cli"
    ) -> None:
        self.log_path = log_path
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        env.update({f"EMOTION_WORKER_{k.upper()}": v for k, v in settings.items()})
        self._log: IO[bytes] = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "run", "--log-format", "json"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,  # so `-m tests.faults...` wrappers import
        )

    def log_events(self) -> list[dict[str, object]]:
        """The worker's JSON log lines, parsed (other lines are skipped)."""
        events = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return events

    def running(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in self.log_text():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.returncode}:\n{self.log_text()}")
            time.sleep(0.1)
        raise AssertionError(f"worker never logged {text!r}:\n{self.log_text()[-4000:]}")

    def wait_for_event(
        self, matches: Callable[[dict[str, object]], bool], what: str, timeout_s: float = 90.0
    ) -> dict[str, object]:
        """The first JSON log entry for which `matches` holds, waiting up to timeout_s."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for entry in self.log_events():
                if matches(entry):
                    return entry
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.returncode}:\n{self.log_text()}")
            time.sleep(0.1)
        raise AssertionError(f"worker never logged {what}:\n{self.log_text()[-4000:]}")

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait: the graceful path (drain, flush, commit)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        finally:
            self._log.close()

    def kill(self) -> None:
        """SIGKILL: no drain, no commit, like a node or OOM kill."""
        self.proc.kill()
        self.proc.wait(10)
        self._log.close()
