"""The training pieces both fine-tuning phases share (skinaug.diffusion.training): the one loss, seeded noise."""
from __future__ import annotations

import torch

from skinaug.demo import tinymodel
from skinaug.diffusion import sd21, training


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
