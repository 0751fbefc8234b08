"""Stable-Diffusion-scale speed of the library's own code paths, random weights, side by side in one run.

    python benchmarks/sd_scale.py --device cuda --dtype float16 --out results/   # an SD 1.5-sized UNet
    python benchmarks/sd_scale.py --tiny                                          # plumbing check on a CPU

1. Sampling: UNet time per batch at 512x512 (64x64x4 latents) for the LCM sampler (Algorithm 3) at
   1/2/4/8 steps against the guided teacher with DPM-Solver++ 25 steps and DDIM 50 steps (CFG doubles the
   batch). Speed-ups are ratios measured in the same process.
2. LCD training step (Algorithm 1) per solver: DDIM (1 teacher evaluation per jump) against DPM-Solver-2 and
   DPM-Solver++(2S) (2 each); then, with DDIM, the choices a user makes: the guidance-pair loss (each example
   at two ω), LoRA adapters (rank 64, target = student) instead of the full student, gradient checkpointing,
   and a 4x larger micro-batch with gradient checkpointing. Step time, samples/s, peak memory.
Writes sd_scale.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from latent_consistency.denoisers import ConsistencyModel, GuidedTeacher, UNetNetwork
from latent_consistency.losses import GuidancePairLCDLoss, LCDLoss
from latent_consistency.models import make_student_unet
from latent_consistency.sampling import lcm_timesteps, sample_lcm, sample_teacher
from latent_consistency.schedule import NoiseSchedule
from latent_consistency.solvers import get_solver

SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", set_alpha_to_one=False)


def make_unet(tiny: bool):
    from diffusers import UNet2DConditionModel

    if tiny:
        return UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                    attention_head_dim=8, norm_num_groups=32,
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    # Stable Diffusion 1.5's UNet configuration (860M parameters).
    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)


def timed(fn, device, repeats: int) -> float:
    """Median seconds of `fn()` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def training_step(loss_fn, fs, ft, latents, cond, uncond, opt, device, dtype):
    """One LCD step (loss, backward, AdamW) on fixed inputs, as a function of nothing."""
    generator = torch.Generator(device).manual_seed(0)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss = loss_fn(fs, ft, latents, cond, uncond, generator).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--tiny", action="store_true", help="tiny UNet: checks the script, not the speed")
    parser.add_argument("--batch", type=int, default=4, help="images per sampling batch")
    parser.add_argument("--train-batch", type=int, default=8, help="training micro-batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True

    teacher_unet = make_unet(args.tiny).to(device, dtype).eval().requires_grad_(False)
    student_unet = make_student_unet(teacher_unet, 256).eval()
    schedule = NoiseSchedule.from_config(SD_SCHEDULER)
    size, ctx = teacher_unet.config.sample_size, teacher_unet.config.cross_attention_dim
    cond = torch.randn(args.batch, 77, ctx, device=device, dtype=dtype)
    uncond = torch.randn(1, 77, ctx, device=device, dtype=dtype).expand(args.batch, -1, -1)
    noise = torch.randn(args.batch, 4, size, size, device=device, dtype=dtype)
    results = dict(device=torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
                   dtype=str(dtype), unet_params=sum(p.numel() for p in teacher_unet.parameters()),
                   torch=torch.__version__, batch=args.batch, resolution=size * 8, sampling={}, training={})

    # 1. Sampling
    f = ConsistencyModel(UNetNetwork(student_unet), schedule, "epsilon", 256)
    teacher = GuidedTeacher(UNetNetwork(teacher_unet), schedule, "epsilon")
    with torch.no_grad():
        for n in (1, 2, 4, 8):
            ts = lcm_timesteps(n, 1000, 50)
            results["sampling"][f"lcm-{n}"] = timed(lambda ts=ts: sample_lcm(f, noise, ts, cond, 7.0, schedule), device, args.repeats)
        for name, steps in (("dpm++", 25), ("ddim", 50)):
            results["sampling"][f"teacher-{name}-{steps}"] = timed(
                lambda name=name, steps=steps: sample_teacher(teacher, name, noise, cond, uncond, 8.0, steps, SD_SCHEDULER), device,
                max(1, args.repeats // 2))

    # 2. LCD training step: per solver, then the DDIM variants (name: solver, micro-batch, options)
    variants = {name: (name, args.train_batch, {}) for name in ("ddim", "dpm", "dpm++")} | {
        "ddim pair λ_Δ=50 (each example at 2 ω)": ("ddim", args.train_batch, dict(pair=50.0)),
        "ddim LoRA r64": ("ddim", args.train_batch, dict(lora=64)),
        "ddim grad. checkpointing": ("ddim", args.train_batch, dict(checkpointing=True)),
        f"ddim batch {4 * args.train_batch}, grad. checkpointing": ("ddim", 4 * args.train_batch, dict(checkpointing=True)),
    }
    for label, (solver, batch, options) in variants.items():
        latents = torch.randn(batch, 4, size, size, device=device)
        tcond = torch.randn(batch, 77, ctx, device=device, dtype=dtype)
        tuncond = torch.randn(1, 77, ctx, device=device, dtype=dtype).expand(batch, -1, -1)
        if "lora" in options:  # LCM-LoRA: adapters on the (fp16) teacher weights, no ω input, target = student
            from peft import LoraConfig

            from latent_consistency.training.students import LORA_TARGET_MODULES

            student = copy.deepcopy(teacher_unet).requires_grad_(False)
            student.add_adapter(LoraConfig(r=options["lora"], lora_alpha=options["lora"], init_lora_weights="gaussian",
                                           target_modules=LORA_TARGET_MODULES))
            target, cond_dim = student, None
        else:
            student = copy.deepcopy(student_unet).float().requires_grad_(True)
            target, cond_dim = copy.deepcopy(student).eval().requires_grad_(False), 256
        if options.get("checkpointing"):
            student.enable_gradient_checkpointing()
        student.train()
        params = [p for p in student.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5)
        lcd = dict(skip=20, teacher=teacher, solver=get_solver(solver))
        loss_fn = GuidancePairLCDLoss(schedule, **lcd, guidance_pair_weight=options["pair"]) if "pair" in options else LCDLoss(schedule, **lcd)
        fs = ConsistencyModel(UNetNetwork(student), schedule, "epsilon", cond_dim)
        ft = ConsistencyModel(UNetNetwork(target), schedule, "epsilon", cond_dim)
        step = training_step(loss_fn, fs, ft, latents, tcond, tuncond, opt, device, dtype)

        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            seconds = timed(step, device, args.repeats)
        except torch.OutOfMemoryError:
            results["training"][label] = dict(batch=batch, out_of_memory=True)
            print(f"{label}: out of memory", flush=True)
        else:
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
            results["training"][label] = dict(batch=batch, step_s=seconds, samples_per_s=batch / seconds, peak_gib=peak,
                                              teacher_evaluations=get_solver(solver).evaluations_per_jump,
                                              trainable_params=sum(p.numel() for p in params))
            print(f"{label}: {seconds:.3f} s/step", flush=True)
        del student, target, opt, params, fs, ft, loss_fn, step

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sd_scale.json").write_text(json.dumps(results, indent=1))
    s = results["sampling"]
    print(f"device {results['device']}, {results['dtype']}, UNet {results['unet_params'] / 1e6:.0f}M params, "
          f"{results['resolution']}px, batch {args.batch}")
    print("| sampler | seconds / batch | vs DPM-Solver++ 25 |\n|---|---|---|")
    for k, v in s.items():
        print(f"| {k} | {v:.3f} | {s['teacher-dpm++-25'] / v:.1f}x |")
    print("| LCD step | examples | teacher evals/jump | trainable params | step s | examples/s | peak GiB |\n|---|---|---|---|---|---|---|")
    for k, v in results["training"].items():
        if v.get("out_of_memory"):
            print(f"| {k} | {v['batch']} | out of memory |||||")
            continue
        peak = f"{v['peak_gib']:.1f}" if v["peak_gib"] is not None else "-"
        print(f"| {k} | {v['batch']} | {v['teacher_evaluations']} | {v['trainable_params'] / 1e6:.1f}M | {v['step_s']:.3f} "
              f"| {v['samples_per_s']:.1f} | {peak} |")

if __name__ == "__main__":
    main()
