"""The language model's forward when only the last position's output is read.

Label scoring reads one hidden state: the last prompt position's, after the final norm.
Every decoder layer but the last must still run over all positions (their outputs are the
keys and values of the layers above), but in the last layer the other positions' outputs
are dead: that layer needs keys and values for every position and everything else (the
query, attention over the keys, `o_proj`, the residual, the MLP) for the last position
only. `last_position_hidden` runs layers 0..L-2 through their own `forward`, then the last
layer by hand from its own submodules, so quantized `nn.Linear` swaps (fp8.py, int8.py)
still apply. Exact: the same arithmetic on fewer rows; only float rounding differs (matmuls
of other shapes sum in other orders).

The last query sits at the last position, so under the causal mask it attends to every
position: its attention needs no mask (the scorer's prompts have no padding).

Only Llama-family decoders take this path (`supports_last_layer_trim`); any other
language model runs its plain forward, which gives the same numbers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (torch's convention)


def supports_last_layer_trim(language_model: Any) -> bool:
    """Whether `language_model` is a transformers Llama decoder whose layers are exactly
    those `last_position_hidden` re-implements (no subclass, no extra norms or windows)."""
    try:
        from transformers.models.llama.modeling_llama import (
            LlamaAttention,
            LlamaDecoderLayer,
            LlamaModel,
        )
    except ImportError:  # a transformers release without this layout: run the plain forward
        return False
    if type(language_model) is not LlamaModel:
        return False
    layers = list(language_model.layers[: language_model.config.num_hidden_layers])
    return bool(layers) and all(
        type(layer) is LlamaDecoderLayer and type(layer.self_attn) is LlamaAttention
        for layer in layers
    )


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of (B, heads, T, head_dim) with cos/sin (1 or B, T, head_dim),
    as transformers' apply_rotary_pos_emb computes it."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def last_position_hidden(language_model: Any, embeds: torch.Tensor) -> torch.Tensor:
    """Input embeddings (B, T, D) -> the last position's final hidden state (B, D), equal
    (up to rounding) to `language_model(inputs_embeds=embeds).last_hidden_state[:, -1]`.

    Needs `supports_last_layer_trim(language_model)`. No Python branch depends on tensor
    values, so torch.compile traces it whole.
    """
    from transformers.masking_utils import create_causal_mask

    lm = language_model
    seq = embeds.shape[1]
    position_ids = torch.arange(seq, device=embeds.device).unsqueeze(0)
    # What LlamaModel.forward builds: None on the SDPA path (its is_causal fast path),
    # a 4D mask for eager attention.
    causal_mask = create_causal_mask(
        config=lm.config,
        inputs_embeds=embeds,
        attention_mask=None,
        past_key_values=None,
        position_ids=position_ids,
    )
    cos, sin = lm.rotary_emb(embeds, position_ids=position_ids)
    layers = lm.layers[: lm.config.num_hidden_layers]
    hidden = embeds
    for layer in layers[:-1]:
        hidden = layer(
            hidden,
            attention_mask=causal_mask,
            position_embeddings=(cos, sin),
            position_ids=position_ids,
            use_cache=False,
        )
    last: torch.Tensor = _last_layer(layers[-1], hidden, cos, sin)
    normed: torch.Tensor = lm.norm(last)
    return normed[:, -1]


def _last_layer(
    layer: Any, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """LlamaDecoderLayer.forward for the last position: (B, T, D) -> (B, 1, D)."""
    attn = layer.self_attn
    batch, seq = hidden.shape[:2]
    head_dim = int(attn.head_dim)
    normed = layer.input_layernorm(hidden)
    # Keys and values of every position; the query of the last one only.
    query = attn.q_proj(normed[:, -1:]).view(batch, 1, -1, head_dim).transpose(1, 2)
    key = attn.k_proj(normed).view(batch, seq, -1, head_dim).transpose(1, 2)
    value = attn.v_proj(normed).view(batch, seq, -1, head_dim).transpose(1, 2)
    query = _rotate(query, cos[:, -1:], sin[:, -1:])
    key = _rotate(key, cos, sin)
    groups = int(attn.num_key_value_groups)
    if groups > 1:  # grouped-query attention: query head h reads key/value head h // groups
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    # The last position sees every position under the causal mask: no mask at all.
    attended = F.scaled_dot_product_attention(
        query,
        key,
        value,
        dropout_p=float(attn.attention_dropout) if attn.training else 0.0,
        scale=float(attn.scaling),
    )
    attended = attended.transpose(1, 2).reshape(batch, 1, -1)
    residual = hidden[:, -1:] + attn.o_proj(attended)
    out: torch.Tensor = residual + layer.mlp(layer.post_attention_layernorm(residual))
    return out
