"""The judge: a small CNN that reads a toy-world image's caption attributes, trained on real images.

It stands in for the two networks of the paper's evaluation (Section 5.1 of Luo et al. 2023): its
penultimate features replace Inception's for FID (Heusel et al. 2017; it is a feature network of
`evaluation.fid`), and its per-attribute predictions replace CLIP for prompt alignment
(`prompt_alignment`: how much of its prompt a generated image shows). Each attribute (shape, colour,
size, position, background; or digit) gets its own linear head on shared features.

`shapes` judges train on fresh images of the "judge" split (the full attribute space, so held-out
compositions are read too), never repeating an image and without augmentation; `digits` judges
train on the "train" split. Both are scored on held-out real images (`judge_accuracy`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from latent_consistency.errors import UserError, first_line
from latent_consistency.world.datasets import (
    REFERENCE_SPLITS,
    attribute_names,
    attribute_values,
    check_dataset,
    get_dataset,
)
from latent_consistency.world.fit import Phase

DEFAULT_STEPS = {"shapes": 600, "digits": 500}
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.ReLU())


class Judge(nn.Module):
    """Attribute classifier over [-1, 1] images of `dataset` at `resolution` px (32, 64, ...: 4·2^k).

    Two coordinate channels are appended to the image (CoordConv, Liu et al. 2018) so position is read
    directly; stride-2 stages bring the map to 4x4, which is flattened into `feature_dim` features.
    GroupNorm keeps train and eval modes identical.
    """

    def __init__(self, dataset: str, resolution: int = 32, width: int = 32, feature_dim: int = 128, seed: int = 0):
        super().__init__()
        stages = round(math.log2(resolution / 4))
        if resolution < 8 or 4 * 2**stages != resolution:
            raise UserError(f"a judge needs a resolution of 4·2^k px, such as 32 or 64; got {resolution}")
        self.dataset, self.resolution = check_dataset(dataset), resolution
        self.width, self.feature_dim = width, feature_dim
        self.seed = seed  # the data seed it was trained with (it fixes the digits split)
        self.attributes = attribute_names(dataset)
        layers, channels = [_conv(5, width // 2)], width // 2
        for k in range(stages):
            out = width * min(2**k, 2)
            layers += [_conv(channels, out, stride=2), _conv(out, out)]
            channels = out
        self.body = nn.Sequential(*layers)
        self.project = nn.Sequential(nn.Flatten(), nn.Linear(channels * 16, feature_dim), nn.ReLU())
        self.heads = nn.ModuleDict(
            {a: nn.Linear(feature_dim, len(attribute_values(dataset, a))) for a in self.attributes}
        )

    def config(self) -> dict:
        return {"dataset": self.dataset, "resolution": self.resolution, "width": self.width,
                "feature_dim": self.feature_dim, "seed": self.seed}  # fmt: skip

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(features [B, F], logits per attribute) with gradients, for training."""
        if images.dim() != 4 or images.shape[1:] != (3, self.resolution, self.resolution):
            raise UserError(
                f"this judge reads [B, 3, {self.resolution}, {self.resolution}] images, got {list(images.shape)}; "
                f"use a judge trained at the images' resolution"
            )
        param = next(self.parameters())
        images = images.to(param.device, param.dtype)
        side = torch.linspace(-1, 1, self.resolution, device=param.device, dtype=param.dtype)
        coords = torch.stack(torch.meshgrid(side, side, indexing="ij")).expand(len(images), -1, -1, -1)
        features = self.project(self.body(torch.cat([images, coords], dim=1)))
        return features, {a: head(features) for a, head in self.heads.items()}

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features [B, F] of [-1, 1] images [B, 3, H, W] (the FID embedding)."""
        return self(images)[0]

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self(images)[1]

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per attribute, the index of the predicted value in `attribute_values(dataset, attribute)`."""
        return {a: logits.argmax(dim=1) for a, logits in self.logits(images).items()}


def attribute_targets(dataset: str, attributes: list) -> dict[str, torch.Tensor]:
    """Per attribute name, the LongTensor of class indices of a list of attribute dataclasses."""
    targets = {}
    for name in attribute_names(dataset):
        index = {value: i for i, value in enumerate(attribute_values(dataset, name))}
        try:
            targets[name] = torch.tensor([index[getattr(a, name)] for a in attributes], dtype=torch.long)
        except (AttributeError, KeyError) as error:
            raise UserError(
                f"attributes do not belong to the {dataset} dataset ({error}); pass that dataset's attributes"
            ) from None
    return targets


def _collate(items: list[dict], dataset: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    images = torch.stack([item["image"] for item in items])
    return images, attribute_targets(dataset, [item["attributes"] for item in items])


def _training_batches(dataset: str, resolution: int, steps: int, batch_size: int, seed: int) -> Iterator:
    """`shapes`: consecutive fresh items of the "judge" split. `digits`: random draws of "train"."""
    if dataset == "shapes":
        data = get_dataset("shapes", "judge", resolution, seed=seed, size=steps * batch_size)
        for step in range(steps):
            yield _collate([data[i] for i in range(step * batch_size, (step + 1) * batch_size)], dataset)
    else:
        data = get_dataset("digits", "train", resolution, seed=seed)
        images, targets = _collate([data[i] for i in range(len(data))], dataset)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            pick = torch.randint(len(images), (batch_size,), generator=generator)
            yield images[pick], {a: t[pick] for a, t in targets.items()}


def judge_loss(judge: Judge, images: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over attributes of the cross-entropy of each head."""
    logits = judge(images)[1]
    return sum(F.cross_entropy(logits[a], targets[a].to(logits[a].device)) for a in judge.attributes)


def train_judge(
    dataset: str,
    resolution: int = 32,
    steps: int | None = None,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
    lr: float = 2e-3,
) -> Judge:
    """Train a judge on real images with AdamW, a 3 % warm-up and cosine decay; `steps` defaults per dataset."""
    steps = DEFAULT_STEPS[check_dataset(dataset)] if steps is None else steps
    if steps < 1 or batch_size < 1:
        raise UserError(f"judge training needs steps >= 1 and batch_size >= 1, got {steps} and {batch_size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        judge = Judge(dataset, resolution, seed=seed).to(device)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps * 3 // 100)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps)))
    )
    batches = _training_batches(dataset, resolution, steps, batch_size, seed)
    phase = Phase(torch.device(device), progress=progress)
    phase.fit(dict(judge=judge), optimizer, schedule, lambda: judge_loss(judge, *next(batches)), steps, f"judge {dataset} {resolution}px")
    return judge.eval()


def attribute_accuracy(judge: Judge, images: torch.Tensor, attributes: list, batch_size: int = 256) -> dict[str, float]:
    """Per attribute, the fraction of `images` whose judged value equals theirs in `attributes`."""
    if len(images) != len(attributes) or len(images) == 0:
        raise UserError(
            f"need one set of attributes per image, got {len(images)} images and {len(attributes)} attribute sets"
        )
    targets = attribute_targets(judge.dataset, attributes)
    correct = dict.fromkeys(judge.attributes, 0)
    for start in range(0, len(images), batch_size):
        for name, predicted in judge.predict(images[start : start + batch_size]).items():
            correct[name] += int((predicted.cpu() == targets[name][start : start + batch_size]).sum())
    return {name: c / len(images) for name, c in correct.items()}


def prompt_alignment(judge: Judge, images: torch.Tensor, attributes: list, batch_size: int = 256) -> dict[str, float]:
    """Per attribute, the fraction of `images` showing the attribute of their prompt; "mean" averages them."""
    scores = attribute_accuracy(judge, images, attributes, batch_size)
    scores["mean"] = sum(scores.values()) / len(scores)
    return scores


def judge_scores(judge: Judge, images: torch.Tensor, attributes: list, real: torch.Tensor) -> dict:
    """Prompt alignment (per attribute and mean) and FID in the judge's features against `real` images."""
    from latent_consistency.evaluation.fid import fid_score

    return {"alignment": prompt_alignment(judge, images, attributes), "fid": fid_score(judge, real, images)}


def judge_accuracy(
    judge: Judge, dataset_split: str | torch.utils.data.Dataset | None = None, n: int = 1000, device="cpu"
) -> dict[str, float]:
    """Per-attribute accuracy on the first `n` items of held-out real images.

    `dataset_split` is a split name of the judge's dataset (default: its reference split, "reference"
    for shapes, "test" for digits; drawn with the judge's data seed) or a dataset of items.
    """
    judge.to(device)
    if dataset_split is None or isinstance(dataset_split, str):
        split = REFERENCE_SPLITS[judge.dataset] if dataset_split is None else dataset_split
        dataset_split = get_dataset(judge.dataset, split, judge.resolution, seed=judge.seed)
    items = [dataset_split[i] for i in range(min(n, len(dataset_split)))]
    images = torch.stack([item["image"] for item in items])
    return attribute_accuracy(judge, images, [item["attributes"] for item in items])


def save_judge(judge: Judge, directory: str | Path) -> None:
    """Write `config.json` and `model.safetensors` into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(judge.config(), indent=2))
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(directory / WEIGHTS_NAME))


def load_judge(directory: str | Path, device: str | torch.device = "cpu") -> Judge:
    """A judge saved by `save_judge`, in eval mode on `device`."""
    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
        raise UserError(f"no judge in {directory} (needs {CONFIG_NAME} and {WEIGHTS_NAME}); train one first")
    from safetensors import SafetensorError

    try:
        judge = Judge(**json.loads((directory / CONFIG_NAME).read_text()))
        judge.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
    except (ValueError, TypeError, RuntimeError, SafetensorError) as err:  # RuntimeError: weights of another judge's shape
        raise UserError(f"cannot load the judge in {directory}: {first_line(err)}; build the world again") from None
    return judge.to(device).eval()
