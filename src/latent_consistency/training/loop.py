"""The one training loop of LCD (Algorithm 1) and LCF (Algorithm 4), on `accelerate`.

The math lives in `losses.py`; this file only moves batches, steps the optimiser, updates the target,
logs, validates and checkpoints. Only the main process writes files.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from latent_consistency.denoisers import ConsistencyModel, GuidedTeacher, UNetNetwork
from latent_consistency.errors import UserError
from latent_consistency.grids import image_grid, save_png
from latent_consistency.losses import LCDLoss, LCFLoss
from latent_consistency.models import encode_prompts, lcm_scheduler_config, load_diffusion_model
from latent_consistency.parameterization import omega_from_guidance_scale
from latent_consistency.sampling import lcm_timesteps, sample_lcm
from latent_consistency.schedule import NoiseSchedule
from latent_consistency.solvers import get_solver
from latent_consistency.training import checkpoint as ckpt
from latent_consistency.training.batches import TrainingBatches
from latent_consistency.training.config import TrainConfig, config_from_dict
from latent_consistency.training.ema import ema_update
from latent_consistency.training.students import make_student

VALIDATION_STEPS = (1, 2, 4)


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


def prepare_run_folder(config: TrainConfig, resume: bool) -> Path:
    """Check the run folder against --resume: a new run needs a free folder, a resumed one the same config."""
    out = Path(config.out)
    saved = out / "config.json"
    if resume:
        if not saved.is_file():
            raise UserError(f"nothing to resume in {out} (no config.json); start a run there without --resume")
        diffs = config_from_dict(json.loads(saved.read_text())).differences(config)
        if diffs:
            raise UserError(f"{out} was started with a different config ({'; '.join(diffs)}); resume with the same settings or use a new --out")
    elif out.exists() and any(out.iterdir()):
        raise UserError(f"run folder {out} is not empty; pass --resume to continue it or choose another --out")
    return out


def build_loss(config: TrainConfig, teacher_model, schedule: NoiseSchedule):
    common = dict(schedule=schedule, skip=config.skip, guidance_scale_range=(config.guidance_scale_min, config.guidance_scale_max),
                  distance=config.loss, huber_c=config.huber_c, weighting=config.loss_weighting)
    if config.objective == "lcf":
        return LCFLoss(**common)
    teacher = GuidedTeacher(UNetNetwork(teacher_model.unet), schedule, teacher_model.prediction_type)
    return LCDLoss(**common, teacher=teacher, solver=get_solver(config.solver), guide_increments=config.guide_increments,
                   guidance_pair_weight=config.guidance_pair_weight)


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
    micro_batch = config.batch_size // per_step
    torch.manual_seed(config.seed)

    # Models: frozen teacher; student θ; target θ⁻
    base = load_diffusion_model(config.teacher, device=device)
    if config.objective == "lcf" and base.time_cond_proj_dim is None and config.adapter == "full":
        raise UserError(f"LCF fine-tunes an LCM, but {config.teacher} has no ω input; distil it first with `lcm distill`")
    schedule = NoiseSchedule.from_config(base.scheduler_config)
    if schedule.zero_terminal_snr:
        # At zero terminal SNR, x̂0 = (z - σ·ε̂)/α divides by α_{T-1} = 2^-12: ε̂ carries no image there.
        for who, prediction in (("teacher", base.prediction_type), ("student", config.student_prediction_type(base.prediction_type))):
            if prediction == "epsilon":
                raise UserError(f"the {who} would predict ε on a zero-terminal-SNR schedule, where ε says nothing about the image "
                                "at t = T-1; use a v-prediction teacher and student")
    if schedule.num_train_timesteps % config.skip:
        raise UserError(f"skip {config.skip} must divide the teacher's {schedule.num_train_timesteps} training timesteps")
    student = make_student(config, base)
    if config.mixed_precision != "no":
        # The frozen networks run in half precision; the trained weights stay float32 under autocast
        half = torch.float16 if config.mixed_precision == "fp16" else torch.bfloat16
        for module in (base.unet, base.vae, base.text_encoder):
            module.to(dtype=half)
    resolution = config.resolution or base.unet.config.sample_size * base.codec.downsampling_factor
    batches = TrainingBatches(config.data, base, resolution, micro_batch, config.seed, rank, world, device, config.num_workers)
    loss_fn = build_loss(config, base, schedule)
    uncond = batches.uncond

    optimizer = torch.optim.AdamW(student.trainable_parameters(), lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    step, nonfinite_total, nonfinite_run = 0, 0, 0
    if resume:
        if accelerator.is_main_process:
            ckpt.remove_partial_checkpoints(out)
        found = ckpt.list_checkpoints(out)
        if found:
            tensors, objects, state = ckpt.load_checkpoint(found[-1])
            student.load_state(tensors)
            optimizer.load_state_dict(objects["optimizer"])
            lr_scheduler.load_state_dict(objects["lr_scheduler"])
            torch.set_rng_state(objects["rng"]["torch"])
            step, nonfinite_total = state["step"], state["nonfinite_total"]
            batches.load_state_dict(state["data"][rank])
    student.unet, optimizer = accelerator.prepare(student.unet, optimizer)
    f_student = student.consistency_model(schedule, student.unet)
    f_target = student.consistency_model(schedule, student.target_unet)

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    writer = MetricsWriter(out, accelerator.is_main_process)
    validation_prompts = config.validation_prompts or batches.first_captions(4)

    def save(step_: int) -> Path | None:
        data_states = accelerator.gather_for_metrics([batches.state_dict()], use_gather_object=True) if world > 1 else [batches.state_dict()]
        if not accelerator.is_main_process:
            return None
        state = dict(step=step_, nonfinite_total=nonfinite_total, data=data_states, config=config.to_dict())
        objects = dict(optimizer=optimizer.state_dict(), lr_scheduler=lr_scheduler.state_dict(), rng={"torch": torch.get_rng_state()})
        return ckpt.save_checkpoint(out, step_, student.state_tensors(accelerator.unwrap_model(student.unet)), objects, state, config.keep_checkpoints)

    bar = tqdm(total=config.steps, initial=step, desc=f"{config.objective} {config.adapter}", disable=not (progress and accelerator.is_main_process))
    t_last, samples_since = time.perf_counter(), 0
    while step < config.steps:
        student.unet.train()
        total = torch.zeros((), device=device)
        for micro in range(config.grad_accumulation):
            batch = next(batches)
            generator = step_generator(config.seed, rank, step, micro, device)
            sync = accelerator.no_sync(student.unet) if micro + 1 < config.grad_accumulation else contextlib.nullcontext()
            with sync, accelerator.autocast():
                # Consistency loss: teacher jump (LCD) or same-noise pair (LCF), target f_θ⁻, student f_θ
                loss = loss_fn(f_student, f_target, batch["latents"], batch["cond"], uncond.expand(len(batch["latents"]), -1, -1), generator).mean()
                accelerator.backward(loss / config.grad_accumulation)
            total += loss.detach() / config.grad_accumulation
        mean_loss = accelerator.reduce(total, "mean").item()
        if not math.isfinite(mean_loss):
            # Skip the step; stop with a checkpoint after too many in a row
            optimizer.zero_grad(set_to_none=True)
            nonfinite_total, nonfinite_run = nonfinite_total + 1, nonfinite_run + 1
            if nonfinite_run >= config.max_nonfinite_steps:
                path = save(step)
                raise UserError(f"loss was not finite for {nonfinite_run} steps in a row at step {step}; "
                                f"checkpoint saved in {path or out}; lower --lr or check the data")
            continue
        nonfinite_run = 0
        grad_norm = accelerator.clip_grad_norm_(student.trainable_parameters(), config.max_grad_norm) if config.max_grad_norm > 0 else None
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        # Update target θ⁻ <- μ θ⁻ + (1-μ) θ
        if student.has_separate_target:
            ema_update(student.target_unet, accelerator.unwrap_model(student.unet), config.target_decay)
        step += 1
        samples_since += config.batch_size
        bar.update(1)
        if step % config.log_every == 0 or step == config.steps:
            now = time.perf_counter()
            rate = samples_since / (now - t_last)
            t_last, samples_since = now, 0
            bar.set_postfix(loss=f"{mean_loss:.4g}", samples_per_s=f"{rate:.1f}")
            writer.write(dict(step=step, loss=mean_loss, lr=lr_scheduler.get_last_lr()[0], samples_per_s=rate,
                              grad_norm=None if grad_norm is None else float(grad_norm), nonfinite_skipped=nonfinite_total))
        if accelerator.is_main_process and validation_prompts and (
                (config.validate_every and step % config.validate_every == 0) or step == config.steps):
            validate(out, step, f_target, base, schedule, validation_prompts, config, device)
        if (config.checkpoint_every and step % config.checkpoint_every == 0) or step == config.steps:
            save(step)
    bar.close()
    accelerator.wait_for_everyone()
    exported = None
    if accelerator.is_main_process:
        exported = student.export(out, accelerator.unwrap_model(student.unet), base, lcm_scheduler_config(base.scheduler_config, config.skip))
        summary = batches.skipped_summary()
        if summary:
            print(f"data: {summary}")
    accelerator.end_training()
    return exported


class MetricsWriter:
    """metrics.jsonl (always) and TensorBoard (when installed), main process only."""

    def __init__(self, out: Path, active: bool):
        self.active, self.path, self.tb = active, out / "metrics.jsonl", None
        if active:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                self.tb = None

    def write(self, record: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and v is not None:
                    self.tb.add_scalar(k, v, record["step"])


@torch.no_grad()
def validate(out: Path, step: int, f_target: ConsistencyModel, base, schedule: NoiseSchedule, prompts: list[str],
             config: TrainConfig, device) -> Path:
    """A grid of 1-, 2- and 4-step samples of the target for fixed prompts and fixed noise."""
    cond = encode_prompts(base.tokenizer, base.text_encoder, prompts, device)
    codec = base.codec
    size = base.unet.config.sample_size
    generator = torch.Generator("cpu").manual_seed(config.seed)
    noise = torch.randn(len(prompts), codec.latent_channels, size, size, generator=generator).to(device)
    omega = omega_from_guidance_scale(config.validation_guidance_scale)
    original_steps = schedule.num_train_timesteps // config.skip
    rows = []
    was_training = f_target.net.unet.training
    f_target.net.unet.eval()
    for n in VALIDATION_STEPS:
        x0 = sample_lcm(f_target, noise, lcm_timesteps(n, schedule.num_train_timesteps, original_steps), cond, omega, schedule,
                        torch.Generator("cpu").manual_seed(config.seed + 1))
        rows.append(codec.decode(x0))
    f_target.net.unet.train(was_training)
    (out / "samples").mkdir(exist_ok=True)
    path = out / "samples" / f"step-{step:07d}.png"
    save_png(image_grid(rows, [f"{n} step{'s' * (n > 1)}" for n in VALIDATION_STEPS]), path)
    return path

