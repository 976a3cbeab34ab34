"""A training-only classifier on the vision tower's pooled features (deep supervision).

A LLaVA trained from scratch learns slowly at first: the loss reaches the vision tower only
through a randomly initialised language model, whose last prompt position has to learn to
read the image tokens while the tower has to learn what to put in them, and for epochs
neither moves (FER validation accuracy stays at the class prior, ~25%). A linear head on
the mean of the tower's patch features gives the tower a direct gradient from the first
step (like GoogLeNet's auxiliary classifiers); once the features separate the classes, the
language model's attention, which starts out as a near-uniform average over the image
tokens, reads them easily. The head's weight decays to zero over training, it is never
saved, and the checkpoint answers through the language model alone.
"""

from __future__ import annotations

from typing import Any

import torch


class VisionProbe(torch.nn.Module):
    """Linear head on mean-pooled patch features of the LLaVA's vision tower."""

    def __init__(self, model: Any, labels: int) -> None:
        """Attach to `model`'s vision tower: every forward pass records its features."""
        super().__init__()
        tower = model.model.vision_tower
        self.linear = torch.nn.Linear(int(tower.config.hidden_size), labels)
        self._features: torch.Tensor | None = None
        self._hook = tower.register_forward_hook(self._capture)
        # LLaVA reads one layer and may drop the CLS token; probe the same features.
        self._layer = int(model.config.vision_feature_layer)
        self._drop_cls = model.config.vision_feature_select_strategy == "default"

    def _capture(self, _module: Any, _inputs: Any, output: Any) -> None:
        hidden = output.hidden_states
        self._features = hidden[self._layer] if hidden is not None else output.last_hidden_state

    def logits(self) -> torch.Tensor:
        """Label logits for the images of the last forward pass."""
        if self._features is None:
            raise RuntimeError("the vision tower has not run since the probe was attached")
        features = self._features[:, 1:] if self._drop_cls else self._features
        self._features = None
        out: torch.Tensor = self.linear(features.mean(dim=1).float())
        return out

    def close(self) -> None:
        """Detach from the vision tower."""
        self._hook.remove()
