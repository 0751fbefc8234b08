"""User mistakes in `lcm world ...` and in the --data / --eval-data of `lcm distill` and `lcm finetune`: a damaged latent
cache, data with no usable sample, two spellings of one world dataset, a resolution far from the model's, a foreign or
damaged world folder. Each is one line on stderr and exit code 2, and no run folder or output is written."""

import io
import json
import shutil
import tarfile

import pytest

from latent_consistency.world.artifact import default_world_path
from tiny_models import write_captioned_images


@pytest.fixture(scope="module")
def cache(tiny_sd, tmp_path_factory):
    """A latent cache of four captioned images, made with the tiny teacher."""
    from latent_consistency.data.imagefolder import ImageFolderDataset
    from latent_consistency.data.latent_cache import write_latent_cache
    from latent_consistency.models import load_diffusion_model

    root = tmp_path_factory.mktemp("cache")
    model = load_diffusion_model(str(tiny_sd))
    images = write_captioned_images(root / "images", 4)
    return write_latent_cache(ImageFolderDataset(images, 16), root / "cache", model.codec, model.prompts, source={}, progress=False)


def distill(run_error, tiny_sd, data, out, *extra):
    """Exit code and stderr of a one-step `lcm distill` of the tiny teacher on `data`."""
    return run_error(["distill", "--teacher", str(tiny_sd), "--data", str(data), "--out", str(out), "--steps", "1",
                      "--batch-size", "2", *extra])


def assert_refused(code, err, out, message):
    """Exit 2 with a one-line error (after any log lines of skipped samples) and nothing at `out`."""
    last = err.splitlines()[-1] if err else ""
    assert code == 2 and last.startswith("lcm ") and message in last and "Traceback" not in err, err
    assert not out.exists(), "a refused run wrote its folder"


def _garbage_manifest(folder):
    (folder / "manifest.json").write_text("not json{")


def _list_manifest(folder):
    (folder / "manifest.json").write_text("[1, 2]")


def _no_shards(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps(manifest | {"shards": [], "num_samples": 0}))


def _missing_shard(folder):
    (folder / "shard-00000.safetensors").unlink()


def _garbage_shard(folder):
    (folder / "shard-00000.safetensors").write_bytes(b"junk")


def _missing_captions(folder):
    (folder / "captions.safetensors").unlink()


DAMAGED_CACHES = {
    "manifest not JSON": (_garbage_manifest, "is not valid JSON"),
    "manifest a list": (_list_manifest, "does not hold a JSON object"),
    "manifest without shards": (_no_shards, "lists no shard files"),
    "missing shard": (_missing_shard, "is missing its file shard-00000.safetensors"),
    "garbage shard": (_garbage_shard, "is unreadable"),
    "missing captions": (_missing_captions, "is missing its file captions.safetensors"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED_CACHES))
def test_a_damaged_latent_cache_is_refused(case, cache, tiny_sd, tmp_path, run_error):
    damage, message = DAMAGED_CACHES[case]
    broken = shutil.copytree(cache, tmp_path / "cache")
    damage(broken)
    code, err = distill(run_error, tiny_sd, broken, tmp_path / "run")
    assert_refused(code, err, tmp_path / "run", message)


def test_an_image_folder_without_one_readable_image_writes_no_run_folder(tiny_sd, tmp_path, run_error):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(b"not a png")
        (folder / f"{i}.txt").write_text("a red star")
    code, err = distill(run_error, tiny_sd, folder, tmp_path / "run")
    assert_refused(code, err, tmp_path / "run", "could be decoded")


def test_shards_without_a_sample_write_no_run_folder(tiny_sd, tmp_path, run_error):
    shards = tmp_path / "shards"
    shards.mkdir()
    png = (write_captioned_images(tmp_path / "images", 1) / "0.png").read_bytes()
    with tarfile.open(shards / "00000.tar", "w") as tar:  # images without captions
        info = tarfile.TarInfo("a.png")
        info.size = len(png)
        tar.addfile(info, io.BytesIO(png))
    tarfile.open(shards / "00001.tar", "w").close()  # an empty tar
    code, err = distill(run_error, tiny_sd, shards, tmp_path / "run")
    assert_refused(code, err, tmp_path / "run", "no usable sample in 2 shard(s)")


@pytest.mark.parametrize("eval_data", ["world:shapes:train", "world:shapes:"])
def test_eval_data_spelling_the_training_split_is_refused(eval_data, tiny_lcm, tmp_path, run_error):
    code, err = run_error(["finetune", "--model", str(tiny_lcm), "--data", "world:shapes", "--eval-data", eval_data,
                           "--out", str(tmp_path / "run"), "--resolution", "32", "--dry-run"])
    assert_refused(code, err, tmp_path / "run", "is the training data")


def test_a_resolution_far_above_the_models_is_refused(tiny_sd, tmp_path, run_error):
    images = write_captioned_images(tmp_path / "images", 2)
    code, err = distill(run_error, tiny_sd, images, tmp_path / "run", "--resolution", "136")
    assert_refused(code, err, tmp_path / "run", "more than 8x the model's 16 px")


def test_world_data_at_the_models_size_says_the_size_is_the_models(tiny_sd, tiny_lcm, tmp_path, run_error):
    """The tiny models are 16 px, the world's datasets 32 or 64: `lcm cache`, `lcm distill` (without --resolution) and `lcm
    evaluate` of world data said "resolution 16 is not supported", a number their command lines held nowhere."""
    code, err = run_error(["cache", "--model", str(tiny_sd), "--data", "world:shapes", "--out", str(tmp_path / "cache")])
    assert_refused(code, err, tmp_path / "cache", f"not at 16 px, the native size of --model {tiny_sd}")
    code, err = distill(run_error, tiny_sd, "world:shapes", tmp_path / "run")
    assert_refused(code, err, tmp_path / "run", "not at 16 px, the model's native size (--resolution sets another)")
    code, err = run_error(["evaluate", "--lcm", str(tiny_lcm), "--prompts", "world:shapes:reference", "--samples", "2",
                           "--steps", "1", "--out", str(tmp_path / "eval")])
    assert_refused(code, err, tmp_path / "eval", "not at 16 px, the native size of the model evaluated")
    code, err = distill(run_error, tiny_sd, "world:shapes", tmp_path / "run", "--resolution", "24")  # a size the user gave
    assert_refused(code, err, tmp_path / "run", "resolution 24 is not supported; use one of 32, 64")


FOREIGN_WORLD_FILES = {"not JSON": "{", "a list": "[1]", "no preset": '{"name": "mine"}'}


@pytest.mark.parametrize("case", sorted(FOREIGN_WORLD_FILES))
def test_world_build_into_a_folder_with_a_foreign_world_json_is_refused(case, tmp_path, run_error):
    out = tmp_path / "world"
    out.mkdir()
    (out / "world.json").write_text(FOREIGN_WORLD_FILES[case])
    code, err = run_error(["world", "build", "--preset", "tiny", "--out", str(out), "--device", "cpu", "--no-progress"])
    assert code == 2 and len(err.splitlines()) == 1 and "is not a world's description" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["world.json"]


def test_world_export_and_parts_from_a_foreign_world_json_are_refused(tmp_path, run_error):
    src = tmp_path / "src"
    src.mkdir()
    (src / "world.json").write_text("[1]")
    code, err = run_error(["world", "export", "--from", str(src), "--out", str(tmp_path / "fp16")])
    assert_refused(code, err, tmp_path / "fp16", "is not a world's description")
    code, err = run_error(["world", "build", "--preset", "tiny", "--out", str(tmp_path / "new"), "--parts-from", str(src),
                           "--device", "cpu", "--no-progress"])
    assert_refused(code, err, tmp_path / "new", "is not a world's description")


def test_world_build_with_a_damaged_build_state_is_refused(tmp_path, run_error):
    out = tmp_path / "world"
    out.mkdir()
    shutil.copy(default_world_path() / "world.json", out / "world.json")
    (out / "build_state.json").write_text("nope")
    code, err = run_error(["world", "export", "--from", str(out), "--out", str(tmp_path / "fp16")])
    assert_refused(code, err, tmp_path / "fp16", "build_state.json is damaged")


def test_a_world_json_of_an_unreadable_preset_is_refused(tmp_path, run_error):
    world = shutil.copytree(default_world_path(), tmp_path / "world")
    (world / "world.json").write_text(json.dumps({"preset": {"name": "x", "bogus": 1}}))
    code, err = run_error(["world", "check", "--world", str(world), "--out", str(tmp_path / "check")])
    assert_refused(code, err, tmp_path / "check", "names a preset this version cannot read")


def test_world_check_with_one_sample_writes_nothing(tmp_path, run_error):
    code, err = run_error(["world", "check", "--world", str(default_world_path()), "--out", str(tmp_path / "check"),
                           "--samples", "1", "--device", "cpu", "--no-progress"])
    assert_refused(code, err, tmp_path / "check", "--samples 1: FID needs at least 2 images per guidance scale")
