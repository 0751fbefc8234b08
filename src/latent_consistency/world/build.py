"""Build the built-in world phase by phase (`lcm world build`), and export it in fp16 (`lcm world export`).

A world folder is a diffusers `StableDiffusionPipeline` folder (the teacher; a `StableDiffusionXLPipeline` one, with
text_encoder_2/ and tokenizer_2/, for an SDXL-architecture preset) with the world's extras:

    world.json           the resolved preset and prediction type it was built with
    build_state.json     the phases finished so far, in order, the seconds each took and the type of device it ran on
    model_index.json, unet/, scheduler/, vae/, text_encoder/, tokenizer/     the teacher pipeline
    judge/               the evaluation judge (`world.judge`)
    latents/             the latent cache of the training images (`data.latent_cache`)
    quality/             quality.json and teacher_grid.png (`world.quality`)
    logs/                the loss of every training step, per phase

Phases run in order: tokenizer -> judge -> vae -> text_encoder -> latents -> teacher -> quality. The
teacher comes after the latent cache because it trains from it (the paper's D_z). Each phase writes
into `.work/<phase>/` and its outputs are renamed into the world folder when it is done; only then is
it recorded in `build_state.json`. A rerun skips recorded phases and redoes the first unrecorded one
(a phase's half-written outputs are never trusted), resuming its training from the last checkpoint,
which training phases save every `checkpoint_every` steps (the latent cache: from its last whole shard), on
the device type that checkpoint was trained on only (`_check_resume_device`).

Before any work a rerun checks the recorded phases: one whose outputs are gone (a folder removed) is built again, and
with it every phase after it, since each reads what the phases before it made (`_phases_kept`); one whose outputs do not
load is refused, saying which folder to remove so that it is built again (`_check_phase_outputs`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from latent_consistency.conditioning import TIME_IDS, AddedConditioning
from latent_consistency.data.latent_cache import JOB, MANIFEST, LatentCache, write_latent_cache
from latent_consistency.data.workers import end_quietly_on_sigterm, started
from latent_consistency.devices import given, resolve_device
from latent_consistency.errors import UserError, first_line
from latent_consistency.models import DiffusionModel, LatentCodec, load_component, save_pipeline
from latent_consistency.outputs import move_into_place, partial_folder, permit_as_umask, start_partial, write_json_atomic, write_text_atomic
from latent_consistency.pipelines import MAX_SEED
from latent_consistency.progress import progress_bar
from latent_consistency.prompts import CLIPPromptEncoder, SDXLPromptEncoder
from latent_consistency.world.artifact import WORLD_FILE, load_world, read_world_spec
from latent_consistency.world.datasets import RESOLUTIONS, attribute_names, attribute_values, check_dataset, get_dataset
from latent_consistency.world.fit import Checkpointer, Phase
from latent_consistency.world.judge import attribute_targets, load_judge, save_judge, train_judge
from latent_consistency.world.presets import ARCHITECTURES, WorldPreset, get_preset
from latent_consistency.world.quality import measure_quality
from latent_consistency.world.teacher import make_teacher_unet, teacher_scheduler_config, train_teacher
from latent_consistency.world.text_encoder import NO_LABEL, make_text_encoder, pretrain_text_encoder, second_text_encoder
from latent_consistency.world.tokenizer import train_tokenizer
from latent_consistency.world.vae import make_vae, set_scaling_factor, to_unit_range, train_vae

PHASES = ("tokenizer", "judge", "vae", "text_encoder", "latents", "teacher", "quality")
# What each phase commits into the world folder.
OUTPUTS = {
    "tokenizer": ("tokenizer",),
    "judge": ("judge", "judges"),
    "vae": ("vae", "logs/vae.json"),
    "text_encoder": ("text_encoder", "logs/text_encoder.json"),
    "latents": ("latents",),
    "teacher": ("unet", "scheduler", "model_index.json", "logs/teacher.json"),
    "quality": ("quality",),
}
# An SDXL-architecture world's second text encoder and tokenizer, committed by the text_encoder phase.
SDXL_PARTS = ("text_encoder_2", "tokenizer_2")
STATE_FILE, WORK_DIR = "build_state.json", ".work"
# What a kill leaves of a build that had written nothing yet: the temporary file of its world.json's atomic write
WORLD_LEFTOVERS = frozenset({WORLD_FILE + ".tmp"})
# The settings each phase's outputs depend on beyond the data (dataset, resolution, size, pretraining data, seed) and the
# phases before it: what must be equal for another world's finished phase to stand in for this one's (`parts_from`).
# The text encoder reads the teacher's architecture because an SDXL world pre-trains it on what SDXL's UNet reads.
PHASE_SETTINGS = {
    "tokenizer": ("tokenizer",),
    "judge": ("judge",),
    "vae": ("vae",),
    "text_encoder": ("text_encoder", "teacher.architecture"),
    "latents": (),
    "teacher": ("teacher", "prediction_type"),
    "quality": ("quality",),
}
DATA_SETTINGS = ("dataset", "resolution", "train_size", "pretraining_datasets", "seed")
# What `export_world` ships: the pipeline, the judge, the spec and the quality report (and SDXL_PARTS of an SDXL world).
EXPORTED = ("world.json", "model_index.json", "unet", "scheduler", "vae", "text_encoder", "tokenizer", "judge", "judges", "quality")
PREDICTION_TYPES = ("epsilon", "v_prediction")
# Written first into `export_world`'s OUT.partial: an unfinished export that a rerun may replace (another folder of that name
# is refused, not removed)
EXPORT_MARKER = ".lcm-world-export"


# The arguments of `build_world`, `check_world_spec` and `export_world` as `lcm world build` and `lcm world export` name them:
# the commands pass it as `flags`, so that an error names what their user typed; a Python call's errors name its arguments
COMMAND_FLAGS = {"out_dir": "--out", "parts_from": "--parts-from", "device": "--device", "prediction_type": "--v-prediction",
                 "src": "--from", "dst": "--out"}


def _flag(flags: Mapping[str, str] | None, argument: str) -> str:
    """`argument` as the caller names it: its command's flag where `flags` (`COMMAND_FLAGS`) has one, else its own name."""
    return (flags or {}).get(argument, argument)


def phase_outputs(phase: str, preset: WorldPreset) -> tuple[str, ...]:
    """What phase `phase` commits into a world of `preset`."""
    sdxl = phase == "text_encoder" and preset.teacher.architecture == "sdxl"
    return OUTPUTS[phase] + (SDXL_PARTS if sdxl else ())


class _Images(torch.utils.data.Dataset):
    """The training images held as uint8 [N,3,H,W] with their captions and attributes."""

    def __init__(self, images: torch.Tensor, captions: list[str], attributes: list):
        self.images, self.captions, self.attributes = images, captions, attributes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": to_unit_range(self.images[i]), "caption": self.captions[i], "attributes": self.attributes[i]}


def _stack_items(items: list[dict]) -> tuple[torch.Tensor, list[str], list]:
    """A batch of dataset items as (uint8 images [B,3,H,W], captions, attributes): small to pass between processes."""
    images = torch.stack([it["image"] for it in items]).add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    return images, [it["caption"] for it in items], [it["attributes"] for it in items]


def _render(dataset, progress: bool) -> _Images:
    """Render every item of `dataset` once, in worker processes when there are cores to spare."""
    workers = min(15, (os.cpu_count() or 1) - 1)
    # Items depend on (split, seed, index) only; a generator of its own keeps the loader off torch's global one. A stop of
    # the process group ends the workers quietly (`end_quietly_on_sigterm`), and the build in its one line, also while
    # they start (`started`)
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=max(workers, 0), collate_fn=_stack_items,
                                         generator=torch.Generator().manual_seed(0), worker_init_fn=end_quietly_on_sigterm)
    images, captions, attributes = [], [], []
    with progress_bar(started(loader), desc="render images", unit="batch", disable=not progress) as batches:  # closed before a stop's one line
        for batch_images, batch_captions, batch_attributes in batches:
            images.append(batch_images)
            captions += batch_captions
            attributes += batch_attributes
    return _Images(torch.cat(images), captions, attributes)


def check_world_spec(preset: WorldPreset, prediction_type: str, flags: Mapping[str, str] | None = None) -> None:
    """Reject a dataset, resolution or prediction type the world cannot be built with; an error names the prediction type
    as `flags` do (`_flag`)."""
    check_dataset(preset.dataset)
    for name in preset.pretraining_datasets:
        if check_dataset(name) == preset.dataset:
            raise UserError(f"{name} is the world's own dataset; its pretraining datasets must be others")
    if preset.teacher.architecture not in ARCHITECTURES:
        raise UserError(f"unknown teacher architecture {preset.teacher.architecture!r}; use one of {', '.join(ARCHITECTURES)}")
    if preset.teacher.architecture == "sdxl" and preset.text_encoder.hidden_size < TIME_IDS:
        raise UserError(f"an SDXL-architecture world packs its pooled embedding and {TIME_IDS} size numbers into one token row of twice "
                        f"the text encoder's hidden size; make that at least {TIME_IDS}, not {preset.text_encoder.hidden_size}")
    if prediction_type not in PREDICTION_TYPES:
        raise UserError(f"unknown prediction type {prediction_type!r}; use one of {', '.join(PREDICTION_TYPES)}")
    if preset.teacher.zero_terminal_snr and prediction_type == "epsilon":
        flag = _flag(flags, "prediction_type")
        v = flag if flag.startswith("--") else given(flag, "v_prediction")
        raise UserError(f"a zero-terminal-SNR teacher must predict v ({v}): at t = T-1 its input is pure noise, so ε says nothing about the image")
    unet_factor = 2 ** (len(preset.teacher.block_out_channels) - 1)
    if preset.resolution % (preset.vae_factor * unet_factor):
        raise UserError(
            f"resolution {preset.resolution} is not a multiple of {preset.vae_factor * unet_factor} (the VAE's "
            f"{preset.vae_factor}x downsampling times the UNet's {unet_factor}x); use one of {', '.join(map(str, RESOLUTIONS))}"
        )
    if preset.resolution not in RESOLUTIONS:
        raise UserError(f"the world's datasets come at {', '.join(map(str, RESOLUTIONS))} px, not {preset.resolution}")
    if preset.seed * 1000 + len(PHASES) > MAX_SEED:  # `_Build.seed`: each phase's
        raise UserError(f"seed {preset.seed} is too large: phase i seeds its generators with SEED·1000 + i, which must stay below 2^63; "
                        f"use at most {(MAX_SEED - len(PHASES)) // 1000}")


@dataclass
class _Build:
    """One run of `build_world`: the spec, the folder, and the training images (rendered once, lazily)."""

    preset: WorldPreset
    out: Path
    device: torch.device
    prediction_type: str
    progress: bool

    @cached_property
    def images(self) -> _Images:
        p = self.preset
        return _render(get_dataset(p.dataset, "train", p.resolution, seed=p.seed, size=p.train_size), self.progress)

    @cached_property
    def pretraining_images(self) -> dict[str, _Images]:
        """The training split of each pretraining dataset (tokenizer, text encoder and VAE only)."""
        p = self.preset
        return {name: _render(get_dataset(name, "train", p.resolution, seed=p.seed), self.progress) for name in p.pretraining_datasets}

    def all_captions(self) -> list[tuple[str, list[str], list]]:
        """(dataset, captions, attributes) of the main training images, then of each pretraining dataset."""
        parts = {self.preset.dataset: self.images} | self.pretraining_images
        return [(name, images.captions, images.attributes) for name, images in parts.items()]

    def seed(self, phase: str) -> int:
        return self.preset.seed * 1000 + PHASES.index(phase)

    def generator(self, phase: str) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(self.seed(phase))

    def phase(self, name: str) -> Phase:
        """How phase `name` trains: its own generator and resumable checkpoints in `.work/<name>/`."""
        return Phase(self.device, self.generator(name), Checkpointer(self.out / WORK_DIR / name, self.preset.checkpoint_every), self.progress)

    @property
    def sdxl(self) -> bool:
        return self.preset.teacher.architecture == "sdxl"

    def load(self, component: str):
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        if component.startswith("tokenizer"):
            return CLIPTokenizer.from_pretrained(str(self.out / component))
        cls = {"vae": AutoencoderKL, "text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}[component]
        # as `lcm world check` loads it (`load_diffusion_model`): a damaged file is a UserError naming the component
        return load_component(cls, str(self.out), component, use_safetensors=True).to(self.device).eval().requires_grad_(False)

    def prompt_encoder(self) -> CLIPPromptEncoder | SDXLPromptEncoder:
        """c and ∅ as the teacher's pipeline will make them; an SDXL one's ∅ is zeros (`force_zeros_for_empty_prompt`), with
        the world's resolution as its size numbers."""
        first = (self.load("tokenizer"), self.load("text_encoder"))
        if not self.sdxl:
            return CLIPPromptEncoder(*first)
        second = (self.load("tokenizer_2"), self.load("text_encoder_2"))
        size = (self.preset.resolution, self.preset.resolution)
        return SDXLPromptEncoder([first, second], AddedConditioning(second[1].config.projection_dim), size, force_zeros_for_empty_prompt=True)

    # The phases: each writes its OUTPUTS into `stage`.

    def tokenizer(self, stage: Path) -> None:
        cfg = self.preset.tokenizer
        captions = [c for _, dataset_captions, _ in self.all_captions() for c in dataset_captions]
        train_tokenizer(captions, cfg.vocab_size, cfg.max_length).save_pretrained(str(stage / "tokenizer"))

    def judge(self, stage: Path) -> None:
        """The judge of the world's dataset in judge/, and one per pretraining dataset in judges/NAME/."""
        p = self.preset
        for name, folder in [(p.dataset, stage / "judge")] + [(d, stage / "judges" / d) for d in p.pretraining_datasets]:
            save_judge(train_judge(name, p.resolution, p.judge.steps, p.judge.batch_size, self.device, p.seed, self.progress), folder)
        (stage / "judges").mkdir(exist_ok=True)

    def vae(self, stage: Path) -> None:
        cfg = self.preset.vae
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed("vae"))
            vae = make_vae(cfg, self.preset.resolution)
        pretraining = [images.images for images in self.pretraining_images.values()]
        losses = train_vae(vae, self.images.images, cfg, self.phase("vae"), torch.cat(pretraining) if pretraining else None)
        set_scaling_factor(vae, self.images.images[: cfg.scale_samples])
        vae.save_pretrained(str(stage / "vae"), safe_serialization=True)
        write_json_atomic(stage / "logs" / "vae.json", {"loss": losses}, indent=2)

    def text_encoder(self, stage: Path) -> None:
        cfg = self.preset.text_encoder
        tokenizer = self.load("tokenizer")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed("text_encoder"))
            text_encoder = make_text_encoder(tokenizer, cfg)
        captions, labels, num_classes = caption_labels(self.all_captions())
        losses = pretrain_text_encoder(text_encoder, tokenizer, captions, labels, num_classes, cfg, self.phase("text_encoder"),
                                       self.preset.teacher.architecture)
        text_encoder.save_pretrained(str(stage / "text_encoder"), safe_serialization=True)
        if self.sdxl:  # SDXL's second encoder and tokenizer: the same encoder with an identity projection, the same tokenizer
            second_text_encoder(text_encoder).save_pretrained(str(stage / "text_encoder_2"), safe_serialization=True)
            tokenizer.save_pretrained(str(stage / "tokenizer_2"))
        write_json_atomic(stage / "logs" / "text_encoder.json", {"loss": losses}, indent=2)

    def latents(self, stage: Path) -> None:
        """D_z = {E(x)} of the training images. The cache is written in `.work/latents/cache`, whose `cache.partial` a rerun
        keeps (the stage it does not), and its source names the registered dataset the images are ("data", as `lcm cache
        --data world:shapes`): so a stopped one goes on from its last whole shard (`write_latent_cache`). The finished
        manifest's source is then written back as worlds record it (`_record_source`)."""
        p = self.preset
        source = {"dataset": p.dataset, "split": "train", "resolution": p.resolution, "seed": p.seed, "size": p.train_size}
        cache = stage.parent / "cache"
        shutil.rmtree(cache, ignore_errors=True)  # whole but not yet moved when a run stopped: its manifest may name the data
        write_latent_cache(self.images, cache, LatentCodec(self.load("vae")), self.prompt_encoder(),
                           {"data": f"world:{p.dataset}:train"} | source, self.device, progress=self.progress)
        _record_source(cache, source)
        os.replace(cache, stage / "latents")

    def teacher(self, stage: Path) -> None:
        cache = LatentCache(self.out / "latents")
        data = cache.tensors(self.device)
        second = self.load("text_encoder_2") if self.sdxl else None  # its pooled embedding's size is the UNet's to read
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed("teacher"))
            unet = make_teacher_unet(
                self.preset.teacher, cache.manifest["latent_size"][0], cache.manifest["latent_channels"], cache.manifest["text_hidden_size"],
                pooled_dim=second.config.projection_dim if self.sdxl else None,
            )
        scheduler_config = teacher_scheduler_config(self.prediction_type, self.preset.teacher.zero_terminal_snr)
        ema, losses = train_teacher(unet, data.latents, data.caption_index, data.text_embeddings, data.uncond_embedding, scheduler_config,
                                    self.preset.teacher, self.phase("teacher"))
        sdxl = dict(text_encoder_2=second, tokenizer_2=self.load("tokenizer_2"), force_zeros_for_empty_prompt=True) if self.sdxl else {}
        base = DiffusionModel(ema, self.load("vae"), self.load("text_encoder"), self.load("tokenizer"), scheduler_config, source="", **sdxl)
        save_pipeline(stage, ema, base, scheduler_config)
        write_json_atomic(stage / "logs" / "teacher.json", {"loss": losses}, indent=2)

    def quality(self, stage: Path) -> None:
        measure_quality(load_world(self.out, self.device), self.preset.quality, stage / "quality", self.device, self.progress)


def _record_source(cache: Path, source: dict) -> None:
    """The manifest of the finished latent cache `cache` with `source` as its source, written as `write_latent_cache`
    writes it: the data key that lets a stopped cache resume is no part of a world's record, whose cache stays byte for
    byte what an uninterrupted build of an earlier version wrote."""
    manifest = json.loads((cache / MANIFEST).read_text())
    manifest.pop(JOB)  # what a rerun of `lcm cache` compares with its own: no part of a world's record either
    write_text_atomic(cache / MANIFEST, json.dumps(manifest | {"source": source}, indent=2))


def caption_labels(parts: list[tuple[str, list[str], list]]) -> tuple[list[str], torch.Tensor, list[int]]:
    """Captions of several datasets with one head per (dataset, attribute): (captions, labels [N, heads] with
    `NO_LABEL` where a caption's dataset lacks the head's attribute, classes per head)."""
    heads = [(name, a) for name, _, _ in parts for a in attribute_names(name)]
    captions, rows = [], []
    for name, dataset_captions, attributes in parts:
        targets = attribute_targets(name, attributes)
        rows.append(torch.stack([targets[a] if d == name else torch.full((len(attributes),), NO_LABEL) for d, a in heads], dim=1))
        captions += dataset_captions
    return captions, torch.cat(rows), [len(attribute_values(d, a)) for d, a in heads]


def world_spec(preset: WorldPreset, prediction_type: str) -> dict:
    """What `world.json` holds, as JSON reads it back (lists, not tuples)."""
    return json.loads(json.dumps({"preset": preset.to_dict(), "prediction_type": prediction_type}))


def _check_out_dir(out: Path, spec: dict, flag: str = "out_dir") -> None:
    """The folder must be new, empty (but for a half-written world.json, `WORLD_LEFTOVERS`), or a world (finished or not)
    built with this very spec; an error names it as `flag` (`devices.given`)."""
    named = given(flag, str(out))
    if out.exists() and not out.is_dir():
        raise UserError(f"{named} is a file; give a folder for the world")
    if not out.exists() or {path.name for path in out.iterdir()} <= WORLD_LEFTOVERS:
        return  # new, empty, or killed as it wrote its world.json: started, the write replacing the half-written file
    if not (out / WORLD_FILE).is_file():
        raise UserError(f"{named} holds something other than a world (no {WORLD_FILE}); give a new or empty folder")
    existing = read_world_spec(out)
    if existing.get("weights_dtype"):
        raise UserError(f"{named} is an exported world ({existing['weights_dtype']} weights), finished; building into it would "
                        "replace its parts: give a new or empty folder")
    with contextlib.suppress(AttributeError, KeyError, TypeError, ValueError):  # as this version writes it: a world.json of an older one
        existing |= world_spec(WorldPreset.from_dict(existing["preset"]), existing.get("prediction_type"))  # lacks newer keys
    if {k: existing.get(k) for k in spec} != spec:
        raise UserError(
            f"{named} holds a world built with other settings (preset {existing['preset'].get('name')!r}, "
            f"{existing.get('prediction_type')}; {_differences(existing, spec)}); give the same settings to resume it, or a new folder"
        )


def _differences(existing: dict, spec: dict) -> str:
    """Where the world spec `existing` differs from `spec`, e.g. "seed 0, not 3; teacher.architecture 'sd', not 'sdxl'":
    a build resumed with --seed 3 was refused naming only the preset and the prediction type, which it had given alike."""
    def flat(d: dict, prefix: str = "") -> dict:
        return {k: v for key, value in d.items() for k, v in
                (flat(value, f"{prefix}{key}.").items() if isinstance(value, dict) else [(prefix + key, value)])}

    theirs, ours = flat(existing.get("preset") or {}) | {"prediction_type": existing.get("prediction_type")}, flat(spec["preset"])
    ours["prediction_type"] = spec["prediction_type"]
    return "; ".join(f"{key} {theirs.get(key)!r}, not {value!r}" for key, value in ours.items() if theirs.get(key) != value)


def finished_phases(out: Path) -> list[str]:
    """The phases recorded in `build_state.json`: the longest prefix of PHASES it lists."""
    try:
        done = set(json.loads((out / STATE_FILE).read_bytes().decode("utf-8"))["done"]) if (out / STATE_FILE).is_file() else set()
    except (UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise UserError(f"{out / STATE_FILE} is damaged; remove it (and the world's other files) to build the world again") from None
    finished = []
    for phase in PHASES:
        if phase not in done:
            break
        finished.append(phase)
    return finished


def _setting(spec: dict, key: str):
    """`key` of a world spec: a top-level entry, a preset field or a preset section's field (`teacher.architecture`)."""
    if key in spec:
        return spec[key]
    section, _, field_name = key.partition(".")
    value = spec["preset"].get(section)
    return value.get(field_name) if field_name and isinstance(value, dict) else value


def reusable_phases(src: Path, spec: dict, flag: str = "parts_from") -> list[str]:
    """The longest prefix of PHASES that the world at `src` has finished with the settings `spec` asks for: the same
    data, and for each phase the same PHASE_SETTINGS. A build (`build_state.json`) offers its finished phases; an
    export (`lcm world export`, the shipped world) every phase whose outputs it kept, logs aside. An error names `src` as
    `flag` (`devices.given`)."""
    if not (src / WORLD_FILE).is_file():
        raise UserError(f"{given(flag, str(src))} is not a world folder (no {WORLD_FILE}); give a world build or export, or "
                        "'default' for the shipped world")
    theirs = read_world_spec(src)
    theirs.setdefault("prediction_type", "epsilon")
    with contextlib.suppress(AttributeError, KeyError, TypeError, ValueError):  # fill keys that an older version did not write
        theirs |= world_spec(WorldPreset.from_dict(theirs["preset"]), theirs["prediction_type"])
    if any(_setting(theirs, key) != _setting(spec, key) for key in DATA_SETTINGS):
        return []
    preset = WorldPreset.from_dict(spec["preset"])
    built = finished_phases(src) if (src / STATE_FILE).is_file() else PHASES
    phases = []
    for phase in built:
        kept = all((src / entry).exists() for entry in phase_outputs(phase, preset) if not entry.startswith("logs/"))
        if not kept or any(_setting(theirs, key) != _setting(spec, key) for key in PHASE_SETTINGS[phase]):
            break
        phases.append(phase)
    return phases


def _reuse_phases(src: Path, out: Path, preset: WorldPreset, phases: list[str]) -> None:
    """Copy the outputs of `phases` from the world at `src` into the new world `out` and record them as done; the
    weights in float32 as a build writes them (an export's are float16)."""
    for phase in phases:
        for entry in phase_outputs(phase, preset):
            if (src / entry).exists():
                if (out / entry).is_dir():  # half copied by a run killed before it recorded the phases
                    shutil.rmtree(out / entry)
                (out / entry).parent.mkdir(parents=True, exist_ok=True)
                (shutil.copytree if (src / entry).is_dir() else shutil.copy2)(src / entry, out / entry)
                if (out / entry).is_dir():
                    _cast_weights(out / entry, torch.float32)
                permit_as_umask(out / entry)  # not the modes of `src` (another user's world) nor of `_cast_weights`'s writes
    # resolved: the record names that world from any folder, and a rerun from another one compares it (`cli.world`)
    _write_state(out, phases, {"seconds": dict.fromkeys(phases, 0.0), "reused_from": dict.fromkeys(phases, str(src.resolve()))})


def _write_state(out: Path, done: list[str], state: dict) -> None:
    """build_state.json: the phases `done`, and what `state` records of each (its seconds, the type of device it ran on
    and the world it was copied from)."""
    records = {key: {phase: v for phase, v in state.get(key, {}).items() if phase in done} for key in ("seconds", "devices", "reused_from")}
    write_json_atomic(out / STATE_FILE, {"done": done} | {key: v for key, v in records.items() if v or key == "seconds"}, indent=2)


def _phases_kept(out: Path, preset: WorldPreset) -> list[str]:
    """The recorded phases (`finished_phases`) that stand, before any work: up to the first whose outputs (logs aside) are
    gone. That phase is built again, and so is every phase after it: each reads what the ones before it made (the text
    encoder the tokenizer, the latents the VAE and text encoder, the teacher the latents, the quality report all of them),
    and a phase built again is the same to the bit only on the same device type and torch build, so a teacher kept from
    before could be one trained on another VAE's latents. build_state.json is rewritten to list the phases kept, and the
    checkpoints in .work/, of phases after them, removed."""
    done = finished_phases(out)
    gone = next(((phase, entry) for phase in done for entry in phase_outputs(phase, preset)
                 if not entry.startswith("logs/") and not (out / entry).exists()), None)
    if gone is None:
        return done
    phase, entry = gone
    kept = done[: done.index(phase)]
    print(f"note: {out / entry} is missing: building the {phase} phase again, and those after it ({', '.join(PHASES[len(kept) + 1 :])})",
          file=sys.stderr)
    _write_state(out, kept, json.loads((out / STATE_FILE).read_text()))
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    return kept


def _check_phase_outputs(build: _Build, phases: list[str]) -> None:
    """Load the outputs of the recorded `phases` as the phases after them and `lcm world check` load them (`load_component`,
    `load_judge`, `LatentCache`): a damaged one is refused now, naming the folder to remove so that a rerun builds its
    phase again (`_phases_kept`), not after the next phase has trained to its end."""
    for phase in phases:
        try:
            _load_outputs(build, phase)
        except (UserError, OSError, ValueError) as err:  # OSError, ValueError: a tokenizer's files
            later = PHASES[PHASES.index(phase) + 1 :]
            raise UserError(f"{first_line(err)}: the {phase} phase's output is damaged; remove {build.out / phase_outputs(phase, build.preset)[0]} "
                            f"and run the same command again to build that phase again{', and ' + ', '.join(later) if later else ''}") from None


def _load_outputs(build: _Build, phase: str) -> None:
    """Load what `phase` committed into the world (see `_check_phase_outputs`)."""
    from diffusers import UNet2DConditionModel

    out, preset = build.out, build.preset
    if phase == "judge":
        for folder in [out / "judge"] + [out / "judges" / name for name in preset.pretraining_datasets]:
            load_judge(folder)
    elif phase == "latents":
        LatentCache(out / "latents")
    elif phase == "teacher":
        load_component(UNet2DConditionModel, str(out), "unet", use_safetensors=True)
    elif phase == "quality":
        if "summary" not in json.loads((out / "quality" / "quality.json").read_text()):  # what `lcm world build` prints
            raise ValueError(f"{out / 'quality' / 'quality.json'} holds no summary")
    else:  # tokenizer, vae, text_encoder (and an SDXL world's second ones)
        for component in phase_outputs(phase, preset):
            if not component.startswith("logs/"):
                build.load(component)


def _check_resume_device(out: Path, phase: str, device: torch.device, flag: str = "device") -> None:
    """A phase stopped with a checkpoint resumes on the type of device that trained it (`fit.Checkpointer.saved_device`): its
    generator state is that device's, and a phase trained partly on each would be neither's. Refused before any work,
    naming the device to use as `flag` takes it (`devices.given`)."""
    saved = Checkpointer(out / WORK_DIR / phase).saved_device()
    if saved not in (None, device.type):
        raise UserError(f"the {phase} phase of {out} was stopped with a checkpoint trained on {saved}, and this run is on {device.type}: "
                        f"resume it with {given(flag, saved)}, or remove {out / WORK_DIR / phase} to build that phase again from its start")


def build_world(
    preset: str | WorldPreset,
    out_dir: str | Path,
    device: str | torch.device = "auto",
    progress: bool = True,
    prediction_type: str = "epsilon",
    parts_from: str | Path | None = None,
    *,
    flags: Mapping[str, str] | None = None,
) -> Path:
    """Build (or finish building) a world into `out_dir`; returns its path. See the module docstring.

    `parts_from`: another world (a build or an export) whose finished phases stand in for this build's first phases
    where the settings they depend on are equal (`reusable_phases`), copied instead of trained: an SDXL-architecture
    teacher on the shipped world's tokenizer, judge and VAE, say. Only for a build that has not started. An error names
    the arguments as `flags` do (`lcm world build`'s: `COMMAND_FLAGS`), else as this call takes them."""
    out_flag = _flag(flags, "out_dir")
    if not str(out_dir).strip():  # Path("") is the current folder
        named = f"{out_flag} {str(out_dir)!r}" if out_flag.startswith("--") else given(out_flag, str(out_dir))
        raise UserError(f"{named} names no folder; give the world's folder by its name (e.g. runs/world)")
    preset = get_preset(preset) if isinstance(preset, str) else preset
    check_world_spec(preset, prediction_type, flags)
    out = Path(out_dir)
    spec = world_spec(preset, prediction_type)
    _check_out_dir(out, spec, out_flag)
    reused = []
    if parts_from is not None and not finished_phases(out):
        reused = reusable_phases(Path(parts_from), spec, _flag(flags, "parts_from"))
        if not reused:
            raise UserError(f"{given(_flag(flags, 'parts_from'), str(parts_from))}: no phase of that world was built with this preset's settings "
                            "(its data or tokenizer differ); leave it out to build every phase")
    device = resolve_device(device, _flag(flags, "device"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # every training phase has fixed shapes
    out.mkdir(parents=True, exist_ok=True)
    if not (out / WORLD_FILE).is_file():
        write_json_atomic(out / WORLD_FILE, spec, indent=2)
    build = _Build(preset, out, device, prediction_type, progress)
    if reused:
        _reuse_phases(Path(parts_from), out, preset, reused)
        print(f"reused from {parts_from}: {', '.join(reused)}")
    done = _phases_kept(out, preset)
    _check_phase_outputs(build, done)
    if len(done) < len(PHASES):
        _check_resume_device(out, PHASES[len(done)], device, _flag(flags, "device"))
    state = json.loads((out / STATE_FILE).read_text()) if done else {}
    for phase in PHASES[len(done) :]:
        start = time.perf_counter()
        work = out / WORK_DIR / phase
        stage = work / "stage"
        shutil.rmtree(stage, ignore_errors=True)  # half-written outputs are never trusted; checkpoints are
        stage.mkdir(parents=True)
        # Every phase starts from its own seed: what it draws from torch's global generator (fresh layers, data
        # loader seeds) does not depend on the phases before it, nor on the process's random default seed
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(build.seed(phase))
            getattr(build, phase)(stage)
        permit_as_umask(stage)  # safetensors writes the weights readable by their owner alone
        for entry in phase_outputs(phase, preset):
            target = out / entry
            if target.is_dir():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / entry, target)
        done.append(phase)
        state.setdefault("seconds", {})[phase] = round(time.perf_counter() - start, 1)
        state.setdefault("devices", {})[phase] = device.type
        _write_state(out, done, state)
        shutil.rmtree(work)
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    return out


def export_world(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.float16, *, flags: Mapping[str, str] | None = None) -> Path:
    """Copy a finished world's pipeline, judge and quality report to `dst`, weights cast to `dtype`.

    The latent cache, logs and build state stay behind; `load_world` reads the copy (in float32). The copy is made in
    `<dst>.partial` (marked EXPORT_MARKER first) and renamed to `dst` when complete; a `<dst>.partial` that is not such an
    unfinished export (or empty) is refused, as is a `dst` inside `src`. An error names `src` and `dst` as `flags` do
    (`lcm world export`'s: `COMMAND_FLAGS`), else as this call takes them.
    """
    dst_flag, src_flag = _flag(flags, "dst"), _flag(flags, "src")
    partial = partial_folder(dst, "../world-fp16", dst_flag)
    src, dst = Path(src), Path(dst)
    _check_exportable(src)
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        where = "the world folder" if dst.resolve() == src.resolve() else "inside the world folder"
        raise UserError(f"{given(dst_flag, str(dst))} is {where} {given(src_flag, str(src))}; give a new or empty folder outside it")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UserError(f"{given(dst_flag, str(dst))} is a file or a folder that is not empty; give a new or empty folder")
    start_partial(partial, EXPORT_MARKER, f"`lcm world export --out {dst}`" if dst_flag.startswith("--") else "export_world")
    for entry in _exported(src):
        (shutil.copytree if (src / entry).is_dir() else shutil.copy2)(src / entry, partial / entry)
    _cast_weights(partial, dtype)
    spec = json.loads((partial / WORLD_FILE).read_text())
    write_json_atomic(partial / WORLD_FILE, spec | {"weights_dtype": str(dtype).removeprefix("torch.")}, indent=2)
    permit_as_umask(partial)  # not the modes of `src` (another user's world) nor of `_cast_weights`'s writes
    move_into_place(partial, dst)  # onto a missing or empty folder, or the one a link --out points to
    (dst / EXPORT_MARKER).unlink()
    return dst


def _check_exportable(src: Path) -> None:
    """Export copies a build that `lcm world build` finished (its build_state.json lists every phase); an exported world
    (the shipped one, say) has no build state and is ready to use as it is."""
    if finished_phases(src) == list(PHASES):
        missing = [entry for entry in _exported(src) if not (src / entry).exists()]
        if missing:
            raise UserError(f"the finished world in {src} lacks {missing[0]}, which `lcm world build` wrote; restore it, or build the "
                            "world again into a new folder")
        return
    dtype = read_world_spec(src).get("weights_dtype") if (src / WORLD_FILE).is_file() else None
    if dtype:
        raise UserError(f"{src} is an exported world already ({dtype} weights), ready to use as it is (--world, --teacher); "
                        "`lcm world export` copies a world that `lcm world build` finished")
    raise UserError(f"{src} is not a finished world; run `lcm world build` on it first")


def _exported(src: Path) -> tuple[str, ...]:
    """What `export_world` copies of the world at `src`: EXPORTED, and SDXL_PARTS of an SDXL world."""
    sdxl = WorldPreset.from_dict(read_world_spec(src)["preset"]).teacher.architecture == "sdxl"
    return EXPORTED + (SDXL_PARTS if sdxl else ())


def _cast_weights(folder: Path, dtype: torch.dtype) -> None:
    """Cast the floating-point tensors of every safetensors file under `folder` to `dtype`, in place."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open, save_file

    for weights in folder.rglob("*.safetensors"):
        try:
            with safe_open(str(weights), framework="pt") as f:
                metadata = f.metadata()
            tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}
        except SafetensorError as err:  # as damaged as the world's file it copies
            raise UserError(f"{weights}, copied from another world, is damaged ({first_line(err)}): so is that world's; build it "
                            "again") from None
        save_file(tensors, str(weights), metadata=metadata)
