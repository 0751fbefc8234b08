"""The default world shipped in `assets/world_default`: what the demo runs on.

It must be what `lcm world build --preset default` makes (same preset), fit the size budget, carry a
quality report that passes the bar, and its fp16 weights must still generate what prompts ask for.
"""

import json

import torch

from latent_consistency.data.datasets import REFERENCE_SPLITS, get_dataset
from latent_consistency.evaluation.alignment import prompt_alignment
from latent_consistency.world.build import default_world_path, load_world
from latent_consistency.world.presets import PRESETS, WorldPreset
from latent_consistency.world.quality import ALIGNMENT_MEAN, ALIGNMENT_MIN, sample_images

SIZE_BUDGET = 20 * 2**20  # bytes of weights, as the world issue allows


def test_shipped_world_is_the_default_preset_in_fp16_within_budget():
    path = default_world_path()
    spec = json.loads((path / "world.json").read_text())
    assert WorldPreset.from_dict(spec["preset"]) == PRESETS["default"]
    weights = list(path.rglob("*.safetensors"))
    assert {w.parent.name for w in weights} >= {"unet", "vae", "text_encoder", "judge"}
    assert sum(w.stat().st_size for w in path.rglob("*") if w.is_file()) <= SIZE_BUDGET
    from safetensors import safe_open

    for w in weights:
        with safe_open(str(w), framework="pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).is_floating_point()} == {torch.float16}


def test_shipped_world_recorded_quality_passes_the_bar():
    report = json.loads((default_world_path() / "quality" / "quality.json").read_text())
    assert all(report["summary"]["passes"].values()), report["summary"]
    guided = report["teacher"]["guided"]["alignment"]
    assert guided["mean"] >= ALIGNMENT_MEAN and min(v for k, v in guided.items() if k != "mean") >= ALIGNMENT_MIN


def test_shipped_teacher_follows_prompts_after_the_fp16_round_trip():
    """A fresh measurement on 100 reference prompts (the report used 1,000): the loaded weights work."""
    world = load_world(default_world_path())
    reference = get_dataset(world.dataset, REFERENCE_SPLITS[world.dataset], world.resolution, seed=world.preset.seed)
    items = [reference[i] for i in range(100)]
    images = sample_images(world, [it["caption"] for it in items], world.preset.quality.guidance_scale,
                           world.preset.quality, torch.device("cpu"), seed=1)
    alignment = prompt_alignment(world.judge, images, [it["attributes"] for it in items])
    assert alignment["mean"] >= ALIGNMENT_MEAN - 0.05, alignment
