"""One scenario and seed's adapters as a folder any diffusers user can load, with a model card.

    skinaug export --seed 0 exports/scenario1-seed0

writes ti/<name>.safetensors (one learned token each), lora/pytorch_lora_weights.safetensors
(lora/<name>/... in per_label mode) and README.md: base model and revision, training
split, settings, sha256 of every file, how to load it with stock diffusers
(`load_textual_inversion` per token, `load_lora_weights`) and the licence note.
The folder appears whole or not at all (built beside it, then renamed).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd

from skinaug import SkinaugError, atomic, hashing, prompts
from skinaug.config import GenerateConfig
from skinaug.data import fitzpatrick
from skinaug.diffusion import adapters, sd21


def export_bundle(out_dir: Path, *, ti_dir: Path, lora_dir: Path, base_dir: Path, split_dir: Path,
                  scenario: int, seed: int, generate: GenerateConfig, resolution: int,
                  data_source: str = "fitzpatrick17k", force: bool = False) -> Path:
    """Copy the adapters of one scenario and seed into out_dir and write its model card."""
    out_dir = Path(out_dir)
    info = _base_info(base_dir)
    tokens = token_files(ti_dir, seed, scenario, base_dir)
    loras = lora_files(lora_dir, seed, scenario, base_dir)
    train_csv = Path(split_dir) / "train.csv"
    if not train_csv.is_file():
        raise SkinaugError(f"no training split {train_csv}: `dvc pull splits@{seed}` fetches it, "
                           f"`dvc repro splits@{seed}` makes it (with scenario: {scenario} in params)")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise SkinaugError(f"{out_dir} exists and is not empty: remove it, choose another folder or pass --force")

    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        copied = []
        for _, src in tokens:
            copied.append(_copy(src, tmp / "ti" / src.name))
        for name, src in loras.items():
            copied.append(_copy(src, adapters.lora_file(tmp / "lora", name)))
        lora_settings = _settings(Path(lora_dir) / "lora.json")
        card = model_card(
            bundle=out_dir, tokens=[(t, f"ti/{p.name}") for t, p in tokens], lora_names=sorted(loras),
            base=info, scenario=scenario, seed=seed, split=split_summary(train_csv),
            settings={"textual inversion (ti.json)": _settings(Path(ti_dir) / "ti.json"),
                      "LoRA (lora.json)": lora_settings},
            use_tokens=lora_settings.get("tokens", True) is not False,  # finetune records whether prompts named them
            files={p.relative_to(tmp).as_posix(): (hashing.file_digest(p), p.stat().st_size) for p in copied},
            generate=generate, resolution=resolution, data_source=data_source,
        )
        (tmp / "README.md").write_text(card)
        atomic.replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"export: {len(tokens)} token(s), {len(loras)} LoRA file(s) -> {out_dir}")
    return out_dir


def token_files(ti_dir: Path, seed: int, scenario: int, base_dir: Path) -> list[tuple[str, Path]]:
    """(token, file) for every learned-token file, each checked against the base; the token is read from
    the file, not its name."""
    found = adapters.tokens_in(ti_dir, base_dir) if any(Path(ti_dir).glob("*.safetensors")) else {}
    if not found:
        raise SkinaugError(_missing("textual-inversion tokens", ti_dir, "textual_inversion", seed, scenario))
    return list(found.items())


def lora_files(lora_dir: Path, seed: int, scenario: int, base_dir: Path) -> dict[str, Path]:
    """adapter name -> file (adapters.JOINT, or one per label in per_label mode), each checked against the base."""
    files = adapters.loras_in(lora_dir)
    if not files:
        raise SkinaugError(_missing("LoRA weights", lora_dir, "lora", seed, scenario))
    adapters.check_lora_files(base_dir, list(files.values()))
    return files


def split_summary(train_csv: Path) -> dict:
    df = fitzpatrick.read_table(train_csv)
    counts = pd.crosstab(df["label"], df["fitzpatrick_scale"], margins=True, margins_name="total")
    counts.columns = [f"FST {c}" if c != "total" else c for c in counts.columns]
    return {"path": str(train_csv), "size": len(df), "sha256": hashing.file_digest(train_csv), "counts": counts}


def model_card(*, bundle: Path, tokens: list[tuple[str, str]], lora_names: list[str], base: dict,
               scenario: int, seed: int, split: dict, settings: dict, files: dict, generate: GenerateConfig,
               resolution: int, data_source: str, use_tokens: bool = True) -> str:
    label_of = {t: label for label, t in prompts.TOKENS.items()}
    first = tokens[0][0]
    prompt = (prompts.skin_prompt(label_of[first], max(prompts.TONES), use_tokens) if first in label_of
              else prompts.skin_text(first, max(prompts.TONES)))
    lines = [
        f"# skinaug adapters: scenario {scenario}, seed {seed}",
        "",
        "Learned tokens (textual inversion) and LoRA weights for Stable Diffusion 2.1 base that turn a photo of a",
        "skin condition on light skin into the same condition on dark skin (img2img), as in Wang et al.,",
        "MICCAI ISIC 2024. Made by `skinaug export`; load them with stock diffusers as shown below.",
        "",
        "## Base model",
        "",
        f"- id: `{base.get('base')}`",
        f"- revision: `{base.get('revision')}`",
        "",
        "## Training split",
        "",
        f"- scenario {scenario}, seed {seed}: `{split['path']}`, {split['size']} images",
        f"- sha256 of train.csv: `{split['sha256']}`",
        "",
        split["counts"].to_markdown(),
        "",
        "## Files",
        "",
        "| file | sha256 | bytes |",
        "|---|---|---|",
        *(f"| `{name}` | `{digest}` | {size} |" for name, (digest, size) in sorted(files.items())),
        "",
        "Check them with `sha256sum ti/*.safetensors lora/*.safetensors lora/*/*.safetensors`.",
        "",
        "## Load with diffusers",
        "",
        "```python",
        *_load_code(bundle, tokens, lora_names, base, prompt, generate, resolution),
        "```",
        "",
    ]
    if base.get("base") == "tiny":
        lines += ["The demo's tiny base model is not on the hub: set `base` to the `models/base` folder it came with.",
                  ""]
    lines += ["## Settings", ""]
    for title, values in settings.items():
        lines += [f"### {title}", "", "```json", json.dumps(values, indent=2), "```", ""]
    lines += ["## Licence", "", *_licence(data_source), ""]
    return "\n".join(lines)


def _load_code(bundle: Path, tokens, lora_names, base: dict, prompt: str, generate: GenerateConfig,
               resolution: int) -> list[str]:
    code = [
        "from pathlib import Path",
        "",
        "import torch",
        "from diffusers import StableDiffusionImg2ImgPipeline",
        "from PIL import Image",
        "",
        f"bundle = Path({str(bundle)!r})  # this folder",
        f"base = {base.get('base')!r}  # or a local copy of it",
        f"revision = {base.get('revision')!r}",
        'device = "cuda" if torch.cuda.is_available() else "cpu"',
        "dtype = torch.float16 if device == \"cuda\" else torch.float32",
        "pipe = StableDiffusionImg2ImgPipeline.from_pretrained(base, revision=revision, dtype=dtype).to(device)",
        *(f'pipe.load_textual_inversion(bundle / "{path}", token="{token}")' for token, path in tokens),
    ]
    if lora_names == [adapters.JOINT]:
        code.append('pipe.load_lora_weights(bundle / "lora")')
    else:
        code += [f'pipe.load_lora_weights(bundle / "lora" / "{n}", adapter_name="{n}")' for n in lora_names]
        code.append(f'pipe.set_adapters("{lora_names[0]}")  # the LoRA of the condition the prompt names')
    code += [
        "",
        f'source = Image.open("source.jpg").convert("RGB").resize(({resolution}, {resolution}))  # light skin',
        f"prompt = {prompt!r}",
        "generator = torch.Generator(device).manual_seed(0)",
        f"image = pipe(prompt, image=source, strength={generate.strength}, guidance_scale={generate.guidance},",
        f"             num_inference_steps={generate.steps}, generator=generator).images[0]",
        'image.save("synthetic.png")',
    ]
    return code


def _licence(data_source: str) -> list[str]:
    if data_source == "world":
        data = ("Trained on skinaug's embedded demo world (generated images), not on Fitzpatrick17k: "
                "a demonstration, not a medical model.")
    else:
        data = ("These weights are derived from Fitzpatrick17k images (Groh et al., 2021), licensed "
                "CC BY-NC-SA 3.0: non-commercial use only, give attribution, share derivatives under the same licence.")
    return [data, "",
            "The base model, Stable Diffusion 2.1 base, is not included; it comes under its own licence "
            "(CreativeML Open RAIL++-M), which applies to anything generated with it.",
            "", "Research use only; synthetic images are not for diagnosis."]


def _missing(what: str, folder: Path, stage: str, seed: int, scenario: int) -> str:
    return (f"no {what} in {folder}: `dvc pull {stage}@{seed}` fetches them, "
            f"`dvc repro {stage}@{seed}` trains them (with scenario: {scenario} in params)")


def _base_info(base_dir: Path) -> dict:
    """Who made the base, from the folder the adapters are checked against."""
    sd21.check_base(base_dir)
    if not (Path(base_dir) / sd21.BASE_INFO).is_file():
        raise SkinaugError(f"no {sd21.BASE_INFO} in {base_dir} to name the base model: "
                           f"`dvc pull {Path(base_dir) / sd21.BASE_INFO}` fetches it, `dvc repro base` makes it")
    return sd21.base_info(base_dir)


def _settings(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"note": f"{path.name} not found"}


def _copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)  # a real copy: never a link into the DVC cache
    return dst
