"""`emotion-worker train` (being built)."""

from __future__ import annotations


def main(argv: list[str]) -> int:
    """Entry point of `emotion-worker train`; returns the exit code."""
    raise SystemExit("emotion-worker train: not built yet")
