"""A tiny, randomly initialised LLaVA checkpoint for tests and local runs without real weights.

The folder has exactly the layout of a Hugging Face LLaVA checkpoint (config.json,
model.safetensors, tokenizer.json, preprocessor_config.json, processor_config.json), so the
engine loads it through the same code path as a real model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from consumer.config import DEFAULT_PROMPT, FER_LABELS

# Written last: a folder without it is half-written and gets rebuilt.
MARKER = ".tiny-llava-complete.json"
PATCH_SIZE = 8
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN)
# Far above the usual 0.02: with tiny random weights and the default range every label gets
# ~1/7, which would make the score tests pass even if the engine read the wrong position.
INIT_RANGE = 0.3

_README = """# tiny-llava (random weights)

A randomly initialised, tiny LlavaForConditionalGeneration written by
`consumer.engine.make_tiny_checkpoint` (seed {seed}, image size {image_size}).
Its answers are noise: it exists only so tests and local runs can exercise the
real loading and scoring code without downloading a model. Do not deploy it.
"""


def make_tiny_checkpoint(
    path: Path,
    *,
    seed: int = 0,
    image_size: int = 32,
    labels: Sequence[str] = FER_LABELS,
    prompt: str = DEFAULT_PROMPT,
) -> Path:
    """Write a tiny random LLaVA checkpoint into `path` (unless already there) and return it."""
    path = Path(path)
    params = _params(seed, image_size, labels, prompt)
    if _is_complete(path, params):
        return path
    if image_size % PATCH_SIZE:
        raise ValueError(f"image_size must be a multiple of {PATCH_SIZE}, got {image_size}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target and move it in whole, so a crash or a concurrent writer
    # never leaves a folder that looks complete but is not.
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        _write(staging, params)
        _publish(staging, path, params)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _params(seed: int, image_size: int, labels: Sequence[str], prompt: str) -> dict[str, Any]:
    return {"seed": seed, "image_size": image_size, "labels": list(labels), "prompt": prompt}


def _is_complete(path: Path, params: dict[str, Any]) -> bool:
    try:
        written = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(written == params)


def _publish(staging: Path, path: Path, params: dict[str, Any]) -> None:
    """Move the finished files from `staging` into `path`, the marker last."""
    marker = staging / MARKER
    marker.write_text(json.dumps(params, indent=2), encoding="utf-8")
    if not path.exists():
        try:
            os.rename(staging, path)
            return
        except OSError:
            if _is_complete(path, params):  # another process won the race
                return
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).unlink(missing_ok=True)
    for item in sorted(staging.iterdir()):
        if item.name != MARKER:
            os.replace(item, path / item.name)
    os.replace(marker, path / MARKER)


def _vocabulary(labels: Sequence[str], prompt: str) -> list[str]:
    """Special tokens, then every word and punctuation run of the prompt and the labels."""
    from tokenizers import pre_tokenizers

    splitter = pre_tokenizers.Whitespace()
    text = prompt.replace(IMAGE_TOKEN, " ").format(labels=", ".join(labels))
    pieces = [piece for piece, _ in splitter.pre_tokenize_str(text)]
    for label in labels:
        pieces.extend(piece for piece, _ in splitter.pre_tokenize_str(label))
    vocab = list(SPECIAL_TOKENS)
    for piece in pieces:
        if piece not in vocab:
            vocab.append(piece)
    return vocab


def build_tokenizer(labels: Sequence[str], prompt: str) -> Any:
    """A word-level tokenizer built offline; unknown words map to <unk>, <s> is prepended."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {token: index for index, token in enumerate(_vocabulary(labels, prompt))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    # Like Llama: a BOS token first, no EOS, so the prompt ends where the answer starts.
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer_class: Any = transformers.PreTrainedTokenizerFast  # its __init__ is untyped
    return tokenizer_class(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )


def build_processor(tokenizer: Any, image_size: int) -> Any:
    """A LlavaProcessor for `image_size` px faces around `tokenizer` (tiny and scratch models)."""
    import transformers

    image_processor = _clip_image_processor_class()(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        do_convert_rgb=True,
    )
    # num_additional_image_tokens=1 counts CLIP's CLS token; "default" then drops it again.
    processor_class: Any = transformers.LlavaProcessor  # its __init__ is untyped
    return processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
    )


def _clip_image_processor_class() -> Any:
    """The PIL CLIP image processor when torchvision is missing (silences a fallback warning).

    Both save as "CLIPImageProcessor", so the written folder is the same either way.
    """
    import importlib.util

    import transformers

    if importlib.util.find_spec("torchvision") is None:
        return transformers.CLIPImageProcessorPil
    return transformers.CLIPImageProcessor


def llava_config(
    tokenizer: Any,
    *,
    image_size: int,
    patch_size: int,
    vision: tuple[int, int, int, int],
    text: tuple[int, int, int, int],
    vision_feature_layer: int,
    initializer_range: float = 0.02,
    max_positions: int = 512,
) -> Any:
    """A LlavaConfig of a CLIP ViT and a Llama decoder sized for `tokenizer`.

    `vision` and `text` are (hidden, layers, heads, MLP width). Shared by the tiny random
    checkpoint and the trainer's from-scratch models, so both are built the same way.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision_hidden, vision_layers, vision_heads, vision_mlp = vision
    text_hidden, text_layers, text_heads, text_mlp = text
    return LlavaConfig(
        vision_config=CLIPVisionConfig(
            image_size=image_size,
            patch_size=patch_size,
            hidden_size=vision_hidden,
            intermediate_size=vision_mlp,
            num_hidden_layers=vision_layers,
            num_attention_heads=vision_heads,
            projection_dim=vision_hidden,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_hidden,
            intermediate_size=text_mlp,
            num_hidden_layers=text_layers,
            num_attention_heads=text_heads,
            num_key_value_heads=text_heads,
            max_position_embeddings=max_positions,
            initializer_range=initializer_range,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def _build_model(tokenizer: Any, image_size: int, seed: int) -> Any:
    import torch
    from transformers import LlavaForConditionalGeneration

    config = llava_config(
        tokenizer,
        image_size=image_size,
        patch_size=PATCH_SIZE,
        vision=(32, 2, 2, 64),
        text=(64, 2, 4, 128),
        vision_feature_layer=-2,
        initializer_range=INIT_RANGE,
    )
    torch.manual_seed(seed)
    model: Any = LlavaForConditionalGeneration(config)
    return model.eval()


def _write(folder: Path, params: dict[str, Any]) -> None:
    """Save model, tokenizer, image processor and processor into `folder`."""
    tokenizer = build_tokenizer(params["labels"], params["prompt"])
    processor = build_processor(tokenizer, params["image_size"])
    model = _build_model(tokenizer, params["image_size"], params["seed"])
    model.save_pretrained(folder, safe_serialization=True)
    # Real LLaVA checkpoints carry preprocessor_config.json next to processor_config.json.
    processor.image_processor.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "README.md").write_text(
        _README.format(seed=params["seed"], image_size=params["image_size"]), encoding="utf-8"
    )
