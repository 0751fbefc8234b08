"""What distillation and fine-tuning do differently in the one training loop: the model a run starts from, the
checks it must pass, the student's LCMScheduler config, and the loss. Everything else is shared.

- `Distillation` (LCD, Algorithm 1): a diffusion model is the frozen guided teacher; the student starts as it.
- `FineTuning` (LCF, Algorithm 4): an LCM (or a diffusion model with an LCM-LoRA) is the student's start; there
  is no teacher, and its own scheduler config (boundary scalings, parameterisation, T/k) is kept.
"""

from __future__ import annotations

import torch

from latent_consistency.errors import UserError
from latent_consistency.losses import (
    GuidanceDistillationLoss,
    GuidancePairLCDLoss,
    LCDLoss,
    LCFLoss,
    ODERegressionLoss,
    ProgressiveDistillationLoss,
)
from latent_consistency.models import (
    PROGRESSIVE_STEPS,
    DiffusionModel,
    lcm_scheduler_config,
    load_diffusion_model,
    load_lcm,
    load_lcm_lora,
    lora_pipeline_class,
)
from latent_consistency.schedule import NoiseSchedule
from latent_consistency.solvers import get_solver
from latent_consistency.training.config import LCM_METHODS, DistillConfig, FinetuneConfig, TrainConfig
from latent_consistency.training.run_folder import VALIDATION_STEPS


def _loss_settings(config: TrainConfig, schedule: NoiseSchedule, skip: int) -> dict:
    return dict(schedule=schedule, skip=skip, guidance_scale_range=(config.guidance_scale_min, config.guidance_scale_max),
                distance=config.loss, huber_c=config.huber_c, weighting=config.loss_weighting)


def _check_schedule(schedule: NoiseSchedule, prediction_types: dict[str, str], skip: int | None) -> None:
    """k must divide T and leave the validation grid its steps (when the objective has a k), and ε cannot be predicted at
    zero terminal SNR."""
    if schedule.zero_terminal_snr:
        # At zero terminal SNR, x̂0 = (z - σ·ε̂)/α divides by α_{T-1} = 0 (raised to 2^-12; squaredcos_cap_v2's: 4.9e-5): ε̂
        # carries no image there. The message says the schedule's own α, not the raised one
        alpha = 0.0 if schedule.ends_at_zero_snr else float(schedule.alphas_cumprod[-1]) ** 0.5
        for who, prediction in prediction_types.items():
            if prediction == "epsilon":
                raise UserError(f"the {who} would predict ε on a zero-terminal-SNR schedule or one as good as it (α at t = T-1 is "
                                f"{alpha:.1e}; a cosine schedule's is 5e-5), where ε says nothing about the image at t = T-1; use a "
                                "v-prediction teacher and student")
    if skip is not None and (skip < 1 or schedule.num_train_timesteps % skip):
        raise UserError(f"skip {skip} must divide the model's {schedule.num_train_timesteps} training timesteps")
    if skip is not None:
        _check_validation_steps(schedule.num_train_timesteps, skip)


def _check_validation_steps(timesteps: int, skip: int) -> None:
    """T/k timesteps must hold the validation grid's largest step count, which every run samples at its end."""
    most = max(VALIDATION_STEPS)
    if timesteps // skip < most:
        raise UserError(f"skip {skip} leaves {timesteps // skip} of the model's {timesteps} training timesteps (T/k), fewer than the "
                        f"{most} steps the validation grid samples in: use a skip of at most {timesteps // most} that divides {timesteps}")


def _check_transformer_student(config: DistillConfig, base: DiffusionModel) -> None:
    """A PixArt-α student: diffusers' PixArtTransformer2DModel has no ω input (time_cond_proj_dim) and its pipeline no
    LoRA loader, so the student is a full copy of the transformer distilled at one guidance scale, as PixArt-LCM was; a
    range of ω would train one network on several targets with nothing to tell them apart."""
    if not base.is_transformer:
        return
    if config.adapter == "lora":
        lora_pipeline_class(base)  # refuses: no LoRA loader
    if config.method != "lcd":
        raise UserError(f"--method {config.method} gives the student an ω input, which a PixArt transformer has not; use --method lcd")
    if config.omega_lr_scale != 1:
        raise UserError(f"--omega-lr-scale {config.omega_lr_scale:g} sets the learning rate of the student's ω input, which a PixArt "
                        "transformer has not: leave it out")
    if config.student_init:
        raise UserError(f"--student-init {config.student_init} starts a full student from a UNet with an ω input, which a PixArt "
                        "transformer has not: leave it out (the student starts from the teacher's transformer)")
    if config.guidance_scale_min != config.guidance_scale_max:
        raise UserError(f"a PixArt transformer has no ω input: distil it at one guidance scale, pass equal --guidance-scale-min and "
                        f"--guidance-scale-max (PixArt-LCM: 4.5), got {config.guidance_scale_min:g} and {config.guidance_scale_max:g}")


class Distillation:
    """LCD: the teacher's guided PF-ODE jumps supervise the student (Algorithm 1). With `method = "ode"`, the teacher's
    whole ODE solutions do (`training.ode_targets`). With `method = "guidance"`, stage one of Guided-Distill instead: the
    teacher's guided output at random t supervises an ω-conditioned student."""

    @staticmethod
    def load(config: DistillConfig, device) -> DiffusionModel:
        base = load_diffusion_model(config.teacher, device=device)
        if base.is_lcm:
            raise UserError(f"{config.teacher} is already an LCM; distil the diffusion model it came from, "
                            "or fine-tune this LCM with `lcm finetune`")
        omega_input = base.time_cond_proj_dim is not None  # a guidance-distilled teacher: its ω input is its guidance
        if omega_input and config.method == "guidance":
            raise UserError(f"{config.teacher} has learned its guidance already (it has an ω input); distil it with --method lcd")
        if not omega_input and config.method == "progressive":
            raise UserError(f"progressive distillation needs a teacher with an ω input; distil {config.teacher} with --method guidance first")
        if base.distilled_steps is not None and config.method in LCM_METHODS:
            # A round's x̂0 is the one whose DDIM jump on its own N-step grid lands where its teacher's two jumps do: its
            # DDIM on any other grid (LCD's jumps of k, the ODE bank's solves) follows no teacher's ODE
            raise UserError(f"{config.teacher} was progressively distilled to sample in {base.distilled_steps} DDIM steps, on its own grid "
                            f"only, so its jumps of k are not its teacher's ODE: give the stage-one model (`--method guidance`) "
                            f"as the --method {config.method} teacher")
        if omega_input and config.guide_increments:
            raise UserError(f"{config.teacher} gives its guided output from an ω input; there are no unguided increments to guide")
        _check_transformer_student(config, base)
        student_prediction = config.student_prediction_type(base.prediction_type)
        if config.method not in LCM_METHODS:
            Distillation._check_guided_distill(config, base, student_prediction)
        _check_schedule(base.schedule, {"teacher": base.prediction_type, "student": student_prediction},
                        config.skip if config.method in LCM_METHODS else None)
        return base

    @staticmethod
    def _check_guided_distill(config: DistillConfig, base: DiffusionModel, student_prediction: str) -> None:
        """A progressive round halves its teacher's DDIM steps, in the teacher's parameterisation (the student starts as it).
        (Guided-Distill's LCD-only settings, no ODE solver, skipping step or consistency weighting, are refused by
        `DistillConfig.check`, before the teacher loads.)"""
        if config.method != "progressive":
            return
        n, steps = config.student_steps, base.schedule.num_train_timesteps
        if base.distilled_steps is not None and base.distilled_steps != 2 * n:
            raise UserError(f"{config.teacher} samples in {base.distilled_steps} DDIM steps; a round halves them "
                            f"(--student-steps {base.distilled_steps // 2})" if base.distilled_steps % 2 == 0 else
                            f"{config.teacher} samples in {base.distilled_steps} DDIM steps, which cannot be halved")
        if steps % (2 * n):
            raise UserError(f"--student-steps {n}: the teacher's {2 * n} DDIM steps must divide its {steps} training timesteps")
        if student_prediction != base.prediction_type:
            raise UserError(f"a progressive student starts as its teacher and predicts what it does ({base.prediction_type}); "
                            "drop --student-prediction")

    @staticmethod
    def scheduler_config(config: DistillConfig, base: DiffusionModel) -> dict:
        """The student's scheduler config: an LCMScheduler's on the teacher's schedule (original_inference_steps = T/k),
        or for guidance distillation the teacher's own, in the student's parameterisation."""
        prediction_type = config.student_prediction_type(base.prediction_type)
        # Exported with a DDIMScheduler, whose defaults (clip_sample=True) differ from e.g. SD's PNDM config: say them
        own = {k: v for k, v in base.scheduler_config.items() if not k.startswith("_")} | {
            "prediction_type": prediction_type, "clip_sample": False, "set_alpha_to_one": False, "thresholding": False}
        if config.method == "guidance":
            return own
        if config.method == "progressive":  # diffusers' DDIM then samples on the grid the student learned
            return own | {"timestep_spacing": "trailing", PROGRESSIVE_STEPS: config.student_steps}
        return lcm_scheduler_config(base.scheduler_config, config.skip, prediction_type)

    @staticmethod
    def loss(config: DistillConfig, base: DiffusionModel, scheduler_config: dict, ode_targets=None):
        """The method's loss; `--method ode` regresses onto `ode_targets`, the run's bank (`training.ode_targets`)."""
        if config.method == "ode":
            return ODERegressionLoss(bank=ode_targets, distance=config.loss, huber_c=config.huber_c,
                                     guidance_pair_weight=config.guidance_pair_weight)
        if config.method == "progressive":
            return ProgressiveDistillationLoss(schedule=base.schedule, teacher=base.guided_teacher(), student_steps=config.student_steps,
                                               guidance_scale_range=(config.guidance_scale_min, config.guidance_scale_max),
                                               distance=config.loss, huber_c=config.huber_c)
        if config.method == "guidance":
            return GuidanceDistillationLoss(schedule=base.schedule, teacher=base.guided_teacher(), prediction_type=scheduler_config["prediction_type"],
                                            guidance_scale_range=(config.guidance_scale_min, config.guidance_scale_max),
                                            distance=config.loss, huber_c=config.huber_c)
        lcd = dict(_loss_settings(config, base.schedule, config.skip), teacher=base.guided_teacher(), solver=get_solver(config.solver),
                   guide_increments=config.guide_increments)
        if config.guidance_pair_weight > 0:
            return GuidancePairLCDLoss(**lcd, guidance_pair_weight=config.guidance_pair_weight, pair_steps=config.guidance_pair_steps)
        return LCDLoss(**lcd)


class FineTuning:
    """LCF: the same-noise pair (z_{t_{n+k}}, z_{t_n}) of a data latent supervises the student (Algorithm 4)."""

    @staticmethod
    def load(config: FinetuneConfig, device) -> DiffusionModel:
        base = load_lcm_lora(config.model, config.lora, device=device, lora_flag="--lora") if config.lora else load_lcm(config.model, device=device)
        if config.adapter == "lora":
            lora_pipeline_class(base)  # refuses a family without a LoRA loader (PixArt-α)
        _check_schedule(base.schedule, {"model": base.prediction_type}, FineTuning.skip(config, base))
        return base

    @staticmethod
    def skip(config: FinetuneConfig, base: DiffusionModel) -> int:
        """k: as set, else the model's own, T / its original_inference_steps."""
        return config.skip or base.skip

    @staticmethod
    def scheduler_config(config: FinetuneConfig, base: DiffusionModel) -> dict:
        """The model's own LCMScheduler config (a new k changes its original_inference_steps to T/k)."""
        scheduler_config = {k: v for k, v in base.scheduler_config.items() if not k.startswith("_")}
        return scheduler_config | {"original_inference_steps": base.schedule.num_train_timesteps // FineTuning.skip(config, base)}

    @staticmethod
    def loss(config: FinetuneConfig, base: DiffusionModel, scheduler_config: dict):
        skip = base.schedule.num_train_timesteps // int(scheduler_config["original_inference_steps"])
        return LCFLoss(**_loss_settings(config, base.schedule, skip))


OBJECTIVES = {DistillConfig: Distillation, FinetuneConfig: FineTuning}


def objective_of(config: TrainConfig):
    return OBJECTIVES[type(config)]


def half_precision(config: TrainConfig) -> torch.dtype | None:
    """The dtype the frozen networks run in under the config's mixed precision (None: float32 throughout)."""
    return {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]


def freeze_in_half_precision(config: TrainConfig, base: DiffusionModel) -> None:
    """With mixed precision the frozen networks run in fp16/bf16; the trained weights stay float32 under autocast. An SDXL
    VAE that asks to be upcast stays in float32 under fp16 (`DiffusionModel.upcasts_vae`). A UNet that carries a LoRA
    student is in half precision already, its adapters in float32 (`training.students.make_student`)."""
    half = half_precision(config)
    if half is not None:
        upcast = half == torch.float16 and base.upcasts_vae
        unet = [] if base.unet_carries_student else [base.unet]
        for module in (*unet, *([] if upcast else [base.vae]), *base.text_encoders):
            cast_keeping_adapters(module, half)


def cast_keeping_adapters(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """`module.to(dtype)` for its own weights; LoRA adapters it carries (an LCM-LoRA loaded onto it) keep the weights
    they were given, in float32: cast down and back they would be rounded. In float16, the layers a transformers model
    keeps in float32 (`_keep_in_fp32_modules`: T5's feed-forward output `wo`, whose activations overflow float16 in
    PixArt-α's T5-XXL) stay in float32, as `from_pretrained(torch_dtype=torch.float16)` and PixArtAlphaPipeline keep them."""
    keep = (getattr(module, "_keep_in_fp32_modules", None) or []) if dtype == torch.float16 else []
    kept = {name: param.data for name, param in module.named_parameters()
            if "lora_" in name or any(part in keep for part in name.split("."))}
    module.to(dtype=dtype)
    for name, param in module.named_parameters():
        if name in kept:
            param.data = kept[name].float()
