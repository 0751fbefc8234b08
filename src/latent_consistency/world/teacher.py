"""The world's teacher: a diffusers `UNet2DConditionModel` trained as Stable Diffusion's was.

The DDPM loss (Ho et al. 2020) in SD's setting (Rombach et al. 2022): t ~ U{0..T-1} on SD's scaled-linear
schedule (β 0.00085-0.012, T = 1000), z_t = α_t·z0 + σ_t·ε, loss ||output - target||² with the target ε
(or v = α_t·ε - σ_t·z0 for the v-prediction variant, `parameterization.model_output_from`). A caption
is replaced by the empty caption "" with probability `caption_dropout`, which trains the unconditional
model of classifier-free guidance (Ho & Salimans 2022). The saved weights are an EMA of the trained
ones. The result is a standard `StableDiffusionPipeline` folder.

An SDXL-architecture teacher (`TeacherConfig.architecture == "sdxl"`) is the same UNet with SDXL's added conditioning
(`addition_embed_type="text_time"`: the pooled text embedding and the six size numbers, Podell et al. 2023) and linear
attention projections; c then carries both in its packed last row (`conditioning.AddedConditioning`), which the network
adapter (`denoisers.UNetNetwork`) unpacks. Caption dropout puts ∅ in c's place, so a dropped caption's pooled embedding
is zeros (∅ of a pipeline with `force_zeros_for_empty_prompt`) and its size numbers stay. It is saved as a
`StableDiffusionXLPipeline` folder.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from latent_consistency.conditioning import TIME_IDS
from latent_consistency.denoisers import UNetNetwork
from latent_consistency.parameterization import check_prediction_type, model_output_from
from latent_consistency.schedule import NoiseSchedule
from latent_consistency.training.ema import ema_update
from latent_consistency.world.fit import Phase
from latent_consistency.world.presets import TeacherConfig, warmup_cosine


def teacher_scheduler_config(prediction_type: str = "epsilon", zero_terminal_snr: bool = False) -> dict:
    """Stable Diffusion's training schedule as a `DDIMScheduler` config (as SD 2 ships it).

    With `zero_terminal_snr` the betas are rescaled to ᾱ_{T-1} = 0 and inference steps are spaced
    "trailing" (so that the first one is t = T-1), the two changes of Lin et al. 2023 (Sections 3.1, 3.3).
    """
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="trailing" if zero_terminal_snr else "leading",
        rescale_betas_zero_snr=zero_terminal_snr,
        prediction_type=check_prediction_type(prediction_type),
    )


def make_teacher_unet(config: TeacherConfig, latent_size: int, latent_channels: int, cross_attention_dim: int,
                      pooled_dim: int | None = None):
    """A randomly initialised SD-style UNet: cross-attention at every level but the lowest, as SD's. An "sdxl" one also
    takes a pooled text embedding of `pooled_dim` and the six size numbers (`addition_embed_type="text_time"`)."""
    from diffusers import UNet2DConditionModel

    levels = len(config.block_out_channels)
    sdxl = {}
    if config.architecture == "sdxl":
        if pooled_dim is None:
            raise ValueError("an SDXL-architecture teacher needs the pooled text embedding's size (pooled_dim)")
        sdxl = dict(addition_embed_type="text_time", addition_time_embed_dim=config.addition_time_embed_dim,
                    projection_class_embeddings_input_dim=pooled_dim + TIME_IDS * config.addition_time_embed_dim,
                    use_linear_projection=True)
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        attention_head_dim=config.attention_head_dim,
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=min(32, config.block_out_channels[0]),
        **sdxl,
    )


def train_teacher(
    unet,
    latents: torch.Tensor,
    caption_index: torch.Tensor,
    text_embeddings: torch.Tensor,
    uncond_embedding: torch.Tensor,
    scheduler_config: dict,
    config: TeacherConfig,
    phase: Phase,
):
    """Train `unet` on cached latents; returns (the EMA UNet, the loss per step).

    `latents` [N,C,h,w] are scaled latents z0 = E(x); sample i's condition is `text_embeddings[caption_index[i]]`
    ([L,D]: an SDXL condition's last row packs its pooled embedding and size numbers); `uncond_embedding` [L,D] is ∅.
    On CUDA the UNet runs under bfloat16 autocast; weights, optimizer and EMA stay float32.
    """
    device, generator = phase.device, phase.generator
    prediction_type = check_prediction_type(scheduler_config.get("prediction_type", "epsilon"))
    schedule = NoiseSchedule.from_config(scheduler_config)
    latents, caption_index = latents.to(device), caption_index.to(device)
    text_embeddings, uncond = text_embeddings.to(device), uncond_embedding.to(device)
    unet.to(device).train()
    ema = copy.deepcopy(unet).requires_grad_(False).eval()
    network = UNetNetwork(unet)  # unpacks an SDXL condition's added row
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=0.0)
    scheduler = warmup_cosine(optimizer, config.steps)

    def loss_fn() -> torch.Tensor:
        index = torch.randint(len(latents), (config.batch_size,), device=device, generator=generator)
        z0 = latents[index]
        # Caption dropout: the unconditional model of classifier-free guidance.
        drop = torch.rand(config.batch_size, device=device, generator=generator) < config.caption_dropout
        cond = torch.where(drop[:, None, None], uncond, text_embeddings[caption_index[index]])
        # Forward process at a uniform timestep.
        t = torch.randint(schedule.num_train_timesteps, (config.batch_size,), device=device, generator=generator)
        eps = torch.randn(z0.shape, device=device, generator=generator)
        alpha, sigma = schedule.alpha_sigma(t)
        z_t = schedule.add_noise(z0, eps, t)
        target = model_output_from(z0, eps, alpha, sigma, prediction_type)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            output = network(z_t, t, cond)
        return F.mse_loss(output.float(), target)

    def update_ema(step: int) -> None:
        # EMA with the usual warm-up, so that a short run is not dominated by the initialisation.
        ema_update(ema, unet, min(config.ema_decay, (1 + step) / (10 + step)))

    losses = phase.fit(dict(unet=unet, ema=ema), optimizer, scheduler, loss_fn, config.steps, "teacher", after_step=update_ema)
    unet.eval().requires_grad_(False)
    return ema, losses
