"""Temperature scaling, fitted on held-out training faces and folded into the checkpoint.

Dashboards average the label scores, so a score of 0.8 must mean right about 80% of the
time. Class-weighted losses, label smoothing and distillation all leave a model's
confidence off by some factor; one temperature T (logits / T) fixes most of it without
changing any answer (Guo et al., 2017). It is fitted on the calibration faces, a stratified
slice of the training part that neither the teacher nor the student trains on, never on the
validation split. The worker's scores are a softmax over the labels' first-token logits,
which are rows of `lm_head`: dividing lm_head's weights by T is exactly temperature
scaling, so the checkpoint stays a plain LLaVA and every loader gets calibrated scores.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (torch's convention)

TEMPERATURE_RANGE = (0.05, 20.0)


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The T in TEMPERATURE_RANGE minimising the negative log-likelihood of softmax(logits / T).

    A golden-section search on log T: the NLL of temperature scaling is unimodal in T, and
    a search over one variable needs no optimizer state or learning rate.
    """
    if logits.ndim != 2 or logits.shape[0] != targets.shape[0] or logits.shape[0] == 0:
        raise ValueError(
            f"need (N, labels) logits and N targets, got {tuple(logits.shape)} and "
            f"{tuple(targets.shape)}"
        )
    logits, targets = logits.double(), targets.long()

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(logits / math.exp(log_t), targets))

    low, high = (math.log(t) for t in TEMPERATURE_RANGE)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = nll(a), nll(b)
    for _ in range(80):  # the bracket shrinks to 0.618^80 of its width: far below 1e-9
        if fa < fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = nll(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = nll(b)
    return math.exp((low + high) / 2)


def fold_temperature(model: Any, temperature: float) -> None:
    """Divide lm_head's weights (and bias) by `temperature`, in place.

    Refused when lm_head shares its weights with the input embeddings (tied embeddings):
    scaling them would change what every token means to the language model.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    head = model.lm_head
    embeddings = model.get_input_embeddings()
    if head.weight.data_ptr() == embeddings.weight.data_ptr():
        raise ValueError(
            "lm_head is tied to the input embeddings; a temperature cannot be folded into it"
        )
    with torch.no_grad():
        head.weight.div_(temperature)
        if getattr(head, "bias", None) is not None:
            head.bias.div_(temperature)
