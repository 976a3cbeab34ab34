"""The soak's accounting and its closing table.

`account` reads nothing: it takes what the producer published, the outcomes read back
(results and dead letters, read_committed, up to the end offsets) and the commit readings,
runs the fault suite's `tally` on them (lost, duplicates, duplicates below a commit, wrong
event, unsent, misrouted, order of first deliveries per stream) and adds the soak's own
figures: faults by kind, dead letters by kind (and hostile events that got another kind
than the one they must get), publish-to-first-outcome latency of the good events, the
longest commit stall of a partition, workers that exited on their own, commits that moved
back, and the kept worker's RSS slope over the last half of a run of 10 minutes or more.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.faults.checker import Coord, Fault, FaultReport, Outcome, tally
from tests.soak.commits import Stall
from tests.soak.controller import KINDS, Injected
from tests.soak.load import Published
from tests.soak.rss import RssSampler, slope_mib_per_min
from tests.soak.workers import HUNG, Exit

SOAK_REPORTS: list[SoakReport] = []
RSS_MIN_MINUTES = 10.0  # the RSS slope is reported for runs at least this long


def percentile(values: Sequence[float], share: float) -> float:
    """Nearest-rank percentile (share in 0..1) of a non-empty sequence."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def count_line(counts: Mapping[str, int], order: Sequence[str] = ()) -> str:
    """ "kill 4, term 2": the counts in the given order, then the rest by name."""
    names = [k for k in order if counts.get(k)] + sorted(k for k in counts if k not in order)
    return ", ".join(f"{k} {counts[k]}" for k in names if counts[k]) or "none"


@dataclass
class SoakReport:
    mode: str
    minutes: float
    seed: int
    faults: collections.Counter[str]
    tally: FaultReport
    published: collections.Counter[str]  # by category: file, http, slow, hostile, crash
    dead_letter_kinds: collections.Counter[str]
    wrong_kind: int  # a hostile or crash event whose dead letter has another kind
    latency_s: tuple[float, float, float] | None  # p50, p99, max; None: no results
    stalls: list[Stall]
    own_exits: list[Exit]
    liveness_kills: list[Exit]
    regressions: list[str]
    rss_slope: str
    rss_summary: str
    committed_at_end: bool
    publish_errors: list[str]
    watch_failures: collections.Counter[str] = field(default_factory=collections.Counter)
    duplicate_lines: list[str] = field(default_factory=list)
    # which worker logged publishing each copy of a duplicate (exactly_once mode)
    duplicate_sources: list[str] = field(default_factory=list)
    timeline: list[Injected] = field(default_factory=list)
    exits: list[Exit] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    COLUMNS = (
        "mode",
        "minutes",
        "seed",
        "faults injected",
        "events",
        "results",
        "dead letters",
        "lost",
        "duplicates",
        "dup below commit",
        "order violations",
        "latency p50 / p99 / max (s)",
        "worst commit stall",
        "own exits / liveness kills / SIGTERM ignored",
        "RSS slope (MiB/min)",
    )

    @property
    def hung(self) -> list[Exit]:
        """Workers told to stop (SIGTERM) that had to be killed."""
        return [e for e in self.exits if e.code == HUNG]

    @property
    def worst_stall(self) -> Stall | None:
        return max(self.stalls, key=lambda s: s.seconds, default=None)

    def cells(self) -> list[str]:
        t = self.tally
        kinds = count_line(self.dead_letter_kinds)
        latency = (
            "n/a" if self.latency_s is None else " / ".join(f"{v:.1f}" for v in self.latency_s)
        )
        stall = self.worst_stall
        return [
            self.mode,
            f"{self.minutes:g}",
            str(self.seed),
            count_line(self.faults, KINDS),
            f"{t.produced} ({count_line(self.published, ('file', 'http', 'slow', 'hostile'))})",
            str(t.results),
            f"{t.dead_letters} ({kinds})",
            str(t.missing),
            str(t.duplicates),
            str(t.dup_below_commit),
            str(t.order_violations),
            latency,
            "n/a" if stall is None else stall.describe(),
            f"{len(self.own_exits)} / {len(self.liveness_kills)} / {len(self.hung)}",
            self.rss_slope,
        ]

    @classmethod
    def table(cls, reports: Sequence[SoakReport]) -> str:
        lines = [
            "| " + " | ".join(cls.COLUMNS) + " |",
            "|" + "|".join("---" for _ in cls.COLUMNS) + "|",
        ]
        lines += ["| " + " | ".join(r.cells()) + " |" for r in reports]
        return "\n".join(lines)

    def details(self) -> str:
        """Everything behind one row: the faults in order, exits, stalls, any problem."""
        t = self.tally
        out = [f"### {self.mode}, {self.minutes:g} min, seed {self.seed}", ""]
        out.append(
            f"- checker: produced {t.produced}, distinct {t.distinct}, wrong event "
            f"{t.wrong_event}, unsent {t.unsent}, misrouted {t.misrouted}, dead letters of "
            f"another kind than expected {self.wrong_kind}, committed == end offsets at the "
            f"end: {self.committed_at_end}"
        )
        out.append(f"- kept worker RSS: {self.rss_summary}")
        out.append(
            "- commit stalls (longest per partition, while it had events behind its commit): "
            + ("; ".join(s.describe() for s in self.stalls) or "none")
        )
        out.append(f"- commits that moved back: {len(self.regressions)}")
        out.append(f"- failed commit readings: {count_line(self.watch_failures)}")
        own = [
            f"worker {e.slot} exit {e.code}: {e.reason or '(no reason logged)'}"
            for e in self.own_exits
        ]
        out.append(f"- workers that exited on their own (started again): {len(own)}")
        out += [f"  - {line}" for line in own[:20]]
        kills = [f"worker {e.slot}: /livez said {e.reason}" for e in self.liveness_kills]
        out.append(f"- workers killed by the liveness probe (started again): {len(kills)}")
        out += [f"  - {line}" for line in kills[:20]]
        hung = [f"worker {e.slot} ({e.how}): {e.reason}" for e in self.hung]
        out.append(f"- workers that did not stop on SIGTERM (killed): {len(hung)}")
        out += [f"  - {line}" for line in hung[:20]]
        ended = collections.Counter(f"{e.how} exit {e.code}" for e in self.exits)
        out.append(f"- worker exits by cause: {count_line(ended)}")
        if self.duplicate_lines:
            out.append(f"- duplicated offsets ({len(self.duplicate_lines)}), each outcome by when:")
            out += [f"  - {line}" for line in self.duplicate_lines[:30]]
            out += [f"  - {line}" for line in self.duplicate_sources[:60]]
        if self.publish_errors:
            out.append(f"- publish errors: {'; '.join(self.publish_errors[:5])}")
        out.append("- faults, in order:")
        out += [f"  - {i.at_s:6.1f} s {i.kind}: {i.detail}" for i in self.timeline]
        if self.problems:
            out.append("- problems:")
            out += [f"  - {p}" for p in self.problems[:40]]
        return "\n".join(out) + "\n"


def first_outcomes(outcomes: Sequence[Outcome]) -> dict[Coord, Outcome]:
    """Each input offset's earliest outcome (by the time the worker produced it)."""
    first: dict[Coord, Outcome] = {}
    for outcome in outcomes:
        seen = first.get(outcome.coord)
        if seen is None or outcome.timestamp_ms < seen.timestamp_ms:
            first[outcome.coord] = outcome
    return first


def _clock(ms: int) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


def duplicates(outcomes: Sequence[Outcome]) -> list[str]:
    """ "2@117 (n000693): result 04:51:02.123Z, result 04:51:40.456Z" for each duplicate."""
    by_coord: dict[Coord, list[Outcome]] = collections.defaultdict(list)
    for outcome in outcomes:
        by_coord[outcome.coord].append(outcome)
    return [
        f"{p}@{o} ({copies[0].event_id}): "
        + ", ".join(f"{c.kind} {_clock(c.timestamp_ms)}" for c in copies)
        for (p, o), copies in sorted(by_coord.items())
        if len(copies) > 1
    ]


def rss_slope(sampler: RssSampler, minutes: float) -> str:
    if minutes < RSS_MIN_MINUTES:
        return f"n/a (<{RSS_MIN_MINUTES:g} min)"
    slope = slope_mib_per_min(sampler.last_half())
    if slope is None:
        pids = len({s.pid for s in sampler.samples})
        return f"n/a (kept worker restarted: {pids} processes, none long-lived)"
    return f"{slope:+.2f}"


def account(
    *,
    mode: str,
    minutes: float,
    seed: int,
    input_topic: str,
    published: Mapping[Coord, Published],
    outcomes: list[Outcome],
    faults: Sequence[Fault],
    timeline: list[Injected],
    exits: list[Exit],
    stalls: list[Stall],
    regressions: list[str],
    rss: RssSampler,
    committed_at_end: bool,
    publish_errors: list[str],
    watch_failures: collections.Counter[str] | None = None,
) -> SoakReport:
    sent = {coord: p.sent for coord, p in published.items()}
    checked = tally(f"soak {mode}", input_topic, sent, outcomes, faults)
    problems = list(checked.problems)
    kinds = collections.Counter(o.error_kind or "?" for o in outcomes if o.kind == "dead letter")
    wrong_kind = 0
    latencies = []
    for coord, outcome in first_outcomes(outcomes).items():
        record = published.get(coord)
        if record is None:
            continue
        if record.expected_kind is None:
            if outcome.kind == "result":
                latencies.append((outcome.timestamp_ms - record.at_ms) / 1000)
        elif outcome.kind == "dead letter" and outcome.error_kind != record.expected_kind:
            wrong_kind += 1
            problems.append(
                f"{record.category} event at {coord[0]}@{coord[1]}: dead letter "
                f"{outcome.error_kind}, expected {record.expected_kind}"
            )
    latency = (
        (percentile(latencies, 0.5), percentile(latencies, 0.99), max(latencies))
        if latencies
        else None
    )
    report = SoakReport(
        # Any duplicate is a violation in exactly_once mode: name each one.
        duplicate_lines=duplicates(outcomes) if mode == "exactly_once" else [],
        mode=mode,
        minutes=minutes,
        seed=seed,
        faults=collections.Counter(i.kind for i in timeline),
        tally=checked,
        published=collections.Counter(p.category for p in published.values()),
        dead_letter_kinds=kinds,
        wrong_kind=wrong_kind,
        latency_s=latency,
        stalls=stalls,
        own_exits=[e for e in exits if e.how == "own"],
        liveness_kills=[e for e in exits if e.how == "liveness"],
        regressions=regressions,
        rss_slope=rss_slope(rss, minutes),
        rss_summary=rss.summary(),
        committed_at_end=committed_at_end,
        publish_errors=publish_errors,
        watch_failures=watch_failures or collections.Counter(),
        timeline=timeline,
        exits=exits,
        problems=problems + regressions,
    )
    SOAK_REPORTS.append(report)
    return report


def write_markdown(reports: Sequence[SoakReport], target: Path) -> str:
    text = (
        "# Chaos soak\n\n"
        + SoakReport.table(reports)
        + "\n\n"
        + "\n".join(r.details() for r in reports)
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    return text
