"""A built world as the rest of the project uses it: `World` (the teacher's parts, the judge, the preset),
`load_world` for any world folder, and `default_world_path`, the one shipped with the package in fp16
(`assets/world_default`, made by `lcm world build --preset default` and `lcm world export`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from latent_consistency.errors import UserError
from latent_consistency.models import DiffusionModel, LatentCodec, load_diffusion_model
from latent_consistency.world.judge import Judge, load_judge
from latent_consistency.world.presets import WorldPreset

WORLD_FILE = "world.json"


@dataclass
class World:
    """A built world: the teacher's parts (`model`), the judge, and how it was made."""

    path: Path
    preset: WorldPreset
    prediction_type: str
    model: DiffusionModel
    judge: Judge  # of the world's dataset
    judges: dict[str, Judge]  # by dataset: the world's and each of its pretraining datasets'

    @property
    def dataset(self) -> str:
        return self.preset.dataset

    @property
    def resolution(self) -> int:
        return self.preset.resolution

    @property
    def codec(self) -> LatentCodec:
        return self.model.codec


def load_world(path: str | Path, device: str | torch.device = "cpu") -> World:
    """Load a world folder (a build or an fp16 export) in float32 on `device`."""
    path = Path(path)
    if not (path / WORLD_FILE).is_file():
        raise UserError(f"{path} is not a world folder (no {WORLD_FILE}); build one with `lcm world build`")
    spec = read_world_spec(path)
    if not (path / "model_index.json").is_file() or not (path / "judge").is_dir():
        raise _unfinished(path, spec)
    try:
        preset = WorldPreset.from_dict(spec["preset"])
    except (TypeError, ValueError, AttributeError):
        raise UserError(f"{path / WORLD_FILE} names a preset this version cannot read; rebuild the world with `lcm world build`") from None
    model = load_diffusion_model(str(path), dtype=torch.float32, device=device)
    judge = load_judge(path / "judge", device)
    judges = {preset.dataset: judge} | {name: load_judge(path / "judges" / name, device) for name in preset.pretraining_datasets}
    return World(path, preset, spec.get("prediction_type", "epsilon"), model, judge, judges)


def _unfinished(path: Path, spec: dict) -> UserError:
    """The refusal of a world folder without its pipeline or judge: a build is finished by running `lcm world build` on it
    again; an export (its world.json records its `weights_dtype`) has lost a part, which only its export can give back."""
    missing = "model_index.json" if not (path / "model_index.json").is_file() else "judge/"
    if spec.get("weights_dtype"):
        return UserError(f"the exported world in {path} lacks {missing}; export it again from the world it was built in "
                         "(`lcm world export --from BUILD --out NEW`)")
    return UserError(f"the world in {path} is not finished; run `lcm world build` on it again to finish it")


def read_world_spec(path: Path) -> dict:
    """The world.json of the world folder `path`: a JSON object with the preset the world was built with. A file of another
    kind there (damaged, or another tool's world.json) is a UserError, not a world."""
    try:
        spec = json.loads((path / WORLD_FILE).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        spec = None
    if not isinstance(spec, dict) or not isinstance(spec.get("preset"), dict):
        raise UserError(f"{path / WORLD_FILE} is not a world's description (a JSON object with its preset); "
                        "give a folder that `lcm world build` made, or a new one")
    return spec


def default_world_path() -> Path:
    """The world shipped with the package (the `default` preset's, in fp16)."""
    path = Path(__file__).resolve().parents[1] / "assets" / "world_default"
    if not (path / WORLD_FILE).is_file():
        raise UserError(
            f"the built-in world is missing from {path}; make it with `lcm world build --preset default --out DIR` "
            f"and `lcm world export --from DIR --out {path}`"
        )
    return path


