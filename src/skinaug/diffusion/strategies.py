"""The generation strategies, one row each: adding one is a row here plus its test.

A row says which pipeline runs, what the prompt names and which adapters the UNet carries;
generate reads nothing else. No torch here: config names the allowed `generate.strategy` and
`ablation.strategies` from this table, and the report its display names.
"""
from __future__ import annotations

from typing import NamedTuple


class Strategy(NamedTuple):
    img2img: bool  # pipeline: start from the training image (else txt2img)
    ti: bool  # prompt: names the learned tokens (else the plain condition name)
    lora: bool  # adapters: the UNet carries the fine-tuned LoRA
    title: str  # how the report names it


STRATEGIES = {
    "img2img_ti_lora": Strategy(True, True, True, "img2img TI+LoRA"),  # the method
    "img2img_ti": Strategy(True, True, False, "img2img TI"),
    "img2img_lora": Strategy(True, False, True, "img2img LoRA"),  # a LoRA trained on plain condition names
    "img2img_vanilla": Strategy(True, False, False, "img2img vanilla"),
    "txt2img_ti": Strategy(False, True, False, "txt2img TI"),
    "txt2img_vanilla": Strategy(False, False, False, "txt2img vanilla"),
}
