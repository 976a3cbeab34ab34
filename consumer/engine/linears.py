"""Which layers of a LLaVA are quantized: the language model's nn.Linear layers, no others.

Shared by every precision (fp8.py, int8.py) and by the start-up checks that pick one
(precision.py), so that what is measured is exactly what gets replaced; `record_inputs`
captures those layers' inputs during a calibration forward (SmoothQuant statistics and the
samples of the fidelity check).

Left alone, and why (the reasons are spelled out in fp8.py's docstring): the ``lm_head``
(the published probabilities are read from it), the vision tower and the multi-modal
projector (run once per image; their errors would reach every image token), embeddings,
norms and attention (not ``nn.Linear``), and layers narrower than ``min_features``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "LayerInputs",
    "apply_moving_only",
    "language_model",
    "language_model_linears",
    "record_inputs",
    "replace_linears",
]

# Layers with fewer in- or out-features than this stay as they are: too small to gain.
DEFAULT_MIN_FEATURES = 16


def language_model(model: nn.Module) -> nn.Module:
    """The LLaVA's text decoder: model.model.language_model in transformers 5, else
    model.language_model (older layouts and LlavaModel itself)."""
    inner: Any = getattr(model, "model", None)
    for candidate in (
        getattr(inner, "language_model", None),
        getattr(model, "language_model", None),
    ):
        if isinstance(candidate, nn.Module):
            return candidate
    raise ValueError(
        f"{type(model).__name__} has no language model at .model.language_model or "
        ".language_model; quantization expects a LlavaForConditionalGeneration"
    )


def _excluded_modules(model: nn.Module) -> set[int]:
    """ids of every module that must stay in full precision, even if nested in the LM."""
    roots: list[Any] = []
    get_output_embeddings: Any = getattr(model, "get_output_embeddings", None)
    if callable(get_output_embeddings):
        roots.append(get_output_embeddings())
    inner: Any = getattr(model, "model", None)
    for owner in (model, inner):
        for name in ("lm_head", "vision_tower", "multi_modal_projector"):
            roots.append(getattr(owner, name, None))
    excluded: set[int] = set()
    for root in roots:
        if isinstance(root, nn.Module):
            excluded.update(id(module) for module in root.modules())
    return excluded


def _targets(model: nn.Module, min_features: int) -> list[tuple[nn.Module, str, str, nn.Linear]]:
    """(parent, attribute, dotted name inside the language model, layer) of each target."""
    decoder = language_model(model)
    excluded = _excluded_modules(model)
    targets: list[tuple[nn.Module, str, str, nn.Linear]] = []
    for parent_name, parent in decoder.named_modules():
        for name, child in parent.named_children():
            if (
                isinstance(child, nn.Linear)
                and id(child) not in excluded
                and child.in_features >= min_features
                and child.out_features >= min_features
            ):
                dotted = f"{parent_name}.{name}" if parent_name else name
                targets.append((parent, name, dotted, child))
    return targets


def language_model_linears(
    model: nn.Module, *, min_features: int = DEFAULT_MIN_FEATURES
) -> dict[str, nn.Linear]:
    """The layers a precision would replace, by dotted name inside the language model
    (``layers.0.self_attn.q_proj``), in module order; a shared layer appears once."""
    found: dict[str, nn.Linear] = {}
    seen: set[int] = set()
    for _, _, dotted, linear in _targets(model, min_features):
        if id(linear) not in seen:
            seen.add(id(linear))
            found[dotted] = linear
    return found


def replace_linears(
    model: nn.Module,
    build: Callable[[str, nn.Linear], nn.Module],
    *,
    min_features: int = DEFAULT_MIN_FEATURES,
) -> int:
    """Replace every target layer with ``build(dotted_name, layer)``, in place.

    Returns how many layers were replaced (a layer shared by several parents is built once
    and counts once, under the first name it has).
    """
    # Collect first, then replace: setattr while iterating named_modules would change the
    # tree under the iterator.
    targets = _targets(model, min_features)
    replaced: dict[int, nn.Module] = {}
    for parent, name, dotted, linear in targets:
        if id(linear) not in replaced:
            replaced[id(linear)] = build(dotted, linear)
        setattr(parent, name, replaced[id(linear)])
    return len(replaced)


@dataclass(frozen=True, slots=True)
class LayerInputs:
    """What `record_inputs` saw of the target layers' inputs, by dotted layer name."""

    absmax: dict[str, torch.Tensor]  # (in_features,) float32 running max |x| per channel
    samples: dict[str, torch.Tensor]  # (<= sample_rows, in_features), the input's dtype


def record_inputs(
    model: nn.Module,
    run: Callable[[], object],
    *,
    sample_rows: int = 0,
    sample_names: Collection[str] = (),
    min_features: int = DEFAULT_MIN_FEATURES,
) -> LayerInputs:
    """Run `run()` once and record the inputs of every target layer.

    * absmax: each layer's per-input-channel max |x| over all tokens: the activation
      statistics SmoothQuant needs (int8.py). A running maximum, so any number of batches
      and tokens costs one vector per layer.
    * samples: up to `sample_rows` input rows (tokens) of each layer in `sample_names`,
      spread over the call (every k-th token), for the start-up fidelity check
      (precision.py); other layers keep none, which bounds the memory on a large model.
    """
    linears = language_model_linears(model, min_features=min_features)
    maxima: dict[str, torch.Tensor] = {}
    samples: dict[str, torch.Tensor] = {}
    wanted = set(sample_names)

    def hook_for(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(_: nn.Module, inputs: tuple[Any, ...]) -> None:
            rows = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            current = rows.abs().amax(dim=0).float()
            seen = maxima.get(name)
            maxima[name] = current if seen is None else torch.maximum(seen, current)
            if name in wanted and sample_rows > 0 and name not in samples:
                step = max(1, rows.shape[0] // sample_rows)
                samples[name] = rows[::step][:sample_rows].clone()

        return hook

    handles = [linear.register_forward_pre_hook(hook_for(name)) for name, linear in linears.items()]
    try:
        with torch.inference_mode():
            run()
    finally:
        for handle in handles:
            handle.remove()
    # Clones made outside inference mode: these tensors outlive it, and inference tensors
    # cannot be saved for autograd or updated in place later.
    return LayerInputs(
        absmax={name: value.clone() for name, value in maxima.items()},
        samples={name: value.clone() for name, value in samples.items()},
    )


def apply_moving_only(
    module: nn.Module,
    fn: Callable[[torch.Tensor], torch.Tensor],
    recurse: bool,
    names: Collection[str],
    module_apply: Callable[[Callable[[torch.Tensor], torch.Tensor], bool], Any],
) -> None:
    """`nn.Module._apply(fn)` with the buffers `names` moved to fn's device, never cast.

    model.to(torch.bfloat16) casts every floating-point buffer (float8 counts as floating
    point): a quantized layer's weight and its float32 scales must keep their dtypes.
    `module_apply` is the layer's `super()._apply`.
    """
    kept = {name: module._buffers.pop(name) for name in names}
    try:
        module_apply(fn, recurse)
    finally:
        for name, tensor in kept.items():
            if tensor is not None:
                # fn on an empty tensor tells where fn sends tensors, whatever it casts to.
                tensor = tensor.to(device=fn(torch.empty(0, device=tensor.device)).device)
            module._buffers[name] = tensor
