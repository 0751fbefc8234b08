"""The one training loop of LCD (Algorithm 1), LCF (Algorithm 4) and Guided-Distill's two stages, on `accelerate`.

The math lives in `losses.py`; this file only moves batches, steps the optimiser, updates the target,
logs, validates and checkpoints (`training.run_folder`). Only the main process writes files.
"""

from __future__ import annotations

import contextlib
import math
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object

from latent_consistency.command_words import flag_words
from latent_consistency.compilation import compiler_problem
from latent_consistency.data.holdout import Holdout
from latent_consistency.data.latent_cache import digest_encoders_before_cast
from latent_consistency.errors import UserError
from latent_consistency.evaluation.ode_error import TeacherConsistencyFunction
from latent_consistency.folder_lock import hold
from latent_consistency.losses import MicroBatchDraws
from latent_consistency.models import DiffusionModel, guidance_record_of
from latent_consistency.progress import progress_bar
from latent_consistency.solvers import get_solver
from latent_consistency.training import checkpoint as ckpt
from latent_consistency.training import sources
from latent_consistency.training.batches import TrainingBatches
from latent_consistency.training.config import TrainConfig, field_default
from latent_consistency.training.ema import ema_update
from latent_consistency.training.objectives import freeze_in_half_precision, objective_of
from latent_consistency.training.ode_targets import ODETargets, SolvedChunks, bank_settings, build_ode_targets, chunk_rows, ode_targets_for_run
from latent_consistency.training.run_folder import (
    Progress,
    RunFolder,
    check_process_count,
    prepare_run_folder,
    recorded_guidance,
    resumed_student_unet,
    saved_config,
    say_resumed,
    saying_what_a_stop_keeps,
)
from latent_consistency.training.sharding import check_sharding, is_sharded, shard_target, sharding_note
from latent_consistency.training.students import make_student


def step_generator(seed: int, rank: int, step: int, device: torch.device, attempt: int = 0) -> torch.Generator:
    """The generator of one step's (n, ω, ε) draws on one process: a pure function of (seed, rank, step), so a resumed run
    draws exactly what the uninterrupted run would have drawn; a step retried after a non-finite loss (`attempt` > 0)
    draws anew rather than repeating the draw that failed. Each micro-batch takes its rows of the draws for the process's
    whole batch (`MicroBatchDraws`), so --grad-accumulation changes no example's draws. (The entropy's 0 stands where
    each micro-batch had its own generator: a step without accumulation draws what it drew then.)"""
    return torch.Generator(device).manual_seed(_seed_of(_step_entropy(seed, rank, step, attempt)))


def seed_network_draws(seed: int, rank: int, step: int, micro: int, attempt: int = 0) -> None:
    """Seed torch's global generators (the CPU's and every GPU's) for one micro-batch's forward and backward passes from
    (seed, rank, step, micro-batch): what the networks draw from them there (the dropout of a UNet or LoRA whose config
    asks for it) is then the uninterrupted run's in a resumed one, as the loss's own draws are (`step_generator`). Left to
    the process's history it was not: a resumed run's DataLoader draws its base seed from the CPU's generator where the
    uninterrupted run did not, and a checkpoint holds no GPU generator's state."""
    torch.manual_seed(_seed_of(_step_entropy(seed, rank, step, attempt), spawn_key=(micro,)))


def _step_entropy(seed: int, rank: int, step: int, attempt: int) -> list[int]:
    return [seed, rank, step, 0] + ([attempt] if attempt else [])


def _seed_of(entropy: list[int], spawn_key: tuple[int, ...] = ()) -> int:
    """A 63-bit seed of `entropy`; a `spawn_key` gives an independent stream of the same entropy."""
    return int(np.random.SeedSequence(entropy, spawn_key=spawn_key).generate_state(1, np.uint64)[0] >> 1)


def warmup_note(config: TrainConfig) -> str | None:
    """A note when the warm-up is longer than the run: the learning rate then never reaches --lr (a short trial run of a
    preset, say), which a user may not expect."""
    if config.lr_warmup_steps <= config.steps:
        return None
    return (f"{config.flag('lr_warmup_steps')} {config.lr_warmup_steps} is more than {config.flag('steps')} {config.steps}: the learning "
            f"rate rises to {config.steps / config.lr_warmup_steps:.2g} × {config.flag('lr')} and never reaches it")


def encoding_note(config: TrainConfig, base: DiffusionModel, batches: TrainingBatches) -> str | None:
    """A note when the run encodes its data at every step (an image folder, shards, a registered dataset such as
    world:shapes): the VAE and text encoder(s) then run on every batch, where a latent cache (the paper's D_z = {E(x)},
    Section 4.3) encodes each image once; `lcm cache` writes one of this data with this model, at the run's --resolution
    where it is not the model's native size (a run at that size trains on it). None for a latent cache."""
    if not batches.encodes_images:
        return None
    cache = f"{Path(config.out)}-latents"
    size = [] if (config.resolution or base.native_size) == base.native_size else ["--resolution", str(config.resolution)]
    # --data=-c1 where a value starts with "-": `--data -c1` is no value to argparse (`flag_words`)
    command = shlex.join(["lcm", "cache", *flag_words("--model", getattr(config, config.model_field)), *flag_words("--data", config.data),
                          *flag_words("--out", cache), *size])
    return (f"{config.flag('data')} {config.data} is encoded by the VAE and text encoder at every step; encode it once with `{command}` "
            f"and train with {shlex.join(flag_words(config.flag('data'), cache))} for faster steps")


def pair_steps_note(config: TrainConfig) -> str | None:
    """A note when --guidance-pair-steps covers the whole run: the plain tail it asks for (Algorithm 1's loss after the
    λ_Δ term) never comes."""
    pair_steps = getattr(config, "guidance_pair_steps", 0)
    if not pair_steps or pair_steps < config.steps:
        return None
    return (f"{config.flag('guidance_pair_steps')} {pair_steps} is not less than {config.flag('steps')} {config.steps}: the λ_Δ term "
            "applies to every step, and the plain loss after it never comes")


def guidance_range_note(config: TrainConfig, base: DiffusionModel) -> str | None:
    """A note when fine-tuning an LCM over guidance scales outside the range its guidance record says it was distilled on
    (`GuidanceRecord.fine_tuning_note`), or distilling from a guidance-distilled teacher outside the range its record says
    its ω input learned (`GuidanceRecord.teacher_note`)."""
    if config.objective == "lcf":
        record = base.guidance_record
        return record.fine_tuning_note(config.guidance_scale_min, config.guidance_scale_max) if record is not None else None
    record = guidance_record_of(config.teacher) if base.time_cond_proj_dim is not None and not base.is_lcm else None
    return record.teacher_note(config.guidance_scale_min, config.guidance_scale_max) if record is not None else None


def student_init_range_note(config: TrainConfig) -> str | None:
    """A note when distilling over guidance scales outside the range the --student-init's ω input learned (its guidance
    record, `guidance_record`): the student starts where that input extrapolates."""
    init = getattr(config, "student_init", "")
    record = guidance_record_of(init) if init else None
    if record is None:
        return None
    low, high = record.guidance_scale_min, record.guidance_scale_max
    if low <= config.guidance_scale_min and config.guidance_scale_max <= high:
        return None
    return (f"the guidance range [{config.guidance_scale_min:g}, {config.guidance_scale_max:g}] reaches outside [{low:g}, {high:g}], "
            f"the range the ω input of --student-init {init} learned: the student starts where that input extrapolates")


def student_init_teacher_note(config: TrainConfig) -> str | None:
    """A note when --student-init is a model distilled here from other teachers than --teacher: none of the teachers it
    descends from (`sources.teacher_line`) is --teacher, by identity (`sources.model_digest`: a teacher moved or copied since
    is the same). Its weights and ω input then follow another model's guidance. None for a model that is no run's export,
    or whose line is broken."""
    init = getattr(config, "student_init", "")
    line = sources.teacher_line(init) if init else None
    if not line or sources.model_digest(config.teacher) in [identity for _, identity in line]:
        return None
    return (f"--student-init {init} was distilled from another teacher than --teacher {config.teacher} (its run's {sources.FILE}): "
            "the student starts from a model of another teacher's guidance")




def validation_scale_note(config: TrainConfig, base: DiffusionModel, student) -> str | None:
    """A note when a --validation-guidance-scale that the user gave (`TrainConfig.chosen`: the default's 8 too) or other than
    the default lies outside the range of the guidance record the run exports (a full student's ω input:
    `RunFolder.validation_guidance_scale`): the grid, and the model's default g, are at the nearest end of that range instead
    (`GuidanceRecord.of_run`), which the user who set it may not expect."""
    given = config.validation_guidance_scale
    omega_input = student.adapter == "full" and student.target_unet.config.get("time_cond_proj_dim") is not None
    asked = config.chosen("validation_guidance_scale") or given != field_default(type(config), "validation_guidance_scale")
    if not omega_input or not asked:
        return None
    record = recorded_guidance(config, base.guidance_record, None)
    if record.guidance_scale == given:
        return None
    return (f"{config.flag('validation_guidance_scale')} {given:g} is outside [{record.guidance_scale_min:g}, {record.guidance_scale_max:g}], the "
            f"guidance range of the exported model's record: the validation grid and the model's default g are {record.guidance_scale:g}")


def resumed_schedule_note(out: Path, config: TrainConfig) -> str | None:
    """A note when a resumed run's new --steps reshapes its decaying learning-rate schedule (`lr_lambda` decays over --steps):
    the rate then jumps at the checkpoint's step, which a user extending a run may not expect."""
    found = ckpt.list_checkpoints(out)
    if config.lr_schedule == "constant" or not found:
        return None
    saved, step = saved_config(out / "config.json"), ckpt.checkpoint_step(found[-1])
    before, after = lr_lambda(saved)(step), lr_lambda(config)(step)
    if math.isclose(before, after):
        return None
    return (f"{config.flag('steps')} {config.steps} stretches the {config.lr_schedule} learning-rate schedule this run followed over "
            f"{saved.steps} steps: at step {step} the rate jumps from {before:.3g} to {after:.3g} × {config.flag('lr')}")


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


def rate_at(optimizer, lr_scheduler, step: int) -> None:
    """Set each parameter group's rate to this run's schedule at `step`. A resumed optimiser's state holds the rate the
    checkpoint's run gave its next step, which is another one where the resumed run's --steps reshapes a decaying schedule
    (`resumed_schedule_note`): its first step would go at the old rate, while the metrics log the new one."""
    for group, base_lr, factor in zip(optimizer.param_groups, lr_scheduler.base_lrs, lr_scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(step)


def build_loss(config: TrainConfig, base: DiffusionModel, scheduler_config: dict, ode_targets=None):
    """The run's per-sample loss: LCD's or LCF's (`training.objectives`); `--method ode` regresses onto `ode_targets`."""
    objective = objective_of(config)
    if ode_targets is None:
        return objective.loss(config, base, scheduler_config)
    return objective.loss(config, base, scheduler_config, ode_targets)


def training_batches(config: TrainConfig, base: DiffusionModel, micro_batch: int, rank: int, world: int, device) -> TrainingBatches:
    """Process `rank`'s batches of --data (less its --eval-fraction)."""
    holdout = Holdout(config.eval_fraction, "train") if config.eval_fraction else None
    return TrainingBatches(config.data, base, config.resolution or base.native_size, micro_batch, config.seed, rank, world, device,
                           config.num_workers, holdout)


def run_ode_targets(config: TrainConfig, base: DiffusionModel, out: Path, accelerator, progress: bool):
    """`--method ode`: the run's bank of teacher ODE solutions, read from the run folder or built there (from the data as one
    process would draw it with the run's seed, every process solving its share of the rows in chunks that do not depend on
    the process count (`chunk_rows`), the teacher under the run's autocast as in LCD's jumps: with mixed precision it is
    frozen in half precision), going on from the chunks a stopped run solved (`solved`: `SolvedChunks`); None for every
    other method."""
    if getattr(config, "method", None) != "ode":
        return None

    def make(solved: SolvedChunks) -> ODETargets:
        side = (config.resolution or base.native_size) // base.codec.downsampling_factor
        chunk = chunk_rows(config.ode_targets, base.codec.latent_channels * side * side, accelerator.device)
        data = training_batches(config, base, chunk, 0, 1, accelerator.device)
        exact = TeacherConsistencyFunction(base.guided_teacher(), get_solver(config.solver), config.skip, data.uncond)
        generator = torch.Generator(accelerator.device).manual_seed(config.seed)
        with accelerator.autocast():
            return build_ode_targets(exact, data, config.ode_targets, (config.guidance_scale_min, config.guidance_scale_max), generator,
                                     chunk, (accelerator.process_index, accelerator.num_processes), accelerator.gather, progress,
                                     solved)

    return ode_targets_for_run(out, accelerator, make, bank_settings(config))


def training_and_eval_batches(config: TrainConfig, base: DiffusionModel, micro_batch: int, rank: int, world: int, device):
    """The training batches, and the held-out ones: --eval-fraction of --data, from the one opening of --data that the
    training side made (`TrainingBatches.held_out`: a folder walked and scanned once), or --eval-data; None without either."""
    batches = training_batches(config, base, micro_batch, rank, world, device)
    if config.eval_fraction:
        return batches, batches.held_out()
    # every process reads the held-out data whole, as rank 0 of 1; the first logs what its scan skipped
    eval_batches = (TrainingBatches(config.eval_data, base, config.resolution or base.native_size, micro_batch, config.seed, 0, 1, device,
                                    quiet_scan=rank > 0, eval_flag=config.flag("eval_data")) if config.eval_data else None)
    return batches, eval_batches


def on_every_process(accelerator, make):
    """`make()` on every process; a UserError raised on any of them is raised on every one (the first process's, in rank
    order), where the others would go on to their next collective and end there with the transport's traceback when the
    launcher stops them. Raised alike on several processes, it is marked `every_process`: the CLI prints it once
    (`cli.say_refusal`). `accelerator`: the run's, or accelerate's `PartialState` before there is one (`holding_out`)."""
    error, result = None, None
    try:
        result = make()
    except UserError as err:
        error = str(err)
    if accelerator.num_processes > 1:
        error = next((message for message in gather_object([error]) if message is not None), None)
    if error is not None:
        refusal = UserError(error)
        refusal.every_process = accelerator.num_processes > 1
        raise refusal
    return result


def in_turn(accelerator, make):
    """`make()` on the main process, then on the others (`make` may change what they find: a run folder cleared), each turn
    under `on_every_process`: a refusal in either turn is raised on every process, where accelerate's `main_process_first`
    left the others waiting for the main one at its barrier until the launcher killed them."""
    main = accelerator.is_main_process
    first = on_every_process(accelerator, lambda: make() if main else None)
    later = on_every_process(accelerator, lambda: None if main else make())
    return first if main else later


@contextlib.contextmanager
def holding_out(config: TrainConfig, cpu: bool = False):
    """Hold the run's --out for the `with` block (`folder_lock.hold`). Under a launcher only the first process takes the lock
    (the others write with it), so the process group is made first (accelerate's `PartialState`, which the run's
    `Accelerator` then joins) and a refusal reaches every process (`on_every_process`): the others went on into
    `Accelerator()` and waited there for the first, which had ended, until the launcher killed them 30 s later."""
    with contextlib.ExitStack() as held:
        on_every_launched_process(lambda: held.enter_context(hold(config.out)), cpu)
        yield


def on_every_launched_process(make, cpu: bool = False):
    """`make()`, before the run's `Accelerator` is made; under a launcher (more than one process) through `on_every_process`
    over accelerate's `PartialState`, the process group the `Accelerator` then joins: a refusal every process raises alike
    (a setting `check_here` refuses) is said once, and one that a single process raises ends every process at once."""
    from accelerate import PartialState
    from accelerate.utils.environment import get_cpu_distributed_information

    if get_cpu_distributed_information().world_size > 1:
        return on_every_process(PartialState(cpu=cpu or not has_gpu()), make)
    return make()


def build_optimizer(config: TrainConfig, student) -> torch.optim.Optimizer:
    """AdamW over the student's parameter groups: torch's (for-each or fused kernel) or bitsandbytes' 8-bit one."""
    groups = student.parameter_groups(config.lr, getattr(config, "omega_lr_scale", 1.0))
    kwargs = dict(lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay)
    if config.optimizer == "adamw-8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise UserError("--optimizer adamw-8bit needs bitsandbytes: pip install bitsandbytes") from None
        return bitsandbytes.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, fused=config.optimizer == "adamw-fused" or None, **kwargs)


def has_gpu() -> bool:
    """Whether this machine has a CUDA or Apple (MPS) GPU that the run goes on."""
    return torch.cuda.is_available() or (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available())


def machine_problem(config: TrainConfig) -> str | None:
    """Why this machine cannot run `config`, if it cannot: fp16 mixed precision needs a GPU (on a CPU autocast leaves the
    float32 student and the fp16 frozen networks apart); --compile on a CPU a C++ compiler (`compiler_problem`)."""
    if config.mixed_precision == "fp16" and not has_gpu():
        return "--mixed-precision fp16 needs a GPU and this machine has none: use --mixed-precision bf16 or no"
    if config.compile and not has_gpu():
        return compiler_problem()
    return None


def check_here(config: TrainConfig) -> TrainConfig:
    """`config.check()`, and that this machine can run it (`machine_problem`): what a run checks before it loads anything."""
    problem = machine_problem(config.check())
    if problem is not None:
        raise UserError(problem)
    return config


def check_processes(accelerator, config: TrainConfig) -> None:
    """A UserError when the launch does not fit the run: sharded settings FSDP2 does not take (`check_sharding`), or a
    --batch-size that the processes and accumulation steps do not split evenly."""
    check_sharding(accelerator, config)
    per_step = accelerator.num_processes * config.grad_accumulation
    if config.batch_size % per_step:
        raise UserError(f"{config.flag('batch_size')} {config.batch_size} must be a multiple of processes x {config.flag('grad_accumulation')} "
                        f"= {per_step}")


def load_models(config: TrainConfig, device, out: Path, resume: bool):
    """The run's frozen model (LCD's teacher, the LCM that LCF fine-tunes), the student's scheduler config, and the student
    θ with its target θ⁻ (a resumed --student-init run's in its checkpoint's UNet config: `resumed_student_unet`); the
    frozen networks in the run's half precision, their latent caches' digests taken before (`digest_encoders_before_cast`)."""
    objective = objective_of(config)
    base = objective.load(config, device)
    scheduler_config = objective.scheduler_config(config, base)
    student = make_student(config, base, scheduler_config, share_unet=True, resumed_unet=resumed_student_unet(out, config, resume))
    digest_encoders_before_cast(base, (config.data, config.eval_data))
    freeze_in_half_precision(config, base)
    return base, scheduler_config, student


def run_notes(config: TrainConfig, accelerator, base: DiffusionModel, batches: TrainingBatches, student, out: Path,
              resume: bool) -> list[str]:
    """What the user should know of the run's settings (main process). Reading them may refuse, on the main process alone:
    a damaged guidance record of --student-init (`guidance_record.read_record`). Where the student starts (a --student-init's
    ω range) only for a run that starts at step 0: a resumed one starts from its checkpoint."""
    return list(filter(None, (sharding_note(accelerator), encoding_note(config, base, batches), batches.small_data_note(config.batch_size),
                              batches.cache_note, warmup_note(config), pair_steps_note(config), guidance_range_note(config, base),
                              not (resume and ckpt.list_checkpoints(out)) and student_init_range_note(config), student_init_teacher_note(config),
                              validation_scale_note(config, base, student), resume and resumed_schedule_note(out, config))))


def train(config: TrainConfig, resume: bool = False, progress: bool = True, cpu: bool = False) -> Path | None:
    """Run (or resume) a distillation/fine-tuning run; returns the exported model's path (None on
    processes other than the main one). It runs on the GPU where there is one, unless `cpu` (`lcm demo --device cpu`)."""
    from accelerate import Accelerator

    # Every refusal before the first step that every process raises alike goes through `on_every_process`: said once, by the
    # first process, and every process ends at once (one raised by a single process, too)
    on_every_launched_process(lambda: check_here(config), cpu)
    # Without a GPU, `cpu=True` lets accelerate join torchrun-launched processes over gloo (MULTI_CPU).
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=cpu or not has_gpu())
    # FSDP2 from `accelerate launch --config_file configs/accelerate/fsdp.yaml`; the batch split over the processes
    on_every_process(accelerator, lambda: check_processes(accelerator, config))
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    # The main process first: it may clear a run that stopped before its first step, which the others must not see half-cleared
    out = in_turn(accelerator, lambda: prepare_run_folder(config, resume, accelerator.is_main_process))
    if resume:  # each process reads the data position it resumes from (`RunFolder.load_checkpoint`)
        on_every_process(accelerator, lambda: check_process_count(out, world))
    per_step = world * config.grad_accumulation
    torch.manual_seed(config.seed)

    # Models: the frozen teacher (LCD) or the LCM to fine-tune (LCF); student θ; target θ⁻
    base, scheduler_config, student = on_every_process(accelerator, lambda: load_models(config, device, out, resume))
    # Each process opens its own share of the data (its own shards): a UserError in any of them stops every one, with its message
    batches, eval_batches = on_every_process(accelerator, lambda: training_and_eval_batches(config, base, config.batch_size // per_step,
                                                                                          rank, world, device))
    command = "distill" if config.objective == "lcd" else "finetune"
    # What the user should know of the run's settings, made before the run folder's config.json is rewritten by a resume
    notes = on_every_process(accelerator, lambda: run_notes(config, accelerator, base, batches, student, out, resume)
                             if accelerator.is_main_process else [])
    optimizer = on_every_process(accelerator, lambda: build_optimizer(config, student))
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    run = on_every_process(accelerator, lambda: RunFolder(out, config, accelerator, base, student, optimizer, lr_scheduler, batches,
                                                          eval_batches))  # writes config.json
    ode_targets = on_every_process(accelerator, lambda: run_ode_targets(config, base, out, accelerator, progress and accelerator.is_main_process))
    loss_fn = run.loss_fn = on_every_process(accelerator, lambda: build_loss(config, base, scheduler_config, ode_targets))
    state = on_every_process(accelerator, run.resume) if resume else Progress()
    for note in notes:  # once every check of the run has passed (a resume's too): a refusal is its one line, no notes above it
        print(f"lcm {command}: note: {note}", file=sys.stderr)
    if resume and accelerator.is_main_process:
        say_resumed(out, state, config.steps, command)
    with saying_what_a_stop_keeps(out, state, config.steps):  # a stop says which steps it keeps and which are lost
        student.unet, optimizer = accelerator.prepare(student.unet, optimizer)
        shard_target(accelerator, student)  # under FSDP, θ⁻ sharded as θ is: the target update is local to each process
        if resume:
            run.resume_optimizer(student.unet, optimizer)  # after prepare: under FSDP the saved full state is sharded as it loads
            rate_at(optimizer, lr_scheduler, state.step)
        if config.compile:  # LCF has no teacher: the model it starts from only draws the validation grid's first row
            student.compile(accelerator.unwrap_model(student.unet), base.unet if config.objective == "lcd" else None)
        sharded = is_sharded(accelerator)
        f_student, f_target = student.consistency_model(student.unet), student.consistency_model(student.target_unet)
        uncond = batches.uncond

        # The bar is closed when a stop or an error passes, before its one line
        with progress_bar(total=config.steps, initial=state.step, desc=f"{getattr(config, 'method', config.objective)} {config.adapter}",
                          unit="step", disable=not (progress and accelerator.is_main_process)) as bar:
            while state.step < config.steps:
                student.unet.train()
                # Consistency loss over the micro-batches: teacher jump (LCD) or same-noise pair (LCF), target f_θ⁻, student f_θ
                total = torch.zeros((), device=device)
                if hasattr(loss_fn, "step"):  # a loss that changes over training (`GuidancePairLCDLoss.pair_steps`)
                    loss_fn.step = state.step
                for micro in range(config.grad_accumulation):
                    batch = next(batches)
                    generator = MicroBatchDraws(step_generator(config.seed, rank, state.step, device, attempt=state.nonfinite_run), micro,
                                                config.grad_accumulation)
                    # Sharded, gradients are reduce-scattered at every micro-step: FSDP2's no_sync would hold them unsharded
                    sync = accelerator.no_sync(student.unet) if micro + 1 < config.grad_accumulation and not sharded else contextlib.nullcontext()
                    seed_network_draws(config.seed, rank, state.step, micro, attempt=state.nonfinite_run)
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
        return run.finish()


def skip_nonfinite_step(state: Progress, optimizer, config: TrainConfig, run: RunFolder) -> None:
    """Drop the step's gradients; after `max_nonfinite_steps` in a row, stop with a checkpoint. The loss judged is the one
    reduced over the processes, and the count in a row starts at 0 on each (a resume too): every process of a launched run
    stops at the same step, after the same (collective) save, and the refusal is marked `every_process`, said once
    (`cli.say_refusal`), not once per process."""
    optimizer.zero_grad(set_to_none=True)
    state.nonfinite_total += 1
    state.nonfinite_run += 1
    if state.nonfinite_run >= config.max_nonfinite_steps:
        path = run.save(state)
        refusal = UserError(f"loss was not finite for {state.nonfinite_run} steps in a row at step {state.step}; "
                            f"checkpoint saved in {path or run.out}; lower --lr or check the data")
        refusal.every_process = run.accelerator.num_processes > 1
        raise refusal
