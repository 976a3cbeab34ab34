"""One worker process per device under one supervisor (`processes.devices` other than "single").

Why processes and not threads: each worker owns one GPU, one Kafka consumer and its own
Python interpreter (GIL, CUDA context, torch.compile caches), and a crash of one must not
corrupt the others' state. All children join the same consumer group, so Kafka spreads
the input partitions over them exactly as it would over separate pods.

Signals: the first SIGTERM/SIGINT is forwarded to every child (they drain and commit),
a second one again (they exit at once). A child that exits while no stop was asked for
stops the others and makes the supervisor exit 1, so the pod is restarted as a whole
rather than running on fewer GPUs than it holds.

Where each child runs is consumer.ops.placement; what it is started with (command line,
environment, pinning) is consumer.ops.child_spec.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from consumer.config import ENV_PREFIX, WorkerSettings
from consumer.ops.child_spec import ChildSpec, child_specs

# How long the supervisor waits for children after asking them to stop, on top of their
# own drain timeout (closing the clients, the final commit), before it kills them.
STOP_MARGIN_S = 30.0
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when the supervisor dies.

    Children have their own process group (so a terminal's Ctrl-C reaches them once, via
    the supervisor); without this, a supervisor killed by SIGKILL would leave them running.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork, not after
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os._exit(1)

    return preexec


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@dataclass
class _Child:
    spec: ChildSpec
    proc: subprocess.Popen[bytes]
    signals_sent: int = 0
    code: int | None = None  # set once reaped
    clean: bool = False


@dataclass
class Supervisor:
    """Starts the children, forwards stop signals, and turns their exits into one code."""

    specs: Sequence[ChildSpec]
    stop_timeout_s: float
    log: Any
    poll_s: float = 0.05
    # Signals every child is to receive, in order: the caught ones, and a SIGTERM of our
    # own when a child died. The main loop delivers them (the handler only records them).
    _requests: list[int] = field(default_factory=list)
    _children: list[_Child] = field(default_factory=list)
    _failed: bool = False
    _logged_requests: int = 0

    def run(self) -> int:
        previous = {signum: signal.signal(signum, self._on_signal) for signum in _STOP_SIGNALS}
        try:
            if not self._start_all():
                self._failed = True
            deadline: float | None = None
            killed = False
            while True:
                self._deliver()
                self._reap()
                if all(child.code is not None for child in self._children):
                    break
                if self._requests and deadline is None:
                    deadline = time.monotonic() + self.stop_timeout_s
                if deadline is not None and not killed and time.monotonic() > deadline:
                    killed = True
                    self._failed = True
                    self._kill_remaining("worker process did not stop in time; killing it")
                time.sleep(self.poll_s)
        except BaseException:
            self._kill_remaining("supervisor failing; killing worker process")
            raise
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        code = 1 if self._failed or not all(c.clean for c in self._children) else 0
        self.log.info("supervisor exiting", code=code)
        return code

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._requests.append(signum)

    def _start_all(self) -> bool:
        for spec in self.specs:
            if self._requests:
                return True  # asked to stop while starting: start no more
            try:
                proc = subprocess.Popen(
                    spec.argv,
                    env=spec.env,
                    # Own process group: a terminal's Ctrl-C must not reach a child twice
                    # (directly and forwarded), which would skip its drain.
                    process_group=0,
                    preexec_fn=_die_with_parent(os.getpid()),
                )
            except OSError as exc:
                self.log.error(
                    "worker process failed to start", index=spec.placement.index, error=str(exc)
                )
                self._stop_all()
                return False
            self._children.append(_Child(spec, proc))
            self.log.info(
                "worker process started",
                index=spec.placement.index,
                device=spec.placement.device,
                pid=proc.pid,
            )
        return True

    def _deliver(self) -> None:
        if self._children and len(self._requests) > self._logged_requests:
            for signum in self._requests[self._logged_requests :]:
                self.log.info("forwarding signal to worker processes", signal=_signal_name(signum))
            self._logged_requests = len(self._requests)
        for child in self._children:
            while child.code is None and child.signals_sent < len(self._requests):
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(self._requests[child.signals_sent])
                child.signals_sent += 1

    def _reap(self) -> None:
        for child in self._children:
            if child.code is not None:
                continue
            code = child.proc.poll()
            if code is None:
                continue
            child.code = code
            asked = child.signals_sent > 0
            # A child signalled before it installed its handlers dies of that signal; it
            # had consumed nothing, so that is a clean stop too.
            child.clean = asked and (code == 0 or code == -self._requests[0])
            fields: dict[str, Any] = {
                "index": child.spec.placement.index,
                "device": child.spec.placement.device,
                "pid": child.proc.pid,
                "code": code,
            }
            if code < 0:
                fields["signal"] = _signal_name(-code)
            if asked:
                self.log.info("worker process exited", **fields)
            else:
                self.log.error("worker process exited", unexpected=True, **fields)
                self._failed = True
                self._stop_all()

    def _stop_all(self) -> None:
        """Ask every child to drain, unless a stop was asked for already.

        Once only: children take a second signal as "exit at once", and two children
        dying in the same turn must not cut the survivors' drain short.
        """
        if not self._requests:
            self.log.error("stopping the other worker processes")
            self._requests.append(signal.SIGTERM)

    def _kill_remaining(self, message: str) -> None:
        for child in self._children:
            if child.code is None and child.proc.poll() is None:
                self.log.error(
                    message,
                    index=child.spec.placement.index,
                    pid=child.proc.pid,
                )
                child.proc.kill()


def run_supervisor(
    settings: WorkerSettings,
    config_file: Path | None,
    overrides: Mapping[str, Any] | None = None,
) -> int:
    """`emotion-worker run` with processes.devices other than "single": 0 if all stopped cleanly."""
    from consumer.ops.logs import configure_logging, get_logger

    configure_logging(settings.log)
    log = get_logger("consumer.ops.supervisor")
    specs = child_specs(settings, config_file, overrides)
    log.info(
        "supervisor starting",
        devices=[spec.placement.device for spec in specs],
        cuda_visible_devices=[spec.placement.cuda_visible_devices for spec in specs],
        health_ports=[int(spec.env[f"{ENV_PREFIX}HEALTH__PORT"]) for spec in specs],
    )
    if settings.model.device != "auto":
        log.info(
            "model.device is chosen per process by processes.devices",
            ignored=settings.model.device,
        )
    stop_timeout = settings.flow.drain_timeout_s + STOP_MARGIN_S
    return Supervisor(specs, stop_timeout_s=stop_timeout, log=log).run()
