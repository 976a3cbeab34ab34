"""Writes the JSON Schema files next to this module: `python -m schemas.export`.

Each file names its draft (`$schema`) and its identity (`$id`, with the format's
version), so a registry or a validator can tell versions apart. Older versions of a
format stay beside the current one as `<name>.v<N>.schema.json`, written by the release
that retired them and never again: their readers need them unchanged.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from schemas.dead_letter import DeadLetterHeaders
from schemas.events import FrameEvent
from schemas.results import EmotionResult
from schemas.summary import WindowSummary

SCHEMA_DIR = Path(__file__).resolve().parent
MODELS: dict[str, type[BaseModel]] = {
    "frame_event": FrameEvent,
    "emotion_result": EmotionResult,
    "dead_letter": DeadLetterHeaders,
    "window_summary": WindowSummary,
}
# The version of each format now.
VERSIONS = {"frame_event": 1, "emotion_result": 2, "dead_letter": 2, "window_summary": 1}
DRAFT = "https://json-schema.org/draft/2020-12/schema"


def schema_id(name: str, version: int) -> str:
    return f"urn:emotion-worker:schema:{name}:v{version}"


def render(name: str) -> str:
    """The JSON Schema text of one format, stable across runs."""
    schema = {
        "$schema": DRAFT,
        "$id": schema_id(name, VERSIONS[name]),
        **MODELS[name].model_json_schema(),
    }
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def schema_path(name: str) -> Path:
    return SCHEMA_DIR / f"{name}.schema.json"


def main() -> int:
    for name in MODELS:
        schema_path(name).write_text(render(name), encoding="utf-8")
        print(f"wrote {schema_path(name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
