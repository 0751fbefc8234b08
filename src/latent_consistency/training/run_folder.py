"""What a training run writes and reads back: the run folder's config, metrics, validation grids,
checkpoints with exact resume, and the exported model. Only the main process writes.

    config.json      the resolved config (a resumed run must match it)
    metrics.jsonl    one line per `log_every` steps (and TensorBoard, when installed)
    samples/         grids of the target θ⁻ for fixed prompts and noise: an LCM's 1, 2, 4 steps; a guidance-distilled
                     model's DDIM steps, beside the starting model's
    checkpoints/     `training.checkpoint`
    lcm/, lora/      the exported model: an LCM, an LCM-LoRA, or (Guided-Distill) a diffusion model with an ω input
    or guided/
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list, gather_object

from latent_consistency.errors import UserError
from latent_consistency.grids import image_grid, save_png
from latent_consistency.guidance_record import IGNORED_BELOW, GuidanceRecord, write_record
from latent_consistency.losses import MicroBatchDraws
from latent_consistency.models import (
    PROGRESSIVE_STEPS,
    DiffusionModel,
    consistency_model,
    guided_teacher,
    inference_timesteps,
    is_lcm_config,
)
from latent_consistency.outputs import check_writable, replace_folder, write_json_atomic, write_text_atomic, written
from latent_consistency.parameterization import omega_from_guidance_scale
from latent_consistency.pipelines import DEFAULT_GUIDANCE_SCALE
from latent_consistency.sampling import randn, sample_lcm, sample_teacher
from latent_consistency.training import checkpoint as ckpt
from latent_consistency.training import omega_response, sources
from latent_consistency.training.batches import SKIPPED_COUNTS, SKIPPED_SEEN, SkipRecord, merged_skipped_summary, merged_skips
from latent_consistency.training.config import CONFIGS, RESUMABLE_CHANGES, TrainConfig, config_from_dict, field_help, local_path
from latent_consistency.training.model_card import write_model_card
from latent_consistency.training.ode_targets import FILE as ODE_BANK
from latent_consistency.training.ode_targets import PARTIAL as ODE_PARTIAL
from latent_consistency.training.ode_targets import follow_moves
from latent_consistency.training.sharding import end_process_group, exportable, full_training_state, is_sharded, load_optimizer_state

VALIDATION_STEPS = (1, 2, 4)
VALIDATION_PROMPTS = 6  # validation grid columns when no prompts are given: the first held-out (or training) captions
EVAL_BATCHES = 4  # held-out batches (of --batch-size samples) whose loss is logged at every validation
EXPORT_STAGING = "export.partial"  # where `RunFolder.finish` exports the model before renaming it into the run folder
# The metrics names of the optimiser's parameter groups' rates, in `Student.parameter_groups`' order: `lr` the first's (the
# whole network, or all of it but the ω projection; the name metrics readers know), `omega_lr` the ω projection's when
# --omega-lr-scale gives it a group of its own
GROUP_RATES = ("lr", "omega_lr")
STUDENT_UNET = "student_unet_config"  # state.json's record of a --student-init run's UNet architecture
# All a run writes before its first training step (metrics.jsonl empty; the ODE bank is work, and is kept, as are the
# chunks of one stopped while it was solved, ODE_PARTIAL; but a bank whose write was killed, its temporary file, is not)
EARLY_RUN_FILES = frozenset({"config.json", sources.FILE, sources.FILE + ".tmp", "metrics.jsonl", "tensorboard", ckpt.CHECKPOINT_DIR,
                             ODE_BANK + ".tmp"})
# What a kill leaves of a run that had written nothing yet: the temporary file of its config.json's atomic write
CONFIG_LEFTOVERS = frozenset({"config.json.tmp"})


def prepare_run_folder(config: TrainConfig, resume: bool, main: bool = True) -> Path:
    """Check the run folder against --resume (`check_run_folder`). A folder that holds a run which stopped before its first
    step (unreadable data, say) counts as free: the main process clears it, so that the run can be started again with
    other settings. Nothing a step made, and no file this tool did not write, is ever removed."""
    out = Path(config.out)
    if not out.exists():  # a folder that cannot be made is known before the model loads (a test file in its parent)
        check_writable(out, "--out")
    if check_run_folder(config, resume) and main:
        # before its first checkpoint: steps may have run, unlogged (--log-every more than were done)
        print(f"{out}: the run there stopped before its first checkpoint; starting it over", flush=True)
        clear_early_run(out)
    return out


def check_run_folder(config: TrainConfig, resume: bool) -> bool:
    """A UserError where the run folder cannot take this run, reading and writing nothing (so --dry-run says it too): a new
    run needs a free folder, a resumed one the same config and --steps no fewer than its checkpoint's step
    (`check_resumable`). Whether the folder holds a new run's predecessor that stopped before its first step, to clear."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the run")
    if resume:
        if not has_nothing(out):  # a run stopped before its config.json, or none yet: --resume starts it (`say_resumed`)
            check_resumable(out, config)
        return False
    if not has_nothing(out):
        if not stopped_before_first_step(out, config):
            raise UserError(f"run folder {out} is not empty; pass --resume to continue it or choose another --out")
        return True
    return False


def check_sources_exist(config: TrainConfig) -> None:
    """A UserError naming the first local model or data path of `config` (its model, --data, --eval-data, --lora) that does
    not exist (`local_path`: no hub id, dataset name or shard pattern), for --dry-run, which loads none of them."""
    for name in (config.model_field, "data", "eval_data", "lora"):
        value = getattr(config, name, "")
        path = local_path(value) if value else None
        if path is not None and not Path(path).exists():
            what = "give a diffusers pipeline folder or a hub id" if name == config.model_field else "check the path"
            raise UserError(f"{config.flag(name)} {value} does not exist; {what}")


def has_nothing(out: Path) -> bool:
    """Whether the run folder `out` is missing or empty (but for a half-written config.json, `CONFIG_LEFTOVERS`, which the
    run's own write replaces): what a run stopped before it wrote its config.json leaves (Ctrl-C while its model loads, a
    kill as it wrote it), where `--resume` starts the run from step 0 (`say_resumed` notes it), as a requeued job that
    always passes --resume expects (`lcm distill` and `lcm finetune` alike: both prepare their folder here)."""
    return not out.exists() or (out.is_dir() and {path.name for path in out.iterdir()} <= CONFIG_LEFTOVERS)


def check_resumable(out: Path, config: TrainConfig) -> None:
    """A UserError unless the run in `out` can be resumed with `config`: its config.json is the same but for
    `RESUMABLE_CHANGES` and models or data moved since with the same content (`sources.proven_moves`), and its latest
    checkpoint's step is at most --steps. Each message names what would work. A folder that holds files but no config.json
    is no run's (a missing or empty one is started: `has_nothing`)."""
    saved = out / "config.json"
    if not saved.is_file():
        raise UserError(f"nothing to resume in {out}: it holds no run's config.json, but other files; give the run's own --out, "
                        "or another (empty) folder")
    run, found = saved_config(saved), ckpt.list_checkpoints(out)
    moved = sources.proven_moves(out, run, config, ckpt.read_state(found[-1])[0] if found else None)
    diffs = run.differences(config, ignore=(*RESUMABLE_CHANGES, *moved))
    if diffs:
        if stopped_before_first_step(out, config):
            hint = "; it has no checkpoint yet, so start it again without --resume"
        elif (out / ODE_BANK).is_file():
            hint = f" (resuming with the same settings reuses its ODE bank, {ODE_BANK})"
        elif (out / ODE_PARTIAL).is_dir():
            hint = f" (resuming with the same settings goes on solving its ODE bank from the chunks in {ODE_PARTIAL})"
        else:
            hint = ""
        raise UserError(f"{out} was started with a different config ({'; '.join(diffs)}); resume with the same settings or use a "
                        f"new --out{hint}; `--config {saved} --out {out} --resume` gives the run's own, also where a preset changed since")
    sources.check_sources(out, config)
    damaged = ckpt.damaged_checkpoints(out)
    if damaged:
        raise UserError(ckpt.damaged_message(damaged[-1], f"it has no {ckpt.STATE}"))
    reached = ckpt.checkpoint_step(found[-1]) if found else 0
    if config.steps < reached:
        raise UserError(f"the checkpoint in {out} is at step {reached}; --steps must be at least {reached} to resume it, "
                        f"not {config.steps}")


def check_process_count(out: Path, processes: int) -> None:
    """A UserError when the latest checkpoint in `out` reads webdataset shards with another number of processes than
    `processes`: shard i goes to process i mod N, and each process keeps its own place in its own shards, which another
    count cannot take up. The position in an image folder, a latent cache or a registered dataset is one place in the
    run's global sample order, the same on every process (`data.sampler.ResumableSampler`): those resume with any count,
    their global batches going on where they stood (`data_position`)."""
    found = ckpt.list_checkpoints(out)
    saved = (ckpt.read_state(found[-1])[0] or {}).get("data") if found else None
    if not saved or len(saved) == processes or "shards" not in saved[0]:
        return
    raise UserError(f"checkpoint {found[-1]} was written by a run of {len(saved)} process(es) on webdataset shards and this one has "
                    f"{processes}: each process reads its own shards (shard i: process i mod {len(saved)}) and keeps its place in "
                    f"them; resume it with {len(saved)} (accelerate launch --num_processes {len(saved)}), or start a new run with "
                    "another --out")


def data_position(saved: list[dict], rank: int, processes: int) -> dict:
    """Process `rank`'s data position in a checkpoint's positions of every process (`saved`, in rank order). With as many
    processes, its own. With another count (map-style data only: `check_process_count`), the global position they all
    share, and on the first process what every saved process's data skipped (`merged_skips`), so that the run's summary
    still counts it once."""
    if len(saved) == processes:
        return saved[rank]
    shared = {key: value for key, value in saved[0].items() if key not in (SKIPPED_COUNTS, SKIPPED_SEEN)}
    counted = [(position[SKIPPED_COUNTS], position[SKIPPED_SEEN]) for position in saved if SKIPPED_COUNTS in position]
    if rank > 0 or not counted:
        return shared
    merged = merged_skips(counted)
    return shared | {SKIPPED_COUNTS: dict(merged.counts), SKIPPED_SEEN: sorted([reason, detail] for reason, detail in merged.seen)}


def resumed_student_unet(out: Path, config: TrainConfig, resume: bool) -> dict | None:
    """The UNet config a --student-init run's latest checkpoint recorded (`RunFolder.save`), when resuming one or scoring
    its checkpoints (`over_training.evaluate_run`): its student is made in it (`make_student`), not read again from the
    folder it started from, which may have moved or been cleared away since. None otherwise."""
    found = ckpt.list_checkpoints(out) if resume and getattr(config, "student_init", "") else []
    recorded = (ckpt.read_state(found[-1])[0] or {}).get(STUDENT_UNET) if found else None
    return recorded if isinstance(recorded, dict) else None


def saved_config(path: Path, otherwise: str = "use a new --out") -> TrainConfig:
    """The config a run saved in `path` (its config.json); a UserError naming the file (and, `otherwise`, what else to do)
    when it is not one."""
    try:
        values = json.loads(path.read_text())
        if not isinstance(values, dict):
            raise ValueError(f"a JSON {type(values).__name__}, not an object")
        objective = values.get("objective", "lcd")
        if not isinstance(objective, str) or objective not in CONFIGS:
            raise ValueError(f"unknown objective {objective!r}")
        unknown = sorted(set(values) - {"objective"} - set(field_help(CONFIGS[objective])))
        if unknown:  # dropped, the run would go on with other semantics (a loss option this version lacks) and no word
            raise UserError(f"{path} was written by a newer latent-consistency (field(s) {', '.join(unknown)}, unknown to this "
                            f"one); use that version for this run, or {otherwise}")
        return config_from_dict(values)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError among them
        raise UserError(f"{path} is not a run's config ({err}); restore it (each checkpoint's state.json holds the config) or "
                        f"{otherwise}") from None


def run_record(config: TrainConfig, student) -> dict:
    """The config a run records (config.json, its checkpoints): `config.to_dict()`, but for LCF of a loaded LCM-LoRA (--lora)
    the rank of that LoRA, which the run trains as it is: --lora-rank sets the rank of new adapters only, and its default
    recorded there said something false of the run."""
    record = config.to_dict()
    if getattr(config, "lora", ""):
        unet = student.unet
        record["lora_rank"] = unet.peft_config[unet.active_adapters()[0]].r
    return record


def resumed_record(started: TrainConfig, config: TrainConfig, moved: Iterable[str]) -> dict:
    """The config a resumed run records (config.json, its checkpoints): the one its start recorded (`started`), but for the
    fields a resume may change (`RESUMABLE_CHANGES`) and the sources proven moved (`moved`: `sources.proven_moves`), as the
    resumed `config` gives them (those of its class: LCF has no ω response to measure). Every other field means what it
    meant at the start, and keeps the start's record where the resume's own reads otherwise: a --student-init `ode/lcm` (a
    relative folder of the hub's org/name form), recorded as that folder's absolute path (`local_path`) and gone since,
    would read back as a hub id, its ω embedding size as None."""
    given = config.to_dict()
    return started.to_dict() | {name: given[name] for name in (*RESUMABLE_CHANGES, *moved) if name in given}


def stopped_before_first_step(out: Path, config: TrainConfig) -> bool:
    """Whether `out` holds a config.json this tool wrote for a run there (`written_by_a_run`), nothing a run does not write
    before its first step (`EARLY_RUN_FILES`), an empty metrics.jsonl if any, and no checkpoint."""
    names = {path.name for path in out.iterdir()}
    metrics = out / "metrics.jsonl"
    return ("config.json" in names and names <= EARLY_RUN_FILES and not ckpt.list_checkpoints(out)
            and (not metrics.is_file() or metrics.stat().st_size == 0) and written_by_a_run(out, config))


def written_by_a_run(out: Path, config: TrainConfig) -> bool:
    """Whether out/config.json is the one a run of `config`'s class writes in `out`: a JSON object with exactly the fields
    `to_dict` writes, in its order, that class's objective, and `out` naming this folder. A config.json of the user's own
    (partial, of the other command, copied from another run, not JSON) is not."""
    try:
        values = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(values, dict) and list(values) == list(config.to_dict()) and values["objective"] == config.objective
            and isinstance(values["out"], str) and Path(values["out"]).resolve() == out.resolve())


def clear_early_run(out: Path) -> None:
    """Remove what a run that stopped before its first step wrote (`EARLY_RUN_FILES`), leaving `out` empty."""
    try:
        for path in out.iterdir():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    except OSError as err:
        raise UserError(f"cannot clear the run folder {out}: {err.strerror or err}") from None


@dataclass
class Progress:
    """Where a run stands: the optimiser step and the non-finite losses skipped (in all, and in a row)."""

    step: int = 0
    nonfinite_total: int = 0
    nonfinite_run: int = 0


def say_resumed(out: Path, progress: Progress, steps: int, command: str) -> None:
    """What a resumed run says once it has read its checkpoint (main process): the step it goes on from, or a note that there
    was none (the run stopped before its first), so that it starts again from step 0."""
    if ckpt.list_checkpoints(out):
        print(f"resuming {out} at step {progress.step} of {steps}", flush=True)
    else:
        print(f"lcm {command}: note: {out} has no checkpoint to resume from: starting the run from step 0 of {steps}", file=sys.stderr,
              flush=True)


def kept_at_stop(out: Path, step: int, steps: int) -> tuple[str, bool]:
    """Where a run stopped at `step` stands: its latest complete checkpoint is kept, and the steps since are lost (a resumed
    run does them again); and whether there is a checkpoint to continue from. Checkpoints are renamed into place whole, so
    one half-written by the stop is not counted."""
    found = ckpt.list_checkpoints(out)
    if not found:
        return f"at step {step} of {steps}, before its first checkpoint: " + (_lost(step, "") if step else "no step was done"), False
    kept = ckpt.checkpoint_step(found[-1])
    return f"at step {step} of {steps}: the checkpoint of step {kept} is kept, " + _lost(step - kept, " since then"), True


def _lost(n: int, since: str) -> str:
    """'no step is lost', '1 step{since} is lost' or 'n steps{since} are lost'."""
    return "no step is lost" if n == 0 else f"1 step{since} is lost" if n == 1 else f"{n} steps{since} are lost"


@contextlib.contextmanager
def saying_what_a_stop_keeps(out: Path, progress: Progress, steps: int):
    """Inside it, a stop (Ctrl-C's KeyboardInterrupt, SIGTERM's `cli.Terminated`) goes on carrying where the run stood
    (`kept_at_stop`) as its message, which the stop's one line (`cli.stopped`) adds to its word, and whether it has a
    checkpoint to continue from (its `resumable`, for `continued_by`)."""
    try:
        yield
    except KeyboardInterrupt as stop:
        said, stop.resumable = kept_at_stop(out, progress.step, steps)
        stop.args = (said,)
        raise


@contextlib.contextmanager
def continued_by(how: str, restart: str | None = None):
    """Inside it, a stop that says where its run stood (`saying_what_a_stop_keeps`) also says `how` to go on from there: a
    command line's own rerun with --resume, the demo's rerun; before the run's first checkpoint, that there is nothing to
    continue from and `restart` (how to start it again), where given."""
    try:
        yield
    except KeyboardInterrupt as stop:
        if stop.args and not getattr(stop, "resumable", True) and restart is not None:
            stop.args = (f"{stop.args[0]}, and there is nothing to continue from; {restart}",)
        elif stop.args:
            stop.args = (f"{stop.args[0]}; {how}",)
        raise


def recorded_guidance(config: TrainConfig, base_record: GuidanceRecord | None, response: dict[int, float] | None) -> GuidanceRecord:
    """The guidance record of a run's exported full LCM (`guidance_record`): the run's guidance range, or for LCF the range
    its LCM's ω input was distilled on (`base_record`, where its folder has one); the default g; the ω `response`."""
    if config.objective == "lcf":
        return GuidanceRecord.of_fine_tuning(base_record, config.guidance_scale_min, config.guidance_scale_max,
                                             config.validation_guidance_scale)
    return GuidanceRecord.of_run(config.guidance_scale_min, config.guidance_scale_max, config.validation_guidance_scale, response)


def first_process_value(accelerator, compute):
    """`compute()` of the first process, on every process, which each call this at the same point: work that gives every
    process the same value (an image folder's fingerprint) done once, not once per process."""
    value = [compute() if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(value)
    return value[0]


class RunFolder:
    """The save / validate / log side of the training loop, and resume and export."""

    def __init__(self, out: Path, config: TrainConfig, accelerator, base: DiffusionModel, student, optimizer, lr_scheduler, batches,
                 eval_batches=None):
        self.out, self.config, self.accelerator = out, config, accelerator
        self.base, self.student, self.optimizer, self.lr_scheduler, self.batches = base, student, optimizer, lr_scheduler, batches
        self.loss_fn = None  # the run's loss, for the held-out loss: set by the loop once built (after config.json is written)
        # A fixed held-out set, drawn once: its first `EVAL_BATCHES` batches, in micro-batches (`eval_loss`)
        self.eval_split = accelerator.num_processes * config.grad_accumulation  # the micro-batches of one batch
        self.eval_set = [next(eval_batches) for _ in range(EVAL_BATCHES * self.eval_split)] if eval_batches is not None else []
        self.eval_batches = eval_batches  # the held-out micro-batches after `eval_set`, for an ω response on more latents
        for data in filter(None, (batches, eval_batches)):  # an image folder's files read by one process, not by each
            data.share_fingerprints(lambda compute: first_process_value(accelerator, compute))
        self.main = accelerator.is_main_process
        # Under FSDP the target θ⁻ is sharded: every process takes part in its forward passes (validation, ω response)
        self.runs_target = self.main or is_sharded(accelerator)
        self.saved_optimizer_state = None  # read by `resume`, loaded by `resume_optimizer` once the optimiser is prepared
        # A resumed run's config.json is rewritten (its --steps, the new places of moved sources: `check_resumable`) once
        # `resume` has loaded the checkpoint, whose data fingerprint proves moved data: a refused resume leaves it as it was
        resumed = self.main and (out / "config.json").is_file()
        self.started = saved_config(out / "config.json") if resumed else None  # the config the run's start recorded
        self.moves = self.started.moved_sources(config) if resumed else {}
        self.record = run_record(config, student)  # the config config.json and the checkpoints record (`resume`: `resumed_record`)
        if self.main:
            try:
                out.mkdir(parents=True, exist_ok=True)
                if not resumed:
                    write_json_atomic(out / "config.json", self.record)
                sources.record_sources(out, config)
            except OSError as err:
                raise UserError(f"cannot write the run folder {out}: {err.strerror or err}") from None
        self.writer = MetricsWriter(out, self.main)
        self.validation_prompts = config.validation_prompts or (eval_batches or batches).first_captions(VALIDATION_PROMPTS)
        # The throughput's clock and the samples trained since it was read. It starts at the end of the first step of this
        # process: what came before that step (an ODE bank solved, a checkpoint loaded, the first call of a compiled network)
        # is no training throughput; a first log line at that step has none (null)
        self.t_last, self.samples_since = None, 0

    def resume(self) -> Progress:
        """Load the latest complete checkpoint (if any) into the student, LR schedule, RNG and data position; the optimiser
        state is loaded by `resume_optimizer` after `accelerator.prepare`."""
        if self.main:
            ckpt.remove_partial_checkpoints(self.out)
        found = ckpt.list_checkpoints(self.out)
        progress = self.load_checkpoint(found[-1]) if found else Progress()
        if self.main:  # a kill between the last save and its pruning
            ckpt.prune_checkpoints(self.out, self.config.keep_checkpoints)
        if self.main and self.started is not None:  # none: nothing to resume (`has_nothing`), the run starts as a new one
            try:
                follow_moves(self.out, self.moves, self.config)  # --method ode's bank names the new places too
                self.record = resumed_record(self.started, self.config, self.moves)
                write_json_atomic(self.out / "config.json", self.record)
            except OSError as err:
                raise UserError(f"cannot write the run folder {self.out}: {err.strerror or err}") from None
        if self.moves:
            print(sources.moved_note(self.moves), file=sys.stderr, flush=True)
        if self.main and self.started is not None and self.started.out and Path(self.started.out).resolve() != self.out.resolve():
            print(f"note: this run was in {self.started.out}: it goes on in {self.out} (moved or copied since), which its config.json "
                  "now names", file=sys.stderr, flush=True)
        self.writer.resume_at(progress.step)
        return progress

    def load_checkpoint(self, path: Path) -> Progress:
        """Load the checkpoint at `path` (but for the optimiser state, kept for `resume_optimizer`); where it stands."""
        tensors, objects, state = ckpt.load_checkpoint(path)
        self.check_eval_data(state.get(sources.EVAL_FINGERPRINT))
        self.student.load_state(tensors, path)
        self.saved_optimizer_state = objects["optimizer"]
        self.lr_scheduler.load_state_dict(objects["lr_scheduler"])
        torch.set_rng_state(objects["rng"]["torch"])
        self.batches.load_state_dict(data_position(state["data"], self.accelerator.process_index, self.accelerator.num_processes))
        return Progress(step=state["step"], nonfinite_total=state["nonfinite_total"])

    def check_eval_data(self, recorded: str | None) -> None:
        """A UserError when a checkpoint `recorded` the fingerprint of other held-out data than --eval-data reads now (moved
        and changed, or changed in place): its eval_loss would not continue the run's curve, and a move is accepted only
        as the same content (`sources.proven_moves`)."""
        if recorded is None or not self.config.eval_data or self.eval_batches is None or self.eval_batches.fingerprint() == recorded:
            return
        raise UserError(f"the held-out data {self.config.eval_data} (--eval-data) changed since this run's checkpoint (images added, "
                        "removed, replaced or recaptioned): its eval_loss would not continue the run's; put it back as it was to "
                        "resume, or start a new run with another --out")

    def resume_optimizer(self, model, optimizer) -> None:
        """Load the optimiser state `resume` read into the prepared (under FSDP: sharded) optimiser."""
        if self.saved_optimizer_state is not None:
            load_optimizer_state(self.accelerator, model, optimizer, self.saved_optimizer_state)
            self.saved_optimizer_state = None

    def save(self, progress: Progress) -> Path | None:
        """A checkpoint of everything resume needs, the data position of every process included."""
        accelerator = self.accelerator
        data = self.batches.state_dict()
        data_states = gather_object([data]) if accelerator.num_processes > 1 else [data]  # one per process, in rank order
        # on every process: the first one computes it for all (`share_fingerprints`)
        held_out = self.eval_batches.fingerprint() if self.config.eval_data and self.eval_batches is not None else None
        tensors, optimizer_state = full_training_state(accelerator, self.student, self.optimizer)  # under FSDP, gathered
        if not self.main:
            return None
        state = dict(step=progress.step, nonfinite_total=progress.nonfinite_total, data=data_states, config=self.record)
        state[sources.CHECKPOINT_KEY] = sources.recorded_sources(self.out)  # what its models are, wherever they move (`proven_moves`)
        if held_out is not None:  # what its --eval-data is, wherever it moves (`proven_moves`, `check_eval_data`)
            state[sources.EVAL_FINGERPRINT] = held_out
        if getattr(self.config, "student_init", ""):  # the architecture a resumed run makes its student in (`resumed_student_unet`)
            state[STUDENT_UNET] = dict(self.accelerator.unwrap_model(self.student.unet).config)
        objects = dict(optimizer=optimizer_state, lr_scheduler=self.lr_scheduler.state_dict(), rng={"torch": torch.get_rng_state()})
        return ckpt.save_checkpoint(self.out, progress.step, tensors, objects, state, self.config.keep_checkpoints)

    def after_step(self, progress: Progress, loss: float, grad_norm, f_target, bar) -> None:
        """Every `log_every` steps a metrics line; every `validate_every` a grid; every `checkpoint_every` a checkpoint;
        all three at the last step. samples_per_s is the training's throughput: the time of the held-out loss, the grids and
        the checkpoints is left out of it."""
        config, step = self.config, progress.step
        last = step == config.steps
        if self.t_last is None:  # this process's first step: the clock starts at its end (`samples_since`)
            self.t_last, self.samples_since = time.perf_counter(), 0
        else:
            self.samples_since += config.batch_size
        if step % config.log_every == 0 or last:
            now = time.perf_counter()
            rate = self.samples_since / (now - self.t_last) if self.samples_since else None
            self.t_last, self.samples_since = now, 0
            bar.set_postfix(loss=f"{loss:.4g}", **({} if rate is None else {"samples_per_s": f"{rate:.1f}"}))
            self.writer.write(dict(step=step, loss=loss, **self.group_rates(step), samples_per_s=rate,
                                   grad_norm=None if grad_norm is None else float(grad_norm), nonfinite_skipped=progress.nonfinite_total))
        started = time.perf_counter()
        if (config.validate_every and step % config.validate_every == 0) or last:
            if self.eval_set:
                self.writer.write(dict(step=step, eval_loss=self.eval_loss(f_target)))
            if self.runs_target and self.validation_prompts:
                self.validate(step, f_target)
        if (config.checkpoint_every and step % config.checkpoint_every == 0) or last:
            self.save(progress)
        self.t_last += time.perf_counter() - started

    def group_rates(self, step: int) -> dict[str, float]:
        """The rate each of the optimiser's parameter groups went at in `step` (the scheduler has moved on to the next
        step's), by its metrics name (`GROUP_RATES`): with --omega-lr-scale the ω projection's is not the logged `lr`."""
        scheduler = self.lr_scheduler
        rates = [base_lr * factor(step - 1) for base_lr, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
        return dict(zip(GROUP_RATES[:len(rates)], rates, strict=True))  # a group without a name here fails, never goes unlogged

    def omega_response_batch(self) -> dict[str, torch.Tensor]:
        """`omega_response_samples` latents and their conditions: held-out ones (else the next training ones, drawn after the
        last checkpoint), from as many micro-batches as that takes."""
        source = itertools.chain(self.eval_set, self.eval_batches) if self.eval_set else self.batches
        parts = [next(source)]
        while sum(len(part["latents"]) for part in parts) < self.config.omega_response_samples:
            parts.append(next(source))
        return {key: torch.cat([part[key] for part in parts]) for key in ("latents", "cond")}

    def report_omega_response(self, step: int) -> dict[int, float]:
        """The target θ⁻'s ω response (`training.omega_response`) on `omega_response_batch`, in the metrics and printed."""
        batch = self.omega_response_batch()
        target = self.accelerator.unwrap_model(self.student.target_unet)
        was_training = target.training
        target.eval()
        with self.accelerator.autocast():
            response = omega_response.omega_response(self.config, self.base.guided_teacher(), self.student.consistency_model(target),
                                                     batch["latents"], batch["cond"], self.batches.uncond)
        target.train(was_training)
        self.writer.write({"step": step} | {f"omega_response_{t}": r for t, r in response.items()})
        if not self.main:
            return response
        scales = f"g = {self.config.guidance_scale_min:g} and {self.config.guidance_scale_max:g}"
        print(f"ω response of the student (the fraction of the teacher's guidance effect between {scales} it reproduces; "
              "1: learned, 0: ignored): " + ", ".join(f"t={t} {r:.2f}" for t, r in response.items()), flush=True)
        if max(response.values()) < IGNORED_BELOW and getattr(self.config, "guidance_pair_weight", 0) > 0:
            print(f"The student ignores its guidance scale after {step} step(s), though its loss teaches it (--guidance-pair-weight "
                  f"{self.config.guidance_pair_weight:g}): it learns ω over hundreds of steps; train longer (docs/guide.md, \"The "
                  "guidance scale does nothing\").", flush=True)
        elif max(response.values()) < IGNORED_BELOW:
            # its ω projection starts at zero: after a few steps every student's response is 0, and what teaches ω was
            # measured on the built-in world only
            print(f"The student ignores its guidance scale after {step} step(s). On the built-in world a loss on the ω-difference "
                  "taught it (--guidance-pair-weight, with a faster --omega-lr-scale), at a cost in FID; at Stable Diffusion scale "
                  "that is not measured (docs/guide.md, \"The guidance scale does nothing\").", flush=True)
        return response

    def logged_omega_response(self) -> dict[int, float] | None:
        """The final step's ω response as metrics.jsonl holds it (a run killed after it, before its export, and resumed);
        None when it holds none."""
        path = self.writer.path
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
        for record in records:
            response = {int(k.removeprefix("omega_response_")): v for k, v in record.items() if k.startswith("omega_response_")}
            if record.get("step") == self.config.steps and response:
                return response
        return None

    @torch.no_grad()
    def eval_loss(self, f_target) -> float:
        """The run's loss on the fixed held-out set, with the target θ⁻ on both sides and fixed draws: the mean over its
        first `EVAL_BATCHES` × --batch-size samples, each drawing its n, ω and ε as an example of a training batch does
        (`losses.MicroBatchDraws`, batch j from seed + j), so that it is the same number with any --grad-accumulation and
        process count. The processes share its micro-batches and sum their losses."""
        uncond, device, accelerator = self.batches.uncond, self.accelerator.device, self.accelerator
        total, samples = torch.zeros((), device=device), sum(len(batch["latents"]) for batch in self.eval_set)
        with accelerator.autocast():
            for i in range(accelerator.process_index, len(self.eval_set), accelerator.num_processes):
                latents, cond = self.eval_set[i]["latents"], self.eval_set[i]["cond"]
                draws = MicroBatchDraws(torch.Generator(device).manual_seed(self.config.seed + i // self.eval_split), i % self.eval_split,
                                        self.eval_split)
                total += self.loss_fn(f_target, f_target, latents, cond, uncond.expand(len(latents), -1, -1), draws).float().sum()
        if accelerator.num_processes > 1:
            total = accelerator.reduce(total, "sum")
        return float(total) / samples

    @torch.no_grad()
    def validate(self, step: int, f_target) -> Path | None:
        """A grid of the validation prompts (columns, captioned): the starting model's 4-step samples, then the target's 1-,
        2- and 4-step samples at this step (Algorithm 3); for a guidance-distilled student, the teacher's 25-step DDIM with
        CFG, then the target's DDIM at 4, 8 and 25 steps. Each image of the target's rows is the one `lcm generate` makes of
        the exported model with its prompt and step count, at the g it samples at by default (`validation_guidance_scale`)
        and --seed `seed`: image i from seed + i (`pipelines.Generator.start`), at the run's --resolution (the size it
        trains at, `lcm generate --height/--width` of the exported model; the native size without it).

        The start row of an LCM is the one `lcm generate --model START --steps 4` makes: LCF's starting LCM samples on its own
        grid (`start_scheduler_config`: its own original_inference_steps, where --skip gave the student another k); LCD's
        starting model is the teacher's UNet as the student starts, read under the student's LCMScheduler config."""
        config, base, device = self.config, self.base, self.accelerator.device
        resolution = config.resolution or base.native_size
        size = (resolution, resolution)
        cond = base.prompts.encode(self.validation_prompts, device, size)
        codec, side = base.codec, resolution // base.codec.downsampling_factor
        seeds = [config.seed + i for i in range(len(self.validation_prompts))]
        g = self.validation_guidance_scale()
        scheduler_config = self.student.scheduler_config
        uncond = base.prompts.uncond(device, size)  # ∅ of the validation images' size (an SDXL condition's time ids carry it)

        def samples(f, n: int, sampled_as: dict = scheduler_config) -> torch.Tensor:
            generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
            noise = randn((len(seeds), codec.latent_channels, side, side), generators, device, torch.float32)
            if not is_lcm_config(sampled_as):  # f: a guided teacher
                z0 = sample_teacher(f, "ddim", noise, cond, uncond.expand(len(noise), -1, -1), g, n, sampled_as)
            else:
                z0 = sample_lcm(f, noise, inference_timesteps(sampled_as, n), cond, omega_from_guidance_scale(g), f.schedule, generators)
            return codec.decode(z0).clamp(-1, 1)  # as the generators return their images

        target_unet = self.student.target_unet
        was_training = target_unet.training
        target_unet.eval()
        with self.accelerator.autocast():  # the frozen starting model may be in half precision
            if is_lcm_config(scheduler_config):
                counts = VALIDATION_STEPS
                own = self.start_scheduler_config()
                rows = [samples(consistency_model(base.unet, own, base.network()), 4, own)] + [samples(f_target, n) for n in counts]
            else:  # a guidance-distilled student: against the teacher's DDIM (at twice a progressive student's steps)
                n = scheduler_config.get(PROGRESSIVE_STEPS)
                counts, start_steps = ((n,), 2 * n) if n else ((4, 8, 25), 25)
                rows = [samples(base.guided_teacher(), start_steps)] + [samples(guided_teacher(target_unet, scheduler_config), k) for k in counts]
        target_unet.train(was_training)
        if not self.main:
            return None
        (self.out / "samples").mkdir(exist_ok=True)
        path = self.out / "samples" / f"step-{step:07d}.png"
        start = 4 if is_lcm_config(scheduler_config) else start_steps
        labels = [f"start, {start} steps"] + [f"step {step}, {n} step{'s' * (n > 1)}" for n in counts]
        save_png(image_grid(rows, labels, label_width=130, column_labels=self.validation_prompts), path)
        return path

    def start_scheduler_config(self) -> dict:
        """The LCMScheduler config the validation grid's start row samples the starting model under: LCF's LCM (or LCM-LoRA
        on its model) its own, as `lcm generate` samples it; a teacher (LCD) has none, and is read as the student starts,
        under the student's."""
        own = self.base.scheduler_config
        return own if self.config.objective == "lcf" and is_lcm_config(own) else self.student.scheduler_config

    def exports_full_lcm(self) -> bool:
        """Whether the run exports a full LCM (read where it has an ω input), the model a guidance record goes with."""
        return self.student.adapter == "full" and is_lcm_config(self.student.scheduler_config)

    def exports_guided_model(self) -> bool:
        """Whether the run exports a guidance-distilled diffusion model (Guided-Distill's stage one or a progressive round):
        its ω input was learned over the run's range too, so a guidance record goes with it."""
        return self.student.adapter == "full" and not is_lcm_config(self.student.scheduler_config)

    def validation_guidance_scale(self) -> float:
        """g of the validation grid: the g `lcm generate` samples the exported model at when none is given. For a full LCM
        with an ω input, its record's default g: the preset's, moved into the range the record holds (not an extrapolation
        outside a fine-tuned LCM's distilled range, or a run's --guidance-scale-max). An LCM without an ω input (an
        LCM-LoRA, PixArt) has its guidance distilled in: `lcm generate` samples it without classifier-free guidance
        (`DEFAULT_GUIDANCE_SCALE`), where --validation-guidance-scale would guide it a second time (for an LCM-LoRA run that
        value is the teacher's g `lcm evaluate sweep` compares it with). For LoRA adapters fine-tuned on an LCM with a
        record, that LCM's recorded g: the adapters keep its ω input and its record (`models.load_lcm_lora`), so `lcm
        generate --model LCM --lora RUN/lora` samples at it. Otherwise (a guidance-distilled model) the run's."""
        if is_lcm_config(self.student.scheduler_config) and self.student.target_unet.config.get("time_cond_proj_dim") is None:
            return DEFAULT_GUIDANCE_SCALE["lora"]
        if self.exports_full_lcm() or self.exports_guided_model():
            return recorded_guidance(self.config, self.base.guidance_record, None).guidance_scale
        record = self.base.guidance_record  # set only for an LCM with an ω input (`load_lcm`, `load_lcm_lora`), never a teacher
        if record is not None and self.config.objective == "lcf" and is_lcm_config(self.student.scheduler_config):
            return record.guidance_scale
        return self.config.validation_guidance_scale

    def finish(self) -> Path | None:
        """The final ω response (unless the metrics hold it: a run resumed after it), then the target θ⁻ exported in
        diffusers format (main process, `Student.export`), with an LCM's guidance record beside it (`guidance_record`:
        its range, default g and that response) and a model card (`model_card`); returns its path."""
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        # Every process decides after the barrier: under FSDP the response's forwards are collective, and the main process
        # cannot write the record before every process has joined the first of them
        response = None
        if self.runs_target and omega_response.applies(self.config):
            response = self.logged_omega_response() or self.report_omega_response(self.config.steps)
        exported = None
        student, unwrapped = exportable(accelerator, self.student)  # under FSDP, an unsharded copy gathered on the main process
        # Each process read its own share of the data: what they skipped is counted over all of them (a collective)
        skips = [self.batches.skipped_record()]
        if accelerator.num_processes > 1:
            skips = gather_object(skips)
        if self.main:
            # Exported whole, record included, into a staging folder and then renamed: a kill mid-export leaves no model
            # folder that looks finished (the demo and `lcm evaluate` take one that is there); a resumed run exports again
            staging = self.out / EXPORT_STAGING
            shutil.rmtree(staging, ignore_errors=True)
            with written(staging):  # diffusers' writes, on a full disk, name no file
                staged = student.export(staging, unwrapped, self.base)
            record = None
            if self.exports_full_lcm() or self.exports_guided_model():
                record = recorded_guidance(self.config, self.base.guidance_record, response)
                write_record(staged, record)
            write_model_card(staged, self.out / staged.name, self.config, record, self.base, self.validation_prompts)
            exported = replace_folder(staged, self.out / staged.name)
            staging.rmdir()
            note = off_native_size_note(self.config, self.base, exported)
            if note is not None:
                print(f"lcm {'distill' if self.config.objective == 'lcd' else 'finetune'}: note: {note}", file=sys.stderr, flush=True)
            held_out = self.eval_batches.skipped_record() if self.eval_batches is not None else None
            for line in skipped_summary_lines(self.config, skips, held_out):
                print(line)
            self.writer.close()
        # Every process tears the process group down together: a process that destroys it while the main one is still
        # exporting has aborted in gloo's teardown ("terminate called without an active exception", seen once in CI)
        accelerator.wait_for_everyone()
        end_process_group(accelerator)
        return exported


def off_native_size_note(config: TrainConfig, base: DiffusionModel, exported: Path) -> str | None:
    """The note of an export trained at a --resolution other than its model's native size, saying the size to sample it at;
    None at the native size. The exported UNet keeps its model's sample_size (the size diffusers and `lcm generate` sample
    at by default), as its model card says (`model_card.trained_size`): LoRA adapters have no UNet config to carry
    another, so a full export and a LoRA export of the same run sample alike; and the native size is what the next run on
    the export reads as the model's own (a --resolution's bound, a latent cache's native size, `lcm evaluate`'s default),
    which a fine-tune at one size of a model made for another does not change."""
    size = config.resolution
    if not size or size == base.native_size:
        return None
    return (f"{exported} was trained on {size} px images and samples at its model's native {base.native_size} px by default: "
            f"give lcm generate --height {size} --width {size} (height and width in diffusers), as its model card says")


def skipped_summary_lines(config: TrainConfig, training: list, held_out: SkipRecord | None) -> list[str]:
    """The end-of-run lines of what the data skipped or converted: the training data's over every process (`training`, their
    `TrainingBatches.skipped_record`s) and the held-out data's (`held_out`, the main process's record: every process reads
    it whole, and the main one the most of it, for the ω response). --eval-data skipping nothing leaves the one line
    "data: ..." as it was; skipping something, a line for each, naming its data (its skips are otherwise only logged once,
    when first seen). --eval-fraction's held-out part is of --data: one line for both, each sample
    named by its detail counted once (`merged_skips`: the part's scan is the whole folder's, as the training part's is)."""
    records = [record for record in training if record is not None]
    if held_out is not None and not config.eval_data:
        return [f"data: {merged_skips([*records, held_out]).summary()}"]
    held = merged_skips([held_out]) if held_out is not None else None
    if held is None or not held.counts:
        return [f"data: {merged_skipped_summary(records)}"] if records else []
    lines = [f"data ({config.flag('data')} {config.data}): {merged_skipped_summary(records)}"] if records else []
    return [*lines, f"data ({config.flag('eval_data')} {config.eval_data}): {held.summary()}"]


class MetricsWriter:
    """metrics.jsonl (always) and TensorBoard (when installed, opened at the first record), main process only."""

    def __init__(self, out: Path, active: bool):
        self.active, self.path, self.tb_dir, self.tb = active, out / "metrics.jsonl", out / "tensorboard", None
        self.purge_step = None  # set by `resume_at`

    def resume_at(self, step: int) -> None:
        """Continue from a checkpoint at `step`: drop what a stopped run logged after it (`drop_records_after`), and
        have TensorBoard hide its events of steps after it (the first event file written now starts at step + 1)."""
        if self.active:
            drop_records_after(self.path, step)
            self.purge_step = step + 1

    def write(self, record: dict) -> None:
        if not self.active:
            return
        with written(self.path), open(self.path, "a") as f:  # a line cut short by a full disk goes on resume (`drop_records_after`)
            f.write(json.dumps(record) + "\n")
        tb = self.tensorboard()
        if tb is not None:
            for k, v in record.items():
                if k != "step" and v is not None:
                    tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        """Write out and close the TensorBoard writer: it flushes on its own only every 120 s, so a run's last scalars (its
        final ω response among them) were left unwritten at exit."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    def tensorboard(self):
        """The TensorBoard writer, opened on first use (with `purge_step` when resumed); None when it is not installed."""
        if self.tb is None and self.tb_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.tb_dir), purge_step=self.purge_step)
            except ImportError:
                self.tb_dir = None
        return self.tb


def drop_records_after(path: Path, step: int) -> None:
    """Remove from metrics.jsonl the records of steps after `step`, and an unfinished last line (a run killed while writing
    it), so that a run resumed from its checkpoint at `step` leaves the log the uninterrupted run writes. Every other line
    is kept as it is; the file is rewritten atomically (`write_text_atomic`), and only when a line goes."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.endswith("\n") and not logged_after(line, step)]
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(kept))


def logged_after(line: str, step: int) -> bool:
    """Whether a metrics.jsonl line is the record of a step after `step`."""
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step
