"""A latent cache of LAION size (650K samples, ~190 GB in float32) is mapped, not copied: read back with the values,
fingerprint and training batches of a whole-file read, written without holding every caption's embedding."""

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from latent_consistency.cli import main
from latent_consistency.data import latent_cache
from latent_consistency.data.holdout import Holdout
from latent_consistency.data.imagefolder import ImageFolderDataset
from latent_consistency.data.latent_cache import LatentCache, write_latent_cache
from latent_consistency.errors import UserError
from latent_consistency.models import load_diffusion_model
from latent_consistency.training.batches import TrainingBatches
from tiny_models import write_captioned_images

CAPTION = 'a "red" star\\ über 😀 number {i}'  # what JSON escapes, and characters of several UTF-8 bytes


@pytest.fixture(scope="module")
def cache(tiny_sd, tmp_path_factory):
    """The tiny teacher's cache of 10 captioned images in 3 shards (4, 4, 2), captions encoded 2 at a time."""
    images = write_captioned_images(tmp_path_factory.mktemp("images"), 10, caption=CAPTION)
    model = load_diffusion_model(str(tiny_sd))
    return write_latent_cache(ImageFolderDataset(images, 16), tmp_path_factory.mktemp("cache") / "latents", model.codec,
                              model.prompts, source={}, batch_size=2, shard_size=4, progress=False)


@pytest.fixture
def mapped(monkeypatch):
    """Every cache counts as large: read through the mapped path, micro-batch by micro-batch."""
    monkeypatch.setattr(latent_cache, "SMALL_CACHE_BYTES", 0)


def whole_file_read(path: Path, keep: list[int] | None = None) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """(latents, each sample's caption, text embeddings) as the cache was read before it was mapped: `load_file` of each
    file, the shards concatenated, the held-out split's samples `keep`."""
    manifest = json.loads((path / "manifest.json").read_text())
    shards = [load_file(str(path / s["file"])) for s in manifest["shards"]]
    latents, index = torch.cat([s["latents"] for s in shards]), torch.cat([s["caption_index"] for s in shards])
    table = load_file(str(path / "captions.safetensors"))
    offsets, text = table["caption_offsets"].tolist(), bytes(table["caption_bytes"].tolist())
    captions = [text[a:b].decode() for a, b in zip(offsets, offsets[1:])]
    keep = list(range(len(latents))) if keep is None else keep
    return latents[keep], [captions[int(c)] for c in index[keep]], table["text_embeddings"][index[keep]]


def fingerprint_as_before(latents: torch.Tensor, captions: list[str]) -> str:
    """`LatentCache.fingerprint` of the version that read whole files, which checkpoints of earlier runs hold."""
    digest = hashlib.sha256(json.dumps([list(latents.shape), captions]).encode())
    digest.update(latents.reshape(len(latents), -1)[:, :16].float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def mapping_of(tensor: torch.Tensor) -> str | None:
    """The file whose mapping holds `tensor`'s data (/proc/self/maps), or None for memory of the process's own."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)  # address range, permissions, offset, device, inode[, path]
        start, end = (int(a, 16) for a in fields[0].split("-"))
        if start <= tensor.data_ptr() < end:
            return fields[5].strip() if len(fields) == 6 else None
    return None


@pytest.mark.parametrize("part", [None, "train"])
def test_a_mapped_cache_reads_the_values_and_fingerprint_of_a_whole_file_read(cache, part, mapped):
    """Was: every shard read whole (`load_file`) and concatenated, two copies of the cache in memory in every training
    process. Now each file is mapped: the same samples, values and fingerprint (a run resumes on its cache), the latents
    and text embeddings in the files' pages."""
    holdout = Holdout(0.3, part) if part else None
    read = LatentCache(cache, holdout)
    keep = holdout.select([f"{i}.png" for i in range(10)], "samples") if holdout else None  # each sample's source file
    latents, captions, cond = whole_file_read(cache, keep)
    assert len(read) == len(latents) and [read[i]["caption"] for i in range(len(read))] == captions
    assert torch.equal(read.latents, latents) and torch.equal(read.text_embeddings[read.caption_index], cond)
    assert all(torch.equal(read[i]["latents"], latents[i]) for i in range(len(read)))
    assert read.fingerprint() == fingerprint_as_before(latents, captions)
    if sys.platform.startswith("linux"):
        files = [cache.resolve() / f"shard-0000{i}.safetensors" for i in range(3)] + [cache.resolve() / "captions.safetensors"]
        assert [mapping_of(t) for t in [*read.shards, read.text_embeddings]] == [str(f) for f in files]


def test_the_streamed_captions_file_is_the_bytes_save_file_writes(cache):
    """Was: every distinct caption's embedding held in one tensor until `save_file` (150 GB for LAION's captions in
    SD 1.5). Now they are written batch by batch under a header written first: the same file, byte for byte."""
    table = load_file(str(cache / "captions.safetensors"))
    assert len(table["text_embeddings"]) == 10  # in 5 batches of 2
    assert list(LatentCache(cache).captions) == [CAPTION.format(i=i) for i in range(10)]
    expected = cache.parent / "save_file.safetensors"
    save_file(table, str(expected))
    assert (cache / "captions.safetensors").read_bytes() == expected.read_bytes()


def test_micro_batches_of_the_mapped_path_are_those_of_the_device_path_bitwise(cache, tiny_sd, monkeypatch):
    model = load_diffusion_model(str(tiny_sd))
    on_device = TrainingBatches(str(cache), model, 16, micro_batch=3, seed=1)
    monkeypatch.setattr(latent_cache, "SMALL_CACHE_BYTES", 0)
    gathered = TrainingBatches(str(cache), model, 16, micro_batch=3, seed=1)
    assert on_device.dataset.small and not gathered.dataset.small
    for _ in range(8):  # past an epoch of 10 samples
        a, b = next(on_device), next(gathered)
        assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["cond"], b["cond"])


def test_a_run_and_its_resume_on_the_mapped_path_train_the_weights_of_the_device_path(cache, tiny_sd, tmp_path, monkeypatch):
    def distill(out, *extra):
        assert main(["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(cache), "--out", str(out), *extra]) == 0
        return load_file(str(out / "lcm" / "unet" / "diffusion_pytorch_model.safetensors"))

    on_device = distill(tmp_path / "device", "--steps", "4")
    monkeypatch.setattr(latent_cache, "SMALL_CACHE_BYTES", 0)
    distill(tmp_path / "mapped", "--steps", "2")
    resumed = distill(tmp_path / "mapped", "--steps", "4", "--resume")
    assert on_device.keys() == resumed.keys() and all(torch.equal(on_device[k], resumed[k]) for k in on_device)


def test_a_non_finite_value_of_a_mapped_cache_stops_the_run_at_its_micro_batch(cache, tiny_sd, tmp_path, run_error, mapped):
    """A large cache is not read whole at every start to look for NaN (a float16 VAE's overflow in a cache written by
    hand or by an earlier version): the micro-batch that draws it stops the run in one line, naming the cache."""
    broken = tmp_path / "cache"
    broken.mkdir()
    for file in cache.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    shard = load_file(str(broken / "shard-00001.safetensors"))
    shard["latents"][2, 0, 0, 0] = float("nan")
    save_file(shard, str(broken / "shard-00001.safetensors"))
    read = LatentCache(broken)
    assert not read.small and torch.equal(read.gather(torch.tensor([0, 5, 9]))[0], read.latents[[0, 5, 9]])
    with pytest.raises(UserError, match=f"latent cache {broken} is damaged: its latents hold NaN or infinite values"):
        read.gather(torch.tensor([1, 6]))  # sample 6: the second shard's third
    code, err = run_error(["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(broken),
                           "--out", str(tmp_path / "run"), "--batch-size", "10", "--steps", "1"])
    assert code == 2 and len(err.splitlines()) == 1 and "damaged: its latents hold NaN or infinite values" in err, err


def test_reading_a_cache_copies_none_of_it(tmp_path):
    """Was: two copies in memory of every byte of the cache (`load_file`, then `torch.cat`), in every process. Now the
    pages are the files' own (RssFile, shared through the page cache), even as a small cache is scanned whole for NaN."""
    status = Path("/proc/self/status")
    if not status.is_file():
        pytest.skip("no /proc/self/status")

    def anonymous() -> int:  # bytes of the process's own memory in RAM, the file mappings' not counted
        return 1024 * int(next(line for line in status.read_text().splitlines() if line.startswith("RssAnon:")).split()[1])

    latents = torch.randn(3000, 4, 32, 32)  # 48 MiB: 3000 samples of SD's 256 px latents
    save_file({"latents": latents, "caption_index": torch.arange(3000) % 7}, str(tmp_path / "shard-00000.safetensors"))
    save_file({"text_embeddings": torch.randn(7, 16, 32), "uncond_embedding": torch.zeros(16, 32)}, str(tmp_path / "captions.safetensors"),
              metadata={"captions": json.dumps([f"caption {i}" for i in range(7)])})
    manifest = {"format": "latent-cache/1", "num_samples": 3000, "shards": [{"file": "shard-00000.safetensors", "num_samples": 3000}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    del latents
    before = anonymous()
    read = LatentCache(tmp_path)
    grown = anonymous() - before
    assert grown < 12 << 20, f"reading a 48 MiB cache took {grown >> 20} MiB of the process's own memory"
    assert read.small  # so scanned whole for NaN and infinity: every page read


def _cut_short(shard: Path) -> None:
    shard.write_bytes(shard.read_bytes()[:-4])


def _float16_latents(shard: Path) -> None:
    tensors = load_file(str(shard))
    save_file(tensors | {"latents": tensors["latents"].half()}, str(shard))


def _unaligned(shard: Path) -> None:
    """The shard as a writer that does not pad its header to 8 bytes would write it: values at odd offsets, read by copy."""
    data = shard.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + length].rstrip(b" ")
    header += b" " * ((8 + len(header)) % 4 == 0)
    shard.write_bytes(len(header).to_bytes(8, "little") + header + data[8 + length :])


@pytest.mark.parametrize("damage, message", [
    (_cut_short, "tensor does not fit in the file where its header places it"),  # the last one's: a shard's source keys
    (_float16_latents, "holds latents as F16 of shape [4, 4, 8, 8], where a latent cache has F32 of 4 dimensions"),
    (_unaligned, None),
], ids=["cut-short", "float16", "unaligned"])
def test_a_shard_file_is_checked_against_its_header(damage, message, cache, tmp_path):
    """Mapped, a file's header is the only account of its data: a shard cut short by a copy, or of another dtype than the
    cache format's, is one line; a file written by another safetensors writer without alignment is read as it holds."""
    broken = tmp_path / "cache"
    broken.mkdir()
    for file in cache.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    damage(broken / "shard-00000.safetensors")
    if message is None:
        assert torch.equal(LatentCache(broken).latents, LatentCache(cache).latents)
        return
    with pytest.raises(UserError) as raised:
        LatentCache(broken)
    assert message in str(raised.value) and "rebuild the cache" in str(raised.value) and "\n" not in str(raised.value)
