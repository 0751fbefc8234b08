"""`lcm generate`: prompts -> PNG files with a latent consistency model (Algorithm 3): a full LCM (its guidance
scale is the ω input), or a diffusion model with an LCM-LoRA (`--lora`; no ω input, so g > 1 is classifier-free
guidance, as in diffusers). `--style-lora FILE[:W]` (repeatable) adds style LoRAs beside it at weights W, as diffusers'
`set_adapters` mixes adapters (`models.add_style_loras`).

`--gamma G` samples with TCD's strategic stochastic sampling instead (Zheng et al. 2024; diffusers' TCDScheduler with
eta = G); without it Algorithm 3 is exactly LCMScheduler's. `--init-image FILE --strength S` is img2img: the image is
encoded, noised to the strength's start timestep with each image's seeded noise, and sampled from there.
`--negative-prompt TEXT [--negative-scale λ]` guides the images away from TEXT (`LCMGenerator.consistency_function`).
`--preview-decoder DIR_OR_HUB_ID` decodes with a tiny approximate decoder (`latent_consistency.preview`).

Each PNG records its prompt, its seed (SEED+i) and the settings that decide its pixels, as JSON in a text chunk
(`RECORD_KEY`), with a digest of the weights each path held: `lcm generate PROMPT --seed SEED` with them makes the same
image alone or in any batch (in float32; to rounding in bfloat16, with --compile or on another device).

Every input is checked before the first file is written.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import unicodedata
import warnings
from pathlib import Path

import torch

from latent_consistency.allocator import keep_freed_memory
from latent_consistency.cli.arguments import finite_float, nonnegative_int, positive_int, source
from latent_consistency.devices import DTYPES, resolve_device, resolve_dtype
from latent_consistency.errors import UserError
from latent_consistency.folder_lock import hold
from latent_consistency.grids import save_png, to_pil
from latent_consistency.hub import looks_like_hub_id
from latent_consistency.models import DEFAULT_ORIGINAL_INFERENCE_STEPS, NotAnLCM
from latent_consistency.outputs import writable_folder
from latent_consistency.pipelines import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_NEGATIVE_SCALE,
    DEFAULT_SEED,
    DEFAULT_STEPS,
    DEFAULT_STRENGTH,
    MAX_SEED,
    LCMGenerator,
    RepeatedSeedWarning,
    SolverGenerator,
    UnguidedScaleWarning,
    repeated_seed_note,
)
from latent_consistency.progress import progress_bar
from latent_consistency.prompts import check_prompt, read_prompt_file, truncated_prompts
from latent_consistency.sampling import TEACHER_SAMPLERS, check_tcd_steps, check_teacher_steps, solver_start_note


def read_prompts(prompts: list[str], prompt_file: str | None) -> list[str]:
    """Prompts from the command line, then from a file ('-': standard input; one per line, blank and # comment lines
    ignored: `read_prompt_file`).

    A blank prompt on the command line is refused, named: dropping it would number the images after it as if it had not
    been given, and a lone one (`lcm generate "$PROMPT"` with the variable unset) was given, not missing."""
    blank = [i for i, p in enumerate(prompts, start=1) if not p.strip()]
    if blank:
        others = len(blank) < len(prompts) or prompt_file is not None
        raise UserError(f"prompt {blank[0]} is blank; give text for every prompt" + (", or leave the blank one out" if others else ""))
    prompts = [check_prompt(p, f"prompt {i}") for i, p in enumerate(prompts, start=1)]
    if prompt_file is not None:
        if not prompt_file.strip():
            raise UserError("--prompt-file is empty; give a text file with one prompt per line (a prompt itself goes in --prompt)")
        prompts += read_prompt_file(prompt_file)
    if not prompts:
        raise UserError("no prompts given; pass prompts as arguments, --prompt TEXT or --prompt-file FILE")
    return prompts


def image_filename(index: int, prompt: str) -> str:
    """Image `index`'s file name: its number, then the prompt's words (`_prompt_slug`), not ending in "-" where the cut
    lands after one ("0000-a-red-star.png", "0001-ein-hund-über-der-brücke.png", "0002-猫が座っている.png")."""
    return f"{index:04d}-{_prompt_slug(prompt).rstrip('-') or 'image'}.png"


def earlier_image_filenames(index: int, prompt: str) -> list[str]:
    """The names earlier versions gave image `index` where they differ from `image_filename`, which `output_files` still
    finds as this image (a --skip-existing rerun keeps it, not a second copy of a new name): the prompt's ASCII letters
    and digits alone ("0000-ein-hund-ber-der-br-cke.png", "0000-image.png"), and before that with the "-" a cut fell
    after (`earlier_image_filename`)."""
    names = [f"{index:04d}-{_ascii_slug(prompt).rstrip('-') or 'image'}.png", earlier_image_filename(index, prompt)]
    return [name for name in dict.fromkeys(names) if name != image_filename(index, prompt)]


def earlier_image_filename(index: int, prompt: str) -> str:
    """The name the first versions gave image `index`: ASCII letters and digits, the cut prompt as it fell, a "-" after it
    included ("0000-aaa-.png")."""
    return f"{index:04d}-{_ascii_slug(prompt) or 'image'}.png"


# A prompt's part of a file name: at most this many characters, and this many bytes of UTF-8 (3 a CJK character), so that
# the whole name ("0000-" and ".png" around it) stays far below the 255 bytes most file systems allow a name, and below
# the 143 of an encrypted home folder (eCryptfs)
SLUG_CHARACTERS = 60
SLUG_BYTES = 120


def _prompt_slug(prompt: str) -> str:
    """The prompt's words in lower case, joined by "-": NFKC-normalised (full-width letters and ligatures as their plain
    forms, one spelling of "ü" however it was typed), letters and digits of any script kept with their combining marks
    (the vowel signs of Devanagari), and each run of anything else, a character a file system forbids (/ \\ : * ? " < > |,
    control characters) or whitespace included, one "-". Cut to SLUG_CHARACTERS characters and SLUG_BYTES bytes, at a
    character's end. An ASCII prompt's is `_ascii_slug`'s, byte for byte: its images keep their names."""
    text = unicodedata.normalize("NFKC", prompt).lower()
    kept = "".join(c if c.isalnum() or unicodedata.category(c).startswith("M") else "-" for c in text)
    slug = re.sub("-+", "-", kept).strip("-")[:SLUG_CHARACTERS]
    return slug.encode()[:SLUG_BYTES].decode("utf-8", "ignore")


def _ascii_slug(prompt: str) -> str:
    """The earlier versions' part of a file name: the prompt's ASCII letters and digits in lower case, each run of anything
    else a "-", cut to 60 characters."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:SLUG_CHARACTERS]


# --out names a folder; a name with one of these suffixes was meant as one image file
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def output_files(out: str, prompts: list[str], skip_existing: bool = False) -> tuple[list[Path], set[int]]:
    """Image i's file in folder `out`, and the images already there, checked before the model loads: a name that looks
    like an image file is a UserError, and so are files of these names already in the folder (an earlier run's images),
    unless `skip_existing` keeps them (a killed run resumed: its PNGs are whole, `save_png` writes atomically).
    Nothing is overwritten."""
    if not out.strip():
        raise UserError("--out is empty; give the folder the PNG files go in, e.g. --out images/")
    folder = Path(out)
    if folder.suffix.lower() in IMAGE_SUFFIXES and not folder.is_dir():
        raise UserError(f"--out {out} looks like an image file name; --out is the folder the PNG files go in, e.g. --out images/")
    listed = _listing(folder) if folder.is_dir() else set()
    found = [_found(folder, listed, i, p) for i, p in enumerate(prompts)]
    files = [folder / name for name, _ in found]
    taken = [i for i, (_, there) in enumerate(found) if there]
    if skip_existing:
        odd = [files[i].name for i in taken if not files[i].is_file()]
        if odd:
            raise UserError(f"--out {out} holds {odd[0]}, which is not an image file; move it away")
        return files, set(taken)
    if taken:
        more = f" and {len(taken) - 1} more of this run's file names" if len(taken) > 1 else ""
        raise UserError(f"--out {out} already holds {files[taken[0]].name}{more}; choose another folder, move the earlier images "
                        "away, or give --skip-existing to keep them and make only the missing ones")
    return files, set()


def _listing(folder: Path) -> set[str]:
    """The names in `folder` as `_there` matches them (`_name_key`): listed once, then only the names it holds checked, not
    two stats per prompt (a prompt file of 50,000 lines over a network disk)."""
    try:
        return {_name_key(name) for name in os.listdir(folder)}
    except OSError as err:
        raise UserError(f"cannot list --out {folder} ({err.strerror}); make it readable") from None


def _there(folder: Path, listed: set[str], name: str) -> bool:
    """Whether `folder` (its names `listed`) holds a file of `name`, a link included. Names are matched as `_name_key`s and
    then checked on the disk."""
    return _name_key(name) in listed and ((folder / name).exists() or (folder / name).is_symlink())


def _name_key(name: str) -> str:
    """`name` case-folded and composed (NFC): a case-insensitive disk (macOS, Windows) finds 0001-CAT.PNG for 0001-cat.png,
    and macOS's HFS+ lists the "ü" of 0000-über.png decomposed (NFD), a name `image_filename` writes composed."""
    return unicodedata.normalize("NFC", name.casefold())


def _found(folder: Path, listed: set[str], index: int, prompt: str) -> tuple[str, bool]:
    """Image `index`'s name in `folder` and whether the folder holds it: `image_filename`, or, where only that one is there,
    a name an earlier version gave it (`earlier_image_filenames`), so that a rerun finds the image it wrote."""
    name = image_filename(index, prompt)
    if _there(folder, listed, name):
        return name, True
    earlier = next((e for e in earlier_image_filenames(index, prompt) if _there(folder, listed, e)), None)
    return (earlier, True) if earlier is not None else (name, False)


def parse_timesteps(text: str | None) -> list[int] | None:
    if text is None:
        return None
    if not text.strip():
        raise UserError("--timesteps is empty; give comma-separated timesteps, e.g. 999,759,499,259, or use --steps")
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise UserError(f"--timesteps {text!r} must be comma-separated integers, e.g. 999,759,499,259") from None


# The largest --negative-scale, as the HTTP API's (`serve.request`): λ = 0.5 already over-guides.
MAX_NEGATIVE_SCALE = 30.0


def read_init_image(path: str, height: int | None, width: int | None, factor: int):
    """The init image as a [1, 3, H, W] tensor in [-1, 1] and its (height, width): resized to --height/--width where
    given (a missing one keeps the image's own), else at its own size, which must be a multiple of the VAE factor.
    Decoded as training images are (`data.images.open_rgb8`: EXIF orientation, 16-bit depth, alpha on white)."""
    import numpy as np
    import torch
    from PIL import Image

    from latent_consistency.data.images import UndecodableImage, open_rgb8

    file = Path(path)
    if not file.exists():
        raise UserError(f"init image {path} does not exist")
    if file.is_dir():
        raise UserError(f"init image {path} is a folder; give an image file (PNG, JPEG, ...)")
    try:
        image, _ = open_rgb8(file)
    except UndecodableImage as err:
        raise UserError(f"cannot read init image {path}: {err}") from None
    for name, given, own in (("height", height, image.height), ("width", width, image.width)):
        if given is None and own % factor:
            raise UserError(f"init image {path} is {image.width}x{image.height} px: its {name} {own} is not a multiple of the VAE "
                            f"factor {factor}; pass --height and --width to resize it")
    size = (width or image.width, height or image.height)
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)[None]
    return pixels / 127.5 - 1, size[1], size[0]


# The PNG text chunk in which `lcm generate` records what made each image: its prompt, its seed (SEED+i) and every setting
# that decides its pixels, as JSON. `lcm generate PROMPT --seed SEED` with those settings makes the image again, and
# `--skip-existing` keeps an image only when its record is the one this run would write.
RECORD_KEY = "lcm-generate"
# Settings naming a file or folder: the same one given by another spelling (relative, absolute) is the same setting
PATH_SETTINGS = ("model", "lora", "preview_decoder")


def parse_style_lora(text: str) -> tuple[str, float]:
    """--style-lora FILE[:WEIGHT] as (FILE, WEIGHT), weight 1 without one. Text that names an existing file or folder is that
    LoRA whole, at weight 1 (a file named `s.safetensors:0.5`); so is text whose last colon is followed by a path, not a
    weight (Windows' `C:\\loras\\s.safetensors`). FILE may be a hub id (org/name[@rev]:WEIGHT)."""
    if not text.strip():
        raise UserError("--style-lora is empty; give a LoRA file, folder or hub id, with :WEIGHT to scale it, e.g. --style-lora style.safetensors:0.8")
    path, colon, weight = text.rpartition(":")
    if Path(text).exists() or not colon or "/" in weight or "\\" in weight:
        return text, 1.0
    if not path.strip():  # Path("") is the working directory, which was taken for the LoRA folder
        raise UserError(f"--style-lora {text}: no LoRA before the colon; give FILE:WEIGHT, e.g. style.safetensors{text}")
    try:
        value = float(weight)
    except ValueError:
        if Path(path).exists():
            raise UserError(f"--style-lora {text}: {weight!r} after the colon is not a weight; give FILE:WEIGHT, e.g. {path}:0.8") from None
        return text, 1.0  # no weight: a missing path is said as such when the LoRA loads
    if not math.isfinite(value):
        raise UserError(f"--style-lora {text}: the weight must be a finite number (1: as trained, 0: off)")
    return path, value


# --style-lora's help, in `lcm generate` and `lcm serve`
STYLE_LORA_HELP = ("a style LoRA (a .safetensors file, folder or hub id) added beside the LCM-LoRA, or onto a full LCM, scaled by WEIGHT "
                   "(default 1; repeatable), as diffusers' set_adapters mixes LoRAs: e.g. --lora LCM_LORA --style-lora "
                   "papercut.safetensors:0.8. diffusers', kohya's/A1111's and PEFT's LoRA formats load")


def recorded_path(name: str | None) -> str | None:
    """A file, folder or hub id as an image's record holds it: a local path made absolute, so that the record remakes the
    image from any folder; a hub id (`hub.looks_like_hub_id`) as given."""
    return name if name is None or looks_like_hub_id(name) else os.path.abspath(name)


def _file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_settings(args, generator, timesteps, guidance_scale: float, height: int, width: int, options: dict) -> dict:
    """Every setting of this run that decides an image's pixels, beside its prompt and seed (`image_record`); its files
    and folders as absolute paths (`recorded_path`)."""
    settings = {"model": recorded_path(args.model), "lora": recorded_path(args.lora), "sampler": args.sampler}
    if args.style_lora:  # recorded only when given: the records of images made without keep their settings
        settings["style_loras"] = [[recorded_path(path), weight] for path, weight in map(parse_style_lora, args.style_lora)]
    if args.sampler == "lcm":
        settings["timesteps"] = [int(t) for t in timesteps]
    else:
        settings["steps"] = int(timesteps)
    settings |= {"guidance_scale": float(guidance_scale), "height": int(height), "width": int(width), "dtype": args.dtype,
                 "preview_decoder": recorded_path(args.preview_decoder)}
    if "gamma" in options:
        settings["gamma"] = float(options["gamma"])
    if "negative_prompts" in options:
        scale = options.get("negative_scale")
        if scale is None and generator.kind == "lcm":
            scale = DEFAULT_NEGATIVE_SCALE
        settings |= {"negative_prompt": options["negative_prompts"][0], "negative_scale": None if scale is None else float(scale)}
    if "init_images" in options:
        settings |= {"init_image": recorded_path(args.init_image), "init_image_sha256": _file_digest(args.init_image),
                     "strength": float(options["strength"])}
    settings["weights"] = weights_digests(args)
    return settings


def weights_digests(args) -> dict:
    """{setting: digest} of the weights the run's paths name (`training.sources.model_digest`: file names, sizes and
    sampled bytes; a hub id's commit): a model saved again at its path (a resumed `lcm distill` exporting anew) is other
    weights under the same name, whose images `--skip-existing` kept as this run's (the record held the path alone)."""
    from latent_consistency.training.sources import model_digest

    digests = {name: model_digest(value) for name in PATH_SETTINGS if (value := getattr(args, name))}
    if args.style_lora:
        digests["style_loras"] = [model_digest(path) for path, _ in map(parse_style_lora, args.style_lora)]
    return digests


def image_record(prompt: str, seed: int, settings: dict) -> dict:
    return {"prompt": prompt, "seed": int(seed)} | settings


def read_record(path: Path) -> dict | None:
    """The record `lcm generate` wrote in an image, None if it has none (or is not a PNG). `save_png` writes it before the
    pixels, where opening the file finds it (`info`) without decoding them: `--skip-existing` reads one per kept image,
    tens of thousands for an FID set. Pillow's `text`, which decodes the whole image for chunks after the pixels, is
    read only for a PNG with no record before them (a record moved there by another tool)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            text = image.info.get(RECORD_KEY)
            if text is None:
                text = getattr(image, "text", {}).get(RECORD_KEY)
        record = None if text is None else json.loads(text)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _same(key: str, old, new) -> bool:
    if key == "style_loras" and isinstance(old, list) and isinstance(new, list):  # [[path, weight], ...]
        return len(old) == len(new) and all(isinstance(o, list) and len(o) == 2 and _same("lora", o[0], n[0]) and o[1] == n[1]
                                            for o, n in zip(old, new))
    if key in PATH_SETTINGS and isinstance(old, str) and isinstance(new, str) and old != new:
        return os.path.abspath(old) == os.path.abspath(new)
    if key == "weights" and old is None:  # an image of an earlier version, which recorded paths alone: kept as before
        return True
    return key == "init_image" or old == new  # an init image is compared by its contents (init_image_sha256)


def check_kept(files: list[Path], kept: set[int], records: list[dict]) -> None:
    """`--skip-existing` keeps an image only when it was made with this run's prompt, seed and settings (its record): one
    of another seed, step count, guidance scale, model, ... would be kept beside this run's images, and nothing would
    tell them apart."""
    for i in sorted(kept):
        old = read_record(files[i])
        if old is None:
            raise UserError(f"--skip-existing: {files[i]} holds no record of the prompt, seed and settings it was made with (lcm "
                            "generate writes one in each image), so it cannot be kept as this run's; move it away, or choose "
                            "another --out folder")
        for key in dict.fromkeys([*records[i], *old]):
            if key == "weights" and not _same(key, old.get(key), records[i].get(key)):
                changed = ", ".join(name for name in dict.fromkeys([*old[key], *records[i][key]])
                                    if old[key].get(name) != records[i][key].get(name))
                raise UserError(f"--skip-existing: {files[i]} was made with other weights under the same name ({changed}: saved "
                                "again since, e.g. a resumed lcm distill exporting anew); move the old images away, or choose "
                                "another --out folder")
            if not _same(key, old.get(key), records[i].get(key)):
                raise UserError(f"--skip-existing: {files[i]} was made with {key} {old.get(key)!r}, this run's image {i} takes "
                                f"{records[i].get(key)!r}; resume with the settings of the run that made it, or choose another "
                                "--out folder")


def truncated_prompt_note(model, prompts: list[str], files: list[Path]) -> str | None:
    """A note for the prompts longer than `model`'s text encoder reads (their end is dropped, as diffusers drops it), naming
    the first by its image file: the files are numbered from 0, and a prompt numbered apart from them was read as the next
    image's."""
    long = truncated_prompts(model.prompts, prompts)
    if not long:
        return None
    i, count, limit = long[0]
    more = f" (so is that of {len(long) - 1} more prompt(s))" if len(long) > 1 else ""
    return (f"the prompt of {files[i].name} is {count} tokens, more than the {limit} the text encoder reads: its end is "
            f"dropped{more}; shorten it to use all of it")


def print_notes(args, generator, prompts: list[str], files: list[Path], guidance_scale: float, steps: int,
                custom: list[int] | None) -> None:
    """What a user should know about this run's settings, a `note:` line each on stderr. Printed once every input has passed
    its checks: a user's mistake is the one line of its error, not notes about a run that does not happen."""
    notes = [truncated_prompt_note(generator.model, prompts, files)]
    notes += generator.guidance_notes(guidance_scale, given=args.guidance_scale is not None)
    unguided = generator.unguided_note(guidance_scale, "--guidance-scale")
    notes.append(unguided and f"{unguided}, which its record says (--skip-existing takes it as made at 1)")
    distilled = generator.model.distilled_steps if args.sampler != "lcm" else None
    if distilled and (steps != distilled or args.sampler != "ddim"):
        notes.append(f"{args.model} was progressively distilled for {distilled} DDIM steps on its own grid; {steps} {args.sampler} "
                     f"steps follow no teacher's ODE (give --sampler ddim --steps {distilled})")
    if args.negative_prompt is not None:
        notes += [f"--negative-prompt is {count} tokens, more than the {limit} the text encoder reads: its end is dropped; shorten it "
                  "to use all of it" for _, count, limit in truncated_prompts(generator.model.prompts, [args.negative_prompt])]
    notes += [repeated_seed_note(args.seed, len(prompts)),
              solver_start_note(generator.model, args.sampler, steps) if args.sampler != "lcm" else None]
    top = int(generator.model.timesteps(1)[0]) if custom else None  # as diffusers' LCMScheduler warns for custom timesteps below T - 1
    if custom and args.init_image is None and custom[0] < top:
        notes.append(f"--timesteps start at {custom[0]}, not {top}: text to image starts from pure noise, which the model reads as a "
                     f"latent at timestep {custom[0]}, so the images keep that noise; start at {top} (img2img: --init-image)")
    notes.append(off_grid_note(generator.model, custom) if custom else None)
    for note in filter(None, notes):
        print(f"lcm generate: note: {note}", file=sys.stderr)


def off_grid_note(model, custom: list[int]) -> str | None:
    """A note for custom timesteps off the LCM's skipping-step grid {k-1, 2k-1, ..., N·k-1} (Eq. 16-17: the t_n it was distilled
    at, N = its scheduler's original_inference_steps): its consistency function was never trained there, and diffusers'
    LCMScheduler warns of them."""
    grid = model.timesteps(int(model.scheduler_config.get("original_inference_steps", DEFAULT_ORIGINAL_INFERENCE_STEPS))).tolist()
    off = [t for t in custom if t not in grid]
    if not off:
        return None
    return (f"--timesteps {','.join(map(str, off))} are off this LCM's distillation grid ({grid[-1]} to {grid[0]} in steps of "
            f"{model.skip}: the timesteps it was trained at), so it may make worse images there, as diffusers' LCMScheduler warns; "
            "give timesteps of the grid (--steps N picks N of them)")


def load_lcm_generator(args, device, dtype, styles) -> LCMGenerator:
    """The LCM (or LCM-LoRA) --model names; a teacher given without --sampler is also sampled as it is by an ODE solver,
    which the error adds to `load_lcm`'s hints."""
    try:
        return LCMGenerator.load(args.model, device, dtype, args.lora, styles, lora_flag="--lora")
    except NotAnLCM as err:
        raise UserError(f"{err}; or sample it as it is with an ODE solver and classifier-free guidance: --sampler dpm++ "
                        "(e.g. --steps 25)") from None


def run(args) -> None:
    """`generate` holding --out's lock (`folder_lock.hold`): a second command writing the folder at once would overwrite
    its images, which the checks before the first write had found free. A seed past 2^32, and a g below 1 on a model
    without an ω input, are said in a note (`print_notes`), not again as the library's warning."""
    with hold(args.out), warnings.catch_warnings():
        warnings.simplefilter("ignore", RepeatedSeedWarning)
        warnings.simplefilter("ignore", UnguidedScaleWarning)
        generate(args)


def generate(args) -> None:
    prompts = read_prompts(args.prompts + args.prompt, args.prompt_file)
    files, kept = output_files(args.out, prompts, args.skip_existing)
    custom = parse_timesteps(args.timesteps)
    if custom and args.steps is not None:
        raise UserError(f"--timesteps sets the steps ({len(custom)} of them); give --steps or --timesteps, not both")
    steps = DEFAULT_STEPS if args.steps is None else args.steps
    if args.gamma is not None and not 0 <= args.gamma <= 1:
        raise UserError(f"--gamma {args.gamma:g} is outside [0, 1]: 0 is deterministic, 1 re-injects fresh noise at every step")
    if args.strength is not None and args.init_image is None:
        raise UserError("--strength applies to img2img: give --init-image FILE")
    if args.sampler != "lcm" and custom:  # before the model loads (`SolverGenerator.timesteps` says it for a Python call)
        raise UserError("--timesteps applies to LCMs; an ODE solver takes --steps")
    if args.sampler != "lcm" and (args.gamma is not None or args.init_image is not None):
        raise UserError(f"--gamma and --init-image apply to --sampler lcm, not {args.sampler}")
    if args.gamma is not None:
        check_tcd_steps(len(custom) if custom else steps, "--gamma", "--steps 2 or more (or 2 --timesteps)")
    if args.negative_scale is not None and args.negative_prompt is None:
        raise UserError("--negative-scale applies to a negative prompt: give --negative-prompt TEXT")
    if args.negative_prompt is not None:
        check_prompt(args.negative_prompt, "--negative-prompt")
    if args.negative_scale is not None and args.negative_scale < 0:
        raise UserError(f"--negative-scale {args.negative_scale:.15g} is below 0: it is λ in f + λ·(f - f_negative), 0 turns it off")
    if args.negative_scale is not None and args.negative_scale > MAX_NEGATIVE_SCALE:
        raise UserError(f"--negative-scale {args.negative_scale:.15g} is above {MAX_NEGATIVE_SCALE:g}: it is λ in f + λ·(f - f_negative), "
                        "and 0.5 already over-guides")
    if args.sampler != "lcm" and args.negative_prompt is not None:
        raise UserError(f"--negative-prompt applies to --sampler lcm, not {args.sampler}")
    if args.init_image is not None and custom and args.strength is not None:
        raise UserError("--timesteps already sets where img2img starts (its first timestep); give --strength or --timesteps, not both")
    if args.seed + len(prompts) - 1 > MAX_SEED:  # the last image's seed may be 2^63 - 1, as the API's and the server's
        raise UserError(f"--seed {args.seed} is too large: image i uses seed SEED+i, which must stay below 2^63 "
                        f"(at most {MAX_SEED - len(prompts) + 1} for {len(prompts)} image(s))")
    device = resolve_device(args.device)
    keep_freed_memory(device)
    dtype = resolve_dtype(args.dtype, device)
    styles = [parse_style_lora(text) for text in args.style_lora]
    if args.sampler == "lcm":
        generator = load_lcm_generator(args, device, dtype, styles)
    elif args.lora or styles:
        raise UserError("--lora is an LCM-LoRA and --style-lora goes beside an LCM: sample them with --sampler lcm")
    else:
        generator = SolverGenerator.load(args.model, device, dtype, args.sampler, sampler_flag="--sampler")
    if args.guidance_scale is not None:  # said of what is sampled, before any compile
        generator.check_guidance_scale(args.guidance_scale, "--guidance-scale")
    if args.preview_decoder is not None:
        generator.use_preview_decoder(args.preview_decoder)
    if args.compile:
        generator.compile()
    guidance_scale = generator.default_guidance_scale() if args.guidance_scale is None else args.guidance_scale
    if args.steps is None and not custom:
        steps = generator.default_steps()  # a progressive round samples in the steps it was distilled for
    options = {}
    if args.gamma is not None:
        options["gamma"] = args.gamma
    if args.negative_prompt is not None:
        options |= {"negative_prompts": [args.negative_prompt], "negative_scale": args.negative_scale}
        generator.consistency_function(guidance_scale, 1, [args.negative_prompt], args.negative_scale)  # checked before a file is written
    if args.init_image is None:
        timesteps = generator.timesteps(steps, custom)
        height = args.height or generator.default_size()
        width = args.width or generator.default_size()
    else:
        strength = 1.0 if custom else DEFAULT_STRENGTH if args.strength is None else args.strength
        timesteps = generator.timesteps(steps, custom, strength=strength)
        default = generator.default_size()  # --height/--width checked before the init image is resized to them
        generator.check_size(args.height or default, args.width or default)
        init_image, height, width = read_init_image(args.init_image, args.height, args.width, generator.model.codec.downsampling_factor)
        options |= {"init_images": init_image, "strength": strength}
        try:  # a side --height/--width did not set is the image's own: an error names the image, not the flag
            generator.check_size(height, width, flag="its ")
        except UserError as err:
            raise UserError(f"init image {args.init_image} is {width}x{height} px: {err}; pass --height and --width to resize it") from None
    generator.check_size(height, width)
    if args.sampler != "lcm":  # before a file is written: a step count whose timesteps are not distinct is refused
        check_teacher_steps(args.sampler, generator.model.scheduler_config, timesteps)
    # the g sampling applies: a g below 1 on a model without an ω input is sampled (and recorded) as 1 (`unguided_note`)
    settings = run_settings(args, generator, timesteps, generator.applied_guidance_scale(guidance_scale), height, width, options)
    records = [image_record(prompts[i], args.seed + i, settings) for i in range(len(prompts))]
    check_kept(files, kept, records)
    out = writable_folder(args.out)
    print_notes(args, generator, prompts, files, guidance_scale, steps, custom)

    todo = [i for i in range(len(prompts)) if i not in kept]
    batches = [todo[i:i + args.batch_size] for i in range(0, len(todo), args.batch_size)]
    written = 0
    for batch in progress_bar(batches, desc="generate", unit="batch", disable=len(batches) < 2):
        images = generator([prompts[i] for i in batch], timesteps, guidance_scale, [args.seed + i for i in batch], height, width, **options)
        finite = torch.isfinite(images.float()).flatten(1).all(dim=1).tolist()
        kept_images = iter(to_pil(images[[j for j, ok in enumerate(finite) if ok]]))  # to_pil refuses NaN: the rest are written
        for i, ok in zip(batch, finite):
            if ok:
                save_png(next(kept_images), files[i], {RECORD_KEY: json.dumps(records[i], ensure_ascii=False)})
                written += 1
        if not all(finite):
            bad = [i for i, ok in zip(batch, finite) if not ok]
            more = f" (and {len(bad) - 1} more of its batch)" if len(bad) > 1 else ""
            why = "" if args.dtype == "float32" else f", or {args.dtype} overflowed: try --dtype float32"
            raise UserError(f"image {files[bad[0]].name}{more} came out NaN or infinite, so it was not written ({written} image(s) "
                            f"were); {args.model}'s weights may hold NaN or inf (a diverged run){why}; --skip-existing keeps the "
                            "images written")
    print(f"wrote {len(todo)} image(s) to {out}" + (f", kept the {len(kept)} already there" if kept else ""))


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate images from prompts with a latent consistency model",
        description="Generate PNG images from text prompts with a latent consistency model in 1-8 steps "
        "(multistep consistency sampling, Algorithm 3 of Luo et al. 2023): a full LCM, or a diffusion model with an LCM-LoRA.",
    )
    p.add_argument("prompts", nargs="*", help="prompts, one image each")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="a prompt (repeatable; added after PROMPTS), as diffusers' prompt=")
    p.add_argument("--prompt-file", help="text file with one prompt per line, or - for standard input (added after PROMPTS); "
                   "blank lines and lines starting with # are skipped")
    p.add_argument("--model", required=True, type=source, help="LCM as a diffusers LatentConsistencyModelPipeline folder or hub id; "
                   "with --lora, the diffusion model the LoRA was distilled from")
    p.add_argument("--lora", type=source, help="an LCM-LoRA to load onto --model: the lora/ folder of `lcm distill --adapter lora`, "
                   "a .safetensors file or a hub id")
    p.add_argument("--style-lora", action="append", default=[], metavar="FILE[:WEIGHT]", help=STYLE_LORA_HELP)
    p.add_argument("--sampler", default="lcm", choices=["lcm", *TEACHER_SAMPLERS],
                   help="lcm: Algorithm 3 (an LCM or LCM-LoRA); ddim, dpm, dpm++: an ODE solver for a diffusion model, with CFG, or "
                   "for a guidance-distilled model (`lcm distill --method guidance`) its ω input (default lcm)")
    p.add_argument("--steps", type=int, help=f"number of sampling steps: 1..T/k for an LCM, 1..T for an ODE solver (fewer where its timestep "
                   f"spacing would repeat a timestep: at most 998 for DPM-Solver under SD's config) (default {DEFAULT_STEPS})")
    p.add_argument("--timesteps", help="custom decreasing timesteps instead of --steps, e.g. 999,759,499,259")
    p.add_argument("--guidance-scale", type=finite_float, help="guidance scale g in diffusers' convention: an LCM's ω input, ω = g - 1 "
                   f"(default: the g its distillation recorded in guidance.json, else {DEFAULT_GUIDANCE_SCALE['lcm']:g}); "
                   "for an LCM-LoRA, classifier-free guidance when g > 1, "
                   f"as diffusers applies it (default {DEFAULT_GUIDANCE_SCALE['lora']:g})")
    p.add_argument("--negative-prompt", help="what the images should not show, for every prompt: an LCM is guided away from it on its "
                   "consistency function, f + λ·(f - f_negative), at twice the network evaluations; an LCM-LoRA puts it in place of the "
                   "empty prompt of classifier-free guidance (needs --guidance-scale > 1), as diffusers' negative_prompt")
    p.add_argument("--negative-scale", type=finite_float, help=f"λ of an LCM's negative prompt (default {DEFAULT_NEGATIVE_SCALE:g}; "
                   f"0 to {MAX_NEGATIVE_SCALE:g}, 0.5 and more over-guide: artefacts, worse FID)")
    p.add_argument("--gamma", type=finite_float, help="sample with TCD's strategic stochastic sampling (Zheng et al. 2024; diffusers' "
                   "TCDScheduler, eta = GAMMA): GAMMA in [0, 1] is the share of fresh noise between steps (so 2 or more of them), 0 "
                   "deterministic; without it, "
                   "Algorithm 3 (LCMScheduler's sampler)")
    p.add_argument("--init-image", type=source, help="img2img: an image file, encoded and noised to the --strength start timestep for every prompt; "
                   "its own size unless --height/--width resize it")
    p.add_argument("--strength", type=finite_float, help=f"img2img: how much noise the init image gets, in (0, 1] (default {DEFAULT_STRENGTH:g}): "
                   "the steps start at the model's grid timestep nearest below STRENGTH x T")
    p.add_argument("--preview-decoder", type=source, help="decode with a tiny TAESD-style decoder (an AutoencoderTiny folder or hub id: "
                   "madebyollin/taesd for SD 1.x/2.x, madebyollin/taesdxl for SDXL, `lcm world preview-decoder` for the world) instead "
                   "of the VAE's: faster, approximate images for previews; img2img still encodes with the VAE")
    p.add_argument("--compile", action="store_true", help="torch.compile the text encoder, network and decoder first: about a minute per batch "
                   "shape on a CPU, then faster batches (worth it for many prompts; with --dtype bfloat16 the weights are frozen "
                   "into the graph, the fast path for large CPU batches)")
    p.add_argument("--seed", type=nonnegative_int, default=DEFAULT_SEED, help=f"image i uses seed SEED+i (default {DEFAULT_SEED})")
    p.add_argument("--height", type=positive_int, help="image height in pixels, a multiple of the VAE factor (default: the model's)")
    p.add_argument("--width", type=positive_int, help="image width in pixels, a multiple of the VAE factor (default: the model's)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per forward pass (default 8)")
    p.add_argument("--out", required=True, help="output folder for the PNG files (created if missing); images of the same names "
                   "already there are refused, not overwritten (see --skip-existing)")
    p.add_argument("--skip-existing", action="store_true", help="keep the images of this run's names already in --out and make only "
                   "the missing ones: resumes a killed run (image i depends only on its prompt, seed SEED+i and the settings, so give "
                   "the same ones: each PNG records them, and one made with others is refused)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights and latents dtype (default float32)")
    p.set_defaults(run=run)
