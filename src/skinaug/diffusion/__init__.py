"""Stable Diffusion: SD 2.1 and loading (sd21), the base stage (base), the adapters on disk (adapters), shared training pieces (training), fine-tuning (finetune) and generation (generate)."""
