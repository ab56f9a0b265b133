"""The adapters on disk (skinaug.diffusion.adapters): token and LoRA files that do not fit the base fail in one line."""
from __future__ import annotations

import pytest
import torch

from skinaug import SkinaugError
from skinaug.diffusion import adapters

from test_sd21 import _cut, _one_line


def _unet_weight(base, suffix: str) -> tuple[str, list[int]]:
    """(module, shape of its weight) of the first UNet module whose name ends with suffix."""
    from safetensors import safe_open

    with safe_open(str(base / "unet/diffusion_pytorch_model.safetensors"), "pt") as f:
        key = next(k for k in f.keys() if k.endswith(f"{suffix}.weight"))
        return key.removesuffix(".weight"), list(f.get_slice(key).get_shape())


def _lora(path, module: str, down: tuple, up: tuple, prefix: str = "unet."):
    """A one-module LoRA in diffusers' format (what finetune saves), with the given shapes."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"{prefix}{module}.lora.down.weight": torch.zeros(down),
               f"{prefix}{module}.lora.up.weight": torch.zeros(up)}, path)
    return path


def _token(path, shape: tuple, names=("<bas-class>",)):
    from safetensors.torch import save_file

    save_file({name: torch.zeros(shape) for name in names}, path)
    return path


# The tiny base's text encoder is 32 wide; SD 1.x's is 768 (a token learned there does not fit SD 2.1's 1024).
BAD_TOKENS = {  # case: (how the file is made, what the message says about it)
    "other_width": (lambda p: _token(p, (1, 768)),
                    "holds a 1 x 768 tensor, but the text encoder of {base} takes one vector of width 32"),
    "several_vectors": (lambda p: _token(p, (3, 32)), "holds a 3 x 32 tensor"),  # diffusers: three tokens
    "two_tokens": (lambda p: _token(p, (1, 32), names=("<bas-class>", "<fol-class>")), "holds 2 tensors"),
    "truncated": (lambda p: _cut(_token(p, (1, 32))), "is damaged or truncated"),
}


@pytest.mark.parametrize("case", BAD_TOKENS)
def test_token_file_that_does_not_fit_the_base_is_one_line_naming_it(tiny_base, tmp_path, case):
    make, named = BAD_TOKENS[case]
    good = _token(tmp_path / "good.safetensors", (1, 32))
    assert adapters.check_token_files(tiny_base, [good]) == ["<bas-class>"]
    bad = tmp_path / "bad.safetensors"
    make(bad)
    with pytest.raises(SkinaugError) as err:
        adapters.check_token_files(tiny_base, [good, bad])
    _one_line(err, f"token file {bad} ", named.format(base=tiny_base), "skinaug textual_inversion")


BAD_LORAS = {  # case: (how the file is made from a module and its weight's shape, what the message says)
    # cross-attention reads the text encoder: a LoRA made for a 768-wide one (SD 1.x) on this 32-wide base
    "other_width": (lambda p, m, w: _lora(p, m, (4, 768), (w[0], 4)),
                    "the LoRA maps 768 -> {out} features, the base's weight 32 -> {out}"),
    "rank": (lambda p, m, w: _lora(p, m, (4, w[1]), (w[0], 8)), "lora.down 4 x 32 and lora.up {out} x 8"),
    "module_absent": (lambda p, m, w: _lora(p, "down_blocks.9.attentions.0.transformer_blocks.0.attn2.to_k", (4, w[1]),
                                            (w[0], 4)),  # diffusers skips it without a word
                      "1 of its 1 modules, first down_blocks.9.attentions.0.transformer_blocks.0.attn2.to_k "
                      "(no such module in the base)"),
    "no_unet_prefix": (lambda p, m, w: _lora(p, m, (4, w[1]), (w[0], 4), prefix=""),
                       "not a UNet LoRA weight"),  # diffusers loads nothing, without a word
    "truncated": (lambda p, m, w: _cut(_lora(p, m, (4, w[1]), (w[0], 4))), "is damaged or truncated"),
}


@pytest.mark.parametrize("case", BAD_LORAS)
def test_lora_that_does_not_fit_the_unet_is_one_line_naming_it(tiny_base, tmp_path, case):
    make, named = BAD_LORAS[case]
    module, weight = _unet_weight(tiny_base, "attn2.to_k")
    good = _lora(tmp_path / "good" / "pytorch_lora_weights.safetensors", module, (4, weight[1]), (weight[0], 4))
    adapters.check_lora_files(tiny_base, [good])
    bad = tmp_path / "bad" / "pytorch_lora_weights.safetensors"
    make(bad, module, weight)
    with pytest.raises(SkinaugError) as err:
        adapters.check_lora_files(tiny_base, [good, bad])
    _one_line(err, f"LoRA {bad} ", named.format(out=weight[0]), "skinaug lora")
