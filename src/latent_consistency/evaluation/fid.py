"""FID (Heusel et al. 2017) and KID (Bińkowski et al. 2018) in any feature network's space.

The paper reports FID with Inception features (Section 5.1 of Luo et al. 2023). Here the features come
from any *feature network*: an object with `features(images) -> [B, F]` for [-1, 1] images and an int
`feature_dim` (the built-in world's judge is one), fed to torchmetrics' metrics (imported when first used: importing
torchmetrics takes about 2 s, which every `lcm` command would otherwise pay at start). The metrics are computed from the
features (`fid_of_features`, `kid_of_features`), so that an evaluation computes the reference images' features once and
scores each row's images a batch at a time (`evaluation.table.FeatureScorer`) without holding any set of images whole.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from latent_consistency.errors import UserError
from latent_consistency.schedule import float64_on_host


class GivenFeatures(nn.Module):
    """Features already computed, as torchmetrics takes a feature network: `forward` passes them through,
    `num_features` is their width."""

    def __init__(self, width: int):
        super().__init__()
        self.num_features = width

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


# FID fits a mean and a covariance to each set of features: it needs at least this many images in each
MIN_IMAGES = 2


def check_image_count(n: int, flag: str, each: str = "") -> None:
    """A UserError before any sampling, unless the `n` images that `flag` asks for (`each`: per what) can be scored."""
    if n < MIN_IMAGES:
        raise UserError(f"{flag} {n}: FID needs at least {MIN_IMAGES} images{each and ' ' + each}; give {flag} {MIN_IMAGES} or more")


def _check_counts(real: int, fake: int) -> None:
    if real < MIN_IMAGES or fake < MIN_IMAGES:
        raise UserError(f"FID/KID needs at least {MIN_IMAGES} real and {MIN_IMAGES} generated images, got {real} and {fake}")


# How far past 1 a [-1, 1] image's values may reach: a VAE's decoded images overshoot by a few tenths at most (the feature
# networks clamp them); pixels in [0, 255] reach far above
RANGE_SLACK = 0.5
RANGE_BATCH = 8  # images in a batch before none of them darker than mid-gray says [0, 1] (`check_image_range`)


def check_image_range(images: torch.Tensor, what: str = "images") -> None:
    """A UserError for `images` whose values are clearly not in [-1, 1], which the feature networks would clamp into a
    silently wrong score: any value above 1 + `RANGE_SLACK` (pixels in [0, 255]), or, in a batch of at least
    `RANGE_BATCH` images, no value below 0 while they span at least half of [0, 1] (images in [0, 1], as torchvision gives
    them: a [-1, 1] batch of several images of real content has negative values, their darker half; one pale image may
    have none, and a constant image, gray zeros or white ones, passes)."""
    if not len(images):
        return
    lo, hi = (float(v) for v in torch.aminmax(images.detach().float()))
    if hi > 1 + RANGE_SLACK:
        raise UserError(f"{what} hold values in [{lo:g}, {hi:g}], not in [-1, 1]: pixels p in [0, 255] are p / 127.5 - 1 "
                        "(images in [0, 1]: x * 2 - 1)")
    if len(images) >= RANGE_BATCH and lo >= 0 and hi - lo >= 0.5:
        raise UserError(f"{what} hold values in [{lo:g}, {hi:g}], none below 0: they look like images in [0, 1], which are "
                        "x * 2 - 1 in [-1, 1] (pixels p in [0, 255]: p / 127.5 - 1)")


def network_features(network, images: torch.Tensor, batch_size: int = 256, real: bool = False) -> torch.Tensor:
    """The feature network's features [N, F] of [-1, 1] images [N, 3, H, W], `batch_size` at a time, on its device; a
    UserError when an image holds NaN or infinite values (`real`: the reference images'; else generated ones'). The
    networks that read images (Inception, CLIP) refuse ones clearly not in [-1, 1] themselves (`check_image_range`)."""
    if not torch.isfinite(images).all():  # the score would be NaN, with a LAPACK complaint on stderr
        raise UserError(f"the {'real' if real else 'generated'} images hold NaN or infinite values; FID/KID cannot score them")
    with torch.no_grad():
        return torch.cat([network.features(images[start : start + batch_size]) for start in range(0, len(images), batch_size)])


@float64_on_host
def fid_of_features(real: torch.Tensor, fake: torch.Tensor, batch_size: int = 256) -> float:
    """FID between two sets of features [N, F] (on one device); NaN when one holds a NaN or infinite value (a broken
    network, NaN weights: LAPACK may abort the process on a NaN covariance)."""
    from torchmetrics.image.fid import FrechetInceptionDistance  # here, not at import: torchmetrics takes 2 s to import

    _check_counts(len(real), len(fake))
    if not (torch.isfinite(real).all() and torch.isfinite(fake).all()):
        return float("nan")
    metric = FrechetInceptionDistance(feature=GivenFeatures(real.shape[1])).to(real.device)
    for features, is_real in ((real, True), (fake, False)):
        for start in range(0, len(features), batch_size):  # the sums in float64, a batch at a time
            metric.update(features[start : start + batch_size], real=is_real)
    return float(metric.compute())


@float64_on_host
def feature_rms_of(features: torch.Tensor) -> float:
    """√(mean over images of ‖x‖²/F) of features [N, F]: the root mean square of one feature coordinate."""
    return float(features.double().pow(2).mean(1).mean().sqrt())


@float64_on_host
def kid_of_features(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, seed: int = 0, feature_scale: float = 1.0) -> float:
    """Mean KID over `subsets` random subsets of min(1000, N_real, N_fake) features, drawn with `seed` (`kid_score`),
    both sets divided by `feature_scale`."""
    _check_counts(len(real), len(fake))
    with warnings.catch_warnings():  # that features are kept in memory: they are given here
        warnings.filterwarnings("ignore", "Metric `Kernel Inception Distance` will save all extracted features")
        from torchmetrics.image.kid import KernelInceptionDistance

        metric = KernelInceptionDistance(feature=GivenFeatures(real.shape[1]), subsets=subsets,
                                         subset_size=min(1000, len(real), len(fake)))
    metric = metric.to(real.device)
    metric.update(real / feature_scale, real=True)
    metric.update(fake / feature_scale, real=False)
    with torch.random.fork_rng(devices=[]):  # torchmetrics draws the subsets from the global generator
        torch.manual_seed(seed)
        mean, _ = metric.compute()
    return float(mean)


def fid_score(network, real: torch.Tensor, fake: torch.Tensor, batch_size: int = 256) -> float:
    """FID between two sets of [-1, 1] images [N, 3, H, W], in the feature network's space."""
    _check_counts(len(real), len(fake))
    return fid_of_features(network_features(network, real, batch_size, real=True), network_features(network, fake, batch_size), batch_size)


def feature_rms(network, images: torch.Tensor, batch_size: int = 256) -> float:
    """√(mean over `images` of ‖x‖²/F): the root mean square of one feature coordinate."""
    return feature_rms_of(network_features(network, images, batch_size, real=True))


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
    _check_counts(len(real), len(fake))
    return kid_of_features(network_features(network, real, batch_size, real=True), network_features(network, fake, batch_size),
                           subsets, seed, feature_scale)
