"""Quality over training: 1/2/4-step FID and prompt alignment of every checkpoint of a distillation run.

    lcm evaluate sweep --runs runs/demo/distill [more runs] --out DIR [--world WORLD] [--samples 500]

Each checkpoint's target θ⁻ (the network that is exported) is sampled for the same reference prompts
and noise and scored with the world's judge, and its distance from the teacher's ODE solution is measured
at the 4-step sampler's timesteps and one small t (`ode_error`: where on the trajectory it is accurate),
as is how much of the teacher's guidance effect between the ends of the trained guidance range it
reproduces (`guidance_response`: 1 = the ω input is learned, 0 = ignored). Writes `over_training.json`,
`.md` and `.png` into the run, and keeps every row it scores in `over_training.cache.json` (a rerun resumes), holding
the run's scores lock (`holding_scores`) while it does.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from latent_consistency import fonts
from latent_consistency.errors import UserError
from latent_consistency.evaluation.compare import sample_consistency
from latent_consistency.evaluation.ode_error import ODESolutions, error_timesteps, guidance_response, ode_error, ode_solution_sets
from latent_consistency.evaluation.table import plain_ticks
from latent_consistency.folder_lock import hold
from latent_consistency.models import inference_timesteps
from latent_consistency.outputs import savefig_atomic, write_json_atomic, write_text_atomic
from latent_consistency.parameterization import omega_from_guidance_scale
from latent_consistency.solvers import get_solver
from latent_consistency.training.checkpoint import list_checkpoints
from latent_consistency.training.config import LCM_METHODS, DistillConfig, TrainConfig
from latent_consistency.training.objectives import objective_of
from latent_consistency.training.run_folder import recorded_guidance, resumed_student_unet, saved_config
from latent_consistency.training.students import make_student
from latent_consistency.world.artifact import WORLD_FILE, World
from latent_consistency.world.datasets import REFERENCE_SPLITS, get_dataset
from latent_consistency.world.judge import judge_scores

STEPS = (1, 2, 4)


def reference_solutions(world: World, config, items: list[dict], guidance_scales: list[float], device) -> dict[float, ODESolutions]:
    """The teacher's ODE solutions (config's solver and skip) from the reference images' latents, at each guidance scale,
    from the same z_t (solved together: `ode_solution_sets`)."""
    model = world.model
    x0 = model.codec.encode(torch.stack([it["image"] for it in items]).to(device)).float()
    cond = model.prompts.encode([it["caption"] for it in items], device)
    uncond = model.prompts.uncond(device).expand(len(items), -1, -1)
    scales = list(dict.fromkeys(guidance_scales))
    sets = ode_solution_sets(model.guided_teacher(), get_solver(config.solver), x0, cond, uncond, [omega_from_guidance_scale(g) for g in scales],
                             error_timesteps(model.schedule.num_train_timesteps, config.skip), config.skip, torch.Generator().manual_seed(0))
    return dict(zip(scales, sets))


CACHE_FILE = "over_training.cache.json"
SCORES = "over_training"  # the name of what a sweep writes into a run (`CACHE_FILE`, .json, .md, .png) and of its lock


def holding_scores(run: Path):
    """Hold the lock of what a sweep writes into `run` (`folder_lock.hold` of `run/SCORES`: `run/.over_training.lock`).
    Two sweeps of one run with other --out (other runs beside it, another --guidance-scale) each wrote the run's cache and
    report over the other's: rows scored again, a report of one sweep's rows headed by the other's settings. Not the
    run's own lock: a run still training is swept as its checkpoints appear."""
    return hold(run / SCORES, f"the over-training record of {run} ({SCORES}.*)")


def run_names(runs: list[str]) -> list[str]:
    """The name of each run of a sweep in sweep.json, its table and its plot's legend: its folder's name as the user gave
    it, "." and ".." taken as the shell takes them (a symbolic link "run link" is "run link", not the name of the folder it
    points to). A UserError for two runs of one name (their curves would share it) or one folder given twice (under two
    links: its checkpoints scored twice, its record's lock taken twice)."""
    names = [Path(os.path.abspath(run)).name for run in runs]
    twice = [name for i, name in enumerate(names) if name in names[:i]]
    if twice:
        raise UserError(f"two --runs are folders named {twice[0]}: their curves would share one name in sweep.json and the plot; "
                        "give each run once, in folders of different names")
    real = [os.path.realpath(run) for run in runs]
    same = [(runs[real.index(path)], run) for i, (run, path) in enumerate(zip(runs, real)) if path in real[:i]]
    if same:
        raise UserError(f"--runs {same[0][0]} and {same[0][1]} are one run folder; give it once")
    return names


def check_run(run: Path, steps: tuple[int, ...] = STEPS, guidance_scale: float | None = None,
              timesteps: int | None = None, world: Path | None = None) -> TrainConfig:
    """The config of `run`, an LCM distillation run (of the teacher of the `world` folder, when given) with checkpoints
    that can be sampled in `steps` at `guidance_scale` (default: its validation scale) on a world of `timesteps` training
    timesteps (None: not known yet); a UserError otherwise. Reads only files, so that a sweep checks every run before it
    loads the world."""
    if not (run / "config.json").is_file():
        raise UserError(f"{run} is not a training run folder (no config.json); give the --out of `lcm distill`")
    config = saved_config(run / "config.json", "give the --out of `lcm distill`")
    if not isinstance(config, DistillConfig) or config.method not in LCM_METHODS:
        what = f"a `lcm distill --method {config.method}`" if isinstance(config, DistillConfig) else "an `lcm finetune`"
        raise UserError(f"{run} is {what} run, which makes no LCM of the world's teacher; give runs of `lcm distill` "
                        f"--method {' or '.join(LCM_METHODS)}")
    if world is not None:
        check_teacher(run, config, Path(world))
    if not list_checkpoints(run):
        raise UserError(f"{run} holds no checkpoints yet; train it with --checkpoint-every N to evaluate it over training")
    most = timesteps // config.skip if timesteps is not None else max(steps)
    if max(steps) > most:  # the LCMScheduler's original_inference_steps, T/k: `inference_timesteps` takes at most these
        raise UserError(f"--steps {max(steps)}: the LCM of {run} samples on T/k = {most} timesteps (the world's T = {timesteps}, skip "
                        f"k = {config.skip}); give step counts of at most {most}")
    g = run_guidance_scale(config) if guidance_scale is None else guidance_scale
    if g < 1 and config.adapter == "full":  # a full student has an ω input (`make_student`), a LoRA student none
        given = f"--guidance-scale {g:g}" if guidance_scale is not None else f"its validation guidance scale {g:g}"
        raise UserError(f"{given} is below 1, and the student of {run} has an ω input (ω = g - 1), trained on ω >= 0; give "
                        "--guidance-scale 1 or more")
    return config


def run_guidance_scale(config: DistillConfig) -> float:
    """The g a run's checkpoints are scored at by default: a full LCM's recorded default g (its validation grid's, moved
    into its guidance range: `run_folder.recorded_guidance`), a LoRA student's validation guidance scale."""
    return recorded_guidance(config, None, None).guidance_scale if config.adapter == "full" else config.validation_guidance_scale


def check_teacher(run: Path, config: DistillConfig, world: Path) -> None:
    """A UserError unless `run` was distilled from the `world` folder's teacher (`same_teacher`): from another world's,
    give that world; from a model that is no world (a user's own), or from a teacher that is gone on data that is not a
    world's (`world:...`), the sweep cannot score it (its checkpoints would be scored against a teacher they never saw)."""
    teacher = Path(config.teacher)
    same = same_teacher(teacher, world)
    if same or same is None and config.data.startswith("world:"):  # a world's run whose teacher moved: nothing to compare
        return
    if same is False and (teacher / WORLD_FILE).is_file():
        raise UserError(f"{run} was distilled from {teacher}, whose network is not the teacher of --world {world}: its checkpoints "
                        "would be scored against a teacher they never saw; give that world as --world")
    model = f"--lcm {run / 'lcm'}" if config.adapter == "full" else f"--lcm {teacher} --lora {run / 'lora'}"
    what = (f"whose network is not the teacher of --world {world}, and which is no world (no {WORLD_FILE})" if same is False
            else f"which is no folder here to compare with --world (moved, or a hub id), on the data {config.data}, not a world's "
                 "(world:...)")
    raise UserError(f"{run} was distilled from {teacher}, {what}: `lcm evaluate sweep` scores runs distilled from a world's "
                    f"teacher only; score this run's model with `lcm evaluate {model} --prompts ...`")


def same_teacher(teacher: Path, world: Path) -> bool | None:
    """Whether a run's recorded teacher folder holds the `world` folder's teacher: the same folder, or the same network
    weights (an export or copy of the world); None when the teacher's weights cannot be read (moved since: nothing to
    compare), True when only the world's cannot (loading it says what is wrong)."""
    weights = [Path(folder) / "unet" / "diffusion_pytorch_model.safetensors" for folder in (teacher, world)]
    if teacher.resolve() == world.resolve():
        return True
    if not weights[0].is_file():
        return None
    if not weights[1].is_file():
        return True
    try:
        return _digest(weights[0]) == _digest(weights[1])
    except OSError:
        return None


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def world_timesteps(path: Path) -> int | None:
    """The training timesteps T of the world folder's teacher, from its scheduler config before anything loads; None when
    that cannot be read (loading the world then says what is wrong)."""
    try:
        config = json.loads((Path(path) / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
        return int(config.get("num_train_timesteps", 1000))
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def evaluate_run(run: Path, world: World, samples: int, guidance_scale: float | None = None, device="cpu",
                 steps: tuple[int, ...] = STEPS, ode: bool = True, tell: Callable[[str], None] | None = None) -> list[dict]:
    """One row per checkpoint of `run`: n-step FID and alignment for n in `steps`; with `ode`, also the ODE error per t
    and the ω response per t (their references are teacher ODE solutions of T/k jumps per timestep: 1,000 at k = 1).

    Rows are kept in `over_training.cache.json` as they are made, under the settings that made them (world, prompts,
    guidance scale) and each checkpoint's write time: a killed sweep resumes, and a rerun scores only new checkpoints
    (of a run still training, say) or step counts not scored before. `tell`: given one line saying how many checkpoints'
    saved rows were reused whole and how many scored, where any were reused (a resumed sweep, as `lcm evaluate` says it:
    `evaluation.table.run_table`)."""
    config = check_run(run, steps, guidance_scale, world.model.schedule.num_train_timesteps)
    guidance_scale = run_guidance_scale(config) if guidance_scale is None else guidance_scale
    checkpoints = list_checkpoints(run)
    reference = get_dataset(world.dataset, REFERENCE_SPLITS[world.dataset], world.resolution, seed=world.preset.seed)
    items = [reference[i] for i in range(min(samples, len(reference)))]
    prompts, attributes = [it["caption"] for it in items], [it["attributes"] for it in items]
    real = torch.stack([it["image"] for it in items])
    settings = {"world": str(Path(world.path).resolve()), "samples": len(items), "guidance_scale": guidance_scale}
    cache = _read_cache(run / CACHE_FILE, settings)
    keep = {"step", *(f"{metric}_{n}" for metric in ("fid", "alignment") for n in steps)}
    student = f = solutions = range_ends = None
    rows, scored = [], 0
    for path in checkpoints:
        key = f"{path.name}@{(path / 'state.json').stat().st_mtime_ns}"
        row = cache.get(key, {})
        if not (keep <= row.keys() and (not ode or _has_ode_error(row))):
            scored += 1
            if student is None:
                # A full UNet with the ω input, or LoRA adapters on (a copy of) the teacher's, under the run's LCMScheduler config
                # (a --student-init run's in the architecture its checkpoints recorded: its starting model may be gone)
                student = make_student(config, world.model, objective_of(config).scheduler_config(config, world.model),
                                       resumed_unet=resumed_student_unet(run, config, resume=True))
                student.target_unet.eval()  # θ⁻, the network that is exported (the student itself when there is no copy)
                f = student.consistency_model(student.target_unet)
            if ode and solutions is None:
                ends = (config.guidance_scale_min, config.guidance_scale_max) if config.guidance_scale_min < config.guidance_scale_max else ()
                by_scale = reference_solutions(world, config, items, [guidance_scale, *ends], device)
                solutions, range_ends = by_scale[guidance_scale], [by_scale[g] for g in ends]
            row = dict(row, step=student.load_checkpoint(path))
            for n in (n for n in steps if f"fid_{n}" not in row):
                images = sample_consistency(f, inference_timesteps(student.scheduler_config, n), world.model, prompts, guidance_scale,
                                            device=device)
                s = judge_scores(world.judge, images, attributes, real)
                # a mean of fractions of the prompts: 0.676, not its float sum's 0.6759999999999999 in the JSON
                row[f"fid_{n}"], row[f"alignment_{n}"] = s["fid"], round(s["alignment"]["mean"], 12)
            if ode and not _has_ode_error(row):
                row |= {f"ode_error_{t}": e for t, e in ode_error(f, solutions).items()}
                if range_ends:
                    row |= {f"omega_response_{t}": r for t, r in guidance_response(f, *range_ends).items()}
            cache[key] = row
            write_json_atomic(run / CACHE_FILE, {"settings": settings, "rows": cache})
        row = {k: v for k, v in row.items() if k in keep or ode and k.startswith(("ode_error_", "omega_response_"))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if tell is not None and scored < len(checkpoints):
        tell(f"reused {len(checkpoints) - scored} of {len(checkpoints)} checkpoint row(s) from {run / CACHE_FILE}, scored {scored}")
    return rows


def _signed(value: float, digits: int) -> str:
    """`value` to `digits` decimals, without the minus sign of a value that rounds to zero ("0.000", not "-0.000")."""
    return f"{round(value, digits) + 0.0:.{digits}f}"


def _read_settings(path: Path) -> dict | None:
    """The settings (world, samples, guidance scale) the rows of a run's cache were scored under; None when unreadable."""
    try:
        settings = json.loads(path.read_text()).get("settings")
    except (OSError, ValueError, AttributeError):
        return None
    return settings if isinstance(settings, dict) and {"world", "samples", "guidance_scale"} <= settings.keys() else None


def _has_ode_error(row: dict) -> bool:
    return any(k.startswith("ode_error_") for k in row)


def _read_cache(path: Path, settings: dict) -> dict[str, dict]:
    """Rows saved under the same settings, by checkpoint (name and write time); none when the settings differ."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return saved["rows"] if isinstance(saved, dict) and saved.get("settings") == settings and isinstance(saved.get("rows"), dict) else {}


def write_report(run: Path, rows: list[dict], steps: tuple[int, ...] = STEPS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    write_json_atomic(run / "over_training.json", rows)
    error_keys = [k for k in rows[0] if k.startswith("ode_error_")]
    response_keys = [k for k in rows[0] if k.startswith("omega_response_")]
    lines = ["| step | " + " | ".join(f"FID {n}-step" for n in steps) + " | " + " | ".join(f"align {n}-step" for n in steps)
             + "".join(f" | ODE error t={k.removeprefix('ode_error_')}" for k in error_keys)
             + "".join(f" | ω response t={k.removeprefix('omega_response_')}" for k in response_keys) + " |",
             "|---" * (1 + 2 * len(steps) + len(error_keys) + len(response_keys)) + "|"]
    for r in rows:
        lines.append(f"| {r['step']} | " + " | ".join(f"{r[f'fid_{n}']:.2f}" for n in steps) + " | "
                     + " | ".join(f"{r[f'alignment_{n}']:.3f}" for n in steps)
                     + "".join(f" | {r[k]:.4f}" for k in error_keys) + "".join(f" | {_signed(r[k], 3)}" for k in response_keys) + " |")
    for n in steps:
        best = min(r[f"fid_{n}"] for r in rows)
        lines.append(f"\n{n}-step: final FID {rows[-1][f'fid_{n}']:.2f}, best {best:.2f} "
                     f"({100 * (rows[-1][f'fid_{n}'] / best - 1):.1f} % above the best)")
    settings = _read_settings(run / CACHE_FILE)
    if settings is not None:  # what the rows measured, from the settings they were scored under
        lines[:0] = [f"Checkpoints of `{run}` (θ⁻, the exported network), sampled at g = {settings['guidance_scale']:g} for the first "
                     f"{settings['samples']} reference prompts of the world `{settings['world']}`, the same noise for every checkpoint. "
                     "FID: in the world judge's features (lower is better); align: the fraction of each prompt's attributes the judge "
                     "reads back (higher is better)"
                     + ("; ODE error: the MSE of the student's f(z_t) to the teacher's ODE solution from z_t, in latent space" if error_keys else "")
                     + ("; ω response: the fraction of the teacher's guidance effect between the ends of the trained range that the "
                        "student reproduces (1: all, 0: none)" if response_keys else "") + ".", ""]
    write_text_atomic(run / "over_training.md", "\n".join(lines) + "\n")
    panels = 1 + bool(error_keys) + bool(response_keys)
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels + 0.8 * (panels > 1), 3.2), squeeze=False, layout="constrained")
    ax, *others = axes[0]
    iterations = [r["step"] for r in rows]
    for n in steps:
        ax.plot(iterations, [r[f"fid_{n}"] for r in rows], marker="o", label=f"{n}-step")
    ax.set_xlabel("training step")
    for panel in axes[0]:
        panel.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no 22.5
    ax.set_ylabel("FID (judge features)")
    ax.set_yscale("log")  # a v student's relearning phase scores in the thousands
    plain_ticks(ax, "y")
    ax.legend()
    if error_keys:
        ax_err = others.pop(0)
        for k in error_keys:
            ax_err.plot(iterations, [r[k] for r in rows], marker="o", label=f"t = {k.removeprefix('ode_error_')}")
        ax_err.set_xlabel("training step")
        ax_err.set_ylabel("MSE to the teacher's ODE solution")
        ax_err.set_yscale("log")
        plain_ticks(ax_err, "y")
    if response_keys:
        ax_response = others.pop(0)
        for k in response_keys:
            ax_response.plot(iterations, [r[k] for r in rows], marker="o", label=f"t = {k.removeprefix('omega_response_')}")
        ax_response.axhline(1.0, color="gray", linewidth=0.8)
        ax_response.set_xlabel("training step")
        ax_response.set_ylabel("ω response")
        ax_response.set_title("1: the teacher's guidance effect; 0: ω ignored", fontsize=8)
    if error_keys or response_keys:  # one legend for the t lines of both panels (the same colours), outside them
        handles, labels = (ax_err if error_keys else ax_response).get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right upper", fontsize=7, title="timestep", title_fontsize=7)
    savefig_atomic(fig, run / "over_training.png", dpi=120)
    plt.close(fig)


def write_sweep(curves: dict[str, list[dict]], out: Path, steps: tuple[int, ...] = STEPS, scales: dict[str, float] | None = None,
                settings: str = "") -> str:
    """Figure 3 of the paper: n-step FID against training iterations, one line per run (solver × skip k, say);
    `sweep.png` and `sweep.md` (final and best FID of each run, and the g it was sampled at from `scales`, below a
    `settings` line) in `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    with fonts.for_texts(list(curves)):  # run names of any script in the legend
        styles = _line_styles(list(curves))
        fig, axes = plt.subplots(1, len(steps), figsize=(4.5 * len(steps) + 1.6, 3.4), squeeze=False, layout="constrained")
        for ax, n in zip(axes[0], steps):
            for name, rows in curves.items():
                ax.plot([r["step"] for r in rows], [r[f"fid_{n}"] for r in rows], label=name, **styles[name])
            ax.set_xlabel("training iteration")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no 22.5
            ax.set_ylabel(f"FID, judge features, {n}-step (lower is better)")
            ax.set_title(f"{n}-step sampling", fontsize=9)
            ax.set_yscale("log")
            plain_ticks(ax, "y")  # 20, 30 FID, not 2×10^1
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right center", fontsize=7, ncol=1 + len(curves) // 16)
        savefig_atomic(fig, out / "sweep.png", dpi=120)
        plt.close(fig)
    scales = scales or {}
    lines = ([settings, ""] if settings else []) + [
        "| run | g | " + " | ".join(f"{n}-step FID final / best" for n in steps) + " |", "|---" * (2 + len(steps)) + "|"]
    for name, rows in curves.items():
        cells = [f"{rows[-1][f'fid_{n}']:.2f} / {min(r[f'fid_{n}'] for r in rows):.2f}" for n in steps]
        g = f"{scales[name]:g}" if name in scales else "-"
        lines.append(f"| {name} | {g} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    write_text_atomic(out / "sweep.md", text)
    return text


def _line_styles(names: list[str]) -> dict[str, dict]:
    """One distinguishable line per run. Names that form a grid `FAMILY-VARIANT` (Figure 3's `ddim-k20`,
    `dpm-k20`, ...: every family has the same variants) get a colour per variant and a line style and marker
    per family, so the k curves of one solver and the solvers at one k read off at once; other names get a
    colour each, cycling line styles past ten."""
    import itertools

    linestyles, markers = ["-", "--", ":", "-."], ["o", "s", "^", "D"]
    split = [name.rsplit("-", 1) for name in names]
    families = list(dict.fromkeys(parts[0] for parts in split if len(parts) == 2))
    variants = list(dict.fromkeys(parts[1] for parts in split if len(parts) == 2))
    grid = (all(len(parts) == 2 for parts in split) and 1 < len(families) <= len(linestyles)
            and 1 < len(variants) <= 10 and len(names) == len(set(names)) == len(families) * len(variants))
    if grid:
        return {name: dict(color=f"C{variants.index(v)}", linestyle=linestyles[families.index(f)],
                           marker=markers[families.index(f)], markersize=4)
                for name, (f, v) in zip(names, split)}
    cycle = itertools.product(linestyles, markers[:1], (f"C{i}" for i in range(10)))
    return {name: dict(linestyle=ls, marker=m, color=c, markersize=4) for name, (ls, m, c) in zip(names, itertools.cycle(cycle))}
