"""`lcm cache` run again on the folder of a cache it finished: the same job (as the manifest records it, compared as a
resume compares `OUT.partial`'s) writes nothing and exits 0, as `lcm distill` run again on a finished run does, so that a
requeued `lcm cache ... && lcm distill ...` goes on; another job is refused with one line naming what differs, and the
cache is kept. Was: exit 2, "is a whole latent cache (manifest.json), ready to train on; pick another folder", for both."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from latent_consistency.cli import main
from latent_consistency.data import latent_cache
from latent_consistency.data.latent_cache import LatentCache
from tiny_models import write_captioned_images


def cache_args(model, data, out, *extra):
    return ["cache", "--model", str(model), "--data", str(data), "--out", str(out), "--batch-size", "2", *extra]


def snapshot(folder) -> dict:
    """Each file of `folder` by name: its bytes and when it was last written."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


@pytest.fixture
def written(tiny_sd, tmp_path, run_error):
    """(model, images, cache): a copy of the tiny model (a test may change its weights), 6 captioned images, and the cache
    `lcm cache` wrote of them with it."""
    model = shutil.copytree(tiny_sd, tmp_path / "model")
    images = write_captioned_images(tmp_path / "images", 6)
    cache = tmp_path / "cache"
    code, err = run_error(cache_args(model, images, cache))
    assert code == 0 and (cache / "manifest.json").is_file(), err
    return model, images, cache


def test_the_same_job_run_again_on_its_finished_cache_writes_nothing_and_exits_0(written, capsys, encoded, monkeypatch):
    model, images, cache = written
    before = snapshot(cache)
    monkeypatch.chdir(images.parent)  # the same job spelled otherwise: a relative path, with a slash
    capsys.readouterr()
    assert main(cache_args(model, "images/", "cache")) == 0
    out, err = capsys.readouterr()
    assert out == "" and err == "lcm cache: cache is already a whole latent cache of this job (6 samples): nothing is written\n", err
    assert encoded[0] == 0 and snapshot(cache) == before and not (images.parent / "cache.partial").exists()
    assert len(LatentCache(cache)) == 6


@pytest.mark.parametrize(("extra", "change", "words"), [
    (["--batch-size", "3"], None, "another batch size: its manifest.json records 2, this call 3"),
    (["--resolution", "32"], None, "another source (--data, --model or resolution): its manifest.json records resolution 16, this call "
                                   "resolution 32"),
    (["--captions-only"], None, "another choice of --captions-only (caption strings, or their text embeddings): its manifest.json "
                                "records False, this call True"),
    ([], "an image added", "another data (other image files or captions): its manifest.json records samples 6, fingerprint "),
    ([], "the text encoder", "another text encoder (other weights)"),
])
def test_another_job_run_on_a_finished_cache_is_refused_naming_what_differs_and_keeps_it(written, run_error, encoded, extra, change, words):
    model, images, cache = written
    if change == "an image added":
        write_captioned_images(images, 7)
    elif change == "the text encoder":  # the same --model folder, its text encoder's weights changed since the cache
        file = next((model / "text_encoder").glob("*.safetensors"))
        weights = load_file(file)
        name = next(k for k, v in weights.items() if v.is_floating_point())
        weights[name] = weights[name] + 1
        save_file(weights, file)
    before = snapshot(cache)
    code, err = run_error(cache_args(model, images, cache, *extra))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"lcm cache: error: latent cache folder {cache} already exists, a whole latent cache of another job (it was "
                          f"written with {words}"), err
    assert err.endswith("; it is kept: pick another folder (--out) to cache this one"), err
    assert encoded[0] == 0 and snapshot(cache) == before and not cache.with_name("cache.partial").exists()


def test_a_finished_cache_whose_manifest_records_no_job_is_refused_before_the_model_loads(tiny_sd, tmp_path, run_error, monkeypatch):
    # a cache of an earlier version of lcm: no record of the job that wrote it, to compare
    images = write_captioned_images(tmp_path / "images", 2)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "manifest.json").write_text(json.dumps({"format": "latent-cache/2", "num_samples": 2, "shards": [{"file": "shard-00000.safetensors"}]}))
    monkeypatch.setattr("latent_consistency.cli.cache.load_encoders", lambda *a: pytest.fail("the model was loaded"))
    code, err = run_error(cache_args(tiny_sd, images, cache))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"latent cache folder {cache} already exists and its manifest.json records no job that wrote it" in err and "remove" not in err
    assert err.endswith("it is kept: pick another folder (--out) to cache again"), err
    assert [p.name for p in cache.iterdir()] == ["manifest.json"]


def test_a_folder_of_files_without_a_manifest_is_refused_as_before(tiny_sd, tmp_path, run_error):
    images = write_captioned_images(tmp_path / "images", 2)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "notes.txt").write_text("mine")
    code, err = run_error(cache_args(tiny_sd, images, cache))
    assert code == 2 and err == f"lcm cache: error: latent cache folder {cache} already exists; remove it or pick another folder (an empty one is used)"


def test_write_latent_cache_called_again_for_the_same_job_returns_the_cache_unwritten(written, encoded):
    """The library's call, as `lcm cache` and a world build make it: the same job's whole cache is returned, with one note."""
    from latent_consistency.cli.cache import load_encoders
    from latent_consistency.data.imagefolder import ImageFolderDataset
    from latent_consistency.data.latent_cache import recorded_data

    model, images, cache = written
    codec, prompts, size = load_encoders(str(model), "cpu", False)
    before, notes = snapshot(cache), []
    source = {"data": recorded_data(str(images)), "model": str(model), "resolution": size}
    out = latent_cache.write_latent_cache(ImageFolderDataset(images, size), cache, codec, prompts, source, batch_size=2, progress=False,
                                          say=notes.append)
    assert out == cache and notes == [f"{cache} is already a whole latent cache of this job (6 samples): nothing is written"]
    assert encoded[0] == 0 and snapshot(cache) == before
