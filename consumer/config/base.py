"""What every settings section shares."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # Frozen: the settings are read from many threads and processes once loaded. Extra
    # keys are refused: a misspelt setting must be an error, not silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)
