"""What training minimises: next-token cross-entropy on the answer, with class weights."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (torch's convention)

from consumer.engine.fastpath import LabelHead
from consumer.training.model import IGNORE_INDEX, AnswerFormat


def class_weights(counts: Sequence[int], power: float) -> torch.Tensor:
    """Per-label loss weight (largest count / count) ** power, an average example weighing 1.

    power 0.5 (the default) quadruples "disgusted" against "happy" on FER: enough for the
    rare class to be predicted at all, without the precision collapse of full inverse
    frequency (power 1). Labels without training images get 0.
    """
    present = [c for c in counts if c]
    if not present or power == 0:
        return torch.tensor([1.0 if c else 0.0 for c in counts])
    largest = max(present)
    raw = [(largest / c) ** power if c else 0.0 for c in counts]
    scale = sum(present) / sum(r * c for r, c in zip(raw, counts, strict=True))
    return torch.tensor([r * scale for r in raw])


def vocab_weights(
    counts: Sequence[int], fmt: AnswerFormat, vocab: int, power: float
) -> torch.Tensor:
    """Cross-entropy weight per vocabulary id: each label's first answer token gets its
    class weight (`class_weights`); other tokens (EOS, later answer tokens) weigh 1."""
    weights = torch.ones(vocab)
    if power == 0:
        return weights
    for token, value in zip(fmt.first_tokens, class_weights(counts, power).tolist(), strict=True):
        if value:
            weights[token] = value
    return weights


def answer_loss(
    model: Any,
    fmt: AnswerFormat,
    pixel_values: torch.Tensor,
    targets: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, label logits) of one batch: next-token cross-entropy on the answer only.

    The language model's hidden states are projected onto the vocabulary only at the
    positions that predict a supervised token (labels != IGNORE_INDEX after the shift),
    which for a 32k-vocabulary model saves a (batch x sequence x vocab) logits tensor.
    The label logits are the answer-position logits of each label's first token.
    """
    device = pixel_values.device
    input_ids, attention, labels = fmt.batch(targets.cpu())
    padded = bool((attention == 0).any())
    hidden = model.model(
        input_ids=input_ids.to(device),
        attention_mask=attention.to(device) if padded else None,
        pixel_values=pixel_values,
        use_cache=False,
    ).last_hidden_state
    shifted = labels[:, 1:].to(device)
    keep = shifted != IGNORE_INDEX
    logits = model.lm_head(hidden[:, :-1][keep]).float()
    loss = F.cross_entropy(
        logits,
        shifted[keep],
        weight=None if weight is None else weight.to(device),
        label_smoothing=label_smoothing,
    )
    answer_position = len(fmt.prompt_ids) - 1
    # The label logits the engine turns into probabilities (its `LabelHead`, reading this
    # batch's hidden state at the last prompt position: no second forward pass). They keep
    # their gradient for distillation; callers counting correct answers detach them.
    head = LabelHead(model, fmt.sequences)
    scores = head.first_token_scores(hidden[:, answer_position]).float()
    return loss, scores


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(teacher || student) of the label distributions at `temperature`, times T^2.

    Hinton et al.'s soft targets: the teacher's whole distribution (which wrong labels are
    plausible: fearful vs surprised, sad vs neutral) carries far more per face than the one
    hard label; the T^2 factor keeps its gradient on the scale of the cross-entropy's.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ: the teacher must have one output per label"
        )
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2
