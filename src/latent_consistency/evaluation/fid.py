"""FID (Heusel et al. 2017) and KID (Bińkowski et al. 2018) in any feature network's space.

The paper reports FID with Inception features (Section 5.1 of Luo et al. 2023). Here the features come
from any *feature network*: an object with `features(images) -> [B, F]` for [-1, 1] images and an int
`feature_dim` (the built-in world's judge is one), plugged into torchmetrics' metrics.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from latent_consistency.errors import UserError


class FeatureAdapter(nn.Module):
    """A feature network as torchmetrics takes one: `forward` gives the features, `num_features` their width."""

    def __init__(self, network):
        super().__init__()
        self.network = network
        self.num_features = network.feature_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network.features(images)


def _update(metric, real: torch.Tensor, fake: torch.Tensor, batch_size: int) -> None:
    for images, is_real in ((real, True), (fake, False)):
        if len(images) < 2:
            raise UserError(f"FID/KID needs at least 2 real and 2 generated images, got {len(real)} and {len(fake)}")
        for start in range(0, len(images), batch_size):
            metric.update(images[start : start + batch_size], real=is_real)


def _device(network) -> torch.device:
    param = next(iter(network.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def fid_score(network, real: torch.Tensor, fake: torch.Tensor, batch_size: int = 256) -> float:
    """FID between two sets of [-1, 1] images [N, 3, H, W], in the feature network's space."""
    metric = FrechetInceptionDistance(feature=FeatureAdapter(network)).to(_device(network))
    _update(metric, real, fake, batch_size)
    return float(metric.compute())


def kid_score(
    network, real: torch.Tensor, fake: torch.Tensor, batch_size: int = 256, subsets: int = 100, seed: int = 0
) -> float:
    """Mean KID over `subsets` random subsets of min(1000, N_real, N_fake) images, drawn with `seed`."""
    subset_size = min(1000, len(real), len(fake))
    with warnings.catch_warnings():  # that features are kept in memory: so are the images given here
        warnings.filterwarnings("ignore", "Metric `Kernel Inception Distance` will save all extracted features")
        metric = KernelInceptionDistance(feature=FeatureAdapter(network), subsets=subsets, subset_size=max(subset_size, 1))
    metric = metric.to(_device(network))
    _update(metric, real, fake, batch_size)
    with torch.random.fork_rng(devices=[]):  # torchmetrics draws the subsets from the global generator
        torch.manual_seed(seed)
        mean, _ = metric.compute()
    return float(mean)
