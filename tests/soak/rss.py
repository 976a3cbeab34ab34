"""Memory under load: the resident set size of the worker the soak never kills, over time.

`RssSampler` reads VmRSS from /proc/<pid>/status every few seconds on a thread of its own,
following the slot's current process (a worker may still exit on its own, e.g. when a
broker pause loses its partitions in exactly_once mode, and is then started again).
`slope_mib_per_min` fits a least-squares line to the samples of the last half of the run,
one intercept per process (a restart starts from a fresh heap; only growth within a process
counts), leaving out each process's first minute (start-up: importing torch, loading the
model) and processes seen for under two minutes after it, and gives its slope in MiB a
minute.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class RssSample:
    at_s: float  # time.monotonic()
    pid: int
    rss_mib: float


def read_rss_mib(pid: int) -> float | None:
    """VmRSS of a process in MiB, or None if it is gone (or not readable)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0  # kB
    return None


def by_process(
    samples: list[RssSample], warm_up_s: float = 60.0, min_span_s: float = 120.0
) -> dict[int, list[RssSample]]:
    """The samples of each process that lived long enough, less its first `warm_up_s`.

    A process's RSS climbs while it imports torch and loads the model: that is start-up,
    not growth under load. A process seen for less than `min_span_s` after its warm-up
    (one restarted again soon) says nothing about a slope.
    """
    first: dict[int, float] = {}
    for sample in samples:
        first.setdefault(sample.pid, sample.at_s)
    kept: dict[int, list[RssSample]] = {}
    for sample in samples:
        if sample.at_s - first[sample.pid] >= warm_up_s:
            kept.setdefault(sample.pid, []).append(sample)
    return {
        pid: series
        for pid, series in kept.items()
        if len(series) >= 2 and series[-1].at_s - series[0].at_s >= min_span_s
    }


def slope_mib_per_min(series_by_pid: dict[int, list[RssSample]]) -> float | None:
    """Least-squares slope of RSS over time, one intercept per process; None if unfit."""
    covariance = variance = 0.0
    for series in series_by_pid.values():
        mean_t = sum(s.at_s for s in series) / len(series)
        mean_r = sum(s.rss_mib for s in series) / len(series)
        covariance += sum((s.at_s - mean_t) * (s.rss_mib - mean_r) for s in series)
        variance += sum((s.at_s - mean_t) ** 2 for s in series)
    if variance <= 0:
        return None
    return covariance / variance * 60.0


@dataclass
class RssSampler:
    """Samples the RSS of `pid()` every `every_s` seconds until stopped."""

    pid: Callable[[], int | None]
    every_s: float = 2.0
    samples: list[RssSample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, name="soak-rss", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            pid = self.pid()
            if pid is None:
                continue
            rss = read_rss_mib(pid)
            if rss is not None:
                self.samples.append(RssSample(time.monotonic(), pid, rss))

    def last_half(self) -> dict[int, list[RssSample]]:
        """The samples of the last half of the run, by process (see `by_process`)."""
        if not self.samples:
            return {}
        start, end = self.samples[0].at_s, self.samples[-1].at_s
        middle = start + (end - start) / 2
        series = by_process(self.samples)
        return {
            pid: late
            for pid, all_of_it in series.items()
            if len(late := [s for s in all_of_it if s.at_s >= middle]) >= 2
        }

    def write_csv(self, path: Path) -> None:
        """The samples, for a look later: seconds since the first, pid, RSS in MiB."""
        start = self.samples[0].at_s if self.samples else 0.0
        path.write_text(
            "seconds,pid,rss_mib\n"
            + "".join(f"{s.at_s - start:.1f},{s.pid},{s.rss_mib:.1f}\n" for s in self.samples)
        )

    def summary(self) -> str:
        """First and last RSS, peak and process count, for the run's detail lines."""
        if not self.samples:
            return "no samples"
        pids = len({s.pid for s in self.samples})
        peak = max(s.rss_mib for s in self.samples)
        return (
            f"{self.samples[0].rss_mib:.0f} -> {self.samples[-1].rss_mib:.0f} MiB "
            f"(peak {peak:.0f}, {len(self.samples)} samples, {pids} process(es))"
        )
