"""The summarizer as a real process: `emotion-worker summarize`, settings in its environment."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.support.worker import REPO, WorkerProcess


class SummarizerProcess(WorkerProcess):
    """Starts `python -m consumer.cli summarize` (or a wrapper `module` with the same main);
    the log, waits, stop and kill of WorkerProcess apply."""

    def __init__(
        self,
        log_path: Path,
        settings: dict[str, str],
        module: str = "consumer.cli",
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("EMOTION_WORKER_")}
        env.update({"PYTHONUNBUFFERED": "1", **(extra_env or {})})
        env.update({f"EMOTION_WORKER_{k.upper()}": v for k, v in settings.items()})
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "summarize", "--log-format", "json"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )

    def metrics(self, timeout_s: float = 30.0) -> str:
        """The text of its /metrics."""
        entry = self.wait_for_event(
            lambda e: e.get("event") == "health server listening", "its health port", timeout_s
        )
        url = f"http://127.0.0.1:{entry['port']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())
