"""The soak's workers: numbered slots of real worker processes, supervised.

Slot 0 is the worker the controller never signals (its RSS is sampled); the others are
the controller's to kill, stop, add and remove. Like a pod's restart policy, the pool
starts again any worker that exits on its own (a worker that lost its partitions in
exactly_once mode exits 1 by design), and records that exit with the reason it logged.

Like a kubelet's liveness probe (deploy/k8s/base/deployment.yaml), the pool also asks
each worker's /livez every few seconds and kills and starts again one that fails it
several times in a row (a poll loop that stopped turning), recording why.

In exactly_once mode each slot has a stable `kafka.group_instance_id` (static
membership), which also names its transactional id: a worker started again in the same
slot fences its killed predecessor and aborts that one's open transaction at once.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.support.worker import WorkerProcess

KEPT = 0  # the slot the controller never signals
# Logged once the model is loaded and the poll loop starts (its SIGTERM handler is long set).
READY = "worker starting"
# The exit code recorded for a worker that did not stop on SIGTERM (it was killed).
HUNG = -999


def livez(port: int) -> tuple[bool, str]:
    """GET /livez: (alive, what it said)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=3) as answer:
            return True, answer.read().decode(errors="replace").strip()
    except urllib.error.HTTPError as exc:
        return False, exc.read().decode(errors="replace").strip() or f"HTTP {exc.code}"
    except OSError as exc:
        return False, f"no answer: {exc}"


def dump_and_kill(worker: WorkerProcess) -> None:
    """A worker that did not stop: its threads' stacks to its log (SIGUSR1), then SIGKILL."""
    if worker.running():
        worker.proc.send_signal(signal.SIGUSR1)  # tests/soak/soak_worker.py: faulthandler
        time.sleep(2)
    worker.proc.kill()
    worker.stop(10)  # reaps it and closes its log (no signal: it is gone)


@dataclass
class LivenessProbe:
    """A kubelet's liveness probe over the workers, on a thread of its own.

    Every `every_s` it asks each running worker's /livez (its port from the worker's log);
    after `failures` failures in a row it has the worker write its stacks to its log and
    kills it (the pool starts it again). The deployment probes every 10 s, 3 failures.
    """

    workers: Callable[[], list[WorkerProcess]]
    every_s: float = 5.0
    failures: int = 3
    killed: dict[int, str] = field(default_factory=dict)  # id(worker) -> what /livez said
    _ports: dict[int, int] = field(default_factory=dict)
    _failed: dict[int, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="soak-livez", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _port(self, worker: WorkerProcess) -> int | None:
        if id(worker) not in self._ports:
            for entry in worker.log_events():
                if entry.get("event") == "health server listening":
                    self._ports[id(worker)] = int(str(entry["port"]))
                    break
        return self._ports.get(id(worker))

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            for worker in self.workers():
                port = self._port(worker) if worker.running() else None
                if port is None:
                    continue
                alive, said = livez(port)
                failed = 0 if alive else self._failed.get(id(worker), 0) + 1
                self._failed[id(worker)] = failed
                if failed >= self.failures and worker.running():
                    self.killed[id(worker)] = said
                    dump_and_kill(worker)


@dataclass(frozen=True)
class Exit:
    slot: int
    code: int | None
    # "kill", "term", "leave"; "own": exited without a signal from the soak; "liveness":
    # killed after failing its liveness probe
    how: str
    reason: str = ""  # an own exit's "worker failing" reason, what /livez said


@dataclass
class WorkerPool:
    """start_worker(slot) -> a running worker of that slot; the pool keeps the live ones."""

    start_worker: Callable[[int], WorkerProcess]
    slots: int
    workers: dict[int, WorkerProcess] = field(default_factory=dict)
    exits: list[Exit] = field(default_factory=list)
    starts: int = 0
    # slot -> when (monotonic) to start it again after a kill or a stop
    pending: dict[int, float] = field(default_factory=dict)
    _ended: set[int] = field(default_factory=set)  # id() of workers whose exit is recorded
    _ready: set[int] = field(default_factory=set)  # id() of workers that logged READY
    probe: LivenessProbe = field(init=False)

    def __post_init__(self) -> None:
        self.probe = LivenessProbe(lambda: list(self.workers.values()))

    def start(self, slot: int) -> WorkerProcess:
        assert slot not in self.workers or not self.workers[slot].running(), slot
        worker = self.start_worker(slot)
        self.workers[slot] = worker
        self.pending.pop(slot, None)
        self.starts += 1
        return worker

    def live(self) -> list[int]:
        """Slots with a running worker or one about to be started again."""
        running = {s for s, w in self.workers.items() if w.running()}
        return sorted(running | set(self.pending))

    def free(self) -> list[int]:
        live = self.live()
        return [s for s in range(self.slots) if s not in live]

    def chaos_slots(self) -> list[int]:
        """Running workers the controller may signal: those already consuming, if any."""
        running = [s for s, w in sorted(self.workers.items()) if s != KEPT and w.running()]
        return [s for s in running if self.ready(s)] or running

    def ready(self, slot: int) -> bool:
        """Whether the slot's worker has its model loaded and runs its poll loop."""
        worker = self.workers.get(slot)
        if worker is None:
            return False
        if id(worker) not in self._ready and READY in worker.log_text():
            self._ready.add(id(worker))
        return id(worker) in self._ready

    def pid(self, slot: int) -> int | None:
        worker = self.workers.get(slot)
        return worker.proc.pid if worker is not None and worker.running() else None

    def _ended_by_soak(self, slot: int, worker: WorkerProcess, how: str) -> None:
        self._ended.add(id(worker))
        self.exits.append(Exit(slot, worker.proc.returncode, how))

    def kill(self, slot: int, restart_after_s: float) -> None:
        """SIGKILL, then start the slot again after a while (a crashed pod's restart)."""
        worker = self.workers[slot]
        worker.kill()
        self._ended_by_soak(slot, worker, "kill")
        self.pending[slot] = time.monotonic() + restart_after_s

    def term(self, slot: int, restart_after_s: float | None, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait for the graceful exit; start again after a while unless None.

        A worker still running at the timeout is killed, and its code is -999 (a finding).
        """
        worker = self.workers[slot]
        hung = None
        try:
            worker.stop(timeout_s)
        except subprocess.TimeoutExpired:
            dump_and_kill(worker)
            hung = f"still running after {timeout_s:.0f} s"
        # The liveness probe may have killed it meanwhile (the exit code is then -9, or -11
        # if the stack dump itself crashed the stuck process).
        hung = self.probe.killed.get(id(worker), hung)
        self._ended.add(id(worker))
        how = "term" if restart_after_s is not None else "leave"
        if hung is None:
            self.exits.append(Exit(slot, worker.proc.returncode, how))
        else:
            self.exits.append(Exit(slot, HUNG, how, f"did not stop: {hung}"))
        if restart_after_s is not None:
            self.pending[slot] = time.monotonic() + restart_after_s
        return self.exits[-1].code or 0

    def supervise(self) -> list[Exit]:
        """Start due restarts; start again (and record) workers that exited on their own."""
        now = time.monotonic()
        for slot, due in list(self.pending.items()):
            if due <= now:
                self.start(slot)
        own = []
        for slot, worker in list(self.workers.items()):
            if worker.running() or id(worker) in self._ended:
                continue
            self._ended.add(id(worker))
            reasons = [
                str(e.get("reason", ""))
                for e in worker.log_events()
                if e.get("event") == "worker failing"
            ]
            killed = self.probe.killed.get(id(worker))
            if killed is not None:
                exit_ = Exit(slot, worker.proc.returncode, "liveness", killed)
            else:
                exit_ = Exit(slot, worker.proc.returncode, "own", reasons[0] if reasons else "")
            self.exits.append(exit_)
            own.append(exit_)
            self.start(slot)
        return own

    def stop_all(self, timeout_s: float = 90.0) -> dict[int, int | None]:
        """Start what is pending, then SIGTERM every running worker: exit codes by slot.

        Each is first given time to get ready: a process still importing its modules has
        no SIGTERM handler yet and would die of the signal (-15) rather than stop.
        """
        for slot in list(self.pending):
            self.start(slot)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not all(
            self.ready(s) for s, w in self.workers.items() if w.running()
        ):
            time.sleep(0.5)
        running = {s: w for s, w in sorted(self.workers.items()) if w.running()}
        for worker in running.values():
            worker.proc.send_signal(signal.SIGTERM)
        codes: dict[int, int | None] = {}
        for slot, worker in running.items():
            try:
                # Not worker.stop(), which would signal again: a second SIGTERM means "exit
                # now", and during the interpreter's teardown it kills the process (-15).
                worker.proc.wait(timeout_s)
                codes[slot] = worker.stop()
            except subprocess.TimeoutExpired:
                dump_and_kill(worker)
                codes[slot] = None
            self._ended.add(id(worker))
        return codes
