"""The engine variants the LLaVA bench measures, and the ModelSettings of each.

A variant is one entry of VARIANTS: the settings it differs by, its quantization and what it
needs. Adding one there makes it a `--variants` choice, a row of the table (after the
others, before `compiled`) and a bench/gpu_check.sh row.

Quantization is named as `model.precision` names it (0.3.0+: bf16, fp8, int8, auto). An
engine older than that setting has only `model.fp8: bool`; the bench maps bf16/fp8 onto it
and skips the variants it cannot express, so it runs against either.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from consumer.config import ModelSettings

ENGINE_SOURCES = Path(__file__).resolve().parent.parent / "consumer" / "engine"


@dataclass(frozen=True)
class Variant:
    settings: dict[str, Any] = field(default_factory=dict)  # besides the quantization
    precision: str = "bf16"  # model.precision; bf16 = no quantization (float32 on a CPU)
    about: str | None = None  # the one setting the variant is about (None: the baseline)
    min_capability: tuple[int, int] | None = None  # CUDA compute capability it needs
    cpu: str | None = None  # why it does not run on a CPU by default (None: it does)


_DEVICE = {"preprocess": "device", "compile": "off"}
VARIANTS: dict[str, Variant] = {
    "eager": Variant(_DEVICE),
    "processor-preprocess": Variant(
        {"preprocess": "processor", "compile": "off"}, about="preprocess"
    ),
    "fp8": Variant(
        _DEVICE,
        precision="fp8",
        about="precision",
        min_capability=(8, 9),
        cpu="needs a CUDA GPU of compute capability 8.9+",
    ),
    "int8": Variant(_DEVICE, precision="int8", about="precision"),
    "precision-auto": Variant(
        _DEVICE,
        precision="auto",
        about="precision",
        cpu="on a CPU model.precision=auto means no quantization: the eager row",
    ),
    # Last in the plan: each of its rows compiles (tens of seconds for a 7B shape).
    "compiled": Variant(
        {"preprocess": "device", "compile": "on"},
        about="compile",
        cpu="CUDA only by default (compiling on a CPU takes minutes); --variants forces it",
    ),
}
# What bench/gpu_check.sh runs: every way the engine can execute the model (not the
# processor-preprocess ablation); those this engine cannot express become skipped rows.
ENGINE_MODES = tuple(name for name in VARIANTS if name != "processor-preprocess")


class UnsupportedVariantError(Exception):
    """This engine's ModelSettings cannot express the variant."""


@functools.cache
def _engine_source() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(ENGINE_SOURCES.glob("*.py")))


def engine_reads(name: str) -> bool:
    """Whether the engine's code mentions settings.<name> at all (a cheap 'implemented?')."""
    return re.search(rf"settings\.{name}\b", _engine_source()) is not None


def _quantization(precision: str) -> tuple[dict[str, Any], str | None]:
    """The settings for `precision`, and the field they set (None: nothing to set)."""
    known = ModelSettings.model_fields
    if "precision" in known:
        return {"precision": precision}, "precision"
    if "fp8" in known and precision in ("bf16", "fp8"):
        return {"fp8": precision == "fp8"}, "fp8"
    if precision == "bf16":
        return {}, None
    raise UnsupportedVariantError(f"this engine has no model.precision (so no {precision!r})")


def unsupported(name: str) -> str | None:
    """Why this engine cannot run variant `name` (None: it can)."""
    try:
        _quantization(VARIANTS[name].precision)
    except UnsupportedVariantError as exc:
        return str(exc)
    return None


def variant_settings(base: dict[str, Any], name: str) -> tuple[ModelSettings, list[str]]:
    """The ModelSettings of a variant, and notes on settings the code does not know yet."""
    variant = VARIANTS[name]
    quantization, quant_key = _quantization(variant.precision)
    known = ModelSettings.model_fields
    notes = [f"ModelSettings has no field {k!r}" for k in variant.settings if k not in known]
    key = quant_key if variant.about == "precision" else variant.about
    if key in known and not engine_reads(key):
        notes.append(f"engine never reads settings.{key}: this row measures eager")
    wanted = {k: v for k, v in variant.settings.items() if k in known}
    return ModelSettings(**{**base, **wanted, **quantization}), notes


def skip_reason(name: str, asked: list[str] | None, device: torch.device) -> str | None:
    """Why variant `name` does not run here (None: it runs). `asked`: --variants, if given."""
    if asked is not None and name not in asked:
        return "not in --variants"
    variant = VARIANTS[name]
    reason = unsupported(name)
    if reason is not None:
        return reason
    if device.type != "cuda":
        # --variants forces what merely is slow on a CPU; a GPU-only kernel stays skipped.
        if variant.min_capability is not None or (variant.cpu and asked is None):
            return variant.cpu
        return None
    if variant.min_capability is not None:
        capability = torch.cuda.get_device_capability(device)
        if capability < variant.min_capability:
            return f"compute capability {capability} < {variant.min_capability}"
    return None
