"""The models a run reads, as they were when it started: their identities go into the run folder (`sources.json`), and a
resume on another model at the same path (a teacher re-downloaded or distilled again into its folder) is refused, where
it would go on training the student towards a model it did not start with.

A model's identity is a digest of its weight and config files' names and sizes and of 8 samples of 64 KiB spread over
each file: cheap for a Stable Diffusion folder, independent of modification times (a folder copied with `cp -r` is the
same model), and different for weights trained again into the same architecture. A hub id has none: its name is in
config.json.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from latent_consistency.errors import UserError
from latent_consistency.evaluation.table import MODEL_FILE_SUFFIXES
from latent_consistency.outputs import write_json_atomic

FILE = "sources.json"
SAMPLES, SAMPLE_BYTES = 8, 64 * 1024
# The config fields that name a model a run reads
MODEL_FIELDS = ("teacher", "model", "lora", "student_init")


def model_digest(name_or_path: str) -> str | None:
    """The identity of a local model folder or file (see the module's docstring); None for a hub id or nothing."""
    path = Path(name_or_path)
    if not name_or_path or not path.exists():
        return None
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file() and f.name.endswith(MODEL_FILE_SUFFIXES))
    digest = hashlib.sha256()
    for file in files:
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


def check_sources(out: Path, config) -> None:
    """A UserError when a model the run in `out` started with (its `sources.json`) is another model now at the same path."""
    try:
        saved = json.loads((out / FILE).read_text())
    except (OSError, ValueError):
        return  # a run from before the record, or none yet: nothing to compare
    now = run_sources(config)  # a model no longer there is not compared: --student-init's may be cleared away after the start
    for field, digest in (saved.items() if isinstance(saved, dict) else []):
        if field in now and now[field] != digest:
            flag = "--" + field.replace("_", "-")
            raise UserError(f"{flag} {getattr(config, field, '')} is not the model this run started with (its weight files changed "
                            f"since, {FILE} says); put that model back to resume, or start a new run with another --out")
