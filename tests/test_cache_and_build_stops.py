"""The commands that encode data in bulk: `lcm cache` (`write_latent_cache`) and `lcm world build`'s rendering. Each usable
sample is cached once, shards included, and their DataLoader workers read and stop as training's do (`data.workers`)."""

import os
import signal

import pytest
import torch

from latent_consistency.data.latent_cache import LatentCache, write_latent_cache
from latent_consistency.world.build import _render
from test_shard_journeys import img2dataset_sample, write_shard
from tiny_models import write_captioned_images


def cache(argv: list[str], capsys) -> tuple[int, str, str]:
    """`lcm cache ARGV`: (exit code, standard output, the last line of standard error, after the data's skip log lines)."""
    from latent_consistency.cli import main

    code = main(["cache", *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, (err.strip().splitlines() or [""])[-1]


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_image_is_counted_once_and_left_out_of_the_cache(tiny_sd, tmp_path, capsys, workers):
    """Was: the image folder stood the next image in for a corrupt one, so the cache held that image twice (two rows of the
    same latents, its caption drawn twice as often in training) and `lcm cache` said it wrote 4 samples; `lcm cache` had no
    --num-workers. Now the corrupt image is left out and counted once, with or without workers."""
    images = write_captioned_images(tmp_path / "images", 4, caption="a red star number {i}")
    (images / "1.png").write_bytes(b"not a png")
    argv = ["--model", str(tiny_sd), "--data", str(images), "--out", str(tmp_path / "cache")] + (["--num-workers", "1"] if workers else [])
    code, out, err = cache(argv, capsys)
    assert code == 0, err
    read = LatentCache(tmp_path / "cache")
    assert list(read.captions) == ["a red star number 0", "a red star number 2", "a red star number 3"]
    assert read.caption_index.tolist() == [0, 1, 2]
    assert "data: skipped: corrupt=1\n" in out and "a latent cache of 3 samples" in out, out


def test_shards_are_cached_each_usable_sample_once(tiny_sd, tmp_path, capsys):
    """Was: refused ("webdataset shards, which a run streams without end"). Now each usable sample of each shard is cached
    once, shard after shard, and the samples without a caption or with a corrupt image are counted."""
    write_shard(tmp_path / "shards" / "00000.tar", img2dataset_sample("a", "a red one") + [("b.jpg", b"not a jpeg"), ("b.txt", b"broken")])
    write_shard(tmp_path / "shards" / "00001.tar", img2dataset_sample("c", "a blue one") + img2dataset_sample("d", "a red one")
                + [("e.jpg", img2dataset_sample("e", "x")[0][1])])
    code, out, err = cache(["--model", str(tiny_sd), "--data", str(tmp_path / "shards"), "--out", str(tmp_path / "cache")], capsys)
    assert code == 0, err
    read = LatentCache(tmp_path / "cache")
    assert [read.captions[i] for i in read.caption_index] == ["a red one", "a blue one", "a red one"]
    assert "corrupt=1" in out and "no_caption=1" in out and "a latent cache of 3 samples" in out, out


def test_data_without_a_usable_sample_is_one_line_and_writes_no_cache(tiny_sd, tmp_path, capsys):
    """Shards (or a folder) of nothing but corrupt images: one line saying what was skipped, and no cache."""
    write_shard(tmp_path / "shards" / "00000.tar", [("a.jpg", b"not a jpeg"), ("a.txt", b"broken")])
    code, _, err = cache(["--model", str(tiny_sd), "--data", str(tmp_path / "shards"), "--out", str(tmp_path / "cache")], capsys)
    assert code == 2 and err == "lcm cache: error: no usable sample in the data (skipped: corrupt=1); check the files", err
    assert not (tmp_path / "cache").exists()


class _SigtermHandlers(torch.utils.data.Dataset):
    """Items whose caption says which SIGTERM handler the process reading them has: a DataLoader worker's."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> dict:
        quiet = callable(signal.getsignal(signal.SIGTERM))  # torch's own handler is C code, which Python sees as its parent's
        return {"image": torch.zeros(3, 8, 8), "caption": "quiet" if quiet else "torch's", "attributes": {}}


def test_the_workers_of_the_cache_and_of_world_rendering_end_quietly_on_sigterm(tiny_sd, tmp_path, monkeypatch):
    """A stop of the whole process group (a scheduler's, `timeout`'s) reaches the workers from a process other than their
    parent: torch's handler let it kill them, and the command could stop with "DataLoader worker (pid N) is killed by
    signal: Terminated" and a traceback instead of its one line. Their workers now have training's quiet handler
    (`data.workers.end_quietly_on_sigterm`, whose effect `test_dataloader_workers` checks)."""
    from latent_consistency.models import load_diffusion_model

    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # `_render` uses a worker where a core is to spare
    model = load_diffusion_model(str(tiny_sd))
    handler = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the test runner's own would be the workers' to Python's eyes
    try:
        rendered = _render(_SigtermHandlers(), progress=False)
        cache = write_latent_cache(_SigtermHandlers(), tmp_path / "cache", model.codec, model.prompts, {}, num_workers=1, progress=False)
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert rendered.captions == ["quiet", "quiet"] and list(LatentCache(cache).captions) == ["quiet"]
