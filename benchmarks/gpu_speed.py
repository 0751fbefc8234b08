"""GPU speed of the library against diffusers at Stable Diffusion 1.5 and SDXL size (random weights): one run of under
5 minutes on one H100/H200, its markdown table printed last.

    python benchmarks/gpu_speed.py --out "$OUT"                  # CUDA: float16 (--dtype bfloat16), torch.compile rows
    python benchmarks/gpu_speed.py --tiny --out /tmp/gpu-speed   # the same code paths with tiny models, CPU, float32

Random weights at SD 1.5's architecture (UNet, VAE, CLIP ViT-L/14 text encoder, a character-level CLIP tokenizer built
offline, 77 tokens) are saved as a StableDiffusionPipeline folder (the teacher) and an LCM folder (its student with the ω
input, time_cond_proj_dim 256, and an LCMScheduler), so that our loaders and diffusers' read the same weights. Rows, in
the order they run (one that would not fit what is left of --budget-seconds is skipped with a note):

1. Text to image, 512², 4 steps, batch 1 and 16, prompts in and decoded images out (text encoder, UNet, VAE decode):
   `LCMGenerator` against diffusers' `LatentConsistencyModelPipeline` (eager), same prompts and per-image seeds (so the
   same noise), calls alternating, median of --repeats rounds; the largest difference between their images. Ours runs
   its text encoder on every prompt of every call (a fresh prompt cache per call), as diffusers' pipeline does; ours with
   its prompt cache warm (a server asked for the same prompts again) is timed in the same rounds and given in the note.
2. One LCD step (Algorithm 1 as the `sd` preset trains it: DDIM, pseudo-Huber, fp32 student under autocast, half-precision
   teacher, EMA target, gradient checkpointing, AdamW) at batch 16: ours as `lcm distill` builds and runs it (latents and
   text embeddings from the cache, random ones here; cond and uncond teacher passes in one batch; the fused EMA) against a
   diffusers-style step written here after diffusers' train_lcd_distill_sd_wds.py (VAE encode of 512² images, in slices of
   its --vae_encode_batch_size default 32, and text encode in the step, separate cond and uncond teacher passes, a
   Python-loop EMA). Neither uses a GradScaler (accelerate
   adds one under fp16: a few foreach kernels per step).
3. SDXL (issue 20): one LCD step of a full SDXL-base-size student (the `sdxl` preset: 1024² latents, fp16 teacher,
   gradient checkpointing) and of an SDXL LCM-LoRA (`sdxl-lora`, rank 64) at batch --sdxl-batch (halved on out of memory),
   the condition packed as `conditioning.AddedConditioning` lays it out: 77 tokens of 2048, then one row carrying the pooled
   1280 and the 6 time ids.
4. Text to image with `torch.compile` of our text encoder, UNet and VAE decoder, as `lcm generate --compile` does
   (--compile, default on with CUDA), batch 16 then 1, against row 1's eager diffusers pipeline timed again in the same
   rounds (not its time from minutes before); compile time or failure in the note.
5. With --compile, row 2 again with our student, target and teacher compiled (`lcm distill --compile`).
6. The VAE decode of 16 latents to 512², eager: ours (`upsampling.use_subpixel_upsampling`, every nearest-2× upsampling
   and 3×3 convolution as one 2×2 convolution of the small input, as every generator decodes) against diffusers'
   `Upsample2D` modules, same weights and latents.

FLOPs per call: torch.utils.flop_counter.FlopCounterMode over each side's first (warm-up) call or step (the same path
as the timed calls: ours encodes its prompts in each), and one UNet forward per model; achieved TFLOP/s are set against
a timed 8192³ bf16 matmul on the same card. Peak memory: torch.cuda.max_memory_allocated, reset before each side's
first call. Times are CUDA-synchronised perf_counter medians.
The table (device, torch and diffusers versions, date) is printed last; every number goes to --out/gpu_speed.json after
each row, so a run stopped early (SIGTERM prints the table too) keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import signal
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from latent_consistency.conditioning import AddedConditioning, time_ids
from latent_consistency.denoisers import UNetNetwork
from latent_consistency.models import DiffusionModel, lcm_scheduler_config, make_student_unet, save_diffusion_pipeline, save_lcm_pipeline
from latent_consistency.parameterization import consistency_output, guidance_embedding, x0_and_eps
from latent_consistency.pipelines import LCMGenerator
from latent_consistency.prompts import PromptCache
from latent_consistency.schedule import append_dims
from latent_consistency.training.config import DistillConfig, resolve_config
from latent_consistency.training.ema import ema_update
from latent_consistency.training.loop import build_loss
from latent_consistency.training.objectives import freeze_in_half_precision, objective_of
from latent_consistency.training.students import make_student
from latent_consistency.upsampling import use_subpixel_upsampling
from sd_scale import SD_SCHEDULER, make_unet

GUIDANCE_SCALE = 8.0  # an LCM's default g (ω = 7)
STEPS = 4
SAMPLING_BATCHES = (1, 16)
TRAIN_BATCH = 16
TOKENS = 77
PROMPTS = [f"a photo of {thing}, {style}" for thing in ("a red fox in snow", "a lighthouse at dusk", "a bowl of ramen", "an old tram")
           for style in ("studio light", "watercolour", "35mm film", "isometric render")]
# Seconds a row needs at least on an H100 (set-up included): a row is skipped when less than this is left
ROW_SECONDS = {"sampling": 15, "lcd": 40, "sdxl": 60, "compile": 120, "decode": 10}
VAE_ENCODE_BATCH_SIZE = 32  # diffusers' LCD script's --vae_encode_batch_size default


class OutOfTime(BaseException):
    """SIGTERM (the session's `timeout`): stop measuring, print what was measured. Not an Exception, so that the
    handlers that turn a failed row into a note let it through."""


@dataclass
class Row:
    name: str
    batch: int | None = None
    unit: str = "images/s"
    ours_s: float | None = None
    theirs_s: float | None = None
    ours_flops: float | None = None
    theirs_flops: float | None = None
    ours_peak_gib: float | None = None
    theirs_peak_gib: float | None = None
    max_abs_difference: float | None = None
    note: str = ""


class Budget:
    """The run's time left, checked between rows."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def fits(self, kind: str) -> bool:
        return self.left() >= ROW_SECONDS[kind]

    def repeats(self, per_call: float, wanted: int) -> int:
        """Timed calls of a row: `wanted`, fewer when they would take more than half of what is left (at least one)."""
        return max(1, min(wanted, int(self.left() / 2 / max(per_call, 1e-6))))


# --- models ---

def make_tokenizer(folder: Path):
    """A character-level CLIP tokenizer (no merges, as tests/tiny_models.py makes it) that pads to SD's 77 tokens."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)] + list(".,!?-'")
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=TOKENS)


def make_text_encoder(tokenizer, tiny: bool):
    """CLIP ViT-L/14's text transformer (SD 1.5's text encoder; its full 49,408-token embedding), or a tiny one."""
    from transformers import CLIPTextConfig, CLIPTextModel

    size = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2) if tiny \
        else dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768)
    return CLIPTextModel(CLIPTextConfig(**size, max_position_embeddings=TOKENS, hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def make_vae(tiny: bool, scaling_factor: float = 0.18215):
    """SD's AutoencoderKL (8x down, 4 latent channels; SDXL's differs in its scaling factor only), or a tiny one (2x)."""
    from diffusers import AutoencoderKL

    blocks = (32, 64) if tiny else (128, 256, 512, 512)
    return AutoencoderKL(block_out_channels=blocks, layers_per_block=1 if tiny else 2, down_block_types=("DownEncoderBlock2D",) * len(blocks),
                         up_block_types=("UpDecoderBlock2D",) * len(blocks), latent_channels=4, sample_size=16 if tiny else 512,
                         scaling_factor=scaling_factor)


def make_sdxl_unet(tiny: bool):
    """SDXL base's UNet (2,567 M parameters: pooled text + size micro-conditioning, 2048-wide cross-attention), or
    diffusers' tiny SDXL test UNet."""
    from diffusers import UNet2DConditionModel

    if tiny:
        return UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
                                    cross_attention_dim=64, use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                                    projection_class_embeddings_input_dim=32 + 6 * 8)
    return UNet2DConditionModel(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
                                transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


def save_sd_folders(folder: Path, tiny: bool, device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """Random SD 1.5-architecture weights in `dtype` as a StableDiffusionPipeline folder (the teacher) and an LCM folder
    (its student, `make_student_unet`, under the LCMScheduler config of k = 20): (teacher, lcm)."""
    torch.manual_seed(0)
    tokenizer = make_tokenizer(folder / "tokenizer-src")
    with torch.device(device):  # random init on the card: seconds, not a minute of CPU
        unet, vae, text_encoder = make_unet(tiny), make_vae(tiny), make_text_encoder(tokenizer, tiny)
        student = make_student_unet(unet)
    for module in (unet, vae, text_encoder, student):
        module.to(dtype).eval()
    teacher = save_diffusion_pipeline(folder / "sd", unet, vae, text_encoder, tokenizer, SD_SCHEDULER)
    base = DiffusionModel(unet, vae, text_encoder, tokenizer, SD_SCHEDULER, source="random SD 1.5")
    lcm = save_lcm_pipeline(folder / "lcm", student, base, lcm_scheduler_config(SD_SCHEDULER, skip=20))
    return str(teacher), str(lcm)


# --- measuring ---

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds_of(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def counted(fn):
    """(FLOPs, result) of one call of `fn`: matrix products, convolutions and attention, forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = fn()
    return counter.get_total_flops(), out


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def median_seconds(fn, device: torch.device, repeats: int, budget: Budget) -> float:
    """Median of timed calls after one untimed call (which also sizes how many fit the budget)."""
    n = budget.repeats(seconds_of(fn, device), repeats)
    return statistics.median(seconds_of(fn, device) for _ in range(n))


def matmul_tflops(device: torch.device, tiny: bool) -> float:
    """The card's rate on a large bf16 matmul (8192³; tiny: 512³ float32), 20 products timed together."""
    n, dtype = (512, torch.float32) if tiny else (8192, torch.bfloat16)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    return 2 * n**3 * 20 / seconds_of(lambda: [a @ b for _ in range(20)], device) / 1e12


def unet_forward_flops(unet, batch: int, cond: torch.Tensor) -> float:
    """FLOPs of one UNet forward at `batch` (latents at its native size; `cond` [1, L, D] repeated)."""
    size = unet.config.sample_size
    z = torch.randn(batch, unet.config.in_channels, size, size, device=unet.device, dtype=unet.dtype)
    t = torch.full((batch,), 999, device=unet.device)
    with torch.no_grad():
        return counted(lambda: UNetNetwork(unet)(z, t, cond.to(unet.dtype).expand(batch, -1, -1)))[0]


# --- 6: the VAE decode ---

def decode_row(lcm: str, device, dtype, batch: int, repeats: int, budget: Budget) -> Row:
    """Ours: the VAE's upsamplers replaced (`use_subpixel_upsampling`); theirs: diffusers' modules; the same latents."""
    from diffusers import AutoencoderKL

    theirs, ours = (AutoencoderKL.from_pretrained(lcm, subfolder="vae", torch_dtype=dtype).to(device).eval() for _ in range(2))
    replaced = use_subpixel_upsampling(ours)
    size = ours.config.sample_size // 2 ** (len(ours.config.block_out_channels) - 1)
    latents = torch.randn(batch, ours.config.latent_channels, size, size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    row = Row(f"VAE decode to {ours.config.sample_size}², eager ({replaced} upsamplers sub-pixel)", batch)
    with torch.no_grad():
        for side, vae in (("ours", ours), ("theirs", theirs)):
            reset_peak(device)
            decode = vae_decoding(vae, latents)
            flops, images = counted(decode)
            setattr(row, f"{side}_flops", flops)
            setattr(row, f"{side}_s", median_seconds(decode, device, repeats, budget))
            setattr(row, f"{side}_peak_gib", peak_gib(device))
            if side == "ours":
                reference = images.float().cpu()
        row.max_abs_difference = (images.float().cpu() - reference).abs().max().item()
    return row


def vae_decoding(vae, latents: torch.Tensor):
    return lambda: vae.decode(latents).sample


# --- 1 and 4: text to image ---

def ours_call(generator: LCMGenerator, batch: int, cached: bool = False):
    """Not `cached`: a fresh prompt cache per call, so the text encoder runs on every prompt, as in diffusers' pipeline."""
    size, timesteps = generator.default_size(), generator.timesteps(STEPS)

    def call():
        if not cached:
            generator.prompt_cache = PromptCache()
        return generator(PROMPTS[:batch], timesteps, GUIDANCE_SCALE, list(range(batch)), size, size)

    return call


def theirs_call(pipe, batch: int, size: int):
    def call():
        generators = [torch.Generator("cpu").manual_seed(s) for s in range(batch)]
        images = pipe(PROMPTS[:batch], num_inference_steps=STEPS, guidance_scale=GUIDANCE_SCALE, generator=generators, height=size,
                      width=size, output_type="pt").images
        return images * 2 - 1  # [0, 1] -> ours [-1, 1]

    return call


def largest_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Their images are clamped to [-1, 1] (diffusers' postprocessing), ours not."""
    return (ours.clamp(-1, 1).float().cpu() - theirs.float().cpu()).abs().max().item()


def sampling_rows(lcm: str, device, dtype, repeats: int, budget: Budget, record, results: dict) -> dict[int, tuple[Row, torch.Tensor, object]]:
    """Row 1, per batch: ours against diffusers, alternating, and ours with its prompt cache warm. Returns each batch's
    row, diffusers' images and its call (row 4 times it again)."""
    from diffusers import LatentConsistencyModelPipeline

    ours = LCMGenerator.load(lcm, device, dtype)
    pipe = LatentConsistencyModelPipeline.from_pretrained(lcm, dtype=dtype, safety_checker=None, requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    size = ours.default_size()
    results["sd_unet_params"] = sum(p.numel() for p in ours.model.unet.parameters())
    results["unet_forward_flops"] |= {f"SD 1.5, batch {b}": unet_forward_flops(ours.model.unet, b, ours.model.prompts.uncond(device))
                                      for b in SAMPLING_BATCHES}
    vae_dtypes = f"VAE {str(ours.model.vae.dtype).removeprefix('torch.')} (ours) / {str(pipe.vae.dtype).removeprefix('torch.')} (diffusers)"
    measured = {}
    for batch in SAMPLING_BATCHES:
        name = f"text to image {size}², {STEPS} steps"
        if not budget.fits("sampling"):
            record(Row(name, batch, note="skipped: over the time budget"))
            continue
        f_ours, f_theirs, f_cached = ours_call(ours, batch), theirs_call(pipe, batch, size), ours_call(ours, batch, cached=True)
        ours_flops, images = counted(f_ours)
        theirs_flops, reference = counted(f_theirs)
        n = budget.repeats(seconds_of(f_ours, device) + seconds_of(f_theirs, device) + seconds_of(f_cached, device), repeats)
        times = [(seconds_of(f_ours, device), seconds_of(f_theirs, device), seconds_of(f_cached, device)) for _ in range(n)]
        (ours_s, theirs_s, cached_s) = (statistics.median(t[i] for t in times) for i in range(3))
        row = Row(name, batch, ours_s=ours_s, theirs_s=theirs_s, ours_flops=ours_flops, theirs_flops=theirs_flops,
                  max_abs_difference=largest_difference(images, reference),
                  note=f"median of {n} round{'s' * (n > 1)}; ours with its prompts cached {batch / cached_s:.2f} images/s "
                       f"({theirs_s / cached_s:.2f}x); {vae_dtypes}")
        record(row)
        measured[batch] = (row, reference.cpu(), f_theirs)
    return measured


def compile_rows(lcm: str, device, dtype, repeats: int, budget: Budget, record, eager: dict[int, tuple[Row, torch.Tensor, object]]) -> None:
    """Row 4: our generator compiled as `lcm generate --compile` compiles it (`LCMGenerator.compile`: text encoder, UNet and
    VAE decoder in place; in float16/bfloat16 the weights frozen into the graph), batch 16 first, against diffusers'
    eager call of row 1 timed in the same rounds."""
    ours = LCMGenerator.load(lcm, device, dtype)
    ours.compile()
    for batch in sorted(eager, reverse=True):
        name = f"text to image {ours.default_size()}², {STEPS} steps, torch.compile"
        if not budget.fits("compile"):
            record(Row(name, batch, note="skipped: over the time budget"))
            continue
        row, reference, f_theirs = eager[batch]
        f_ours = ours_call(ours, batch)
        try:
            t0 = time.perf_counter()
            images = f_ours()
            sync(device)
            compile_s = time.perf_counter() - t0
            n = budget.repeats(seconds_of(f_ours, device) + seconds_of(f_theirs, device), repeats)
            times = [(seconds_of(f_ours, device), seconds_of(f_theirs, device)) for _ in range(n)]
        except Exception as err:  # a compiler failure is a result: say it in the table
            record(Row(name, batch, note=f"torch.compile failed: {failure(err)}"))
            return
        record(Row(name, batch, ours_s=statistics.median(t for t, _ in times), theirs_s=statistics.median(t for _, t in times),
                   ours_flops=row.ours_flops, theirs_flops=row.theirs_flops, max_abs_difference=largest_difference(images, reference),
                   note=f"first call (compiling) {compile_s:.0f} s; median of {n} round{'s' * (n > 1)} with diffusers' eager pipeline"))


# --- 2 and 3: LCD steps ---

@dataclass
class LCDSetup:
    """What `training.loop.train` builds before its first step: student and target, the frozen model in half precision,
    the loss, AdamW."""

    config: DistillConfig
    base: DiffusionModel
    student: object
    loss: object
    optimizer: torch.optim.Optimizer

    @classmethod
    def build(cls, config: DistillConfig, base: DiffusionModel, device: torch.device) -> LCDSetup:
        objective = objective_of(config)
        scheduler_config = objective.scheduler_config(config, base)
        with torch.device(device):  # the student UNet is made (from_config) on the card, not the CPU
            student = make_student(config, base, scheduler_config, share_unet=True)  # as the loop: a LoRA on the teacher's UNet
        freeze_in_half_precision(config, base)
        optimizer = torch.optim.AdamW(student.parameter_groups(config.lr), lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                                      weight_decay=config.weight_decay)
        return cls(config, base, student, build_loss(config, base, scheduler_config), optimizer)

    def autocast(self, device: torch.device):
        precision = self.config.mixed_precision
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16, enabled=precision != "no")

    def finish(self, loss: torch.Tensor) -> None:
        """Backward, clipping, AdamW: the training loop's optimiser step."""
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.trainable_parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def lcd_config(preset: str, teacher: str, batch: int, precision: str) -> DistillConfig:
    return resolve_config(DistillConfig, preset, overrides=dict(teacher=teacher, data="(cached latents)", out="(none)", batch_size=batch,
                                                                 mixed_precision=precision)).check()


def ours_step(s: LCDSetup, latents, cond, uncond, device):
    """Our step as `lcm distill` runs it: the library's loss on cached (z, c), then the fused EMA."""
    f_student, f_target = s.student.consistency_model(s.student.unet), s.student.consistency_model(s.student.target_unet)
    generator = torch.Generator(device).manual_seed(0)

    def step():
        with s.autocast(device):
            loss = s.loss(f_student, f_target, latents, cond, uncond, generator).mean()
        s.finish(loss)
        if s.student.has_separate_target:
            ema_update(s.student.target_unet, s.student.unet, s.config.target_decay)

    return step


def reference_step(s: LCDSetup, images, captions: list[str], uncond, device):
    """Per step, what diffusers' train_lcd_distill_sd_wds.py does: encode the images (VAE) and captions (text encoder),
    run the teacher on cond and uncond separately, and update the EMA one parameter at a time."""
    model, loss_fn, schedule = s.base, s.loss, s.base.schedule
    student, target, decay = s.student.unet, s.student.target_unet, s.config.target_decay
    dim, prediction = student.config.time_cond_proj_dim, model.prediction_type
    generator = torch.Generator(device).manual_seed(0)

    def boundary_output(out, z, t):  # c_skip·z + c_out·x̂0
        return consistency_output(z, x0_and_eps(out, z, *schedule.alpha_sigma(t), prediction)[0], t)

    def step():
        with s.autocast(device):
            latents = torch.cat([model.vae.encode(part).latent_dist.sample(generator) for part in images.split(VAE_ENCODE_BATCH_SIZE)])
            latents = latents * model.vae.config.scaling_factor
            cond = model.prompts.encode(captions, device)
            p = loss_fn.draw_point(latents, generator)
            z = schedule.add_noise(latents, p.noise, p.t_n_plus_k)
            w_embedding = guidance_embedding(p.omega, dim)
            student_out = boundary_output(student(z, p.t_n_plus_k, encoder_hidden_states=cond, timestep_cond=w_embedding).sample, z, p.t_n_plus_k)
            with torch.no_grad():
                out_c = model.unet(z, p.t_n_plus_k, encoder_hidden_states=cond).sample
                out_u = model.unet(z, p.t_n_plus_k, encoder_hidden_states=uncond).sample
                guided = out_c + append_dims(p.omega, z.ndim) * (out_c - out_u)
                x0, eps = x0_and_eps(guided, z, *schedule.alpha_sigma(p.t_n_plus_k), prediction)
                a_n, s_n = (append_dims(v, z.ndim).to(z) for v in schedule.alpha_sigma(p.t_n))
                z_prev = a_n * x0 + s_n * eps  # the DDIM jump
                target_out = boundary_output(target(z_prev, p.t_n, encoder_hidden_states=cond, timestep_cond=w_embedding).sample, z_prev, p.t_n)
            loss = loss_fn.d(student_out, target_out, p).mean()
        s.finish(loss)
        with torch.no_grad():
            for t_param, param in zip(target.parameters(), student.parameters()):
                t_param.mul_(decay).add_(param, alpha=1 - decay)

    return step


def measure_step(step, device, repeats: int, budget: Budget) -> tuple[float, float, float | None]:
    """(median seconds, FLOPs, peak GiB) of a training step; the peak is reset before the first (counted) step."""
    reset_peak(device)
    flops, _ = counted(step)
    seconds = median_seconds(step, device, repeats, budget)
    return seconds, flops, peak_gib(device)


def sd_lcd_row(teacher: str, device, half: torch.dtype, precision: str, repeats: int, budget: Budget, compiled: bool = False) -> Row:
    """Row 2: ours against the diffusers-style step, each on its own freshly loaded teacher, student and optimiser.
    `compiled` (row 5): ours with student, target and teacher compiled, as `lcm distill --compile` runs it; its first step
    (compiling) is timed apart and its FLOPs are not counted (the counter would trace the compiled graph again)."""
    measured, compile_s = {}, None
    for side in ("ours", "reference"):
        config = lcd_config("sd", teacher, TRAIN_BATCH, precision)
        s = LCDSetup.build(config, objective_of(config).load(config, device), device)
        unet = s.base.unet.config
        uncond = s.base.prompts.uncond(device).expand(TRAIN_BATCH, -1, -1)  # once, as both training scripts do
        if side == "ours":
            latents = torch.randn(TRAIN_BATCH, unet.in_channels, unet.sample_size, unet.sample_size, device=device)
            cond = torch.randn(TRAIN_BATCH, TOKENS, unet.cross_attention_dim, device=device, dtype=half)
            step = ours_step(s, latents, cond, uncond, device)
            if compiled:
                s.student.compile(s.student.unet, s.base.unet)
                reset_peak(device)
                t0 = time.perf_counter()
                step()
                sync(device)
                compile_s = time.perf_counter() - t0
                measured[side] = (median_seconds(step, device, repeats, budget), None, peak_gib(device))
                del s, step
                continue
        else:
            images = torch.rand(TRAIN_BATCH, 3, s.base.native_size, s.base.native_size, device=device) * 2 - 1
            step = reference_step(s, images, PROMPTS[:TRAIN_BATCH], uncond, device)
        measured[side] = measure_step(step, device, repeats, budget)
        del s, step
    (ours_s, ours_flops, ours_peak), (ref_s, ref_flops, ref_peak) = measured["ours"], measured["reference"]
    note = "ours: cached latents" + (f", compiled (first step {compile_s:.0f} s)" if compiled else "") + "; theirs: VAE + text encoder in the step"
    return Row(f"LCD step (sd preset, {config.solver}{', torch.compile' if compiled else ''}), ours vs diffusers-style", TRAIN_BATCH,
               "examples/s", ours_s, ref_s, ours_flops, ref_flops, ours_peak, ref_peak, note=note)


def sdxl_condition(added: AddedConditioning, batch: int, width: int, size: int, device, empty: bool = False) -> torch.Tensor:
    """c (random prompt tokens and pooled embedding) or ∅ (zeros), with the time ids of a `size` image, packed."""
    draw = torch.zeros if empty else torch.randn
    ids = torch.tensor([time_ids((size, size), (0, 0), (size, size))], dtype=torch.float32, device=device).expand(batch, -1)
    return added.pack(draw(batch, TOKENS, width, device=device), draw(batch, added.pooled_dim, device=device), ids)


def sdxl_row(preset: str, tiny: bool, device, precision: str, batch: int, repeats: int, budget: Budget, results: dict) -> Row:
    """Row 3: one LCD step of an SDXL-size student (preset `sdxl` or `sdxl-lora`), at `batch` or, out of memory, half of it."""
    torch.manual_seed(0)
    with torch.device(device):
        base = DiffusionModel(make_sdxl_unet(tiny), make_vae(tiny, 0.13025), None, None, SD_SCHEDULER, source="random SDXL base")
    s = LCDSetup.build(lcd_config(preset, base.source, batch, precision), base, device)
    unet = base.unet.config
    added, latent = AddedConditioning.of_unet(unet), unet.sample_size
    trainable = sum(p.numel() for p in s.student.trainable_parameters())
    name = f"LCD step, SDXL {'LoRA r' + str(s.config.lora_rank) if s.config.adapter == 'lora' else 'full student'} ({preset} preset)"
    out_of_memory = []
    while batch >= 1:
        try:
            latents = torch.randn(batch, unet.in_channels, latent, latent, device=device)
            cond = sdxl_condition(added, batch, unet.cross_attention_dim, base.native_size, device)
            uncond = sdxl_condition(added, batch, unet.cross_attention_dim, base.native_size, device, empty=True)
            seconds, flops, peak = measure_step(ours_step(s, latents, cond, uncond, device), device, repeats, budget)
            results["unet_forward_flops"][f"SDXL, batch {batch}"] = unet_forward_flops(base.unet, batch, cond[:1])
            oom = f"; out of memory at batch {', '.join(map(str, out_of_memory))}" if out_of_memory else ""
            return Row(name, batch, "examples/s", seconds, ours_flops=flops, ours_peak_gib=peak,
                       note=f"{trainable / 1e6:.1f} M trainable, {'gradient checkpointing, ' if s.config.gradient_checkpointing else ''}"
                            f"{latent}² latents{oom}")
        except torch.cuda.OutOfMemoryError:
            out_of_memory.append(batch)
            s.optimizer.zero_grad(set_to_none=True)
        batch //= 2
    return Row(name, note=f"out of memory at batch {', '.join(map(str, out_of_memory))}")


# --- the table ---

def rate(row: dict, side: str) -> str:
    seconds = row[f"{side}_s"]
    return f"{row['batch'] / seconds:.2f}" if seconds else "-"


def tflops(row: dict, side: str, matmul: float) -> str:
    flops, seconds = row[f"{side}_flops"], row[f"{side}_s"]
    return f"{flops / seconds / 1e12:.3g} ({100 * flops / seconds / 1e12 / matmul:.0f} %)" if flops and seconds else "-"


def gib(value: float | None) -> str:
    return f"{value:.1f}" if value is not None else "-"


def table(results: dict) -> str:
    matmul = results["matmul_tflops"]
    flops = ", ".join(f"{k} {v / 1e12:.3g}" for k, v in results["unet_forward_flops"].items())
    lines = [f"{results['date']}, {results['device']}, {results['dtype']}, torch {results['torch']}, diffusers {results['diffusers']}; "
             f"{results['matmul']} {matmul:.3g} TFLOP/s; UNet forward TFLOP: {flops or '-'}", "",
             "| measured | batch | ours | diffusers | speed-up | TFLOP/s ours / diffusers (% of matmul) | peak GiB ours / diffusers "
             "| max abs difference | note |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        speedup = f"{r['theirs_s'] / r['ours_s']:.2f}x" if r["ours_s"] and r["theirs_s"] else "-"
        difference = f"{r['max_abs_difference']:.1e}" if r["max_abs_difference"] is not None else "-"
        units = f" {r['unit']}" if r["ours_s"] else ""
        lines.append(f"| {r['name']} | {r['batch'] or '-'} | {rate(r, 'ours')}{units} | {rate(r, 'theirs')} | {speedup} | "
                     f"{tflops(r, 'ours', matmul)} / {tflops(r, 'theirs', matmul)} | {gib(r['ours_peak_gib'])} / {gib(r['theirs_peak_gib'])} "
                     f"| {difference} | {r['note']} |")
    return "\n".join(lines)


# --- the run ---

def failure(err: Exception) -> str:
    """An exception as a table note: its type and the first line of its message."""
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:160]}"


def section(record, name: str, fn, *args):
    """Run one part; a failure becomes a row note (with its traceback on stderr), not the end of the run."""
    try:
        return fn(*args)
    except Exception as err:
        traceback.print_exc()
        record(Row(name, note=f"failed: {failure(err)}"))


def row_if_time(record, budget: Budget, kind: str, name: str, batch: int, fn, *args) -> None:
    """Record the row `fn` measures, or why there is none: a failure, or less time left than the row needs."""
    if not budget.fits(kind):
        record(Row(name, batch, note="skipped: over the time budget"))
        return
    row = section(record, name, fn, *args)
    if row:
        record(row)


def run(args, device: torch.device, dtype: torch.dtype, budget: Budget, record, results: dict) -> None:
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "no")
    results["matmul_tflops"] = matmul_tflops(device, args.tiny)
    with tempfile.TemporaryDirectory() as tmp:
        teacher, lcm = save_sd_folders(Path(tmp), args.tiny, device, dtype)
        print(f"models saved, {budget.left():.0f} s left", file=sys.stderr, flush=True)
        eager = section(record, "text to image", sampling_rows, lcm, device, dtype, args.repeats, budget, record, results) or {}
        row_if_time(record, budget, "decode", "VAE decode", SAMPLING_BATCHES[-1], decode_row, lcm, device, dtype, SAMPLING_BATCHES[-1],
                    args.repeats, budget)
        reset_peak(device)
        row_if_time(record, budget, "lcd", "LCD step, SD 1.5", TRAIN_BATCH, sd_lcd_row, teacher, device, dtype, precision, args.repeats, budget)
        for preset in ("sdxl", "sdxl-lora"):
            reset_peak(device)
            row_if_time(record, budget, "sdxl", f"LCD step, SDXL ({preset} preset)", args.sdxl_batch, sdxl_row, preset, args.tiny, device,
                        precision, args.sdxl_batch, args.repeats, budget, results)
        reset_peak(device)
        if args.compile and eager:
            section(record, "text to image, torch.compile", compile_rows, lcm, device, dtype, args.repeats, budget, record, eager)
        if args.compile:
            reset_peak(device)
            row_if_time(record, budget, "compile", "LCD step, SD 1.5, torch.compile", TRAIN_BATCH, sd_lcd_row, teacher, device, dtype,
                        precision, args.repeats, budget, True)


def main() -> None:
    import diffusers

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU in float32: checks the script, not the speed")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"], help="half precision of sampling and the frozen models")
    parser.add_argument("--repeats", type=int, help="timed calls per measurement, median (default 5; --tiny 1)")
    parser.add_argument("--sdxl-batch", type=int, default=4, help="SDXL LCD step batch (halved on out of memory)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile rows (default: with CUDA)")
    parser.add_argument("--budget-seconds", type=float, default=270, help="rows that would end after this are skipped")
    parser.add_argument("--out", default="runs/gpu-speed")
    args = parser.parse_args()
    budget = Budget(args.budget_seconds)
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: full-size models need one (use --tiny for a plumbing check on the CPU)")
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else getattr(torch, args.dtype)
    args.compile = device.type == "cuda" if args.compile is None else args.compile
    args.repeats = args.repeats or (1 if args.tiny else 5)
    torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": torch.cuda.get_device_name(0) if device.type == "cuda" else
               f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads", "dtype": str(dtype).removeprefix("torch."),
               "torch": torch.__version__, "diffusers": diffusers.__version__, "tiny": args.tiny, "budget_seconds": args.budget_seconds,
               "matmul": "512³ float32 matmul" if args.tiny else "8192³ bf16 matmul", "matmul_tflops": float("nan"),
               "unet_forward_flops": {}, "rows": []}

    def record(row: Row) -> None:
        results["rows"].append(asdict(row))
        (out / "gpu_speed.json").write_text(json.dumps(results, indent=1))
        print(f"{row.name}, batch {row.batch}: {row.ours_s} s / {row.theirs_s} s {row.note} ({budget.left():.0f} s left)", file=sys.stderr, flush=True)

    def stop(signum, frame):
        raise OutOfTime

    signal.signal(signal.SIGTERM, stop)
    try:
        run(args, device, dtype, budget, record, results)
    except OutOfTime:
        record(Row("(the rows after this)", note="stopped by SIGTERM (the session's timeout)"))
    print(table(results), flush=True)


if __name__ == "__main__":
    main()
