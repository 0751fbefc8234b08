"""Data at the paper's scale read by every process of a run.

The latent cache's caption strings in the captions file's body (format latent-cache/2), not its header's JSON: a header
that safetensors refuses past 100 MB (about 12M captions, LAION-Aesthetics' size) and that every training process parsed
whole into strings. A cache of the earlier layout (latent-cache/1) still reads, with the same samples, batches and
fingerprint (what a resumed run's checkpoint and `lcm distill --resume` compare). A cache's fingerprint and held-out
split computed a slice of the samples at a time; `--method ode`'s bank mapped by each process instead of read whole into
its own memory; and `lcm cache`'s progress in a log, where a cache of that size is written."""

import json
import shutil
import sys
import tracemalloc

import pytest
import torch
from safetensors.torch import load_file, save_file

from latent_consistency import progress
from latent_consistency.data import latent_cache
from latent_consistency.data.holdout import Holdout
from latent_consistency.data.latent_cache import LatentCache, write_latent_cache
from latent_consistency.errors import UserError
from latent_consistency.models import load_diffusion_model
from latent_consistency.training.batches import TrainingBatches
from latent_consistency.training.ode_targets import FILE, ODETargets
from test_latent_cache_scale import fingerprint_as_before, mapping_of
from test_ode_targets import gaussian_bank
from tiny_models import write_captioned_images

# what JSON and UTF-8 treat apart (quotes, a backslash, characters of 2, 3 and 4 bytes) and a long one; sample 4 repeats
# sample 0's caption (stored once)
CAPTIONS = ['a "red" star\\ über', "😀 a blue one", "a 中文 caption", "x" * 300, 'a "red" star\\ über', "a green one"]


@pytest.fixture(scope="module")
def cache(tiny_sd, tmp_path_factory):
    """The tiny teacher's cache of CAPTIONS' 6 samples in 2 shards, written by this version."""
    images = torch.rand(len(CAPTIONS), 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    model = load_diffusion_model(str(tiny_sd))
    return write_latent_cache([{"image": x, "caption": c} for x, c in zip(images, CAPTIONS)], tmp_path_factory.mktemp("cache") / "latents",
                              model.codec, model.prompts, source={}, batch_size=2, shard_size=4, progress=False)


def header_of(file) -> dict:
    data = file.read_bytes()
    return json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])


def in_earlier_layout(cache, out):
    """`cache` as the version before wrote it (latent-cache/1): the same shards; the caption strings as JSON in the captions
    file's metadata, which is byte for byte what that version streamed (its test compared the two files)."""
    out.mkdir()
    for shard in cache.glob("shard-*.safetensors"):
        shutil.copy(shard, out / shard.name)
    table = load_file(str(cache / "captions.safetensors"))
    save_file({k: table[k] for k in ("text_embeddings", "uncond_embedding")}, str(out / "captions.safetensors"),
              metadata={"captions": json.dumps(list(LatentCache(cache).captions))})
    manifest = json.loads((cache / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(manifest | {"format": "latent-cache/1"}))
    return out


def test_the_caption_strings_are_in_the_files_body_and_each_reads_back_as_itself(cache):
    """Was: the captions' JSON in the header's metadata (past 100 MB `load_file` refuses the file, and every process parsed
    it whole). Now the header names tensors only, the file is a plain safetensors file, and each caption is decoded from
    its bytes when asked for."""
    header = header_of(cache / "captions.safetensors")
    assert "__metadata__" not in header and len(json.dumps(header)) < 600
    table = load_file(str(cache / "captions.safetensors"))
    distinct = list(dict.fromkeys(CAPTIONS))
    offsets = table["caption_offsets"].tolist()
    assert [bytes(table["caption_bytes"][a:b].tolist()).decode() for a, b in zip(offsets, offsets[1:])] == distinct
    read = LatentCache(cache)
    assert [read[i]["caption"] for i in range(len(read))] == CAPTIONS and read.caption_index.tolist() == [0, 1, 2, 3, 0, 4]
    assert list(read.captions) == distinct and read.captions[-1] == distinct[-1] and read.captions[1:3] == distinct[1:3]
    with pytest.raises(IndexError):
        read.captions[len(distinct)]


@pytest.mark.parametrize("small", [True, False], ids=["on-device", "mapped"])
def test_a_cache_of_the_earlier_layout_reads_the_same_samples_batches_and_fingerprint(cache, tiny_sd, tmp_path, monkeypatch, small):
    if not small:
        monkeypatch.setattr(latent_cache, "SMALL_CACHE_BYTES", 0)
    earlier = in_earlier_layout(cache, tmp_path / "earlier")
    old, new = LatentCache(earlier), LatentCache(cache)
    assert [old[i]["caption"] for i in range(len(old))] == CAPTIONS and list(old.captions) == list(new.captions)
    assert old.fingerprint() == new.fingerprint() == fingerprint_as_before(new.latents, CAPTIONS)
    model = load_diffusion_model(str(tiny_sd))
    batches = [TrainingBatches(str(c), model, 16, micro_batch=4, seed=1) for c in (earlier, cache)]
    assert batches[0].first_captions(6) == batches[1].first_captions(6) == CAPTIONS
    for _ in range(3):  # past an epoch of 6 samples
        a, b = next(batches[0]), next(batches[1])
        assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["cond"], b["cond"])


def test_a_run_on_a_cache_of_the_earlier_layout_resumes_on_the_same_cache_rewritten_now(cache, tiny_sd, tmp_path, run_error):
    """A run started before the upgrade, its cache rebuilt by this version at the same place: the checkpoint's data
    fingerprint is the rebuilt cache's, so the run resumes instead of being told its data changed."""
    data, out = in_earlier_layout(cache, tmp_path / "data"), tmp_path / "run"
    args = ["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(data), "--out", str(out), "--checkpoint-every", "1",
            "--omega-response-samples", "0"]
    code, err = run_error([*args, "--steps", "1"])
    assert code == 0, err
    shutil.rmtree(data)
    shutil.copytree(cache, data)
    code, err = run_error([*args, "--steps", "2", "--resume"])
    assert code == 0, err


def _offsets_past_the_bytes(table):
    table["caption_offsets"][-1] += 1


def _not_utf8(table):
    table["caption_bytes"][0] = 0xFF


def _no_caption_bytes(table):
    del table["caption_bytes"]


@pytest.mark.parametrize("damage, message, when", [
    (_offsets_past_the_bytes, "its caption_offsets do not span its caption_bytes", "open"),
    (_not_utf8, "its caption_bytes are not UTF-8 text where its caption_offsets place them", "read"),
    (_no_caption_bytes, "has no caption_bytes", "open"),
], ids=["offsets", "utf8", "missing"])
def test_a_damaged_caption_table_is_one_line(cache, tmp_path, damage, message, when):
    broken = tmp_path / "cache"
    shutil.copytree(cache, broken)
    table = load_file(str(broken / "captions.safetensors"))
    damage(table)
    save_file(table, str(broken / "captions.safetensors"))
    with pytest.raises(UserError) as raised:
        LatentCache(broken).fingerprint() if when == "read" else LatentCache(broken)
    assert message in str(raised.value) and "rebuild the cache" in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_a_resumed_runs_ode_bank_is_mapped_not_copied_into_each_process(tmp_path):
    """Was: `torch.load` of the whole bank into every process's own memory (0.9 GB at Stable Diffusion scale, 2.8 GB at
    SDXL's, per process; for the whole run on a CPU). Now its tensors are views of the file's pages, with the same values."""
    bank = gaussian_bank(rows=10)
    bank.save(tmp_path / FILE)
    loaded = ODETargets.load(tmp_path / FILE)
    assert all(torch.equal(getattr(bank, k), getattr(loaded, k)) for k in ("z", "t", "cond", "omega", "solution"))
    assert {mapping_of(getattr(loaded, k)) for k in ("z", "cond", "solution")} == {str((tmp_path / FILE).resolve())}


MANY = 200_000  # samples of 4x2x2 latents: their Python objects in MiB tell a copy of all of them from a slice


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> tuple:
    """(a cache of MANY samples in the earlier layout, which both versions read; its latents; its 100 captions)."""
    path = tmp_path_factory.mktemp("many")
    latents = torch.randn(MANY, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    captions = [f"caption {i}" for i in range(100)]
    save_file({"latents": latents, "caption_index": torch.arange(MANY) % 100}, str(path / "shard-00000.safetensors"))
    save_file({"text_embeddings": torch.zeros(100, 2, 4), "uncond_embedding": torch.zeros(2, 4)}, str(path / "captions.safetensors"),
              metadata={"captions": json.dumps(captions)})
    manifest = {"format": "latent-cache/1", "num_samples": MANY, "shards": [{"file": "shard-00000.safetensors", "num_samples": MANY}]}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path, latents, captions


def peak_python_memory(work):
    """(`work()`, the most memory its Python objects held at once: tracemalloc's peak, which torch's buffers are not in)."""
    tracemalloc.start()
    try:
        return work(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_fingerprint_of_many_samples_holds_a_slice_of_them_at_a_time(many):
    """Every process computes its data's fingerprint. Was: the whole caption index as Python ints and the first 16 values
    of every sample copied three times (1.5 GB a process at 12M samples). Now they go to the digest 16,384 samples at a
    time: the same digest."""
    path, latents, captions = many
    read = LatentCache(path)
    fingerprint, peak = peak_python_memory(read.fingerprint)
    assert fingerprint == fingerprint_as_before(latents, [captions[i % 100] for i in range(MANY)])
    assert peak < 6 << 20, f"the fingerprint of {MANY} samples held {peak >> 20} MiB of Python objects at once"  # was 12 MiB, now 2


def test_a_held_out_split_of_many_samples_names_them_one_at_a_time(many):
    """Every process opens the cache. Was: the name of every sample (its index as text) in one list to hash, 800 MB at
    12M samples. Now each is made as the split asks for it: the same samples on each side."""
    path, _, _ = many
    read, peak = peak_python_memory(lambda: LatentCache(path, Holdout(0.1, "eval")))
    assert read.rows.tolist() == [i for i in range(MANY) if Holdout(0.1, "eval").keeps(str(i))]
    assert peak < 6 << 20, f"holding out samples of {MANY} held {peak >> 20} MiB of Python objects at once"


def test_lcm_cache_into_a_log_writes_the_progress_of_each_phase(tiny_sd, tmp_path, run_error, monkeypatch):
    """Was: progress only where stderr is a terminal, so a cache of LAION's size written under nohup or SLURM showed nothing
    for hours. Now a log gets whole lines (every LCM_PROGRESS_INTERVAL seconds, here none before the end) for the images
    and for the captions' embeddings, as every command's."""
    monkeypatch.setenv(progress.INTERVAL_VARIABLE, "inf")
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setattr(progress, "monotonic", lambda: 0.0)  # no time passes: the lines are known
    images = write_captioned_images(tmp_path / "images", 3)
    code, err = run_error(["cache", "--model", str(tiny_sd), "--data", str(images), "--out", str(tmp_path / "cache")])
    progress_lines = [line for line in err.splitlines() if not line.startswith("lcm cache: note:")]  # the tiny encoder cuts captions
    assert code == 0 and progress_lines == ["latent cache: 3/3 (100 %), done in 0.0 s", "latent cache captions: 3/3 (100 %), done in 0.0 s"], err
