"""Training and fine-tuning of LLaVA emotion checkpoints (`emotion-worker train`).

dataset: folder listing, stratified split, in-memory pixels, batch augmentation.
model: small from-scratch architectures, the answer token layout, checkpoint saving.
config: a run's settings (TrainConfig, training_args.json) and result.
loop: the run itself (`train`): data, model, epochs, checkpoints, records.
loss: the answer-only cross-entropy and class weights.
optim: AdamW parameter groups, warmup + cosine schedule, each epoch's example order.
validation: label scores through the engine's LabelHead; the saved folder through the engine.
model_card: the checkpoint's README.md, at the end of a run or from its records.
provenance: git commit and library versions of a run.
lora: peft LoRA adapters for full-size checkpoints, merged before saving.
metrics: accuracy, macro-F1, per-class scores, confusion matrix.
"""
