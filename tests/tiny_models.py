"""Tiny random Stable-Diffusion-architecture models that the tests build and save themselves."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def make_tokenizer(folder: Path):
    """A character-level CLIP BPE tokenizer (no merges) written as vocab.json + merges.txt."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)] + list(".,!?-'")
    vocab = {}
    for tok in chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab[tok] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    return tok


def make_tiny_components(tmp: Path, prediction_type: str = "epsilon", time_cond_proj_dim: int | None = None, seed: int = 0,
                         num_train_timesteps: int = 1000):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = make_tokenizer(tmp / "tok-src")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
            num_hidden_layers=2, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=32, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        time_cond_proj_dim=time_cond_proj_dim,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=16, scaling_factor=0.5,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, prediction_type=prediction_type, num_train_timesteps=num_train_timesteps,
    )
    for m in (unet, vae, text_encoder):
        m.eval()
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def save_tiny_sd(folder: Path, prediction_type: str = "epsilon", seed: int = 0, num_train_timesteps: int = 1000) -> Path:
    """A tiny random StableDiffusionPipeline folder (the teacher)."""
    from diffusers import StableDiffusionPipeline

    parts = make_tiny_components(folder.parent / f".{folder.name}-build", prediction_type, seed=seed, num_train_timesteps=num_train_timesteps)
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def save_tiny_lcm(folder: Path, seed: int = 0, time_cond_proj_dim: int = 32, prediction_type: str = "epsilon",
                  zero_terminal_snr: bool = False, num_train_timesteps: int = 1000, original_inference_steps: int = 50,
                  timestep_scaling: float = 10.0) -> Path:
    """A tiny random LatentConsistencyModelPipeline folder saved by diffusers itself."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    parts = make_tiny_components(folder.parent / f".{folder.name}-build", prediction_type, time_cond_proj_dim, seed=seed,
                                 num_train_timesteps=num_train_timesteps)
    parts["scheduler"] = LCMScheduler.from_config(parts["scheduler"].config, original_inference_steps=original_inference_steps,
                                                  rescale_betas_zero_snr=zero_terminal_snr, timestep_scaling=timestep_scaling)
    pipe = LatentConsistencyModelPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def save_tiny_lora(folder: Path, tiny_sd: Path, rank: int = 4, seed: int = 0) -> Path:
    """A random (non-zero) LoRA for the tiny teacher's UNet, saved as diffusers' `save_lora_weights` saves one."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True)
    return folder
