"""`lcm evaluate` at the paper's sizes (FID on thousands to 30,000 images at 512 px): memory holds one batch of images and
the features, never a set of images whole, and each feature network reads the reference images once per evaluation.

was: every real image was stacked into one float32 tensor (3.1 GB for 1,000 at 512 px, 94 GB for 30,000), each row's
images were all held before scoring, and every row ran each feature network over the whole reference three times (FID,
KID, the KID feature scale). Now the rows are sampled and scored `compare.batch_size` images at a time, and the scores,
the fingerprint of an evaluation (so that one begun before resumes) and the report are the numbers they were."""

import hashlib
import json

import pytest
import torch

from latent_consistency.evaluation import compare
from latent_consistency.evaluation.clip import ClipModel
from latent_consistency.evaluation.fid import feature_rms, fid_score, kid_score
from latent_consistency.evaluation.inception import InceptionFeatures
from latent_consistency.evaluation.table import EvalSet, FeatureScorer, JudgeScorer, ReferenceImages, Row, generate
from test_evaluate_inputs import Linear  # the FID Inception stand-in

BATCH = 4  # images per batch here, fewer than the images of a row


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Ten prompts, twelve real images (24x20 px: resized), a tiny CLIP model and an Inception stand-in."""
    from tiny_models import save_tiny_clip, write_captioned_images

    folder = tmp_path_factory.mktemp("scale")
    (folder / "prompts.txt").write_text("".join(f"a {c} star number {i}\n" for i, c in enumerate(["red", "blue"] * 5)))
    torch.manual_seed(0)
    torch.jit.script(Linear()).save(str(folder / "inception.pt"))
    return dict(prompts=folder / "prompts.txt", images=write_captioned_images(folder / "images", 12, size=(24, 20)),
                clip=save_tiny_clip(folder / "clip"), inception=folder / "inception.pt")


class Spy:
    """Wraps a feature network's `features`: the size of each batch it is given, and how many images in all."""

    def __init__(self, monkeypatch, cls):
        self.sizes = []
        real = cls.features
        monkeypatch.setattr(cls, "features", lambda network, images: self.sizes.append(len(images)) or real(network, images))


def test_the_reference_is_read_once_and_images_scored_a_batch_at_a_time(data, tiny_lcm, tmp_path, monkeypatch):
    """Two rows, two feature networks, ten images a row in batches of four: each network sees the ten real images once
    and each row's ten, never more than a batch at once, nor does any scorer; the EvalSet holds no image; and the scores
    are those of the all-at-once functions on every image of the row."""
    from latent_consistency.cli import evaluate as cli_evaluate
    from latent_consistency.cli import main
    from latent_consistency.evaluation import table
    from latent_consistency.models import load_lcm

    monkeypatch.setattr(compare, "MAX_BATCH", BATCH)
    inception, clip = Spy(monkeypatch, InceptionFeatures), Spy(monkeypatch, ClipModel)
    sampled, eval_sets = [], []
    real_generate, real_load = table.generate, cli_evaluate.load_eval_set
    monkeypatch.setattr(table, "generate", lambda *a, **k: (images := real_generate(*a, **k), sampled.append(len(images)))[0])
    monkeypatch.setattr(cli_evaluate, "load_eval_set", lambda *a, **k: (s := real_load(*a, **k), eval_sets.append(s))[0])
    out = tmp_path / "out"
    assert main(["evaluate", "--lcm", str(tiny_lcm), "--prompts", str(data["prompts"]), "--reference", str(data["images"]),
                 "--clip", str(data["clip"]), "--inception", str(data["inception"]), "--steps", "1,2", "--samples", "10",
                 "--out", str(out), "--device", "cpu", "--grid-columns", "3"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 2 and all(row["images"] == 10 for row in rows.values())
    table_batches = sampled[:-2]  # the grid's two rows of 3 images come last
    assert table_batches == [4, 4, 2] * 2 and sampled[-2:] == [3, 3]
    for spy in (inception, clip):  # the ten real images once (at the first row's scores) and each row's ten, a batch at a time
        assert spy.sizes == [4, 4, 2] * 3, spy.sizes
    eval_set = eval_sets[0]
    assert not [v for v in (*vars(eval_set).values(), *vars(eval_set.reference).values()) if isinstance(v, torch.Tensor)]
    assert "reference 10 images of" in (out / "report.md").read_text()

    # The row's numbers are the all-at-once functions' on all its images, up to the rounding of features computed in
    # batches of 4 rather than 10 (under several threads the kernels round differently; KID's cubic kernel shows it most)
    monkeypatch.setattr(compare, "MAX_BATCH", 250)
    network, clip_model = InceptionFeatures.load(data["inception"], size=16), ClipModel.load(str(data["clip"]))
    real, row = torch.stack(list(eval_set.reference)), rows["lcm|2|8"]
    fake = real_generate(Row("lcm", 2, 8.0), load_lcm(str(tiny_lcm)), None, EvalSet(eval_set.prompts, None, real), "cpu")
    assert row["inception_fid"] == pytest.approx(fid_score(network, real, fake), rel=1e-6)
    assert row["inception_kid"] == pytest.approx(kid_score(network, real, fake, subsets=50), rel=1e-5)
    assert row["clip_fid"] == pytest.approx(fid_score(clip_model, real, fake), rel=1e-6)
    assert row["clip_kid"] == pytest.approx(kid_score(clip_model, real, fake, subsets=50, feature_scale=feature_rms(clip_model, real)),
                                            rel=1e-5)
    assert row["clip_clip_score"] == pytest.approx(clip_model.score(fake, eval_set.prompts), rel=1e-6)


def test_the_fingerprint_is_the_digest_of_the_reference_stacked(data, monkeypatch):
    """results.json of an evaluation begun when the reference images were held stacked carries sha256 over the settings'
    JSON and their float32 bytes: read a batch at a time, the same bytes in the same order give the same fingerprint,
    and that evaluation resumes."""
    from latent_consistency.cli.evaluate import read_reference

    monkeypatch.setattr(compare, "MAX_BATCH", BATCH)
    reference = read_reference(str(data["images"]), 16, 10)
    prompts, identities = ["a red star", "café ☕"], ("/models/lcm 0123", "clip of /models/clip")
    stacked = torch.stack(list(reference))
    old = hashlib.sha256(json.dumps([prompts, 2, 5, *identities]).encode())
    old.update(stacked.float().numpy().tobytes())
    assert stacked.shape == (10, 3, 16, 16)
    assert EvalSet(prompts, None, reference, 2, 5).fingerprint(*identities) == old.hexdigest()[:16]
    assert EvalSet(prompts, None, stacked, 2, 5).fingerprint(*identities) == old.hexdigest()[:16]  # the demo's: a tensor given
    assert len(reference) == 10


class Network(torch.nn.Module):
    """A feature network of 6 features, in units far from 1 (KID on unit features rescales them)."""

    feature_dim = 6

    def __init__(self):
        super().__init__()
        self.project = torch.nn.Linear(3 * 4 * 4, 6)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return 30 * self.project(torch.nn.functional.avg_pool2d(images, 2).flatten(1))


def shows(images: torch.Tensor) -> torch.Tensor:
    """Which attribute values a stand-in judge reads back from images: whether each channel's mean is positive."""
    return images.mean((2, 3)) > 0


def alignment(network, images: torch.Tensor, attributes: list) -> dict[str, float]:
    """A stand-in of `world.judge.prompt_alignment`: per attribute (channel) the fraction of images showing their prompt's
    value, and their mean."""
    wanted = torch.tensor(attributes, dtype=torch.bool)
    scores = {f"channel{c}": int((shows(images)[:, c] == wanted[:, c]).sum()) / len(images) for c in range(3)}
    return scores | {"mean": sum(scores.values()) / len(scores)}


@pytest.mark.parametrize("unit", [True, False])
def test_streamed_fid_kid_and_alignment_equal_the_all_at_once_functions(unit):
    """FID and KID from features accumulated a batch at a time, the reference's computed once, are the all-at-once
    functions' on the same images (KID on the same subsets: the same seed, the features in the same order); the
    alignment counted a batch at a time is the fraction the judge gives for all of them (49 images: 1/49 × 49 is no 1)."""
    torch.manual_seed(0)
    network = Network()
    real, fake = torch.randn(37, 3, 8, 8).tanh(), (torch.randn(49, 3, 8, 8) + 0.3).tanh()
    attributes = torch.rand(49, 3).gt(0.5).tolist()
    eval_set = EvalSet(["p"] * 49, attributes, real)
    scorer = JudgeScorer(network, alignment) if unit else FeatureScorer("inception", network, unit_kid_features=False)
    for _ in range(2):  # two rows: the second starts afresh
        scorer.reset()
        for part, start in zip(eval_set.parts(5), range(0, 49, 5)):
            scorer.update(fake[start:start + 5], part)
        scores = scorer.compute(eval_set)
        scale = feature_rms(network, real) if unit else 1.0
        assert scores["fid"] == pytest.approx(fid_score(network, real, fake), rel=1e-6)
        assert scores["kid"] == pytest.approx(kid_score(network, real, fake, subsets=50, feature_scale=scale), rel=1e-6)
        if unit:
            expected = alignment(network, fake, attributes)
            assert {k: scores[f"alignment_{k}" if k != "mean" else "alignment"] for k in expected} == expected


def test_a_row_is_generated_in_parts_from_the_noise_of_the_whole(tiny_lcm, monkeypatch):
    """A row sampled in parts of a batch (`EvalSet.parts`) is the images the whole set gives a batch at a time, as rows
    were sampled before: image i from seed SEED + i, its prompt encoded with the same others."""
    from latent_consistency.models import load_lcm

    monkeypatch.setattr(compare, "MAX_BATCH", BATCH)
    lcm = load_lcm(str(tiny_lcm))
    eval_set = EvalSet(["a red star", "a blue ring", "a green square"], None, ReferenceImages.of(torch.zeros(2, 3, 16, 16)), 2, 7)
    whole = generate(Row("lcm", 1, 8.0), lcm, None, eval_set, "cpu")
    parts = torch.cat([generate(Row("lcm", 1, 8.0), lcm, None, part, "cpu") for part in eval_set.parts(BATCH)])
    assert len(whole) == 6 and torch.equal(whole, parts)
