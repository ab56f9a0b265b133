"""Stable Diffusion: SD 2.1's configs and loading (sd21), the base stage (base), the adapters on disk
(adapters, their one home), the training pieces both fine-tuning phases share (training),
fine-tuning (finetune), one row per generation strategy (strategies) and generation (generate)."""
