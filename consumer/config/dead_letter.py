"""What a dead letter keeps of the input record."""

from __future__ import annotations

from pydantic import Field

from consumer.config.base import Section


class DeadLetterSettings(Section):
    """Dead letters: the input record as it was, plus the worker's `emotion.*` headers."""

    include_payload: bool = Field(
        default=True,
        description=(
            "Keep the input record's value in its dead letter, so that `emotion-worker "
            "replay` can republish it. A `data:` event's value holds the face itself: the "
            "dead-letter topic then holds biometric data and needs a retention "
            "(docs/operations.md). `false`: the value is left empty (header "
            "`emotion.payload: omitted`) and the letter cannot be replayed."
        ),
    )
