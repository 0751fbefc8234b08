"""`lcm cache --resolution N`: a latent cache of images read at N, not at the model's native size (SDXL at 512 px from a
cache, the cheap way to train on much data), that a run with --resolution N trains on exactly as on the images themselves.
Was: `lcm cache` wrote the native size alone, and a run refused any --resolution or cache of another size.

The tiny models' native size is 16 px (UNet sample size 8, VAE factor 2); the caches here are at 24 px."""

import json

import pytest
import torch

from latent_consistency.cli import main
from latent_consistency.data import latent_cache
from latent_consistency.data.imagefolder import ImageFolderDataset
from latent_consistency.data.latent_cache import LatentCache
from latent_consistency.models import load_diffusion_model, load_latent_and_prompt_encoders
from latent_consistency.training.batches import TrainingBatches
from test_cache_resume import stop_at_save
from tiny_models import write_captioned_images

SIZE = 24  # a cache's --resolution: not the tiny models' native 16 px


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Six landscape images (30x20, not square: scaled and centre-cropped to any size), each with its own caption."""
    return write_captioned_images(tmp_path_factory.mktemp("data") / "images", 6, size=(20, 30))


@pytest.fixture(scope="module")
def sd_cache(tiny_sd, images, tmp_path_factory):
    """A cache of `images` at SIZE px written by `lcm cache --resolution`."""
    out = tmp_path_factory.mktemp("caches") / "sd-24"
    assert main(["cache", "--model", str(tiny_sd), "--data", str(images), "--out", str(out), "--resolution", str(SIZE)]) == 0
    return out


def distill(teacher, data, out, *extra) -> list[str]:
    return ["distill", "--preset", "tiny", "--teacher", str(teacher), "--data", str(data), "--out", str(out), "--steps", "1", *extra]


@pytest.mark.parametrize("family", ["tiny_sd", "tiny_sdxl"])
def test_a_cache_at_a_resolution_gives_the_micro_batches_of_the_images_read_at_it(family, images, tmp_path, request):
    """The cache's latents are, bit for bit, those a run at --resolution 24 encodes from the image folder, and its
    conditions (SDXL's micro-conditioning of 24 px among them) and ∅ those it encodes, micro-batch after micro-batch in
    the run's order."""
    folder = request.getfixturevalue(family)
    cache = tmp_path / "cache"
    assert main(["cache", "--model", str(folder), "--data", str(images), "--out", str(cache), "--resolution", str(SIZE),
                 "--batch-size", "4"]) == 0
    manifest = json.loads((cache / latent_cache.MANIFEST).read_text())
    assert manifest["latent_size"] == [SIZE // 2, SIZE // 2] and manifest["source"]["resolution"] == SIZE
    model = load_diffusion_model(str(folder))
    cached, read = (TrainingBatches(str(data), model, SIZE, 2, seed=3) for data in (cache, images))
    for _ in range(6):  # two epochs of three micro-batches: the sampler's second order too
        a, b = next(cached), next(read)
        assert torch.equal(a["latents"], b["latents"])
        torch.testing.assert_close(a["cond"], b["cond"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached.uncond, read.uncond, rtol=1e-5, atol=1e-5)
    if family == "tiny_sdxl":  # original size, crop, target size: those of a 24 px image, not of the native 16 px
        assert model.prompts.added.unpack(a["cond"])[1]["time_ids"].tolist() == [[SIZE, SIZE, 0, 0, SIZE, SIZE]] * 2


def test_the_summary_line_says_to_train_with_the_caches_resolution(tiny_sd, images, tmp_path, capsys):
    assert main(["cache", "--model", str(tiny_sd), "--data", str(images), "--out", str(tmp_path / "c"), "--resolution", str(SIZE)]) == 0
    assert f"at {SIZE} px" in (out := capsys.readouterr().out) and out.strip().endswith(f"--data {tmp_path / 'c'} --resolution {SIZE}"), out
    assert main(["cache", "--model", str(tiny_sd), "--data", str(images), "--out", str(tmp_path / "n"), "--resolution", "16"]) == 0
    assert (out := capsys.readouterr().out).strip().endswith(f"--data {tmp_path / 'n'}"), out  # the native size needs no --resolution


def test_a_cache_at_the_default_resolution_is_the_one_written_before(tiny_sd, images, tmp_path):
    """Without --resolution every file is byte for byte the cache `lcm cache` wrote before the option: that of the image
    folder read at the native size, its source recording that size."""
    assert main(["cache", "--model", str(tiny_sd), "--data", str(images), "--out", str(tmp_path / "now"), "--batch-size", "4"]) == 0
    codec, prompts, native = load_latent_and_prompt_encoders(str(tiny_sd))
    source = {"data": str(images), "model": str(tiny_sd), "resolution": native}
    latent_cache.write_latent_cache(ImageFolderDataset(images, native), tmp_path / "before", codec, prompts, source, batch_size=4,
                                    progress=False)
    files = sorted(p.name for p in (tmp_path / "now").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "before").iterdir())
    for name in files:
        assert (tmp_path / "now" / name).read_bytes() == (tmp_path / "before" / name).read_bytes(), name


def test_a_run_at_the_caches_resolution_trains_on_it(tiny_sd, sd_cache, tmp_path, run_error):
    code, err = run_error(distill(tiny_sd, sd_cache, tmp_path / "run", "--resolution", str(SIZE)))
    assert code == 0 and (tmp_path / "run" / "lcm" / "model_index.json").is_file(), err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["resolution"] == SIZE


@pytest.mark.parametrize("given, words", [
    ((), f"holds the latents of {SIZE} px images, not of the model's native 16 px: train on it with --resolution {SIZE}"),
    (("--resolution", "32"), f"--resolution 32 does not apply to a latent cache of {SIZE} px images"),
    (("--resolution", "16"), f"holds the latents of {SIZE} px images, not of the model's native 16 px: train on it with --resolution {SIZE}"),
], ids=["no --resolution", "another", "the native size"])
def test_a_run_at_another_size_than_the_caches_is_refused_in_one_line(tiny_sd, sd_cache, tmp_path, run_error, given, words):
    """Without --resolution a run trains at the native size, and is refused on a 24 px cache, not run at 24 px: its
    config.json (resolution 0) would say the native size. Another size names both."""
    code, err = run_error(distill(tiny_sd, sd_cache, tmp_path / "run", *given))
    assert code == 2 and len(err.splitlines()) == 1 and words in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_run_at_another_size_than_a_native_cache_is_told_to_leave_resolution_out(tiny_sd, images, tmp_path, run_error):
    assert run_error(["cache", "--model", str(tiny_sd), "--data", str(images), "--out", str(tmp_path / "native")])[0] == 0
    code, err = run_error(distill(tiny_sd, tmp_path / "native", tmp_path / "run", "--resolution", str(SIZE)))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"--resolution {SIZE} does not apply to a latent cache of 16 px images" in err and "leave --resolution out" in err, err


@pytest.mark.parametrize("size, words", [
    ("25", "resolution 25 is not a multiple of the VAE factor 2"),
    ("136", "resolution 136 is more than 8x the model's 16 px"),
])
def test_a_resolution_a_run_refuses_is_refused_before_the_data_is_read(tiny_sd, images, tmp_path, run_error, monkeypatch, size, words):
    """The run's own checks (`check_resolution`), before the image folder is scanned; nothing is written."""
    from latent_consistency.data import spec

    monkeypatch.setattr(spec, "open_dataset", lambda *args, **kwargs: pytest.fail("the data was read"))
    code, err = run_error(["cache", "--model", str(tiny_sd), "--data", str(images), "--out", str(tmp_path / "c"), "--resolution", size])
    assert code == 2 and len(err.splitlines()) == 1 and words in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_transformers_patch_is_checked_too(tiny_pixart, images, tmp_path, run_error):
    """PixArt-α's patch of 2 latents: 18 px (9 latents) is no whole number of patches, as a run at 18 px is told."""
    code, err = run_error(["cache", "--model", str(tiny_pixart), "--data", str(images), "--out", str(tmp_path / "c"), "--resolution", "18"])
    assert code == 2 and "resolution 18 is not a multiple of the VAE factor 2 times the transformer's patch size 2" in err, err


def test_a_rerun_at_another_resolution_starts_the_partial_cache_again(tiny_sd, images, tmp_path, monkeypatch, capsys):
    """A cache stopped part way at 24 px, run again at the native size: OUT.partial is started again (its latents are of
    other images), saying why, and the cache is the one an uninterrupted run at the native size writes."""
    save = latent_cache.save_file
    calls = stop_at_save(monkeypatch, 2)
    monkeypatch.setattr(latent_cache, "write_latent_cache", _in_shards_of_two(latent_cache.write_latent_cache))
    argv = ["cache", "--model", str(tiny_sd), "--data", str(images), "--batch-size", "2", "--out"]
    assert main([*argv, str(tmp_path / "cache"), "--resolution", str(SIZE)]) == 130
    assert len(calls) == 2
    monkeypatch.setattr(latent_cache, "save_file", save)
    capsys.readouterr()
    assert main([*argv, str(tmp_path / "cache")]) == 0
    err = capsys.readouterr().err
    assert f"{tmp_path / 'cache.partial'} is started again: it was written with another source" in err, err
    assert main([*argv, str(tmp_path / "whole")]) == 0
    files = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "cache").iterdir())
    for name in files:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "cache" / name).read_bytes(), name
    assert LatentCache(tmp_path / "cache").latent_shape[-1] == 8


def _in_shards_of_two(write):
    """`write_latent_cache` writing shards of two samples, so that a stop after the first leaves a partial to resume."""
    def in_shards(*args, **kwargs):
        return write(*args, **kwargs, shard_size=2)
    return in_shards
