"""A latent cache records the digests of the VAE and text encoder(s) that wrote it, and a run checks them against its model
(`LatentCache.check_encoders`): a cache of another model of the same shapes was taken without a word. The UNet is not
among them, so a model that shares the VAE and text encoders trains on the cache. And `lcm cache` resumes only on the
type of device that wrote OUT.partial's shards."""

import json
import shutil

import pytest
import torch

from latent_consistency.data import latent_cache
from latent_consistency.data.imagefolder import ImageFolderDataset
from latent_consistency.models import load_diffusion_model
from latent_consistency.training.batches import TrainingBatches
from test_cache_resume import images, killed, snapshot, write
from tiny_models import save_tiny_sd, save_tiny_sdxl, write_captioned_images


@pytest.fixture(scope="module")
def model(tiny_sd):
    return load_diffusion_model(str(tiny_sd))


@pytest.fixture(scope="module")
def other_sd(tmp_path_factory):
    """A tiny SD of the same shapes as `tiny_sd`, every part other weights (another seed)."""
    return save_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd-1", seed=1)


@pytest.fixture
def cache(tiny_sd, tmp_path, run_error):
    """The cache `lcm cache` writes of five captioned images with `tiny_sd`."""
    data = write_captioned_images(tmp_path / "images", 5)
    code, err = run_error(["cache", "--model", str(tiny_sd), "--data", str(data), "--out", str(tmp_path / "cache"), "--batch-size", "2"])
    assert code == 0, err
    return tmp_path / "cache"


def swapped(base, other, part: str, out):
    """A copy of the model folder `base` with its `part` subfolder taken from `other`."""
    folder = shutil.copytree(base, out)
    shutil.rmtree(folder / part)
    shutil.copytree(other / part, folder / part)
    return folder


def distill(run_error, teacher, data, out):
    return run_error(["distill", "--preset", "tiny", "--teacher", str(teacher), "--data", str(data), "--out", str(out), "--steps", "1"])


@pytest.mark.parametrize("part, words", [("vae", "another VAE"), ("text_encoder", "another text encoder")])
def test_a_run_on_a_cache_of_another_vae_or_text_encoder_is_refused(tiny_sd, other_sd, cache, tmp_path, run_error, part, words):
    """Was: accepted without a word (the shapes and the VAE's scaling factor are the same), training on latents or text
    embeddings that are not the teacher's. Now one line naming the part and how to write a cache for this model; no run."""
    teacher = swapped(tiny_sd, other_sd, part, tmp_path / "teacher")
    code, err = distill(run_error, teacher, cache, tmp_path / "run")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"latent cache {cache} was written with {words} than {teacher}'s (other weights)" in err, err
    assert f"lcm cache --model {teacher} --data IMAGES --out CACHE" in err and not (tmp_path / "run" / "checkpoints").exists()


def test_a_model_that_shares_the_vae_and_text_encoder_trains_on_the_cache(tiny_sd, other_sd, cache, tmp_path, run_error):
    """Another UNet (a fine-tune that kept SD's VAE and CLIP) makes the same latents and text embeddings: its run goes on,
    with no note."""
    teacher = swapped(tiny_sd, other_sd, "unet", tmp_path / "teacher")
    code, err = distill(run_error, teacher, cache, tmp_path / "run")
    assert code == 0 and (tmp_path / "run" / "lcm" / "model_index.json").is_file(), err
    assert "cannot be checked" not in err and TrainingBatches(str(cache), load_diffusion_model(str(teacher)), 16, 2, 0).cache_note is None


def test_a_cache_written_before_the_digests_is_read_with_a_note(tiny_sd, other_sd, cache, tmp_path, run_error):
    """A cache whose manifest records no digests (an earlier version's) is trained on, as before, with a note that it cannot
    be checked (`TrainingBatches.cache_note`, which the run prints with its other notes); even a model of other weights."""
    old = shutil.copytree(cache, tmp_path / "old")
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest[latent_cache.ENCODERS]
    (old / "manifest.json").write_text(json.dumps(manifest))
    teacher = swapped(tiny_sd, other_sd, "vae", tmp_path / "teacher")
    code, err = distill(run_error, teacher, old, tmp_path / "run")
    assert code == 0 and "lcm distill: note: latent cache" in err and "cannot be checked" in err, err
    note = TrainingBatches(str(old), load_diffusion_model(str(teacher)), 16, 2, 0).cache_note
    assert note == (f"latent cache {old} records no digest of the VAE and text encoder that wrote it (an earlier version of lcm wrote "
                    f"it): it cannot be checked against {teacher}; write it again with lcm cache to have it checked")


def test_a_manifest_whose_digests_are_not_a_table_is_refused_in_one_line(tiny_sd, cache, tmp_path, run_error):
    """A manifest edited by hand (its digests replaced by a string): a one-line error, not a traceback."""
    manifest = json.loads((cache / "manifest.json").read_text())
    (cache / "manifest.json").write_text(json.dumps(manifest | {latent_cache.ENCODERS: "a0b1"}))
    code, err = distill(run_error, tiny_sd, cache, tmp_path / "run")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "holds no digests of its encoders ('encoders')" in err, err


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_a_run_in_half_precision_checks_the_float32_weights(tiny_sd, other_sd, cache, tmp_path, half):
    """Mixed precision casts the frozen VAE and text encoder to half precision before the data is opened
    (`freeze_in_half_precision`): their digest is still the float32 weights' (read again from the folder), so the model's
    own cache is taken and another VAE's refused, as in float32."""
    own = load_diffusion_model(str(tiny_sd))
    other = load_diffusion_model(str(swapped(tiny_sd, other_sd, "vae", tmp_path / "teacher")))
    for model in (own, other):
        for module in (model.vae, model.text_encoder):
            module.to(half)
    assert TrainingBatches(str(cache), own, 16, 2, 0).cache_note is None
    with pytest.raises(latent_cache.UserError, match="written with another VAE than"):
        TrainingBatches(str(cache), other, 16, 2, 0)


def test_digests_taken_before_the_cast_are_not_read_again(tiny_sd, cache, monkeypatch):
    """`train` calls `digest_encoders_before_cast` before mixed precision casts the frozen parts: the cache's check then
    reads no weights again from the model's folder (19 GB for PixArt's T5), and still takes the model's own cache."""
    def no_reading(*args, **kwargs):
        raise AssertionError("a part was read again from the model's folder")

    model = load_diffusion_model(str(tiny_sd))
    latent_cache.digest_encoders_before_cast(model, (str(cache), ""))
    for module in (model.vae, model.text_encoder):
        module.to(torch.bfloat16)
    monkeypatch.setattr(latent_cache, "load_component", no_reading)
    assert TrainingBatches(str(cache), model, 16, 2, 0).cache_note is None


def test_an_sdxl_cache_records_both_text_encoders_and_refuses_another_second_one(tiny_sdxl, tmp_path):
    """SDXL's second text encoder makes the pooled embedding and half of each token's: it is recorded and checked too."""
    sdxl = load_diffusion_model(str(tiny_sdxl))
    data = write_captioned_images(tmp_path / "images", 3)
    path = latent_cache.write_latent_cache(ImageFolderDataset(data, 16), tmp_path / "cache", sdxl.codec, sdxl.prompts,
                                           source={}, progress=False)
    assert set(json.loads((path / "manifest.json").read_text())[latent_cache.ENCODERS]) == {"vae", "text_encoder", "text_encoder_2"}
    assert TrainingBatches(str(path), sdxl, 16, 2, 0).cache_note is None
    other = save_tiny_sdxl(tmp_path / "other-sdxl", seed=1)
    teacher = load_diffusion_model(str(swapped(tiny_sdxl, other, "text_encoder_2", tmp_path / "teacher")))
    with pytest.raises(latent_cache.UserError, match="written with another second text encoder than .* so its text embeddings"):
        TrainingBatches(str(path), teacher, 16, 2, 0)


@pytest.mark.parametrize("recorded, why", [("cuda", "it was written with another device type (--device)"),
                                           (None, "its progress.json, written by an earlier version of lcm, records no device")])
def test_a_partial_written_on_another_device_type_starts_again(model, tmp_path, monkeypatch, recorded, why):
    """Was: --device was no part of the job, so shards encoded on a GPU and resumed on the CPU made a cache of both
    devices' rounding, byte for byte neither's. Now a partial of another device type (faked here: its record says cuda) or
    of a record without one starts again, saying why, and writes the uninterrupted cache."""
    data = images(tmp_path / "images")
    write(model, data, tmp_path / "whole")
    partial = killed(model, data, tmp_path / "cache", monkeypatch)
    record = json.loads((partial / latent_cache.PROGRESS).read_text())
    assert record["job"]["device"] == "cpu"
    if recorded is None:
        del record["job"]["device"]
    else:
        record["job"]["device"] = recorded
    (partial / latent_cache.PROGRESS).write_text(json.dumps(record))
    notes = []
    write(model, data, tmp_path / "cache", notes)
    assert notes == [f"note: {partial} is started again: {why}"]
    assert snapshot(tmp_path / "cache") == snapshot(tmp_path / "whole")
