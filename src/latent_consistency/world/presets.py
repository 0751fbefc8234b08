"""Named configurations of the built-in world: `tiny` (tests, seconds), `default` (the demo), `large` (GPU), and
`tiny-sdxl` / `default-sdxl`, the same worlds with an SDXL-architecture teacher (`TeacherConfig.architecture`).

A preset fixes everything `lcm world build` does: the dataset and its size, every network's shape,
every training run's steps, batch and learning rate, the quality measurement, and the seed. It is
saved as `world.json` in the world folder, so a world records how it was made.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from latent_consistency.errors import UserError

WARMUP_FRACTION = 0.05


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = 1024  # at most this many tokens, the 512 byte symbols (with and without "</w>") included
    max_length: int = 20  # tokens per prompt, <|startoftext|> and <|endoftext|> included; SD pads to it


@dataclass(frozen=True)
class JudgeConfig:
    steps: int = 400  # training steps of the judge (attribute classifier and FID features)
    batch_size: int = 128


@dataclass(frozen=True)
class VAEConfig:
    block_out_channels: tuple[int, ...] = (32, 64, 64)  # one entry per level: len - 1 downsamplings
    layers_per_block: int = 2
    latent_channels: int = 4  # as Stable Diffusion
    kl_weight: float = 1e-6  # weight of KL(q(z|x) || N(0, I)) next to the per-pixel L1 + L2 loss
    foreground_weight: float = 20.0  # loss weight of object pixels against background ones (see vae.py)
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1.5e-3  # AdamW peak learning rate (see `warmup_cosine`)
    scale_samples: int = 2048  # images whose latent standard deviation sets `scaling_factor`
    pretraining_fraction: float = 0.1  # share of each batch drawn from the preset's pretraining datasets (if any)


@dataclass(frozen=True)
class TextEncoderConfig:
    hidden_size: int = 128  # also the UNet's cross_attention_dim
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 256
    steps: int = 300  # pre-training on caption -> attributes (see world/text_encoder.py)
    batch_size: int = 256
    lr: float = 1e-3


ARCHITECTURES = ("sd", "sdxl")


@dataclass(frozen=True)
class TeacherConfig:
    # "sd": a StableDiffusionPipeline (one text encoder's last hidden state). "sdxl": a StableDiffusionXLPipeline: two text
    # encoders' penultimate hidden states side by side, the second's pooled projection and the six size numbers through
    # the UNet's `addition_embed_type="text_time"` (Podell et al. 2023); the second encoder is derived from the first
    # (world/text_encoder.py). A world.json without the key is an "sd" world.
    architecture: str = "sd"
    block_out_channels: tuple[int, ...] = (64, 128, 128)  # UNet levels: cross-attention on all but the last
    layers_per_block: int = 1
    attention_head_dim: int = 8  # diffusers' SD1 meaning: the number of heads
    steps: int = 1600
    batch_size: int = 2048
    lr: float = 1e-3  # AdamW peak learning rate (see `warmup_cosine`)
    ema_decay: float = 0.998  # the saved teacher is the EMA of the trained weights
    caption_dropout: float = 0.1  # fraction of captions replaced by "" (classifier-free guidance)
    # Rescale SD's schedule to ᾱ_{T-1} = 0 (Lin et al. 2023), so that sampling from pure noise at t = T-1 is
    # what the teacher was trained on; needs a v-prediction teacher (ε carries no signal at zero SNR).
    zero_terminal_snr: bool = False
    addition_time_embed_dim: int = 32  # "sdxl": the sinusoidal embedding size of each size number (SDXL's is 256)


@dataclass(frozen=True)
class QualityConfig:
    num_samples: int = 1000  # generated images for prompt alignment and FID, per guidance scale
    sampler: str = "dpm++"  # DPM-Solver++(2M), the sampler the quality bar is stated for
    num_steps: int = 25
    guidance_scale: float = 7.5
    grid_prompts: int = 8  # rows of the sample grid: a real image, then `grid_samples` samples
    grid_samples: int = 7
    vae_samples: int = 1000  # real images reconstructed for the judge-accuracy check of the VAE


@dataclass(frozen=True)
class WorldPreset:
    """Everything `lcm world build` makes, and how."""

    name: str
    dataset: str = "shapes"  # `latent_consistency.world.datasets` name
    resolution: int = 32  # image side in pixels; the latent side is resolution / VAE factor
    train_size: int = 50_000  # training images (the VAE's, the text encoder's and the teacher's)
    # Datasets whose training splits the general-purpose parts (tokenizer, text encoder, VAE) also learn from, as
    # SD's VAE and CLIP were trained on far more than SD's own data; the teacher never sees them. They make the
    # world's latent space and text encoder fit for fine-tuning on data the teacher never saw (`lcm finetune`).
    pretraining_datasets: tuple[str, ...] = ()
    seed: int = 0  # seeds the data, every initialisation and every training run
    checkpoint_every: int = 1000  # training steps between resumable checkpoints inside a phase
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_factor

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> WorldPreset:
        """The inverse of `to_dict` (JSON lists become tuples again)."""
        def tuples(v):
            return tuple(v) if isinstance(v, list) else v

        kwargs = {key: _SUB_CONFIGS[key](**{k: tuples(v) for k, v in value.items()}) if key in _SUB_CONFIGS else tuples(value)
                  for key, value in d.items()}
        return cls(**kwargs)


_SUB_CONFIGS = {
    "tokenizer": TokenizerConfig,
    "judge": JudgeConfig,
    "vae": VAEConfig,
    "text_encoder": TextEncoderConfig,
    "teacher": TeacherConfig,
    "quality": QualityConfig,
}

PRESETS: dict[str, WorldPreset] = {
    # Plumbing only: shapes, round trips, finiteness and a falling loss in a test; never quality.
    "tiny": WorldPreset(
        name="tiny",
        train_size=256,
        pretraining_datasets=("digits",),
        checkpoint_every=10,
        tokenizer=TokenizerConfig(vocab_size=600, max_length=20),
        judge=JudgeConfig(steps=20, batch_size=32),
        vae=VAEConfig(block_out_channels=(16, 32, 32), layers_per_block=1, steps=30, batch_size=16, lr=2e-3, scale_samples=64),
        text_encoder=TextEncoderConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, steps=20, batch_size=32),
        teacher=TeacherConfig(block_out_channels=(32, 32, 64), layers_per_block=1, attention_head_dim=2, steps=40, batch_size=16, lr=2e-3, ema_decay=0.9),
        quality=QualityConfig(num_samples=8, num_steps=2, grid_prompts=2, grid_samples=2, vae_samples=8),
    ),
    # The demo's world, shipped in fp16 (assets/world_default): sized to build in about 55 minutes on a
    # 2-core CPU (phases measured in docs/world.md); its small teacher also keeps the demo's distillation fast.
    "default": WorldPreset(
        name="default",
        pretraining_datasets=("digits",),
        checkpoint_every=500,
        judge=JudgeConfig(steps=600, batch_size=128),
        vae=VAEConfig(steps=1500, batch_size=64),
        teacher=TeacherConfig(block_out_channels=(32, 64, 64), steps=3000, batch_size=128, ema_decay=0.999),
    ),
    # 64 px, wider networks and longer training: for a GPU.
    "large": WorldPreset(
        name="large",
        resolution=64,
        train_size=200_000,
        checkpoint_every=2000,
        judge=JudgeConfig(steps=6000, batch_size=256),
        vae=VAEConfig(block_out_channels=(32, 64, 128), layers_per_block=2, steps=20000, batch_size=128),
        text_encoder=TextEncoderConfig(hidden_size=256, num_layers=4, num_heads=8, intermediate_size=512, steps=3000),
        teacher=TeacherConfig(block_out_channels=(128, 256, 256), layers_per_block=2, steps=60000, batch_size=512, lr=3e-4, ema_decay=0.9999),
        quality=QualityConfig(num_samples=2000),
    ),
}


# The SDXL-architecture worlds: the same sizes, steps and seeds, the teacher's conditioning SDXL's.
PRESETS["tiny-sdxl"] = dataclasses.replace(
    PRESETS["tiny"], name="tiny-sdxl", teacher=dataclasses.replace(PRESETS["tiny"].teacher, architecture="sdxl", addition_time_embed_dim=8)
)
PRESETS["default-sdxl"] = dataclasses.replace(
    PRESETS["default"], name="default-sdxl", teacher=dataclasses.replace(PRESETS["default"].teacher, architecture="sdxl")
)


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule of every `lr` above (the optimizer's): linear warm-up from lr/10 to
    lr over the first 5 % of the steps, then a half cosine down to lr/10."""
    warmup = max(1, round(WARMUP_FRACTION * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return 0.1 + 0.9 * step / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def get_preset(name: str) -> WorldPreset:
    if name not in PRESETS:
        raise UserError(f"unknown world preset {name!r}; use one of {', '.join(PRESETS)}")
    return PRESETS[name]
