"""`emotion-worker eval` (being built)."""

from __future__ import annotations


def main(argv: list[str]) -> int:
    """Entry point of `emotion-worker eval`; returns the exit code."""
    raise SystemExit("emotion-worker eval: not built yet")
