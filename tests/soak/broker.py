"""The soak's own broker, which the controller kills, restarts, pauses and resumes.

`LocalKafkaBroker` (deploy/kafka/local_broker.py) runs the JVM as the leader of a process
group of its own; a kill or a pause signals that group. Its data dir is kept across a
restart, on the same port, so clients reconnect as they would to a restarted node.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from deploy.kafka.local_broker import LocalKafkaBroker, free_port


class ChaosBroker:
    """One local broker with kept data: kill -9 and restart, SIGSTOP and SIGCONT."""

    def __init__(self, data_dir: Path) -> None:
        self.broker = LocalKafkaBroker(data_dir=data_dir, port=free_port())
        self.paused = False
        self.down = False

    @property
    def bootstrap_servers(self) -> str:
        return self.broker.bootstrap_servers

    @property
    def pid(self) -> int | None:
        """The broker JVM's pid (the leader of its process group), None while it is down."""
        # LocalKafkaBroker keeps its process private; the soak needs it to signal the JVM.
        proc = self.broker._proc
        return None if proc is None or proc.poll() is not None else proc.pid

    def start(self) -> None:
        self.broker.start()
        self.down = False

    def _signal(self, signum: int) -> None:
        pid = self.pid
        if pid is None:
            raise AssertionError("the broker is not running")
        os.killpg(pid, signum)

    def kill(self) -> None:
        """SIGKILL: no controlled shutdown, like a node lost (the data dir is kept)."""
        self.resume()
        self._signal(signal.SIGKILL)
        proc = self.broker._proc
        if proc is not None:
            proc.wait(30)
        self.broker.stop(keep_data=True)  # forgets the dead process
        self.down = True

    def restart(self) -> float:
        """Kill, start again on the same port and data; the seconds it was unreachable."""
        began = time.monotonic()
        self.kill()
        self.start()
        return time.monotonic() - began

    def pause(self) -> None:
        """SIGSTOP: the broker holds its connections open and answers nothing."""
        self._signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.paused:
            with contextlib.suppress(ProcessLookupError):
                self._signal(signal.SIGCONT)
            self.paused = False

    def heal(self) -> None:
        """Running and answering, whatever the last fault left."""
        self.resume()
        if self.pid is None:
            self.start()

    def stop(self) -> None:
        self.resume()
        self.broker.stop()
