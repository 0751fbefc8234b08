"""The one training loop of LCD (Algorithm 1) and LCF (Algorithm 4), on `accelerate`.

The math lives in `losses.py`; this file only moves batches, steps the optimiser, updates the target,
logs, validates and checkpoints (`training.run_folder`). Only the main process writes files.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from latent_consistency.errors import UserError
from latent_consistency.losses import GuidancePairLCDLoss, LCDLoss, LCFLoss
from latent_consistency.models import DiffusionModel, lcm_scheduler_config, load_diffusion_model
from latent_consistency.schedule import NoiseSchedule
from latent_consistency.solvers import get_solver
from latent_consistency.training.batches import TrainingBatches
from latent_consistency.training.config import TrainConfig
from latent_consistency.training.ema import ema_update
from latent_consistency.training.run_folder import Progress, RunFolder, prepare_run_folder
from latent_consistency.training.students import make_student


def step_generator(seed: int, rank: int, step: int, micro: int, device: torch.device) -> torch.Generator:
    """The generator of one micro-step's (n, ω, ε) draws: a pure function of (seed, rank, step, micro),
    so a resumed run draws exactly what the uninterrupted run would have drawn."""
    state = int(np.random.SeedSequence([seed, rank, step, micro]).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator(device).manual_seed(state)


def lr_lambda(config: TrainConfig):
    def factor(step: int) -> float:
        if step < config.lr_warmup_steps:
            return (step + 1) / config.lr_warmup_steps
        progress = (step - config.lr_warmup_steps) / max(1, config.steps - config.lr_warmup_steps)
        if config.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if config.lr_schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0
    return factor


def check_model_fits(config: TrainConfig, base: DiffusionModel, schedule: NoiseSchedule) -> None:
    """The loaded model must suit the config: LCF needs an LCM, k must divide T, ε needs a non-zero terminal SNR."""
    if config.objective == "lcf" and base.time_cond_proj_dim is None and config.adapter == "full":
        raise UserError(f"LCF fine-tunes an LCM, but {config.teacher} has no ω input; distil it first with `lcm distill`")
    if config.objective == "lcd" and base.time_cond_proj_dim is not None:
        raise UserError(f"{config.teacher} is already an LCM (its UNet has the ω input); distil the diffusion model it came from, "
                        "or fine-tune this LCM with --objective lcf")
    if schedule.zero_terminal_snr:
        # At zero terminal SNR, x̂0 = (z - σ·ε̂)/α divides by α_{T-1} = 2^-12: ε̂ carries no image there.
        for who, prediction in (("teacher", base.prediction_type), ("student", config.student_prediction_type(base.prediction_type))):
            if prediction == "epsilon":
                raise UserError(f"the {who} would predict ε on a zero-terminal-SNR schedule, where ε says nothing about the image "
                                "at t = T-1; use a v-prediction teacher and student")
    if schedule.num_train_timesteps % config.skip:
        raise UserError(f"skip {config.skip} must divide the teacher's {schedule.num_train_timesteps} training timesteps")


def student_scheduler_config(config: TrainConfig, base: DiffusionModel) -> dict:
    """The LCMScheduler config the student is trained, validated and exported under (original_inference_steps = T/k)."""
    return lcm_scheduler_config(base.scheduler_config, config.skip, config.student_prediction_type(base.prediction_type))


def build_loss(config: TrainConfig, base: DiffusionModel, schedule: NoiseSchedule):
    common = dict(schedule=schedule, skip=config.skip, guidance_scale_range=(config.guidance_scale_min, config.guidance_scale_max),
                  distance=config.loss, huber_c=config.huber_c, weighting=config.loss_weighting)
    if config.objective == "lcf":
        return LCFLoss(**common)
    lcd = dict(common, teacher=base.guided_teacher(), solver=get_solver(config.solver), guide_increments=config.guide_increments)
    if config.guidance_pair_weight > 0:
        return GuidancePairLCDLoss(**lcd, guidance_pair_weight=config.guidance_pair_weight)
    return LCDLoss(**lcd)


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> Path | None:
    """Run (or resume) a distillation/fine-tuning run; returns the exported model's path (None on
    processes other than the main one)."""
    from accelerate import Accelerator

    config.check()
    # Without a GPU, `cpu=True` lets accelerate join torchrun-launched processes over gloo (MULTI_CPU).
    has_gpu = torch.cuda.is_available() or (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available())
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not has_gpu)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    out = prepare_run_folder(config, resume)
    per_step = world * config.grad_accumulation
    if config.batch_size % per_step:
        raise UserError(f"batch_size {config.batch_size} must be a multiple of processes x grad_accumulation = {per_step}")
    torch.manual_seed(config.seed)

    # Models: frozen teacher; student θ; target θ⁻
    base = load_diffusion_model(config.teacher, device=device)
    schedule = base.schedule
    check_model_fits(config, base, schedule)
    student = make_student(config, base, student_scheduler_config(config, base))
    if config.mixed_precision != "no":
        # The frozen networks run in half precision; the trained weights stay float32 under autocast
        half = torch.float16 if config.mixed_precision == "fp16" else torch.bfloat16
        for module in (base.unet, base.vae, base.text_encoder):
            module.to(dtype=half)
    resolution = config.resolution or base.unet.config.sample_size * base.codec.downsampling_factor
    batches = TrainingBatches(config.data, base, resolution, config.batch_size // per_step, config.seed, rank, world, device,
                              config.num_workers)
    loss_fn = build_loss(config, base, schedule)
    optimizer = torch.optim.AdamW(student.trainable_parameters(), lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    run = RunFolder(out, config, accelerator, base, student, optimizer, lr_scheduler, batches)
    state = run.resume() if resume else Progress()
    student.unet, optimizer = accelerator.prepare(student.unet, optimizer)
    f_student, f_target = student.consistency_model(student.unet), student.consistency_model(student.target_unet)
    uncond = batches.uncond

    bar = tqdm(total=config.steps, initial=state.step, desc=f"{config.objective} {config.adapter}",
               disable=not (progress and accelerator.is_main_process))
    while state.step < config.steps:
        student.unet.train()
        # Consistency loss over the micro-batches: teacher jump (LCD) or same-noise pair (LCF), target f_θ⁻, student f_θ
        total = torch.zeros((), device=device)
        for micro in range(config.grad_accumulation):
            batch = next(batches)
            generator = step_generator(config.seed, rank, state.step, micro, device)
            sync = accelerator.no_sync(student.unet) if micro + 1 < config.grad_accumulation else contextlib.nullcontext()
            with sync, accelerator.autocast():
                loss = loss_fn(f_student, f_target, batch["latents"], batch["cond"], uncond.expand(len(batch["latents"]), -1, -1),
                               generator).mean()
                accelerator.backward(loss / config.grad_accumulation)
            total += loss.detach() / config.grad_accumulation
        mean_loss = accelerator.reduce(total, "mean").item()
        if not math.isfinite(mean_loss):
            skip_nonfinite_step(state, optimizer, config, run)
            continue
        state.nonfinite_run = 0
        # Optimiser step
        grad_norm = accelerator.clip_grad_norm_(student.trainable_parameters(), config.max_grad_norm) if config.max_grad_norm > 0 else None
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        # Update target θ⁻ <- μ θ⁻ + (1-μ) θ
        if student.has_separate_target:
            ema_update(student.target_unet, accelerator.unwrap_model(student.unet), config.target_decay)
        state.step += 1
        bar.update(1)
        # Log, validate, checkpoint
        run.after_step(state, mean_loss, grad_norm, f_target, bar)
    bar.close()
    return run.finish()


def skip_nonfinite_step(state: Progress, optimizer, config: TrainConfig, run: RunFolder) -> None:
    """Drop the step's gradients; after `max_nonfinite_steps` in a row, stop with a checkpoint."""
    optimizer.zero_grad(set_to_none=True)
    state.nonfinite_total += 1
    state.nonfinite_run += 1
    if state.nonfinite_run >= config.max_nonfinite_steps:
        path = run.save(state)
        raise UserError(f"loss was not finite for {state.nonfinite_run} steps in a row at step {state.step}; "
                        f"checkpoint saved in {path or run.out}; lower --lr or check the data")
