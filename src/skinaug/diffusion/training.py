"""Training pieces both fine-tuning phases share: prompt encoding, latents, seeded noise, the one denoising loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids.to(text_encoder.device)
    return text_encoder(ids)[0]


def denoising_loss(unet, noise_scheduler, latents: torch.Tensor, encoder_hidden_states: torch.Tensor,
                   generator: torch.Generator | None = None, noise_offset: float = 0.0) -> torch.Tensor:
    """The standard diffusion objective: noise the latents at a random timestep, predict, MSE.

    The target follows the base model's prediction_type (epsilon for SD 2.1 base).
    Noise and timesteps are drawn from `generator` so a run is reproducible.
    """
    noise, timesteps = sample_noise(noise_scheduler, latents, generator, noise_offset)
    return denoising_loss_per_image(unet, noise_scheduler, latents, encoder_hidden_states, noise, timesteps).mean()


def sample_noise(noise_scheduler, latents: torch.Tensor, generator: torch.Generator | None = None,
                 offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The random part of the objective: Gaussian noise, then one timestep per sample (in that order).

    `offset` > 0 adds offset noise (diffusers' `--noise_offset`): offset x a Gaussian per sample and
    channel, drawn after the timesteps, so that offset 0 draws exactly what it always did.
    """
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator, device=latents.device).long()
    if offset:
        noise = noise + offset * torch.randn(latents.shape[:2] + (1, 1), generator=generator, device=latents.device,
                                             dtype=latents.dtype)
    return noise, timesteps


def denoising_loss_per_image(unet, noise_scheduler, latents: torch.Tensor, encoder_hidden_states: torch.Tensor,
                     noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE of the denoising objective for given noise and timesteps (shape [batch]).

    Its mean is `denoising_loss`; textual inversion sums per-token means of it, so that
    several tokens share one forward pass yet each gets the gradient of a run of its own.
    """
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, encoder_hidden_states.to(unet.dtype)).sample
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)


def latent_moments(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels in [-1, 1] -> mean and std of the VAE posterior (unscaled), for caching."""
    posterior = vae.encode(pixels.to(vae.dtype)).latent_dist
    return posterior.mean, posterior.std


def sample_latents(vae, mean: torch.Tensor, std: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Scaled latents drawn from cached posterior moments: the same draw as vae.encode(pixels).latent_dist.sample() scaled.

    DiagonalGaussianDistribution.sample is mean + std * randn_tensor(generator), so
    sampling from moments cached once per image equals encoding the image again.
    """
    from diffusers.utils.torch_utils import randn_tensor

    eps = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * eps) * vae.config.scaling_factor
