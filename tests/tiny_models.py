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


def save_tiny_lora(folder: Path, model_folder: Path, rank: int = 4, seed: int = 0) -> Path:
    """A random (non-zero) LoRA for a tiny model's UNet, saved as its pipeline's `save_lora_weights` saves one (SD or SDXL)."""
    import diffusers
    from diffusers import DiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(model_folder, subfolder="unet")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    pipeline = getattr(diffusers, DiffusionPipeline.load_config(str(model_folder))["_class_name"])
    pipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True)
    return folder


def make_tiny_sdxl_components(tmp: Path, time_cond_proj_dim: int | None = None, seed: int = 0, prediction_type: str = "epsilon"):
    """Tiny random SDXL-architecture parts (diffusers' own test sizes): two CLIP text encoders (the second with a pooled
    projection), a UNet with `addition_embed_type="text_time"` (pooled 32 + 6 time ids x 8), an AutoencoderKL."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = make_tokenizer(tmp / "tok-src")
    text_config = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                       max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, projection_dim=32, hidden_act="gelu")
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
        cross_attention_dim=64, time_cond_proj_dim=time_cond_proj_dim,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16, scaling_factor=0.13025,
    )
    # SDXL ships an EulerDiscreteScheduler config over SD's scaled-linear betas
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                       timestep_spacing="leading", prediction_type=prediction_type)
    for m in (unet, vae, text_encoder, text_encoder_2):
        m.eval()
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer, scheduler=scheduler)


def save_tiny_sdxl(folder: Path, seed: int = 0, time_cond_proj_dim: int | None = None, lcm: bool = False) -> Path:
    """A tiny random StableDiffusionXLPipeline folder saved by diffusers; `lcm`: with an LCMScheduler and an ω input (an
    SDXL LCM as diffusers loads one)."""
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    parts = make_tiny_sdxl_components(folder.parent / f".{folder.name}-build", time_cond_proj_dim or (32 if lcm else None), seed)
    if lcm:
        parts["scheduler"] = LCMScheduler.from_config(parts["scheduler"].config)
    StableDiffusionXLPipeline(**parts, add_watermarker=False).save_pretrained(folder, safe_serialization=True)
    return folder


def save_tiny_clip(folder: Path) -> Path:
    """A tiny random CLIP model (32 px images) and its tokenizer saved as one folder, for CLIP scores and CLIP-feature FID."""
    from transformers import CLIPConfig, CLIPModel

    tokenizer = make_tokenizer(folder.parent / f".{folder.name}-tok")
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer),
                max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32, patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def make_t5_tokenizer():
    """A character-level T5 tokenizer (a `tokenizers` Unigram model over letters, digits and punctuation, with and without
    the word-start mark), built offline: pads with <pad> (id 0), ends every text with </s> (id 1), as T5's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)] + list(".,!?-'")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)] + [(c, -2.0) for c in chars] + [("▁" + c, -1.5) for c in chars]
    model = Tokenizer(models.Unigram(vocab, unk_id=2))
    model.pre_tokenizer, model.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    model.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=model, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0, model_max_length=512)


def make_tiny_pixart_components(seed: int = 0, sample_size: int = 8, patch_size: int = 2, learned_sigma: bool = True):
    """Tiny random PixArt-α-architecture parts (diffusers' own test sizes): a T5 encoder, a `PixArtTransformer2DModel`
    (learned sigma: 2x output channels; `sample_size` 128 makes it take the 1024-px models' resolution and aspect-ratio
    conditions), an AutoencoderKL and PixArt's DPM-Solver++ scheduler config over linear betas."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = make_t5_tokenizer()
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                           relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    transformer = PixArtTransformer2DModel(
        sample_size=sample_size, num_layers=2, patch_size=patch_size, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8 if learned_sigma else 4, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16, scaling_factor=0.18215,
    )
    scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    for m in (transformer, vae, text_encoder):
        m.eval()
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def save_tiny_pixart(folder: Path, seed: int = 0, sample_size: int = 8, patch_size: int = 2, lcm: bool = False) -> Path:
    """A tiny random PixArtAlphaPipeline folder saved by diffusers; `lcm`: with an LCMScheduler and a transformer with
    no ω input (PixArt-LCM as diffusers loads it)."""
    from diffusers import LCMScheduler, PixArtAlphaPipeline

    parts = make_tiny_pixart_components(seed, sample_size, patch_size)
    if lcm:
        parts["scheduler"] = LCMScheduler.from_config(parts["scheduler"].config)
    PixArtAlphaPipeline(**parts).save_pretrained(folder, safe_serialization=True)
    return folder


def write_captioned_images(folder: Path, count: int, caption: str = "a red star number {i}", size: tuple[int, int] = (16, 16)) -> Path:
    """`count` random RGB images (height, width = `size`) with captions `caption.format(i=i)` in a metadata.jsonl image folder."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": caption.format(i=i)}) + "\n")
    return folder


def load_pipeline(folder: Path, scheduler: str | None = None, **scheduler_kwargs):
    """The diffusers pipeline a saved folder names (DiffusionPipeline picks the class), on the CPU, quiet; `scheduler`:
    a diffusers scheduler class name to swap in, made from the folder's scheduler config with `scheduler_kwargs`."""
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config, **scheduler_kwargs)
    return pipe


def write_run(folder: Path, command: str = "distill", checkpoint: bool = True, **overrides) -> Path:
    """A training run folder of the `world` preset on the shipped world, as `lcm evaluate sweep` checks one before scoring it:
    its config.json and (`checkpoint`) one checkpoint's state.json, without weights. `command`: distill or finetune."""
    from latent_consistency.training.config import DistillConfig, FinetuneConfig, resolve_config
    from latent_consistency.world.artifact import default_world_path

    cls, model = (DistillConfig, "teacher") if command == "distill" else (FinetuneConfig, "model")
    config = resolve_config(cls, "world", overrides={model: str(default_world_path()), "data": "world:shapes", "out": str(folder),
                                                     **overrides})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    if checkpoint:
        (folder / "checkpoints" / "step-0000002").mkdir(parents=True)
        (folder / "checkpoints" / "step-0000002" / "state.json").write_text(json.dumps({"step": 2}))
    return folder


def sample_as_its_model_card_says(folder: Path, **call):
    """Run the diffusers snippet of the model card (README.md) an export carries, as a user copies it, and return its image:
    the card's usage is checked against diffusers, not only written. `call`: keyword arguments added to the pipeline call
    that a tiny model needs (a tiny PixArt's sample size is in none of its pipeline's resolution bins)."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / "README.md")
    snippet = card.text.split("```python\n", 1)[1].split("```", 1)[0]
    extra = "".join(f", {name}={value!r}" for name, value in call.items())
    assert snippet.count(").images[0]") == 1, snippet
    snippet = snippet.replace(").images[0]", f"{extra}).images[0]").replace("pipe(", "pipe.set_progress_bar_config(disable=True) or pipe(", 1)
    scope: dict = {}
    exec(snippet, scope)
    return card, scope["image"]
