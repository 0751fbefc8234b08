import pytest
import torch

from latent_consistency.errors import UserError
from latent_consistency.world.datasets import attribute_values, get_dataset
from latent_consistency.world.judge import (
    Judge,
    _collate,
    judge_accuracy,
    judge_loss,
    load_judge,
    prompt_alignment,
    save_judge,
    train_judge,
)

STEPS, BATCH = 40, 32


@pytest.fixture(scope="module")
def judge():
    return train_judge("shapes", 32, steps=STEPS, batch_size=BATCH, seed=0, progress=False)


@pytest.fixture(scope="module")
def reference():
    data = get_dataset("shapes", "reference", size=128)
    return _collate([data[i] for i in range(len(data))], "shapes"), [data[i]["attributes"] for i in range(len(data))]


def test_outputs_have_the_right_shapes_and_no_grad(judge, reference):
    (images, _), _ = reference
    assert all(p.grad is None for p in judge.parameters())
    features = judge.features(images[:8])
    assert features.shape == (8, judge.feature_dim) and torch.isfinite(features).all()
    assert not features.requires_grad
    logits, predicted = judge.logits(images[:8]), judge.predict(images[:8])
    assert list(logits) == list(predicted) == list(judge.attributes)
    for name in judge.attributes:
        assert logits[name].shape == (8, len(attribute_values("shapes", name)))
        assert torch.isfinite(logits[name]).all() and predicted[name].dtype == torch.long
    assert all(p.grad is None for p in judge.parameters())


def test_training_loss_falls(judge, reference):
    (images, targets), _ = reference
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        untrained = Judge("shapes", 32)
    with torch.no_grad():
        before, after = judge_loss(untrained, images, targets), judge_loss(judge, images, targets)
    assert after < 0.9 * before


def test_alignment_of_real_images_with_their_own_prompts(judge, reference):
    (images, _), attributes = reference
    own = prompt_alignment(judge, images, attributes)
    shuffled = prompt_alignment(judge, images, attributes[1:] + attributes[:1])
    assert set(own) == {*judge.attributes, "mean"}
    assert own["mean"] == pytest.approx(sum(own[a] for a in judge.attributes) / len(judge.attributes))
    # 40 small steps teach the background first; the full judge reads every attribute (>= 0.97).
    assert own["background"] > 0.9
    assert own["mean"] > shuffled["mean"] + 0.1
    assert judge_accuracy(judge, "reference", n=128) == {a: own[a] for a in judge.attributes}


def test_save_load_round_trip(judge, reference, tmp_path):
    (images, _), _ = reference
    save_judge(judge, tmp_path / "judge")
    assert sorted(p.name for p in (tmp_path / "judge").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_judge(tmp_path / "judge")
    assert (loaded.dataset, loaded.resolution, loaded.attributes) == (judge.dataset, judge.resolution, judge.attributes)
    assert torch.equal(loaded.features(images[:4]), judge.features(images[:4]))
    with pytest.raises(UserError, match="no judge"):
        load_judge(tmp_path / "missing")


def test_digits_judge_at_64_px_trains_and_scores():
    judge = train_judge("digits", 64, steps=2, batch_size=8, progress=False)
    assert judge.attributes == ("digit",)
    accuracy = judge_accuracy(judge, n=20)
    assert set(accuracy) == {"digit"} and 0 <= accuracy["digit"] <= 1
    test = get_dataset("digits", "test", 64)
    assert judge.features(torch.stack([test[i]["image"] for i in range(3)])).shape == (3, 128)


def test_user_errors():
    judge = Judge("shapes", 32)
    with pytest.raises(UserError, match="resolution"):
        judge.features(torch.zeros(2, 3, 64, 64))
    with pytest.raises(UserError, match="4·2\\^k"):
        Judge("shapes", 48)
    with pytest.raises(UserError, match="unknown dataset"):
        train_judge("cifar", steps=1)
    with pytest.raises(UserError, match="one set of attributes per image"):
        prompt_alignment(judge, torch.zeros(2, 3, 32, 32), [])
    with pytest.raises(UserError, match="do not belong"):
        prompt_alignment(judge, torch.zeros(1, 3, 32, 32), [get_dataset("digits", "test")[0]["attributes"]])
