"""What a user gives `lcm evaluate` as their own metric networks and models: an Inception file of another network's
output, a CLIP folder that is a text encoder alone or damaged, guidance scales that print alike, and a model whose
images are NaN. Each is one line on stderr and exit code 2, before any row is sampled where it can be, with nothing
already written lost; never a traceback or a NaN scored as a number."""

import json
import shutil

import PIL.Image
import pytest
import torch

from latent_consistency.errors import UserError


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    """An LCM, its teacher, prompts, real images and a CLIP model for `lcm evaluate`."""
    from tiny_models import save_tiny_clip, save_tiny_lcm, save_tiny_sd, write_captioned_images

    folder = tmp_path_factory.mktemp("evaluation")
    (folder / "prompts.txt").write_text("a red star\na blue ring\n")
    return dict(lcm=save_tiny_lcm(folder / "lcm"), sd=save_tiny_sd(folder / "sd"), clip=save_tiny_clip(folder / "clip"),
                prompts=folder / "prompts.txt", images=write_captioned_images(folder / "images", 4))


def evaluate(evaluation, out, *extra, metric=("--clip",)) -> list[str]:
    metric = [*metric, str(evaluation["clip"])] if metric == ("--clip",) else list(metric)
    return ["evaluate", "--lcm", str(evaluation["lcm"]), "--prompts", str(evaluation["prompts"]), "--reference",
            str(evaluation["images"]), *metric, "--steps", "1", "--out", str(out), "--device", "cpu", *extra]


class Pairs(torch.nn.Module):
    """A TorchScript network that returns (features, feature map), not the features alone."""

    def forward(self, x: torch.Tensor, return_features: bool = False):
        return x.mean((2, 3)), x


class FeatureMap(torch.nn.Module):
    """A TorchScript network that returns pooled features still shaped [B, C, 1, 1]."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return x.mean((2, 3), keepdim=True)


class Linear(torch.nn.Module):
    """A TorchScript stand-in of the FID Inception network: [0, 255] images -> 4 features."""

    def __init__(self):
        super().__init__()
        self.project = torch.nn.Linear(3, 4)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.project(x.mean((2, 3)) / 255)


@pytest.mark.parametrize("network", [Pairs, FeatureMap])
def test_an_inception_file_of_another_output_is_refused_before_sampling(network, evaluation, tmp_path, run_error):
    torch.jit.script(network()).save(str(tmp_path / "inception.pt"))
    code, err = run_error(evaluate(evaluation, tmp_path / "out", metric=("--inception", str(tmp_path / "inception.pt"))))
    assert code == 2 and len(err.splitlines()) == 1 and "not a vector of features" in err, err
    assert not (tmp_path / "out").exists()


@pytest.fixture
def text_only_clip(evaluation, tmp_path):
    """A Stable Diffusion text encoder and its tokenizer in one folder: a CLIP text model, no image tower."""
    folder = shutil.copytree(evaluation["sd"] / "text_encoder", tmp_path / "text-clip")
    for file in (evaluation["sd"] / "tokenizer").iterdir():
        shutil.copy(file, folder)
    return folder


def test_a_clip_folder_without_an_image_model_is_refused(text_only_clip, evaluation, tmp_path, run_error):
    """transformers fills the missing image tower with random weights: its FID and CLIP score would be noise."""
    code, err = run_error(evaluate(evaluation, tmp_path / "out", metric=("--clip", str(text_only_clip))))
    assert code == 2 and len(err.splitlines()) == 1 and "not a whole CLIP model" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["preprocessor not json", "preprocessor mean of one value", "truncated weights"])
def test_a_damaged_clip_folder_is_one_line(case, evaluation, tmp_path):
    from latent_consistency.evaluation.clip import ClipModel

    folder = shutil.copytree(evaluation["clip"], tmp_path / "clip")
    if case == "truncated weights":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        (folder / "preprocessor_config.json").write_text("{oops" if case == "preprocessor not json" else json.dumps({"image_mean": 0.5}))
    with pytest.raises(UserError) as error:
        ClipModel.load(str(folder))
    assert str(folder) in str(error.value) and "\n" not in str(error.value)


def test_guidance_scales_that_print_alike_are_refused(evaluation, tmp_path, run_error):
    """Rows are kept by their scale printed to 6 digits: 7.5 and 7.500001 would share one row, scored once."""
    code, err = run_error(evaluate(evaluation, tmp_path / "out", "--guidance-scales", "7.5,7.500001"))
    assert code == 2 and len(err.splitlines()) == 1 and "listed twice" in err, err


@pytest.mark.parametrize("scales", ["1, ,2", "1,2,", ","])
def test_an_empty_item_of_a_list_is_refused(evaluation, tmp_path, run_error, scales):
    """A value left out of --guidance-scales ("1, ,2") is a typo to show, not a separator to skip, as --timesteps refuses."""
    code, err = run_error(evaluate(evaluation, tmp_path / "out", "--guidance-scales", scales))
    assert code == 2 and len(err.splitlines()) == 1 and ("empty item" in err or "at least one" in err), err
    assert not (tmp_path / "out").exists()


def test_a_model_of_nan_images_is_refused_not_scored_nan(evaluation, tmp_path, run_error):
    """A broken LCM (NaN weights, or half-precision overflow) makes NaN images: their FID is NaN, not a number to report."""
    from safetensors.torch import load_file, save_file

    model = shutil.copytree(evaluation["lcm"], tmp_path / "broken")
    weights = next((model / "vae").glob("*.safetensors"))
    tensors = load_file(weights)
    tensors["decoder.conv_out.bias"] = torch.full_like(tensors["decoder.conv_out.bias"], float("nan"))
    save_file(tensors, weights)
    argv = [a if a != str(evaluation["lcm"]) else str(model) for a in evaluate(evaluation, tmp_path / "out")]
    code, err = run_error(argv)
    lines = [line for line in err.splitlines() if "%|" not in line]  # less the progress bar, closed before the message
    assert code == 2 and len(lines) == 1 and "NaN" in lines[0] and err.splitlines()[-1] == lines[0], err
    assert not (tmp_path / "out" / "results.json").exists() and not (tmp_path / "out" / "report.md").exists()


def test_a_long_prompt_is_cut_to_the_clip_text_models_positions(evaluation, tmp_path):
    """A tokenizer saved without model_max_length does not cut prompts: the text model, with 16 positions, would raise."""
    from latent_consistency.evaluation.clip import ClipModel

    folder = shutil.copytree(evaluation["clip"], tmp_path / "clip")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["model_max_length"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    clip = ClipModel.load(str(folder))
    images = torch.zeros(2, 3, 16, 16)
    assert clip.score(images, ["a red star " * 30, "a blue ring"]) == pytest.approx(clip.score(images, ["a red star " * 5, "a blue ring"]))


@pytest.mark.parametrize("metric", ["--clip", "--inception"])
def test_a_rerun_with_another_metric_network_does_not_reuse_its_scores(metric, evaluation, tmp_path, run_error):
    """Rows are reused when scored with the same metrics: another CLIP model or Inception file is another evaluation,
    not the first network's numbers under the second's name."""
    if metric == "--clip":
        first, second = evaluation["clip"], shutil.copytree(evaluation["clip"], tmp_path / "other-clip")
    else:
        first, second = tmp_path / "inception.pt", tmp_path / "other-inception.pt"
        for path, seed in ((first, 0), (second, 1)):
            torch.manual_seed(seed)
            torch.jit.script(Linear()).save(str(path))
    out = tmp_path / "out"
    assert run_error(evaluate(evaluation, out, metric=(metric, str(first))))[0] == 0
    results = (out / "results.json").read_text()
    code, err = run_error(evaluate(evaluation, out, metric=(metric, str(second))))
    assert code == 2 and "another evaluation" in err.splitlines()[-1], err
    assert (out / "results.json").read_text() == results



def test_a_corrupt_image_does_not_put_its_neighbour_in_twice(tmp_path, monkeypatch):
    """An image folder gives the next usable image in place of a corrupt one, for training; the evaluation's prompts are
    each sample's caption once, read without decoding the images (a corrupt image's caption is a caption of the data all
    the same), and its reference images each image once, the corrupt one left out."""
    from latent_consistency.cli.evaluate import read_items, read_reference
    from tiny_models import write_captioned_images

    folder = write_captioned_images(tmp_path / "images", 5)
    (folder / "1.png").write_bytes((folder / "1.png").read_bytes()[:40])
    (folder / "4.png").write_bytes(b"")  # the last one: the first stands in for it in training
    opened, real_open = [], PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda *args, **kwargs: opened.append(args) or real_open(*args, **kwargs))
    assert [item["caption"] for item in read_items(str(folder), 16, 4)] == [f"a red star number {i}" for i in range(4)]
    assert [item["caption"] for item in read_items(str(folder), 16, 10)] == [f"a red star number {i}" for i in range(5)]
    assert opened == []  # was: every image decoded for its caption (30,000 for a paper-sized evaluation)
    monkeypatch.undo()
    assert len(read_reference(str(folder), 16, 10, captioned=True)) == 3


def test_an_inception_network_of_nan_weights_is_refused_not_scored_nan(evaluation, tmp_path, run_error):
    network = Linear()
    torch.nn.init.constant_(network.project.bias, float("nan"))
    torch.jit.script(network).save(str(tmp_path / "inception.pt"))
    code, err = run_error(evaluate(evaluation, tmp_path / "out", metric=("--inception", str(tmp_path / "inception.pt"))))
    lines = [line for line in err.splitlines() if "%|" not in line]
    assert code == 2 and len(lines) == 1 and "is broken" in lines[0], err
    assert not (tmp_path / "out" / "results.json").exists()


def write_shards(folder, shards: int, samples: int):
    """`shards` .tar shards of `samples` captioned PNGs each ("shard S sample K"), in img2dataset's layout."""
    import io
    import tarfile

    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as archive:
            for k in range(samples):
                png = io.BytesIO()
                Image.new("RGB", (8, 8), (k * 80, s * 100, 0)).save(png, "PNG")
                for name, payload in ((f"s{s}k{k}.png", png.getvalue()), (f"s{s}k{k}.txt", f"shard {s} sample {k}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    archive.addfile(info, io.BytesIO(payload))
    return folder


def test_shards_as_prompts_are_read_once_each_in_order(tmp_path):
    """The training stream resamples shards with replacement: read for an evaluation it repeated some samples and left
    others out (two shards of 3, read for 6, gave one twice), or went round again past the end."""
    from latent_consistency.cli.evaluate import read_items

    shards = write_shards(tmp_path / "shards", 2, 3)
    every = [f"shard {s} sample {k}" for s in range(2) for k in range(3)]
    assert [it["caption"] for it in read_items(str(shards), 8, 10)] == every
    assert [it["caption"] for it in read_items(str(shards), 8, 4)] == every[:4]
    (shards / "00001.tar").write_bytes((shards / "00001.tar").read_bytes()[:700])  # cut inside its first sample
    assert [it["caption"] for it in read_items(str(shards), 8, 10)] == every[:3]


def test_prompts_longer_than_the_text_encoder_reads_get_a_note(evaluation, tmp_path, capsys):
    """`lcm generate` said so; `lcm evaluate` scored such prompts without a word."""
    from latent_consistency.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red star\n" + "a very long prompt about a blue ring " * 10 + "\n")
    args = evaluate(evaluation, tmp_path / "out")
    args[args.index(str(evaluation["prompts"]))] = str(prompts)
    assert main(args) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
    assert len(notes) == 1 and "prompt 2 is " in notes[0] and "more than the 16 the text encoder reads" in notes[0]


@pytest.mark.parametrize("captioned", [True, False])
def test_the_reference_images_of_a_large_folder_hold_no_path_per_file(tmp_path, captioned):
    """FID's real images were a list of a Path per image file of the folder (about 270 bytes each: 3 GB for a 12-million-image
    --prompts folder, of which the first 30,000 are read); now the folder's names, each made a path as a pass reaches it."""
    import gc
    import tracemalloc

    from latent_consistency.cli.evaluate import read_reference

    (tmp_path / "0").mkdir()
    with open(tmp_path / "metadata.jsonl", "w") as f:
        for i in range(2000):
            (tmp_path / f"0/{i:06d}.png").write_bytes(b"x")
            f.write(json.dumps({"file_name": f"0/{i:06d}.png", "text": "a red star"}) + "\n")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        reference = read_reference(str(tmp_path), 16, 30, captioned=captioned)
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert reference is not None and kept < 2000 * 100, kept / 2000


def test_a_reference_folder_larger_than_the_evaluation_is_read_across_its_subfolders(tmp_path):
    """--reference FOLDER: an evaluation reads as many real images as it generates, and they were the first of the sorted
    folder, cats/ before dogs/: FID's reference statistics of one class. They are now taken in a fixed shuffle of the
    whole folder, the same on every run."""
    from PIL import Image

    from latent_consistency.cli.evaluate import read_reference

    for sub, colour in (("cats", (255, 0, 0)), ("dogs", (0, 0, 255))):
        (tmp_path / sub).mkdir()
        for i in range(10):
            Image.new("RGB", (16, 16), colour).save(tmp_path / sub / f"{i:02d}.png")
    first = torch.stack(list(read_reference(str(tmp_path), 16, 6)))
    reds = int((first[:, 0].mean((1, 2)) > 0).sum())
    assert 0 < reds < 6  # both subfolders
    assert torch.equal(first, torch.stack(list(read_reference(str(tmp_path), 16, 6))))  # the same images every run
    assert len(list(read_reference(str(tmp_path), 16, 50))) == 20
