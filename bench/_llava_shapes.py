"""LLaVA-1.5-7B-shaped models with random weights, built on the device, and their FLOP count.

No weights are downloaded or written: the checkpoint folder holds only config.json and the
tokenizer/processor files (borrowed from the tiny checkpoint and re-sized to 336 px, patch 14),
and the model is instantiated from that config directly on the target device.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from consumer.engine import make_tiny_checkpoint
from consumer.engine.loader import LoadedCheckpoint

IMAGE_SIZE = 336
PATCH_SIZE = 14
# Files of the tiny checkpoint that are not weights, model config or its own bookkeeping.
_SKIPPED = {"config.json", "README.md", "generation_config.json"}


@dataclass(frozen=True, slots=True)
class Shape:
    """The sizes that make a LLaVA-1.5 variant (vision tower, then language model)."""

    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    vocab: int


SHAPES: dict[str, Shape] = {
    # CLIP ViT-L/14-336 + Vicuna/Llama-7B, as in llava-hf/llava-1.5-7b-hf.
    "llava-7b": Shape(1024, 24, 16, 4096, 4096, 32, 32, 11008, 32064),
    # Same image geometry (576 image tokens) and vocabulary, tiny widths: runs on a laptop
    # CPU and executes every code path of the full shape.
    "llava-7b-mini": Shape(64, 2, 2, 128, 128, 2, 4, 256, 32064),
}


def llava_config(shape: Shape, tokenizer_ids: dict[str, int]) -> Any:
    """A LlavaConfig of `shape` whose special token ids are those of the tiny tokenizer."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=shape.vision_hidden,
        intermediate_size=shape.vision_intermediate,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=768,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    text = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.text_hidden,
        intermediate_size=shape.text_intermediate,
        num_hidden_layers=shape.text_layers,
        num_attention_heads=shape.text_heads,
        num_key_value_heads=shape.text_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer_ids["bos"],
        eos_token_id=tokenizer_ids["eos"],
        pad_token_id=tokenizer_ids["pad"],
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer_ids["image"],
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def write_shape_folder(folder: Path, shape: Shape) -> Path:
    """Write config.json + tokenizer + 336 px processor configs (no weights) into `folder`."""
    source = make_tiny_checkpoint(folder.parent / f"{folder.name}-tokenizer-source")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for item in source.iterdir():
        # Everything but weights, the tiny model's own config and dot-files (its marker).
        wanted = item.suffix != ".safetensors" and item.name not in _SKIPPED
        if item.is_file() and wanted and not item.name.startswith("."):
            shutil.copy2(item, folder / item.name)
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = folder / name
        if path.exists():
            data = json.loads(path.read_text(encoding="utf-8"))
            path.write_text(json.dumps(_resized(data), indent=2), encoding="utf-8")
    tokenizer_config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    text = tokenizer_config["text_config"]
    ids = {
        "bos": text["bos_token_id"],
        "eos": text["eos_token_id"],
        "pad": text["pad_token_id"],
        # The processor expands the tokenizer's <image> id; the model must look for the same id.
        "image": tokenizer_config["image_token_index"],
    }
    llava_config(shape, ids).save_pretrained(folder)
    return folder


def _resized(data: Any) -> Any:
    """The processor JSON with every size set to 336 px and the patch size to 14."""
    if isinstance(data, list):
        return [_resized(item) for item in data]
    if not isinstance(data, dict):
        return data
    out = {key: _resized(value) for key, value in data.items()}
    if "size" in out:
        out["size"] = {"shortest_edge": IMAGE_SIZE}
    if "crop_size" in out:
        out["crop_size"] = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    if "patch_size" in out:
        out["patch_size"] = PATCH_SIZE
    return out


def build_random_checkpoint(folder: Path, device: torch.device, dtype: torch.dtype) -> Any:
    """Instantiate the model of `folder`'s config on `device` with random weights."""
    import transformers

    # transformers' own annotations are partial; treat its entry points as untyped.
    model_class: Any = transformers.LlavaForConditionalGeneration
    processor_class: Any = transformers.AutoProcessor
    config = transformers.LlavaConfig.from_pretrained(folder, local_files_only=True)
    processor = processor_class.from_pretrained(folder, local_files_only=True)
    torch.manual_seed(0)
    # Allocating and initialising under the device context puts every weight straight on
    # the GPU: no 14 GB CPU copy, and the random init runs as GPU kernels (seconds).
    # _from_config(dtype=) sets the default dtype during init, so buffers that HF keeps in
    # float32 (rotary inv_freq) stay float32; a later .to(dtype) would round them.
    with torch.device(device):
        try:
            model: Any = model_class._from_config(config, dtype=dtype)
        except TypeError:  # a transformers release that still spells it torch_dtype
            model = model_class._from_config(config, torch_dtype=dtype)
    model = model.to(device).eval()
    return LoadedCheckpoint(
        model=model, processor=processor, device=device, dtype=dtype, path=folder
    )


def count_params(model: Any) -> int:
    """All parameters of the model."""
    return sum(int(parameter.numel()) for parameter in model.parameters())


def params_text(params: int) -> str:
    """7.063B or 0.12M."""
    return f"{params / 1e9:.3f}B" if params >= 1e8 else f"{params / 1e6:.2f}M"


def prompt_flops(checkpoint: Any, prompt_text: str) -> tuple[int, int, float]:
    """(sequence length, image tokens, FLOPs per image) of the engine's prompt."""
    from PIL import Image

    config = checkpoint.model.config
    # Any size gives the same ids: the image processor resizes before counting patches.
    dummy = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE))
    encoded = checkpoint.processor(text=prompt_text, images=dummy, return_tensors="pt")
    ids = encoded["input_ids"]
    image_id = getattr(config, "image_token_id", None) or config.image_token_index
    sequence, image_tokens = int(ids.shape[1]), int((ids == image_id).sum())
    return sequence, image_tokens, flops_per_image(config, sequence, image_tokens)


def flops_per_image(config: Any, sequence: int, image_tokens: int) -> float:
    """Forward FLOPs of one face: vision tower (up to the layer LLaVA reads) + projector +
    LM over the whole prompt; the same useful work for every variant.

    2 FLOPs per weight per token for every matmul; attention scores and values add
    4*s^2*d per layer (half of that for the causal LM). The LM head runs on the last
    position only (the engine asks for logits_to_keep=1). Embedding lookups are free.
    """
    vision, text = config.vision_config, config.text_config
    patches = (vision.image_size // vision.patch_size) ** 2
    tokens = patches + 1  # CLIP's class token
    width = vision.hidden_size
    vision_layer = 4 * width * width + 2 * width * vision.intermediate_size
    vision_flops = _vision_layers_used(config) * (2 * vision_layer * tokens + 4 * tokens**2 * width)
    vision_flops += 2 * 3 * vision.patch_size**2 * width * patches  # patch embedding conv
    hidden = text.hidden_size
    projector = 2 * (width * hidden + hidden * hidden) * image_tokens
    head_dim = getattr(text, "head_dim", None) or hidden // text.num_attention_heads
    kv_width = text.num_key_value_heads * head_dim
    text_layer = 2 * hidden * hidden + 2 * hidden * kv_width + 3 * hidden * text.intermediate_size
    language = text.num_hidden_layers * (2 * text_layer * sequence + 2 * sequence**2 * hidden)
    head = 2 * hidden * text.vocab_size
    return float(vision_flops + projector + language + head)


def _vision_layers_used(config: Any) -> int:
    """Layers up to the one LLaVA reads (23 of 24 for -2): the rest is wasted work."""
    total = int(config.vision_config.num_hidden_layers)
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        return total
    return max(1, min(total, layer if layer >= 0 else total + 1 + layer))


def meta_param_count(shape: Shape) -> int:
    """Parameters of `shape` without allocating it (for the printout of a mini run)."""
    import transformers

    model_class: Any = transformers.LlavaForConditionalGeneration
    config = llava_config(shape, {"bos": 1, "eos": 2, "pad": 3, "image": 4})
    with torch.device("meta"):
        model = model_class._from_config(config, dtype=torch.bfloat16)
    return count_params(model)
