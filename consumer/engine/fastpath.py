"""LLaVA from pixel values to label scores in one pass, without wasted work.

Compared with calling `LlavaForConditionalGeneration.forward`:
- the vision tower stops at the layer LLaVA reads (`vision_feature_layer`, -2 for
  LLaVA-1.5): the layers after it are removed from the loaded model at start-up;
- the prompt's token embeddings are computed once; per batch only the image features are
  spliced in at the (contiguous) image-token positions;
- the attention mask is left out (the prompt has no padding), so attention runs its causal
  fast path;
- only the last position's hidden state is projected, and only onto the label tokens'
  rows of `lm_head` (7 rows instead of a 32k vocabulary);
- the language model's last decoder layer computes keys and values for every position but
  its query, attention output, residual and MLP for the last position only
  (consumer.engine.lastlayer; Llama-family decoders, exact up to float rounding).

When two labels share a first token, each label's whole token sequence is scored instead
(its summed log-probability after the prompt), with one batched pass over the label
continuations.

That scoring from prompt embeddings (`LabelHead`) is also how training measures a model
(consumer.training.validation), so a trained model is validated as the worker will score it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from consumer.engine.lastlayer import last_position_hidden, supports_last_layer_trim
from consumer.engine.loader import ModelLoadError


def _vision_layers(vision_tower: Any) -> Any:
    """The encoder's layer list (CLIP: vision_tower[.vision_model].encoder.layers)."""
    inner = getattr(vision_tower, "vision_model", vision_tower)
    encoder = getattr(inner, "encoder", None)
    layers = getattr(encoder, "layers", None)
    if layers is None:
        raise ModelLoadError(
            "the vision tower is not CLIP-like (no encoder.layers); set model.compile = "
            '"off" and model.preprocess = "processor" is not enough: this model type is '
            "not supported"
        )
    return encoder


def truncate_vision_tower(model: Any) -> int:
    """Drop vision layers after the one LLaVA uses; returns how many layers remain."""
    config = model.config
    feature_layer = config.vision_feature_layer
    if not isinstance(feature_layer, int):
        raise ModelLoadError(f"vision_feature_layer={feature_layer!r}: only one layer is supported")
    encoder = _vision_layers(model.model.vision_tower)
    # The config keeps the full depth, so the cut is decided from it: cutting an already
    # cut tower (a second engine over the same model) changes nothing.
    total = int(model.config.vision_config.num_hidden_layers)
    # hidden_states[0] is the embedding output, hidden_states[k] the output of layer k.
    keep = feature_layer if feature_layer >= 0 else total + 1 + feature_layer
    if not 0 < keep <= total:
        raise ModelLoadError(f"vision_feature_layer={feature_layer} is outside 0..{total}")
    if len(encoder.layers) not in (keep, total):
        raise ModelLoadError(
            f"the vision tower has {len(encoder.layers)} layers; expected {total} (or {keep})"
        )
    # After this the model's own forward()/generate() read the wrong vision layer: the
    # engine owns the model it is given.
    encoder.layers = encoder.layers[:keep]
    return keep


class LabelHead:
    """Label scores from prompt embeddings: the one implementation serving and training share.

    Given the prompt's embeddings (image features already spliced in), each label's score is
    the logit of its first answer token at the last prompt position when the labels' first
    tokens are distinct (one pass, only those rows of `lm_head`), else the summed
    log-probability of its whole token sequence (one batched pass over the continuations).

    Nothing here switches gradients off: serving calls it under `torch.inference_mode()`
    (EmotionEngine), training's validation under `torch.no_grad()`, and a caller outside
    both gets gradients through the model's weights (a head built without `snapshot`).
    """

    def __init__(
        self,
        model: Any,
        sequences: Sequence[Sequence[int]],
        *,
        snapshot: bool = False,
        trim_last_layer: bool = True,
    ) -> None:
        """Take the rows of `model.lm_head` for the labels' first tokens, now.

        With `snapshot` they are a detached copy: the engine's weights never change, and a
        plain tensor read in every batch is what torch.compile traces best. Without, they
        stay linked to lm_head by autograd, so gradients reach it; training builds a head
        per step or validation pass, as its weights change.

        `trim_last_layer=False` runs the language model's whole forward instead of the
        last-position trim (the same scores up to rounding): for comparisons only.
        """
        self.sequences = tuple(tuple(seq) for seq in sequences)
        self.first_token_only = len({seq[0] for seq in self.sequences}) == len(self.sequences)
        # Decided once here: scores() then has no branch torch.compile must guard on.
        self.trim_last_layer = trim_last_layer and supports_last_layer_trim(
            model.model.language_model
        )
        head = model.lm_head
        first = torch.tensor([seq[0] for seq in self.sequences], device=head.weight.device)
        rows = head.weight.index_select(0, first)
        bias = getattr(head, "bias", None)
        self.label_rows: torch.Tensor = rows.detach().clone() if snapshot else rows
        self.label_bias: torch.Tensor | None = (
            None if bias is None else (bias[first].clone() if snapshot else bias[first])
        )

    def scores(self, model: Any, embeds: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings (B, T, D) -> label log-scores (B, L) in float32."""
        if not self.first_token_only:
            return self.sequence_scores(model, embeds)
        language_model = model.model.language_model
        if self.trim_last_layer:
            return self.first_token_scores(last_position_hidden(language_model, embeds))
        output = language_model(inputs_embeds=embeds, use_cache=False)
        return self.first_token_scores(output.last_hidden_state[:, -1])

    def first_token_scores(self, last: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, D) of the position after the prompt -> first-token logits (B, L)."""
        logits: torch.Tensor = last @ self.label_rows.T
        if self.label_bias is not None:
            logits = logits + self.label_bias
        return logits.float()

    def sequence_scores(self, model: Any, embeds: torch.Tensor) -> torch.Tensor:
        """Summed log-probability of each label's tokens after the prompt: (B, L)."""
        batch, labels = embeds.shape[0], len(self.sequences)
        longest = max(len(seq) for seq in self.sequences)
        device = embeds.device
        tokens = torch.zeros((labels, longest), dtype=torch.long, device=device)
        valid = torch.zeros((labels, longest), dtype=torch.bool, device=device)
        for row, seq in enumerate(self.sequences):
            tokens[row, : len(seq)] = torch.tensor(seq, device=device)
            valid[row, : len(seq)] = True
        # Inputs: prompt + label tokens except the last; padding at the end cannot affect
        # earlier positions under causal attention, and padded positions are masked out.
        continuation = model.get_input_embeddings()(tokens[:, :-1]).to(embeds.dtype)
        prompt_len = embeds.shape[1]
        full = torch.cat(
            [
                embeds.repeat_interleave(labels, dim=0),
                continuation.repeat(batch, 1, 1),
            ],
            dim=1,
        )
        hidden = model.model.language_model(inputs_embeds=full, use_cache=False).last_hidden_state
        predicting: torch.Tensor = hidden[:, prompt_len - 1 :]  # positions of label tokens
        # The whole vocabulary: a label's later tokens compete with every other token.
        head = model.lm_head
        bias = getattr(head, "bias", None)
        logits: torch.Tensor = predicting @ head.weight.T
        if bias is not None:
            logits = logits + bias
        logprobs = logits.float().log_softmax(dim=-1)
        picked = logprobs.gather(-1, tokens.repeat(batch, 1).unsqueeze(-1)).squeeze(-1)
        picked = picked.masked_fill(~valid.repeat(batch, 1), 0.0)
        totals: torch.Tensor = picked.sum(dim=-1).view(batch, labels)
        return totals


class LabelScorer:
    """Pixel values (B, 3, H, W) -> label log-scores (B, L); softmax them for probabilities."""

    def __init__(
        self,
        model: Any,
        input_ids: torch.Tensor,
        label_sequences: Sequence[Sequence[int]],
        *,
        trim_last_layer: bool = True,
    ) -> None:
        self.model = model
        self.vision_tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        self.strategy = model.config.vision_feature_select_strategy
        truncate_vision_tower(model)
        ids = input_ids[0]
        positions = (ids == model.config.image_token_id).nonzero().flatten()
        start, end = int(positions[0]), int(positions[-1]) + 1
        if end - start != len(positions):
            raise ModelLoadError("the image tokens in the prompt are not contiguous")
        self.image_slice = (start, end)
        with torch.inference_mode():
            embeds = model.get_input_embeddings()(input_ids)
        # Kept outside inference mode so that torch.compile can trace through them.
        self.prefix = embeds[:, :start].clone()
        self.suffix = embeds[:, end:].clone()
        self.head = LabelHead(
            model, label_sequences, snapshot=True, trim_last_layer=trim_last_layer
        )

    @property
    def first_token_only(self) -> bool:
        """Whether one next-token distribution decides the label (no sequence scoring)."""
        return self.head.first_token_only

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.vision_tower(pixel_values).last_hidden_state
        if self.strategy == "default":
            hidden = hidden[:, 1:]  # drop CLS, as LLaVA's "default" strategy does
        features: torch.Tensor = self.projector(hidden)
        return features

    def prompt_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.image_features(pixel_values).to(self.prefix.dtype)
        batch = features.shape[0]
        return torch.cat(
            [self.prefix.expand(batch, -1, -1), features, self.suffix.expand(batch, -1, -1)],
            dim=1,
        )

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head.scores(self.model, self.prompt_embeddings(pixel_values))
