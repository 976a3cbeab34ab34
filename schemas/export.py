"""Writes the JSON Schema files next to this module: `python -m schemas.export`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from schemas.dead_letter import DeadLetterHeaders
from schemas.events import FrameEvent
from schemas.results import EmotionResult

SCHEMA_DIR = Path(__file__).resolve().parent
MODELS: dict[str, type[BaseModel]] = {
    "frame_event": FrameEvent,
    "emotion_result": EmotionResult,
    "dead_letter": DeadLetterHeaders,
}


def render(model: type[BaseModel]) -> str:
    """The JSON Schema text of one model, stable across runs."""
    return json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n"


def schema_path(name: str) -> Path:
    return SCHEMA_DIR / f"{name}.schema.json"


def main() -> int:
    for name, model in MODELS.items():
        schema_path(name).write_text(render(model), encoding="utf-8")
        print(f"wrote {schema_path(name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
