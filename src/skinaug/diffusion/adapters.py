"""The adapters on disk, in one place: where the stages put learned tokens and LoRAs, what they call
them, and the checks that they fit a base.

    models/.../ti/<name>.safetensors           one learned token per label: {"<name>": vector}
    models/.../ti/ti.json                      textual_inversion's summary
    models/.../lora/pytorch_lora_weights.safetensors          lora.mode joint: one LoRA, adapter JOINT
    models/.../lora/<name>/pytorch_lora_weights.safetensors   lora.mode per_label: one LoRA per label
    models/.../lora/lora.json                  lora's summary: "loras" by label (or JOINT), "tokens"

<name> is a label's token without its brackets (name()); it also names the label's LoRA adapter
and loss curve. diffusers' own failures here are tracebacks many lines long, or silence (see
sd21's checks), hence the checks below.
"""
from __future__ import annotations

import json
from pathlib import Path

from skinaug import SkinaugError, prompts
from skinaug.diffusion.sd21 import REMAKE_BASE, check_base, tensor_shapes

# --- the layout ----------------------------------------------------------------------------------

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default weight_name for load_lora_weights
JOINT = "joint"  # the one LoRA of lora.mode joint: its adapter name, loss curve and lora.json key
SUMMARY = {"ti": "ti.json", "lora": "lora.json"}  # each stage's summary beside its adapters


def name(label: str) -> str:
    """A label's adapter name, its token without the brackets: '<bas-class>' -> 'bas-class'."""
    return prompts.token(label).strip("<>")


def token_file(label: str) -> str:
    """The file name of a label's learned token."""
    return name(label) + ".safetensors"


def lora_file(lora_dir: Path, adapter: str) -> Path:
    """Where a LoRA's weights are: lora_dir/LORA_FILE for JOINT, lora_dir/<adapter>/LORA_FILE for a label's own."""
    return Path(lora_dir) / LORA_FILE if adapter == JOINT else Path(lora_dir) / adapter / LORA_FILE


def token_files(ti_dir: Path, labels: list[str]) -> tuple[list[Path], list[str]]:
    """The learned token files of `labels` in ti_dir, and their tokens (for pipe.load_textual_inversion)."""
    tokens = [prompts.token(label) for label in labels]
    files = [Path(ti_dir) / token_file(label) for label in labels]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise SkinaugError(f"{len(missing)} learned token file(s) missing (first: {missing[0]}); "
                           "run `skinaug textual_inversion` first")
    return files, tokens


def tokens_in(ti_dir: Path, base_dir: Path) -> dict[str, Path]:
    """token -> file for every learned-token file in ti_dir, each checked against the base; the token
    is the name inside the file (a file made elsewhere may hold a plain name: then '<file stem>')."""
    paths = sorted(Path(ti_dir).glob("*.safetensors")) if Path(ti_dir).is_dir() else []
    names = check_token_files(base_dir, paths)
    return {n if n.startswith("<") else f"<{path.stem}>": path for n, path in zip(names, paths)}


def trained_loras(lora_dir: Path) -> dict[str, Path]:
    """adapter name -> weights file of the LoRA(s) the lora stage wrote (its lora.json lists them)."""
    summary = json.loads((Path(lora_dir) / SUMMARY["lora"]).read_text())
    return {JOINT if key == JOINT else name(key): Path(lora_dir) / entry["file"]
            for key, entry in summary["loras"].items()}


def loras_in(lora_dir: Path) -> dict[str, Path]:
    """adapter name -> weights file of the LoRA(s) in lora_dir, found by the layout alone: JOINT, or one per folder."""
    if lora_file(lora_dir, JOINT).is_file():
        return {JOINT: lora_file(lora_dir, JOINT)}
    return {p.parent.name: p for p in sorted(Path(lora_dir).glob(f"*/{LORA_FILE}"))}


def trained_with_tokens(lora_dir: Path) -> bool | None:
    """Whether the LoRA in lora_dir was trained on prompts naming the learned tokens (its lora.json
    says so); None when it has no lora.json (a LoRA made elsewhere)."""
    path = Path(lora_dir) / SUMMARY["lora"]
    try:
        return bool(json.loads(path.read_text())["tokens"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SkinaugError(f"cannot read {path}: {e}") from None


# --- checks: the adapters fit the base -------------------------------------------------------------


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
