"""Operating the worker: the health and metrics server, the worker processes, the logs."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from consumer.config.base import Section


class HealthSettings(Section):
    """The HTTP server for metrics and probes, and when the liveness probe fails."""

    enabled: bool = Field(
        default=True,
        description="Run one HTTP server for `/metrics` (Prometheus), `/readyz` and `/livez`.",
    )
    host: str = Field(default="0.0.0.0", description="Address the HTTP server listens on.")
    port: int = Field(
        default=8080,
        ge=0,
        le=65535,
        description=(
            "Port of the HTTP server; 0: any free port (tests). Worker process i of several "
            "(`processes.devices`) uses port + i."
        ),
    )
    # The poll loop turns at least every kafka.poll_timeout_s while healthy, also while
    # paused.
    loop_stall_s: float = Field(
        default=60.0,
        gt=0,
        description="`/livez` fails when the poll loop has not turned for this long, in seconds.",
    )
    # A worker stuck without crashing must be restarted, not left "healthy".
    stall_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description=(
            "`/livez` also fails when there is consumer lag but no input offset has advanced "
            "for this long, in seconds."
        ),
    )
    statistics_interval_s: float = Field(
        default=5.0,
        gt=0,
        le=600,
        description=(
            "How often librdkafka reports statistics (consumer lag per partition), in seconds."
        ),
    )


class ProcessSettings(Section):
    """How many worker processes run, and on which devices."""

    devices: Literal["single", "auto"] | tuple[str, ...] = Field(
        default="single",
        description=(
            "`single`: this process is the worker. `auto`: a supervisor starts one worker "
            'process per visible CUDA GPU. A list (`["cuda:0", "cuda:1"]`, or `"cpu"` '
            "entries for tests): one worker process per entry. All join the same consumer "
            "group; each is pinned to its device (`CUDA_VISIBLE_DEVICES`) and serves health "
            "on `health.port` + i."
        ),
    )

    @field_validator("devices")
    @classmethod
    def _check_devices(
        cls, value: Literal["single", "auto"] | tuple[str, ...]
    ) -> Literal["single", "auto"] | tuple[str, ...]:
        if isinstance(value, tuple):
            if not value:
                raise ValueError("processes.devices is an empty list; use 'single' or 'auto'")
            for device in value:
                if not re.fullmatch(r"cpu|cuda:\d+", device):
                    raise ValueError(
                        f"processes.devices entry {device!r} must be 'cpu' or 'cuda:<index>'"
                    )
        return value


class LogSettings(Section):
    """Log output."""

    format: Literal["auto", "json", "console"] = Field(
        default="auto",
        description=(
            "`json`: one JSON object per line. `console`: human-readable. `auto`: `json` when "
            "stderr is not a terminal, else `console`."
        ),
    )
    level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="The lowest level that is logged."
    )
