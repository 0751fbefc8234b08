"""The paper's Table 1 and Figures 2, 4 and 5 for any LCM: rows of samplers at step counts and guidance scales,
each scored on the same prompts from the same noise, written as they finish so that a killed evaluation resumes.

Rows (Section 5.1 of Luo et al. 2023): the LCM (Algorithm 3), and the teacher with classifier-free guidance via
DDIM, DPM-Solver and DPM-Solver++ at the same step counts, plus DPM-Solver++ at 25 and 50 steps as the reference.
Optionally (ours) the LCM's ceiling: Algorithm 3 with the teacher's exact consistency function in place of the LCM
(`ode_error.TeacherConsistencyFunction`), what a perfect student of this teacher would score at each step count.
Each row also records what it costs: network evaluations per image (CFG doubles the teacher's), milliseconds
per image, and peak memory.

Metrics are plug-ins (`Scorer`): the built-in world's judge (FID in its features, prompt alignment per attribute),
CLIP (CLIP score, FID in CLIP features), Inception (FID as the usual tools compute it). KID is reported next to
every FID: unbiased, and better behaved than FID at the few hundred images of a quick evaluation.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import pickle
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from latent_consistency import fonts
from latent_consistency.errors import UserError
from latent_consistency.evaluation import compare
from latent_consistency.evaluation.compare import sample_consistency, sample_guided
from latent_consistency.evaluation.fid import feature_rms_of, fid_of_features, kid_of_features, network_features
from latent_consistency.evaluation.ode_error import TeacherConsistencyFunction
from latent_consistency.grids import image_grid, save_png
from latent_consistency.hub import hub_revision
from latent_consistency.models import DiffusionModel, model_files
from latent_consistency.outputs import savefig_atomic, write_atomic, write_json_atomic, write_text_atomic
from latent_consistency.progress import progress_bar
from latent_consistency.sampling import solver_start_note
from latent_consistency.solvers import get_solver

TEACHER_SOLVERS = {"ddim": "DDIM", "dpm": "DPM-Solver", "dpm++": "DPM-Solver++"}
GUIDED_DISTILL = "guided-distill"  # Meng et al. 2023: a guidance-distilled model (ω input), progressively distilled, with DDIM
EXACT = "exact"  # Algorithm 3 with the teacher's exact consistency function f* (the LCD fixed point): the LCM's ceiling
EXACT_SOLVER = "ddim"  # the solver of f*: the paper's LCD solver
REFERENCE_STEPS = (25, 50)  # the teacher's DPM-Solver++ at these step counts: what few-step samplers are measured against
RESULTS_FILE = "results.json"
# results.json's "format": 2 names each model by its absolute path (`model_identity`); a file without it was written before,
# naming models as given, and its fingerprint cannot be matched to this evaluation's. 3: an LCM's noise between steps comes
# from image i's own generator, as `lcm generate` draws it (`compare.sample_consistency`; format 2 seeded it with 10^6 +
# SEED + i), so no earlier file's LCM rows are this version's images. 4: the fingerprint digests what every row shares
# (prompts, noise, reference images, metrics), and each row records the models it was sampled with (`row_models`), so
# that another model's rows can be added to an evaluation; format 3's fingerprint digested every model as well, and its
# rows are taken up where it is this evaluation's with the models given now (`saved_results`)
RESULTS_FORMAT = 4
FORMAT_3 = 3
# The row being scored, as a killed run left it: its scorers' state after the batches done (`RowProgress`), saved at most
# every PROGRESS_SECONDS, so that a kill loses at most about that much of a row, not the row
PROGRESS_FILE = "row-progress.pt"
PROGRESS_SECONDS = 60.0


@dataclass(frozen=True)
class Row:
    """One sampler at one step count and guidance scale (diffusers' g; the paper's ω = g − 1)."""

    sampler: str  # "lcm" or a key of TEACHER_SOLVERS
    steps: int
    guidance_scale: float

    @property
    def key(self) -> str:
        return f"{self.sampler}|{self.steps}|{self.guidance_scale:g}"

    def method(self, teacher: DiffusionModel | None = None) -> str:
        """The row's label; a teacher solver's says how `teacher` is guided: CFG, or a guidance-distilled teacher's ω input."""
        guidance = "CFG" if guided_passes(teacher) == 2 else "ω input"
        return ({"lcm": "LCM", GUIDED_DISTILL: "Guided-Distill", EXACT: "exact LCM (teacher ODE)"}.get(self.sampler)
                or f"{TEACHER_SOLVERS[self.sampler]} ({guidance})")

    def network_evaluations(self, lcm: DiffusionModel | None = None, teacher: DiffusionModel | None = None) -> int:
        """UNet passes per image: one per step for an LCM with an ω input and Guided-Distill; two (cond and uncond) for
        the teacher with CFG and for an LCM-LoRA guided at g > 1 (its own CFG, whatever teacher is beside it); for the
        exact LCM two per teacher jump of k from each of the LCM's timesteps down to 0 (DDIM: one evaluation per jump). A
        guidance-distilled teacher's (ω input) take one pass where CFG takes two (`guided_passes`), and so does CFG at
        g ≤ 1 (no unconditional pass: `GuidedTeacher.guided_output`, `sampling.sample_teacher`, `teacher_guidance_scale`)."""
        if self.guidance_scale <= 1 or self.sampler == GUIDED_DISTILL or (self.sampler == "lcm" and lcm.time_cond_proj_dim is not None):
            passes = 1
        else:
            passes = 2 if self.sampler == "lcm" else guided_passes(teacher)
        if self.sampler == EXACT:
            return sum(passes * -(-int(t) // lcm.skip) for t in lcm.timesteps(self.steps))
        return passes * self.steps


def teacher_guidance_scale(guidance_scale: float, teacher: DiffusionModel) -> float:
    """The g the teacher's ODE runs at for a row at `guidance_scale`: at g ≤ 1 classifier-free guidance runs the
    conditional pass alone (g = 1), as `sampling.sample_teacher` and diffusers' pipelines do, not (1+ω)·ε_c − ω·ε_u with
    ω < 0, which moves towards the unconditional model; a guidance-distilled teacher takes its ω input as given."""
    return max(guidance_scale, 1.0) if guided_passes(teacher) == 2 else guidance_scale


def guided_passes(teacher: DiffusionModel | None) -> int:
    """Network passes per guided evaluation of the teacher: two with classifier-free guidance (cond and uncond); one for
    a guidance-distilled teacher (`lcm distill --method guidance`), whose ω input stands for them (`models.guided_teacher`)."""
    return 1 if teacher is not None and teacher.time_cond_proj_dim is not None and not teacher.is_lcm else 2


def table_rows(steps: list[int], guidance_scales: list[float], teacher: bool, reference_steps: tuple[int, ...] = REFERENCE_STEPS,
               guided_distill_steps: list[int] = (), exact: bool = False) -> list[Row]:
    """The LCM at every step count and scale (and, with `exact`, the exact LCM of the teacher next to it);
    Guided-Distill at the step counts its models sample in; with a teacher, its three solvers at every step count and
    DPM-Solver++ at the reference step counts (25 and 50)."""
    rows = [Row(sampler, n, g) for g in guidance_scales for n in steps for sampler in ("lcm", EXACT)[:1 + exact]]
    rows += [Row(GUIDED_DISTILL, n, g) for g in guidance_scales for n in guided_distill_steps]
    if teacher:
        rows += [Row(s, n, g) for g in guidance_scales for s in TEACHER_SOLVERS for n in steps]
        rows += [Row("dpm++", n, g) for g in guidance_scales for n in reference_steps if n not in steps]
    return rows


def teacher_start_notes(teacher, steps: list[int], steps_flag: str | None = "--steps") -> list[str]:
    """What `lcm generate --sampler` notes of each of the teacher's rows (`sampling.solver_start_note`), which `lcm evaluate`
    and the demo say under their table: under SD's scheduler config (the built-in world's as well) one DDIM step starts
    at timestep 1, and its row scores the starting noise, not a 1-step sample (the world's DDIM FID of about 420). The
    fewest steps that start elsewhere are named as a value of `steps_flag`, where the caller has that flag (the demo has
    none: None)."""
    if teacher is None:
        return []
    found = (solver_start_note(teacher, sampler, n, steps_flag) for sampler in TEACHER_SOLVERS for n in steps)
    return [f"The teacher's rows: {note}" for note in found if note]


class ReferenceImages:
    """The real images FID compares generated ones with, read again a batch at a time on each pass over them (`batches`),
    never all held: at 512 px the 30,000 of a paper-sized evaluation are 94 GB as float32. An evaluation reads them once
    for its fingerprint and once per feature network (`FeatureScorer.reference_features`)."""

    def __init__(self, read: Callable[[], Iterable[torch.Tensor]]):
        self.read = read  # each call gives the images one by one, the same ones in the same order
        self.count: int | None = None  # known after a whole pass

    @classmethod
    def of(cls, images: torch.Tensor) -> ReferenceImages:
        """Images a caller already holds (the built-in world's demo: a few hundred small ones)."""
        reference = cls(lambda: iter(images))
        reference.count = len(images)
        return reference

    def __iter__(self) -> Iterator[torch.Tensor]:
        count = 0
        for image in self.read():
            yield image
            count += 1
        self.count = count

    def __len__(self) -> int:
        if self.count is None:
            self.count = sum(1 for _ in self.read())
        return self.count

    def batches(self, size: int) -> Iterator[torch.Tensor]:
        """The images [B, 3, H, W], `size` at a time, in order."""
        images = iter(self)
        while batch := list(itertools.islice(images, size)):
            yield torch.stack(batch)


@dataclass
class EvalSet:
    """What every row is scored on: prompts (each repeated `images_per_prompt` times), their attributes when a world
    judge reads them, and the real reference images (a tensor given is read from as `ReferenceImages.of`)."""

    prompts: list[str]
    attributes: list | None
    reference: ReferenceImages
    images_per_prompt: int = 1
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.reference, torch.Tensor):
            self.reference = ReferenceImages.of(self.reference)

    @property
    def all_prompts(self) -> list[str]:
        return [p for p in self.prompts for _ in range(self.images_per_prompt)]

    @property
    def all_attributes(self) -> list | None:
        return None if self.attributes is None else [a for a in self.attributes for _ in range(self.images_per_prompt)]

    def parts(self, size: int) -> Iterator[EvalSet]:
        """The set's images `size` at a time, each part an EvalSet of its own: its prompts and attributes one image each,
        its seeds from `seed + start`, so that image i starts from the noise it has in the whole set (`generate`)."""
        prompts, attributes = self.all_prompts, self.all_attributes
        for start in range(0, len(prompts), size):
            yield EvalSet(prompts[start:start + size], None if attributes is None else attributes[start:start + size], self.reference,
                          1, self.seed + start)

    def fingerprint(self, *identities: str) -> str:
        """What a saved row must have been scored on to be reused: these prompts, noise and reference images, and the
        `identities` of the metrics (format 3's: of the models as well). The reference images' float32 bytes are hashed an
        image at a time, in order: the digest of them stacked, as results.json was fingerprinted when they were held whole."""
        return self.fingerprints(identities)[0]

    def fingerprints(self, *identity_lists: Iterable[str]) -> list[str]:
        """`fingerprint` of each of `identity_lists`, in one pass over the reference images."""
        digests = [hashlib.sha256(json.dumps([self.prompts, self.images_per_prompt, self.seed, *identities]).encode())
                   for identities in identity_lists]
        for image in self.reference:
            data = image.float().contiguous().numpy()
            for digest in digests:
                digest.update(data)
        return [digest.hexdigest()[:16] for digest in digests]


class Scorer:
    """A metric plug-in: named numbers for a row's generated images, handed to it a batch at a time (`update`) between
    `reset` and `compute`, so that no row's images are ever held whole."""

    name: str

    @property
    def identity(self) -> str:
        """What a saved result must have been scored with to be reused (`run_table`)."""
        return self.name

    def reset(self) -> None:
        """Forget the images of the row before: a row starts."""

    def update(self, images: torch.Tensor, part: EvalSet) -> None:
        """A batch of the row's images, those of `part` (`EvalSet.parts`: their prompts and attributes)."""
        raise NotImplementedError

    def compute(self, eval_set: EvalSet) -> dict[str, float]:
        """The row's scores, from the batches given since `reset`."""
        raise NotImplementedError

    def state(self) -> dict:
        """What the batches given since `reset` left (tensors, numbers): `load_state` of it after a `reset` goes on as if
        they had been given again."""
        return {}

    def load_state(self, state: dict) -> None:
        """Take up `state` (`state`) after a `reset`."""


class FeatureScorer(Scorer):
    """FID and KID in a feature network's space against the reference images; `unit_kid_features`: KID on
    features scaled to unit RMS (`fid.kid_score`), for any network but Inception. `source`: which network it is (its
    `model_identity`), so that results scored with another one are not reused. The reference images' features are
    computed once, at the first row, and kept for every row (N x F floats: 245 MB for 30,000 Inception features); a
    row's are kept until it is scored."""

    def __init__(self, name: str, network, unit_kid_features: bool = True, source: str = ""):
        self.name, self.network, self.unit_kid_features, self.source = name, network, unit_kid_features, source
        self._reference: tuple[ReferenceImages, torch.Tensor] | None = None  # (reference, its features): the same for every row
        self._features: list[torch.Tensor] = []  # the row's, a batch each

    @property
    def identity(self) -> str:
        identity = f"{self.name}, KID on unit features" if self.unit_kid_features else self.name
        return f"{identity} of {self.source}" if self.source else identity

    def reset(self) -> None:
        self._features = []

    def update(self, images: torch.Tensor, part: EvalSet) -> None:
        self._features.append(network_features(self.network, images))

    def state(self) -> dict:
        return {"features": torch.cat(self._features)}

    def load_state(self, state: dict) -> None:
        self._features = [state["features"]]

    def compute(self, eval_set: EvalSet) -> dict[str, float]:
        real, fake = self.reference_features(eval_set.reference), torch.cat(self._features)
        scale = feature_rms_of(real) if self.unit_kid_features else 1.0
        return {"fid": fid_of_features(real, fake), "kid": kid_of_features(real, fake, subsets=50, feature_scale=scale)}

    def reference_features(self, reference: ReferenceImages) -> torch.Tensor:
        """The network's features of the reference images, read a batch at a time on the first call for them."""
        if self._reference is None or self._reference[0] is not reference:
            features = [network_features(self.network, images, real=True) for images in reference.batches(compare.MAX_BATCH)]
            self._reference = (reference, torch.cat(features))
        return self._reference[1]


class JudgeScorer(FeatureScorer):
    """The built-in world's judge: FID and KID in its features, and how much of each prompt it reads back (`alignment`:
    the fraction of images showing each attribute of their prompt, and their "mean", as `world.judge.prompt_alignment`)."""

    def __init__(self, judge, alignment: Callable, source: str = ""):
        super().__init__("judge", judge, source=source)
        self.alignment = alignment
        self._read_back: dict[str, int] = {}  # per attribute, the row's images showing it

    def reset(self) -> None:
        super().reset()
        self._read_back = {}

    def update(self, images: torch.Tensor, part: EvalSet) -> None:
        super().update(images, part)
        for name, fraction in self.alignment(self.network, images, part.all_attributes).items():
            if name != "mean":  # the batch's fraction × its size: a count, up to the float's rounding
                self._read_back[name] = self._read_back.get(name, 0) + round(fraction * len(images))

    def state(self) -> dict:
        return super().state() | {"read_back": dict(self._read_back)}

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self._read_back = dict(state["read_back"])

    def compute(self, eval_set: EvalSet) -> dict[str, float]:
        images = sum(map(len, self._features))
        alignment = {name: count / images for name, count in self._read_back.items()}
        alignment["mean"] = sum(alignment.values()) / len(alignment)
        return super().compute(eval_set) | {f"alignment_{k}" if k != "mean" else "alignment": v for k, v in alignment.items()}


class ClipScorer(FeatureScorer):
    """CLIP score of each image with its prompt, and FID and KID in CLIP image features (the same embeddings)."""

    def __init__(self, clip, source: str = ""):
        super().__init__("clip", clip, source=source)
        self._scores: list[torch.Tensor] = []  # the row's, a batch each

    def reset(self) -> None:
        super().reset()
        self._scores = []

    def update(self, images: torch.Tensor, part: EvalSet) -> None:
        super().update(images, part)
        self._scores.append(self.network.scores(self._features[-1], part.all_prompts))

    def state(self) -> dict:
        return super().state() | {"scores": torch.cat(self._scores)}

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self._scores = [state["scores"]]

    def compute(self, eval_set: EvalSet) -> dict[str, float]:
        return super().compute(eval_set) | {"clip_score": float(torch.cat(self._scores).mean())}


def generate(row: Row, lcm: DiffusionModel | None, teacher: DiffusionModel | None, eval_set: EvalSet, device,
             guided: dict[int, DiffusionModel] | None = None, batch: int | None = None) -> torch.Tensor:
    """The row's images for every prompt, `batch` at a time (default `compare.batch_size`); image i starts from seed
    `eval_set.seed + i` whatever the sampler. `guided`: the Guided-Distill model of each step count (key 0: one for every
    step count)."""
    prompts = eval_set.all_prompts
    if row.sampler == "lcm":  # an LCM-LoRA (no ω input) is guided with CFG at g > 1, as diffusers does
        return sample_consistency(lcm.consistency_model(row.guidance_scale), lcm.timesteps(row.steps), lcm, prompts, row.guidance_scale,
                                  eval_set.seed, device, batch)
    if row.sampler == EXACT:  # the teacher's f* on the LCM's timesteps, prompts encoded and images decoded by the teacher
        uncond = teacher.prompts.uncond(device)
        f = TeacherConsistencyFunction(teacher.guided_teacher(), get_solver(EXACT_SOLVER), lcm.skip, uncond)
        g = teacher_guidance_scale(row.guidance_scale, teacher)
        return sample_consistency(f, lcm.timesteps(row.steps), teacher, prompts, g, eval_set.seed, device, batch)
    if row.sampler == GUIDED_DISTILL:
        model = guided.get(row.steps) or guided[0]
        return sample_guided(model, "ddim", row.steps, prompts, row.guidance_scale, eval_set.seed, device, batch)
    return sample_guided(teacher, row.sampler, row.steps, prompts, row.guidance_scale, eval_set.seed, device, batch)


def _peak_memory_mb(device) -> float | None:
    """The peak memory of a batch of a row on a CUDA device (its allocator's high-water mark since the batch started; the
    row's is the largest of its batches'); None elsewhere: a CPU process's resident-set peak only grows, so it would not
    tell one row from another."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


# Files whose size and modification time say which weights a model folder holds (`model_identity`)
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", "config.json", "model_index.json")


def model_identity(name_or_path: str) -> str:
    """A model's name and, for a local folder or file, its absolute path and a digest of the sizes and modification times
    of its weights and configs (through symlinks), or for a hub id the commit it loads: a model saved again at the same path
    (distilled again, another LoRA file) or a newer commit of a hub id is another model, and the same folder however it is
    spelled (runs/lcm, runs/lcm/ as a shell completes it, ./runs/lcm, its absolute path) is the same one."""
    path = Path(name_or_path).expanduser()
    if not path.exists():
        revision = hub_revision(name_or_path)
        return name_or_path if revision is None else f"{name_or_path}@{revision}"
    files = model_files(path, MODEL_FILE_SUFFIXES)
    stamp = [(f.relative_to(path).as_posix() if f != path else f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return f"{path.resolve().as_posix()} {hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16]}"


def model_location(models):
    """`models` (a `model_identity`, or a `row_models` record of them) less what says which files each model holds: where
    each is (a local path, a hub id without its commit), with a style LoRA's weight as it is. Rows whose models differ in
    their files alone were sampled from the same place with other weights (a model distilled again into its folder)."""
    if isinstance(models, str):
        path, space, _ = models.rpartition(" ")
        return path if space else models.rpartition("@")[0] or models
    if isinstance(models, list):
        return [model_location(m) for m in models]
    if isinstance(models, dict):
        return {key: model_location(m) for key, m in models.items()}
    return models


# The names of the models in `row_models` and in `run_table`'s `settings` (the CLI's options, less their dashes)
MODEL_KEYS = ("lcm", "lora", "style_loras", "teacher", "guided_distill")


def row_models(row: Row, lcm: DiffusionModel, teacher: DiffusionModel | None, guided: dict[int, DiffusionModel], lcm_parts: dict,
               identity: Callable[[str], str] = model_identity) -> dict | None:
    """The models `row`'s images come from, by `identity` (`model_identity`), under MODEL_KEYS' names: the LCM's rows the LCM
    with `lcm_parts` (its LoRA and style LoRAs, as the caller records them); the exact LCM's the teacher and the LCM (its
    timesteps and k: not its style LoRAs, which it does not sample); the teacher's solvers the teacher; Guided-Distill's the
    model of its step count. None where the row has no model here (a teacher's row of an evaluation without one)."""
    own = {"lcm": identity(lcm.source)} | lcm_parts
    if row.sampler == "lcm":
        return own
    if row.sampler == GUIDED_DISTILL:
        model = guided.get(row.steps) or guided.get(0)
        return None if model is None else {"guided_distill": [identity(model.source)]}
    if teacher is None:
        return None
    if row.sampler == EXACT:
        return {key: value for key, value in own.items() if key != "style_loras"} | {"teacher": identity(teacher.source)}
    return {"teacher": identity(teacher.source)}


def row_of(record: dict) -> Row | None:
    """The row a saved record is of, from its fields (`score_row`); None for a record without them (edited by hand)."""
    try:
        return Row(str(record["sampler"]), int(record["steps"]), float(record["guidance_scale"]))
    except (KeyError, TypeError, ValueError):
        return None


class OtherEvaluation(UserError):
    """An --out holding another evaluation's results (`saved_results` with `keep_other`). `settings`: what its results.json
    records of the settings (`run_table`'s `settings`; a row sampled with other models: those models in their place), None
    where it records none (written before results.json held them); `current`: this evaluation's to compare with them
    (None: the caller's own), so that a caller can say which of them this evaluation changes."""

    def __init__(self, message: str, settings: dict | None, current: dict | None = None):
        super().__init__(message)
        self.settings, self.current = settings, current


def saved_results(path: Path, fingerprint: str, keep_other: bool, settings: dict | None = None,
                  format3: tuple[list[str], Callable[[dict], dict | None]] | None = None) -> dict[str, dict]:
    """The rows of `path` (results.json) that an earlier run of the same evaluation scored (same prompts, noise, reference
    images and metrics: `fingerprint`), each with the models it was sampled with, {} when there is none. `format3`:
    (the fingerprints format 3 gave this evaluation, `format3_identities`, the models of a row of it by its record): a file
    of format 3 with one of them is this evaluation's, of models given now, and its rows are taken up, each given its
    models (a row that has none here is dropped). A file there that is not an evaluation's results is a UserError, and
    so (with `keep_other`) are another evaluation's results (`OtherEvaluation`, `settings`: this evaluation's): they are
    not overwritten."""
    if not path.exists():
        return {}
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path} ({err.__class__.__name__}); it is not the results of an evaluation: move it away or "
                        "choose another --out") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("rows"), dict):
        raise UserError(f"{path} is not the results of an evaluation (a JSON object with rows): move it away or choose another --out")
    if saved.get("format") == RESULTS_FORMAT and saved.get("fingerprint") == fingerprint:
        return saved["rows"]
    if format3 is not None and saved.get("format") == FORMAT_3 and saved.get("fingerprint") in format3[0]:
        rows = {key: (record, format3[1](record)) for key, record in saved["rows"].items() if isinstance(record, dict)}
        return {key: record | {"models": models} for key, (record, models) in rows.items() if models is not None}
    if keep_other and saved.get("format") not in (RESULTS_FORMAT, FORMAT_3):
        raise UserError(f"{path.parent} holds the results of another evaluation, or of this one written by an earlier version of lcm "
                        "evaluate (which named the models or drew the LCM's images otherwise: its rows are not this version's); "
                        "choose another --out, or move them away to score the rows again")
    if keep_other:
        record = saved.get("settings")
        record = record if isinstance(record, dict) else None
        if record is not None and settings is not None and saved.get("format") == RESULTS_FORMAT:  # its fingerprint has no models
            record = record | {key: settings[key] for key in MODEL_KEYS if key in settings}
        raise OtherEvaluation(f"{path.parent} holds the results of another evaluation (other prompts, seed, reference images or "
                              "metrics); choose another --out, or move them away to start over", record)
    return {}


def saved_format(path: Path):
    """The "format" of the results.json at `path`; None where there is none to read (`saved_results` says why)."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return saved.get("format") if isinstance(saved, dict) else None


def format3_identities(lcm: DiffusionModel, teacher: DiffusionModel | None, guided: dict[int, DiffusionModel], identities: tuple[str, ...],
                       shared: list[str], identity: Callable[[str], str]) -> list[list[str]]:
    """What format 3's fingerprint digested for an evaluation of these models (`identities`: the LCM's LoRA and style
    LoRAs as it named them; `shared`: the metrics), and for the same one before the teacher, the Guided-Distill models or
    both were added to it: a results.json of that format whose fingerprint is one of these holds rows of models given
    now (and none of those it lacked)."""
    teachers = [[teacher], []] if teacher is not None else [[]]
    distilled = [list(guided.values()), []] if guided else [[]]
    return [[*(identity(m.source) for m in (lcm, *some_teacher, *some_guided)), *identities, *shared]
            for some_teacher, some_guided in itertools.product(teachers, distilled)]


def run_table(rows: list[Row], lcm: DiffusionModel, teacher: DiffusionModel | None, eval_set: EvalSet, scorers: list[Scorer],
              out: Path, device, progress: bool = True, guided: dict[int, DiffusionModel] | None = None,
              identities: tuple[str, ...] = (), keep_other_results: bool = False, settings: dict | None = None,
              batch: int | None = None, lcm_parts: dict | None = None, tell: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Score every row, `batch` images at a time (`score_row`), writing `results.json` after each. A saved row of the same
    prompts, noise, reference and metrics (the fingerprint) is kept where it was sampled with the row's models now
    (`row_models`; `lcm_parts`: the LCM's LoRA and style LoRAs, as `settings` names them), so that a killed evaluation
    continues where it stopped and another model's rows (a teacher added) are sampled alone. A saved row whose models
    differ in their files alone (a model distilled again into its folder) is scored again; one of models elsewhere, or
    another evaluation's results, are replaced, or with `keep_other_results` refused (`OtherEvaluation`, `saved_results`),
    before any row is scored. `identities`: what format 3's fingerprint digested besides the models (the LoRA's and style
    LoRAs' identities as given then), to take up such a file. `settings`: a readable record of the evaluation, written
    beside the fingerprint, from which a rerun refused as another evaluation is told which setting it changed.
    `tell`: given one line saying how many saved rows were reused and how many scored, where any were saved."""
    path = out / RESULTS_FILE
    identity = functools.cache(model_identity)
    parts = lcm_parts or {}

    def models_of(row: Row | None) -> dict | None:
        return None if row is None else row_models(row, lcm, teacher, guided or {}, parts, identity)

    shared = [scorer.identity for scorer in scorers]
    earlier = format3_identities(lcm, teacher, guided or {}, identities, shared, identity) if saved_format(path) == FORMAT_3 else []
    fingerprint, *format3 = eval_set.fingerprints(shared, *earlier)  # format 3's only for a file of it: a pass hashes every image
    results = saved_results(path, fingerprint, keep_other_results, settings, (format3, lambda record: models_of(row_of(record))))
    wanted = {row.key: models_of(row) for row in rows}
    again = [row for row in rows if row.key in results and results[row.key].get("models") != wanted[row.key]]
    elsewhere = [row for row in again if isinstance(results[row.key].get("models"), dict)
                 and model_location(results[row.key]["models"]) != model_location(wanted[row.key])]
    if elsewhere and keep_other_results:
        row = elsewhere[0]
        raise OtherEvaluation(f"{out} holds the results of another evaluation: its {row.method(teacher)} rows were sampled with other "
                              "models; choose another --out, or move them away to start over",
                              None if settings is None else settings | results[row.key]["models"],
                              None if settings is None else settings | wanted[row.key])
    todo = [row for row in rows if row.key not in results or row in again]
    size = batch or compare.batch_size(lcm)  # a row's batches, which its saved progress must have been made in
    with progress_bar(total=len(rows), initial=len(rows) - len(todo), desc="evaluate", unit="row", disable=not progress) as bar:
        for row in todo:
            progress_file = RowProgress(out / PROGRESS_FILE, row.key, fingerprint, size, wanted[row.key])
            record = score_row(row, lcm, teacher, eval_set, scorers, device, guided, size, progress_file)
            results[row.key] = record | {"models": wanted[row.key]}
            saved = {"format": RESULTS_FORMAT, "fingerprint": fingerprint} | ({"settings": settings} if settings else {})
            write_json_atomic(path, saved | {"rows": results})
            bar.update(1)
    (out / PROGRESS_FILE).unlink(missing_ok=True)  # the last row's, or a row's that is scored now
    reused = len(rows) - len(todo)
    if tell is not None and (reused or again):
        tell(f"reused {reused} row(s) from {path}, scored {len(todo)}" + (f" ({len(again)} of them again: their models changed since "
                                                                           "they were scored)" if again else ""))
    return {row.key: results[row.key] for row in rows}


@dataclass
class RowProgress:
    """A row's progress in `path`, for the run after a kill: the images done (whole batches of `batch`), the scorers'
    states (`Scorer.state`), the sampling's seconds and peak memories so far. Only the same row of the same evaluation
    (`fingerprint`), sampled with the same models (`models`: `row_models`), in batches of the same size takes it up: its
    remaining batches are then the ones an unkilled run scores, and the row's scores are the same."""

    path: Path
    row: str
    fingerprint: str
    batch: int
    models: dict | None = None
    saved_at: float = field(default_factory=time.monotonic)

    def load(self, scorers: list[Scorer]) -> tuple[int, float, list]:
        """(images done, seconds, peaks) of this row as a killed run saved it, its scorers' states loaded; (0, 0.0, []) when
        there is none (another row's, another evaluation's, a file cut short)."""
        try:
            saved = torch.load(self.path, weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):
            return 0, 0.0, []
        identities = [scorer.identity for scorer in scorers]
        if not isinstance(saved, dict) or [saved.get(k) for k in ("row", "fingerprint", "batch", "models", "scorers")] != \
                [self.row, self.fingerprint, self.batch, self.models, identities]:
            return 0, 0.0, []
        for scorer, state in zip(scorers, saved["states"]):
            scorer.load_state(state)
        return saved["done"], saved["seconds"], saved["peaks"]

    def save(self, scorers: list[Scorer], done: int, seconds: float, peaks: list) -> None:
        """Save the progress if PROGRESS_SECONDS have passed since it was last saved (or the row started)."""
        if time.monotonic() - self.saved_at < PROGRESS_SECONDS:
            return
        saved = {"row": self.row, "fingerprint": self.fingerprint, "batch": self.batch, "models": self.models,
                 "scorers": [s.identity for s in scorers],
                 "states": [s.state() for s in scorers], "done": done, "seconds": seconds, "peaks": peaks}
        write_atomic(self.path, lambda tmp: torch.save(saved, tmp))
        self.saved_at = time.monotonic()


def score_row(row: Row, lcm: DiffusionModel, teacher: DiffusionModel | None, eval_set: EvalSet, scorers: list[Scorer], device,
              guided: dict[int, DiffusionModel] | None = None, batch: int | None = None, progress: RowProgress | None = None) -> dict:
    """The row's record: its images sampled `batch` at a time (`EvalSet.parts`; default `compare.batch_size` of the LCM,
    whose size its teacher shares), each batch handed to every scorer and dropped, so that memory holds one batch of
    images whatever the number of prompts; what the row costs (the sampling's time and peak memory, not the scoring's);
    then its scores. `progress`: where the row's progress is saved now and then, and taken up from after a kill."""
    for scorer in scorers:
        scorer.reset()
    done, seconds, peaks = progress.load(scorers) if progress is not None else (0, 0.0, [])
    for part in eval_set.parts(batch or compare.batch_size(lcm)):
        if part.seed - eval_set.seed < done:  # scored before the kill
            continue
        if torch.device(device).type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        images = generate(row, lcm, teacher, part, device, guided, batch)
        seconds += time.perf_counter() - start
        peaks.append(_peak_memory_mb(device))
        check_finite(images, row, teacher, first=part.seed - eval_set.seed, total=len(eval_set.all_prompts))
        for scorer in scorers:
            scorer.update(images, part)
        if progress is not None:
            progress.save(scorers, part.seed - eval_set.seed + len(images), seconds, peaks)
    count = len(eval_set.all_prompts)
    record = asdict(row) | {"method": row.method(teacher), "network_evaluations": row.network_evaluations(lcm, teacher),
                            "ms_per_image": 1000 * seconds / count, "peak_memory_mb": None if None in peaks else max(peaks), "images": count}
    for scorer in scorers:
        record |= {f"{scorer.name}_{k}": v for k, v in finite_scores(scorer, scorer.compute(eval_set), row, teacher).items()}
    return record


def check_finite(images: torch.Tensor, row: Row, teacher: DiffusionModel | None = None, first: int = 0, total: int | None = None) -> None:
    """A UserError when any of a batch of a row's images (its images `first`.. of `total`) holds NaN or infinite pixels (a
    model with broken weights, or overflow in half precision): their FID and KID would be NaN, not a score; the rows scored
    before it stay in results.json."""
    broken = int((~torch.isfinite(images.flatten(1).sum(1))).sum())  # an image's sum is NaN or infinite if a pixel is
    if broken:
        which = "" if total in (None, len(images)) else f" (its images {first + 1} to {first + len(images)} of {total})"
        raise UserError(f"{row.method(teacher)} at {row.steps} step(s), g = {row.guidance_scale:g}, made {broken} of {len(images)} images{which} with "
                        "NaN or infinite pixels: its model is broken (NaN weights, or overflow in half precision); the rows scored "
                        f"before it are kept in {RESULTS_FILE}")


def finite_scores(scorer: Scorer, scores: dict[str, float], row: Row, teacher: DiffusionModel | None = None) -> dict[str, float]:
    """`scores`, which `scorer` gave a row of finite images; a UserError when one is NaN or infinite: the metric's network
    is broken (NaN weights), and a NaN is not a score to report or to reuse on a rerun."""
    broken = [name for name, value in scores.items() if not math.isfinite(value)]
    if broken:
        raise UserError(f"the {scorer.name} metric gave {row.method(teacher)} at {row.steps} step(s), g = {row.guidance_scale:g}, a {broken[0]} of "
                        f"{scores[broken[0]]}: its network ({scorer.identity}) is broken (NaN weights?); the rows scored before it "
                        f"are kept in {RESULTS_FILE}")
    return scores


def metric_names(results: dict[str, dict]) -> tuple[str, str]:
    """(the FID to show, the prompt-following score to show): the judge's when there is one, else Inception's (the paper's
    Table 1, comparable with published FIDs), else CLIP's."""
    keys = next(iter(results.values())).keys()
    fid = next(k for k in ("judge_fid", "inception_fid", "clip_fid") if k in keys)
    follow = next((k for k in ("judge_alignment", "clip_clip_score") if k in keys), None)
    return fid, follow


FID_NOTES = {"judge_fid": "the world judge's features", "clip_fid": "CLIP image features", "inception_fid": "Inception features"}
FOLLOW_NOTES = {"judge_alignment": "alignment is the fraction of each prompt's attributes the world judge reads back from "
                                   "its image, averaged (higher is better)",
                "clip_clip_score": "CLIP score is 100 × the cosine of each image's and its prompt's CLIP embeddings, floored at 0, "
                                   "averaged (higher is better)"}


def metric_note(fid_key: str, follow_key: str | None, results: dict[str, dict]) -> str:
    """What the report's columns measure: FID in which features (lower is better), the prompt-following score, and
    where the metrics not shown are."""
    keys = next(iter(results.values())).keys()
    others = [k for k in FID_NOTES if k in keys and k != fid_key] + [k for k in FOLLOW_NOTES if k in keys and k != follow_key]
    text = f"FID is the Fréchet distance of the generated images to the reference images in {FID_NOTES[fid_key]} (lower is better)"
    text += "." if follow_key is None else f"; {FOLLOW_NOTES[follow_key]}."
    return text + (f" Also in `{RESULTS_FILE}`: {', '.join(others)}." if others else "")


def write_report(results: dict[str, dict], steps: list[int], out: Path | None, title: str, notes: list[str]) -> str:
    """report.md in `out` (when given) in the paper's layout: per guidance scale, one line per method, FID then prompt
    following at each step count; then what each row costs. Returns the text."""
    fid_key, follow_key = metric_names(results)
    follow_name = {"judge_alignment": "alignment", "clip_clip_score": "CLIP score", None: ""}[follow_key]
    scales = sorted({r["guidance_scale"] for r in results.values()})
    lines = [f"# {title}", "", *notes, "", metric_note(fid_key, follow_key, results), ""]
    for g in scales:
        at_g = [r for r in results.values() if r["guidance_scale"] == g]
        methods = list(dict.fromkeys(r["method"] for r in at_g))
        header = " | ".join(f"FID {n}" for n in steps) + ("" if follow_key is None else " | " + " | ".join(f"{follow_name} {n}" for n in steps))
        lines += [f"## g = {g:g} (ω = {g - 1:g})", "", f"| method | {header} |", "|---" * (1 + len(steps) * (1 if follow_key is None else 2)) + "|"]
        for method in methods:
            by_steps = {r["steps"]: r for r in at_g if r["method"] == method}
            if not any(n in by_steps for n in steps):
                continue
            cells = [f"{by_steps[n][fid_key]:.2f}" if n in by_steps else "-" for n in steps]
            if follow_key is not None:
                cells += [f"{by_steps[n][follow_key]:.3f}" if n in by_steps else "-" for n in steps]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        references = [r for r in at_g if r["sampler"] == "dpm++" and r["steps"] in REFERENCE_STEPS]
        for r in sorted(references, key=lambda r: r["steps"]):
            follow = "" if follow_key is None else f", {follow_name} {r[follow_key]:.3f}"
            lines.append(f"\nReference: {r['method']} {r['steps']} steps: FID {r[fid_key]:.2f}{follow}")
        lines.append("")
    lines += ["## Cost per image", "", "Network evaluations: network passes per image (classifier-free guidance takes two per step); ms: "
              "wall-clock time per image of the whole row (prompt encoding, sampling and decoding).", "",
              "| method | steps | g | network evaluations | ms | peak GPU memory (MB) |", "|---|---|---|---|---|---|"]
    methods = list(dict.fromkeys(r["method"] for r in results.values()))
    # by scale, method and step count, as the tables above (--steps 8,1,4 gave the FID columns 1, 4, 8 and these rows 8, 1, 4)
    for r in sorted(results.values(), key=lambda r: (r["guidance_scale"], methods.index(r["method"]), r["steps"])):
        memory = "-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        lines.append(f"| {r['method']} | {r['steps']} | {r['guidance_scale']:g} | {r['network_evaluations']} | {r['ms_per_image']:.1f} | {memory} |")
    text = "\n".join(lines) + "\n"
    if out is not None:
        write_text_atomic(out / "report.md", text)
    return text


# Axis labels of the plotted metrics: what each number is, and which way is better
METRIC_LABELS = {"judge_fid": "FID, judge features (lower is better)", "clip_fid": "FID, CLIP features (lower is better)",
                 "inception_fid": "FID, Inception features (lower is better)",
                 "judge_alignment": "alignment: fraction of prompt\nattributes read back (higher is better)",
                 "clip_clip_score": "CLIP score (higher is better)"}
METHOD_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
STEP_LINESTYLES = ("-", "--", ":", "-.")


def metric_label(key: str) -> str:
    return METRIC_LABELS.get(key, key.replace("_", " "))


def is_reference(row: dict, rows: list[dict]) -> bool:
    """Whether `row` is a DPM-Solver++ reference row (25 or 50 steps, not one of the table's step counts: no DDIM row at
    its step count and scale), plotted apart from the few-step curves it is measured against."""
    return (row["sampler"] == "dpm++" and row["steps"] in REFERENCE_STEPS
            and not any(r["sampler"] == "ddim" and r["steps"] == row["steps"] and r["guidance_scale"] == row["guidance_scale"] for r in rows))


def _method_styles(methods: list[str]) -> dict[str, dict]:
    """A colour and a marker per method, the same in every panel, so that lines drawn over each other (DPM-Solver and
    DPM-Solver++ at few steps) still read apart."""
    return {m: dict(color=f"C{i % 10}", marker=METHOD_MARKERS[i % len(METHOD_MARKERS)]) for i, m in enumerate(methods)}


def plain_ticks(ax, axis: str, values: list[float] | None = None) -> None:
    """Ticks in plain numbers (1, 2, 4, 8 steps; 20, 30 FID), not matplotlib's 2^n or 2×10^1 on log axes: at `values`
    when given, else where matplotlib's log formatter puts a label."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogFormatterSciNotation, NullFormatter

    class PlainLog(LogFormatterSciNotation):
        digits = 6  # `format_ticks` raises it where ticks that close would read alike (FID 1160.895 to 1160.897)

        def __call__(self, x, pos=None):
            return f"{x:.{self.digits}g}" if super().__call__(x, pos) else ""

        def format_ticks(self, values):
            self.set_locs(values)
            shown = [x for x in values if super(PlainLog, self).__call__(x)]
            self.digits = next((d for d in range(6, 16) if len({f"{x:.{d}g}" for x in shown}) == len(shown)), 16)
            return [self(x, i) for i, x in enumerate(values)]

    target = ax.xaxis if axis == "x" else ax.yaxis
    if values is not None:
        target.set_major_locator(FixedLocator(values))
        target.set_minor_formatter(NullFormatter())
        target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    else:
        target.set_major_formatter(PlainLog())
        target.set_minor_formatter(PlainLog(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def steps_figure(results: dict[str, dict]):
    """steps.png: FID and prompt following against the step count, one panel row per guidance scale, one line per
    method; the DPM-Solver++ reference rows (25 and 50 steps) as separate dashed points. One legend, outside the panels."""
    import matplotlib.pyplot as plt

    fid_key, follow_key = metric_names(results)
    keys = [k for k in (fid_key, follow_key) if k is not None]
    rows = list(results.values())
    scales = sorted({r["guidance_scale"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    styles = _method_styles(methods)
    reference_label = {m: f"{m}, reference" for m in methods}
    fig, axes = plt.subplots(len(scales), len(keys), figsize=(4.6 * len(keys) + 2.4, 3.2 * len(scales)), squeeze=False,
                             layout="constrained")
    for i, g in enumerate(scales):
        at_g = [r for r in rows if r["guidance_scale"] == g]
        for j, key in enumerate(keys):
            ax = axes[i][j]
            for method in methods:
                mine = [r for r in at_g if r["method"] == method]
                points = sorted((r["steps"], r[key]) for r in mine if not is_reference(r, rows))
                if points:
                    ax.plot(*zip(*points), label=method, **styles[method])
                references = sorted((r["steps"], r[key]) for r in mine if is_reference(r, rows))
                if references:
                    ax.plot(*zip(*references), linestyle="--", fillstyle="none", label=reference_label[method], **styles[method])
            ax.set_xscale("log", base=2)
            plain_ticks(ax, "x", sorted({r["steps"] for r in at_g}))
            ax.set_xlabel("sampling steps")
            ax.set_ylabel(metric_label(key))
            ax.set_title(f"g = {g:g} (ω = {g - 1:g})", fontsize=9)
            if key == fid_key:
                ax.set_yscale("log")
                plain_ticks(ax, "y")
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize=7)
    return fig


def guidance_figure(results: dict[str, dict]):
    """guidance.png (Figures 4-5): FID and prompt following against ω, one line per method and step count: a colour
    and marker per method, a line style per step count. One legend, outside the panels."""
    import matplotlib.pyplot as plt

    fid_key, follow_key = metric_names(results)
    keys = [k for k in (fid_key, follow_key) if k is not None]
    rows = list(results.values())
    methods = list(dict.fromkeys(r["method"] for r in rows))
    styles = _method_styles(methods)
    step_counts = sorted({r["steps"] for r in rows if not is_reference(r, rows)})
    omegas = sorted({r["guidance_scale"] - 1 for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys) + 2.8, 3.4), squeeze=False, layout="constrained")
    for j, key in enumerate(keys):
        ax = axes[0][j]
        for method in methods:
            for k, n in enumerate(step_counts):
                points = sorted((r["guidance_scale"] - 1, r[key]) for r in rows
                                if r["method"] == method and r["steps"] == n and not is_reference(r, rows))
                if len(points) > 1:
                    ax.plot(*zip(*points), linestyle=STEP_LINESTYLES[k % len(STEP_LINESTYLES)],
                            label=f"{method}, {n} step{'s' if n > 1 else ''}", **styles[method])
        ax.set_xlabel("guidance ω = g − 1")
        ax.set_ylabel(metric_label(key))
        plain_ticks(ax, "x", omegas)
        if key == fid_key:
            ax.set_yscale("log")
            plain_ticks(ax, "y")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=7, ncol=1 + len(labels) // 18)
    return fig


def write_plots(results: dict[str, dict], out: Path) -> list[Path]:
    """FID and prompt following against steps (one line per method, per guidance scale), and against ω when several
    scales were evaluated (one line per method and step count)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    with fonts.for_texts([r["method"] for r in results.values()]):  # a style LoRA's file name of any script
        fig = steps_figure(results)
        written.append(savefig_atomic(fig, out / "steps.png", dpi=110))
        plt.close(fig)
        if len({r["guidance_scale"] for r in results.values()}) > 1:
            fig = guidance_figure(results)
            written.append(savefig_atomic(fig, out / "guidance.png", dpi=110))
            plt.close(fig)
    return written


def grid_label(row: Row, teacher: DiffusionModel | None = None, lcm_label: str = "LCM") -> str:
    """A grid row's label: method (the LCM's as `lcm_label`: with the style LoRAs it samples with), step count with its
    unit, guidance scale."""
    method = lcm_label if row.sampler == "lcm" else row.method(teacher)
    return f"{method}, {row.steps} step{'s' if row.steps > 1 else ''}, g = {row.guidance_scale:g}"


def write_grid(rows: list[Row], lcm: DiffusionModel, teacher: DiffusionModel | None, eval_set: EvalSet, out: Path, device,
               columns: int = 8, real_row: bool = False, guided: dict[int, DiffusionModel] | None = None, name: str = "grid.png",
               lcm_label: str = "LCM", batch: int | None = None) -> Path:
    """Figure 2: the first prompts (columns, captioned) under every row, from the same noise, `batch` images sampled at
    once (`generate`); with `real_row`, the reference images first (when reference image i is prompt i's). Written as
    out/`name`; the LCM's rows are labelled `lcm_label` (`grid_label`)."""
    few = EvalSet(eval_set.prompts[:columns], None, eval_set.reference, 1, eval_set.seed)
    per_prompt = eval_set.images_per_prompt  # column j is prompt j's first scored image, from seed SEED + j × that
    columns_of = [few] if per_prompt == 1 else [EvalSet([prompt], None, eval_set.reference, 1, eval_set.seed + j * per_prompt)
                                                for j, prompt in enumerate(few.prompts)]
    images = ([next(eval_set.reference.batches(columns))] if real_row else []) + [
        torch.cat([generate(row, lcm, teacher, part, device, guided, batch) for part in columns_of]) for row in rows]
    labels = (["real"] if real_row else []) + [grid_label(row, teacher, lcm_label) for row in rows]
    path = out / name
    save_png(image_grid(images, labels, scale=max(1, 96 // images[0].shape[-1]), label_width=170, column_labels=few.prompts), path)
    return path
