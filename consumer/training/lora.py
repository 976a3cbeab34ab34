"""LoRA fine-tuning of a full-size LLaVA: adapters on the language model, projector trained.

The recipe follows LLaVA-1.5's LoRA variant: the CLIP vision tower stays frozen, the
language model's attention and MLP projections get low-rank adapters, and the two-layer
multimodal projector is trained in full (`projector="full"`, the default: it is only ~20M
parameters and it is what adapts the image features to the new task) or, with
`projector="lora"`, gets adapters too. After training the adapters are merged into the
weights (`merge_and_unload`), so the saved checkpoint is a plain LlavaForConditionalGeneration
the worker loads without peft.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

# Llama/Mistral/Vicuna projection names; the vision tower's CLIP layers use q_proj etc. too,
# hence the `language_model` anchor. Matched with re.fullmatch against module names.
LANGUAGE_TARGETS = (
    r".*language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
)
PROJECTOR_TARGETS = r".*multi_modal_projector\.linear_[12]"


def apply_lora(
    model: Any,
    *,
    rank: int,
    alpha: int,
    dropout: float,
    projector: Literal["full", "lora"] = "full",
) -> Any:
    """Wrap `model` in place with LoRA adapters; returns the peft model.

    Only adapter weights (and, with projector="full", the projector) require gradients.
    peft swaps the target layers inside `model` itself, so calling `model` (or its
    submodules) afterwards runs through the adapters.
    """
    from peft import LoraConfig, get_peft_model

    targets = LANGUAGE_TARGETS if projector == "full" else f"{LANGUAGE_TARGETS}|{PROJECTOR_TARGETS}"
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        bias="none",
    )
    peft_model = get_peft_model(model, config)
    if projector == "full":
        for parameter in model.model.multi_modal_projector.parameters():
            parameter.requires_grad_(True)
    # Trained weights in float32 even when the frozen base is bfloat16 (autocast mixes):
    # AdamW updates below bfloat16's resolution would otherwise vanish.
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    return peft_model


def merge_lora(peft_model: Any, dtype: torch.dtype) -> Any:
    """The base model with the adapters folded into its weights, cast to `dtype`."""
    merged = peft_model.merge_and_unload()
    return merged.to(dtype)


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """Copies of the parameters being trained (to keep the best epoch's adapters)."""
    return {
        name: parameter.detach().clone()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }


def restore_state(model: Any, state: dict[str, torch.Tensor]) -> None:
    """Put back parameters saved by `trainable_state`."""
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            parameters[name].copy_(value)
