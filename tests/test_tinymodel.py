"""The demo's tiny base model (skinaug.demo.tinymodel): an SD 2.1-family folder, its tokenizer, and its
pretraining on the demo world's web corpus, reproducibly."""
from __future__ import annotations

import json

import pytest
import torch

from skinaug import prompts
from skinaug.demo import tinymodel, world
from skinaug.diffusion import sd21


def test_pretraining_is_deterministic_for_a_seed(tmp_path):
    args = dict(seed=3, resolution=32, corpus_size=64, vae_steps=2, unet_steps=2, vae_batch=4, unet_batch=4)
    a = tinymodel.pretrain(tmp_path / "a", **args)
    b = tinymodel.pretrain(tmp_path / "b", **args)
    random = tinymodel.build(tmp_path / "random", seed=3)
    for name in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors", "vae/config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "unet/diffusion_pytorch_model.safetensors").read_bytes() != \
        (random / "unet/diffusion_pytorch_model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A barely trained base from `pretrain` (its saved configs are what these tests read)."""
    return tinymodel.pretrain(tmp_path_factory.mktemp("pretrained") / "base", seed=0, resolution=32, corpus_size=64,
                              vae_steps=2, unet_steps=1, vae_batch=4, unet_batch=4)


def test_pretrained_base_encodes_nearly_deterministically_and_predicts_v(pretrained):
    """Encoder noise far below the latents' spread (else every `sample()` blurs the lesions away)."""

    from diffusers import AutoencoderKL

    base = pretrained
    pixels, _, _ = world.web_corpus(8, seed=1, size=32)
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    with torch.no_grad():
        posterior = vae.encode(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1).latent_dist
    assert posterior.std.max() < 0.02 * posterior.mean.std()
    scheduler = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"


def test_pretrained_schedule_is_sd_shifted_for_the_latent_grid(pretrained):
    """Every stage reads the shifted schedule from the base folder: SNR 16x SD's on a 16 x 16 grid."""
    from diffusers import DDPMScheduler, PNDMScheduler

    from skinaug.diffusion import sd21

    sd_scheduler = DDPMScheduler.from_config(sd21.SD21_BASE_SCHEDULER)
    sd = sd_scheduler.alphas_cumprod.double()
    for kind in (DDPMScheduler, PNDMScheduler):  # training noise (textual inversion, LoRA) and sampling
        ours = kind.from_pretrained(pretrained, subfolder="scheduler").alphas_cumprod.double()
        ratio = (ours / (1 - ours)) / (sd / (1 - sd))
        assert torch.allclose(ratio, torch.full_like(ratio, 16.0), rtol=1e-3), kind.__name__
    assert tinymodel.shifted_betas(64) == pytest.approx(sd_scheduler.betas.tolist(), rel=1e-4)


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
