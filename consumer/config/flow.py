"""Back-pressure (how much work may be in flight) and the graceful shutdown's budget."""

from __future__ import annotations

from pydantic import Field, model_validator

from consumer.config.base import Section


class FlowSettings(Section):
    """Back-pressure (how much work may be in flight) and graceful shutdown."""

    # Polling goes on while the partitions are paused, so the worker stays in its group.
    max_in_flight: int = Field(
        default=256,
        ge=1,
        description="The partitions are paused above this many events in flight.",
    )
    resume_below: int = Field(
        default=128,
        ge=0,
        description=(
            "Paused partitions resume below this many events in flight (and below half of "
            "`flow.max_in_flight_bytes`); must be lower than `flow.max_in_flight`."
        ),
    )
    max_in_flight_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1024,
        description=(
            "The partitions are also paused above this many bytes of event payloads and "
            "decoded faces in flight (default 256 MiB)."
        ),
    )
    drain_timeout_s: float = Field(
        default=20.0,
        ge=0,
        description=(
            "Graceful shutdown budget: how long in-flight events may take to finish, in seconds."
        ),
    )
    max_event_bytes: int = Field(
        default=64 * 1024,
        ge=256,
        description="Larger events (in bytes) are dead letters (default 64 KiB).",
    )

    @model_validator(mode="after")
    def _check_marks(self) -> FlowSettings:
        if self.resume_below >= self.max_in_flight:
            raise ValueError(
                f"flow.resume_below ({self.resume_below}) must be lower than "
                f"flow.max_in_flight ({self.max_in_flight})"
            )
        return self
