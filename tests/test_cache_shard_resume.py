"""`lcm cache` of webdataset .tar shards stopped part way (Ctrl-C, SIGTERM, kill -9) resumes: a rerun of the same command goes
on from the reading position recorded with its last whole cache shard (`shards.OncePosition`) and writes, byte for byte,
the cache an uninterrupted run writes; shards renamed, added or rewritten since start it again, saying why. And
`lcm cache --captions-only` loads the model's VAE alone (`models.load_latent_codec`), with the latents of the whole model's."""

import functools
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from latent_consistency import models
from latent_consistency.cli import main
from latent_consistency.data import latent_cache
from latent_consistency.data.imagefolder import ImageFolderDataset
from latent_consistency.data.spec import open_dataset
from latent_consistency.models import load_diffusion_model
from test_cache_resume import CAPTIONS, images, killed, snapshot, write
from test_shard_journeys import ENV, img2dataset_sample, write_shard

# In .tar shard k, sample i: (shard, index) of a sample without a caption, and of one with a corrupt image
NO_CAPTION, CORRUPT = {(1, 1), (4, 1)}, {(2, 0)}
USABLE = 6 * 3 - len(NO_CAPTION) - len(CORRUPT)  # in batches of 2, cache shards of 4: 4, 4, 4, 3


@pytest.fixture(scope="module")
def model(tiny_sd):
    return load_diffusion_model(str(tiny_sd))


def sample(k: int, i: int) -> list[tuple[str, bytes]]:
    """Sample i of .tar shard k, img2dataset's members, less its caption members or with a corrupt image where it is one."""
    members = img2dataset_sample(f"s{k}{i}", CAPTIONS[(3 * k + i) % len(CAPTIONS)])
    if (k, i) in NO_CAPTION:
        return members[:1]
    if (k, i) in CORRUPT:
        return [(members[0][0], b"not a jpeg"), *members[1:]]
    return members


def shards(folder, count: int = 6):
    """A folder of `count` .tar shards of 3 samples each (`sample`)."""
    for k in range(count):
        write_shard(folder / f"{k:05d}.tar", [m for i in range(3) for m in sample(k, i)])
    return folder


def stream(model, folder):
    """The folder's shards opened as `lcm cache` opens them (a rerun opens them anew)."""
    return open_dataset(str(folder), model.native_size)


@pytest.mark.parametrize("when", ["in the third shard's file", "before the third shard's record"])
def test_shards_stopped_in_the_third_cache_shard_resume_to_the_uninterrupted_cache(model, tmp_path, monkeypatch, encoded, when):
    """Was: "webdataset shards are read again from their start" and all 15 samples encoded again. Now the rerun goes on
    in .tar shard 4 (cache shard 2 ended on its first sample, its other two not yet read): it encodes the 7 samples left,
    writes the bytes of an uninterrupted run, and counts each skipped sample once, those before the stop and after."""
    data, source = shards(tmp_path / "shards"), {"data": str(tmp_path / "shards")}
    whole = write(model, stream(model, data), tmp_path / "whole", source=source)
    partial = killed(model, stream(model, data), tmp_path / "cache", monkeypatch, when, source=source)
    encoded[0], notes = 0, []
    resumed = write(model, stream(model, data), tmp_path / "cache", notes, source=source)
    assert notes == [f"resuming {partial} at webdataset shard 4 of 6 ({data / '00003.tar'}) (2 shards written)"]
    assert encoded[0] == USABLE - 8
    assert snapshot(tmp_path / "cache") == snapshot(tmp_path / "whole") and not partial.exists()
    assert resumed.skipped.summary() == whole.skipped.summary() == "skipped: corrupt=1, no_caption=2; converted: upscaled=15"


def test_a_stop_after_the_last_cache_shard_is_recorded_resumes_at_the_end_of_the_shards(model, tmp_path, monkeypatch, encoded):
    """Stopped as the captions file is written, every sample in a recorded cache shard: the rerun reads no shard again
    (its position is the end) and counts the skips the record holds, once."""
    data, source = shards(tmp_path / "shards"), {"data": str(tmp_path / "shards")}
    whole = write(model, stream(model, data), tmp_path / "whole", source=source)

    def stopped(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(latent_cache, "_write_text_embeddings", stopped)
        with pytest.raises(KeyboardInterrupt):
            write(model, stream(model, data), tmp_path / "cache", source=source)
    encoded[0], notes = 0, []
    resumed = write(model, stream(model, data), tmp_path / "cache", notes, source=source)
    assert notes == [f"resuming {tmp_path / 'cache.partial'} at the end of the webdataset shards (4 shards written)"] and encoded[0] == 0
    assert snapshot(tmp_path / "cache") == snapshot(tmp_path / "whole")
    assert resumed.skipped.summary() == whole.skipped.summary()


def rewrite_a_caption(folder):
    """Shard 0's first caption changed in place: the same name and size (a tar is padded to 10 KiB), other first bytes."""
    tar = folder / "00000.tar"
    before = tar.read_bytes()
    tar.write_bytes(before.replace(CAPTIONS[0].encode(), b"a stbr"))
    assert tar.stat().st_size == len(before) and tar.read_bytes() != before


CHANGES = {
    "rewritten": rewrite_a_caption,
    "renamed": lambda folder: (folder / "00005.tar").rename(folder / "00009.tar"),
    "added": lambda folder: write_shard(folder / "00006.tar", sample(6, 0)),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_shards_changed_since_the_stop_start_again_saying_why(model, tmp_path, monkeypatch, encoded, change):
    """A position is a shard's index and a byte offset: in a shard rewritten (same name and size), renamed or added since, it
    names other samples. The rerun starts OUT.partial again with one note, and writes the uninterrupted cache of the shards
    as they are now."""
    data, source = shards(tmp_path / "shards"), {"data": str(tmp_path / "shards")}
    partial = killed(model, stream(model, data), tmp_path / "cache", monkeypatch, source=source)
    CHANGES[change](data)
    write(model, stream(model, data), tmp_path / "whole", source=source)
    encoded[0], notes = 0, []
    write(model, stream(model, data), tmp_path / "cache", notes, source=source)
    assert notes == [f"note: {partial} is started again: it was written with another data (other .tar shards: names, sizes or first bytes)"]
    assert encoded[0] == len(latent_cache.LatentCache(tmp_path / "whole"))
    assert snapshot(tmp_path / "cache") == snapshot(tmp_path / "whole")


# `lcm cache` in its own process, its cache shards of 4 samples, paused in its sixth VAE batch (the third cache shard's
# second: the first in memory, not yet written) after touching the file $PAUSED, for the test to stop it there
PAUSING_CACHE = """
import functools, os, signal, sys, time
# Ctrl-C as in a terminal: a pytest-xdist worker ignores SIGINT, and a child process inherits that
signal.signal(signal.SIGINT, signal.default_int_handler)
from latent_consistency.cli import main
from latent_consistency.data import latent_cache
from latent_consistency.models import LatentCodec

latent_cache.write_latent_cache = functools.partial(latent_cache.write_latent_cache, shard_size=4)
encode, calls = LatentCodec.encode, []

def encode_or_pause(codec, images, **kw):
    calls.append(len(images))
    if len(calls) == 6:
        open(os.environ["PAUSED"], "w").close()
        time.sleep(300)
    return encode(codec, images, **kw)

LatentCodec.encode = encode_or_pause
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize(("stop", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGKILL, -signal.SIGKILL)])
def test_lcm_cache_of_shards_stopped_by_a_signal_resumes_to_the_uninterrupted_cache(tiny_sd, tmp_path, monkeypatch, capsys, stop, code):
    """A real `lcm cache` process stopped in its third cache shard by Ctrl-C, SIGTERM or kill -9: the same command again
    says it resumes in .tar shard 4, prints the uninterrupted run's summary and writes its very files."""
    data = shards(tmp_path / "shards")
    argv = ["cache", "--model", str(tiny_sd), "--data", str(data), "--batch-size", "2", "--out"]
    paused = tmp_path / "paused"
    child = subprocess.Popen([sys.executable, "-c", PAUSING_CACHE, *argv, str(tmp_path / "cache")], env=ENV | {"PAUSED": str(paused)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not paused.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert paused.exists(), child.communicate(timeout=10)[1] if child.poll() is not None else "the child never paused"
        child.send_signal(stop)
        assert child.wait(timeout=60) == code
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    partial = tmp_path / "cache.partial"
    assert {"shard-00000.safetensors", "shard-00001.safetensors"} <= set(os.listdir(partial)) and not (tmp_path / "cache").exists()
    monkeypatch.setattr(latent_cache, "write_latent_cache", functools.partial(latent_cache.write_latent_cache, shard_size=4))
    assert main([*argv, str(tmp_path / "whole")]) == 0
    whole = capsys.readouterr().out.replace(str(tmp_path / "whole"), "OUT")
    assert main([*argv, str(tmp_path / "cache")]) == 0
    out, err = capsys.readouterr()
    assert f"lcm cache: resuming {partial} at webdataset shard 4 of 6 ({data / '00003.tar'}) (2 shards written)" in err.splitlines(), err
    assert out.replace(str(tmp_path / "cache"), "OUT") == whole and "data: skipped: corrupt=1, no_caption=2; converted: upscaled=15\n" in whole, whole
    assert snapshot(tmp_path / "cache") == snapshot(tmp_path / "whole")


def test_lcm_cache_captions_only_loads_the_vae_alone_and_writes_the_whole_models_cache(tiny_sd, model, tmp_path, monkeypatch, capsys):
    """Was: the UNet and text encoder loaded too, though a captions-only cache runs neither (PixArt's T5-XXL: 19 GB). Now
    only vae/ loads, and the cache is, byte for byte, the one the whole model's codec writes."""
    data = images(tmp_path / "images")
    loaded, load = [], models.load_component

    def recording(cls, name_or_path, subfolder, **kwargs):
        loaded.append(subfolder)
        return load(cls, name_or_path, subfolder, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(models, "load_component", recording)
        assert main(["cache", "--model", str(tiny_sd), "--data", str(data), "--out", str(tmp_path / "cli"), "--captions-only"]) == 0
    assert loaded == ["vae"]
    source = {"data": str(data), "model": str(tiny_sd), "resolution": model.native_size}
    latent_cache.write_latent_cache(ImageFolderDataset(data, model.native_size), tmp_path / "whole", model.codec, None, source,
                                    batch_size=64, progress=False, captions_only=True)
    assert snapshot(tmp_path / "cli") == snapshot(tmp_path / "whole")


@pytest.mark.parametrize("family", ["tiny_sdxl", "tiny_pixart"])
def test_the_vae_alone_encodes_as_the_whole_model_at_its_native_size(request, family):
    """An SDXL model and a PixArt-α one (a transformer/, no unet/): the native size the denoising network's config gives and
    the latents of the VAE loaded alone are the whole model's."""
    folder = str(request.getfixturevalue(family))
    whole = load_diffusion_model(folder)
    codec, size = models.load_latent_codec(folder)
    pixels = torch.rand(2, 3, size, size) * 2 - 1
    assert size == whole.native_size and torch.equal(codec.encode(pixels), whole.codec.encode(pixels))
