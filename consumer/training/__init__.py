"""Training and fine-tuning of LLaVA emotion checkpoints (`emotion-worker train`).

dataset: folder listing, stratified split, in-memory pixels, batch augmentation.
model: small from-scratch architectures, the answer token layout, checkpoint saving.
loop: the run itself (answer-only loss, AdamW + warmup + cosine, validation, reports).
lora: peft LoRA adapters for full-size checkpoints, merged before saving.
metrics: accuracy, macro-F1, per-class scores, confusion matrix.
"""
