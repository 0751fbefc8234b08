"""CPU speed of our sampling and our LCD step against diffusers', side by side in one process, on the built-in world.

    python benchmarks/cpu_speed.py --lcm runs/demo/distill/lcm --out runs/cpu-speed     # after `make demo`

1. Text to image (prompts in, decoded images out): `LCMGenerator` against diffusers' `LatentConsistencyModelPipeline`
   loaded from the same folder, same prompts (a distinct world caption per image), same per-image generators (so the
   same noise), at 1/2/4 steps and batch 1 and 64. Ours runs its text encoder on every prompt of every call (a fresh
   prompt cache per call), as diffusers' pipeline does; a third, labelled column times ours with its prompt cache warm
   (a server asked for the same prompts again). Calls alternate (ours, theirs, ours cached, ...); the median of
   --repeats rounds (16 times as many at batch 1, whose ~40 ms calls move with the machine's noise); images/s and the
   ratio; the largest difference between the two outputs (they must agree to float32 rounding).
2. One LCD training step (Algorithm 1, DDIM solver, the `world` preset's loss) at batch 64: ours (latents and text
   embeddings from the cache, cond and uncond teacher passes as one batch, a fused EMA) against a reference that does
   per step what diffusers' `train_lcd_distill_sd_wds.py` does (VAE and text encoder in the loop, separate cond and
   uncond teacher passes, a Python-loop EMA, the VAE encode in slices of 32 images as its --vae_encode_batch_size
   default), written here from that script's description; examples/s and the ratio. One difference favours the
   reference: on a CPU the script runs its teacher under `torch.autocast("cpu")`, i.e. bfloat16, about 2x slower here
   than float32, and the reference runs it in float32.
3. Peak resident memory of each while it runs (loading excluded), in a child process that runs only that one (Linux's
   VmHWM, reset after loading).
4. With --preview-decoder DIR (`lcm world preview-decoder`): the world VAE's decoder against that tiny decoder, both
   ours: ms per decode of a batch of 64 latents, and 4-step text to image at batch 64 with each (`--preview-only`: this
   alone). The preview decoder computes another, approximate image: this is the preview path's speed, not a ratio to
   diffusers (its quality cost: `benchmarks/preview_decoder_world.py`).
5. With --compile (`--compile-only`: this alone): our compiled generator (`lcm generate --compile`) at 4 steps, batch 1
   and 64, in float32 and in bfloat16 (weights frozen into the graph), against diffusers' pipeline eager in float32 and
   in bfloat16: per batch the four in turn, so that both rows divide by the same diffusers times (and the spread of
   diffusers' float32 calls, slowest over fastest, is printed: a ratio within that spread is noise); the compile time;
   the largest and mean difference to our float32 images. And the LCD step compiled (`lcm distill --compile`: student,
   target and teacher) against ours plain and the reference. Each timed call follows an untimed one of the same
   function here.

Prints a markdown table last and writes cpu_speed.json to --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from latent_consistency.losses import LCDLoss, consistency_distance
from latent_consistency.models import consistency_model, lcm_scheduler_config, load_diffusion_model, make_student_unet
from latent_consistency.parameterization import consistency_output, guidance_embedding, x0_and_eps
from latent_consistency.pipelines import LCMGenerator
from latent_consistency.prompts import PromptCache
from latent_consistency.solvers import get_solver
from latent_consistency.training.ema import ema_update
from latent_consistency.training.students import Student
from latent_consistency.world.artifact import default_world_path
from latent_consistency.world.shapes import ShapesDataset, caption, sample_attributes

GUIDANCE_SCALE = 2.0  # the world preset's
VAE_ENCODE_BATCH_SIZE = 32  # diffusers' LCD script's --vae_encode_batch_size default
BATCH_1_ROUNDS = 16  # times --repeats at batch 1: a call takes ~40 ms, which moves by ±20 % with the machine's noise


# --- 1. text to image ---

def prompts(batch: int) -> list[str]:
    """`batch` distinct world captions, one per image: no side can encode a repeated prompt once."""
    found, i = {}, 0
    while len(found) < batch:
        found.setdefault(caption(sample_attributes("train", np.random.default_rng([0, i]))))
        i += 1
    return list(found)


def ours_sampler(lcm: str, batch: int, steps: int, dtype: torch.dtype = torch.float32, compile: bool = False, cached: bool = False):
    """Our text to image. Not `cached`: a fresh prompt cache per call, so the text encoder runs on every prompt of every
    call, as in diffusers' pipeline; `cached`: the prompts encoded once, at the first call (`LCMGenerator.prompt_cache`)."""
    generator = LCMGenerator.load(lcm, torch.device("cpu"), dtype)
    if compile:
        generator.compile()
    timesteps, size, texts = generator.timesteps(steps), generator.default_size(), prompts(batch)

    def call():
        if not cached:
            generator.prompt_cache = PromptCache()
        return generator(texts, timesteps, GUIDANCE_SCALE, list(range(batch)), size, size).float()

    return call


def diffusers_sampler(lcm: str, batch: int, steps: int, dtype: torch.dtype = torch.float32):
    from diffusers import LatentConsistencyModelPipeline

    pipe = LatentConsistencyModelPipeline.from_pretrained(lcm, safety_checker=None, requires_safety_checker=False, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    size, texts = pipe.unet.config.sample_size * pipe.vae_scale_factor, prompts(batch)

    def call():
        generators = [torch.Generator("cpu").manual_seed(s) for s in range(batch)]
        images = pipe(texts, num_inference_steps=steps, guidance_scale=GUIDANCE_SCALE, generator=generators, height=size,
                      width=size, output_type="pt").images
        return images.float() * 2 - 1  # [0, 1] -> ours [-1, 1]

    return call


# --- 5. the compiled fast path ---

def compiled_rows(lcm: str, repeats: int, steps: int = 4) -> list[dict]:
    """Our compiled generator (`LCMGenerator.compile`) in float32 and in bfloat16 (weights frozen into the graph) against
    diffusers' pipeline eager in float32 (its default) and in bfloat16; per batch the four calls alternate, so that both
    of our rows divide by the same diffusers float32 times. The compile time is the first call's (loading excluded); the
    difference is to our plain float32 images; `diffusers_float32_spread` is its slowest timed call over its fastest."""
    rows = []
    for batch in (1, 64):
        reference = ours_sampler(lcm, batch, steps)()
        fast, images, compile_s = {}, {}, {}
        for dtype in (torch.float32, torch.bfloat16):
            fast[dtype] = ours_sampler(lcm, batch, steps, dtype, compile=True)
            t0 = time.perf_counter()
            images[dtype] = fast[dtype]()
            compile_s[dtype] = time.perf_counter() - t0
        theirs = {dtype: diffusers_sampler(lcm, batch, steps, dtype) for dtype in fast}
        times = timed_rounds([*fast.values(), *theirs.values()], rounds(batch, repeats), settle=True)
        t_fast32, t_fast16, t_f32, t_same16 = (statistics.median(t) for t in times)
        for dtype, t_fast, t_same in ((torch.float32, t_fast32, t_f32), (torch.bfloat16, t_fast16, t_same16)):
            difference = (images[dtype] - reference).abs()
            rows.append({"batch": batch, "steps": steps, "dtype": str(dtype).removeprefix("torch."), "compile_s": compile_s[dtype],
                         "ours_images_per_s": batch / t_fast, "diffusers_float32_images_per_s": batch / t_f32,
                         "diffusers_same_dtype_images_per_s": batch / t_same, "speedup_vs_float32": t_f32 / t_fast,
                         "speedup_vs_same_dtype": t_same / t_fast, "diffusers_float32_spread": max(times[2]) / min(times[2]),
                         "max_abs_difference": difference.max().item(), "mean_abs_difference": difference.mean().item()})
    return rows


# --- 4. the preview decoder ---

def preview_rows(lcm: str, preview: str, repeats: int) -> dict:
    """Decode ms per batch of 64 and 4-step batch-64 text to image, the VAE's decoder against the preview decoder."""
    full, fast = LCMGenerator.load(lcm, torch.device("cpu"), torch.float32), LCMGenerator.load(lcm, torch.device("cpu"), torch.float32)
    fast.use_preview_decoder(preview)
    latents = torch.randn(64, full.model.codec.latent_channels, full.model.unet.config.sample_size, full.model.unet.config.sample_size,
                          generator=torch.Generator().manual_seed(0))
    t_vae, t_preview = alternating((lambda: full.model.codec.decode(latents), lambda: fast.model.codec.decode(latents)), repeats)
    timesteps, size = full.timesteps(4), full.default_size()

    texts = prompts(64)

    def sampler(generator):
        return lambda: generator(texts, timesteps, GUIDANCE_SCALE, list(range(64)), size, size)

    s_vae, s_preview = alternating((sampler(full), sampler(fast)), repeats)
    return {"decode_ms_vae": 1000 * t_vae, "decode_ms_preview": 1000 * t_preview, "images_per_s_vae": 64 / s_vae,
            "images_per_s_preview": 64 / s_preview}


# --- 2. one LCD step ---

class LCDSetup:
    """The world's teacher, a student with the ω input, its EMA target, AdamW, and one batch of images and captions."""

    def __init__(self, teacher: str, batch: int):
        torch.manual_seed(0)
        self.model = load_diffusion_model(teacher)
        self.scheduler_config = lcm_scheduler_config(self.model.scheduler_config, 20, self.model.prediction_type)
        self.student = make_student_unet(self.model.unet, 256).requires_grad_(True).train()
        self.target = copy.deepcopy(self.student).requires_grad_(False).eval()
        self.model.unet.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=5e-5)
        items = [ShapesDataset("train", 32, size=batch, seed=0)[i] for i in range(batch)]
        self.images = torch.stack([item["image"] for item in items])
        self.captions = [item["caption"] for item in items]
        self.loss = LCDLoss(schedule=self.model.schedule, skip=20, guidance_scale_range=(1.0, 2.0), distance="l2", weighting="ict",
                            teacher=self.model.guided_teacher(), solver=get_solver("ddim"))
        self.uncond = self.model.prompts.uncond()  # once, as the reference does too

    def finish_step(self, loss: torch.Tensor) -> None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def ours_step(teacher: str, batch: int, compile: bool = False):
    s = LCDSetup(teacher, batch)
    if compile:  # as `--compile` does in the loop: student, target and teacher
        Student(s.student, s.target, True, "full", s.scheduler_config).compile(s.student, s.model.unet)
    latents = s.model.codec.encode(s.images)  # the latent cache: encoded once, before training
    cond = s.model.prompts.encode(s.captions)
    f_student, f_target = consistency_model(s.student, s.scheduler_config), consistency_model(s.target, s.scheduler_config)
    generator = torch.Generator().manual_seed(0)

    def step():
        loss = s.loss(f_student, f_target, latents, cond, s.uncond.expand(batch, -1, -1), generator).mean()
        s.finish_step(loss)
        ema_update(s.target, s.student, 0.95)
        return loss.detach()

    return step


def reference_step(teacher: str, batch: int):
    """Per step, what diffusers' LCD script does: encode images (in slices of its default 32) and captions, two teacher
    passes, a Python-loop EMA."""
    s = LCDSetup(teacher, batch)
    schedule, loss_fn, vae = s.model.schedule, s.loss, s.model.vae
    generator = torch.Generator().manual_seed(0)

    def step():
        latents = torch.cat([vae.encode(part).latent_dist.sample(generator) for part in s.images.split(VAE_ENCODE_BATCH_SIZE)])
        latents = latents * vae.config.scaling_factor
        with torch.no_grad():
            cond = s.model.prompts.encode(s.captions)
        uncond = s.uncond.expand(batch, -1, -1)
        p = loss_fn.draw_point(latents, generator)
        z = schedule.add_noise(latents, p.noise, p.t_n_plus_k)
        w_embedding = guidance_embedding(p.omega, 256)
        alpha, sigma = (v.float() for v in schedule.alpha_sigma(p.t_n_plus_k))
        pred = s.student(z, p.t_n_plus_k, encoder_hidden_states=cond, timestep_cond=w_embedding).sample
        student_out = consistency_output(z, x0_and_eps(pred, z, alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1), "epsilon")[0], p.t_n_plus_k)
        with torch.no_grad():
            out_c = s.model.unet(z, p.t_n_plus_k, encoder_hidden_states=cond).sample
            out_u = s.model.unet(z, p.t_n_plus_k, encoder_hidden_states=uncond).sample
            guided = out_c + p.omega.view(-1, 1, 1, 1) * (out_c - out_u)
            x0, eps = x0_and_eps(guided, z, alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1), "epsilon")
            a_n, s_n = (v.float() for v in schedule.alpha_sigma(p.t_n))
            z_prev = a_n.view(-1, 1, 1, 1) * x0 + s_n.view(-1, 1, 1, 1) * eps  # the DDIM jump
            pred_t = s.target(z_prev, p.t_n, encoder_hidden_states=cond, timestep_cond=w_embedding).sample
            target = consistency_output(z_prev, x0_and_eps(pred_t, z_prev, a_n.view(-1, 1, 1, 1), s_n.view(-1, 1, 1, 1), "epsilon")[0], p.t_n)
        loss = (p.weight * consistency_distance(student_out, target, "l2")).mean()
        s.finish_step(loss)
        with torch.no_grad():
            for t_param, param in zip(s.target.parameters(), s.student.parameters()):
                t_param.mul_(0.95).add_(param, alpha=0.05)
        return loss.detach()

    return step


CASES = {"ours": ours_sampler, "diffusers": diffusers_sampler, "ours-step": ours_step, "reference-step": reference_step}


def peak_rss(case: str, args: tuple, calls: int) -> float:
    """MiB of peak resident memory of a child process that builds and runs one case."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_run_case, (case, args, calls))


def _run_case(case: str, args: tuple, calls: int) -> float:
    fn = CASES[case](*args)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to now: loading the models is not measured
    for _ in range(calls):
        fn()
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["VmHWM"].split()[0]) / 1024


def timed_rounds(fns, repeats: int, settle: bool = False) -> list[list[float]]:
    """Seconds of each of `fns` per round, called in turn after one warm-up call each. `settle`: each timed call follows
    an untimed call of the same function, as in a run of one of them alone (a compiled call leaves the next, other call
    slower: at batch 1, 72 against 49 ms for diffusers' pipeline)."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, record in zip(fns, times):
            if settle:
                fn()
            t0 = time.perf_counter()
            fn()
            record.append(time.perf_counter() - t0)
    return times


def alternating(fns, repeats: int, settle: bool = False) -> list[float]:
    """Median seconds of each of `fns`, timed in turn (`timed_rounds`)."""
    return [statistics.median(record) for record in timed_rounds(fns, repeats, settle)]


def rounds(batch: int, repeats: int) -> int:
    """Timed rounds of a batch's calls: `repeats`, or `BATCH_1_ROUNDS` times as many at batch 1."""
    return repeats * (BATCH_1_ROUNDS if batch == 1 else 1)


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lcm", default="runs/demo/distill/lcm")
    parser.add_argument("--teacher", default=str(default_world_path()))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-batch", type=int, default=64)
    parser.add_argument("--no-memory", action="store_true", help="skip the child processes that measure peak memory")
    parser.add_argument("--out", default="runs/cpu-speed")
    parser.add_argument("--preview-decoder", help="also time this tiny preview decoder (`lcm world preview-decoder`) against the VAE's")
    parser.add_argument("--preview-only", action="store_true", help="time only the preview decoder (needs --preview-decoder)")
    parser.add_argument("--compile", action="store_true", help="also time our compiled generator, float32 and bfloat16, against diffusers")
    parser.add_argument("--compile-only", action="store_true", help="time only the compiled generator")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "sampling": [], "lcd_step": {}}
    if args.preview_decoder:
        p = results["preview_decoder"] = preview_rows(args.lcm, args.preview_decoder, args.repeats)
        print(f"\n{results['date']}, {results['machine']}, {results['threads']} threads, torch {results['torch']}\n")
        print("| measured | VAE decoder | preview decoder | speed-up |\n|---|---|---|---|")
        print(f"| decode, batch 64 | {p['decode_ms_vae']:.0f} ms | {p['decode_ms_preview']:.0f} ms | "
              f"{p['decode_ms_vae'] / p['decode_ms_preview']:.2f}x |")
        print(f"| text to image, 4 steps, batch 64 | {p['images_per_s_vae']:.1f} images/s | {p['images_per_s_preview']:.1f} images/s | "
              f"{p['images_per_s_preview'] / p['images_per_s_vae']:.2f}x |")
    if args.preview_only:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "cpu_speed_preview.json").write_text(json.dumps(results, indent=2))
        return
    if args.compile or args.compile_only:
        results["compiled"] = compiled_rows(args.lcm, args.repeats)
        print(f"\n{results['date']}, {results['machine']}, {results['threads']} threads, torch {results['torch']}\n")
        print("| 4 steps | ours compiled | diffusers float32 | diffusers same dtype | speed-up (float32 / same dtype) "
              "| diffusers float32 spread | compile s | difference to our float32 (max / mean) |\n|---|---|---|---|---|---|---|---|")
        for r in results["compiled"]:
            print(f"| batch {r['batch']}, {r['dtype']} | {r['ours_images_per_s']:.1f} images/s | {r['diffusers_float32_images_per_s']:.1f} "
                  f"| {r['diffusers_same_dtype_images_per_s']:.1f} | {r['speedup_vs_float32']:.2f}x / {r['speedup_vs_same_dtype']:.2f}x "
                  f"| {r['diffusers_float32_spread']:.2f} | {r['compile_s']:.0f} | {r['max_abs_difference']:.1e} / {r['mean_abs_difference']:.1e} |")
        fast, plain, reference = ours_step(args.teacher, args.train_batch, compile=True), ours_step(args.teacher, args.train_batch), \
            reference_step(args.teacher, args.train_batch)
        t0 = time.perf_counter()
        fast(), fast()
        compile_s = time.perf_counter() - t0
        t_fast, t_plain, t_ref = alternating((fast, plain, reference), args.repeats, settle=True)
        results["compiled_lcd_step"] = {"batch": args.train_batch, "compile_s": compile_s, "ours_compiled_examples_per_s": args.train_batch / t_fast,
                                        "ours_examples_per_s": args.train_batch / t_plain, "reference_examples_per_s": args.train_batch / t_ref}
        print(f"| LCD step, batch {args.train_batch}, float32: compiled / plain / diffusers-style | {args.train_batch / t_fast:.1f} / "
              f"{args.train_batch / t_plain:.1f} / {args.train_batch / t_ref:.1f} examples/s | {t_ref / t_fast:.2f}x / {t_ref / t_plain:.2f}x "
              f"(compiled / plain against diffusers-style) | | | {compile_s:.0f} | |")
    if args.compile_only:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "cpu_speed_compiled.json").write_text(json.dumps(results, indent=2))
        return
    rows = []
    for batch in (1, 64):
        for steps in (1, 2, 4):
            ours, theirs = ours_sampler(args.lcm, batch, steps), diffusers_sampler(args.lcm, batch, steps)
            cached = ours_sampler(args.lcm, batch, steps, cached=True)
            difference = (ours() - theirs()).abs().max().item()
            t_ours, t_theirs, t_cached = alternating((ours, theirs, cached), rounds(batch, args.repeats))
            row = {"batch": batch, "steps": steps, "ours_images_per_s": batch / t_ours, "diffusers_images_per_s": batch / t_theirs,
                   "speedup": t_theirs / t_ours, "ours_prompts_cached_images_per_s": batch / t_cached, "speedup_prompts_cached": t_theirs / t_cached,
                   "max_abs_difference": difference}
            if not args.no_memory and steps == 4:
                row["ours_peak_mib"] = peak_rss("ours", (args.lcm, batch, steps), 3)
                row["diffusers_peak_mib"] = peak_rss("diffusers", (args.lcm, batch, steps), 3)
            results["sampling"].append(row)
            rows.append(f"| text to image, {steps} step{'s' * (steps > 1)}, batch {batch} | {row['ours_images_per_s']:.1f} images/s | "
                        f"{row['diffusers_images_per_s']:.1f} images/s | {row['speedup']:.2f}x | {row['ours_prompts_cached_images_per_s']:.1f} "
                        f"images/s ({row['speedup_prompts_cached']:.2f}x) | {mib(row.get('ours_peak_mib'))} / {mib(row.get('diffusers_peak_mib'))} "
                        f"| {difference:.1e} |")
    ours, reference = ours_step(args.teacher, args.train_batch), reference_step(args.teacher, args.train_batch)
    t_ours, t_ref = alternating((ours, reference), args.repeats)
    step = {"batch": args.train_batch, "ours_examples_per_s": args.train_batch / t_ours, "reference_examples_per_s": args.train_batch / t_ref,
            "speedup": t_ref / t_ours}
    if not args.no_memory:
        step["ours_peak_mib"] = peak_rss("ours-step", (args.teacher, args.train_batch), 3)
        step["reference_peak_mib"] = peak_rss("reference-step", (args.teacher, args.train_batch), 3)
    results["lcd_step"] = step
    rows.append(f"| LCD step, batch {args.train_batch} | {step['ours_examples_per_s']:.1f} examples/s | {step['reference_examples_per_s']:.1f} "
                f"examples/s | {step['speedup']:.2f}x | (latents and text embeddings from the cache) | {mib(step.get('ours_peak_mib'))} / "
                f"{mib(step.get('reference_peak_mib'))} | |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_speed.json").write_text(json.dumps(results, indent=2))
    print(f"\n{results['date']}, {results['machine']}, {results['threads']} threads, torch {results['torch']}\n")
    print("| measured | ours | diffusers | speed-up | ours, prompts cached (speed-up) | peak MiB (ours / diffusers) | max abs difference |\n"
          "|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
