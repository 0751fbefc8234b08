"""The world's VAE: a diffusers `AutoencoderKL` trained on the world's images.

As Stable Diffusion's autoencoder (Rombach et al. 2022, Section 3 and Appendix G) minus the perceptual
and adversarial terms: a per-pixel reconstruction loss (L1 + L2) of a decoded posterior sample plus a
small KL(q(z|x) || N(0, I)). SD's latents are 8x smaller than its images; this one has 2 downsampling
blocks (4x: 32 px -> 4x8x8). `scaling_factor` = 1 / std of the latent posterior means on a data sample,
as SD's 0.18215 was computed, is written into the VAE's config.
"""

from __future__ import annotations

import torch

from latent_consistency.world.fit import Phase
from latent_consistency.world.presets import VAEConfig, warmup_cosine


def make_vae(config: VAEConfig, resolution: int):
    """A randomly initialised `AutoencoderKL` with len(block_out_channels) - 1 downsamplings."""
    from diffusers import AutoencoderKL

    levels = len(config.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=min(32, config.block_out_channels[0]),
        sample_size=resolution,
    )


def to_unit_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 images [B,3,H,W] -> float32 in [-1, 1]."""
    return images_uint8.float().div(127.5).sub(1.0)


def foreground_weights(x: torch.Tensor, foreground_weight: float) -> torch.Tensor:
    """Per-pixel weights [B,1,H,W]: `foreground_weight` where a pixel's colour is off the image's median
    colour by more than 0.1 (in [-1, 1] units, summed over channels), 1 elsewhere."""
    median = x.flatten(2).median(dim=2).values[..., None, None]
    return 1 + (foreground_weight - 1) * ((x - median).abs().sum(dim=1, keepdim=True) > 0.1).float()


def vae_loss(vae, x: torch.Tensor, kl_weight: float, foreground_weight: float, generator: torch.Generator) -> torch.Tensor:
    """Per image, the weighted mean of |x - x̂| + (x - x̂)², averaged over images, + kl_weight · KL / pixels, x̂ decoded
    from a posterior sample.

    The weights are `foreground_weights`: a world image is one small object on a plain background, and
    an unweighted per-pixel loss is nearly all background (a small object is ~4 % of a 32 px image). Each image
    weighs the same in the batch, whatever its share of foreground (a digit's strokes cover ten times a shape's).
    """
    posterior = vae.encode(x).latent_dist
    x_hat = vae.decode(posterior.sample(generator)).sample.float()
    weights = foreground_weights(x, foreground_weight)
    per_image = (weights * ((x_hat - x).abs() + (x_hat - x) ** 2)).sum((1, 2, 3)) / (weights.sum((1, 2, 3)) * x.shape[1])
    reconstruction = per_image.mean()
    kl = posterior.kl().float().mean() / x[0].numel()
    return reconstruction + kl_weight * kl


def train_vae(
    vae,
    images: torch.Tensor,
    config: VAEConfig,
    phase: Phase,
    pretraining_images: torch.Tensor | None = None,
) -> list[float]:
    """Train on uint8 `images` [N,3,H,W] (batches drawn with replacement); returns the loss per step.

    With `pretraining_images`, `config.pretraining_fraction` of every batch is drawn from them instead.
    On CUDA the forward pass runs under bfloat16 autocast; weights and optimizer stay float32.
    """
    device, generator = phase.device, phase.generator
    images = images.to(device)
    extra = pretraining_images.to(device) if pretraining_images is not None and len(pretraining_images) else None
    n_extra = round(config.batch_size * config.pretraining_fraction) if extra is not None else 0
    vae.to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=0.0)
    scheduler = warmup_cosine(optimizer, config.steps)

    def loss_fn() -> torch.Tensor:
        index = torch.randint(len(images), (config.batch_size - n_extra,), device=device, generator=generator)
        batch = images[index]
        if n_extra:
            batch = torch.cat([batch, extra[torch.randint(len(extra), (n_extra,), device=device, generator=generator)]])
        x = to_unit_range(batch)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return vae_loss(vae, x, config.kl_weight, config.foreground_weight, generator)

    losses = phase.fit(dict(vae=vae), optimizer, scheduler, loss_fn, config.steps, "vae")
    vae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def set_scaling_factor(vae, images: torch.Tensor, batch_size: int = 256) -> float:
    """Write 1 / std(posterior means of `images`) into `vae.config.scaling_factor`; returns it."""
    device = next(vae.parameters()).device
    means = [vae.encode(to_unit_range(images[i : i + batch_size].to(device))).latent_dist.mean for i in range(0, len(images), batch_size)]
    scaling_factor = float(1.0 / torch.cat(means).float().std())
    vae.register_to_config(scaling_factor=scaling_factor)
    return scaling_factor
