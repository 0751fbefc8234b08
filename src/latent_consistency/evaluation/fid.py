"""FID (Heusel et al. 2017) and KID (Bińkowski et al. 2018) in any feature network's space.

The paper reports FID with Inception features (Section 5.1 of Luo et al. 2023). Here the features come
from any *feature network*: an object with `features(images) -> [B, F]` for [-1, 1] images and an int
`feature_dim` (the built-in world's judge is one), plugged into torchmetrics' metrics (imported when first used: importing
torchmetrics takes about 2 s, which every `lcm` command would otherwise pay at start).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from latent_consistency.errors import UserError


class FeatureAdapter(nn.Module):
    """A feature network as torchmetrics takes one: `forward` gives the features (divided by `scale`),
    `num_features` their width; `finite` says whether every feature it gave was finite."""

    def __init__(self, network, scale: float = 1.0):
        super().__init__()
        self.network = network
        self.num_features = network.feature_dim
        self.scale = scale
        self.finite = True

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.network.features(images) / self.scale
        self.finite = self.finite and bool(torch.isfinite(features).all())
        return features


# FID fits a mean and a covariance to each set of features: it needs at least this many images in each
MIN_IMAGES = 2


def check_image_count(n: int, flag: str, each: str = "") -> None:
    """A UserError before any sampling, unless the `n` images that `flag` asks for (`each`: per what) can be scored."""
    if n < MIN_IMAGES:
        raise UserError(f"{flag} {n}: FID needs at least {MIN_IMAGES} images{each and ' ' + each}; give {flag} {MIN_IMAGES} or more")


def _update(metric, real: torch.Tensor, fake: torch.Tensor, batch_size: int) -> None:
    for images, is_real in ((real, True), (fake, False)):
        if len(images) < MIN_IMAGES:
            raise UserError(f"FID/KID needs at least {MIN_IMAGES} real and {MIN_IMAGES} generated images, got {len(real)} and {len(fake)}")
        if not torch.isfinite(images).all():  # the score would be NaN, with a LAPACK complaint on stderr
            raise UserError(f"the {'real' if is_real else 'generated'} images hold NaN or infinite values; FID/KID cannot score them")
        for start in range(0, len(images), batch_size):
            metric.update(images[start : start + batch_size], real=is_real)


def _device(network) -> torch.device:
    param = next(iter(network.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def fid_score(network, real: torch.Tensor, fake: torch.Tensor, batch_size: int = 256) -> float:
    """FID between two sets of [-1, 1] images [N, 3, H, W], in the feature network's space."""
    from torchmetrics.image.fid import FrechetInceptionDistance  # here, not at import: torchmetrics takes 2 s to import

    adapter = FeatureAdapter(network)
    metric = FrechetInceptionDistance(feature=adapter).to(_device(network))
    _update(metric, real, fake, batch_size)
    if not adapter.finite:  # a broken network (NaN weights): no score, and LAPACK may abort the process on a NaN covariance
        return float("nan")
    return float(metric.compute())


def feature_rms(network, images: torch.Tensor, batch_size: int = 256) -> float:
    """√(mean over `images` of ‖x‖²/F): the root mean square of one feature coordinate."""
    with torch.no_grad():
        squares = [network.features(images[i : i + batch_size]).double().pow(2).mean(1) for i in range(0, len(images), batch_size)]
    return float(torch.cat(squares).mean().sqrt())


def kid_score(
    network, real: torch.Tensor, fake: torch.Tensor, batch_size: int = 256, subsets: int = 100, seed: int = 0,
    feature_scale: float = 1.0,
) -> float:
    """Mean KID over `subsets` random subsets of min(1000, N_real, N_fake) images, drawn with `seed`.

    KID's kernel k(x, y) = (x·y/F + 1)³ is made for Inception's pool features, whose coordinates are O(1)
    or less; it is not invariant to the features' units. Both sets' features are divided by `feature_scale`
    first: the real set's `feature_rms` makes the score independent of the network's units (the world's judge
    has x·y/F ≈ 26: its raw KIDs between real halves and against noise are 207 and 3,753, on unit features
    0.021 and 0.31); 1 (raw features) for Inception, to match the usual tools.
    """
    subset_size = min(1000, len(real), len(fake))
    with warnings.catch_warnings():  # that features are kept in memory: so are the images given here
        warnings.filterwarnings("ignore", "Metric `Kernel Inception Distance` will save all extracted features")
        from torchmetrics.image.kid import KernelInceptionDistance

        metric = KernelInceptionDistance(feature=FeatureAdapter(network, feature_scale), subsets=subsets, subset_size=max(subset_size, 1))
    metric = metric.to(_device(network))
    _update(metric, real, fake, batch_size)
    with torch.random.fork_rng(devices=[]):  # torchmetrics draws the subsets from the global generator
        torch.manual_seed(seed)
        mean, _ = metric.compute()
    return float(mean)
