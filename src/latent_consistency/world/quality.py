"""The quality bar of a world's teacher and VAE, measured with the world's judge.

- Teacher: images sampled with `sampler` in `num_steps` steps at the preset's guidance scale g and at
  g = 1 (no guidance) for the captions of the reference split; prompt alignment (the judge reads each
  attribute back) and FID in the judge's feature space against the reference images, next to the FID
  of as many real training images (the floor a perfect generator would reach). Bar: mean alignment
  >= 0.85 and every attribute >= 0.7 with guidance, and clearly lower alignment without it.
- VAE: the judge's accuracy on reconstructions D(E(x)) of reference images within 0.02 of its
  accuracy on the images themselves, for the world's dataset and for each pretraining dataset.
- A grid: per row, a real image of a prompt and then samples of that prompt with guidance.
"""

from __future__ import annotations

from pathlib import Path

import torch

from latent_consistency.evaluation.fid import check_image_count, fid_score
from latent_consistency.grids import image_grid, save_png
from latent_consistency.outputs import writable_folder, write_json_atomic
from latent_consistency.progress import progress_bar
from latent_consistency.sampling import randn, sample_teacher
from latent_consistency.world.artifact import World
from latent_consistency.world.datasets import REFERENCE_SPLITS, get_dataset
from latent_consistency.world.judge import judge_accuracy, prompt_alignment
from latent_consistency.world.presets import QualityConfig

ALIGNMENT_MEAN, ALIGNMENT_MIN, GUIDANCE_GAP, VAE_ACCURACY_GAP = 0.85, 0.7, 0.05, 0.02
BATCH = 250
GRID_LABEL_WIDTH = 340  # px at least: a shapes caption (`image_grid` widens it to the longest)


@torch.no_grad()
def sample_images(
    world: World,
    prompts: list[str],
    guidance_scale: float,
    config: QualityConfig,
    device: torch.device,
    seed: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Teacher samples for `prompts` with classifier-free guidance g, as [N,3,H,W] in [-1, 1] on the CPU."""
    model = world.model
    teacher = model.guided_teacher()
    uncond = model.prompts.uncond(device)
    generator = torch.Generator(device).manual_seed(seed)
    shape = (model.unet.config.in_channels, world.preset.latent_size, world.preset.latent_size)
    images = []
    for start in progress_bar(range(0, len(prompts), BATCH), desc=f"teacher samples g={guidance_scale:g}", unit="batch", disable=not progress):
        chunk = prompts[start : start + BATCH]
        cond = model.prompts.encode(chunk, device)
        z_T = randn((len(chunk), *shape), generator, device, torch.float32)
        z_0 = sample_teacher(
            teacher, config.sampler, z_T, cond, uncond.expand(len(chunk), -1, -1), guidance_scale, config.num_steps, model.scheduler_config
        )
        images.append(world.codec.decode(z_0).clamp(-1, 1).float().cpu())
    return torch.cat(images)


@torch.no_grad()
def vae_quality(world: World, items: list[dict], judge, device) -> dict:
    """The judge on VAE reconstructions D(E(x)) against the judge on the same real images, per attribute."""
    images = torch.stack([item["image"] for item in items])
    reconstructed = torch.cat([world.codec.decode(world.codec.encode(images[i : i + BATCH].to(device))).clamp(-1, 1).cpu()
                               for i in range(0, len(images), BATCH)])
    accuracy_real = judge_accuracy(judge, items, len(items), device)
    accuracy_reconstructed = judge_accuracy(judge, [item | {"image": x} for item, x in zip(items, reconstructed)], len(items), device)
    gaps = {a: accuracy_real[a] - accuracy_reconstructed[a] for a in accuracy_real}
    return {
        "num_samples": len(items),
        "judge_accuracy_real": accuracy_real,
        "judge_accuracy_reconstructed": accuracy_reconstructed,
        "mean_gap": sum(gaps.values()) / len(gaps),
        "max_gap": max(gaps.values()),
        "l1": float((reconstructed - images).abs().mean()),
    }


def _items(dataset, n: int) -> list[dict]:
    return [dataset[i] for i in range(min(n, len(dataset)))]


def check_samples(n: int) -> None:
    """A UserError unless `n` generated images per guidance scale can be scored (`fid.check_image_count`)."""
    check_image_count(n, "--samples", "per guidance scale")


@torch.no_grad()
def measure_quality(world: World, config: QualityConfig, out_dir: Path, device: torch.device, progress: bool = True) -> dict:
    """Write `quality.json` and `teacher_grid.png` into `out_dir`; returns the report."""
    preset, judge = world.preset, world.judge
    check_samples(config.num_samples)  # before --out is made
    out_dir = writable_folder(out_dir, "--out")
    reference = _items(get_dataset(preset.dataset, REFERENCE_SPLITS[preset.dataset], preset.resolution, seed=preset.seed), config.num_samples)
    real = torch.stack([item["image"] for item in reference])
    train = _items(get_dataset(preset.dataset, "train", preset.resolution, seed=preset.seed), len(reference))
    prompts = [item["caption"] for item in reference]
    attributes = [item["attributes"] for item in reference]

    # Teacher, with and without guidance.
    teacher = {"sampler": config.sampler, "num_steps": config.num_steps, "num_samples": len(reference)}
    for key, g in (("guided", config.guidance_scale), ("unguided", 1.0)):
        fake = sample_images(world, prompts, g, config, device, seed=preset.seed, progress=progress)
        teacher[key] = {
            "guidance_scale": g,
            "alignment": prompt_alignment(judge, fake, attributes),
            "fid": fid_score(judge, real, fake),
        }
    teacher["fid_real_floor"] = fid_score(judge, real, torch.stack([item["image"] for item in train]))

    # VAE: on the world's reference images and on those of each pretraining dataset
    vae = vae_quality(world, reference[: config.vae_samples], judge, device)
    vae_pretraining = {
        name: vae_quality(world, _items(get_dataset(name, REFERENCE_SPLITS[name], preset.resolution, seed=preset.seed), config.vae_samples),
                          world.judges[name], device)
        for name in preset.pretraining_datasets}

    # The grid: a real image of each prompt, then samples with guidance.
    grid_items = _items(get_dataset(preset.dataset, REFERENCE_SPLITS[preset.dataset], preset.resolution, seed=preset.seed), config.grid_prompts)
    grid_prompts = [item["caption"] for item in grid_items for _ in range(config.grid_samples)]
    samples = sample_images(world, grid_prompts, config.guidance_scale, config, device, seed=preset.seed + 1)
    samples = samples.view(len(grid_items), config.grid_samples, *real.shape[1:])
    rows = [torch.cat([item["image"][None], row]) for item, row in zip(grid_items, samples)]
    save_png(image_grid(rows, [item["caption"] for item in grid_items], scale=3, label_width=GRID_LABEL_WIDTH), out_dir / "teacher_grid.png")

    guided, unguided = teacher["guided"]["alignment"], teacher["unguided"]["alignment"]
    per_attribute = {a: v for a, v in guided.items() if a != "mean"}
    summary = {
        "alignment_guided": guided["mean"],
        "alignment_guided_worst": min(per_attribute.values()),
        "alignment_unguided": unguided["mean"],
        "fid_guided": teacher["guided"]["fid"],
        "fid_unguided": teacher["unguided"]["fid"],
        "fid_real_floor": teacher["fid_real_floor"],
        "vae_accuracy_gap": vae["mean_gap"],
        "passes": {
            "teacher_alignment": guided["mean"] >= ALIGNMENT_MEAN and min(per_attribute.values()) >= ALIGNMENT_MIN,
            "guidance_helps": guided["mean"] - unguided["mean"] >= GUIDANCE_GAP,
            "vae_reconstruction": vae["mean_gap"] <= VAE_ACCURACY_GAP,
        } | {f"vae_reconstruction_{name}": v["mean_gap"] <= VAE_ACCURACY_GAP for name, v in vae_pretraining.items()},
    }
    summary |= {f"vae_accuracy_gap_{name}": v["mean_gap"] for name, v in vae_pretraining.items()}
    report = {"summary": summary, "teacher": teacher, "vae": vae, "vae_pretraining": vae_pretraining,
              "grid": {"file": "teacher_grid.png", "captions": [i["caption"] for i in grid_items]}}
    write_json_atomic(out_dir / "quality.json", report, indent=2)
    return report
