"""Check a LLaVA checkpoint folder, then load its model and processor from local files only."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch

from consumer.config import ConfigError, ModelSettings

logger = logging.getLogger(__name__)
log = structlog.get_logger("consumer.engine.loader")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Any one of these sets is enough for AutoTokenizer to build a tokenizer.
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# `model.dtype = "auto"` on a GPU: float32 for a checkpoint with fewer parameters than this
# (all of them: the dtype applies to the vision tower and projector too), else bfloat16.
# float32 runs without tensor cores (~67 TFLOPS dense on an H100/H200, ~990 in bf16), and a
# face costs ~2 FLOPs per parameter per token over ~600 tokens (577 vision, ~600 text for
# LLaVA-1.5): at 100M parameters float32's ceiling is still ~500 faces/s, 6x the 80 faces/s
# target, while at 1B it would be ~50. Below it the GPU is bound by kernel launches, not
# arithmetic, so float32 costs little and scores as the CPU's float32 reference does.
SMALL_MODEL_PARAMETERS = 100_000_000


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


def choose_dtype(
    name: str, device: torch.device, parameters: int | None
) -> tuple[torch.dtype, str]:
    """(dtype, why) for model.dtype `name` on `device` for a model of `parameters` weights.

    'auto': float32 on the CPU (half precision there is slow and lossy); on a GPU float32
    below SMALL_MODEL_PARAMETERS, else bfloat16 (also when the size is unknown: None).
    """
    if name != "auto":
        return _DTYPES[name], f'model.dtype = "{name}"'
    if device.type != "cuda":
        return torch.float32, f"auto on {device.type}: half precision on the CPU is slow and lossy"
    if parameters is None:
        return torch.bfloat16, "auto on cuda, model size unknown: bfloat16"
    size = f"{parameters / 1e6:.1f}M parameters"
    limit = f"{SMALL_MODEL_PARAMETERS / 1e6:.0f}M"
    if parameters < SMALL_MODEL_PARAMETERS:
        return torch.float32, (
            f"auto on cuda: {size} < {limit}, so float32 costs little and matches the CPU's "
            "float32 scores"
        )
    return torch.bfloat16, (
        f"auto on cuda: {size} >= {limit}, so bfloat16 (tensor cores, half the memory)"
    )


def resolve_dtype(name: str, device: torch.device, parameters: int | None = None) -> torch.dtype:
    """The dtype of choose_dtype, without the reason."""
    return choose_dtype(name, device, parameters)[0]


def checkpoint_parameters(path: Path) -> int | None:
    """How many weights the folder's *.safetensors files hold, from their headers only;
    None if a header cannot be read (from_pretrained then names the broken file)."""
    from safetensors import SafetensorError, safe_open

    total = 0
    try:
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as weights:
                for key in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    total += math.prod(weights.get_slice(key).get_shape())
    except (OSError, ValueError, SafetensorError):
        return None
    return total


def _placement(device: torch.device) -> dict[str, Any]:
    """from_pretrained's arguments that load the weights straight onto `device`.

    device_map={"": device} makes transformers materialise each tensor on the device as it
    reads it from the memory-mapped safetensors: no full copy in host memory first, as
    from_pretrained() then .to(device) makes. (On the CPU the result is the same model.)
    transformers needs `accelerate` for a device_map; without it, load on the CPU and move.
    """
    from transformers.utils.import_utils import is_accelerate_available

    return {"device_map": {"": device}} if is_accelerate_available() else {}


def load_checkpoint(settings: ModelSettings) -> LoadedCheckpoint:
    """Validate settings.path, then load model and processor without network or remote code."""
    path = settings.path.expanduser().resolve()
    validate_checkpoint(path)
    device = resolve_device(settings.device)
    parameters = checkpoint_parameters(path) if settings.dtype == "auto" else None
    dtype, dtype_reason = choose_dtype(settings.dtype, device, parameters)
    log.info(
        "dtype chosen",
        requested=settings.dtype,
        dtype=str(dtype).removeprefix("torch."),
        device=str(device),
        parameters=parameters,
        reason=dtype_reason,
    )
    placement = _placement(device)
    import transformers
    from safetensors import SafetensorError

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
            **placement,
        )
        processor = processor_class.from_pretrained(
            path, local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        # SafetensorError: a truncated or corrupt weights file.
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
    if not placement:
        model.to(device)
    model.eval()
    logger.info(
        "loaded %s on %s as %s (%s)",
        path,
        device,
        dtype,
        "straight onto the device" if placement else "via host memory: no accelerate",
    )
    return LoadedCheckpoint(model=model, processor=processor, device=device, dtype=dtype, path=path)
