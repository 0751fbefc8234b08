"""What a user gives `lcm generate` and `lcm evaluate` that the outputs must follow: output names (an existing folder's
images, a file name, an empty name), flags that contradict each other (--steps with --timesteps, --guidance-scale with
--guidance-scales, a value listed twice), blank and over-long prompts, and an --out that holds another evaluation or
files that are not an evaluation's. Each mistake is one line on stderr and exit code 2 with nothing overwritten."""

import json

import pytest


def generate(tiny_lcm, out, *extra) -> list[str]:
    return ["generate", *extra, "--model", str(tiny_lcm), "--steps", "1", "--out", str(out), "--device", "cpu"]


def test_a_rerun_into_the_same_folder_does_not_overwrite_its_images(tiny_lcm, tmp_path, run_error):
    out = tmp_path / "images"
    assert run_error(generate(tiny_lcm, out, "a red star"))[0] == 0
    earlier = out / "0000-a-red-star.png"
    earlier.write_bytes(b"an earlier image")
    code, err = run_error(generate(tiny_lcm, out, "a red star", "a blue ring"))
    assert code == 2 and len(err.splitlines()) == 1 and "already holds 0000-a-red-star.png" in err, err
    assert earlier.read_bytes() == b"an earlier image" and sorted(p.name for p in out.iterdir()) == ["0000-a-red-star.png"]


def test_skip_existing_resumes_a_killed_run_with_the_same_images(tiny_lcm, tmp_path, run_error):
    """A run killed after some images, rerun with --skip-existing, keeps them and makes only the missing ones; the
    folder ends as an uninterrupted run's (image i depends only on its prompt, its seed and the settings)."""
    import numpy as np
    from PIL import Image

    prompts = ["a red star", "a blue ring", "a green square", "a red star"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert run_error(generate(tiny_lcm, whole, *prompts, "--seed", "5", "--batch-size", "2"))[0] == 0
    resumed.mkdir()
    for name in ("0000-a-red-star.png", "0002-a-green-square.png"):  # what the killed run had written
        (resumed / name).write_bytes((whole / name).read_bytes())
    before = (resumed / "0002-a-green-square.png").stat().st_mtime_ns
    code, err = run_error(generate(tiny_lcm, resumed, *prompts, "--seed", "5", "--batch-size", "2", "--skip-existing"))
    assert code == 0, err
    assert (resumed / "0002-a-green-square.png").stat().st_mtime_ns == before  # kept, not written again
    assert sorted(p.name for p in resumed.iterdir()) == sorted(p.name for p in whole.iterdir())
    for f in whole.iterdir():
        a, b = (np.asarray(Image.open(d / f.name), dtype=np.int16) for d in (whole, resumed))
        assert np.abs(a - b).max() <= 1  # batched convolutions may round differently by one level
    (resumed / "0003-a-red-star.png").unlink()
    (resumed / "0003-a-red-star.png").mkdir()
    code, err = run_error(generate(tiny_lcm, resumed, *prompts, "--skip-existing"))
    assert code == 2 and len(err.splitlines()) == 1 and "0003-a-red-star.png, which is not an image file" in err, err


def test_skip_existing_refuses_images_of_weights_saved_again_at_the_same_path(tiny_lcm, tmp_path, run_error):
    """A model saved again at its path (a resumed `lcm distill` exports anew) is other weights under the same name: its
    old images were kept as this run's by --skip-existing, since the record held the path alone. An image whose record
    predates the weights' digests (an earlier version's) is kept as before."""
    import shutil

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo
    from safetensors.torch import load_file, save_file

    model = shutil.copytree(tiny_lcm, tmp_path / "lcm")
    out = tmp_path / "images"
    assert run_error(generate(model, out, "a red star"))[0] == 0
    image = out / "0000-a-red-star.png"
    code, err = run_error(generate(model, out, "a red star", "a blue ring", "--skip-existing"))
    assert code == 0, err  # the same weights: kept
    weights = next((model / "unet").glob("*.safetensors"))
    save_file({k: v + 0.01 for k, v in load_file(weights).items()}, weights)  # "distilled again"
    before = image.read_bytes()
    code, err = run_error(generate(model, out, "a red star", "a blue ring", "--skip-existing"))
    assert code == 2 and len(err.splitlines()) == 1 and "other weights under the same name (model:" in err, err
    assert image.read_bytes() == before
    for made in out.iterdir():  # as an earlier version wrote them: no "weights"
        png = Image.open(made)
        png.load()
        record = json.loads(png.text["lcm-generate"])
        record.pop("weights")
        info = PngInfo()
        info.add_itxt("lcm-generate", json.dumps(record))
        png.save(made, pnginfo=info)
    code, err = run_error(generate(model, out, "a red star", "a blue ring", "--skip-existing"))
    assert code == 0, err


@pytest.mark.parametrize("case", ["image file name", "empty name", "steps and timesteps", "empty timesteps", "blank prompt"])
def test_generate_refuses(case, tiny_lcm, tmp_path, run_error, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty --out wrote into the current folder
    argv, message = {
        "image file name": (generate(tiny_lcm, tmp_path / "star.png", "a red star"), "looks like an image file name"),
        "empty name": (generate(tiny_lcm, "", "a red star"), "--out is empty"),
        "steps and timesteps": (generate(tiny_lcm, tmp_path / "out", "a", "--timesteps", "999,499"), "not both"),
        "empty timesteps": (generate(tiny_lcm, tmp_path / "out", "a", "--timesteps", ""), "--timesteps is empty"),
        "blank prompt": (generate(tiny_lcm, tmp_path / "out", "a red star", " ", "a blue ring"), "prompt 2 is blank"),
    }[case]
    code, err = run_error(argv)
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_prompt_longer_than_the_text_encoder_reads_gets_a_note(tiny_lcm, tmp_path, run_error):
    """The tiny tokenizer reads 16 tokens (one a letter, and the start and end tokens); the end of a longer prompt is dropped, and said so."""
    code, err = run_error(generate(tiny_lcm, tmp_path / "out", "a red star", "a large red star at the top left"))
    assert code == 0 and "note: the prompt of 0001-a-large-red-star-at-the-top-left.png is 27 tokens, more than the 16 the text encoder reads" in err, err
    assert len(list((tmp_path / "out").iterdir())) == 2


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    """An LCM, prompts, real images and a CLIP model for `lcm evaluate`."""
    from tiny_models import save_tiny_clip, save_tiny_lcm, write_captioned_images

    folder = tmp_path_factory.mktemp("evaluation")
    (folder / "prompts.txt").write_text("a red star\na blue ring\n")
    return dict(lcm=save_tiny_lcm(folder / "lcm"), clip=save_tiny_clip(folder / "clip"), prompts=folder / "prompts.txt",
                images=write_captioned_images(folder / "images", 4))


def evaluate(evaluation, out, *extra) -> list[str]:
    return ["evaluate", "--lcm", str(evaluation["lcm"]), "--prompts", str(evaluation["prompts"]), "--reference",
            str(evaluation["images"]), "--clip", str(evaluation["clip"]), "--steps", "1", "--out", str(out), "--device", "cpu", *extra]


@pytest.mark.parametrize("case", ["steps twice", "scale twice", "both guidance flags"])
def test_evaluate_refuses_contradicting_flags(case, evaluation, tmp_path, run_error):
    extra, message = {
        "steps twice": (["--steps", "1,2,1"], "1 is listed twice"),
        "scale twice": (["--guidance-scales", "2,3,2.0"], "2 is listed twice"),
        "both guidance flags": (["--guidance-scale", "2", "--guidance-scales", "2,3"], "not both"),
    }[case]
    code, err = run_error(evaluate(evaluation, tmp_path / "out", *extra))
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_evaluate_refuses_an_lcm_as_teacher(evaluation, tmp_path, run_error):
    code, err = run_error(evaluate(evaluation, tmp_path / "out", "--teacher", str(evaluation["lcm"])))
    assert code == 2 and len(err.splitlines()) == 1 and "is an LCM" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["not json", "not an object", "another evaluation", "a report but no results"])
def test_evaluate_does_not_overwrite_what_is_in_out(case, evaluation, tmp_path, run_error):
    out = tmp_path / "out"
    out.mkdir()
    name, text, message = {
        "not json": ("results.json", "my notes", "cannot read"),
        "not an object": ("results.json", "[1, 2]", "is not the results of an evaluation"),
        "another evaluation": ("results.json", json.dumps({"fingerprint": "0123456789abcdef", "rows": {}}), "another evaluation"),
        "a report but no results": ("report.md", "# my report", "already holds report.md"),
    }[case]
    (out / name).write_text(text)
    code, err = run_error(evaluate(evaluation, out))
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert [p.name for p in out.iterdir()] == [name] and (out / name).read_text() == text


def test_evaluate_does_not_reuse_the_results_of_a_model_saved_again(evaluation, tmp_path, run_error):
    """A rerun into the same --out continues the same evaluation; the same path holding other weights (distilled again)
    has its rows scored again, not its old numbers reused."""
    from tiny_models import save_tiny_lcm

    model, out = tmp_path / "lcm", tmp_path / "out"
    save_tiny_lcm(model, seed=1)
    argv = [a if a != str(evaluation["lcm"]) else str(model) for a in evaluate(evaluation, out)]
    assert run_error(argv)[0] == 0 and run_error(argv)[0] == 0
    before = json.loads((out / "results.json").read_text())["rows"]["lcm|1|8"]
    save_tiny_lcm(model, seed=2)
    assert run_error(argv)[0] == 0
    after = json.loads((out / "results.json").read_text())["rows"]["lcm|1|8"]
    assert after["models"] != before["models"] and after["clip_fid"] != before["clip_fid"]


def test_sweep_refuses_two_runs_of_one_name(tmp_path, run_error):
    runs = [tmp_path / "a" / "lcd", tmp_path / "b" / "lcd"]
    code, err = run_error(["evaluate", "sweep", "--runs", *map(str, runs), "--out", str(tmp_path / "sweep"), "--device", "cpu"])
    assert code == 2 and len(err.splitlines()) == 1 and "two --runs are folders named lcd" in err, err
    assert not (tmp_path / "sweep").exists()
