"""LCM-LoRA sampling on the CPU, side by side in one process: our generator (which fuses the LoRA, `models.fuse_loras`)
against the same model with the LoRA left unfused (`load_lcm_lora`, as before) and against diffusers' LCM-LoRA recipe,
`StableDiffusionPipeline` with its `LCMScheduler` and `load_lora_weights`, unfused and after `fuse_lora()`.

    python benchmarks/lora_fuse_speed.py            # about 2 minutes on one thread

The model: a Stable Diffusion-architecture UNet of random weights, narrower than SD 1.5 so that it runs in seconds
(`[128, 256, 256]` channels, 32x32 latents, 256-wide text encoder), with a rank-64 LoRA on the LCM-LoRA's layers
(`training.students.LORA_TARGET_MODULES`). 4-step text to image at g = 1 (no CFG pass), batch 1, float32, eager; calls in
turn, median of --repeats; each row gives its largest difference from our fused images. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from latent_consistency.models import add_style_loras, load_lcm_lora
from latent_consistency.pipelines import LCMGenerator
from latent_consistency.training.students import LORA_TARGET_MODULES

PROMPT, STEPS, SEED = "a red star", 4, 0


def make_model(root: Path) -> tuple[Path, Path]:
    """An SD-architecture pipeline folder of random weights and a rank-64 LoRA folder for it, written under `root`."""
    from diffusers import AutoencoderKL, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2} | {f"{w}</w>": i + 3 for i, w in enumerate(["a", "red", "star"])}
    (root / "tok").mkdir(parents=True)
    (root / "tok" / "vocab.json").write_text(__import__("json").dumps(vocab))
    (root / "tok" / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(root / "tok" / "vocab.json"), str(root / "tok" / "merges.txt"), model_max_length=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                                num_hidden_layers=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(sample_size=32, block_out_channels=(128, 256, 256), layers_per_block=1, cross_attention_dim=256,
                                attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2)
    vae = AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=64, scaling_factor=0.5)
    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(root / "sd")
    unet.add_adapter(LoraConfig(r=64, lora_alpha=64, init_lora_weights=False, target_modules=LORA_TARGET_MODULES))
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data.mul_(0.01)  # a LoRA of an LCM-LoRA's size of effect, not one that swamps the weights
    StableDiffusionPipeline.save_lora_weights(root / "lora", unet_lora_layers=get_peft_model_state_dict(unet))
    return root / "sd", root / "lora"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model, lora = make_model(Path(tmp))
        cpu = torch.device("cpu")
        ours = LCMGenerator.load(str(model), cpu, torch.float32, str(lora))
        unfused = LCMGenerator(add_style_loras(load_lcm_lora(str(model), str(lora)), []), cpu, torch.float32)
        theirs, theirs_fused = (StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None) for _ in range(2))
        for pipe in (theirs, theirs_fused):
            pipe.load_lora_weights(str(lora))
            pipe.set_progress_bar_config(disable=True)
        theirs_fused.fuse_lora()
        size = ours.default_size()

        def ours_call(generator):
            return lambda: (generator([PROMPT], ours.timesteps(STEPS), 1.0, [SEED], size, size).float() / 2 + 0.5).clamp(0, 1)

        def theirs_call(pipe):
            return lambda: torch.from_numpy(pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=1.0, height=size, width=size,
                                                 generator=torch.Generator().manual_seed(SEED), output_type="np").images).permute(0, 3, 1, 2)

        rows = {"ours, fused (lcm generate, serve, evaluate)": ours_call(ours), "ours, unfused (before)": ours_call(unfused),
                "diffusers, load_lora_weights": theirs_call(theirs), "diffusers, load_lora_weights + fuse_lora": theirs_call(theirs_fused)}
        reference = rows["ours, fused (lcm generate, serve, evaluate)"]()
        differences = {name: float((fn() - reference).abs().max()) for name, fn in rows.items()}  # also the warm-up
        times = {name: [] for name in rows}
        for _ in range(args.repeats):
            for name, fn in rows.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    fastest = statistics.median(times["ours, fused (lcm generate, serve, evaluate)"])
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, one thread; 4-step {size}x{size} px, batch 1, g = 1\n")
    print("| sampler | ms per image (median) | × ours fused | max abs difference from ours fused (images in [0, 1]) |")
    print("|---|---|---|---|")
    for name in rows:
        median = statistics.median(times[name])
        print(f"| {name} | {median * 1000:.0f} | {median / fastest:.2f} | {differences[name]:.1e} |")


if __name__ == "__main__":
    main()
