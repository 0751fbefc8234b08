"""The README's main job (`lcm demo`, `make demo`): distil the built-in world's teacher into an LCM, then compare.

0. Use the default world shipped with the package, or build the world of `--world-preset` (resumable).
1. Encode the world's training images once into a latent cache (D_z = {E(x)}).
2. Latent consistency distillation (Algorithm 1) with the `world` training preset.
3. A sample grid (Figure 2): for the same prompts and noise, real images, then the LCM and the teacher's DDIM at
   1, 2, 4 and 8 steps and its DPM-Solver++ at 25.
4. A small evaluation with the world's judge (Table 1): prompt alignment and FID of the LCM and of the teacher's DDIM,
   DPM-Solver and DPM-Solver++ (with CFG) at 1, 2, 4 and 8 steps, DPM-Solver++ at 25 as the reference, and the
   undistilled starting point (the teacher's weights run through the consistency sampler).
5. Latent consistency fine-tuning (Algorithm 4) of that LCM on the world's digits, which its teacher never saw
   (the `world` fine-tuning preset), the held-out digits as its eval data.
6. The LCM before and after fine-tuning, at 1/2/4 steps on the held-out digit prompts, scored with the digits judge;
   a before/after grid.

Rerunning continues an interrupted run (a latent cache from its last whole shard) and reuses finished parts; the report's
wall time is the sum of each phase's time over the runs that made the folder. A second demo into an --out that one is
writing is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from latent_consistency.data.latent_cache import MANIFEST, write_latent_cache
from latent_consistency.devices import resolve_device
from latent_consistency.errors import UserError
from latent_consistency.evaluation.compare import SamplerSpec, sample, sample_consistency
from latent_consistency.evaluation.fid import check_image_count, fid_score
from latent_consistency.evaluation.table import EvalSet, JudgeScorer, run_table, table_rows, teacher_start_notes, write_grid, write_plots, write_report
from latent_consistency.folder_lock import hold
from latent_consistency.grids import image_grid, save_png
from latent_consistency.models import consistency_model, load_lcm, make_student_unet
from latent_consistency.outputs import writable_folder, write_json_atomic, write_text_atomic
from latent_consistency.training.config import DistillConfig, FinetuneConfig, TrainConfig, resolve_config
from latent_consistency.training.loop import holding_out, train
from latent_consistency.training.run_folder import continued_by, saved_config
from latent_consistency.training.sources import model_digest, recorded_sources
from latent_consistency.world.artifact import default_world_path, load_world
from latent_consistency.world.build import COMMAND_FLAGS, build_world, reusable_phases, world_spec
from latent_consistency.world.datasets import REFERENCE_SPLITS, get_dataset
from latent_consistency.world.judge import judge_scores, prompt_alignment
from latent_consistency.world.presets import get_preset


def _table(rows: list[tuple[str, dict]]) -> str:
    """The demo's markdown table: FID and alignment per sampler, and each attribute's alignment where there are several
    (a digit's only attribute, the digit, is the alignment itself)."""
    attrs = [a for a in rows[0][1]["alignment"] if a != "mean"]
    attrs = attrs if len(attrs) > 1 else []
    lines = ["| " + " | ".join(["sampler", "FID (judge)", "alignment", *attrs]) + " |", "|---" * (3 + len(attrs)) + "|"]
    for label, r in rows:
        a = r["alignment"]
        lines.append("| " + " | ".join([label, f"{r['fid']:.2f}", f"{a['mean']:.3f}", *(f"{a[k]:.2f}" for k in attrs)]) + " |")
    return "\n".join(lines)


def ensure_latent_cache(world, cache: Path, device, dataset: str | None = None) -> Path:
    """D_z = {E(x)}: a training split of the world (its own dataset by default) encoded once into a latent cache
    (reused when present). Its source names the registered dataset (`source["data"]`, as `lcm cache --data world:shapes`
    does), so a cache stopped part way resumes from its last whole shard (`write_latent_cache`), where it was encoded again
    from the start; the job's data identity holds the split's size (the demo's first DISTILL_IMAGES of its own dataset),
    and the source the seed and size too, so that a cache of another size or world's draw is started again, not finished."""
    dataset = dataset or world.dataset
    if not (cache / MANIFEST).is_file():
        size = min(DISTILL_IMAGES, world.preset.train_size) if dataset == world.dataset else None
        train_split = get_dataset(dataset, "train", world.resolution, seed=world.preset.seed, size=size)
        print(f"[demo] encoding {len(train_split)} {dataset} training images into {cache}", flush=True)
        source = {"data": f"world:{dataset}:train", "resolution": world.resolution, "seed": world.preset.seed, "size": len(train_split)}
        write_latent_cache(train_split, cache, world.codec, world.model.prompts, source=source, device=device)
    return cache


def reference_set(world, dataset: str, n: int) -> tuple[list[str], list, torch.Tensor]:
    """Prompts, attributes and real images of the first `n` held-out images of `dataset`."""
    reference = get_dataset(dataset, REFERENCE_SPLITS[dataset], world.resolution, seed=world.preset.seed)
    items = [reference[i] for i in range(min(n, len(reference)))]
    return [it["caption"] for it in items], [it["attributes"] for it in items], torch.stack([it["image"] for it in items])


def run_demo(out: Path, world_dir: Path | None, distill_steps: int | None, eval_samples: int, device: str,
             world_preset: str = "default", finetune_steps: int | None = None) -> Path:
    """The demo into `out` (the module's docstring), holding its lock throughout (`folder_lock.hold`): a second demo into
    the same --out is refused in one line, where it cleared the first's unfinished latent cache and trained its runs beside
    it. A stop anywhere says how to go on (`continued_by_rerun`)."""
    check_image_count(eval_samples, "--eval-samples")  # known now, not after the distillation
    if world_dir is not None and world_preset != "default":
        raise UserError(f"--world {world_dir} is the world to use and --world-preset {world_preset} one to build: give one of them")
    world_dir, build_reason = _world_to_use(out, world_dir, world_preset)
    _check_out_name(out)
    writable_folder(out, "--out")  # before the lock, which lies beside it: a missing parent would leave the demo unguarded
    with hold(out), continued_by_rerun():
        for flag, run, steps in (("--distill-steps", out / "distill", distill_steps), ("--finetune-steps", out / "finetune", finetune_steps)):
            _check_finished_steps(flag, run, steps)
        _check_own_runs(out, world_dir)
        _check_out(out)
        dev = resolve_device(device)
        clock = PhaseClock(out)
        with clock.phase("the world"):
            if build_reason is not None:
                # Build the world here (resumable; the default preset takes about 55 minutes on a 2-core CPU)
                print(f"[demo] {build_reason}; building the {world_preset!r} world into {world_dir} "
                      "(resumable: rerun to continue)", flush=True)
                build_world(world_preset, world_dir, dev, parts_from=_shipped_parts_for(world_preset), flags=COMMAND_FLAGS)  # a command's wording
            world = load_world(world_dir, dev)
        return _distil_and_compare(out, world, world_dir, distill_steps, eval_samples, dev, finetune_steps, clock)


def _world_to_use(out: Path, world_dir: Path | None, world_preset: str) -> tuple[Path, UserError | None]:
    """The world's folder, and why it is to be built there (None for a world that is there: --world, the shipped one)."""
    if world_dir is not None:
        return Path(world_dir), None
    get_preset(world_preset)  # an unknown preset is refused before anything is made
    try:
        if world_preset != "default":
            raise UserError("only the default world is shipped")
        return Path(default_world_path()), None
    except UserError as reason:
        return out / f"world-{world_preset}", reason


def _distil_and_compare(out: Path, world, world_dir: Path, distill_steps: int | None, eval_samples: int, dev,
                        finetune_steps: int | None, clock: PhaseClock) -> Path:
    """Phases 1-6 of the demo (the module's docstring) on the loaded `world`, each timed or noted as reused by `clock`."""
    # 1. Latent cache of the training split
    cache = out / "latents"
    with clock.phase("the latent cache", reused=(cache / MANIFEST).is_file()):
        ensure_latent_cache(world, cache, dev)

    # 2. Distillation
    run = out / "distill"
    overrides = dict(teacher=str(world_dir), data=str(cache), out=str(run), steps=distill_steps)
    config = finished_run_config(run) or demo_config(DistillConfig, overrides, "--distill-steps")
    # Every sampler is compared at the guidance scale of the preset's validation grid, inside its ω range
    guidance = config.validation_guidance_scale
    with clock.phase("the distillation", reused=exported(run)):
        train_once(config, run, dev, f"[demo] distilling {config.steps} steps into {run}")
    lcm = load_lcm(str(run / "lcm"), device=dev)

    with clock.phase("the table"):
        report, summary = compare_samplers(out, world, world_dir, lcm, config, guidance, eval_samples, dev)

    # 5-6. Latent consistency fine-tuning of the LCM on digits, which its teacher never saw; scored on held-out digits
    if FINETUNE_DATASET in world.judges:
        section, finetuned = finetune_on_new_data(world, lcm, out, dev, guidance, finetune_steps, clock)
        report += section
        summary["finetune"] = finetuned
    line, timing = clock.summary()
    report += f"\n{line}\n"
    write_text_atomic(out / "report.md", report)
    write_json_atomic(out / "report.json", summary | timing)
    print(report)
    return out


def compare_samplers(out: Path, world, world_dir: Path, lcm, config: TrainConfig, guidance: float, eval_samples: int,
                     dev) -> tuple[str, dict]:
    """Phases 3-4: the report's Table 1, its grid and its note on the undistilled starting point; the report so far and
    report.json's numbers."""
    # 3. Table 1 on the world: the LCM and the teacher's DDIM, DPM-Solver and DPM-Solver++ (CFG) at 1/2/4/8 steps, and
    # DPM-Solver++ at 25 as the reference, on the same reference prompts and noise, scored by the judge; Figure 2's grid
    prompts, attributes, real = reference_set(world, world.dataset, eval_samples)
    eval_set = EvalSet(prompts, attributes, real)
    rows = table_rows(list(TABLE_STEPS), [guidance], teacher=True, reference_steps=(25,))
    table = out / "table"
    results = run_table(rows, lcm, world.model, eval_set, [JudgeScorer(world.judge, prompt_alignment)], writable_folder(table), dev)
    write_grid([r for r in rows if r.sampler in ("lcm", "ddim") or r.steps == 25], lcm, world.model, eval_set, out, dev, real_row=True)
    write_plots(results, table)
    # 4. The undistilled starting point: the teacher's weights with a zero ω input, read in the teacher's
    # parameterisation, through the same 1-step sampler
    start = consistency_model(make_student_unet(world.model.unet, lcm.time_cond_proj_dim).eval(),
                              lcm.scheduler_config | {"prediction_type": world.prediction_type})
    undistilled = judge_scores(world.judge, sample_consistency(start, lcm.timesteps(1), world.model, prompts, guidance, device=dev),
                               attributes, real)
    # Real images of other prompts against the reference: a scale for FID, not a floor (samples made for the
    # reference's own prompts share its attribute mix and can score below it)
    fid_unpaired = fid_score(world.judge, real, real_training_images(world, world.dataset, len(real)))
    # The teacher's 1-step note names no flag: the demo's table is fixed at TABLE_STEPS
    start_notes = [f"{note}." for note in teacher_start_notes(world.model, list(TABLE_STEPS), steps_flag=None)]
    report = write_report(results, list(TABLE_STEPS), None, "Demo report", [
        f"World: `{world_dir}` ({world.dataset}, {world.resolution}px). Distillation: {config.steps} steps, solver {config.solver}, "
        f"skip {config.skip}, g in [{config.guidance_scale_min:g}, {config.guidance_scale_max:g}]. Evaluation: {len(prompts)} reference "
        f"prompts at g = {guidance:g}, FID in the judge's features, alignment = the fraction of prompt attributes the judge reads back "
        "(`table/results.json` has KID and every attribute). Grid: `grid.png` (Figure 2: real images, then each sampler).",
        *(paragraph for note in start_notes for paragraph in ("", note))])
    report += guidance_section(lcm.guidance_record)
    report += (f"\nThe undistilled starting point (the teacher's weights through the consistency sampler), 1 step: FID "
               f"{undistilled['fid']:.2f}, alignment {undistilled['alignment']['mean']:.3f}.\n\nFID of {len(prompts)} real training "
               f"images (other prompts) against the reference: {fid_unpaired:.2f} (a scale, not a floor: samples for the reference's "
               "own prompts can score below it).\n")
    return report, {"table": results, "undistilled": undistilled, "fid_real_unpaired": fid_unpaired}


def train_once(config: TrainConfig, run: Path, dev, announce: str) -> None:
    """Train (or continue) the demo's run `config` into `run` unless its LCM is exported, holding the run folder's own lock
    (`training.loop.holding_out`, as `lcm distill` and `lcm finetune` do: `run/../.NAME.lock`, another file than the demo's
    beside --out): an `lcm distill --resume` of that folder meanwhile is refused."""
    if exported(run):
        return
    print(announce, flush=True)
    cpu = dev.type == "cpu"
    with holding_out(config, cpu):
        train(config, resume=(run / "config.json").is_file(), cpu=cpu)

TABLE_STEPS = (1, 2, 4, 8)
# The distillation's training images: 1,000 steps at batch 64 see each of 20,000 about three times; encoding them
# takes a minute on a 2-core CPU, all 50,000 of the world's 2.7 minutes of the demo's 15
DISTILL_IMAGES = 20_000
FINETUNE_DATASET = "digits"  # a pretraining dataset of the world: its VAE and text encoder know it, its teacher does not
# What the demo writes at the top of --out
REPORT_FILES = ("report.md", "report.json", "grid.png", f"{FINETUNE_DATASET}_grid.png")
RERUN = "to continue, run the same `lcm demo` command again"  # what a stopped run of the demo says (`run_folder.continued_by`)
UNFINISHED = "before the demo ended"  # where a stop outside training stood, which says nothing of its own (`continued_by_rerun`)
TIMES = "phase_minutes.json"  # in --out: the minutes each phase took, over the runs that made the folder (`PhaseClock`)


@contextlib.contextmanager
def continued_by_rerun():
    """A stop anywhere in the demo says how to go on: the same command again (RERUN), after where a training run stood
    (`run_folder.continued_by`) or, outside training (the cache, the table, the grids), after UNFINISHED, where it said only
    "interrupted"."""
    with continued_by(RERUN):
        try:
            yield
        except KeyboardInterrupt as stop:
            stop.args = stop.args or (UNFINISHED,)
            raise


class PhaseClock:
    """The demo's wall time, true after a stop and a rerun: the minutes each phase took when it ran, kept in --out (TIMES) and
    added to by every run that works in it (a phase stopped by Ctrl-C or SIGTERM too; a kill -9 loses that phase's time
    since it began), and the phases this run reused whole. The report states their sum, where it stated the last run's
    time alone (0.3 min after a rerun of a finished 6.4-minute demo)."""

    def __init__(self, out: Path):
        self.path, self.start, self.reused = out / TIMES, time.perf_counter(), []
        self.minutes = _read_minutes(self.path)
        self.earlier = bool(self.minutes)  # phases timed by runs before this one

    @contextlib.contextmanager
    def phase(self, name: str, reused: bool = False):
        """Time the `with` block as the phase `name` and record it; `reused`, note that this run reused the phase whole."""
        if reused:
            self.reused.append(name)
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self.minutes[name] = self.minutes.get(name, 0.0) + (time.perf_counter() - start) / 60
            write_json_atomic(self.path, self.minutes)

    def summary(self) -> tuple[str, dict]:
        """The report's wall-time line, and report.json's: the phases' sum ("minutes"), this run's own time and what it reused.
        The line says this run's time only where runs before it did part of the work."""
        total, this_run = sum(self.minutes.values()), (time.perf_counter() - self.start) / 60
        line = f"Wall time: {total:.1f} min"
        if self.earlier:
            reused = f"; reused: {', '.join(self.reused)}" if self.reused else ""
            line += f", each phase's time over the runs that made this folder (this run: {this_run:.1f} min{reused})"
        return line + ".", {"minutes": total, "minutes_this_run": this_run, "reused": self.reused}


def _read_minutes(path: Path) -> dict[str, float]:
    """TIMES as a run wrote it; {} where there is none, or it is not one (an earlier version wrote none)."""
    try:
        minutes = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    valid = isinstance(minutes, dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in minutes.values())
    return minutes if valid else {}


def demo_config(cls: type[TrainConfig], overrides: dict, steps_flag: str) -> TrainConfig:
    """The `world` preset's config of a run the demo drives, its notes and errors naming the fields as the demo's user knows
    them (`TrainConfig.named_as`): --steps as the demo's own flag that sets it (`steps_flag`), every other field as the demo's
    setting, which that user gives no flag for (a note of `lcm distill`'s --lr-warmup-steps named a flag the demo lacks)."""
    names = {f.name: f"the demo's {f.name}" for f in dataclasses.fields(cls)} | {"steps": steps_flag}
    return resolve_config(cls, "world", overrides=overrides).named_as(names)


def guidance_section(record) -> str:
    """What the report says of the LCM's ω input: its recorded response per t (`guidance_record`), and whether g does
    anything (the `world` preset's student ignores it; `world-ode` then `world-guided` learn it, docs/guide.md)."""
    if record is None or not record.omega_response:
        return ""
    response = ", ".join(f"t = {t}: {round(r, 2) + 0.0:.2f}" for t, r in record.omega_response.items())  # + 0.0: no "-0.00"
    verdict = ("it ignores its guidance scale, so g changes its images little; `--preset world-ode` then `--preset world-guided` "
               "make a student that follows g (docs/guide.md, the built-in world)" if record.ignores_guidance() else "it follows its guidance scale")
    return (f"\nω response of the LCM (the fraction of the teacher's guidance effect between g = {record.guidance_scale_min:g} and "
            f"{record.guidance_scale_max:g} it reproduces, 1 = all): {response}; {verdict}.\n")


def real_training_images(world, dataset: str, n: int) -> torch.Tensor:
    items = get_dataset(dataset, "train", world.resolution, seed=world.preset.seed)
    return torch.stack([items[i]["image"] for i in range(n)])


def finetune_on_new_data(world, lcm, out: Path, dev, guidance: float, steps: int | None, clock: PhaseClock) -> tuple[str, dict]:
    """LCF (Algorithm 4) of the demo's LCM on the world's digits training split (the `world` fine-tuning preset), the
    held-out test split as its eval data; then both LCMs scored on the test prompts at 1/2/4 steps with the digits judge.
    Each phase timed or noted as reused by `clock`."""
    dataset = FINETUNE_DATASET
    run, cache = out / "finetune", out / f"{dataset}-latents"
    with clock.phase(f"the {dataset} latent cache", reused=(cache / MANIFEST).is_file()):
        ensure_latent_cache(world, cache, dev, dataset)
    overrides = dict(model=str(out / "distill" / "lcm"), data=str(cache), eval_data=f"world:{dataset}:{REFERENCE_SPLITS[dataset]}",
                     out=str(run), steps=steps)
    config = finished_run_config(run) or demo_config(FinetuneConfig, overrides, "--finetune-steps")
    with clock.phase("the fine-tuning", reused=exported(run)):
        train_once(config, run, dev, f"[demo] fine-tuning the LCM on {dataset} for {config.steps} steps into {run}")
    with clock.phase("the before and after"):
        return _before_and_after(world, lcm, load_lcm(str(run / "lcm"), device=dev), out, dev, guidance, config)


def _before_and_after(world, lcm, tuned, out: Path, dev, guidance: float, config: TrainConfig) -> tuple[str, dict]:
    """Phase 6: the LCM before and after LCF (`tuned`, fine-tuned with `config`) on the held-out digits; the report's section
    and its numbers."""
    dataset = FINETUNE_DATASET
    prompts, attributes, real = reference_set(world, dataset, 10**9)
    judge = world.judges[dataset]
    models = {"LCM before LCF": lcm, "LCM after LCF": tuned}
    results = [(f"{name} {n}-step g={guidance:g}", judge_scores(judge, sample(SamplerSpec("lcm", n, guidance), model, world.model, prompts, device=dev),
                                                 attributes, real))
               for name, model in models.items() for n in (1, 2, 4)]
    fid_unpaired = fid_score(judge, real, real_training_images(world, dataset, len(real)))
    rows = [real[:10]] + [sample(SamplerSpec("lcm", n, guidance), model, world.model, prompts[:10], device=dev)
                          for model, n in ((lcm, 4), (tuned, 1), (tuned, 2), (tuned, 4))]
    save_png(image_grid(rows, ["real", "before LCF, 4 steps", "after, 1 step", "after, 2 steps", "after, 4 steps"], scale=3,
                        label_width=150, column_labels=prompts[:10]), out / f"{dataset}_grid.png")
    section = (f"\n## Fine-tuning on {dataset} (LCF, no teacher)\n\nThe LCM above fine-tuned with latent consistency fine-tuning "
               f"(Algorithm 4) on the {dataset} training split, which its teacher never saw: {config.steps} steps, lr {config.lr:g}, "
               f"batch {config.batch_size}. Evaluation: the {len(prompts)} held-out {dataset} prompts at g = {guidance:g}, "
               f"the {dataset} judge's features.\n\n{_table(results)}\n\nFID of {len(prompts)} real training images against the "
               f"held-out ones: {fid_unpaired:.2f}. Grid: `{dataset}_grid.png`.\n")
    return section, {"results": dict(results), "fid_real_unpaired": fid_unpaired}


def exported(run: Path) -> bool:
    """Whether a demo run's LCM is exported into `run/lcm` (a run's export is renamed there whole, `RunFolder.finish`)."""
    return (run / "lcm" / "model_index.json").is_file()


def finished_run_config(run: Path) -> TrainConfig | None:
    """The config a finished demo run (`run/lcm` exported) was made with, read from its config.json; None before that.
    The report states it, not the flags of a rerun that reuses the run."""
    saved = run / "config.json"
    if not (exported(run) and saved.is_file()):
        return None
    return saved_config(saved)


def _check_out(out: Path) -> None:
    """An --out that holds files of the names the demo writes there (an `lcm evaluate` folder's report.md, say) but no
    demo's distillation to continue is a UserError: they are not overwritten."""
    taken = [name for name in REPORT_FILES if (out / name).exists()] if out.is_dir() else []
    if taken and not (out / "distill" / "config.json").is_file():
        raise UserError(f"--out {out} already holds {taken[0]} but no demo run (distill/) to continue; choose another --out, "
                        "or move it away")


def _check_out_name(out: Path) -> None:
    """An --out that names no new folder ("/", "..") is a UserError, as `outputs.partial_folder` refuses it for other
    commands: the demo wrote its folders into the root of the file system. "." (the current folder) is one to write in."""
    normal = os.path.normpath(out)
    if normal != "." and Path(normal).name in ("", ".."):
        raise UserError(f"--out {str(out)!r} names no new folder; give the folder by its name (e.g. runs/demo)")


def _check_own_runs(out: Path, world_dir: Path) -> None:
    """A rerun continues or reuses the runs in `out`: its distillation must be of this demo's world (the teacher), its
    fine-tuning of that distillation's LCM; not runs of another world (a rerun with another --world or --world-preset
    into the same --out) or the user's own runs in folders of those names. A run recorded from another place whose model
    there is still the one it was made from (`_same_model`: a demo folder copied with `cp -a`) is this demo's; a copy whose
    model differs is refused as the copy it is (`_copied_from`)."""
    for run, field, source, hint in ((out / "distill", "teacher", world_dir, "rerun with that world or "),
                                     (out / "finetune", "model", out / "distill" / "lcm", "")):
        saved = run / "config.json"
        if not saved.is_file():
            continue
        config = saved_config(saved)
        recorded = getattr(config, field, "")
        if recorded and not Path(recorded).exists():
            continue  # a folder named from where the demo first ran, or since moved (a renamed checkout): nothing to tell
        if recorded and (Path(recorded).resolve() == source.resolve() or _same_model(run, field, source)):
            continue
        copied = _copied_from(run, config)
        where = f"{out} is a copy of the demo folder {copied}, and " if copied else ""
        raise UserError(f"{where}{run} holds a run from {recorded or 'no --' + field}, not from this demo's {source}"
                        f"{' (other weights)' if copied else ''}: {hint}use a new --out")


def _same_model(run: Path, field: str, source: Path) -> bool:
    """Whether the model `source` is the one the run in `run` recorded for `field` when it started (its sources.json,
    `training.sources.model_digest`): a run copied with its demo folder, made from the original's LCM, which the copy's
    LCM is byte for byte."""
    recorded = recorded_sources(run).get(field)
    return recorded is not None and recorded == model_digest(str(source))


def _copied_from(run: Path, config: TrainConfig) -> Path | None:
    """The demo folder that `run` was copied from: the one its config.json recorded it in (`out`, made absolute when the
    run started), where that is another folder that is still there; None for a run made in place."""
    recorded = Path(config.out) if config.out else None
    if recorded is None or not recorded.exists() or recorded.resolve() == run.resolve():
        return None
    return recorded.parent


def _check_finished_steps(flag: str, run: Path, steps: int | None) -> None:
    """A rerun reuses a finished run: a step count given for it (`flag`) must be the one it was made with."""
    finished = finished_run_config(run)
    if finished is not None and steps is not None and steps != finished.steps:
        raise UserError(f"{run} holds a finished run of {finished.steps} steps, which this demo reuses: {flag} {steps} would not "
                        f"apply; give {flag} {finished.steps}, leave it out, or use a new --out")


def _shipped_parts_for(world_preset: str) -> Path | None:
    """The shipped world when some of its phases can stand in for `world_preset`'s (default-sdxl: the tokenizer, judge
    and VAE; `lcm world build --parts-from`), else None."""
    try:
        shipped = default_world_path()
    except UserError:
        return None
    return shipped if reusable_phases(shipped, world_spec(get_preset(world_preset), "epsilon")) else None
