"""The models a run reads, as they were when it started: their identities go into the run folder (`sources.json`), and a
resume on another model at the same path (a teacher re-downloaded or distilled again into its folder) is refused, where
it would go on training the student towards a model it did not start with.

A local model's identity is a digest of its weight and config files' names and sizes and of 8 samples of 64 KiB spread
over each file (through symlinks: a hub cache's snapshot, a folder of links): cheap for a Stable Diffusion folder,
independent of modification times (a folder copied with `cp -r` is the same model), and different for weights trained
again into the same architecture. A hub id's is the commit it loads (`hub.hub_revision`: offline, the one in the local
cache), so that a resume after the repo moved on (a new commit pushed, downloaded since) is refused too.

The same identities let a run resume from models and data moved since (`proven_moves`): a model folder at another path
whose identity is the recorded one, the data or --eval-data at another path where the checkpoint records its fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from latent_consistency.errors import UserError
from latent_consistency.evaluation.table import MODEL_FILE_SUFFIXES
from latent_consistency.hub import hub_revision
from latent_consistency.models import model_files
from latent_consistency.outputs import write_json_atomic

FILE = "sources.json"
SAMPLES, SAMPLE_BYTES = 8, 64 * 1024
# The config fields that name a model a run reads
MODEL_FIELDS = ("teacher", "model", "lora", "student_init")
HUB_COMMIT = "commit "  # a hub id's identity: the commit it loads
CHECKPOINT_KEY = "sources"  # a checkpoint's state.json record of the run's model identities (`RunFolder.save`)
DATA_FIELD = "data"  # a checkpoint records its identity as each process's data fingerprint (`TrainingBatches.state_dict`)
EVAL_DATA_FIELD = "eval_data"  # a checkpoint records its identity under `EVAL_FINGERPRINT` (`RunFolder.save`)
EVAL_FINGERPRINT = "eval_data_fingerprint"


def model_digest(name_or_path: str) -> str | None:
    """The identity of a local model folder or file, or of a hub id (see the module's docstring); None for nothing, or a
    hub id that cannot be resolved."""
    path = Path(name_or_path)
    if not name_or_path:
        return None
    if not path.exists():
        revision = hub_revision(name_or_path)
        return None if revision is None else f"{HUB_COMMIT}{revision}"
    digest = hashlib.sha256()
    for file in model_files(path, MODEL_FILE_SUFFIXES):
        size = file.stat().st_size
        digest.update(json.dumps([file.name if file == path else file.relative_to(path).as_posix(), size]).encode())
        with open(file, "rb") as f:
            for i in range(SAMPLES):
                f.seek(size * i // SAMPLES)
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()[:16]


def run_sources(config) -> dict[str, str]:
    """{field: identity} of the local models `config` names."""
    named = {field: getattr(config, field, "") for field in MODEL_FIELDS}
    return {field: digest for field, value in named.items() if value and (digest := model_digest(value)) is not None}


def record_sources(out: Path, config) -> None:
    """Write the run's `sources.json` unless it has one (a resumed run keeps what it started with)."""
    if not (out / FILE).is_file():
        write_json_atomic(out / FILE, run_sources(config))


def recorded_sources(out: Path) -> dict:
    """The identities of the models the run in `out` started with (its `sources.json`); {} for a run from before the
    record, or none yet."""
    try:
        saved = json.loads((out / FILE).read_text())
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def teacher_line(model: str) -> list[tuple[str, str]] | None:
    """The teachers the exported `model` descends from, nearest first, each as (its path as its run's config.json names it,
    its identity as that run's sources.json recorded it): the teacher of the run folder above `model`, then, where that
    teacher is itself a run's export (a progressive round's stage-one model, an LCM's --student-init), its run's teacher,
    up to a teacher that is no run's export (the classifier-free-guided one). [] for a model that is no run's export;
    None where a link is broken: a teacher no longer the model its run recorded (`model_digest`; distilled again into its
    folder), whose run folder tells of another model."""
    line, path = [], Path(model)
    while path.is_dir() and len(line) < MAX_TEACHER_LINE:
        run = path.resolve().parent
        identity, teacher = recorded_sources(run).get("teacher"), _config_teacher(run)
        if not isinstance(identity, str) or teacher is None:
            return line
        if line and model_digest(str(path)) != line[-1][1]:
            return None
        line.append((teacher, identity))
        path = Path(teacher)
    return line


# At most this many teachers up a model's line (`teacher_line`): rounds of progressive distillation, a stage one, its teacher
MAX_TEACHER_LINE = 16


def _config_teacher(run: Path) -> str | None:
    """The teacher the run in `run` names in its config.json; None where there is none to read."""
    try:
        config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    teacher = config.get("teacher") if isinstance(config, dict) else None
    return teacher if isinstance(teacher, str) and teacher else None


def check_sources(out: Path, config) -> None:
    """A UserError when a model the run in `out` started with (its `sources.json`) is another model now at the same path or
    hub id."""
    saved = recorded_sources(out)
    now = run_sources(config)  # a model no longer there is not compared: --student-init's may be cleared away after the start
    for field, digest in saved.items():
        if field in now and now[field] != digest:
            flag, name = "--" + field.replace("_", "-"), getattr(config, field, "")
            if str(digest).startswith(HUB_COMMIT):  # the repo moved on: the run's config names the hub id, not a folder to go back to
                raise UserError(f"{flag} {name} is not the model this run started with: the hub id loads {now[field]} now, the run "
                                f"started from {digest} ({FILE} says); start a new run with another --out")
            raise UserError(f"{flag} {name} is not the model this run started with (its weight files changed "
                            f"since, {FILE} says); put that model back to resume, or start a new run with another --out")


def proven_moves(out: Path, run, other, state: dict | None, of_checkpoint: bool = False) -> dict[str, tuple[str, str]]:
    """{field: (old path, new path)} of the sources that the run in `out`'s config (`run`, its config.json) and `other` (a
    resume's config, or the config of the checkpoint `state`: `of_checkpoint`) name at other places (`TrainConfig.moved_sources`)
    and whose content is provably the run's: a model whose identity at `other`'s path (as that checkpoint recorded it,
    else read there) is the one in the run's sources.json; the data or --eval-data where the checkpoint `state` records
    its fingerprint (`records_fingerprint`), which `RunFolder.load_checkpoint` compares with the data at the new path
    before the run rewrites config.json (`RunFolder.resume`). A source moved and changed is not among them: it differs,
    as before."""
    identities, given = recorded_sources(out), (state or {}).get(CHECKPOINT_KEY) if of_checkpoint else None
    given = given if isinstance(given, dict) else {}
    proven = {}
    for field, paths in run.moved_sources(other).items():
        if field in MODEL_FIELDS:
            identity = given.get(field) or model_digest(paths[1])
            same = identity is not None and identity == identities.get(field)
        else:
            same = records_fingerprint(field, state)
        if same:
            proven[field] = paths
    return proven


def records_fingerprint(field: str, state: dict | None) -> bool:
    """Whether a checkpoint's `state` holds the fingerprint of the data field `field` names: --data's for every process
    (`TrainingBatches.state_dict`), --eval-data's (`EVAL_FINGERPRINT`). A registered dataset's (the built-in world's) has
    none, nor has a checkpoint of an older version."""
    state = state or {}
    if field == EVAL_DATA_FIELD:
        return isinstance(state.get(EVAL_FINGERPRINT), str)
    data = state.get("data") if field == DATA_FIELD else None
    return isinstance(data, list) and bool(data) and all(isinstance(d, dict) and d.get("fingerprint") for d in data)


def moved_note(moves: dict[str, tuple[str, str]]) -> str:
    """The one line that says which sources a resumed run reads at new paths."""
    return ("note: " + "; ".join(f"--{field.replace('_', '-')} moved from {old} to {new}" for field, (old, new) in moves.items())
            + ": the same content as this run's (sources.json, the checkpoint's data fingerprint); its config.json now names the new "
            "place")
