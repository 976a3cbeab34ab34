"""The measured rows: EmotionEngine variants, and naive HF generate() as the baseline."""

from __future__ import annotations

import time
from typing import Any

import torch
from PIL import Image

from bench._bench_core import (
    Bench,
    Row,
    agreement,
    peak_gib,
    reset_peak,
    sync,
    take,
    throughput,
    timed,
)
from bench._variants import VARIANTS, variant_settings
from consumer.engine import EmotionEngine, FaceScores

NAIVE_NEW_TOKENS = 5
# generate() one face at a time is slow; the agreement check needs only a handful.
NAIVE_AGREE_FACES = 16


def engine_row(bench: Bench, variant: str, batch: int) -> Row:
    """Throughput of EmotionEngine with `variant`'s settings on batches of `batch` faces.

    Warm-up is engine construction + the first full batch, not engine.warm_up(): with
    compile on, that compiles every padding bucket up to the batch size (one compile per
    bucket, minutes for a 7B), while only the measured shape matters here.
    """
    settings, notes = variant_settings(bench.base_settings, variant)
    if settings.compile == "on":
        _reset_dynamo()
    reset_peak(bench.device)
    faces = take(bench.faces, batch)
    started = time.perf_counter()  # construction counts: fp8 quantizes the weights there
    engine = EmotionEngine(bench.checkpoint, settings, max_batch_size=batch)
    engine.classify(faces)
    sync(bench.device)
    row = Row(variant=variant, batch=batch, warmup_s=time.perf_counter() - started)
    times = timed(
        lambda: engine.classify(faces), bench.device, bench.iterations, bench.budget.row_deadline()
    )
    throughput(bench, row, times, batch)
    # Whole batches only, so a compiled engine meets no new shape (no new compile).
    count = len(bench.agree_faces)
    padded = take(bench.agree_faces, -(-count // batch) * batch)
    row.agreement, row.max_abs_diff = agreement(engine.classify(padded)[:count], bench.reference)
    row.peak_gib = peak_gib(bench.device)
    # An engine with model.precision says what its linear layers run (auto: what it chose).
    chosen = getattr(engine, "precision", None)
    if chosen is not None and VARIANTS[variant].about == "precision":
        reason = str(getattr(engine, "precision_reason", "") or "")
        notes.insert(0, f"precision {chosen}" + (f" ({reason[:160]})" if reason else ""))
    row.note = "; ".join([f"{len(times)} iterations", *notes])
    return row


def _reset_dynamo() -> None:
    """Forget earlier compiled rows: each starts cold, and the recompile limit (8 graphs per
    function by default, then silent eager fallback) is never reached across rows."""
    try:
        torch._dynamo.reset()
    except Exception as exc:  # a torch without dynamo: the engine will say so itself
        print(f"  torch._dynamo.reset() failed: {exc}", flush=True)


def naive_row(bench: Bench) -> Row:
    """HF processor + model.generate(max_new_tokens=5), one face per call: the baseline a
    straightforward integration would have, against the engine's single scoring pass."""
    reset_peak(bench.device)
    started = time.perf_counter()
    _generate(bench, bench.faces[0], NAIVE_NEW_TOKENS)
    sync(bench.device)
    row = Row(variant="naive-generate", batch=1, warmup_s=time.perf_counter() - started)
    faces = iter(take(bench.faces, bench.iterations))
    times = timed(
        lambda: _generate(bench, next(faces), NAIVE_NEW_TOKENS),
        bench.device,
        min(bench.iterations, 5),
        bench.budget.row_deadline(),
    )
    throughput(bench, row, times, 1)
    count = min(NAIVE_AGREE_FACES, len(bench.agree_faces))
    scores = [_first_step_scores(bench, face) for face in bench.agree_faces[:count]]
    row.agreement, row.max_abs_diff = agreement(scores, bench.reference[:count])
    row.peak_gib = peak_gib(bench.device)
    row.note = (
        f"{len(times)} calls of {NAIVE_NEW_TOKENS} new tokens; agreement from the first "
        f"generated step's logits on {count} faces"
    )
    return row


def _generate(bench: Bench, face: Image.Image, new_tokens: int, **extra: Any) -> Any:
    checkpoint = bench.checkpoint
    processor = checkpoint.processor
    inputs = processor(
        text=bench.prompt_text, images=face.convert("RGB"), return_tensors="pt"
    )  # the reference CPU preprocessing, per call, as a naive integration would do it
    inputs = {key: value.to(checkpoint.device) for key, value in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(checkpoint.dtype)
    with torch.inference_mode():
        return checkpoint.model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=processor.tokenizer.pad_token_id,
            **extra,
        )


def _first_step_scores(bench: Bench, face: Image.Image) -> FaceScores:
    """The label probabilities generate() saw for its first token (same math as the engine)."""
    out = _generate(bench, face, 1, return_dict_in_generate=True, output_logits=True)
    # output_logits is the raw logits; older releases only have the processed `scores`,
    # identical for greedy decoding without logits processors.
    steps = getattr(out, "logits", None) or out.scores
    logits = steps[0][0].index_select(
        -1, torch.tensor(bench.label_token_ids, device=steps[0].device)
    )
    probabilities = logits.double().softmax(dim=-1).cpu().tolist()
    labels = bench.labels
    best = max(range(len(probabilities)), key=probabilities.__getitem__)
    return FaceScores(
        label=labels[best],
        confidence=probabilities[best],
        scores=dict(zip(labels, probabilities, strict=True)),
    )
