"""FID (Heusel et al. 2017) and KID (Bińkowski et al. 2018) in a judge's feature space.

The paper reports FID with Inception features (Section 5.1 of Luo et al. 2023); the toy world swaps
Inception for the judge's penultimate features, through torchmetrics' pluggable feature network.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from latent_consistency.errors import UserError
from latent_consistency.evaluation.judge import Judge


class JudgeFeatures(nn.Module):
    """A judge's `features` as a torchmetrics feature network: [-1, 1] images -> [B, F]."""

    def __init__(self, judge: Judge):
        super().__init__()
        self.judge = judge
        self.num_features = judge.feature_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.judge.features(images)


def _update(metric, real: torch.Tensor, fake: torch.Tensor, batch_size: int) -> None:
    for images, is_real in ((real, True), (fake, False)):
        if len(images) < 2:
            raise UserError(f"FID/KID needs at least 2 real and 2 generated images, got {len(real)} and {len(fake)}")
        for start in range(0, len(images), batch_size):
            metric.update(images[start : start + batch_size], real=is_real)


def _device(judge: Judge) -> torch.device:
    return next(judge.parameters()).device


def fid_score(judge: Judge, real: torch.Tensor, fake: torch.Tensor, batch_size: int = 256) -> float:
    """FID between two sets of [-1, 1] images [N, 3, H, W], in the judge's feature space."""
    metric = FrechetInceptionDistance(feature=JudgeFeatures(judge)).to(_device(judge))
    _update(metric, real, fake, batch_size)
    return float(metric.compute())


def kid_score(
    judge: Judge, real: torch.Tensor, fake: torch.Tensor, batch_size: int = 256, subsets: int = 100, seed: int = 0
) -> float:
    """Mean KID over `subsets` random subsets of min(1000, N_real, N_fake) images, drawn with `seed`."""
    subset_size = min(1000, len(real), len(fake))
    with warnings.catch_warnings():  # that features are kept in memory: so are the images given here
        warnings.filterwarnings("ignore", "Metric `Kernel Inception Distance` will save all extracted features")
        metric = KernelInceptionDistance(feature=JudgeFeatures(judge), subsets=subsets, subset_size=max(subset_size, 1))
    metric = metric.to(_device(judge))
    _update(metric, real, fake, batch_size)
    with torch.random.fork_rng(devices=[]):  # torchmetrics draws the subsets from the global generator
        torch.manual_seed(seed)
        mean, _ = metric.compute()
    return float(mean)
