"""Defects found reviewing the last session's changes. The latent cache read memory-mapped (commit 782612c): its own
safetensors header reader took for sizes what safetensors refuses (JSON's true, a size past int64), let two tensors share
bytes, read an empty shard into a traceback at the first checkpoint, and let a file the user may not read escape as a
traceback; each is now one line (a UserError: `lcm` prints it and exits 2), or, for the empty shard, the cache's usual
fingerprint. An image folder's fingerprint on threads (commit 9e14430), stopped by Ctrl-C or an error, read every file
queued ahead before it stopped; now only those being read."""

import builtins
import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from latent_consistency.data import imagefolder, latent_cache
from latent_consistency.data.imagefolder import ImageFolderDataset
from latent_consistency.data.latent_cache import CAPTIONS, MANIFEST, LatentCache, write_latent_cache
from latent_consistency.errors import UserError
from latent_consistency.models import load_diffusion_model
from tiny_models import write_captioned_images


@pytest.fixture(scope="module")
def cache(tiny_sd, tmp_path_factory) -> Path:
    """The tiny teacher's cache of 6 captioned images in 2 shards (4, 2)."""
    images = write_captioned_images(tmp_path_factory.mktemp("images"), 6)
    model = load_diffusion_model(str(tiny_sd))
    return write_latent_cache(ImageFolderDataset(images, 16), tmp_path_factory.mktemp("cache") / "latents", model.codec,
                              model.prompts, source={}, batch_size=4, shard_size=4, progress=False)


def copy_of(cache: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(cache, tmp_path / "latents"))


def edit_header(file: Path, edit) -> None:
    """Rewrite the safetensors header of `file` as `edit(header)` leaves it, its data untouched."""
    data = file.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length:])


def boolean_size(header: dict) -> None:
    """uncond_embedding [L, D] as [true, L·D]: the same number of values, but JSON's true is no size (reshape refused it)."""
    entry = header["uncond_embedding"]
    entry["shape"] = [True, entry["shape"][0] * entry["shape"][1]]


def size_past_int64(header: dict) -> None:
    """An empty uncond_embedding [0, 2^64] (no bytes, so its offsets fit): a size that no tensor has (reshape overflowed)."""
    begin = header["uncond_embedding"]["data_offsets"][0]
    header["uncond_embedding"] |= {"shape": [0, 2**64], "data_offsets": [begin, begin]}


def on_the_table_bytes(header: dict) -> None:
    """uncond_embedding moved onto the first bytes of text_embeddings: read, it was the first caption's embedding."""
    entry, begin = header["uncond_embedding"], header["text_embeddings"]["data_offsets"][0]
    size = entry["data_offsets"][1] - entry["data_offsets"][0]
    entry["data_offsets"] = [begin, begin + size]


@pytest.mark.parametrize("edit", [boolean_size, size_past_int64, on_the_table_bytes])
def test_a_captions_header_that_safetensors_refuses_is_one_line(cache, tmp_path, edit):
    """Was: a TypeError from reshape (true, 2^64) with a C++ stack in it, or (two tensors on the same bytes) a cache read
    with its empty prompt's embedding taken from a caption's, where safetensors' reader said "invalid offset". Now each
    is the one line of an unreadable cache file."""
    path = copy_of(cache, tmp_path)
    edit_header(path / CAPTIONS, edit)
    with pytest.raises(UserError, match="captions.safetensors is unreadable"):
        LatentCache(path)


def test_an_empty_shard_leaves_the_fingerprint_and_samples_as_they_are(cache, tmp_path):
    """A shard of no samples (listed in the manifest with num_samples 0, as a writer of a shard per rank leaves one) was
    read, and then `fingerprint`, which every training checkpoint records, raised a RuntimeError (reshape of 0 elements to
    [0, -1]). Now the cache is the cache without it: the same fingerprint and latents."""
    path = copy_of(cache, tmp_path)
    before = LatentCache(path)
    manifest = json.loads((path / MANIFEST).read_text())
    save_file({"latents": torch.zeros(0, *before.latent_shape), "caption_index": torch.zeros(0, dtype=torch.int64),
               "key_bytes": torch.zeros(0, dtype=torch.uint8), "key_offsets": torch.zeros(1, dtype=torch.int64)},  # no sample, no key
              str(path / "shard-empty.safetensors"))
    manifest["shards"].insert(1, {"file": "shard-empty.safetensors", "num_samples": 0})
    (path / MANIFEST).write_text(json.dumps(manifest))
    after = LatentCache(path)
    assert after.fingerprint() == before.fingerprint()
    assert torch.equal(after.latents, before.latents)


def test_a_cache_file_this_user_may_not_read_is_one_line(cache, tmp_path, monkeypatch):
    """safetensors writes its files readable by their owner alone (0600), so another user of a shared machine reading a
    cache meets a PermissionError: it escaped as a traceback. Now one line says which file and what to do. (Tests run as
    root, whom no permission stops: the refusal is the one `open` gives such a user.)"""
    path = copy_of(cache, tmp_path)
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if Path(file).name == CAPTIONS:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(latent_cache, "open", refusing_open, raising=False)  # the module's `open`, before the builtin
    with pytest.raises(UserError, match=r"cannot read latent cache file .*captions.safetensors \(Permission denied\); give this user read"):
        LatentCache(path)


class Stop(Exception):
    """What a Ctrl-C or an error does to a fingerprint: it stops reading."""


def test_a_stopped_fingerprint_waits_only_for_the_files_being_read(tmp_path, monkeypatch):
    """The fingerprint reads the files on threads, two tasks a thread queued ahead (16 tasks of 256 opens by default). Was:
    stopped at its first file (here an error; a Ctrl-C alike), it still read every queued task before it stopped, 4,096
    opens on a network disk. Now the tasks not started are dropped. One thread of tasks of 4 files here: the task it is
    reading when the stop comes is finished, the one queued behind it (4 more files) no longer read. Deterministic: each
    file after the first waits until the fingerprint, stopped, shuts its threads down."""
    folder = ImageFolderDataset(write_captioned_images(tmp_path / "images", 12), 16)
    monkeypatch.setattr(imagefolder, "FINGERPRINT_THREADS", 1)
    monkeypatch.setattr(imagefolder, "FINGERPRINT_CHUNK", 4)
    stopped, read = threading.Event(), []

    class Pool(ThreadPoolExecutor):
        def shutdown(self, *args, **kwargs):
            stopped.set()
            super().shutdown(*args, **kwargs)

    def digest(path):
        if not read:
            read.append(path)
            raise Stop
        stopped.wait(30)
        read.append(path)
        return ""

    monkeypatch.setattr(imagefolder, "ThreadPoolExecutor", Pool)
    monkeypatch.setattr(imagefolder, "_file_sample_digest", digest)
    with pytest.raises(Stop):
        folder.fingerprint()
    assert len(read) - 1 <= imagefolder.FINGERPRINT_CHUNK  # was 8: the tasks of files 5-8 and 9-12
