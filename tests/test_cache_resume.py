"""`lcm cache` (`write_latent_cache`) stopped part way resumes: a rerun of the same job goes on from the last whole shard
recorded in OUT.partial and writes, byte for byte, the cache an uninterrupted run writes, encoding only the samples left.
A rerun of another job, or of data whose reading has no position to go on from, starts OUT.partial again, saying why.
(Webdataset shards: `test_cache_shard_resume`.)"""

import functools
import json
from pathlib import Path

import pytest
import torch

from latent_consistency.data import latent_cache
from latent_consistency.data.imagefolder import ImageFolderDataset
from latent_consistency.data.shards import ShardStream
from latent_consistency.models import load_diffusion_model
from tiny_models import write_captioned_images

# Captions that repeat, some first seen in a later shard: the caption table rebuilt on a resume must keep their order
CAPTIONS = ["a star", "a moon", "a star", "a cloud", "a moon", "a sun", "a star", "a tree", "a sun", "a rock", "a cloud", "a bird",
            "a fish", "a moon"]


@pytest.fixture(scope="module")
def model(tiny_sd):
    return load_diffusion_model(str(tiny_sd))


def images(folder, count: int = 10, corrupt: tuple[int, ...] = ()):
    """An image folder of `count` 16 px images captioned CAPTIONS, the images `corrupt` not images at all."""
    write_captioned_images(folder, count)
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": CAPTIONS[i]}) + "\n" for i in range(count)))
    for i in corrupt:
        (folder / f"{i}.png").write_bytes(b"not a png")
    return folder


def write(model, data, out, notes=None, **settings):
    """`write_latent_cache` of `data` (an image folder: a dataset opened anew, as a rerun opens it) into `out`, in batches of 2
    and shards of at least 4 samples; its notes appended to `notes`."""
    dataset = ImageFolderDataset(data, 16) if not isinstance(data, (list, ShardStream)) else data
    settings = {"batch_size": 2, "shard_size": 4, "source": {"data": str(data)}} | settings
    latent_cache.write_latent_cache(dataset, out, model.codec, model.prompts, progress=False,
                                    say=(notes if notes is not None else []).append, **settings)
    return dataset


def snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def stop_at_save(patch, n: int, written: bool = True) -> list:
    """Have `latent_cache.save_file`'s `n`-th call raise KeyboardInterrupt, as a Ctrl-C between a cache's shards: after its
    file is `written`, or before it is; the paths saved or asked for so far."""
    save, calls = latent_cache.save_file, []

    def save_then_stop(tensors, path):
        calls.append(path)
        if len(calls) == n and not written:
            raise KeyboardInterrupt
        save(tensors, path)
        if len(calls) == n:
            raise KeyboardInterrupt

    patch.setattr(latent_cache, "save_file", save_then_stop)
    return calls


def stop_in_third_shard(patch, when: str = "in the third shard's file") -> None:
    """Have the third shard's write stop as Ctrl-C or a kill stops it: in the middle of its file (half of it on disk), or
    with the file whole on disk but not yet recorded."""
    save, calls = latent_cache.save_file, []

    def save_then_stop(tensors, path):
        calls.append(path)
        if len(calls) == 3 and when == "in the third shard's file":
            save(tensors, path + ".whole")
            whole = Path(path + ".whole")
            Path(path).write_bytes(whole.read_bytes()[:100])
            whole.unlink()
            raise KeyboardInterrupt
        save(tensors, path)
        if len(calls) == 3:
            raise KeyboardInterrupt

    patch.setattr(latent_cache, "save_file", save_then_stop)


def killed(model, data, out, monkeypatch, when: str = "in the third shard's file", **settings):
    """`write` stopped in its third shard (`stop_in_third_shard`); its OUT.partial."""
    with monkeypatch.context() as patch:
        stop_in_third_shard(patch, when)
        with pytest.raises(KeyboardInterrupt):
            write(model, data, out, **settings)
    return out.with_name(out.name + ".partial")


@pytest.mark.parametrize("when", ["in the third shard's file", "before the third shard's record"])
def test_a_cache_killed_after_its_second_shard_resumes_to_the_uninterrupted_cache(model, tmp_path, monkeypatch, encoded, when):
    """Was: the rerun threw OUT.partial away and encoded all 10 samples again. Now it goes on at sample 8 (two shards of 4
    written): it encodes the 2 left and writes the same bytes as an uninterrupted run, in every file; the third shard, half
    written or whole but not recorded, is written again, files the record does not name are not kept, and the record of
    the progress is gone from the finished cache."""
    data = images(tmp_path / "images")
    write(model, data, tmp_path / "whole")
    partial = killed(model, data, tmp_path / "cache", monkeypatch, when)
    assert (partial / "shard-00002.safetensors").exists()
    for stray in ("shard-00003.safetensors", "progress.json.tmp", "manifest.json"):  # none of them recorded
        (partial / stray).write_text("not recorded")
    encoded[0], notes = 0, []
    write(model, data, tmp_path / "cache", notes)
    assert notes == [f"resuming {partial} at sample 8 of 10 (2 shards written)"] and encoded[0] == 2
    assert snapshot(tmp_path / "cache") == snapshot(tmp_path / "whole") and not partial.exists()
    assert set(snapshot(tmp_path / "cache")) == {"manifest.json", "captions.safetensors", *(f"shard-0000{k}.safetensors" for k in range(3))}


@pytest.mark.parametrize("workers", [0, 1])
def test_a_resume_over_corrupt_images_keeps_the_batches_and_the_skip_summary(model, tmp_path, monkeypatch, encoded, workers):
    """Corrupt images 3, 4 and 5: the batch of items 4-5 yields nothing, so the reading's position is counted in the loader's
    batches, not in those it gives (which would resume at item 6 of 14 and cache items 6-7 twice). The resumed cache is the
    uninterrupted one, and the data's summary counts each corrupt image once, with DataLoader workers or without."""
    data = images(tmp_path / "images", 14, corrupt=(3, 4, 5))
    whole = write(model, data, tmp_path / "whole", num_workers=workers)
    partial = killed(model, data, tmp_path / "cache", monkeypatch, num_workers=workers)
    encoded[0], notes = 0, []
    resumed = write(model, data, tmp_path / "cache", notes, num_workers=workers)
    assert notes == [f"resuming {partial} at sample 12 of 14 (2 shards written)"] and encoded[0] == 2
    assert snapshot(tmp_path / "cache") == snapshot(tmp_path / "whole")
    assert resumed.skipped.summary() == whole.skipped.summary() == "skipped: corrupt=3"


def change_a_caption(data, model, settings):
    (data / "metadata.jsonl").write_text((data / "metadata.jsonl").read_text().replace("a bird", "a fish"))


def change_the_vae(data, model, settings):
    with torch.no_grad():
        next(model.codec.vae.parameters()).add_(1)


RESTARTS = {
    "batch size": (lambda data, model, settings: settings.update(batch_size=3), "it was written with another batch size"),
    "shard size": (lambda data, model, settings: settings.update(shard_size=5), "it was written with another shard size"),
    "data": (change_a_caption, "it was written with another data (other image files or captions)"),
    "model": (lambda data, model, settings: settings.update(source={"data": str(data), "model": "another"}),
              "it was written with another source (--data, --model or resolution)"),
    "vae": (change_the_vae, "it was written with another VAE (other weights)"),
}


@pytest.mark.parametrize("change", list(RESTARTS))
def test_a_rerun_of_another_job_starts_again_saying_why(model, tmp_path, monkeypatch, encoded, change):
    """A rerun with another batch or shard size (other shard boundaries), other images or captions, another source or VAE:
    OUT.partial is started again with one note, and the cache is the one an uninterrupted run of the new job writes."""
    data, settings = images(tmp_path / "images", 12), {}
    partial = killed(model, data, tmp_path / "cache", monkeypatch)
    vae = {name: value.clone() for name, value in model.codec.vae.state_dict().items()}
    try:
        RESTARTS[change][0](data, model, settings)
        write(model, data, tmp_path / "whole", **settings)
        encoded[0], notes = 0, []
        write(model, data, tmp_path / "cache", notes, **settings)
    finally:
        model.codec.vae.load_state_dict(vae)
    assert notes == [f"note: {partial} is started again: {RESTARTS[change][1]}"] and encoded[0] == 12
    assert snapshot(tmp_path / "cache") == snapshot(tmp_path / "whole")


def test_other_data_is_read_again_from_its_start_saying_so(model, tmp_path, monkeypatch, encoded):
    """A list of samples (other data than an image folder, shards or a registered dataset, whose resumes
    `test_cache_shard_resume` and `test_cache_review_fixes` check) has no identity to check: a rerun starts its OUT.partial
    again, with a note, and writes the uninterrupted cache."""
    samples = [{"image": torch.rand(3, 16, 16) * 2 - 1, "caption": c} for c in CAPTIONS[:12]]
    write(model, samples, tmp_path / "whole", source={})
    partial = killed(model, samples, tmp_path / "cache", monkeypatch, source={})
    encoded[0], notes = 0, []
    write(model, samples, tmp_path / "cache", notes, source={})
    assert notes == [f"note: {partial} is started again: only the reading of an image folder, of webdataset shards or of a registered "
                     "dataset resumes"]
    assert encoded[0] == 12 and snapshot(tmp_path / "cache") == snapshot(tmp_path / "whole")


def test_a_partial_without_a_whole_shard_or_with_a_damaged_record_starts_again(model, tmp_path, monkeypatch, encoded):
    """Killed in its first shard (an earlier version's OUT.partial looks the same), or a record that is not JSON: started
    again, saying why; a partial that holds nothing but its mark is started again without a word."""
    data = images(tmp_path / "images", 6)
    write(model, data, tmp_path / "whole")
    partial = tmp_path / "cache.partial"
    no_record = "it holds no record of a whole shard (progress.json; an earlier version of lcm wrote none)"
    for damage, why in [("first shard", no_record), ("record", "its progress.json is unreadable"), ("mark", None)]:
        partial.mkdir()
        (partial / latent_cache.PARTIAL_MARK).touch()
        if damage != "mark":
            (partial / "shard-00000.safetensors").write_bytes(b"half a shard")
        if damage == "record":
            (partial / latent_cache.PROGRESS).write_text('{"job": ')
        notes = []
        write(model, data, tmp_path / "cache", notes)
        assert notes == ([f"note: {partial} is started again: {why}"] if why else []), damage
        assert snapshot(tmp_path / "cache") == snapshot(tmp_path / "whole"), damage
        (tmp_path / "cache").rename(tmp_path / f"done-{damage.replace(' ', '-')}")


def test_lcm_cache_killed_and_run_again_says_it_resumes_and_summarises_the_data_as_one_run(tiny_sd, tmp_path, monkeypatch, capsys):
    """The command: Ctrl-C in its third shard, the same command again resumes with its line on stderr, writes the cache an
    uninterrupted `lcm cache` writes and prints its data summary and sample count (corrupt image 2: shards of items 0-5,
    6-9, 10-13)."""
    from latent_consistency.cli import main

    data = images(tmp_path / "images", 14, corrupt=(2,))
    monkeypatch.setattr(latent_cache, "write_latent_cache", functools.partial(latent_cache.write_latent_cache, shard_size=4))
    argv = ["cache", "--model", str(tiny_sd), "--data", str(data), "--batch-size", "2", "--out"]
    assert main([*argv, str(tmp_path / "whole")]) == 0
    whole = capsys.readouterr().out.replace(str(tmp_path / "whole"), "OUT")
    with monkeypatch.context() as patch:
        stop_in_third_shard(patch)
        assert main([*argv, str(tmp_path / "cache")]) == 130
    capsys.readouterr()
    assert main([*argv, str(tmp_path / "cache")]) == 0
    out, err = capsys.readouterr()
    assert f"lcm cache: resuming {tmp_path / 'cache.partial'} at sample 10 of 14 (2 shards written)" in err.splitlines(), err
    assert out.replace(str(tmp_path / "cache"), "OUT") == whole and "data: skipped: corrupt=1\n" in whole, whole
    assert snapshot(tmp_path / "cache") == snapshot(tmp_path / "whole")


def test_a_record_whose_files_are_gone_starts_again(model, tmp_path, monkeypatch, encoded):
    """A recorded shard's first-seen captions removed (by hand, a cleanup) after the kill: the caption table cannot be rebuilt,
    so the partial is started again, saying which file is missing."""
    data = images(tmp_path / "images")
    write(model, data, tmp_path / "whole")
    partial = killed(model, data, tmp_path / "cache", monkeypatch)
    (partial / "shard-00001.captions.json").unlink()
    encoded[0], notes = 0, []
    write(model, data, tmp_path / "cache", notes)
    assert notes == [f"note: {partial} is started again: its file shard-00001.captions.json is missing"] and encoded[0] == 10
    assert snapshot(tmp_path / "cache") == snapshot(tmp_path / "whole")


def test_a_cache_stopped_between_its_rename_and_its_tidying_is_tidied_by_a_rerun(model, tmp_path, monkeypatch):
    """A stop right after OUT.partial became OUT left the record of its writing in a whole cache, and a rerun said "already
    exists; remove it": a user would delete hours of encoding. The rerun now tidies it, saying so."""
    data = images(tmp_path / "images")
    write(model, data, tmp_path / "whole")
    tidy = latent_cache._tidy

    def stopped(cache):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(latent_cache, "_tidy", stopped)
        with pytest.raises(KeyboardInterrupt):
            write(model, data, tmp_path / "cache")
    assert (tmp_path / "cache" / latent_cache.PROGRESS).is_file() and not (tmp_path / "cache.partial").exists()
    monkeypatch.setattr(latent_cache, "_tidy", tidy)
    notes = []
    write(model, data, tmp_path / "cache", notes)
    assert notes == [f"{tmp_path / 'cache'} was whole, renamed when the writer was stopped: its progress record is removed"]
    assert snapshot(tmp_path / "cache") == snapshot(tmp_path / "whole")
    notes.clear()
    write(model, data, tmp_path / "cache", notes)  # run again once whole: the same job writes nothing (was: "already exists")
    assert notes == [f"{tmp_path / 'cache'} is already a whole latent cache of this job (10 samples): nothing is written"]
    assert snapshot(tmp_path / "cache") == snapshot(tmp_path / "whole")
