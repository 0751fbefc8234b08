"""The model card an exported model folder carries: README.md in the Hugging Face Hub's format (a YAML header of metadata,
then text), as diffusers' training scripts write beside their exports. It says what the model is, what it was made from
and how, how much of its teacher's guidance it follows (the ω response), and how to sample it, in diffusers and with
`lcm generate`. The loaders ignore it; a user who uploads the folder shares it, with the paths of its usage lines (the
folder and the base model, absolute: they run from any working directory) replaced by hub ids.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

from latent_consistency.command_words import flag_words
from latent_consistency.guidance_record import GuidanceRecord
from latent_consistency.hub import looks_like_hub_id, split_revision
from latent_consistency.models import LCM_LORA_TITLE, DiffusionModel
from latent_consistency.outputs import write_atomic
from latent_consistency.pipelines import DEFAULT_GUIDANCE_SCALE

CARD = "README.md"
PROMPT = "a photo of a cat"  # the usage lines' prompt where the run had no validation prompt
IMAGES = "lcm-images"  # the folder the card's `lcm generate` line writes its images in (its required --out)
# What each exported folder (`Student.export`) holds
WHAT = {"lcm": "A latent consistency model (LCM): it samples in 1-8 steps, with the guidance scale g as an input.",
        "pixart": "A latent consistency model (LCM) of PixArt-α: it samples in 1-8 steps, at the one guidance scale it was "
                  "distilled at (a PixArt transformer has no ω input: no g to give it).",
        "lora": "LCM-LoRA adapters: with them their base model samples in 1-8 steps.",
        "lcm-lora": "LoRA adapters fine-tuned on an LCM: with them that LCM samples in 1-8 steps, with the guidance scale g as "
                    "its input.",
        "guided": "A guidance-distilled diffusion model: one network pass per step in place of classifier-free guidance's two."}
# "lora"'s is how `models.load_lcm_lora` knows an LCM-LoRA distilled from a teacher (`models.LCM_LORA_TITLE`), refused on an LCM
TITLES = {"lcm": "LCM of {}", "pixart": "LCM of {}", "lora": LCM_LORA_TITLE.removeprefix("# ") + "{}", "lcm-lora": "LoRA for the LCM {}",
          "guided": "Guidance-distilled {}"}
METHODS = {
    "lcd": "latent consistency distillation (LCD, Algorithm 1 of Luo et al. 2023)",
    "ode": "regression of the consistency function on its teacher's guided ODE solutions (`lcm distill --method ode`)",
    "guidance": "guidance distillation (stage one of Meng et al. 2023): one ω-conditioned pass in place of classifier-free guidance",
    "progressive": "a round of progressive distillation of a guidance-distilled model (stage two of Meng et al. 2023)",
    "lcf": "latent consistency fine-tuning (LCF, Algorithm 4 of Luo et al. 2023)",
}
GUIDED_STEPS = 25  # a stage-one model samples as its teacher did: DDIM, here at 25 steps


def model_card(folder: Path, config, record: GuidanceRecord | None, pipeline: str | None = None,
               base: DiffusionModel | None = None, prompt: str = PROMPT) -> str:
    """The card of the model that the run of `config` exported to `folder` (lcm/, lora/ or guided/), with its guidance
    record (None for LoRA adapters, whose guidance is the sampler's or their LCM's), its diffusers pipeline class
    (model_index.json's) and the run's `base` model (its teacher, or the model LCF fine-tuned): LoRA adapters on a base
    with an ω input keep it (None: a base without one, as a teacher of LCM-LoRA is). Its usage lines sample `prompt`."""
    from huggingface_hub import ModelCardData

    kind = Path(folder).name
    lcf = config.objective == "lcf"
    source = config.model if lcf else config.teacher  # what the model was made from, and what LoRA adapters go on
    what = _what(kind, pipeline, base)
    base_record = base.guidance_record if base is not None else None
    tags = ["text-to-image", "diffusers", "guidance-distillation" if kind == "guided" else "latent-consistency-model"]
    header = ModelCardData(library_name="diffusers", pipeline_tag="text-to-image", tags=tags + ["lora", "lcm-lora"] * (kind == "lora"),
                           base_model=split_revision(source)[0] if looks_like_hub_id(source) else None)  # org/name of org/name@rev
    title = _shown(_title(what, source, config)) + (", fine-tuned with LCF" if lcf else "")
    made_from = "the LCM" if what in ("lcm", "pixart", "lcm-lora") and lcf else "the model" if lcf else "the teacher"
    recorded = config.to_dict()  # its sources as the run's config.json names them: absolute paths, from any folder
    lines = [f"# {title}", "", WHAT[what], "", "## How it was made", "",
             f"- From: {made_from} `{_shown(recorded[config.model_field])}`"
             + (f" with the LCM-LoRA `{_shown(recorded['lora'])}`" if lcf and config.lora else ""),
             f"- Method: {METHODS['lcf' if lcf else config.method]}",
             f"- Data: `{_shown(recorded['data'])}`",
             f"- {config.steps} steps at batch {config.batch_size}, learning rate {config.lr:g}{_omega_rate(config)}, seed {config.seed}"]
    if not lcf and config.method in ("lcd", "ode"):
        lines.append(f"- Teacher ODE solver {config.solver}, skipping step k = {config.skip}")
    if lcf and base is not None:
        lines.append(_lcf_skip(config, base))
    size = trained_size(config, base)
    if size is not None:
        lines.append(_size_line(size, base))
    lines += _guidance(what, record, base_record, lcf) + ["", "## Sampling it", ""]
    lines += _usage(Path(folder), what, record, base_record, config, prompt, _sampled_size(size, base))
    return f"---\n{header.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"


def _lcf_skip(config, base: DiffusionModel) -> str:
    """The skipping step k LCF trained with (Eq. 16; --skip, else the LCM's own, `objectives.FineTuning.skip`) and the LCM's
    own: a new k moves the model onto another grid of T/k points (its scheduler's original_inference_steps)."""
    k, whose = config.skip or base.skip, "the LCM-LoRA's" if config.lora else "the LCM's"
    own = f"{whose} own" if k == base.skip else f"{whose} own was {base.skip}"
    return f"- Skipping step k = {k} ({own}): sampled on the grid of {base.schedule.num_train_timesteps // k} timesteps"


def trained_size(config, base: DiffusionModel | None) -> int | None:
    """The image size (px) the run trained at: --resolution, else its model's native size (None where neither is known)."""
    return config.resolution or (base.native_size if base is not None else None)


def _size_line(size: int, base: DiffusionModel | None) -> str:
    """The card's line of the training resolution, and where it is not the model's native size (the size diffusers and `lcm
    generate` sample at by default, the UNet's sample_size, which the export keeps: `run_folder.off_native_size_note`), that
    its usage gives height and width."""
    if base is None or size == base.native_size:
        return f"- Trained on {size} px images" + ("" if base is None else ", its native size")
    native = base.native_size
    return (f"- Trained on {size} px images; its default size is still its model's native {native} px: sample it at "
            f"{size} px (height and width, as below)")


def _sampled_size(size: int | None, base: DiffusionModel | None) -> int | None:
    """The size the card's usage lines give (height and width): the training size where it is not the native one."""
    return size if base is not None and size is not None and size != base.native_size else None


def _title(what: str, source: str, config) -> str:
    """The card's title: what the model is (`TITLES`) of the model it was made from, as the run was given it; a progressive
    round says so, and the DDIM steps it samples in (its teacher, too, is a guidance-distilled model)."""
    if what == "guided" and getattr(config, "method", None) == "progressive":
        return f"{config.student_steps}-step progressive distillation of {source}"
    return TITLES[what].format(source)


def _omega_rate(config) -> str:
    """The ω projection's learning rate where --omega-lr-scale gave it its own (`Student.parameter_groups`); "" otherwise."""
    scale = getattr(config, "omega_lr_scale", 1.0)
    return "" if scale == 1 else f" (the ω projection's {config.lr * scale:g})"


def _what(kind: str, pipeline: str | None, base: DiffusionModel | None) -> str:
    """The kind of export as its guidance goes (a key of `WHAT`): a PixArt LCM has no ω input, and LoRA adapters on a
    model with one (an LCM, fine-tuned with LCF) keep it."""
    if (pipeline or "").startswith("PixArt"):
        return "pixart"
    if kind == "lora" and base is not None and base.time_cond_proj_dim is not None:
        return "lcm-lora"
    return kind


def _guidance(what: str, record: GuidanceRecord | None, base_record: GuidanceRecord | None, lcf: bool) -> list[str]:
    """The guidance range and, where the run measured it, the ω response per t: the fraction of the teacher's guidance
    effect the model reproduces (1: all of it; `training.omega_response`). LCF teaches no guidance (Algorithm 4 has no
    teacher): a fine-tuned model's range is its LCM's (`base_record`, for LoRA adapters on it)."""
    if what == "lora":
        return ["- Guidance: classifier-free guidance in the sampler, as the base model's (g 1-2 is usual for LCM-LoRA)"]
    if what == "pixart":
        return [f"- Distilled at guidance scale g = {record.guidance_scale:g}, built into the model: it samples without "
                "classifier-free guidance (g 0 in diffusers' pipeline, as PixArt-LCM)"]
    if what == "lcm-lora" and base_record is None:
        return [f"- Guidance: the LCM's ω input (g, {DEFAULT_GUIDANCE_SCALE['lcm']:g} when none is given), which LCF does not train"]
    if lcf:
        record = base_record if what == "lcm-lora" else record
        return [f"- Guidance scale g on [{record.guidance_scale_min:g}, {record.guidance_scale_max:g}] (its LCM's ω input: LCF "
                f"teaches no guidance), sampled at {record.guidance_scale:g} by default"] + _response(record, " of its LCM before LCF,")
    return [f"- Guidance scale g trained on [{record.guidance_scale_min:g}, {record.guidance_scale_max:g}], "
            f"sampled at {record.guidance_scale:g} by default"] + _response(record, "")


def _response(record: GuidanceRecord, whose: str) -> list[str]:
    """The card's lines on the measured ω response per t (`whose`: of the LCM a fine-tuning started from), none where it was
    not measured."""
    if not record.omega_response:
        return []
    ts = sorted(record.omega_response, reverse=True)
    lines = [f"- ω response{whose} at t = {' / '.join(map(str, ts))}: {' / '.join(f'{record.omega_response[t]:.2f}' for t in ts)} "
             "(the fraction of the teacher's guidance effect it reproduces; 1 is all of it)"]
    if record.ignores_guidance():
        lines.append("- **It ignores its guidance scale**: its images hardly change with g.")
    return lines


def _pretrained(source: str) -> str:
    """`from_pretrained`'s arguments for `source`: a hub id pinned to a revision (org/name@rev) as diffusers takes it."""
    repo, revision = split_revision(source) if looks_like_hub_id(source) else (source, None)
    return _literal(repo) + ("" if revision is None else f", revision={_literal(revision)}")


def _literal(text: str) -> str:
    """A Python string literal of `text` in double quotes, read back as `text`: JSON's escapes (\\", \\\\, \\n, \\uXXXX) are
    Python's, and characters beyond the Basic Multilingual Plane (an emoji) stay as they are, where json.dumps's default
    ASCII wrote them as a UTF-16 surrogate pair ("\\ud83c\\udf89"), which Python reads as two lone surrogates: a path of
    no file, a prompt no tokenizer takes. A lone surrogate (a non-UTF-8 file name as `os.fsdecode` gives it) is written as
    its escape, \\udcXX, which Python reads back as that name: in the card as it is, no UTF-8 file could hold it."""
    return json.dumps(text, ensure_ascii=False).encode("utf-8", "backslashreplace").decode("utf-8")


def _usage(folder: Path, what: str, record: GuidanceRecord | None, base_record: GuidanceRecord | None, config,
           prompt: str, size: int | None = None) -> list[str]:
    """A diffusers snippet and an `lcm generate` line that sample the model from where it was written, at the g `lcm
    generate` takes by default. Both run as written from any folder: the model (and base model) by their absolute paths
    (config.json's, for the base; a hub id as given), the command's images into `IMAGES`. A PixArt LCM has no ω input: its
    diffusers pipeline would apply classifier-free guidance at g > 1 (PixArt-LCM samples at 0). LoRA adapters on an LCM
    keep its ω input: g 1 there is ω = 0, no guidance at all. `size`: the images' height and width, where the model was
    trained at another size than its default (`_sampled_size`)."""
    exported, recorded_source = os.path.abspath(folder), config.to_dict()[config.model_field]
    where, said = _literal(exported), _literal(prompt)
    sized = "" if size is None else f", height={size}, width={size}"
    size_words = [] if size is None else ["--height", str(size), "--width", str(size)]
    if what in ("lora", "lcm-lora"):
        g = DEFAULT_GUIDANCE_SCALE["lora"] if what == "lora" else base_record.guidance_scale if base_record else DEFAULT_GUIDANCE_SCALE["lcm"]
        python = ["from diffusers import DiffusionPipeline, LCMScheduler", "",
                  f"pipe = DiffusionPipeline.from_pretrained({_pretrained(recorded_source)})",
                  f"pipe.scheduler = LCMScheduler.from_pretrained({where})",
                  f"pipe.load_lora_weights({where})",
                  f"image = pipe({said}, num_inference_steps=4, guidance_scale={g:g}{sized}).images[0]"]
        command = ["lcm", "generate", *_prompt_words(prompt), "--model", recorded_source, "--lora", exported, "--out", IMAGES, "--steps", "4",
                   *size_words]
    else:
        # a progressive round is right only on its own N-step DDIM grid (`lcm generate` samples it there by default)
        steps = (config.student_steps if config.method == "progressive" else GUIDED_STEPS) if what == "guided" else 4
        g = 0.0 if what == "pixart" else record.guidance_scale
        python = ["from diffusers import DiffusionPipeline" + (", DDIMScheduler" if what == "guided" else ""), "",
                  f"pipe = DiffusionPipeline.from_pretrained({where})"]
        if what == "guided":
            python.append("pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)")
        python.append(f"image = pipe({said}, num_inference_steps={steps}, guidance_scale={g:g}{sized}).images[0]")
        command = ["lcm", "generate", *_prompt_words(prompt), "--model", exported, "--out", IMAGES,
                   *(["--sampler", "ddim"] if what == "guided" else []), "--steps", str(steps), *size_words]
    return ["```python", *python, "```", "", "```sh", " ".join(map(_shell_word, command)), "```"]


def _name_bytes(text: str) -> bytes:
    """The bytes `text` stands for: a file name's that is no UTF-8 (Linux takes any bytes), which `os.fsdecode` gave as
    lone surrogates (U+DC80-U+DCFF), as those bytes; any other lone surrogate (half of a UTF-16 pair) as its escape."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace")


def _shown(text: str) -> str:
    """`text` as the card's prose shows it: a name's bytes that are no UTF-8 as backslash escapes (`caf\\xe9`,
    `_name_bytes`), which a card written as UTF-8 can hold (it crashed on them); any other text as it is."""
    return _name_bytes(text).decode("utf-8", "backslashreplace")


def _shell_word(word: str) -> str:
    """`word` quoted for the card's shell line as `shlex.join` quotes it; a name whose bytes are no UTF-8 in bash's
    $'...' quoting, each such byte (and ', \\, control characters) as \\xNN: the line stays UTF-8 and names that file."""
    raw = _name_bytes(word)
    try:
        return shlex.quote(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return "$'" + "".join(chr(b) if 0x20 <= b < 0x7F and b not in b"'\\" else f"\\x{b:02x}" for b in raw) + "'"


def _prompt_words(prompt: str) -> list[str]:
    """`lcm generate`'s words for one prompt: the prompt itself, or `--prompt=-...` for one that starts with "-", which as a
    word of its own argparse takes for a flag (`flag_words`)."""
    return flag_words("--prompt", prompt) if prompt.startswith("-") else [prompt]


def write_model_card(staged: Path, folder: Path, config, record: GuidanceRecord | None, base: DiffusionModel,
                     prompts: list[str]) -> Path:
    """The card of the model staged in `staged` by the run of `config` (from `base`: `model_card`), written there, for
    the folder `folder` it is then moved to; its usage lines sample the first of the run's validation `prompts` (a prompt
    of what the model was trained on: the world's shapes, a user's own captions), else `PROMPT`."""
    index = Path(staged) / "model_index.json"
    pipeline = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    path = Path(staged) / CARD
    write_atomic(path, lambda tmp: tmp.write_text(model_card(folder, config, record, pipeline, base, (prompts or [PROMPT])[0]),
                                                        encoding="utf-8"))
    return path
