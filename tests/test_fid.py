import pytest
import torch

from latent_consistency.errors import UserError
from latent_consistency.evaluation.fid import feature_rms, fid_score, kid_score
from latent_consistency.world.datasets import get_dataset
from latent_consistency.world.judge import Judge


@pytest.fixture(scope="module")
def judge():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Judge("shapes", 32).eval()


@pytest.fixture(scope="module")
def real():
    data = get_dataset("shapes", "reference", size=400)
    return torch.stack([data[i]["image"] for i in range(len(data))])


@pytest.fixture(scope="module")
def noise():
    return torch.rand(200, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_fid_of_real_images_against_themselves_is_zero_and_against_noise_large(judge, real, noise):
    to_noise = fid_score(judge, real[:200], noise, batch_size=64)
    assert abs(fid_score(judge, real, real, batch_size=64)) < 1e-4 * to_noise
    between_halves = fid_score(judge, real[:200], real[200:])
    # An untrained (seeded) judge: random features still put noise ~5x further than real from real.
    assert 0 < between_halves < 0.35 * to_noise


@pytest.mark.parametrize("unit_features", [False, True])
def test_kid_of_real_images_against_noise_is_large(judge, real, noise, unit_features):
    scale = feature_rms(judge, real[:200]) if unit_features else 1.0
    to_noise = kid_score(judge, real[:200], noise, subsets=20, feature_scale=scale)
    between_halves = kid_score(judge, real[:200], real[200:], subsets=20, feature_scale=scale)
    assert between_halves < 0.1 * to_noise
    twice = [kid_score(judge, real[:50], noise[:30], subsets=5, seed=1) for _ in range(2)]
    assert twice[0] == twice[1]


class _Scaled(torch.nn.Module):
    """The judge with its features in other units."""

    def __init__(self, judge, factor):
        super().__init__()
        self.judge, self.factor, self.feature_dim = judge, factor, judge.feature_dim

    def features(self, images):
        return self.judge.features(images) * self.factor


def test_kid_on_unit_features_does_not_depend_on_the_features_units(judge, real, noise):
    def kid(network, unit):
        return kid_score(network, real[:100], noise[:100], subsets=5, feature_scale=feature_rms(network, real[:100]) if unit else 1.0)

    assert kid(_Scaled(judge, 100.0), True) == pytest.approx(kid(judge, True), rel=1e-4)
    assert kid(_Scaled(judge, 100.0), False) > 100 * kid(judge, False)  # the raw cubic kernel: ~100³ here


def test_too_few_images_is_a_user_error(judge, real):
    with pytest.raises(UserError, match="at least 2"):
        fid_score(judge, real[:10], real[:1])
