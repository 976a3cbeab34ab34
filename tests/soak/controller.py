"""The chaos controller: for a number of minutes, random faults one after another.

Fault kinds (`KINDS`):
  kill            SIGKILL of a worker (not the kept one); its slot starts again shortly
  term            SIGTERM of a worker: graceful drain and exit; its slot starts again
  join            a new worker joins the group (a free slot)
  leave           a worker stops for good (SIGTERM), while at least `min_live` remain
  broker restart  the broker is killed (SIGKILL) and started again on its kept data
  broker pause    SIGSTOP of the broker for longer than the workers' session timeout
  slow images     the image server answers every request seconds late, for a while
  decoder crash   events whose image makes the decoder process segfault

Kinds are drawn from a seeded shuffled bag: each kind once in random order, then a new
bag, so a run of 8 faults or more injects every kind (a kind that cannot apply now, e.g.
join with every slot taken, waits for the next draw). Between faults the controller keeps
the pool supervised (restarts due, workers that exited on their own started again).
After the window, `heal` undoes whatever a fault left: the broker running and answering,
the image server fast, every pending restart done.
"""

from __future__ import annotations

import collections
import random
import time
from dataclasses import dataclass, field

from tests.soak.broker import ChaosBroker
from tests.soak.commits import CommitWatch
from tests.soak.load import LoadProducer
from tests.soak.workers import WorkerPool
from tests.support.http_server import ImageServer

KINDS = (
    "kill",
    "term",
    "join",
    "leave",
    "broker restart",
    "broker pause",
    "slow images",
    "decoder crash",
)


@dataclass(frozen=True)
class Injected:
    kind: str
    at_s: float  # seconds into the fault window
    detail: str


@dataclass
class Controller:
    rng: random.Random
    pool: WorkerPool
    broker: ChaosBroker
    images: ImageServer
    load: LoadProducer
    watch: CommitWatch
    session_timeout_s: float
    min_live: int = 2
    gap_s: tuple[float, float] = (4.0, 9.0)  # between the end of one fault and the next
    restart_after_s: tuple[float, float] = (0.5, 3.0)
    slow_for_s: tuple[float, float] = (10.0, 25.0)
    slow_delay_s: tuple[float, float] = (1.0, 2.5)
    injected: list[Injected] = field(default_factory=list)
    _bag: list[str] = field(default_factory=list)
    _began: float = 0.0
    _slow_until: float | None = None

    @property
    def counts(self) -> collections.Counter[str]:
        return collections.Counter(i.kind for i in self.injected)

    def run(self, seconds: float) -> None:
        """Inject faults for `seconds` (the last one may end a little later)."""
        self._began = time.monotonic()
        end = self._began + seconds
        next_at = self._began + self.rng.uniform(*self.gap_s)
        while time.monotonic() < end:
            self.tick()
            if time.monotonic() >= next_at:
                kind = self._draw()
                if kind is not None:
                    self._inject(kind)
                next_at = time.monotonic() + self.rng.uniform(*self.gap_s)
            time.sleep(0.2)

    def tick(self) -> None:
        """What runs between faults: supervision, and the end of a slow-image spell."""
        if self.load.failed:
            raise AssertionError("\n".join(self.load.errors))
        self.pool.supervise()
        if self._slow_until is not None and time.monotonic() >= self._slow_until:
            self.images.delay_s = 0.0
            self._slow_until = None

    def heal(self) -> None:
        self.broker.heal()
        self.images.delay_s = 0.0
        self._slow_until = None
        for slot in list(self.pool.pending):
            self.pool.start(slot)
        self.pool.supervise()

    # ---- drawing -------------------------------------------------------------------------

    def _applies(self, kind: str) -> bool:
        live = self.pool.live()
        if kind in ("kill", "term"):
            return bool(self.pool.chaos_slots())
        if kind == "join":
            return bool(self.pool.free())
        if kind == "leave":
            return bool(self.pool.chaos_slots()) and len(live) > self.min_live
        if kind == "slow images":
            return self._slow_until is None
        return True

    def _draw(self) -> str | None:
        if not self._bag:
            self._bag = list(KINDS)
            self.rng.shuffle(self._bag)
        for kind in self._bag:
            if self._applies(kind):
                self._bag.remove(kind)
                return kind
        return None

    # ---- injecting -------------------------------------------------------------------------

    def _mark(self, name: str) -> None:
        """The group's commits right after a fault (for the checker), said if slow."""
        began = time.monotonic()
        if self.watch.mark(name) is None:
            print(f"soak: no commit reading after {name} within 60 s", flush=True)
        elif time.monotonic() - began > 5:
            print(f"soak: commit reading after {name} took {time.monotonic() - began:.0f} s")

    def _record(self, kind: str, detail: str) -> None:
        at = time.monotonic() - self._began
        self.injected.append(Injected(kind, at, detail))
        print(f"soak {at:7.1f} s  {kind}: {detail}", flush=True)

    def _inject(self, kind: str) -> None:
        rng = self.rng
        if kind in ("kill", "term", "leave"):
            slot = rng.choice(self.pool.chaos_slots())
            pid = self.pool.pid(slot)
            if kind == "kill":
                self.pool.kill(slot, rng.uniform(*self.restart_after_s))
                self._record(kind, f"SIGKILL worker {slot} (pid {pid})")
            else:
                restart = rng.uniform(*self.restart_after_s) if kind == "term" else None
                began = time.monotonic()
                code = self.pool.term(slot, restart)
                took = time.monotonic() - began
                what = "SIGTERM" if kind == "term" else "SIGTERM for good"
                self._record(kind, f"{what} worker {slot} (pid {pid}): exit {code} in {took:.1f} s")
            self._mark(f"{kind} worker {slot}")
        elif kind == "join":
            slot = self.pool.free()[0]
            self.pool.start(slot)
            self._record(kind, f"worker {slot} started (pid {self.pool.pid(slot)})")
        elif kind == "broker restart":
            down = self.broker.restart()
            self._record(kind, f"SIGKILL broker, started again: {down:.1f} s down")
            self._mark(kind)
        elif kind == "broker pause":
            seconds = rng.uniform(self.session_timeout_s + 2, self.session_timeout_s + 5)
            self.broker.pause()
            time.sleep(seconds)
            self.broker.resume()
            self._record(kind, f"SIGSTOP broker for {seconds:.1f} s, then SIGCONT")
            self._mark(kind)
        elif kind == "slow images":
            delay = round(rng.uniform(*self.slow_delay_s), 1)
            lasting = rng.uniform(*self.slow_for_s)
            self.images.delay_s = delay
            self._slow_until = time.monotonic() + lasting
            self._record(kind, f"image server {delay} s late on every request for {lasting:.0f} s")
        elif kind == "decoder crash":
            count = rng.randint(1, 3)
            self.load.inject_crashes(count)
            self._record(kind, f"{count} event(s) whose image segfaults the decoder")
        else:
            raise ValueError(kind)
