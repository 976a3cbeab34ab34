"""The model side of training: small LLaVA architectures, loading, saving, the answer format.

A from-scratch model is a genuine LlavaForConditionalGeneration (CLIP vision tower, MLP
projector, Llama language model) with the word-level tokenizer of `consumer.engine.tiny`,
so the worker loads it through exactly the code path of a full-size checkpoint.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (torch's convention)

from consumer.engine.loader import load_checkpoint
from consumer.engine.scoring import label_sequences

# FER-2013's pixel statistics are ~0.51 mean and ~0.26 std; round numbers keep the
# processor config readable and are as good for a model trained from scratch.
FER_MEAN = (0.5, 0.5, 0.5)
FER_STD = (0.25, 0.25, 0.25)
IGNORE_INDEX = -100  # the label value cross-entropy skips, as in Hugging Face training


@dataclass(frozen=True, slots=True)
class Arch:
    """Sizes of a from-scratch LLaVA: a CLIP ViT and a Llama decoder.

    The language model also attends over the image tokens, so its layers add to the
    vision tower's depth; it sees the ~30 prompt tokens too, which is why it is kept
    shallow. MLP widths are `*_mlp` times the hidden size.
    """

    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_mlp: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_mlp: int

    def to_json(self) -> dict[str, int]:
        """The sizes, for training_args.json."""
        return asdict(self)


ARCHS: dict[str, Arch] = {
    # The tiny test model's sizes (consumer.engine.tiny): seconds per epoch on a few
    # hundred images; for tests and smoke runs, not for accuracy.
    "tiny": Arch(8, 32, 2, 2, 2, 64, 2, 4, 2),
    # The shipped FER model. Patch 6 on 48x48 gives 64 image tokens: at equal CPU time it
    # learned as fast as patch 4 / hidden 64 (144 tokens) and keeps the language model's
    # sequence short (97 tokens), so ~330 images/s train on 2 cores (35 epochs ~ 1 hour).
    "small": Arch(6, 96, 4, 4, 2, 64, 2, 2, 2),
    # The distilled FER model (0.4.x): a deeper, wider tower, still 64 image tokens. On 2
    # CPU cores it trains at ~330 images/s alone, ~275 with the teacher alongside.
    "base": Arch(6, 128, 6, 4, 2, 64, 2, 2, 2),
    # The GPU recipe size (~1.9M parameters, 7.7 MB): ~150 images/s on 2 cores.
    "wide": Arch(6, 192, 6, 6, 2, 64, 2, 2, 2),
}


def build_scratch_model(
    arch: Arch,
    *,
    image_size: int,
    labels: Sequence[str],
    prompt: str,
    seed: int,
    image_mean: Sequence[float] = FER_MEAN,
    image_std: Sequence[float] = FER_STD,
) -> tuple[Any, Any]:
    """A randomly initialised (model, processor) pair of the given architecture.

    The vision feature layer is the last one (-1): with a tower trained for this task
    there is no reason to compute a layer the projector never reads (LLaVA-1.5's -2
    exists because CLIP's last layer is specialised to its contrastive objective).
    """
    if image_size % arch.patch_size:
        raise ValueError(
            f"--image-size {image_size} is not a multiple of the patch size {arch.patch_size}"
        )
    from consumer.engine.tiny import build_processor, build_tokenizer, llava_config

    tokenizer = build_tokenizer(labels, prompt)
    processor = build_processor(tokenizer, image_size)
    # tiny.py fixes the patch size and CLIP's ImageNet statistics; set ours on the same
    # processor (every one of these is saved into processor/preprocessor_config.json).
    processor.patch_size = arch.patch_size
    processor.image_processor.image_mean = list(image_mean)
    processor.image_processor.image_std = list(image_std)
    config = llava_config(
        tokenizer,
        image_size=image_size,
        patch_size=arch.patch_size,
        vision=(
            arch.vision_hidden,
            arch.vision_layers,
            arch.vision_heads,
            arch.vision_hidden * arch.vision_mlp,
        ),
        text=(
            arch.text_hidden,
            arch.text_layers,
            arch.text_heads,
            arch.text_hidden * arch.text_mlp,
        ),
        vision_feature_layer=-1,
        max_positions=256,
    )
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model_class: Any = LlavaForConditionalGeneration  # its __init__ is untyped
    return model_class(config), processor


def init_vision_tower(model: Any, patches: torch.Tensor, seed: int) -> None:
    """Data-aware initialisation that lets a small ViT learn from 28k faces in minutes.

    ViTs trained from scratch on small datasets sit on the class prior for epochs: nothing
    in random weights says that neighbouring pixels belong together. Three standard fixes,
    all of which only set initial values (the architecture stays plain CLIP):
    - patch embedding = PCA whitening of real image patches (the leading components of
      6x6 face patches are edge and blob detectors, what a conv stem would learn first);
    - 2D sine-cosine position embeddings (as in MAE), so patch position is known at once;
    - mimetic attention (Trockman & Kolter, 2023): W_q W_k^T ~ I and W_v W_o ~ -I per
      layer, so heads start out attending to similar, nearby patches like trained ViTs do.
    `patches` is a batch of normalised pixel values (N, 3, H, W) from the training set.
    """
    generator = torch.Generator().manual_seed(seed)
    tower = model.model.vision_tower
    config = tower.config
    with torch.no_grad():
        _pca_patch_embedding(tower.embeddings.patch_embedding, patches, generator)
        grid = config.image_size // config.patch_size
        position = tower.embeddings.position_embedding.weight
        position[0] = 0.0
        position[1:] = 0.5 * _sincos_2d(grid, config.hidden_size)
        for layer in tower.encoder.layers:
            _mimetic_attention(layer.self_attn, config.num_attention_heads, generator)


def _pca_patch_embedding(
    conv: torch.nn.Conv2d, pixels: torch.Tensor, generator: torch.Generator
) -> None:
    size = int(conv.kernel_size[0])
    width = int(conv.out_channels)
    patches = (
        F.unfold(pixels, size, stride=size)
        .transpose(1, 2)
        .reshape(-1, conv.in_channels * size * size)
    )
    patches = patches - patches.mean(dim=0)
    covariance = patches.T.double() @ patches.double() / patches.shape[0]
    values, vectors = torch.linalg.eigh(covariance)
    order = values.argsort(descending=True)
    values, vectors = values[order].float(), vectors[:, order].float()
    kept = min(width, int((values > 1e-6 * values[0]).sum()))
    weight = torch.randn(width, vectors.shape[0], generator=generator) * 0.02
    weight[:kept] = (vectors[:, :kept] / (values[:kept] + 1e-2).sqrt()).T
    conv.weight.copy_(weight.view_as(conv.weight))


def _sincos_2d(grid: int, dim: int) -> torch.Tensor:
    if dim % 4:
        raise ValueError(f"vision hidden size {dim} must be a multiple of 4")
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64),
        torch.arange(grid, dtype=torch.float64),
        indexing="ij",
    )
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    parts = []
    for coordinate in (ys.flatten(), xs.flatten()):
        angles = coordinate[:, None] * omega[None]
        parts += [torch.sin(angles), torch.cos(angles)]
    return torch.cat(parts, dim=1).float()


def _mimetic_attention(attention: Any, heads: int, generator: torch.Generator) -> None:
    dim = attention.q_proj.weight.shape[0]
    head_dim = dim // heads
    eye = torch.eye(dim)
    for head in range(heads):
        noise = torch.randn(dim, dim, generator=generator) / math.sqrt(dim)
        u, s, vt = torch.linalg.svd(0.7 * noise + 0.7 * eye)
        root = s[:head_dim].sqrt()
        rows = slice(head * head_dim, (head + 1) * head_dim)
        attention.q_proj.weight[rows] = (u[:, :head_dim] * root).T
        attention.k_proj.weight[rows] = (vt.T[:, :head_dim] * root).T
    noise = torch.randn(dim, dim, generator=generator) / math.sqrt(dim)
    u, s, vt = torch.linalg.svd(0.4 * noise - 0.4 * eye)
    attention.v_proj.weight.copy_((u * s.sqrt()).T)
    attention.out_proj.weight.copy_(vt.T * s.sqrt())
    for projection in (attention.q_proj, attention.k_proj, attention.v_proj, attention.out_proj):
        if projection.bias is not None:
            projection.bias.zero_()


def load_init_model(path: Path, device: str) -> tuple[Any, Any, torch.device]:
    """(model, processor, device) of an existing checkpoint, through the worker's own loader.

    Using `load_checkpoint` means a checkpoint that the worker would refuse (pickled
    weights, missing files, incomplete weights) is refused here too, before any training.
    """
    from consumer.config import ModelSettings

    loaded = load_checkpoint(ModelSettings(path=path, device=device))  # type: ignore[arg-type]
    return loaded.model, loaded.processor, loaded.device


def save_checkpoint(model: Any, processor: Any, folder: Path) -> None:
    """Write the Hugging Face layout (safetensors) into `folder`, replacing earlier weights.

    The files are written to a staging folder next to it and then moved in one by one, so
    an interrupted save never leaves a half-written model.safetensors behind.
    """
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=folder))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        # Real LLaVA checkpoints carry preprocessor_config.json next to processor_config.json.
        processor.image_processor.save_pretrained(staging)
        processor.save_pretrained(staging)
        mode = 0o666 & ~_umask()  # safetensors are written 0600; a model is meant to be read
        for item in sorted(staging.iterdir()):
            item.chmod(mode)
            os.replace(item, folder / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@dataclass(frozen=True, slots=True)
class AnswerFormat:
    """The token layout of one training example: prompt (image expanded), answer, EOS.

    Built with the checkpoint's own processor and the engine's `label_sequences`, so the
    answer tokens trained here are exactly the ones the worker scores after the prompt.
    """

    prompt_ids: tuple[int, ...]
    answers: tuple[tuple[int, ...], ...]  # per label: answer tokens, then EOS if any
    answer_lengths: tuple[int, ...]  # per label: answer tokens without EOS
    pad_id: int
    image_token_id: int

    @classmethod
    def build(
        cls,
        processor: Any,
        model_config: Any,
        prompt_text: str,
        labels: Sequence[str],
        words: Sequence[str],
        image_size: int,
    ) -> AnswerFormat:
        """Tokenize the prompt through the processor, as the engine does, and the answers."""
        from PIL import Image

        tokenizer = processor.tokenizer
        dummy = Image.new("RGB", (image_size, image_size))
        encoded = processor(text=prompt_text, images=dummy, return_tensors="pt")
        prompt_ids = tuple(int(t) for t in encoded["input_ids"][0])
        sequences = label_sequences(tokenizer, prompt_text, labels, words)
        eos = tokenizer.eos_token_id
        answers = tuple(tuple(seq) + ((int(eos),) if eos is not None else ()) for seq in sequences)
        pad = tokenizer.pad_token_id
        return cls(
            prompt_ids=prompt_ids,
            answers=answers,
            answer_lengths=tuple(len(seq) for seq in sequences),
            pad_id=int(pad if pad is not None else (eos if eos is not None else 0)),
            image_token_id=int(model_config.image_token_id),
        )

    @property
    def first_tokens(self) -> tuple[int, ...]:
        """Each label's first answer token: the row of lm_head the engine reads for it."""
        return tuple(answer[0] for answer in self.answers)

    @property
    def sequences(self) -> tuple[tuple[int, ...], ...]:
        """Each label's answer tokens without EOS: the engine's `label_sequences`."""
        return tuple(
            answer[:length]
            for answer, length in zip(self.answers, self.answer_lengths, strict=True)
        )

    @property
    def first_tokens_unique(self) -> bool:
        """Whether one next-token distribution decides the label (the engine's fast case)."""
        return len(set(self.first_tokens)) == len(self.first_tokens)

    def batch(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, labels) for the given label indices.

        labels is IGNORE_INDEX everywhere except the answer tokens and the EOS after them:
        the loss is on the answer only, as in LLaVA's instruction tuning. Sequences of
        different lengths are padded on the right (the prompt positions stay aligned).
        """
        rows = [self.prompt_ids + self.answers[int(t)] for t in targets]
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        start = len(self.prompt_ids)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention[i, : len(row)] = 1
            labels[i, start : len(row)] = torch.tensor(row[start:])
        return input_ids, attention, labels

    def prompt_batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of the bare prompt, for scoring."""
        ids = torch.tensor(self.prompt_ids, dtype=torch.long).expand(size, -1)
        return ids, torch.ones_like(ids)
