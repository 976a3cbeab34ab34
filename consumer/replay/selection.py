"""Which dead letters a replay republishes: their kinds, their age, and what was done before."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal, get_args

from consumer.config import ConfigError
from schemas import TRANSIENT_KINDS, DeadLetter, ErrorKind

KINDS: tuple[str, ...] = get_args(ErrorKind)

# What became of one dead letter in a replay (a column of the report).
Verdict = Literal[
    "replayed",  # republished to the input topic (or would be, with --dry-run)
    "not_chosen",  # its kind was not selected (a permanent kind that was not named)
    "before_since",  # failed before --since: passed over for good
    "no_payload",  # written with dead_letter.include_payload = false: nothing to replay
    "replayed_before",  # an earlier replay of its kind already republished it
    "unreadable",  # not a dead letter of this worker (missing or bad emotion.* headers)
]
VERDICTS: tuple[Verdict, ...] = get_args(Verdict)

_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_kinds(names: Iterable[str] | None) -> tuple[ErrorKind, ...]:
    """The kinds given with --kind (repeated or comma-separated); none given: the transient
    ones. A misspelt kind is an error naming the valid ones."""
    chosen = [part.strip() for name in names or () for part in name.split(",") if part.strip()]
    if not chosen:
        return TRANSIENT_KINDS
    unknown = sorted(set(chosen) - set(KINDS))
    if unknown:
        raise ConfigError(
            f"--kind {', '.join(unknown)} is not an error kind; use one of {', '.join(KINDS)}"
        )
    return tuple(kind for kind in KINDS if kind in chosen)  # type: ignore[misc]


def parse_since(text: str | None, now: datetime) -> datetime | None:
    """--since: an ISO 8601 time with a zone (2026-12-01T08:00:00Z) or an age (90m, 6h, 2d)."""
    if text is None:
        return None
    age = _DURATION.match(text.strip())
    if age:
        return now - timedelta(seconds=int(age.group(1)) * _UNIT_S[age.group(2)])
    try:
        since = datetime.fromisoformat(text.strip())
    except ValueError:
        since = None
    if since is None or since.tzinfo is None:
        raise ConfigError(
            f"--since {text!r} is neither a time with a zone (2026-12-01T08:00:00Z) nor an "
            "age (90m, 6h, 2d); give one of those"
        )
    return since.astimezone(UTC)


@dataclass(frozen=True)
class Selection:
    """The kinds to replay, the oldest failure to replay, and each kind's progress: per
    partition of the dead-letter topic, the offset below which earlier replays of that
    kind handled every letter (the kind's consumer group's committed offset)."""

    kinds: tuple[ErrorKind, ...]
    since: datetime | None
    progress: Mapping[str, Mapping[int, int]]

    def verdict(self, letter: DeadLetter | None, partition: int, offset: int) -> Verdict:
        if letter is None:
            return "unreadable"
        if letter.error_kind not in self.kinds:
            return "not_chosen"
        if offset < self.progress.get(letter.error_kind, {}).get(partition, 0):
            return "replayed_before"
        if self.since is not None and letter.failed_at < self.since:
            return "before_since"
        if letter.payload == "omitted":
            return "no_payload"
        return "replayed"

    def start(self, partition: int, low: int) -> int:
        """Where reading a partition begins: the least progress of the chosen kinds."""
        return max(low, min(self.progress.get(k, {}).get(partition, 0) for k in self.kinds))
