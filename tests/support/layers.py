"""Linear layers and error measures shared by the fp8 and int8 quantization tests."""

from __future__ import annotations

import torch
from torch import nn


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """||actual - reference|| / ||reference||, in float32."""
    actual, reference = actual.detach().float(), reference.detach().float()
    return float((actual - reference).norm() / reference.norm())


def random_linear(seed: int, in_features: int, out_features: int, *, bias: bool) -> nn.Linear:
    """A frozen nn.Linear with seeded weights of the scale a trained layer has."""
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=generator) * 0.05)
        if linear.bias is not None:
            linear.bias.copy_(torch.randn(out_features, generator=generator) * 0.1)
    return linear.requires_grad_(False)
