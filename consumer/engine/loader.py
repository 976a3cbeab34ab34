"""Check a LLaVA checkpoint folder, then load its model and processor from local files only."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from consumer.config import ConfigError, ModelSettings

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Any one of these sets is enough for AutoTokenizer to build a tokenizer.
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ConfigError):
    """The model folder or its settings cannot be used; the message names the path and the fix."""


@dataclass(frozen=True, slots=True)
class LoadedCheckpoint:
    """A model in eval mode on its device, with the processor that belongs to it."""

    model: Any  # LlavaForConditionalGeneration
    processor: Any  # LlavaProcessor
    device: torch.device
    dtype: torch.dtype
    path: Path


def validate_checkpoint(path: Path) -> None:
    """Raise ModelLoadError unless `path` looks like a complete Hugging Face LLaVA checkpoint."""
    where = f"model.path {path}"
    if not path.exists():
        raise ModelLoadError(
            f"{where} does not exist; set model.path (EMOTION_WORKER_MODEL__PATH) to the "
            "folder of a Hugging Face LLaVA checkpoint"
        )
    if not path.is_dir():
        raise ModelLoadError(f"{where} is a file; point model.path at the checkpoint folder")
    _check_config(path)
    _check_weights(path)
    files = {item.name for item in path.iterdir()}
    if not any(all(name in files for name in group) for group in TOKENIZER_FILE_SETS):
        raise ModelLoadError(
            f"{where} has no tokenizer files (tokenizer.json, tokenizer.model or "
            "vocab.json + merges.txt); save the tokenizer into it with "
            "processor.save_pretrained(path)"
        )
    if not any(name in files for name in PROCESSOR_FILES):
        raise ModelLoadError(
            f"{where} has neither preprocessor_config.json nor processor_config.json; save the "
            "LlavaProcessor into it with processor.save_pretrained(path)"
        )


def _check_config(path: Path) -> None:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(
            f"model.path {path} has no config.json; it is not a Hugging Face checkpoint folder "
            "(save the model with model.save_pretrained(path))"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{config_file} is not readable JSON ({exc}); re-save the model"
        ) from exc
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "llava":
        raise ModelLoadError(
            f"{config_file} has model_type {model_type!r}, expected 'llava'; point model.path at "
            "a LlavaForConditionalGeneration checkpoint (e.g. one converted from llava-hf)"
        )


def _check_weights(path: Path) -> None:
    if any(path.glob("*.safetensors")):
        return
    pickled = sorted(item.name for item in path.iterdir() if item.suffix in PICKLE_SUFFIXES)
    if pickled:
        # Unpickling runs arbitrary code from the file, so such weights are never loaded.
        raise ModelLoadError(
            f"model.path {path} holds only pickled weights ({', '.join(pickled)}), which are "
            "refused because unpickling can run code; convert to safetensors, e.g. "
            "model.save_pretrained(path, safe_serialization=True)"
        )
    raise ModelLoadError(
        f"model.path {path} has no *.safetensors weights; copy the model's safetensors "
        "files into it"
    )


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; refuse 'cuda' without a GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            "model.device is 'cuda' but no CUDA GPU is visible; set model.device to 'auto' or 'cpu'"
        )
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on cuda, float32 on cpu (half precision on CPU is slow and lossy)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def load_checkpoint(settings: ModelSettings) -> LoadedCheckpoint:
    """Validate settings.path, then load model and processor without network or remote code."""
    path = settings.path.expanduser().resolve()
    validate_checkpoint(path)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    import transformers

    # transformers' own annotations are partial; treat its entry points as untyped.
    model_class: Any = transformers.LlavaForConditionalGeneration
    processor_class: Any = transformers.AutoProcessor
    try:
        model, info = model_class.from_pretrained(
            path,
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=False,
            dtype=dtype,
            output_loading_info=True,
        )
        processor = processor_class.from_pretrained(
            path, local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"model.path {path} could not be loaded: {exc}") from exc
    # from_pretrained fills missing or mis-shaped weights with random values and only warns;
    # a worker would then publish noise, so treat that as a broken checkpoint.
    broken = sorted(info.get("missing_keys", ())) + sorted(
        str(key) for key in info.get("mismatched_keys", ())
    )
    if broken:
        shown = ", ".join(broken[:5]) + (" ..." if len(broken) > 5 else "")
        raise ModelLoadError(
            f"model.path {path} lacks weights for {len(broken)} parameters ({shown}); "
            "the safetensors files are incomplete or belong to another model"
        )
    for attribute in ("image_processor", "tokenizer"):
        if getattr(processor, attribute, None) is None:
            raise ModelLoadError(
                f"model.path {path}: the processor has no {attribute}; re-save the "
                "LlavaProcessor with processor.save_pretrained(path)"
            )
    model.to(device)
    model.eval()
    logger.info("loaded %s on %s as %s", path, device, dtype)
    return LoadedCheckpoint(model=model, processor=processor, device=device, dtype=dtype, path=path)
