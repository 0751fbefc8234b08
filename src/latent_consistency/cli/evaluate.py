"""`lcm evaluate`: the paper's Table 1 and Figures 2, 4, 5 for an LCM and its teacher; `lcm evaluate sweep`: quality over
training of several runs on one plot (Figure 3).

Metrics: on the built-in world (`--prompts world:NAME[:SPLIT]`) its judge; for any model CLIP (`--clip MODEL`: CLIP
score and FID in CLIP features) and the usual Inception FID (`--inception FILE`).

`--style-lora FILE[:W]` (repeatable, as `lcm generate`'s) scores the LCM with style LoRAs beside it: the LCM rows sample
what `lcm generate --style-lora` samples. The teacher's rows (and the exact LCM's, the teacher's ODE) stay the teacher's.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import itertools
import json
import random
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from latent_consistency.allocator import keep_freed_memory
from latent_consistency.cli.arguments import finite_float, nonnegative_int, note_truncated_prompts, positive_int, source
from latent_consistency.cli.generate import STYLE_LORA_HELP, parse_style_lora
from latent_consistency.errors import UserError
from latent_consistency.folder_lock import hold
from latent_consistency.pipelines import DEFAULT_GUIDANCE_SCALE, MAX_GUIDANCE_SCALE, MAX_SEED, lcm_kind, repeated_seed_note
from latent_consistency.prompts import read_prompt_file


def guidance_scale(text: str) -> float:
    """A guidance scale g in (0, MAX_GUIDANCE_SCALE], the most `lcm generate` takes."""
    value = finite_float(text)
    if not 0 < value <= MAX_GUIDANCE_SCALE:
        raise argparse.ArgumentTypeError(f"{value:g} is out of range (guidance scales in (0, {MAX_GUIDANCE_SCALE:g}])")
    return value


def number_list(parse_one):
    """A comma-separated list of values, each checked by `parse_one` (`positive_int` for steps, `guidance_scale`). Refused: an
    empty item (a value left out), a value listed twice (its rows would be scored twice, and drawn twice in the grids) and
    two that print alike to 6 digits, as a row is keyed by its value so printed (`Row.key`): the second would take the first's scores."""

    def parse(text: str):
        items = [v.strip() for v in text.split(",")]
        if not any(items):
            raise argparse.ArgumentTypeError("give at least one value")
        if not all(items):  # "1, ,2": a value left out, not a separator to skip (as --timesteps refuses it)
            raise argparse.ArgumentTypeError(f"{text!r} has an empty item; give comma-separated values, e.g. 1,2,4")
        values = [parse_one(v) for v in items]
        printed = [f"{v:g}" for v in values]
        twice = [v for i, v in enumerate(values) if printed[i] in printed[:i]]
        if twice:
            raise argparse.ArgumentTypeError(f"{twice[0]:g} is listed twice; give each value once")
        return values

    return parse


def read_items(spec: str, resolution: int, n: int, items: DataItems | None = None) -> list[dict]:
    """The first `n` items {"caption", "attributes"?} of a data spec, or prompts of a text file (.txt): what a row
    samples (`items`: the spec as the evaluation opened it, its passes sharing one skip count). Their images are not kept
    (30,000 at 512 px are 94 GB): FID reads the real ones a batch at a time (`read_reference`); an image folder's are not
    even decoded, its captions read as they are (each sample's once, a corrupt image's included: it is a caption of the
    data all the same)."""
    items = items or DataItems(spec, resolution)
    return [{key: value for key, value in item.items() if key != "image"} for item in items.first(n, images=False)]


class DataItems:
    """A data spec's items {"caption", "image"?, "attributes"?}, or the prompts of a text file (.txt), read again in order on
    each pass (`first`). Shards are opened once for every pass: their skip counter logs a corrupt sample or a damaged shard
    once per evaluation, not once per pass (the prompts, the reference's size check, its fingerprint, each feature network).
    A map-style dataset is opened per pass, as it gives the next usable sample in a corrupt one's place, told from it by its
    skip count rising, which a counter that has seen the corrupt one already would not do; an image folder's scan is made
    once all the same, for the passes that decode no image (the prompts) and the reference images (`image_folder`): a walk
    of a LAION-sized folder takes minutes."""

    def __init__(self, spec: str, resolution: int):
        self.spec, self.resolution = spec, resolution
        self.shards = None  # the `ShardStream`, once a pass opened the spec and found shards
        self.folder = None  # the `ImageFolderDataset`, once a pass opened the spec and found an image folder

    def first(self, n: int, images: bool = True) -> Iterator[dict]:
        """The first `n` items, one at a time; without `images`, an image folder's are its captions alone, its images not
        decoded."""
        from latent_consistency.data.imagefolder import ImageFolderDataset
        from latent_consistency.data.shards import ShardStream

        if is_prompt_file(self.spec):
            yield from ({"caption": p} for p in read_prompt_file(self.spec)[:n])
            return
        dataset = self._open(images)
        if isinstance(dataset, ShardStream):  # each sample once, in order: the training stream resamples shards
            yield from itertools.islice(dataset.samples_once(), n)
            return
        if isinstance(dataset, ImageFolderDataset) and not images:
            yield from ({"caption": caption} for caption in itertools.islice(dataset.samples.captions, n))
            return
        count, skipped = 0, skipped_samples(dataset)
        for i in range(len(dataset)):
            if count == n:
                break
            item = dataset[i]
            if skipped_samples(dataset) == skipped:  # not the next usable sample standing in for a corrupt one, read again at its index
                count += 1
                yield item
            skipped = skipped_samples(dataset)

    def image_folder(self):
        """The spec's `ImageFolderDataset`, scanned by the first pass that opened it (or now), None where the spec is no
        image folder: its samples are the prompts and, in their order, the reference images (`read_reference`)."""
        from latent_consistency.data.imagefolder import ImageFolderDataset

        path = Path(self.spec).expanduser()
        if not path.is_dir() or (path / "manifest.json").is_file():  # a latent cache is opened by a pass that reads it
            return None
        dataset = self._open(images=False)
        return dataset if isinstance(dataset, ImageFolderDataset) else None

    def _open(self, images: bool):
        """The spec's dataset for a pass: shards as the first pass opened them; an image folder as the first pass scanned it
        where this pass decodes no image (`images` False); else opened afresh (see the class)."""
        from latent_consistency.data.imagefolder import ImageFolderDataset
        from latent_consistency.data.shards import ShardStream
        from latent_consistency.data.spec import open_dataset

        if self.shards is not None:
            return self.shards
        if self.folder is not None and not images:
            return self.folder
        dataset = open_dataset(self.spec, self.resolution, size_from="the native size of the model evaluated")  # `run`'s
        if isinstance(dataset, ShardStream):
            self.shards = dataset
        elif isinstance(dataset, ImageFolderDataset):
            self.folder = dataset
        return dataset


def is_prompt_file(spec: str) -> bool:
    """A text file of prompts (`read_prompt_file`): a .txt name that is no folder (a folder named x.txt is an image folder
    or shards), or any other file that is neither a shard (.tar) nor an image, as `lcm generate --prompt-file` takes any
    name. Not '-': the prompts are read again on each pass, and standard input reads once."""
    from latent_consistency.data.images import IMAGE_EXTENSIONS, UNSUPPORTED_IMAGE_EXTENSIONS

    path = Path(spec)
    suffix = path.suffix.lower()
    return (suffix == ".txt" and not path.is_dir()) or (
        path.is_file() and suffix != ".tar" and suffix not in IMAGE_EXTENSIONS and suffix not in UNSUPPORTED_IMAGE_EXTENSIONS)


def read_reference(spec: str, resolution: int, n: int, captioned: bool = False, items: DataItems | None = None):
    """The first `n` real images of a data spec for FID, each image once, as `evaluation.table.ReferenceImages`: read
    again, a batch at a time, on each pass over them, never all held. An image folder gives its image files (nested
    folders included) whether captioned or not, for FID reads no captions, in `reference_order` (a fixed shuffle: `n` of
    them from the whole folder); with `captioned` (the folder is also --prompts) those of its captioned samples, in their
    order: the images of the prompts evaluated first. A folder
    captioned by metadata.jsonl lists an image once per caption (COCO's five), each of them one image here, not five.
    Undecodable files are skipped and counted in the log (once, whatever the passes). Any other spec gives the images of
    `DataItems` (`items`: the spec as the evaluation opened it for its prompts), shards' skips logged once too. The file
    names are the folder's own (`ImageFolderDataset.samples`, or strings sorted), each made a path as a
    pass reaches it: a Path of each of a 12-million-image folder's files, for the first 30,000, held gigabytes. The folder
    is walked once: a captioned one's scan is that of its prompts (`DataItems.image_folder`)."""
    from latent_consistency.data.images import SkipCounter, load_rgb
    from latent_consistency.evaluation.table import ReferenceImages

    path = Path(spec).expanduser()
    items = items or DataItems(spec, resolution)
    if captioned:
        folder = items.image_folder()
        names, skipped = ([], None) if folder is None else (folder.samples.files, folder.skipped)
    else:
        names, skipped = reference_order(image_files(path)), SkipCounter(name=f"image folder {path}")
    if not names:  # shards, a latent cache, world:NAME, a .txt file, a folder of .heic photos alone (refused, saying why)
        return ReferenceImages(lambda: (it["image"] for it in items.first(n) if "image" in it))

    def usable() -> Iterator[torch.Tensor]:  # a file decoded as a pass reaches it
        files = (path / name for name in each_once(names))
        return itertools.islice((image for image in (load_rgb(file, resolution, skipped) for file in files) if image is not None), n)

    return ReferenceImages(usable)


REFERENCE_ORDER_SEED = 0  # one order of a --reference folder for every evaluation, whatever its --seed


def reference_order(names: list[str]) -> list[str]:
    """The order in which an uncaptioned --reference folder's images (`image_files`, sorted) are read: a shuffle, the same
    on every run. An evaluation reads as many as it generates, and the first of a sorted folder were those of its first
    subfolders alone (cats/ of cats/ and dogs/): the reference statistics of one class, and FID biased without a word."""
    order = list(names)
    random.Random(REFERENCE_ORDER_SEED).shuffle(order)
    return order


def image_files(path: Path) -> list[str]:
    """The image files of the folder `path` (sorted, nested folders included), found in one walk of it; none where `path` is
    no folder, a latent cache, or a folder of .tar shards at its top (read as a data spec, by `DataItems`)."""
    from latent_consistency.data.imagefolder import extension, visible_names
    from latent_consistency.data.images import IMAGE_EXTENSIONS

    if not path.is_dir() or (path / "manifest.json").is_file():
        return []
    images, shards = [], False
    for name in visible_names(path):
        if extension(name) in IMAGE_EXTENSIONS:
            images.append(name)
        shards = shards or ("/" not in name and name.endswith(".tar"))
    return [] if shards else sorted(images)


def each_once(names: Iterable[str]) -> Iterator[str]:
    """`names` in order, each at its first place only (an image that metadata.jsonl captions five times is one image), the
    names met kept only as far as a pass reads."""
    met = set()
    for name in names:
        if name not in met:
            met.add(name)
            yield name


def skipped_samples(dataset) -> int:
    """How many samples a map-style dataset has skipped so far (corrupt images: an image folder gives the next usable
    one in their place), by its `skipped` counter; 0 for a dataset without one."""
    counts = getattr(getattr(dataset, "skipped", None), "counts", {})
    return sum(count for reason, count in counts.items() if not reason.startswith("converted_"))


# What `lcm evaluate` writes next to results.json
REPORT_FILES = ("report.md", "steps.png", "guidance.png", "grid.png", "guidance_grid.png")


def check_out(out: str) -> None:
    """An --out that holds files of these names but no results.json (not an earlier evaluation's, which a rerun continues)
    is a UserError: they are not overwritten."""
    from latent_consistency.evaluation.table import RESULTS_FILE

    folder = Path(out)
    taken = [name for name in REPORT_FILES if (folder / name).exists()] if folder.is_dir() else []
    if taken and not (folder / RESULTS_FILE).exists():
        raise UserError(f"--out {out} already holds {taken[0]} but no {RESULTS_FILE} of an evaluation to continue; choose another "
                        "--out, or move it away")


def load_eval_set(args, resolution: int):
    from latent_consistency.evaluation.fid import MIN_IMAGES
    from latent_consistency.evaluation.table import EvalSet

    prompts = DataItems(args.prompts, resolution)  # shards opened once: their skips logged once, not once per pass
    items = read_items(args.prompts, resolution, args.samples, prompts)
    if not items:
        raise UserError(f"--prompts {args.prompts} holds no prompts")
    images = len(items) * args.images_per_prompt  # each row's generated images, and the real images FID compares them to
    reference = read_reference(args.reference or args.prompts, resolution, max(images, MIN_IMAGES), captioned=args.reference is None,
                               items=None if args.reference else prompts)
    found = sum(1 for _ in itertools.islice(reference, MIN_IMAGES))  # the first two: all of them are read when the rows are scored
    if found < MIN_IMAGES and args.reference is None:
        raise UserError(f"--prompts {args.prompts} holds {found} real images, and FID needs real images (at least "
                        f"{MIN_IMAGES}): give --reference DATA (an image folder, shards or world:NAME)")
    if found < MIN_IMAGES:
        raise UserError(f"--reference {args.reference} holds {found} usable image(s); FID needs at least {MIN_IMAGES} real "
                        "images (an image folder, shards or world:NAME)")
    if images < MIN_IMAGES:
        raise UserError(f"FID needs at least 2 generated images, and {len(items)} prompt(s) of --prompts {args.prompts} × "
                        f"--images-per-prompt {args.images_per_prompt} make {images}: give more prompts (--samples) or --images-per-prompt 2")
    if args.seed + images - 1 > MAX_SEED:  # the last image's seed may be 2^63 - 1, as `lcm generate`'s
        raise UserError(f"--seed {args.seed} is too large: image i starts from seed SEED+i, which must stay below 2^63")
    attributes = [it["attributes"] for it in items] if all("attributes" in it for it in items) else None
    return EvalSet([it["caption"] for it in items], attributes, reference, args.images_per_prompt, args.seed)


def scorers_for(args, device, resolution: int = 64):
    from latent_consistency.evaluation.table import ClipScorer, FeatureScorer, JudgeScorer, model_identity

    scorers = []
    if args.prompts.startswith("world:"):
        from latent_consistency.world.artifact import default_world_path, load_world
        from latent_consistency.world.judge import prompt_alignment

        world = load_world(args.world or default_world_path(), device)
        dataset = args.prompts.split(":")[1]
        if dataset not in world.judges:
            raise UserError(f"the world in {world.path} has no judge for {dataset}; it has {', '.join(world.judges)}")
        scorers.append(JudgeScorer(world.judges[dataset], prompt_alignment, source=model_identity(str(world.path))))
    if args.clip:
        from latent_consistency.evaluation.clip import ClipModel

        scorers.append(ClipScorer(ClipModel.load(args.clip, device), source=model_identity(args.clip)))
    if args.inception:
        from latent_consistency.evaluation.inception import InceptionFeatures

        scorers.append(FeatureScorer("inception", InceptionFeatures.load(args.inception, device, resolution), unit_kid_features=False,
                                     source=model_identity(args.inception)))
    if not scorers:
        raise UserError("no metric to compute: pass --clip MODEL (CLIP score, FID in CLIP features), --inception FILE, "
                        "or prompts of the built-in world (world:NAME) for its judge")
    return scorers


class EvaluationOption(argparse.Action):
    """An option of the evaluation itself, stored and remembered as given (`args.evaluation_options`): given before `sweep`,
    which reads only its own, it would do nothing, or (--out, --world, --samples, ...) be replaced by sweep's default."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        namespace.evaluation_options = [*getattr(namespace, "evaluation_options", []), option_string]


class RepeatedEvaluationOption(EvaluationOption):
    """An `EvaluationOption` given once per value (--style-lora A --style-lora B), its values kept in order as argparse's
    "append" keeps them."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, [*(getattr(namespace, self.dest) or []), values], option_string)


def run(args) -> None:
    """The evaluation or the sweep holding --out's lock (`folder_lock.hold`): a second one continuing the same folder at
    once would write its results over the first's (each keeps the rows it read before the other wrote)."""
    given = getattr(args, "evaluation_options", [])
    if args.evaluate_command == "sweep" and given:
        raise UserError(f"{given[0]} is an option of `lcm evaluate` itself, given before `sweep`, which does not read it: give "
                        "sweep's own options after `sweep` (see lcm evaluate sweep --help)")
    with hold(args.out):
        return run_sweep(args) if args.evaluate_command == "sweep" else run_evaluation(args)


def run_evaluation(args) -> None:
    from latent_consistency.devices import resolve_device
    from latent_consistency.evaluation.table import (
        OtherEvaluation,
        model_identity,
        run_table,
        table_rows,
        teacher_start_notes,
        write_grid,
        write_plots,
        write_report,
    )
    from latent_consistency.models import add_style_loras, fuse_loras, guidance_record_of, load_diffusion_model
    from latent_consistency.outputs import writable_folder

    for name in ("lcm", "prompts", "out"):
        if not getattr(args, name):
            raise UserError(f"--{name} is required (or `lcm evaluate sweep --runs ...`)")
    if args.guidance_scales and args.guidance_scale is not None:
        raise UserError("give --guidance-scale G or --guidance-scales G1,G2,..., not both")
    if args.world and not args.prompts.startswith("world:"):
        raise UserError(f"--world {args.world} gives the judge of world:NAME prompts, and --prompts {args.prompts} are none: leave "
                        "--world out (or give --prompts world:NAME)")
    check_out(args.out)
    styles = [parse_style_lora(text) for text in args.style_lora]
    device = resolve_device(args.device)
    keep_freed_memory(device)
    lcm = load_evaluated_lcm(args, device)
    lcm = add_style_loras(lcm, styles, device=device)  # the LCM's rows only: the teacher's are the teacher's
    lcm = fuse_loras(lcm)  # sampled only, as `LCMGenerator.load` fuses them: an unfused LoRA costs a third more per UNet call
    for n in args.steps:  # the step counts the LCM has, before the other models load and --out is made
        lcm.timesteps(n)
    teacher = load_diffusion_model(args.teacher, device=device) if args.teacher else None
    if teacher is not None and teacher.is_lcm:
        raise UserError(f"--teacher {args.teacher} is an LCM; give the diffusion model it was distilled from (its rows are "
                        "sampled with ODE solvers)")
    if teacher is not None and teacher.distilled_steps:  # its rows run DDIM and DPM-Solver at every --steps, --exact in jumps of k
        raise UserError(f"--teacher {args.teacher} was progressively distilled for {teacher.distilled_steps} DDIM steps on its own grid, "
                        "where the teacher rows sample at the LCM's step counts: give it with --guided-distill (its row is at "
                        f"{teacher.distilled_steps} steps), and the stage-one or CFG teacher as --teacher")
    guided = guided_distill_models(args.guided_distill or [], device)
    if args.exact and teacher is None:
        raise UserError("--exact needs --teacher and an LCM (its skipping step k and timesteps): the exact LCM is "
                        "the teacher's ODE solution on them")
    if args.exact and teacher.schedule.num_train_timesteps != lcm.schedule.num_train_timesteps:
        raise UserError(f"--exact: the teacher {args.teacher} has {teacher.schedule.num_train_timesteps} training timesteps and the LCM "
                        f"{lcm.schedule.num_train_timesteps}; give the teacher the LCM was distilled from (the exact LCM runs it on the "
                        "LCM's timesteps)")
    given = args.guidance_scales or ([args.guidance_scale] if args.guidance_scale is not None else None)
    record = lcm.guidance_record  # the g the LCM's run recorded (`guidance_record`) is the default
    kind = lcm_kind(lcm)  # without --guidance-scale(s) or a record, `lcm generate`'s g
    preferred = DEFAULT_GUIDANCE_SCALE[kind] if record is None else record.guidance_scale
    scales = given or [preferred]
    if not given and kind == "lora" and teacher is not None:
        # a PixArt-LCM's run records the one g distilled into it (guidance.json): the teacher's comparable rows are at that g
        distilled = guidance_record_of(args.lcm) if not args.lora else None
        teacher_g = 7.5 if distilled is None else distilled.guidance_scale
        print(f"lcm evaluate: note: the default g = {scales[0]:g} (no classifier-free guidance, as `lcm generate` samples an LCM without "
              f"an ω input) applies to the teacher's rows too; give --guidance-scales 1,{teacher_g:g} to score the teacher guided as well",
              file=sys.stderr)
    omega_teacher = teacher is not None and teacher.time_cond_proj_dim is not None  # a guidance-distilled teacher
    if min(scales) < 1 and (lcm.time_cond_proj_dim is not None or guided or omega_teacher):
        raise UserError(f"guidance scale {min(scales):.15g} is below 1: an ω input (ω = g - 1) is trained on ω >= 0")
    others = guidance_records(args, teacher if omega_teacher else None, guided)
    range_notes = guidance_notes(({f"--lcm {args.lcm}": record} if record else {}) | others, scales, bool(given))
    range_notes += teacher_start_notes(teacher, args.steps)
    for note in range_notes + ([] if given else own_scales_hint(others, preferred)):
        print(f"lcm evaluate: note: {note}", file=sys.stderr)
    resolution = lcm.native_size
    eval_set = load_eval_set(args, resolution)
    scorers = scorers_for(args, device, resolution)
    out = writable_folder(args.out, "--out")
    note_truncated_prompts("evaluate", lcm, eval_set.prompts)  # after every check: a refused evaluation says one line
    # The seed's note as `lcm generate` says it: a seed taken, as diffusers takes it
    for note in (few_prompts_note(args, eval_set), repeated_seed_note(args.seed, len(eval_set.all_prompts))):
        if note:
            print(f"lcm evaluate: note: {note}", file=sys.stderr)
    # A stage-one model samples at every step count; a progressive round at the one it was distilled for
    guided_steps = sorted(set(args.steps if 0 in guided else []) | {n for n in guided if n})
    rows = table_rows(args.steps, scales, teacher is not None, guided_distill_steps=guided_steps, exact=args.exact)
    steps = sorted(set(args.steps) | set(guided_steps))
    identities = ((f"LoRA {model_identity(args.lora)}",) if args.lora else ()) + style_identities(styles)
    settings = evaluation_settings(args, lcm, teacher, guided, styles, eval_set, scorers)
    told = []  # how many saved rows were reused: said last, under what the rerun wrote
    try:
        results = run_table(rows, lcm, teacher, eval_set, scorers, out, device, guided=guided, identities=identities,
                            keep_other_results=True, settings=settings, batch=args.batch_size,
                            lcm_parts={key: settings[key] for key in ("lora", "style_loras")}, tell=told.append)
    except OtherEvaluation as other:
        raise UserError(other_evaluation(args.out, other.settings, other.current or settings)) from None
    models = (f"LCM `{args.lcm}`" + (f" with LoRA `{args.lora}`" if args.lora else "") + style_note(styles, teacher is not None or bool(guided))
              + (f", teacher `{args.teacher}`" if teacher else ""))
    notes = [f"{models}. {len(eval_set.prompts)} prompts of `{args.prompts}` × {eval_set.images_per_prompt} image(s), reference "
             f"{len(eval_set.reference)} images of `{args.reference or args.prompts}` at {resolution} px (resized and centre-cropped "
             f"to it), seeds from {args.seed}. Metrics: {', '.join(s.name for s in scorers)}; KID and every number in `results.json`."]
    notes += [paragraph for note in (guided_distill_note(guided, args.steps), lineage_note(guided), *range_notes) if note
              for paragraph in ("", note)]
    print(write_report(results, steps, out, "Evaluation", notes))
    for stale in () if len(scales) > 1 else ("guidance.png", "guidance_grid.png"):  # an earlier run's, of scales not in this report
        (out / stale).unlink(missing_ok=True)
    write_plots(results, out)
    figure_scale = grid_guidance_scale(scales, preferred)
    write_grid([r for r in rows if r.guidance_scale == figure_scale], lcm, teacher, eval_set, out, device, args.grid_columns,
               guided=guided, lcm_label=style_label(styles), batch=args.batch_size)
    if len(scales) > 1:  # Figures 4-5's grid: the LCM at its step count nearest 4, one row per ω, the same noise
        n = min(args.steps, key=lambda s: (abs(s - 4), s))
        write_grid([r for r in rows if r.sampler == "lcm" and r.steps == n], lcm, teacher, eval_set, out, device, args.grid_columns,
                   name="guidance_grid.png", lcm_label=style_label(styles), batch=args.batch_size)
    print(f"report, results.json, plots and grid(s) in {out}")
    for line in told:  # a rerun: the rows taken from results.json, not sampled again
        print(line)
    for note in (earlier_rows_note(out, results), small_reference_note(eval_set)):
        if note:
            print(f"lcm evaluate: note: {note}", file=sys.stderr)


def small_reference_note(eval_set) -> str | None:
    """A reference of fewer usable images than a row generates (a small folder, or corrupt files skipped): FID and KID
    then compare sets of unequal size, and FID's bias grows as either shrinks. After the rows, whose fingerprint has read
    the reference once and counted it."""
    real, generated = len(eval_set.reference), len(eval_set.all_prompts)
    if not real or real >= generated:
        return None
    return (f"the reference holds {real} usable image(s), fewer than the {generated} each row generates: FID and KID compare sets "
            "of unequal size (FID's bias grows as a set shrinks; the paper compares 30,000 with 30,000)")


def earlier_rows_note(out: Path, results: dict) -> str | None:
    """A rerun into a folder whose results.json holds rows this run did not ask for (other step counts or scales of the
    same evaluation, or another model's: a teacher left out): the report and figures are this run's rows; results.json
    keeps them all."""
    from latent_consistency.evaluation.table import RESULTS_FILE

    earlier = len(json.loads((out / RESULTS_FILE).read_text())["rows"]) - len(results)
    if earlier <= 0:
        return None
    return (f"report.md and the figures show the {len(results)} rows this command asked for; {out / RESULTS_FILE} also keeps "
            f"{earlier} row(s) of earlier runs here (other --steps, scales or models): give them again to report every row")


def load_evaluated_lcm(args, device):
    """The LCM (or LCM-LoRA) --lcm names. A diffusion model given there is told what `lcm evaluate` does with it: a teacher
    scores the baseline rows (--teacher); a guidance-distilled one (ω input, no LCMScheduler) a Guided-Distill row
    (--guided-distill), or, a stage-one model, the baseline rows too. The latter is told by its configs, before its
    weights load: `load_lcm` would tell it to `lcm generate --sampler ddim` the model, which is no option here."""
    from latent_consistency.models import PROGRESSIVE_FILE, NotAnLCM, load_lcm, load_lcm_lora

    if not args.lora and is_guidance_distilled(args.lcm):
        teacher = "" if (Path(args.lcm) / PROGRESSIVE_FILE).is_file() else f", or the teacher of the baseline rows with --teacher {args.lcm}"
        raise UserError(f"--lcm {args.lcm} is a guidance-distilled diffusion model (ω input, no LCMScheduler), not an LCM: score it as "
                        f"a Guided-Distill row with --guided-distill {args.lcm}{teacher}, beside an LCM as --lcm")
    try:
        return load_lcm_lora(args.lcm, args.lora, device=device, lora_flag="--lora") if args.lora else load_lcm(args.lcm, device=device)
    except NotAnLCM as err:  # a teacher given as --lcm: its rows are the baselines
        raise UserError(f"{err}; to score it as the teacher of the baseline rows, give it as --teacher beside an LCM as --lcm") from None


def is_guidance_distilled(path: str) -> bool:
    """Whether the model `path` is a guidance-distilled diffusion model, by its configs alone (`models.model_json`): a UNet
    with an ω input (`time_cond_proj_dim`) and a scheduler that is no LCMScheduler (`is_lcm_config`)."""
    from latent_consistency.models import is_lcm_config, model_json

    unet, scheduler = model_json(path, "unet/config.json"), model_json(path, "scheduler/scheduler_config.json")
    return unet is not None and scheduler is not None and unet.get("time_cond_proj_dim") is not None and not is_lcm_config(scheduler)


def guidance_records(args, omega_teacher, guided: dict) -> dict:
    """{the option and path that name a model: its guidance record} of each model beside the LCM with an ω input and a
    record (`guidance_record`): a guidance-distilled --teacher (`omega_teacher`, else None) and each --guided-distill
    model. An ω input extrapolates outside the range it was distilled on, whichever row samples it."""
    from latent_consistency.models import guidance_record_of

    records = {}
    if omega_teacher is not None:
        records[f"--teacher {args.teacher}"] = guidance_record_of(args.teacher)
    for steps in sorted(guided):
        records[f"--guided-distill {guided[steps].source}"] = guidance_record_of(guided[steps].source)
    return {name: record for name, record in records.items() if record is not None}


def guidance_notes(records: dict, scales: list[float], given: bool) -> list[str]:
    """What `lcm generate` notes of each model (`GuidanceRecord.notes`) at each evaluated g, said of the model by the option
    that names it (`guidance_records`): in an evaluation "this model" is one of several."""
    return list(dict.fromkeys(f"{name}: {note}" for name, record in records.items() for g in scales for note in record.notes(g, given)))


def own_scales_hint(records: dict, preferred: float) -> list[str]:
    """Where the default g (`preferred`, the LCM's) lies outside the range of another model's record (`guidance_records`):
    every row stays at that one g, so that the rows compare (Table 1 compares its methods at one g); this says how to also
    score that model at its own default."""
    outside = {name: record.guidance_scale for name, record in records.items()
               if not record.guidance_scale_min <= preferred <= record.guidance_scale_max}
    if not outside:
        return []
    scales = ",".join(f"{g:g}" for g in dict.fromkeys([preferred, *outside.values()]))
    return [f"every row is at g = {preferred:g}, the LCM's default, so that the rows compare; give --guidance-scales {scales} to also "
            f"score {' and '.join(outside)} at the g {'their records give' if len(outside) > 1 else 'its record gives'}"]


def guided_distill_note(guided: dict, steps: list[int]) -> str | None:
    """The report's words for the Guided-Distill row: each model and the step counts it samples (a progressive round its
    own; a stage-one model every other one of --steps), so that the row's columns can be traced to their models."""
    if not guided:
        return None
    parts = []
    for n, model in sorted(guided.items()):
        own = [n] if n else [m for m in steps if m not in guided]
        counts = f"{', '.join(map(str, own))} step{'s' if own != [1] else ''}" if own else "no row: a round takes each step count"
        parts.append(f"`{model.source}` ({'a progressive round' if n else 'stage one'}: {counts})")
    return f"Guided-Distill (DDIM): {', '.join(parts)}."


def lineage_note(guided: dict) -> str | None:
    """A note where the Guided-Distill models trace back (`distilled_from`) to different classifier-free-guided teachers: their
    row is then no one chain of Meng et al.'s distillation (stage one, then its rounds). A note, not a refusal: each column
    still measures its own model, and the trace reads run folders, which may have been moved or edited."""
    origins = {model.source: distilled_from(model.source) for _, model in sorted(guided.items())}
    known = {source: origin for source, origin in origins.items() if origin is not None}
    if len({identity for _, identity in known.values()}) < 2:
        return None
    froms = "; ".join(f"`{source}` from `{teacher}`" for source, (teacher, _) in known.items())
    return (f"The Guided-Distill models come from different teachers ({froms}, as their run folders record): their row is "
            "no one distillation's, so read its columns as separate models'.")


def distilled_from(path: str) -> tuple[str, str] | None:
    """The teacher with classifier-free guidance whose Guided-Distill chain the model at `path` ends (stage one, then
    progressive rounds, each exported by its run): (its path as the stage-one run's config.json names it, its identity as
    that run's sources.json recorded it), the far end of `sources.teacher_line`. None where the line cannot be read to its
    end: a model without its run folder, an older run, a teacher distilled again since."""
    from latent_consistency.training.sources import teacher_line

    line = teacher_line(path)
    return line[-1] if line else None


def few_prompts_note(args, eval_set) -> str | None:
    """A note where --prompts holds fewer prompts than --samples asks for: each row samples those there are, not --samples ×
    --images-per-prompt images. None where --samples was not given: its default (1000) is a cap, not a request."""
    count, per_prompt = len(eval_set.prompts), eval_set.images_per_prompt
    if "--samples" not in getattr(args, "evaluation_options", []) or count >= args.samples:
        return None
    images = f", {count * per_prompt} images a row at --images-per-prompt {per_prompt}" if per_prompt > 1 else ""
    return f"--prompts {args.prompts} holds {count} prompt(s), fewer than --samples {args.samples}: the evaluation uses those {count}{images}"


# The option that picks each metric's network, by `Scorer.name`
METRIC_OPTIONS = {"clip": "--clip", "inception": "--inception", "judge": "--world"}


def evaluation_settings(args, lcm, teacher, guided: dict, styles: list[tuple[str, float]], eval_set, scorers) -> dict:
    """What results.json records beside its fingerprint (`run_table`'s `settings`): each part the fingerprint digests
    (`EvalSet.fingerprint`) but the reference images' pixels, and the models the rows are sampled with (under
    `table.MODEL_KEYS`' names, as each row records its own: `row_models`), readable, so that a rerun refused as another
    evaluation is told which setting it changed (`setting_difference`). Models by `model_identity` and data by absolute path
    (`spec_identity`): a setting spelled another way is the same setting."""
    from latent_consistency.evaluation.table import model_identity

    return {"lcm": model_identity(lcm.source), "lora": model_identity(args.lora) if args.lora else None,
            "style_loras": [[model_identity(path), weight] for path, weight in styles],
            "teacher": None if teacher is None else model_identity(teacher.source),
            "guided_distill": [model_identity(model.source) for model in guided.values()],
            "prompts": spec_identity(args.prompts), "samples": args.samples, "prompt_count": len(eval_set.prompts),
            "prompt_digest": hashlib.sha256(json.dumps(eval_set.prompts).encode()).hexdigest()[:16],
            "images_per_prompt": eval_set.images_per_prompt, "seed": eval_set.seed,
            "reference": spec_identity(args.reference) if args.reference else None,
            "metrics": {scorer.name: scorer.source for scorer in scorers}}


def spec_identity(spec: str) -> str:
    """A data spec as the same data however it is spelled: an existing path made absolute; world:NAME as it is."""
    path = Path(spec).expanduser()
    return path.resolve().as_posix() if path.exists() else spec


def model_path(identity: str) -> str:
    """The path (or hub id and commit) of a `model_identity`, less the digest of its files."""
    return identity.rpartition(" ")[0] or identity


def said_difference(option: str, old: list, new: list, show=str) -> str | None:
    """`option`'s values in this evaluation (`new`) against those --out's was made with (`old`), in words, each value as
    `show` writes it; None where they are the same. Values shown alike but not the same are a model's files changed."""
    if old == new:
        return None
    was, now = " ".join(map(show, old)), " ".join(map(show, new))
    if was == now:
        return f"{option} {now}: its files changed since this folder was made"
    if not now:
        return f"no {option} (this folder was made with {option} {was})"
    return f"{option} {now} (this folder was made {f'with {was}' if was else f'without {option}'})"


def optional(value) -> list:
    return [] if value is None else [value]


def prompts_difference(old: dict, new: dict) -> str | None:
    """The prompts' setting that differs, where the prompts do (a copy of the file elsewhere is the same prompts): --prompts;
    else --samples where it changed how many are used (not where the file held fewer than either); else the file was edited."""
    if old["prompt_count"] == new["prompt_count"] and old["prompt_digest"] == new["prompt_digest"]:
        return None
    if old["prompts"] != new["prompts"]:
        return said_difference("--prompts", [old["prompts"]], [new["prompts"]])
    if old["samples"] != new["samples"] and old["prompt_count"] != new["prompt_count"]:
        return said_difference("--samples", [old["samples"]], [new["samples"]])
    return f"the prompts of --prompts {new['prompts']} changed since this folder was made"


def metrics_difference(old: dict, new: dict) -> str | None:
    """The first metric whose network differs, given or left out (`METRIC_OPTIONS`)."""
    for name in dict.fromkeys([*METRIC_OPTIONS, *old["metrics"], *new["metrics"]]):
        said = said_difference(METRIC_OPTIONS.get(name, f"the {name} metric"), optional(old["metrics"].get(name)),
                               optional(new["metrics"].get(name)), model_path)
        if said:
            return said
    return None


# `setting_difference`'s checks in order, each (the options it reads, the record's keys, the check): a change of models
# before one of data, and --prompts before --samples before the reference images, which depend on them
SETTING_CHECKS = (
    ("--lcm", ("lcm",), lambda old, new: said_difference("--lcm", [old["lcm"]], [new["lcm"]], model_path)),
    ("--lora", ("lora",), lambda old, new: said_difference("--lora", optional(old["lora"]), optional(new["lora"]), model_path)),
    ("--style-lora", ("style_loras",), lambda old, new: said_difference("--style-lora", old["style_loras"], new["style_loras"],
                                                                       lambda lora: f"{model_path(lora[0])}:{lora[1]}")),
    ("--teacher", ("teacher",), lambda old, new: said_difference("--teacher", optional(old["teacher"]), optional(new["teacher"]), model_path)),
    ("--guided-distill", ("guided_distill",), lambda old, new: said_difference("--guided-distill", old["guided_distill"],
                                                                               new["guided_distill"], model_path)),
    ("--prompts and --samples", ("prompts", "samples", "prompt_count", "prompt_digest"), prompts_difference),
    ("--images-per-prompt", ("images_per_prompt",),
     lambda old, new: said_difference("--images-per-prompt", [old["images_per_prompt"]], [new["images_per_prompt"]])),
    ("--seed", ("seed",), lambda old, new: said_difference("--seed", [old["seed"]], [new["seed"]])),
    ("--reference", ("reference",), lambda old, new: said_difference("--reference", optional(old["reference"]), optional(new["reference"]))),
    ("metrics", ("metrics",), metrics_difference),
)


def setting_difference(old: dict, new: dict) -> str:
    """The first setting (`SETTING_CHECKS`) in which this evaluation (`new`: `evaluation_settings`) differs from the one
    whose results --out holds (`old`: their record), in words: "--samples 200 (this folder was made with 100)". A setting
    the record lacks (an earlier version's) is said to be unknown, not claimed to differ; where every one is the same, what
    is left of the fingerprint is the reference images' pixels."""
    for options, keys, difference in SETTING_CHECKS:
        if any(key not in old for key in keys):
            return f"this folder's record, from an earlier version of lcm evaluate, does not say which {options} it was made with"
        said = difference(old, new)
        if said:
            return said
    spec = f"--reference {new['reference']}" if new["reference"] else f"--prompts {new['prompts']}"
    return f"the reference images ({spec}) changed since this folder was made"


def other_evaluation(out: str, saved: dict | None, settings: dict) -> str:
    """The line refusing an --out that holds another evaluation's results: which setting differs (`setting_difference`,
    from the `saved` record of them), or, where its results.json records none (an earlier version's), that it cannot say."""
    from latent_consistency.evaluation.table import RESULTS_FILE

    try:
        which = None if saved is None else setting_difference(saved, settings)
    except (TypeError, AttributeError):  # a record edited by hand into other types: not one to read settings from
        which = None
    which = which or (f"other models or LoRAs, prompts, seed, reference images or metrics (its {RESULTS_FILE}, written by an "
                      "earlier version of lcm evaluate, does not record which)")
    return (f"--out {out} holds the results of another evaluation: {which}; choose another --out, rerun with the settings it was "
            "made with, or move them away to start over")


def style_identities(styles: list[tuple[str, float]]) -> tuple[str, ...]:
    """The style LoRAs (`parse_style_lora`'s (path, weight) each) as format 3's fingerprint digested them (`run_table`'s
    `identities`, to take up a results.json of that format): which file (`model_identity`) at which weight, in order. None
    given: nothing, and that fingerprint is the one it had before --style-lora was."""
    from latent_consistency.evaluation.table import model_identity

    return tuple(f"style LoRA {model_identity(path)} at weight {weight!r}" for path, weight in styles)


def style_note(styles: list[tuple[str, float]], other_rows: bool) -> str:
    """The report's words for the style LoRAs and weights on the LCM, and (`other_rows`: teacher or Guided-Distill rows
    beside it) that they are on the LCM's rows only."""
    if not styles:
        return ""
    loras = ", ".join(f"`{path}` at weight {weight:g}" for path, weight in styles)
    return f" and style LoRA{'s' if len(styles) > 1 else ''} {loras}" + (" (on the LCM's rows only)" if other_rows else "")


def style_label(styles: list[tuple[str, float]]) -> str:
    """The LCM's rows' label in the grids: "LCM", with each style LoRA by name and weight ("LCM + papercut at 0.8"), so that a
    grid read without the report does not show styled images as the plain LCM's. A LoRA folder's weights file
    (`pytorch_lora_weights.safetensors`) is named by its folder."""
    from latent_consistency.models import LORA_WEIGHTS_FILE

    names = []
    for path, weight in styles:
        file = Path(path)
        name = file.parent.name if file.name == LORA_WEIGHTS_FILE else file.stem if file.suffix == ".safetensors" else file.name
        names.append(f" + {name} at {weight:g}")
    return "LCM" + "".join(names)


def grid_guidance_scale(scales: list[float], preferred: float) -> float:
    """The scale Figure 2's grid (`grid.png`) is drawn at: of the evaluated scales, the one the LCM samples at by default
    (`preferred`: its record's g, else `lcm generate`'s), or the nearest to it (the larger on a tie), so that a sweep such
    as 1,1.5,2 does not show an unguided teacher because 1 came first."""
    return min(scales, key=lambda g: (abs(g - preferred), -g))


def guided_distill_models(paths: list[str], device) -> dict[int, object]:
    """Guided-Distill models by the DDIM step count they were progressively distilled for (0: a stage-one model, for
    every step count)."""
    from latent_consistency.models import load_diffusion_model

    models = {}
    for path in paths:
        model = load_diffusion_model(path, device=device)
        if model.time_cond_proj_dim is None or model.is_lcm:
            raise UserError(f"{path} is not a Guided-Distill model (a diffusion model with an ω input: `lcm distill --method guidance` "
                            "or `--method progressive`)")
        steps = model.distilled_steps or 0
        if steps in models:
            raise UserError(f"two --guided-distill models sample in {steps or 'any number of'} steps ({path} and "
                            f"{models[steps].source}); give one per step count")
        models[steps] = model
    return models


# What `lcm evaluate sweep` writes into its --out, sweep.json first
SWEEP_FILES = ("sweep.json", "sweep.md", "sweep.png")


def is_sweep(path: Path) -> bool:
    """Whether `path` is a sweep.json of ours: an object of run names, each a list of checkpoint rows (objects)."""
    try:
        curves = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(curves, dict) and all(isinstance(rows, list) and all(isinstance(r, dict) for r in rows) for rows in curves.values())


def check_sweep_out(out: str) -> None:
    """An --out may be new, or hold an earlier sweep's results, which a rerun replaces (sweeping again as checkpoints
    appear is how a sweep is resumed: each run keeps its scores in its own folder). Files of a sweep's names that are not
    an earlier sweep's (no sweep.json of ours beside them) are a UserError, before any run is scored."""
    folder = Path(out)
    taken = [name for name in SWEEP_FILES if (folder / name).exists() or (folder / name).is_symlink()] if folder.is_dir() else []
    if taken and not ((folder / "sweep.json").is_file() and not (folder / "sweep.json").is_symlink() and is_sweep(folder / "sweep.json")):
        raise UserError(f"--out {out} holds a {taken[0]} that is not an earlier sweep's; choose another --out, or move it away")


def run_sweep(args) -> None:
    """Each run's checkpoints scored on the world (`world.over_training`), then their FID curves on one plot."""
    from latent_consistency.devices import resolve_device
    from latent_consistency.evaluation.fid import check_image_count
    from latent_consistency.outputs import check_writable, writable_folder, write_json_atomic
    from latent_consistency.world.artifact import default_world_path, load_world
    from latent_consistency.world.over_training import (
        check_run,
        evaluate_run,
        holding_scores,
        run_guidance_scale,
        run_names,
        world_timesteps,
        write_report,
        write_sweep,
    )

    names = run_names(args.runs)  # as given: a symbolic link's own name
    check_sweep_out(args.out)
    check_writable(args.out, "--out")  # made only when the sweep is written: a refused sweep leaves no folder
    check_image_count(args.samples, "--samples", "per checkpoint")
    world_path = args.world or default_world_path()
    steps = tuple(args.steps)
    timesteps = world_timesteps(world_path)
    scales, loras = {}, []
    for name, run_dir in zip(names, map(Path, args.runs)):  # every run, before the world loads and the first one is scored
        config = check_run(run_dir, steps, args.guidance_scale, timesteps, Path(world_path))
        scales[name] = run_guidance_scale(config) if args.guidance_scale is None else args.guidance_scale
        if config.adapter != "full":
            loras.append(name)
    with contextlib.ExitStack() as held:  # every run's scores, before the world loads: another sweep of one is refused at once
        for run_dir in map(Path, args.runs):
            held.enter_context(holding_scores(run_dir))
        device = resolve_device(args.device)
        keep_freed_memory(device)
        world = load_world(world_path, device)
        curves = {}
        for name, run_dir in zip(names, map(Path, args.runs)):
            rows = evaluate_run(run_dir, world, args.samples, scales[name], device, steps, ode=args.ode_error, tell=print)
            write_report(run_dir, rows, steps)
            curves[name] = rows
    out = writable_folder(args.out, "--out")
    write_json_atomic(out / "sweep.json", curves)
    settings = (f"Checkpoints (θ⁻) sampled for the first {args.samples} reference prompts of the world `{world_path}`, the same noise "
                "for every checkpoint, each run at the g in its row; FID in the world judge's features (lower is better).")
    if loras:  # an LCM-LoRA has no ω input: g cannot change its images
        settings += (f" {', '.join(loras)}: LoRA student(s) without an ω input, whose images carry the guidance distilled into them; "
                     "their g is that of the teacher's ODE reference only.")
    print(write_sweep(curves, out, steps, scales, settings))


def register(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="Table 1 and Figures 2, 4, 5 of an LCM against its teacher's samplers; `sweep`: Figure 3",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    option = functools.partial(p.add_argument, action=EvaluationOption)  # one of the evaluation's own, which `sweep` refuses
    option("--lcm", type=source, help="the LCM: a diffusers folder or hub id (with --lora: the model the LCM-LoRA belongs to)")
    option("--lora", type=source, help="an LCM-LoRA on --lcm")
    option("--style-lora", action=RepeatedEvaluationOption, default=[], metavar="FILE[:WEIGHT]",
           help=f"{STYLE_LORA_HELP}. Applied to the LCM's rows only (the teacher's, Guided-Distill's and the exact LCM's sample "
                "their models as they are) and part of what a rerun must match to continue")
    option("--teacher", type=source, help="the teacher: its DDIM, DPM-Solver and DPM-Solver++ rows with classifier-free guidance")
    option("--guided-distill", nargs="+", help="Guided-Distill models (`lcm distill --method progressive` rounds, each at its "
           "step count; or a stage-one model, at every step count), sampled with DDIM")
    option("--exact", nargs=0, const=True, default=False, help="also the exact LCM of --teacher at every step count and scale: Algorithm 3 "
           "with the teacher's ODE solution (DDIM jumps of the LCM's k down to 0) as the consistency function, what a "
           "perfect student would score; costs about T/k teacher CFG passes per step")
    option("--prompts", help="prompts: world:NAME[:SPLIT], an image folder or shards with captions, or a text file of any name but "
           "a shard's or an image's (one prompt per line; blank lines and lines starting with # skipped)")
    option("--reference", help="real images for FID: an image folder (subfolders included, no captions needed, each image once), "
           "shards or world:NAME (default: the images of --prompts)")
    option("--out", help="folder for report.md, results.json, steps.png, grid.png and (several scales) guidance.png and guidance_grid.png; "
           "a rerun continues the evaluation there, another evaluation's results are refused, not overwritten")
    option("--steps", type=number_list(positive_int), default=[1, 2, 4, 8], help="step counts (default 1,2,4,8)")
    option("--guidance-scale", type=guidance_scale, help="guidance scale g, diffusers' (default: the g the LCM's distillation "
           f"recorded in guidance.json, else {DEFAULT_GUIDANCE_SCALE['lcm']:g}, the paper's ω = 7; for an LCM without an ω input, "
           f"an LCM-LoRA, {DEFAULT_GUIDANCE_SCALE['lora']:g}, as `lcm generate`)")
    option("--guidance-scales", type=number_list(guidance_scale), help="several guidance scales (Figures 4-5), instead of --guidance-scale; "
           "grid.png is drawn at the LCM's own g (its record's, else lcm generate's) or the listed scale nearest it")
    option("--samples", type=positive_int, default=1000, help="prompts (default 1000)")
    option("--images-per-prompt", type=positive_int, default=1, help="images per prompt (default 1)")
    option("--world", help="world folder whose judge scores world:NAME prompts (default: the shipped one)")
    option("--clip", help="a CLIP model folder or hub id: CLIP score and FID in CLIP features")
    option("--inception", help="the TorchScript FID Inception file (inception-2015-12-05.pt): Inception FID")
    option("--seed", type=nonnegative_int, default=0, help="image i starts from seed SEED+i (default 0)")
    option("--grid-columns", type=positive_int, default=8, help="prompts in the Figure-2 grid (default 8)")
    option("--device", default="auto", help="auto, cpu, cuda or mps")
    option("--batch-size", type=positive_int, help="images sampled and scored at once (default: at most 16 images' pixels of "
           "512 x 512, at most 250: 16 at 512 px, 4 at 1024 px, 250 at the world's 32 px); lower it where the device runs out of "
           "memory. Not part of what a rerun must match: image i's noise is its own whatever the batch")
    commands = p.add_subparsers(dest="evaluate_command", metavar="sweep")
    s = commands.add_parser("sweep", help="FID over training of several runs on one plot (Figure 3)")
    s.add_argument("--runs", nargs="+", required=True, help="distillation run folders with checkpoints")
    s.add_argument("--out", required=True, help="folder for sweep.png, sweep.md and sweep.json; an earlier "
                   "sweep's there are replaced (sweep again to add new checkpoints), other files of those names refused")
    s.add_argument("--world", help="the world the runs distilled (default: the shipped one)")
    s.add_argument("--samples", type=positive_int, default=500, help="reference prompts per checkpoint (default 500)")
    s.add_argument("--guidance-scale", type=guidance_scale, help="default: each run's LCM's default g (its validation guidance "
                   "scale, moved into the run's guidance range)")
    s.add_argument("--steps", type=number_list(positive_int), default=[1, 2, 4], help="sampler step counts scored (default 1,2,4; Figure 3: 4)")
    s.add_argument("--ode-error", action=argparse.BooleanOptionalAction, default=True,
                   help="also the MSE to the teacher's ODE solution and the ω response per t (default on); their references "
                        "cost T/k teacher jumps per timestep, 1,000 at k = 1")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.set_defaults(run=run)
