"""Typed training configurations of LCD (`DistillConfig`) and LCF (`FinetuneConfig`), their named presets, and how
they are read and written.

Every field is documented where it is declared; `lcm distill --help` and `lcm finetune --help` show the same text. A config is
resolved from (in order) a preset, a JSON file, then command-line overrides, and saved as JSON in the
run folder and in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from latent_consistency.errors import UserError
from latent_consistency.models import (
    DEFAULT_ORIGINAL_INFERENCE_STEPS,
    DEFAULT_TIME_COND_PROJ_DIM,
    guidance_record_of,
    is_lcm_config,
    model_json,
)

ADAPTERS = ("full", "lora")
METHODS = ("lcd", "ode", "guidance", "progressive")
LCM_METHODS = ("lcd", "ode")  # the methods that make an LCM
LR_SCHEDULES = ("constant", "cosine", "linear")
MIXED_PRECISION = ("no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adamw-fused", "adamw-8bit")
# The largest --seed: the run seeds generators with it plus small offsets (validation noise, evaluation batches), and
# torch's generators take seeds below 2**64
MAX_SEED = 2**63 - 1
# The largest --batch-size: a million images a step (Stable Diffusion's 64 KiB latents alone 64 GiB, before any activation)
MAX_BATCH_SIZE = 2**20


def doc(text: str, **kwargs) -> Any:
    """A dataclass field with its documentation attached (shown by --help and --dry-run)."""
    return field(metadata={"help": text}, **kwargs)


# Fields that name a model or data: two spellings of one source are one value (`canonical_source`)
SOURCE_FIELDS = ("teacher", "model", "data", "eval_data", "student_init", "lora")
# Fields a resumed run may change: how long it runs, what it writes how often, and how it fits in memory and copes with
# non-finite losses, none of which changes a step's math: an accumulation step's micro-batch draws its own noise, n and ω
# as one batch would (`MicroBatchDraws`), and the data position is in samples; its --batch-size must still split into the
# new micro-batches, which `check` and the launch's `check_processes` say as for a new run
RESUMABLE_CHANGES = ("out", "steps", "log_every", "validate_every", "checkpoint_every", "keep_checkpoints", "num_workers",
                     "omega_response_samples", "compile", "gradient_checkpointing", "grad_accumulation", "max_nonfinite_steps")


@dataclass
class TrainConfig:
    """What distillation and fine-tuning share: the data, the student's form, the consistency loss, optimisation,
    logging. `DistillConfig` (LCD, `lcm distill`) and `FinetuneConfig` (LCF, `lcm finetune`) add what each needs."""

    objective: ClassVar[str] = ""  # "lcd" or "lcf": the subclass
    model_field: ClassVar[str] = ""  # the field naming the model a run starts from: `teacher` or `model`
    min_skip: ClassVar[int] = 0  # the least skipping step k: 0 (the starting LCM's own k, LCF) where a command has a default
    # --- Data ---
    data: str = doc("data spec: latent cache folder, image folder, .tar shards (brace pattern/glob), or world:NAME[:SPLIT]", default="")
    eval_data: str = doc("held-out data spec: its captions are the validation prompts, its loss is logged as eval_loss", default="")
    eval_fraction: float = doc("hold out this fraction of --data instead, split deterministically by file (image folders: "
                               "image files; shards: .tar files; latent caches: the image files or .tar files their samples were "
                               "encoded from)", default=0.0)
    out: str = doc("run folder: config.json, metrics.jsonl, samples/, checkpoints/, exported model", default="")
    resolution: int = doc("image resolution for image data (0: the model's native size): each image's shorter side is scaled to "
                          "it and the central square cropped, the same crop every epoch, no flips (a smaller image is upscaled "
                          "and counted in the data summary); a latent cache's is the size it was written at (lcm cache "
                          "--resolution), which a run on it must give", default=0)
    # --- The student ---
    adapter: str = doc("full: train the whole UNet; lora: peft LoRA adapters (LCM-LoRA)", default="full")
    lora_rank: int = doc("LoRA rank of new adapters (lora mode)", default=64)
    # --- The consistency loss ---
    skip: int = doc("skipping step k (Eq. 16); T/k is the LCMScheduler's original_inference_steps", default=20)
    guidance_scale_min: float = doc("smallest guidance scale g sampled per example (diffusers' g; paper ω = g-1 ∈ [2, 14])", default=3.0)
    guidance_scale_max: float = doc("largest guidance scale g sampled per example", default=15.0)
    loss: str = doc("consistency distance d: l2 or huber (pseudo-Huber)", default="huber")
    huber_c: float = doc("pseudo-Huber constant c", default=0.001)
    loss_weighting: str = doc("weight of each grid pair: uniform (the paper) or ict (1/(σ̃_{n+k} − σ̃_n), Song & Dhariwal 2023)", default="uniform")
    ema_decay: float | None = doc("EMA rate μ of the target θ⁻ (paper 0.999943, diffusers 0.95; 0: target = student, no copy). "
                                  "Default: 0.95 full, 0 lora", default=None)
    # --- Optimisation ---
    steps: int = doc("optimiser steps", default=1000)
    batch_size: int = doc("global batch size (all processes, all accumulation steps together)", default=32)
    grad_accumulation: int = doc("gradient accumulation steps per optimiser step", default=1)
    lr: float = doc("AdamW learning rate", default=1e-4)
    optimizer: str = doc("adamw (torch's), adamw-fused (torch's fused kernel: the same update, one kernel per step) or adamw-8bit "
                         "(bitsandbytes' blockwise 8-bit moments: 2 bytes/param instead of 8, for an unsharded full SDXL student on "
                         "one GPU; needs `pip install bitsandbytes`; docs/scale.md)", default="adamw")
    lr_schedule: str = doc("constant, cosine or linear decay after warm-up", default="constant")
    lr_warmup_steps: int = doc("linear warm-up steps", default=100)
    weight_decay: float = doc("AdamW weight decay", default=0.0)
    adam_beta1: float = doc("AdamW β1", default=0.9)
    adam_beta2: float = doc("AdamW β2", default=0.999)
    max_grad_norm: float = doc("gradient clipping norm (0: off)", default=1.0)
    mixed_precision: str = doc("no, fp16 or bf16 (accelerate autocast)", default="no")
    gradient_checkpointing: bool = doc("recompute activations in the backward pass to save memory", default=False)
    compile: bool = doc("torch.compile (inductor) the student's, target's and teacher's networks (full students): a few minutes of "
                        "compiling first, then faster steps (docs/benchmarks.md); worth it for long runs", default=False)
    max_nonfinite_steps: int = doc("stop (with a checkpoint) after this many non-finite losses in a row", default=10)
    seed: int = doc("seed of everything: init, data order, noise, n and ω draws", default=0)
    # --- Logging, validation, checkpoints ---
    log_every: int = doc("write a metrics line every N steps", default=10)
    validate_every: int = doc("write a validation sample grid every N steps (0: only at the end)", default=250)
    validation_prompts: list[str] = doc("prompts of the validation grid (empty: the first captions of the data)", default_factory=list)
    validation_guidance_scale: float = doc("guidance scale of the validation grid (of a full LCM: its recorded default; an LCM "
                                           "without an ω input is shown at g = 1, as `lcm generate` samples it)", default=8.0)
    checkpoint_every: int = doc("write a checkpoint every N steps (0: only at the end)", default=500)
    keep_checkpoints: int = doc("how many recent checkpoints to keep", default=2)
    num_workers: int = doc("DataLoader worker processes decoding an image folder (refused with shards or a latent cache, read "
                            "in-process)", default=0)

    def check(self) -> TrainConfig:
        """Raise UserError for values that cannot work, before anything is loaded. The one place a config is
        validated: names are looked up in the registries the run uses (distances, weightings, solvers)."""
        from latent_consistency.losses import check_distance, check_weighting
        from latent_consistency.parameterization import check_guidance_scale_range

        for name, allowed in dict(adapter=ADAPTERS, lr_schedule=LR_SCHEDULES, mixed_precision=MIXED_PRECISION, optimizer=OPTIMIZERS).items():
            if getattr(self, name) not in allowed:
                raise UserError(f"{self.named(name)} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        check_distance(self.loss)
        if self.loss != "huber" and self.huber_c != field_default(type(self), "huber_c"):
            raise UserError(f"{self.named('huber_c')} {self.huber_c:g} is the constant of the pseudo-Huber distance: it applies to --loss huber, "
                            f"not {self.loss}")
        check_weighting(self.loss_weighting)
        for name in (self.model_field, "data", "out"):
            if not getattr(self, name):
                raise UserError(f"--{name} is required")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"{self.named(f.name)} must be a finite number, got {value}")
        for name in ("steps", "batch_size", "grad_accumulation", "log_every", "lora_rank", "max_nonfinite_steps", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise UserError(f"{self.named(name)} must be at least 1, got {getattr(self, name)}")
        if self.skip < self.min_skip:  # one message for each command's own least k (was: "0 or more" for -3, then "at least 1" for 0)
            raise UserError(f"{self.named('skip')} must be {'0 or more' if self.min_skip == 0 else f'at least {self.min_skip}'}, got {self.skip}")
        for name in ("seed", "resolution", "lr_warmup_steps", "validate_every", "checkpoint_every", "num_workers",
                     "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise UserError(f"{self.named(name)} must be 0 or more, got {getattr(self, name)}")
        if self.seed > MAX_SEED:
            raise UserError(f"{self.named('seed')} must be at most 2**63 - 1 = {MAX_SEED}, got {self.seed}")
        if self.batch_size > MAX_BATCH_SIZE:
            raise UserError(f"{self.named('batch_size')} {self.batch_size} is above {MAX_BATCH_SIZE:,} images a step, more than any accelerator holds; "
                            "give a smaller --batch-size (and --grad-accumulation for a larger effective batch)")
        if self.batch_size % self.grad_accumulation:
            raise UserError(f"{self.named('batch_size')} {self.batch_size} must be a multiple of {self.named('grad_accumulation')} "
                            f"{self.grad_accumulation}")
        if self.lora_rank != field_default(type(self), "lora_rank") and self.adapter != "lora":
            raise UserError(f"{self.named('lora_rank')} {self.lora_rank} sets the rank of new LoRA adapters: it applies to --adapter lora")
        for name in ("adam_beta1", "adam_beta2", "eval_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"{self.named(name)} must be in [0, 1), got {getattr(self, name)}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"{self.named('ema_decay')} must be in [0, 1), got {self.ema_decay}")
        if self.eval_data and self.eval_fraction:
            raise UserError("give --eval-data or --eval-fraction, not both")
        if self.eval_data and _same_data(self.eval_data, self.data):
            raise UserError(f"--eval-data {self.eval_data} is the training data (--data): its loss would not be held out; give other "
                            "data, or --eval-fraction to hold out part of --data")
        if self.eval_data and _inside(self.eval_data, self.data):
            raise UserError(f"--eval-data {self.eval_data} is inside --data {self.data}, whose subfolders are read too: its images "
                            "would be trained on and its loss not held out; move it out of that folder, or use --eval-fraction")
        for name in ("data", "eval_data"):  # the run's validation grids would be read as data, on a resume as images of no caption
            if getattr(self, name) and _written_inside(self.out, getattr(self, name)):
                raise UserError(f"{self.named('out')} {self.out} is inside {self.named(name)} {getattr(self, name)}, whose subfolders are "
                                "read too: the run's validation grids would be read as its images; give an --out outside that folder")
        shared = _shared_data(self.eval_data, self.data) if self.eval_data else None
        if shared is not None:
            raise UserError(f"--eval-data {self.eval_data} and --data {self.data} both read {shared}: its loss would not be held out; "
                            "give held-out data apart from --data, or --eval-fraction to hold out part of --data")
        cached = _cached_overlap(self.eval_data, self.data) if self.eval_data else None
        if cached is not None:
            raise UserError(f"{cached}: its loss would not be held out; give held-out data apart from --data, or --eval-fraction to "
                            "hold out part of --data")
        if self.compile and self.adapter != "full":
            raise UserError("--compile applies to full students; a LoRA student shares its UNet with the teacher, which is not "
                            "verified compiled: leave --compile out")
        check_guidance_scale_range(self.guidance_scale_min, self.guidance_scale_max)
        for name in ("lr", "huber_c"):
            if getattr(self, name) <= 0:
                raise UserError(f"{self.named(name)} must be positive, got {getattr(self, name)}")
        if self.validation_guidance_scale < 0:
            raise UserError(f"{self.named('validation_guidance_scale')} must be 0 or more, got {self.validation_guidance_scale}")
        return self

    def flag(self, name: str) -> str:
        """How this run's messages name field `name`: as its user set it. The command-line flag (`flag_of`: --batch-size),
        unless the program that drives the run named its fields otherwise (`named_as`: `lcm demo` sets --steps with
        --distill-steps, and has no flag for the rest)."""
        return getattr(self, "_names", {}).get(name) or flag_of(name)

    def named(self, name: str) -> str:
        """How `check` names field `name` in a refusal of its value: as the config file's field where the value came from the
        file (`resolve_config`; a flag beats the file), not as a flag the user never typed; else as `flag` says."""
        return f"config field {name}" if name in getattr(self, "_from_file", ()) else self.flag(name)

    def named_as(self, names: dict[str, str]) -> TrainConfig:
        """This config, its messages naming each field of `names` as that gives it (`flag`); the fields are unchanged."""
        self._names = dict(names)
        return self

    def chosen(self, name: str) -> bool:
        """Whether the user set field `name` (a flag or the config file: `resolve_config`), not a preset, a model's record or
        the default; the same value as the default counts (`--validation-guidance-scale 8`)."""
        return name in getattr(self, "_chosen", ())

    @property
    def target_decay(self) -> float:
        """μ of the target: as set, else 0.95 for a full student and 0 (shared weights) for LoRA."""
        if self.ema_decay is not None:
            return self.ema_decay
        return 0.95 if self.adapter == "full" else 0.0

    def to_dict(self) -> dict:
        """The fields, after the objective that says which config this is (`config_from_dict` reads it back). A source
        (`SOURCE_FIELDS`) that is a local file or folder is its absolute path (`local_path`), also where it is gone (a
        --student-init cleared away before a resume), and a local shard pattern or glob is one from the root
        (`local_pattern`): the run's config.json and checkpoints then name the same data and
        models from any working directory a run is resumed in. So does `out`: the run folder's absolute, resolved path
        (`os.path.realpath`: through a symbolic link, without a trailing slash), where it was recorded as typed."""
        values = dataclasses.asdict(self)
        for name in SOURCE_FIELDS:
            value = values.get(name)
            path = (local_path(value) or local_pattern(value)) if isinstance(value, str) else None
            if path is not None:
                values[name] = path
        if values["out"]:  # "" (no run folder given, refused by `check`) names none: realpath would make it the working directory
            values["out"] = os.path.realpath(values["out"])
        return {"objective": self.objective} | values

    def differences(self, other: TrainConfig, ignore: tuple[str, ...] = RESUMABLE_CHANGES) -> list[str]:
        """'field: a -> b' for each field that differs, except those a resumed run may change; a model or data named
        another way (`SOURCE_FIELDS`: `w` and `./w/`) does not differ, nor a setting that neither run uses
        (`unused_fields`): a LoRA or PixArt run started before a preset's full-student settings were left out for it (its
        config.json holds the tiny preset's ω embedding size) resumes, where no flag could give that value back. An ω embedding
        size left to a --student-init that cannot be read (None: cleared away since the run started) is the one the run
        recorded: the resumed student is made in the checkpoint's UNet config (`resumed_student_unet`)."""
        a, b = self.to_dict(), other.to_dict()
        ignore = (*ignore, *(self.unused_fields() & other.unused_fields()))

        def same(k) -> bool:
            x, y = a.get(k), b.get(k)
            if k == "ema_decay" and self.adapter == other.adapter:  # unset is the adapter's default: 0.95 full, 0 lora
                return self.target_decay == other.target_decay
            if k == "time_cond_proj_dim" and None in (x, y) and getattr(self, "student_init", "") and getattr(other, "student_init", ""):
                return True
            return x == y or (k in SOURCE_FIELDS and isinstance(x, str) and isinstance(y, str) and bool(x) and bool(y) and _same_data(x, y))

        return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in dict.fromkeys([*a, *b]) if k not in ignore and not same(k)]

    def unused_fields(self) -> set[str]:
        """The settings of an ω input that this run's student lacks (`_omega_less_student`: a LoRA's or a PixArt
        transformer's; LCF of an LCM without one, its guidance range), the ω response count of a run at one guidance
        scale, where there is no response to measure, and the rank of new adapters in LCF of a loaded LCM-LoRA (--lora),
        which keeps its own (the rank config.json records: `run_folder.run_record`)."""
        unused = {"omega_response_samples"} if self.guidance_scale_min == self.guidance_scale_max else set()
        if self.objective == "lcf":
            unused |= {"lora_rank"} if getattr(self, "lora", "") else set()  # a loaded LCM-LoRA keeps its own rank
            return unused | (GUIDANCE_RANGE if _lcm_without_omega_input(getattr(self, "model", None)) else set())
        if self.adapter != "full":
            return unused | PRESET_FULL_STUDENT_FIELDS
        return unused | (set(FULL_STUDENT_FLAGS) if _omega_less_student(type(self), self.adapter, getattr(self, "teacher", None)) else set())

    def moved_sources(self, other: TrainConfig) -> dict[str, tuple[str, str]]:
        """{field: (this path, the other's)} of the sources (`SOURCE_FIELDS`) that both configs name, at other places: the
        candidates of a moved model or data, which a resume accepts where their content is provably the run's
        (`sources.proven_moves`)."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in SOURCE_FIELDS if isinstance(a.get(k), str) and isinstance(b.get(k), str) and a[k] and b[k]
                and not _same_data(a[k], b[k])}


@dataclass
class DistillConfig(TrainConfig):
    """Latent consistency distillation (Algorithm 1): a frozen guided teacher supervises a student (`lcm distill`)."""

    objective: ClassVar[str] = "lcd"
    teacher: str = doc("teacher: a diffusers Stable-Diffusion-style folder or hub id (or one distilled with --method guidance, "
                       "whose ω input then stands for classifier-free guidance)", default="")
    method: str = doc("lcd: latent consistency distillation (Algorithm 1), exported as an LCM; ode (ours): the same LCM regressed "
                      "onto LCD's fixed point, the teacher's ODE solutions from noised data at two ω each, solved once into the run "
                      "folder (--ode-targets rows, about 2T/k teacher passes each); guidance: stage one of Guided-Distill "
                      "(Meng et al. 2023), the teacher's classifier-free guidance learned as an ω input, exported as a diffusion model "
                      "that DDIM or DPM-Solver sample at any step count with one network evaluation per step; progressive: its stage "
                      "two, one round of progressive distillation (Salimans & Ho 2022) of such a model into one sampling in "
                      "--student-steps DDIM steps what it does in twice as many", default="lcd")
    ode_targets: int = doc("--method ode: rows of the bank of teacher ODE solutions (each a noised data latent solved at two "
                           "guidance scales)", default=2048)
    student_steps: int = doc("progressive: the DDIM steps the student samples in (its teacher: twice as many)", default=0)
    student_init: str = doc("a diffusers folder whose UNet (with the ω input) a full student starts from instead of the teacher's, "
                            "e.g. a teacher distilled with --method guidance", default="")
    time_cond_proj_dim: int | None = doc("size of the ω embedding fed to a full student (diffusers' time_cond_proj_dim). Default: "
                                         "the size of the UNet it starts from (--student-init's, or a guidance-distilled teacher's), "
                                         f"which it cannot change; else {DEFAULT_TIME_COND_PROJ_DIM}", default=None)
    student_prediction: str = doc("what a full student's network predicts: teacher (the teacher's parameterisation, as the paper "
                                  "and diffusers), epsilon, v_prediction or sample; the boundary scalings of Eq. 9 wrap it either way",
                                  default="teacher")
    solver: str = doc("teacher ODE solver Ψ: ddim, dpm (DPM-Solver-2), dpm++ (DPM-Solver++(2S))", default="ddim")
    guide_increments: bool = doc("guide the two solver increments (Eq. 17 literally) instead of every teacher evaluation", default=False)
    guidance_pair_weight: float = doc("λ_Δ > 0: draw each example at two guidance scales and add λ_Δ·d of the student's and the "
                                      "target's differences, so that the ω input is learned (ours; 0 = Algorithm 1; 2× the "
                                      "compute per example); full students only", default=0.0)
    guidance_pair_steps: int = doc("apply the λ_Δ term for the first N steps only, then Algorithm 1's loss on both draws "
                                   "(0: every step)", default=0)
    omega_lr_scale: float = doc("learning-rate multiplier of a full student's ω projection (the UNet's time_embedding.cond_proj, "
                                "which starts at zero): the ω input's own learning rate", default=1.0)
    omega_response_samples: int = doc("latents on which the student's ω response (the fraction of the teacher's guidance effect "
                                      "it reproduces) is measured at the end of a full student's LCD or --method ode run over a "
                                      "guidance range (0: skip)", default=32)
    model_field: ClassVar[str] = "teacher"
    min_skip: ClassVar[int] = 1  # k of Eq. 16-17: a grid step; LCF's 0 is the LCM's own

    def check(self) -> DistillConfig:
        from latent_consistency.parameterization import PREDICTION_TYPES, check_guidance_embedding_dim
        from latent_consistency.solvers import get_solver

        super().check()
        get_solver(self.solver)
        if self.method not in METHODS:
            raise UserError(f"{self.named('method')} {self.method!r} is not one of {', '.join(METHODS)}")
        if self.method not in LCM_METHODS:  # Guided-Distill has none of LCD's settings: refused at --dry-run as in the run
            self._check_guided_distill_student()
            skip = field_default(DistillConfig, "skip")
            refused = [flag for flag, on in (("--solver ddim", self.solver != "ddim"), ("no --guide-increments", self.guide_increments),
                                             ("--loss-weighting uniform", self.loss_weighting != "uniform"),
                                             (f"--skip {skip}", self.skip != skip)) if on]
            if refused:
                raise UserError(f"--method {self.method} has no ODE solver, skipping step or grid pairs to weight (those are LCD's): "
                                f"set {', '.join(refused)}")
        if self.method == "ode":
            refused = [flag for flag, on in (("--adapter full", self.adapter != "full"), ("no --guide-increments", self.guide_increments),
                                             ("--loss-weighting uniform", self.loss_weighting != "uniform"),
                                             ("no --guidance-pair-steps", self.guidance_pair_steps > 0),
                                             ("no --eval-data or --eval-fraction", bool(self.eval_data or self.eval_fraction))) if on]
            if refused:
                raise UserError(f"--method ode regresses a full student (its ω input) onto a bank of whole ODE solutions, with no grid "
                                f"pairs to weight or schedule and no held-out loss: set {', '.join(refused)}")
            if self.ode_targets < 1:
                raise UserError(f"{self.named('ode_targets')} must be at least 1, got {self.ode_targets}")
        if self.method != "ode" and self.ode_targets != field_default(DistillConfig, "ode_targets"):
            raise UserError(f"{self.named('ode_targets')} {self.ode_targets} sets the rows of the bank that --method ode regresses onto: it applies to "
                            f"--method ode, not {self.method}")
        if self.omega_response_samples < 0:
            raise UserError(f"{self.named('omega_response_samples')} must be 0 or more, got {self.omega_response_samples}")
        if self.student_steps < 0:
            raise UserError(f"{self.named('student_steps')} must be 0 or more, got {self.student_steps}")
        if (self.method == "progressive") != (self.student_steps > 0):
            raise UserError("--method progressive needs --student-steps N (N >= 1), and --student-steps applies to it alone")
        if self.student_init and self.adapter != "full":
            raise UserError("--student-init gives a full student its starting weights; a LoRA student starts from the teacher")
        if self.student_prediction not in ("teacher", *PREDICTION_TYPES):
            raise UserError(f"{self.named('student_prediction')} {self.student_prediction!r} is not one of teacher, {', '.join(PREDICTION_TYPES)}")
        if self.time_cond_proj_dim is not None:  # None: the starting UNet's own (`resolve_config`, `students.make_student`)
            check_guidance_embedding_dim(self.time_cond_proj_dim)  # its sinusoids need at least 4 dimensions
        if self.guidance_pair_weight < 0:
            raise UserError(f"{self.named('guidance_pair_weight')} must be 0 or more, got {self.guidance_pair_weight}")
        if self.omega_lr_scale <= 0:
            raise UserError(f"{self.named('omega_lr_scale')} must be above 0, got {self.omega_lr_scale}")
        if self.omega_lr_scale != 1 and self.adapter != "full":
            raise UserError(f"{self.named('omega_lr_scale')} applies to full students; a LoRA student has no ω input")
        if self.student_prediction != "teacher" and self.adapter != "full":
            raise UserError(f"{self.named('student_prediction')} applies to full students; a LoRA keeps the teacher's parameterisation")
        if self.guidance_pair_weight > 0 and self.adapter != "full":
            raise UserError(f"{self.named('guidance_pair_weight')} applies to full students; a LoRA student has no ω input")
        if self.guidance_pair_steps < 0:
            raise UserError(f"{self.named('guidance_pair_steps')} must be 0 or more, got {self.guidance_pair_steps}")
        if self.guidance_pair_steps and not self.guidance_pair_weight > 0:
            raise UserError(f"{self.named('guidance_pair_steps')} sets how long the pair term applies: it needs "
                            f"{self.named('guidance_pair_weight')} > 0")
        if self.guidance_pair_weight > 0 and self.guidance_scale_min == self.guidance_scale_max:
            raise UserError(f"{self.named('guidance_pair_weight')} needs a guidance range ({self.named('guidance_scale_min')} < "
                            f"{self.named('guidance_scale_max')})")
        return self

    def _check_guided_distill_student(self) -> None:
        """Guided-Distill's stages train a full student that starts as the teacher: a UserError naming the one setting that
        says otherwise (a preset's LCD-only settings are left out for them: `resolve_config`)."""
        offending = [(f"--adapter {self.adapter}", self.adapter != "full", "--method lcd"),
                     (f"--guidance-pair-weight {self.guidance_pair_weight:g}", self.guidance_pair_weight > 0, "--method lcd and ode"),
                     (f"--student-init {self.student_init}", bool(self.student_init), "--method lcd and ode")]
        for flag, on, applies in offending:
            if on:
                raise UserError(f"--method {self.method} trains a full student from the teacher; {flag} applies to {applies}: leave it out")

    def student_prediction_type(self, teacher_prediction_type: str) -> str:
        """What the student's network predicts, given the teacher's parameterisation."""
        return teacher_prediction_type if self.student_prediction == "teacher" else self.student_prediction


@dataclass
class FinetuneConfig(TrainConfig):
    """Latent consistency fine-tuning (Algorithm 4): an LCM learns from data alone, no teacher (`lcm finetune`)."""

    objective: ClassVar[str] = "lcf"
    model: str = doc("the LCM to fine-tune: a diffusers LatentConsistencyModelPipeline folder or hub id; with --lora, the "
                     "diffusion model the LCM-LoRA belongs to", default="")
    lora: str = doc("an LCM-LoRA on --model to fine-tune (its lora/ folder, a .safetensors file or a hub id); the result is a LoRA",
                    default="")
    skip: int = doc("skipping step k (Eq. 16); 0: the model's own, T / its original_inference_steps", default=0)
    model_field: ClassVar[str] = "model"

    def check(self) -> FinetuneConfig:
        super().check()
        if self.lora and self.adapter != "lora":
            raise UserError("fine-tuning an LCM-LoRA (--lora) trains that LoRA: use --adapter lora")
        if self.lora and self.lora_rank != field_default(FinetuneConfig, "lora_rank"):
            raise UserError(f"{self.named('lora_rank')} {self.lora_rank} sets the rank of new adapters; the LCM-LoRA of --lora keeps its "
                            "own rank: leave it out")
        return self


# Named presets of each command: partial configs applied over the defaults.
DISTILL_PRESETS: dict[str, dict[str, Any]] = {
    # Paper settings at Stable Diffusion scale (Section 5.1): ω ∈ [2, 14], k = 20, DDIM, batch 72 on GPUs.
    "sd": dict(solver="ddim", skip=20, guidance_scale_min=3.0, guidance_scale_max=15.0, lr=8e-6, batch_size=72,
               steps=4000, loss="huber", ema_decay=0.95, mixed_precision="fp16", gradient_checkpointing=True,
               validate_every=500, checkpoint_every=500),
    # LCM-LoRA on Stable Diffusion 1.5 (Luo et al. 2023b), diffusers' published recipe (examples/consistency_distillation
    # README: train_lcm_distill_lora_sd_wds.py): rank-64 adapters at lr 1e-4 without weight decay, k = 20, DDIM,
    # pseudo-Huber, fp16, gradient checkpointing, 1,000 steps, batch 12 per GPU (--batch-size is global here); the
    # native 512 px; the paper's guidance range, as `sd` (their w ∈ [3, 15] is ω: give g ∈ [4, 16] for theirs).
    "sd-lora": dict(solver="ddim", skip=20, guidance_scale_min=3.0, guidance_scale_max=15.0, lr=1e-4, batch_size=12, steps=1000,
                    loss="huber", adapter="lora", lora_rank=64, weight_decay=0.0, mixed_precision="fp16", gradient_checkpointing=True,
                    validate_every=200, checkpoint_every=200, keep_checkpoints=10),
    # diffusers' published SDXL recipes (examples/consistency_distillation README: train_lcm_distill_sdxl_wds.py and its
    # LoRA twin): 1024 px with the size/crop micro-conditioning fixed at the resolution (their --use_fix_crop_and_size,
    # which is what our latent cache and image data give an SDXL condition), k = 20, pseudo-Huber, fp16,
    # gradient checkpointing, 1,000 steps; full: lr 1e-6, μ = 0.95; LoRA: rank 64, lr 1e-4. Their batch is 12 per GPU:
    # --batch-size is global here, so set it to 12 x your GPUs. The guidance range is the paper's, ω ∈ [2, 14]: their
    # scripts use their w ∈ [3, 15] as ω (c + w(c - u)), g ∈ [4, 16] (docs/guide.md says so).
    "sdxl": dict(solver="ddim", skip=20, guidance_scale_min=3.0, guidance_scale_max=15.0, lr=1e-6, batch_size=12, resolution=1024,
                 steps=1000, loss="huber", ema_decay=0.95, weight_decay=0.0, mixed_precision="fp16", gradient_checkpointing=True,
                 validate_every=200, checkpoint_every=200, keep_checkpoints=10),
    "sdxl-lora": dict(solver="ddim", skip=20, guidance_scale_min=3.0, guidance_scale_max=15.0, lr=1e-4, batch_size=12, resolution=1024,
                      steps=1000, loss="huber", adapter="lora", lora_rank=64, weight_decay=0.0, mixed_precision="fp16",
                      gradient_checkpointing=True, validate_every=200, checkpoint_every=200, keep_checkpoints=10),
    # The built-in default world on a CPU (the demo). A v-prediction student of the ε teacher (an ε student's
    # 1-step FID stays at 62-77) and the guidance range g ∈ [1, 2]: with g ∈ [2, 8] the student settles at
    # 1/2/4-step FID ~25-31; with [1, 3] at ~4 / 6 / 5, its 2-step best being a transient at step 750; with
    # [1, 2] every step count ends at its best by step 4,000 (3.3 / 3.3 / 5.4). The iCT loss weighting keeps the
    # student on the teacher's ODE at the middle timesteps, where with uniform weights it drifts off and 4-step
    # FID rises from ~8 to 12-15 after 2,500 steps (docs/notes/2026-11-27-distillation.md). The world presets use AdamW's
    # fused kernel: on the 2-core CPU an update of this student takes 2.4 ms against 11-13 ms for torch's CPU default (a
    # for-loop), and the demo's tables came out the same to the last digit.
    "world": dict(solver="ddim", skip=20, guidance_scale_min=1.0, guidance_scale_max=2.0, lr=5e-5, batch_size=64,
                  steps=1000, loss="l2", loss_weighting="ict", ema_decay=0.95, lr_warmup_steps=100, validate_every=250,
                  checkpoint_every=250, keep_checkpoints=10, time_cond_proj_dim=64, student_prediction="v_prediction",
                  validation_guidance_scale=2.0, omega_response_samples=8, optimizer="adamw-fused"),
    # The built-in world with exact targets (--method ode, ours) over g ∈ [1, 4], where this teacher's 25-step FID is
    # best: the student regressed onto 2,048 teacher ODE solutions at two ω each (λ_Δ = 10 on their difference). The
    # whole network at lr 2e-4 (at 5e-5 the ω response halves), the ω projection at 25 × that. On a 2-core CPU about
    # 4 minutes for the bank and 10 for the steps; 4-step FID at the exact LCM's and an ω response of about 0.6, where
    # the `world` preset's LCD student ignores ω (docs/notes/2026-12-02-omega.md).
    "world-ode": dict(method="ode", solver="ddim", skip=20, guidance_scale_min=1.0, guidance_scale_max=4.0, ode_targets=2048,
                      guidance_pair_weight=10.0, lr=2e-4, omega_lr_scale=25.0, batch_size=64, steps=2000, loss="l2",
                      loss_weighting="uniform", ema_decay=0.95, lr_warmup_steps=100, validate_every=250, checkpoint_every=500,
                      keep_checkpoints=10, time_cond_proj_dim=64, student_prediction="v_prediction", validation_guidance_scale=2.0,
                      omega_response_samples=32, optimizer="adamw-fused"),
    # The second stage after `world-ode` (its LCM as --student-init): LCD with the pair loss (λ_Δ = 10, 32 examples × 2 ω per
    # step) over the same g ∈ [1, 4], the network at lr 3e-6 and the ω projection at 5e-3. From the regression student
    # (ω response ~0.4 / 0.5 / 0.55 / 0.6 at t = 999 / 759 / 499 / 259) it reaches ~0.4 / 0.7 / 0.8 / 0.8 in 1,000 steps
    # with every FID bar of issue 16 kept at g = 1-4; at lr 5e-5 (the `world` preset's) the same response costs the g = 4
    # images 1.6 × the teacher's FID, and the ω projection alone (lr ~0) reaches ~0.7 at t = 499 (docs/notes/2026-12-02-omega.md).
    "world-guided": dict(solver="ddim", skip=20, guidance_scale_min=1.0, guidance_scale_max=4.0, guidance_pair_weight=10.0, lr=3e-6,
                         omega_lr_scale=1667.0, batch_size=32, steps=1000, loss="l2", loss_weighting="ict", ema_decay=0.95,
                         lr_warmup_steps=100, validate_every=250, checkpoint_every=250, keep_checkpoints=10, time_cond_proj_dim=64,
                         student_prediction="v_prediction", validation_guidance_scale=2.0, omega_response_samples=32,
                         optimizer="adamw-fused"),
    # Plumbing in tests: seconds. The ω response on one latent: its teacher solutions are most of a tiny run's time (2 s
    # of 4 on 4 latents), and a test that needs more asks for them.
    "tiny": dict(steps=4, batch_size=4, lr=1e-4, lr_warmup_steps=0, log_every=1, validate_every=0, checkpoint_every=2,
                 time_cond_proj_dim=32, omega_response_samples=1),
}
# Presets that continue another preset's run: they need its LCM as --student-init (started from the teacher they would
# be a different, untested recipe)
CONTINUES = {"world-guided": "world-ode"}
FINETUNE_PRESETS: dict[str, dict[str, Any]] = {
    # A starting point for an SD-scale LCM: the paper's LCF learning rate (Section 4.4), its distillation's guidance
    # range, batch and precision settings.
    "sd": dict(guidance_scale_min=3.0, guidance_scale_max=15.0, lr=8e-6, batch_size=72, steps=30000, loss="huber", ema_decay=0.95,
               mixed_precision="fp16", gradient_checkpointing=True, validate_every=1000, checkpoint_every=1000, eval_fraction=0.1),
    # The demo's LCM fine-tuned on the world's digits, a dataset its teacher never saw (docs/guide.md). k = 100: LCF
    # is consistency training, whose targets reach t = 999 one grid link at a time; with the LCM's own k = 20
    # (50 links) 500 steps left its 1-step samples where they started (FID 550, lr 2e-4), with 10 links they reach
    # FID 17. lr 2e-4 (5e-5: 4-step FID 137; 300 steps: 27; batch 32: 15 and the digit read on 0.88 of 4-step images).
    "world": dict(guidance_scale_min=1.0, guidance_scale_max=2.0, lr=2e-4, batch_size=64, steps=500, skip=100, loss="l2",
                  loss_weighting="ict", ema_decay=0.95, lr_warmup_steps=50, validate_every=500, checkpoint_every=250,
                  keep_checkpoints=10, validation_guidance_scale=2.0, optimizer="adamw-fused"),
    "tiny": dict(steps=4, batch_size=4, lr=1e-4, lr_warmup_steps=0, log_every=1, validate_every=0, checkpoint_every=2),
}
CONFIGS: dict[str, type[TrainConfig]] = {"lcd": DistillConfig, "lcf": FinetuneConfig}
PRESETS: dict[type[TrainConfig], dict[str, dict[str, Any]]] = {DistillConfig: DISTILL_PRESETS, FinetuneConfig: FINETUNE_PRESETS}
COMMANDS = {DistillConfig: "lcm distill", FinetuneConfig: "lcm finetune"}


def field_help(cls: type[TrainConfig]) -> dict[str, str]:
    """Each field of a config class and its documentation."""
    return {f.name: f.metadata.get("help", "") for f in fields(cls)}


def flag_of(name: str) -> str:
    """The command-line flag of config field `name` (`--batch-size` of batch_size): the flag `lcm distill` and `lcm finetune`
    make of it (`cli.training_flags`), and how a run's messages name it (`TrainConfig.flag`)."""
    return "--" + name.replace("_", "-")


def field_default(cls: type[TrainConfig], name: str) -> Any:
    """The default of field `name` of a config class (before any preset)."""
    return next(f.default for f in fields(cls) if f.name == name)


def canonical_source(spec: str) -> str:
    """A data spec or model named as every spelling of it is: the absolute path of a file or folder (`local_path`: `w`,
    `./w/`), else the canonical name of a registered dataset (world:shapes and world:shapes:train), else as given (a hub id,
    a shard pattern)."""
    from latent_consistency.data.spec import canonical_spec

    return local_path(spec) or canonical_spec(spec)


def local_path(spec: str) -> str | None:
    """The absolute path of the file or folder `spec` names: an existing one's, resolved, or a missing one's, where `spec`
    can only be a path (no dataset's scheme:name, no shard pattern, no hub id's org/name form): a --student-init cleared
    away before a resume, named relative to the working directory, is the folder the run started from. None for anything
    else."""
    from latent_consistency.hub import looks_like_hub_id

    if not spec:
        return None
    spec = os.path.expanduser(spec)  # `~/imgs` is a path, not the hub's org/name
    if Path(spec).exists():
        return str(Path(spec).resolve())
    no_path = any(char in spec for char in ":*?[{") or looks_like_hub_id(spec)
    return None if no_path else os.path.abspath(spec)


def local_pattern(spec: str) -> str | None:
    """A local shard brace pattern or glob (`shards.expand_urls`: `shards/{00000..00099}.tar`, `data/*.tar`) spelled from
    the root: `spec` joined to the working directory where it is relative, so that a run's config.json reads the same
    shards from any other one. None for anything else (a dataset's scheme:name, a path without a pattern: `local_path`)."""
    if not spec or ":" in spec or not any(char in spec for char in "*?[{"):
        return None
    return os.path.join(os.getcwd(), os.path.expanduser(spec))


def _same_data(a: str, b: str) -> bool:
    """Whether two data specs (or models) name the same source (`canonical_source`); a missing model named in the hub's
    org/name form is the same as the folder of that relative path it was read from when it was there."""
    if canonical_source(a) == canonical_source(b):
        return True
    return any(_relative_path_of(x, y) for x, y in ((a, b), (b, a)))


def _relative_path_of(spec: str, other: str) -> bool:
    """Whether `spec`, relative and gone, is the relative path of the absolute path `other` (a run's recorded source)."""
    return not Path(spec).exists() and not os.path.isabs(spec) and os.path.isabs(other) and os.path.abspath(spec) == other


def _inside(inner: str, outer: str) -> bool:
    """Whether the data spec `inner` is a path inside the existing folder `outer` (an image folder reads its subfolders)."""
    if not (Path(inner).exists() and Path(outer).is_dir()):
        return False
    return Path(outer).resolve() in Path(inner).resolve().parents


def _written_inside(out: str, data: str) -> bool:
    """Whether the run folder `out` (there yet or not) is the existing folder `data` names, or lies inside it, where `data`
    is read with its subfolders: an image folder or a folder of shards, not a latent cache (which reads its own files)."""
    folder = Path(data).expanduser()
    if not folder.is_dir() or (folder / "manifest.json").is_file():
        return False
    inside = Path(os.path.realpath(os.path.expanduser(out)))
    return folder.resolve() in (inside, *inside.parents)


def _shared_data(a: str, b: str) -> str | None:
    """A file or folder that both data specs read (`spec.read_paths`: a shard two shard patterns name, a folder of the one
    that holds the other, which an image folder reads with its subfolders, a symlinked folder, image or shard in one that
    leads into the other), said with the link it is read through, or None: held-out data must share none with the
    training data. Specs that are no paths (world:NAME) or name no shard share nothing here."""
    from latent_consistency.data.spec import read_paths

    reads_a, reads_b = read_paths(a), read_paths(b)
    for reads, others in ((reads_a, reads_b), (reads_b, reads_a)):
        for path in sorted(reads):  # a dict lookup per folder above each path: 12,000 shards each
            match = next((above for above in (path, *path.parents) if above in others), None)
            if match is not None:
                link = reads[path] or others[match]
                return str(path) if link is None else f"{path} (through the link {link})"
    return None


def _overlaps(a: str, b: str) -> bool:
    """Whether data specs `a` (held out) and `b` (trained on) are the same data, `a` lies inside `b`, or they read a file or
    folder in common (`_same_data`, `_inside`, `_shared_data`)."""
    return _same_data(a, b) or _inside(a, b) or _shared_data(a, b) is not None


def _cached_overlap(eval_data: str, data: str) -> str | None:
    """Why held-out data `eval_data` and training data `data` are the same images through a latent cache, or None: one is
    a cache of the other, or both are caches of the same data (`latent_cache.source_data`, the data a cache's manifest
    says it was written from), where a cache otherwise reads its own files only."""
    from latent_consistency.data.latent_cache import source_data

    held, trained = source_data(eval_data), source_data(data)
    if held is not None and _overlaps(held, data):
        return f"--eval-data {eval_data} is a latent cache of {held}, whose images --data {data} reads"
    if trained is not None and _overlaps(eval_data, trained):
        return f"--data {data} is a latent cache of {trained}, whose images --eval-data {eval_data} reads"
    if held is not None and trained is not None and _overlaps(held, trained):
        return f"--eval-data {eval_data} and --data {data} are latent caches of the same data ({held}, {trained})"
    return None


# Flags that only a full student's ω input uses, refused with a LoRA when given on the command line (`resolve_config`)
FULL_STUDENT_FLAGS = {"time_cond_proj_dim": "sets the size of a full student's ω embedding",
                      "omega_response_samples": "sets the latents a full student's ω response is measured on"}
# A preset's settings of a full student, left at their defaults when the preset trains a LoRA (`--preset world --adapter lora`):
# a LoRA keeps the teacher's parameterisation and has no ω input (given on the command line, they are refused: `check`)
# The guidance range ω is drawn from, which an LCM without an ω input does not read in fine-tuning (`resolve_config`)
GUIDANCE_RANGE = {"guidance_scale_min", "guidance_scale_max"}
PRESET_FULL_STUDENT_FIELDS = {"student_prediction", "omega_lr_scale", "guidance_pair_weight", "guidance_pair_steps", *FULL_STUDENT_FLAGS}
# A preset's settings of LCD alone (its solver, skipping step, grid weighting, pair loss), left at their defaults for
# Guided-Distill's stages, which have none of them (`--preset world --method guidance`; given, they are refused: `check`)
PRESET_LCD_FIELDS = {"solver", "skip", "guide_increments", "loss_weighting", "guidance_pair_weight", "guidance_pair_steps", "ode_targets"}
# Defaults of earlier versions that their config.json files hold, no request either where the field does not apply (a LoRA
# run's config.json of before the ω embedding size defaulted to the starting UNet's holds 256)
FORMER_DEFAULTS = {"time_cond_proj_dim": (DEFAULT_TIME_COND_PROJ_DIM,)}


def resolve_config(cls: type[TrainConfig], preset: str | None = None, config_file: str | None = None,
                   overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults <- preset <- JSON file <- overrides (None values are skipped); for LCF of an LCM with a guidance record, or
    distillation from a guidance-distilled teacher with one, the record's range and default g where neither the file nor
    the overrides give them (`recorded_guidance_fields`)."""
    values: dict[str, Any] = {}
    if preset:
        if preset not in PRESETS[cls]:
            raise UserError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS[cls])}")
        values.update(PRESETS[cls][preset])
    from_file = _home_expanded(_read_config_file(config_file)) if config_file else {}
    # each of the file's fields is checked as the file gives it, also where a flag overrides it: a file is valid or not
    from_file = {k: _typed(cls, k, v) if k in field_help(cls) else v for k, v in from_file.items()}
    values.update(from_file)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    values.update(given)
    # what the model's guidance record says, where the user's flags and config file say nothing: LCF of an LCM, and
    # distillation from a guidance-distilled teacher (Guided-Distill's stage one, a progressive round), whose ω input
    # learned that range: the preset's or default's range reached outside it, where the targets extrapolate
    if cls.objective == "lcf":
        values.update(recorded_guidance_fields(values.get("model"), set(given) | set(from_file)))
    elif _guidance_distilled(values.get("teacher")):  # an LCM given as teacher is refused with its own message, later
        values.update(recorded_guidance_fields(values.get("teacher"), set(given) | set(from_file)))
    adapter = values.get("adapter", field_default(cls, "adapter"))
    method = values.get("method", field_default(cls, "method")) if "method" in field_help(cls) else None

    def requested(name: str) -> str | None:
        """How the user asked for field `name` (a flag, or the config file's field), or None: given on the command line and
        not 0 (no response to measure), or in the file and neither 0 nor the default (what --dry-run prints where it does not
        apply); a preset's value (the tiny one's 32) is no request."""
        if name in given:
            return flag_of(name) if given[name] != 0 else None
        if name in from_file and from_file[name] not in (0, field_default(cls, name), *FORMER_DEFAULTS.get(name, ())):
            return f"config field {name} {from_file[name]!r}"
        return None

    omega_less = _omega_less_student(cls, adapter, values.get("teacher"))
    for name in sorted(FULL_STUDENT_FLAGS):
        asked = requested(name) if omega_less and name in field_help(cls) else None
        if asked:
            raise UserError(f"{asked} {FULL_STUDENT_FLAGS[name]}; {omega_less}: leave it out")
    if omega_less and preset:  # a preset's full-student settings (the world's v-prediction student) are no request either
        fields_of_omega = PRESET_FULL_STUDENT_FIELDS if adapter != "full" else set(FULL_STUDENT_FLAGS)  # a PixArt student is full
        for name in fields_of_omega & set(PRESETS[cls][preset]) - set(given):
            values.pop(name, None)
    chosen = set(given) | set(from_file)
    if preset and adapter != "full" and "ema_decay" in set(PRESETS[cls][preset]) - chosen:
        values.pop("ema_decay")  # a full student's μ (`target_decay`: a LoRA's 0 shares the UNet, where 0.95 copies it whole)
    if cls.objective == "lcf" and values.get("lora") and "lora_rank" in from_file and "lora_rank" not in given:
        values.pop("lora_rank")  # a run's config.json records its LCM-LoRA's own rank (`run_folder.run_record`): no request
    if preset and values.get("eval_data") and "eval_data" in chosen and "eval_fraction" in set(PRESETS[cls][preset]) - chosen:
        values.pop("eval_fraction")  # the user's held-out data replaces the preset's held-out fraction (`finetune --preset sd`)
    if method is not None and method not in LCM_METHODS:  # Guided-Distill's stages make no LCM, whose ω response is measured
        asked = requested("omega_response_samples")
        if asked:
            raise UserError(f"{asked} sets the latents an LCM's ω response is measured on; --method {method} makes no LCM: "
                            "leave it out")
        values["omega_response_samples"] = 0  # none measured, as --dry-run and config.json then say (a preset's: no request)
        if preset:
            _check_full_student_preset(preset, PRESETS[cls][preset], chosen, method)
            for name in PRESET_LCD_FIELDS & set(PRESETS[cls][preset]) - chosen:
                values.pop(name)
    if "time_cond_proj_dim" in field_help(cls) and not omega_less:
        how = ("--time-cond-proj-dim" if "time_cond_proj_dim" in given else
               "config field time_cond_proj_dim" if from_file.get("time_cond_proj_dim") is not None else None)
        values.update(_starting_omega_size(values, how))
    if cls.objective == "lcf" and _lcm_without_omega_input(values.get("model")):
        for name in GUIDANCE_RANGE:
            asked = requested(name)
            if asked:
                raise UserError(f"{asked} sets the guidance scales whose ω fine-tuning feeds the LCM's ω input, and {values['model']} "
                                "has none (an LCM-LoRA's base model, PixArt-LCM): leave it out")
        for name in GUIDANCE_RANGE & set(PRESETS[cls][preset] if preset else ()) - set(given):  # the world preset's [1, 2]: no request
            values.pop(name, None)
    if _single_guidance_scale(cls, values) and "omega_response_samples" in field_help(cls):  # nothing for ω to respond over
        asked = requested("omega_response_samples")
        if asked:
            raise UserError(f"{asked} sets the latents the ω response is measured on, between the ends of the guidance range; "
                            f"--guidance-scale-min and --guidance-scale-max are both {values['guidance_scale_min']:g}: give a range, "
                            "or leave it out")
        if preset and "omega_response_samples" in PRESETS[cls][preset]:  # the tiny preset's 1: no request
            values.pop("omega_response_samples", None)
    if preset in CONTINUES and not values.get("student_init"):
        raise UserError(f"--preset {preset} continues a `--preset {CONTINUES[preset]}` run: give that run's LCM as --student-init "
                        "RUN/lcm")
    if preset in CONTINUES:
        _check_continued_lcm(preset, values["student_init"])
    objective = values.pop("objective", cls.objective)  # a saved config.json names its objective
    if objective != cls.objective:
        known_objective = isinstance(objective, str) and objective in CONFIGS
        raise UserError(f"this config is for {COMMANDS[CONFIGS[objective]] if known_objective else repr(objective)}, "
                        f"not {COMMANDS[cls]}")
    known = field_help(cls)
    elsewhere = sorted(k for k in set(values) - set(known) if any(k in field_help(other) for other in CONFIGS.values()))
    if elsewhere:
        other = next(c for c in CONFIGS.values() if elsewhere[0] in field_help(c))
        raise UserError(f"{', '.join(elsewhere)} belong(s) to {COMMANDS[other]}"
                        + (": fine-tuning has no teacher" if cls is FinetuneConfig else f", not {COMMANDS[cls]}"))
    unknown = sorted(set(values) - set(known))
    sections = [name for name in unknown if isinstance(values[name], dict)]
    if sections:
        raise UserError(f"config file {config_file} gives {sections[0]} an object; a config file is one flat JSON object of fields "
                        f"(as --dry-run prints), without sections: see `{COMMANDS[cls]} --help`")
    if unknown:
        raise UserError(f"unknown config field(s) {', '.join(_unknown_field(name, known) for name in unknown)}; see `{COMMANDS[cls]} --help`")
    config = cls(**{name: _typed(cls, name, value) for name, value in values.items()})
    config._chosen = frozenset(chosen)  # `TrainConfig.chosen`
    config._from_file = frozenset(from_file) - set(given)  # `TrainConfig.named`
    return config


# Presets of plumbing (tests' seconds-long runs), whose learning rate is tuned for no kind of student
PLUMBING_PRESETS = {"tiny"}


def preset_adapter_note(cls: type[TrainConfig], preset: str | None, config: TrainConfig) -> str | None:
    """A note when a run trains another kind of student than its preset was tuned for (`--preset sd --adapter lora`) at the
    preset's learning rate: LoRA adapters train at about 1e-4 (`sd-lora`, `sdxl-lora`), a whole UNet at 1e-6 to 8e-6 (`sd`, `sdxl`), so
    the preset's rate is 12 to 100 times off. None where the user's --lr (or config file's) replaced it."""
    if not preset or preset in PLUMBING_PRESETS:
        return None
    values = PRESETS[cls][preset]
    own = values.get("adapter", field_default(cls, "adapter"))
    if config.adapter == own or config.lr != values.get("lr", field_default(cls, "lr")):
        return None
    kind = {"full": "a full student", "lora": "LoRA adapters"}
    return (f"--preset {preset} is tuned for {kind[own]}, its lr {config.lr:g} with it; --adapter {config.adapter} trains "
            f"{kind[config.adapter]}, usually at another rate: give --lr")


def resolved_defaults(config: TrainConfig) -> list[str]:
    """What the run makes of the values that `config` leaves to it, which config.json and --dry-run record as given (so
    that the file fed back is the same run): the target's μ of an unset ema_decay (`target_decay`), LCF's k at skip 0 (the
    LCM's own: T / its scheduler's original_inference_steps, as `DiffusionModel.skip`), and the model's native size at
    resolution 0 (its network's sample_size in latents, times the VAE's downsampling, as `DiffusionModel.native_size`),
    these two read from the model's config files where they can be before it loads."""
    said = []
    if config.ema_decay is None:
        said.append(f"ema_decay μ = {config.target_decay:g} (" + ("a full student's" if config.adapter == "full" else
                                                                "a LoRA's: the target is the student") + ")")
    model = getattr(config, config.model_field)
    scheduler = model_json(model, "scheduler/scheduler_config.json") if config.skip == 0 else None
    if scheduler is not None:
        steps = int(scheduler.get("original_inference_steps", DEFAULT_ORIGINAL_INFERENCE_STEPS))
        said.append(f"skip k = {int(scheduler.get('num_train_timesteps', 1000)) // steps} (the model's own: T / its "
                    f"original_inference_steps {steps})")
    network = model_json(model, f"{'transformer' if _is_transformer_pipeline(model) else 'unet'}/config.json") if config.resolution == 0 else None
    vae = model_json(model, "vae/config.json") if network is not None else None
    if vae is not None and isinstance(network.get("sample_size"), int) and isinstance(vae.get("block_out_channels"), list):
        said.append(f"resolution {network['sample_size'] * 2 ** (len(vae['block_out_channels']) - 1)} (the native size of {model})")
    return said


def _check_full_student_preset(preset: str, preset_values: dict[str, Any], chosen: set[str], method: str) -> None:
    """A UserError, naming the preset, for a preset of LoRA adapters (`sd-lora`, `sdxl-lora`) under a Guided-Distill stage, which
    trains a full student (`DistillConfig.check` would blame an --adapter the user never gave)."""
    adapter = preset_values.get("adapter", "full")
    if adapter != "full" and "adapter" not in chosen:
        raise UserError(f"--preset {preset} trains LoRA adapters (adapter {adapter}); --method {method} trains a full student: "
                        "give --adapter full, or use a preset of a full student")


def _starting_omega_size(values: dict[str, Any], given: str | None) -> dict[str, int | None]:
    """A full LCD student's ω embedding size where the user gave none (`given`: how they gave one, else None): the size of
    the ω input of the UNet it starts from (--student-init's, else a guidance-distilled teacher's), which it keeps
    (`students.make_student`); a preset's size is for a teacher without one, whose student gets the preset's, else
    `DEFAULT_TIME_COND_PROJ_DIM`. None for a --student-init whose config cannot be read before it loads (cleared away
    since the run started: a resume makes the student in its checkpoint's UNet config). A size the user gave that is not
    the starting UNet's is refused: the student cannot change it."""
    start = values.get("student_init") or values.get("teacher")
    unet = model_json(start, "unet/config.json") if isinstance(start, str) and start else None
    own = unet.get("time_cond_proj_dim") if unet is not None else None
    if given and own is not None and values["time_cond_proj_dim"] != own:
        raise UserError(f"the student starts from {start}, whose ω embedding has size {own}: {given} {values['time_cond_proj_dim']} "
                        "cannot change it; leave it out (the student keeps its starting UNet's size)")
    if given:
        return {}
    if unet is None:
        return {"time_cond_proj_dim": None} if values.get("student_init") else {}
    if own is None:
        return {"time_cond_proj_dim": values.get("time_cond_proj_dim") or DEFAULT_TIME_COND_PROJ_DIM}
    return {"time_cond_proj_dim": own}


def _guidance_distilled(teacher: Any) -> bool:
    """Whether the model `teacher` names is a diffusion model with an ω input (Guided-Distill's stage one, a progressive
    round: a guidance record and a scheduler config that is no LCM's), by its files, before any weights load."""
    if not isinstance(teacher, str) or not teacher:
        return False
    scheduler = model_json(teacher, "scheduler/scheduler_config.json")
    return scheduler is not None and not is_lcm_config(scheduler) and guidance_record_of(teacher) is not None


def _check_continued_lcm(preset: str, student_init: str) -> None:
    """A UserError when the --student-init of a preset that continues another preset's LCM (`CONTINUES`) is no LCM (a model
    distilled with --method guidance): the preset's recipe (the `world-guided` one's learning rate 3e-6) fine-tunes an LCM's
    ω input, and would not make an LCM of a diffusion model. Nothing where its scheduler config cannot be read here."""
    scheduler = model_json(student_init, "scheduler/scheduler_config.json")
    if scheduler is not None and not is_lcm_config(scheduler):
        raise UserError(f"--preset {preset} continues the LCM of a `--preset {CONTINUES[preset]}` run, and --student-init {student_init} "
                        f"is no LCM (a guidance-distilled diffusion model): give that run's RUN/lcm, or train one with --preset "
                        f"{CONTINUES[preset]}")


def _omega_less_student(cls: type[TrainConfig], adapter: str, teacher: Any) -> str | None:
    """Why a distillation's student has no ω input (what the full-student settings `FULL_STUDENT_FLAGS` act on), or None:
    LoRA adapters leave the teacher's UNet as it is (`students.make_student`), and a PixArt-α transformer has no
    time_cond_proj_dim to add (`objectives._check_transformer_student`)."""
    if adapter != "full":
        return f"a LoRA student (--adapter {adapter}) has no ω input"
    if cls.objective == "lcd" and isinstance(teacher, str) and _is_transformer_pipeline(teacher):
        return f"the teacher {teacher} is a PixArt transformer, which has no ω input (its student is distilled at one guidance scale)"
    return None


def _lcm_without_omega_input(model: Any) -> bool:
    """Whether the LCM a fine-tuning starts from (--model; with --lora, the model the LCM-LoRA goes on) has no ω input, so
    that the ω LCF draws does nothing: a diffusion model's UNet (an LCM-LoRA's base) or PixArt-LCM's transformer. False
    where its configs cannot be read (its loader says why)."""
    if not isinstance(model, str) or not model:
        return False
    if _is_transformer_pipeline(model):
        return True
    unet = model_json(model, "unet/config.json")
    return unet is not None and unet.get("time_cond_proj_dim") is None


def _is_transformer_pipeline(name: str) -> bool:
    """Whether the model `name` is a pipeline of a transformer and no UNet (PixArt-α), by its model_index.json."""
    index = model_json(name, "model_index.json") or {}

    def names(part: str) -> bool:
        entry = index.get(part)
        return isinstance(entry, list) and bool(entry) and entry[0] is not None

    return names("transformer") and not names("unet")


def _single_guidance_scale(cls: type[TrainConfig], values: dict[str, Any]) -> bool:
    """Whether the resolved `values` distil at one guidance scale (--guidance-scale-min = --guidance-scale-max)."""
    low, high = (values.get(name, field_default(cls, name)) for name in ("guidance_scale_min", "guidance_scale_max"))
    return low == high


# The fields an LCM's guidance record (`guidance_record`) gives a fine-tuning run of it
RECORDED_GUIDANCE_FIELDS = ("guidance_scale_min", "guidance_scale_max", "validation_guidance_scale")


def recorded_guidance_fields(model: str | None, chosen: set[str]) -> dict[str, float]:
    """LCF of an LCM with a guidance record, or distillation from a guidance-distilled teacher with one: the range its ω
    input was distilled on and its default g, for the fields the user did not choose (`chosen`) — a preset's range or g
    would move the fine-tuned LCM's default g, or draw ω where it extrapolates (LCF teaches no guidance; a teacher's ω
    input gives its targets no guidance it did not learn). Nothing for a model without a record (a CFG teacher, an LCM
    from elsewhere, a hub id online)."""
    record = guidance_record_of(model) if isinstance(model, str) and model else None
    if record is None:
        return {}
    recorded = dict(zip(RECORDED_GUIDANCE_FIELDS, (record.guidance_scale_min, record.guidance_scale_max, record.guidance_scale)))
    return {name: value for name, value in recorded.items() if name not in chosen}


# The fields that are text, not a path: a "~" in them is the user's (`_home_expanded`)
TEXT_FIELDS = {"validation_prompts"}


def _home_expanded(values: dict[str, Any]) -> dict[str, Any]:
    """A config file's `values` with each path given as `~/...` (or `~user/...`) in the home folder, as a flag's is
    (`cli.arguments.OneLineParser.expand_home`): `"out": "~/run"` wrote into a folder named "~" under the current one
    (which a later `rm -rf ~` meant for it takes the home folder with). Prompts (`TEXT_FIELDS`) are left as written."""
    def expanded(value: Any) -> Any:
        return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value

    return {name: value if name in TEXT_FIELDS else [expanded(v) for v in value] if isinstance(value, list) else expanded(value)
            for name, value in values.items()}


# diffusers' LCD scripts' names (train_lcm_distill_sd_wds.py) of fields named otherwise here, for an unknown field's hint
DIFFUSERS_NAMES = {"learning_rate": "lr", "max_train_steps": "steps", "gradient_accumulation_steps": "grad_accumulation",
                   "output_dir": "out", "pretrained_teacher_model": "teacher", "checkpointing_steps": "checkpoint_every",
                   "validation_steps": "validate_every", "checkpoints_total_limit": "keep_checkpoints", "loss_type": "loss"}


def _unknown_field(name: str, known: dict[str, str]) -> str:
    """An unknown field `name` of a config file, with the field it may stand for: the one its flag's spelling names
    (`batch-size`, `--batch-size`: batch_size), the one of diffusers' name (`DIFFUSERS_NAMES`), else the closest names."""
    as_field = name.lstrip("-").replace("-", "_")
    if as_field in known:
        return f"{name} (a flag's spelling: the field is {as_field})"
    if DIFFUSERS_NAMES.get(as_field) in known:
        return f"{name} (diffusers' name: the field is {DIFFUSERS_NAMES[as_field]})"
    close = difflib.get_close_matches(as_field, list(known), n=2)
    return f"{name} (did you mean {' or '.join(close)}?)" if close else name


def _read_config_file(config_file: str) -> dict:
    """The fields of the JSON file `config_file`: one flat object of them, as --dry-run prints and config.json holds; a
    UserError saying what else the file is (YAML or TOML, a checkpoint's state.json; sections: `resolve_config`)."""
    path = Path(config_file)
    if not path.exists():
        raise UserError(f"config file {config_file} does not exist")
    if not path.is_file():
        raise UserError(f"config file {config_file} is not a file; give a JSON file of config fields")
    try:
        # with or without a byte-order mark, as captions and prompt files are read (Notepad writes one)
        text = path.read_text(encoding="utf-8-sig")
        loaded = json.loads(text, object_pairs_hook=_refuse_duplicates)
    except _DuplicateField as dup:
        raise UserError(f"config file {config_file} gives field {dup.args[0]} twice; keep one") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        other = not isinstance(err, UnicodeDecodeError) and not text.lstrip().startswith(("{", "["))
        raise UserError(f"config file {config_file} is not valid JSON: {getattr(err, 'msg', err)}"
                        + ("; config files are JSON (one object of fields, as --dry-run prints), not YAML or TOML" if other else "")) from None
    except ValueError:  # an integer of more digits than Python reads (4,300)
        raise UserError(f"config file {config_file} holds a number of thousands of digits; give config values of usual size") from None
    if not isinstance(loaded, dict):
        raise UserError(f"config file {config_file} must hold a JSON object of config fields, not {type(loaded).__name__}")
    if isinstance(loaded.get("config"), dict) and "step" in loaded:  # the saved_config message says state.json holds the config
        from latent_consistency.training.checkpoint import CHECKPOINT_DIR

        run = path.resolve().parents[2] if path.resolve().parent.parent.name == CHECKPOINT_DIR else Path("RUN")
        raise UserError(f"config file {config_file} is a checkpoint's state.json, which holds its run's config as its \"config\" "
                        f"object: give {run / 'config.json'}, the same config, or that object alone")
    return loaded


class _DuplicateField(Exception):
    """A JSON object that names one key twice (json keeps the last silently)."""


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateField(key)
        seen[key] = value
    return seen


def _typed(cls: type[TrainConfig], name: str, value: Any) -> Any:
    """`value` as the type field `name` declares (an int where a float is asked for becomes a float)."""
    declared = str(next(f.type for f in fields(cls) if f.name == name))
    kind = next(k for k in (bool, int, float, list, str) if k.__name__ in declared)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # a JSON integer of hundreds of digits, beyond any float
            raise UserError(f"config field {name} must be a finite number, got an integer of {len(str(abs(value)))} digits") from None
    ok = {bool: lambda v: isinstance(v, bool), int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, float), str: lambda v: isinstance(v, str),
          list: lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)}[kind]
    if value is None and "None" in declared or ok(value):
        return value
    raise UserError(f"config field {name} must be {'a list of strings' if kind is list else kind.__name__}, got {value!r}")


def config_from_dict(values: dict) -> TrainConfig:
    """A config saved by `to_dict` (in a run folder or a checkpoint)."""
    cls = CONFIGS[values.get("objective", "lcd")]
    known = field_help(cls)
    return cls(**{k: v for k, v in values.items() if k in known})
