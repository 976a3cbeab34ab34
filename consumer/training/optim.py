"""How training steps: AdamW's parameter groups, warmup + cosine, each epoch's example order."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from consumer.training.config import Balance


def lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to min_ratio of the peak learning rate."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only; not on biases, norms, embeddings (as in ViT/LLaMA)."""
    decay: list[torch.nn.Parameter] = []
    plain: list[torch.nn.Parameter] = []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        embedding = "embedding" in name or "embed_tokens" in name
        (decay if parameter.ndim >= 2 and not embedding else plain).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]


class EpochOrder:
    """The example order of each epoch, drawn from one seeded generator."""

    def __init__(self, labels: torch.Tensor, balance: Balance, power: float, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.count = labels.shape[0]
        self.weights: torch.Tensor | None = None
        if balance == "sampler":
            per_class = torch.bincount(labels).float().clamp(min=1)
            self.weights = per_class.pow(-power)[labels]

    def __call__(self) -> torch.Tensor:
        if self.weights is None:
            return torch.randperm(self.count, generator=self.generator)
        # Balanced sampling: each epoch draws as many examples as there are, with
        # replacement, rare classes more often.
        return torch.multinomial(
            self.weights, self.count, replacement=True, generator=self.generator
        )
