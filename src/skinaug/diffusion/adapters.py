"""The adapters on disk: learned-token files and LoRA weights, and the checks that they fit a base.

diffusers' own failures here are tracebacks many lines long, or silence (see sd21's checks).
"""
from __future__ import annotations

import json
from pathlib import Path


from skinaug import SkinaugError
from skinaug.diffusion.sd21 import REMAKE_BASE, check_base, tensor_shapes


RELEARN_TOKENS = "learn the tokens again on this base (`skinaug textual_inversion`)"
RETRAIN_LORA = "train the LoRA again on this base (`skinaug lora`)"
_LORA_SUFFIXES = {".lora.down.weight": "down", ".lora_A.weight": "down",  # diffusers' names, then peft's
                  ".lora.up.weight": "up", ".lora_B.weight": "up"}


def check_token_files(base_dir: Path, files: list[Path]) -> list[str]:
    """The name inside each learned-token file, once each holds one vector as wide as the base's text encoder."""
    width = json.loads((check_base(base_dir) / "text_encoder/config.json").read_text())["hidden_size"]
    names = []
    for path in files:
        shapes = tensor_shapes(path, RELEARN_TOKENS, "token file ")
        if len(shapes) != 1:
            raise SkinaugError(f"token file {path} holds {len(shapes)} tensors, not one named by its token; "
                               f"{RELEARN_TOKENS}")
        ((name, shape),) = shapes.items()
        if shape not in ([width], [1, width]):  # several rows would silently become several tokens
            raise SkinaugError(f"token file {path} holds a {_dims(shape)} tensor, but the text encoder of {base_dir} "
                               f"takes one vector of width {width} (1 x {width}); {RELEARN_TOKENS}")
        names.append(name)
    return names


def check_lora_files(base_dir: Path, files: list[Path]) -> None:
    """Refuse a LoRA file unless each of its weights fits a module of the base's UNet (diffusers skips misfits)."""
    unet = tensor_shapes(check_base(base_dir) / "unet/diffusion_pytorch_model.safetensors", REMAKE_BASE)
    for path in files:
        pairs = _lora_pairs(path)
        if not pairs:
            raise SkinaugError(f"LoRA {path} holds no weights; {RETRAIN_LORA}")
        misfits = {m: why for m, pair in pairs.items() if (why := _misfit(pair, unet.get(f"{m}.weight")))}
        if misfits:
            module, why = next(iter(misfits.items()))
            raise SkinaugError(f"LoRA {path} does not fit the UNet of {base_dir}: {len(misfits)} of its {len(pairs)} "
                               f"modules, first {module} ({why}); {RETRAIN_LORA}")


def _lora_pairs(path: Path) -> dict[str, dict[str, list[int]]]:
    """UNet module -> the shapes of its LoRA's down and up weights, as the file names them."""
    pairs: dict[str, dict[str, list[int]]] = {}
    for key, shape in tensor_shapes(path, RETRAIN_LORA, "LoRA ").items():
        suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
        if not key.startswith("unet.") or suffix is None:  # diffusers would load it elsewhere, or skip it
            raise SkinaugError(f"LoRA {path} holds {key!r}, not a UNet LoRA weight "
                               f"(unet.<module>.lora.down.weight or .lora.up.weight); {RETRAIN_LORA}")
        pairs.setdefault(key[len("unet."):-len(suffix)], {})[_LORA_SUFFIXES[suffix]] = shape
    return pairs


def _misfit(pair: dict[str, list[int]], weight: list[int] | None) -> str | None:
    """Why one module's lora down [rank, in, ...] and up [out, rank, ...] do not fit its base weight [out, in, ...]."""
    if weight is None:
        return "no such module in the base"
    if set(pair) != {"down", "up"}:
        return f"lora.{next(iter(pair))} without its partner"
    down, up = pair["down"], pair["up"]
    if len(down) != len(weight) or len(up) != len(weight) or down[0] != up[1]:
        return f"lora.down {_dims(down)} and lora.up {_dims(up)} for a {_dims(weight)} weight"
    if (down[1], up[0]) != (weight[1], weight[0]):
        return f"the LoRA maps {down[1]} -> {up[0]} features, the base's weight {weight[1]} -> {weight[0]}"
    return None




def _dims(shape: list[int]) -> str:
    return " x ".join(map(str, shape)) or "scalar"
