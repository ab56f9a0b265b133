"""The demo's base model: pretrained on the demo world's web corpus, reproducibly."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from skinaug import prompts, tone
from skinaug.demo import tinymodel, world


def test_web_corpus_covers_every_tone_with_the_prompts_wording():
    pixels, fsts, captions = world.web_corpus(120, seed=0, size=32)
    assert pixels.shape == (120, 32, 32, 3) and set(fsts) == {1, 2, 3, 4, 5, 6}
    for fst, caption in zip(fsts, captions):
        assert caption.endswith(f"on the skin of {prompts.TONES[int(fst)]} individual")
        assert not any(label in caption for label in prompts.TOKENS)  # generic marks, never a study condition
    medians = [np.median([tone.skin_ita(p) for p in pixels[fsts == f]]) for f in range(1, 7)]
    assert all(a > b for a, b in zip(medians, medians[1:]))  # lighter types have the higher ITA


def test_pretraining_is_deterministic_for_a_seed(tmp_path):
    args = dict(seed=3, resolution=32, corpus_size=64, vae_steps=2, unet_steps=2, batch_size=4)
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
                              vae_steps=2, unet_steps=1, batch_size=4)


def test_pretrained_base_encodes_nearly_deterministically_and_predicts_v(pretrained):
    """Encoder noise far below the latents' spread (else every `sample()` blurs the lesions away)."""
    import json

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
