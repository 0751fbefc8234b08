"""`lcm evaluate` of a user's own model on their own data: a reference folder of plain (uncaptioned) images in nested
folders and of every PNG mode, a COCO-style folder with several captions per image, a TorchScript feature network of
their own, and a rerun that spells the same model's folder another way. Each number written must be the one a direct
computation gives; each mistake one line on stderr and exit code 2."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from test_evaluate_inputs import Linear  # the FID Inception stand-in


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """A tiny LCM, a prompt file of the user's (comments, blank lines, unicode, a duplicate), an Inception stand-in."""
    from tiny_models import save_tiny_lcm

    folder = tmp_path_factory.mktemp("user")
    (folder / "prompts.txt").write_text("# my prompts\n\n  a red star \ncafé ☕\na red star\n", encoding="utf-8")
    torch.manual_seed(0)
    torch.jit.script(Linear()).save(str(folder / "inception.pt"))
    return dict(lcm=save_tiny_lcm(folder / "lcm"), prompts=folder / "prompts.txt", inception=folder / "inception.pt")


def evaluate(user, out, *extra, reference=None, inception=None) -> list[str]:
    return ["evaluate", "--lcm", str(user["lcm"]), "--prompts", str(user["prompts"]), "--inception", str(inception or user["inception"]),
            "--steps", "1", "--out", str(out), "--device", "cpu", *(["--reference", str(reference)] if reference else []), *extra]


def fid(a: np.ndarray, b: np.ndarray) -> float:
    """FID of two feature sets, as pytorch-fid computes it (numpy's unbiased covariance, scipy's sqrtm)."""
    import scipy.linalg

    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def plain_images(folder):
    """Five uncaptioned images in nested folders, of mixed sizes and modes: RGB, RGBA, palette, grayscale JPEG, 16-bit."""
    rng = np.random.default_rng(0)
    (folder / "2024" / "june").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (40, 16, 4), dtype=np.uint8), "RGBA").save(folder / "2024" / "b.png")
    Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8), "L").convert("P").save(folder / "2024" / "june" / "c.png")
    Image.fromarray(rng.integers(0, 255, (24, 24), dtype=np.uint8), "L").save(folder / "d.jpg")
    Image.fromarray(rng.integers(0, 65535, (16, 16), dtype=np.uint16)).save(folder / "e.png")
    return folder


def test_a_reference_folder_of_plain_images_needs_no_captions(user, tmp_path, run_error):
    """was: `--reference` went through the training data reader, which wants a caption per image: a folder of real
    images without captions (what FID tools take) was refused, "no usable captioned image ... give each image a
    caption", exit 2. Now every image of the folder and its subfolders is a reference image, and the FID written is the
    one computed directly from the images."""
    from latent_consistency.cli.evaluate import image_files, read_reference, reference_order
    from latent_consistency.evaluation.inception import InceptionFeatures
    from latent_consistency.evaluation.table import EvalSet, Row, generate
    from latent_consistency.models import load_lcm

    reference = plain_images(tmp_path / "photos")
    code, err = run_error(evaluate(user, tmp_path / "out", "--images-per-prompt", "2", reference=reference))
    assert code == 0, err
    report = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "3 prompts of" in report and "reference 5 images of" in report
    row = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]["lcm|1|8"]
    lcm, network = load_lcm(str(user["lcm"])), InceptionFeatures.load(user["inception"])
    references = torch.stack(list(read_reference(str(reference), 16, 10)))  # read one by one, never held
    assert references.shape == (5, 3, 16, 16) and references.min() >= -1 and references.max() <= 1
    sixteen_bit = reference_order(image_files(reference)).index("e.png")
    assert references[sixteen_bit].std() > 0.2  # the 16-bit image scaled to 8 bits, not clipped to white
    fake = generate(Row("lcm", 1, 8.0), lcm, None, EvalSet(["a red star", "café ☕", "a red star"], None, references, 2), "cpu")
    features = [network.features(x).double().numpy() for x in (references, fake)]
    assert row["images"] == 6 and row["inception_fid"] == pytest.approx(fid(*features), rel=1e-4)


def test_a_coco_style_folder_gives_each_reference_image_once(tmp_path):
    """was: a folder whose metadata.jsonl captions each image five times (COCO) gave its reference images once per
    caption: `--samples 15` of 3 images made a reference set of 15 images, each real image five times over, and an FID of
    3 real images presented as 15. Now each image is in the reference once; its prompts are still its 15 captions."""
    from latent_consistency.cli.evaluate import load_eval_set
    from tiny_models import write_captioned_images

    folder = write_captioned_images(tmp_path / "coco", 3)
    lines = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": row["file_name"], "text": f"caption {c} of {row['file_name']}"})
                                                   + "\n" for row in lines for c in range(5)))
    eval_set = load_eval_set(SimpleNamespace(prompts=str(folder), reference=None, samples=15, images_per_prompt=1, seed=0), 16)
    assert len(eval_set.prompts) == 15 and len(set(eval_set.prompts)) == 15
    reference = torch.stack(list(eval_set.reference))  # read one by one: the EvalSet holds none of them
    assert len(eval_set.reference) == 3 and len(torch.unique(reference.flatten(1), dim=0)) == 3


class BySize(torch.nn.Module):
    """A user's feature network whose width follows the image size: 8x8 average pools, flattened."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(x / 255, 8).flatten(1)


class OneRow(torch.nn.Module):
    """A user's feature network that flattens the whole batch into one row."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return x.mean((2, 3)).reshape(1, -1) / 255


def test_a_feature_network_is_measured_at_the_size_it_scores(user, tmp_path, run_error):
    """was: the Inception file was probed with one 64-px image: a network whose feature width follows the image size
    (192 features at 64 px, 12 at the LCM's 16 px) passed, the first row was sampled, and torchmetrics failed with a
    traceback ("The size of tensor a (192) must match the size of tensor b (12)"). Now it is probed at the generated
    images' size and scored; its FID is the direct computation's."""
    from latent_consistency.cli.evaluate import read_reference
    from latent_consistency.evaluation.table import EvalSet, Row, generate
    from latent_consistency.models import load_lcm

    torch.jit.script(BySize()).save(str(tmp_path / "by-size.pt"))
    images = plain_images(tmp_path / "photos")
    code, err = run_error(evaluate(user, tmp_path / "out", reference=images, inception=tmp_path / "by-size.pt"))
    assert code == 0, err
    row = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]["lcm|1|8"]
    references = torch.stack(list(read_reference(str(images), 16, 3)))
    fake = generate(Row("lcm", 1, 8.0), load_lcm(str(user["lcm"])), None, EvalSet(["a red star", "café ☕", "a red star"], None, references), "cpu")
    network = torch.jit.load(str(tmp_path / "by-size.pt"))
    features = [network(((x + 1) * 127.5).round(), return_features=True).double().numpy() for x in (references, fake)]
    assert features[0].shape == (3, 12) and row["inception_fid"] == pytest.approx(fid(*features), rel=1e-4)


def test_a_feature_network_of_one_row_per_batch_is_refused_before_sampling(user, tmp_path, run_error):
    """was: probed with one image, a network giving one row of features for a whole batch passed; after the first row
    was sampled, torchmetrics failed with a traceback on the width of the batch's row. Now it is refused before sampling,
    one line, and no --out is made."""
    torch.jit.script(OneRow()).save(str(tmp_path / "one-row.pt"))
    code, err = run_error(evaluate(user, tmp_path / "out", reference=plain_images(tmp_path / "photos"), inception=tmp_path / "one-row.pt"))
    assert code == 2 and len(err.splitlines()) == 1 and "for two images, not a vector of features per image" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("spelling", ["trailing slash", "absolute", "dot"])
def test_a_rerun_naming_the_same_model_folder_another_way_continues(spelling, user, tmp_path, run_error, monkeypatch):
    """was: a model's identity held its path as typed: rerun to add a step count with `--lcm runs/lcm/` (as a shell
    completes it), `./runs/lcm` or its absolute path, an evaluation was refused, "holds the results of another
    evaluation", exit 2. Now the same folder is the same model: the finished row is kept, only the new one is sampled."""
    lcm = shutil.copytree(user["lcm"], tmp_path / "lcm")
    monkeypatch.chdir(tmp_path)
    reference = plain_images(tmp_path / "photos")
    first = evaluate(user, "out", reference="photos")
    first[first.index(str(user["lcm"]))] = "lcm"
    assert run_error(first)[0] == 0
    finished = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    again = [{"trailing slash": "lcm/", "absolute": str(lcm.resolve()), "dot": "./lcm"}[spelling] if a == "lcm" else a for a in first]
    again[again.index("--reference") + 1] = str(reference.resolve())
    code, err = run_error([*again, "--steps", "1,2"])
    assert code == 0, err
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert set(rows) == {"lcm|1|8", "lcm|2|8"} and rows["lcm|1|8"] == finished["lcm|1|8"]  # its timing too: not sampled again
