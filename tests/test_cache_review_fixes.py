"""A review of `lcm cache`: a full cache loaded the whole model, its UNet (3.4 GB in SD 1.5, 10 GB in SDXL) read for
nothing; now its VAE and text encoder(s) load alone, and the cache is byte for byte the one the whole model wrote. A cache
of a registered dataset (world:shapes) started again from nothing when stopped; now it resumes as an image folder's does."""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from latent_consistency.data import latent_cache
from latent_consistency.data.imagefolder import ImageFolderDataset
from latent_consistency.models import load_diffusion_model
from test_cache_resume import stop_at_save
from tiny_models import write_captioned_images

NETWORK_WEIGHTS = {"tiny_sd": "unet", "tiny_sdxl": "unet", "tiny_pixart": "transformer"}


def snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def without_network_weights(folder, network: str) -> None:
    """`folder`'s denoising network with its config and no weights file: loading them fails."""
    weights = folder / network / "diffusion_pytorch_model.safetensors"
    assert weights.is_file()
    weights.unlink()


@pytest.mark.parametrize("family", list(NETWORK_WEIGHTS))
def test_a_full_cache_loads_no_network_weights_and_writes_the_whole_models_cache(request, tmp_path, run_error, family):
    """The cache `lcm cache` writes of a model whose UNet (or PixArt-α's transformer) has no weights file is, byte for byte,
    the one the whole model loaded writes (the code before: `load_diffusion_model`, the cache as `lcm cache` wrote it), the
    digests of SDXL's two text encoders included. Was: "cannot load the unet of MODEL", the weights read to go unused."""
    model = tmp_path / "model"
    shutil.copytree(request.getfixturevalue(family), model)
    images = write_captioned_images(tmp_path / "images", 5, caption="a {i} star")
    whole = load_diffusion_model(str(model))
    source = {"data": str(images), "model": str(model), "resolution": whole.native_size}
    latent_cache.write_latent_cache(ImageFolderDataset(images, whole.native_size), tmp_path / "whole", whole.codec, whole.prompts,
                                    source, "cpu", batch_size=64, progress=False)
    without_network_weights(model, NETWORK_WEIGHTS[family])
    code, err = run_error(["cache", "--model", str(model), "--data", str(images), "--out", str(tmp_path / "cache"), "--device", "cpu"])
    assert code == 0, err
    assert snapshot(tmp_path / "cache") == snapshot(tmp_path / "whole")
    encoders = {"vae", "text_encoder", "text_encoder_2"} if family == "tiny_sdxl" else {"vae", "text_encoder"}
    assert set(json.loads((tmp_path / "cache" / "manifest.json").read_text())["encoders"]) == encoders


def test_a_full_cache_still_refuses_text_encoders_that_do_not_fit_the_unet(tiny_sd, tmp_path, run_error):
    """The UNet made from its config alone is still checked against the text encoder: a UNet that attends to 64-wide
    embeddings beside a 32-wide CLIP is refused in one line, nothing written."""
    model = tmp_path / "model"
    shutil.copytree(tiny_sd, model)
    without_network_weights(model, "unet")
    config = json.loads((model / "unet" / "config.json").read_text())
    (model / "unet" / "config.json").write_text(json.dumps(config | {"cross_attention_dim": 64}))
    images = write_captioned_images(tmp_path / "images", 2)
    code, err = run_error(["cache", "--model", str(model), "--data", str(images), "--out", str(tmp_path / "cache"), "--device", "cpu"])
    assert code == 2 and len(err.splitlines()) == 1 and "make 32-wide embeddings, but its unet takes 64-wide ones" in err, err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "cache.partial").exists()


@pytest.fixture(scope="module")
def model_32px(tiny_sd, tmp_path_factory):
    """The tiny SD at the world's 32 px: its UNet's sample size doubled (a config the weights do not depend on)."""
    model = tmp_path_factory.mktemp("models") / "tiny-sd-32"
    shutil.copytree(tiny_sd, model)
    config = json.loads((model / "unet" / "config.json").read_text())
    (model / "unet" / "config.json").write_text(json.dumps(config | {"sample_size": 16}))
    return model


SHARD_SIZE = 64  # `lcm cache` has no option for it: 256 samples of world:shapes:heldout in 4 shards
# `lcm cache ARGV` in a process of its own with shards of SHARD_SIZE, which after its first shard is on disk and recorded
# touches the file READY and waits there to be killed
KILLED_AFTER_FIRST_SHARD = """
import functools, pathlib, sys, time
from latent_consistency.cli import main
from latent_consistency.data import latent_cache
latent_cache.write_latent_cache = functools.partial(latent_cache.write_latent_cache, shard_size={shard_size})
add_shard = latent_cache._Written.add_shard
def add_shard_then_wait(self, pending, batches):
    add_shard(self, pending, batches)
    pathlib.Path({ready!r}).touch()
    time.sleep(600)
latent_cache._Written.add_shard = add_shard_then_wait
sys.exit(main({argv!r}))
"""


def kill_after_first_shard(argv: list[str], ready) -> None:
    """`lcm cache ARGV` run as its own process and stopped with SIGKILL once its first shard is whole on disk and recorded."""
    script = KILLED_AFTER_FIRST_SHARD.format(shard_size=SHARD_SIZE, ready=str(ready), argv=["cache", *argv])
    err = ready.with_name("stderr")
    with open(err, "w") as stderr:  # a file, not a pipe that fills while nothing reads it
        process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert process.poll() is None, err.read_text()
            assert time.monotonic() < deadline, "no shard written in 120 s"
            time.sleep(0.05)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL


def test_a_world_dataset_cache_killed_after_its_first_shard_resumes_to_the_uninterrupted_cache(model_32px, tmp_path, monkeypatch,
                                                                                                   capsys, encoded):
    """`lcm cache --data world:shapes:heldout` killed (SIGKILL) once its first shard of 64 is written: the same command again
    resumes at sample 64, encodes the 192 left and writes the bytes an uninterrupted run writes. Was: "started again: only
    the reading of an image folder or of webdataset shards resumes", all 256 encoded again."""
    from latent_consistency.cli import main

    argv = ["--model", str(model_32px), "--data", "world:shapes:heldout", "--batch-size", "16", "--device", "cpu", "--out"]
    monkeypatch.setattr(latent_cache, "write_latent_cache", functools.partial(latent_cache.write_latent_cache, shard_size=SHARD_SIZE))
    assert main(["cache", *argv, str(tmp_path / "whole")]) == 0
    kill_after_first_shard([*argv, str(tmp_path / "cache")], tmp_path / "ready")
    partial = tmp_path / "cache.partial"
    assert [s["file"] for s in json.loads((partial / latent_cache.PROGRESS).read_text())["shards"]] == ["shard-00000.safetensors"]
    capsys.readouterr()
    encoded[0] = 0
    assert main(["cache", *argv, str(tmp_path / "cache")]) == 0
    err = capsys.readouterr().err
    assert f"lcm cache: resuming {partial} at sample 64 of 256 (1 shards written)" in err.splitlines(), err
    assert encoded[0] == 192
    assert snapshot(tmp_path / "cache") == snapshot(tmp_path / "whole") and not partial.exists()


class Redrawn(torch.utils.data.Dataset):
    """A dataset's items as another version of lcm might draw them: each image mirrored."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[i]
        return item | {"image": item["image"].flip(-1)}


def test_a_world_dataset_drawn_otherwise_starts_again_and_one_spelled_otherwise_is_the_same_job(model_32px, tmp_path, monkeypatch):
    """A partial of world:shapes:heldout whose rerun reads the dataset drawn otherwise (another version of lcm: its first
    sample differs) is started again, saying why, and the cache is the new drawing's. world:shapes and world:shapes:train
    name one dataset: the same job."""
    from latent_consistency.world.datasets import get_dataset

    model = load_diffusion_model(str(model_32px))
    heldout = get_dataset("shapes", "heldout", 32)

    def write(data, out, notes=None):
        latent_cache.write_latent_cache(data, out, model.codec, model.prompts, {"data": "world:shapes:heldout", "resolution": 32},
                                        batch_size=16, shard_size=SHARD_SIZE, progress=False, say=(notes if notes is not None else []).append)

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        stop_at_save(patch, 2)
        write(heldout, tmp_path / "cache")
    notes = []
    write(Redrawn(heldout), tmp_path / "cache", notes)
    started = [note for note in notes if "started again" in note]  # not the note of the captions the tiny text encoder cuts
    assert started == [f"note: {tmp_path / 'cache.partial'} is started again: it was written with another data (the registered dataset "
                       "drawn otherwise, by another version of lcm)"], notes
    write(Redrawn(heldout), tmp_path / "whole")
    assert snapshot(tmp_path / "cache") == snapshot(tmp_path / "whole")
    train = get_dataset("shapes", "train", 32)
    jobs = [latent_cache._job(train, model.codec, {"data": spec, "resolution": 32}, 16, SHARD_SIZE, False)
            for spec in ("world:shapes", "world:shapes:train")]
    assert jobs[0] == jobs[1] and jobs[0]["data"]["named"] == "world:shapes:train"
