"""The default world shipped in `assets/world_default`: what the demo runs on.

It must be what `lcm world build --preset default` makes (same preset), fit the size budget, and its fp16
weights must still pass the quality bar, measured here on fewer samples than the build's report.
"""

import json

import pytest
import torch

from latent_consistency.world.artifact import default_world_path, load_world
from latent_consistency.world.datasets import REFERENCE_SPLITS, get_dataset
from latent_consistency.world.judge import judge_accuracy, prompt_alignment
from latent_consistency.world.presets import PRESETS, WorldPreset
from latent_consistency.world.quality import ALIGNMENT_MEAN, ALIGNMENT_MIN, GUIDANCE_GAP, VAE_ACCURACY_GAP, sample_images

SIZE_BUDGET = 20 * 2**20  # bytes of weights a package can carry without weighing on every install


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
            assert {f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).is_floating_point()} == {torch.float16}  # noqa: SIM118 (a safetensors handle)


def test_shipped_vae_keeps_what_the_judge_reads():
    """Measured, not read from the report: the judge reads 200 held-out images after an fp16 VAE round trip
    almost as well as the images themselves."""
    world = load_world(default_world_path())
    reference = get_dataset(world.dataset, REFERENCE_SPLITS[world.dataset], world.resolution, seed=world.preset.seed)
    items = [reference[i] for i in range(200)]
    images = torch.stack([it["image"] for it in items])
    reconstructed = world.codec.decode(world.codec.encode(images)).clamp(-1, 1)
    real = judge_accuracy(world.judge, items, len(items))
    after = judge_accuracy(world.judge, [it | {"image": x} for it, x in zip(items, reconstructed)], len(items))
    gap = sum(real[a] - after[a] for a in real) / len(real)
    assert gap <= VAE_ACCURACY_GAP, (real, after)


@pytest.mark.slow
def test_shipped_teacher_follows_prompts_and_guidance_helps():
    """A fresh measurement on 100 reference prompts (the quality report used 1,000): the fp16 weights still follow
    their prompts with guidance, and clearly less without it."""
    world = load_world(default_world_path())
    reference = get_dataset(world.dataset, REFERENCE_SPLITS[world.dataset], world.resolution, seed=world.preset.seed)
    items = [reference[i] for i in range(100)]
    alignment = {g: prompt_alignment(world.judge, sample_images(world, [it["caption"] for it in items], g, world.preset.quality,
                                                                torch.device("cpu"), seed=1), [it["attributes"] for it in items])
                 for g in (world.preset.quality.guidance_scale, 1.0)}
    guided, unguided = alignment[world.preset.quality.guidance_scale], alignment[1.0]
    assert guided["mean"] >= ALIGNMENT_MEAN - 0.05, guided
    assert min(v for k, v in guided.items() if k != "mean") >= ALIGNMENT_MIN - 0.05, guided
    assert guided["mean"] - unguided["mean"] >= GUIDANCE_GAP, alignment


def test_a_demo_of_another_preset_builds_on_the_shipped_parts_it_shares():
    """`lcm demo --world-preset default-sdxl` copies the shipped tokenizer, judge and VAE (same data and settings) and
    trains the rest; a preset on other data (tiny's 256 images) shares nothing and builds every phase."""
    from latent_consistency.world.build import reusable_phases, world_spec
    from latent_consistency.world.demo import _shipped_parts_for

    assert _shipped_parts_for("default-sdxl") == default_world_path()
    assert reusable_phases(default_world_path(), world_spec(PRESETS["default-sdxl"], "epsilon")) == ["tokenizer", "judge", "vae"]
    assert _shipped_parts_for("tiny-sdxl") is None and _shipped_parts_for("tiny") is None
