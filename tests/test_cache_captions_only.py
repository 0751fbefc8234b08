"""`lcm cache --captions-only`: a latent cache of the latents and the caption strings, without the text embeddings that
make ~80 % of a full cache where every caption is distinct (LAION). A run encodes each micro-batch's captions with its own
model, as it does an image folder's, and draws the batches a full cache of the same data gives; the cache records the
VAE's digest alone, so a model with the same VAE and another text encoder trains on it. A stopped `lcm cache` resumes a
partial of its own kind only."""

import json
import re
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save

from command_helpers import run
from latent_consistency.data import latent_cache
from latent_consistency.data.holdout import Holdout
from latent_consistency.data.imagefolder import ImageFolderDataset
from latent_consistency.data.latent_cache import LatentCache
from latent_consistency.models import load_diffusion_model
from latent_consistency.training.batches import TrainingBatches
from test_cache_resume import images, killed, snapshot, write
from tiny_models import save_tiny_sd, write_captioned_images

AGAIN = "it was written with another choice of --captions-only (caption strings, or their text embeddings)"


@pytest.fixture(scope="module")
def sd(tiny_sd):
    return load_diffusion_model(str(tiny_sd))


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl):
    return load_diffusion_model(str(tiny_sdxl))


@pytest.fixture(scope="module")
def other_sd(tmp_path_factory):
    """A tiny SD of the same shapes as `tiny_sd`, every part other weights (another seed)."""
    return save_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd-1", seed=1)


def both_caches(model, folder):
    """(the full cache, the captions-only cache) that `model` writes of the same 10 images, whose captions repeat, in
    shards of 4."""
    data = images(folder / "images")
    write(model, data, folder / "full")
    write(model, data, folder / "captions", captions_only=True)
    return folder / "full", folder / "captions"




def test_a_captions_only_cache_holds_the_full_caches_latents_and_captions_and_no_text_embeddings(sd, tmp_path):
    """Written with no prompt encoder at all (none is run): the same shard files as the full cache, byte for byte, a captions
    file of the caption strings alone (as safetensors' save_file writes them), and a manifest that says so and records the
    VAE's digest alone. Read back, the same samples, captions and fingerprint, no text embeddings."""
    data = images(tmp_path / "images")
    full = tmp_path / "full"
    write(sd, data, full)
    captions = latent_cache.write_latent_cache(ImageFolderDataset(data, 16), tmp_path / "captions", sd.codec, None, {"data": str(data)},
                                               batch_size=2, shard_size=4, progress=False, captions_only=True)
    shards = {name: data for name, data in snapshot(full).items() if name.startswith("shard-")}
    assert len(shards) == 3 and {name: data for name, data in snapshot(captions).items() if name.startswith("shard-")} == shards
    table = load_file(str(full / latent_cache.CAPTIONS))
    strings = {key: table[key] for key in ("caption_bytes", "caption_offsets")}
    assert (captions / latent_cache.CAPTIONS).read_bytes() == save(strings)
    manifest, full_manifest = (json.loads((path / latent_cache.MANIFEST).read_text()) for path in (captions, full))
    assert manifest[latent_cache.CAPTIONS_ONLY] is True and latent_cache.CAPTIONS_ONLY not in full_manifest
    assert manifest[latent_cache.ENCODERS] == {"vae": full_manifest[latent_cache.ENCODERS]["vae"]}
    assert manifest["num_captions"] == full_manifest["num_captions"] == 6 and "max_length" not in manifest
    read, read_full = LatentCache(captions), LatentCache(full)
    assert read.captions_only and read.text_embeddings is None and read.uncond_embedding is None
    assert list(read.captions) == list(read_full.captions) and torch.equal(read.caption_index, read_full.caption_index)
    assert torch.equal(read.latents, read_full.latents) and read.fingerprint() == read_full.fingerprint()
    assert set(read[4]) == {"latents", "caption"} and read[4]["caption"] == read_full[4]["caption"] == "a moon"


@pytest.mark.parametrize("large", [False, True], ids=["on the device", "mapped"])
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_a_run_draws_the_full_caches_batches_from_a_captions_only_cache(request, tmp_path, monkeypatch, kind, large):
    """Each micro-batch: the same latents, bit for bit, and its captions encoded by the run's model, equal to the full
    cache's stored embeddings (SDXL's with the images' size as micro-conditioning); ∅ likewise. A small cache moved whole
    to the device or a large one mapped, the same; the same fingerprint, a resumed position and a held-out split too."""
    model = request.getfixturevalue(kind)
    full, captions = both_caches(model, tmp_path)
    if large:
        monkeypatch.setattr(latent_cache, "SMALL_CACHE_BYTES", 0)
    a, b = (TrainingBatches(str(path), model, 16, 4, seed=3) for path in (full, captions))
    assert b.dataset.small is not large and b.cache_note is None and b.fingerprint() == a.fingerprint()
    torch.testing.assert_close(b.uncond, a.uncond, rtol=1e-5, atol=1e-5)
    for _ in range(3):  # 12 draws of 10 samples: into the sampler's second epoch
        x, y = next(a), next(b)
        assert torch.equal(y["latents"], x["latents"])
        torch.testing.assert_close(y["cond"], x["cond"], rtol=1e-5, atol=1e-5)
    state, after = b.state_dict(), next(b)
    resumed = TrainingBatches(str(captions), model, 16, 4, seed=3)
    resumed.load_state_dict(state)
    again = next(resumed)
    assert torch.equal(again["latents"], after["latents"]) and torch.equal(again["cond"], after["cond"])
    held = [TrainingBatches(str(path), model, 16, 4, seed=3, holdout=Holdout(0.3, "eval")) for path in (full, captions)]
    x, y = next(held[0]), next(held[1])
    assert len(held[1].dataset) == len(held[0].dataset) < 10 and torch.equal(y["latents"], x["latents"])
    torch.testing.assert_close(y["cond"], x["cond"], rtol=1e-5, atol=1e-5)


def test_a_run_on_a_captions_only_cache_digests_the_vae_alone(tiny_sd, tmp_path):
    """Before mixed precision casts the frozen parts, a run takes the digests its cache checks: of a captions-only cache,
    the VAE's alone (T5-XXL's digest is 13 s, for nothing)."""
    _, captions = both_caches(load_diffusion_model(str(tiny_sd)), tmp_path)
    model = load_diffusion_model(str(tiny_sd))
    latent_cache.digest_encoders_before_cast(model, (str(captions), ""))
    assert model.vae in latent_cache._RUN_DIGESTS and model.text_encoder not in latent_cache._RUN_DIGESTS


def test_lcm_cache_captions_only_trains_a_model_with_the_same_vae_and_another_text_encoder(tiny_sd, other_sd, tmp_path, capsys,
                                                                                           monkeypatch):
    """`lcm cache --captions-only` runs no text encoder and says the cache's size; a full cache's line says what its text
    embeddings take. A teacher with the same VAE and another text encoder distills on the captions-only cache (the text is
    its own encoding); one with another VAE is refused in one line, saying to write a captions-only cache with it."""
    data = write_captioned_images(tmp_path / "images", 5)
    command = ["cache", "--model", str(tiny_sd), "--data", str(data), "--batch-size", "2"]
    with monkeypatch.context() as patch:
        def no_text_encoder(*args, **kwargs):
            raise AssertionError("the text encoder ran")

        patch.setattr(transformers.CLIPTextModel, "forward", no_text_encoder)
        code, out, err = run([*command, "--out", str(tmp_path / "captions"), "--captions-only"], capsys)
    assert code == 0, err
    kib = r"\d+\.\d KiB"
    assert re.fullmatch(rf"wrote a latent cache of 5 samples at 16 px \({kib}, captions only: each run encodes them\) to "
                        rf"{re.escape(str(tmp_path / 'captions'))}; train on it with --data .*", out.splitlines()[-1]), out
    code, out, err = run([*command, "--out", str(tmp_path / "full cache")], capsys)
    assert code == 0 and re.search(rf"\({kib}; its text embeddings are {kib}, which --captions-only would leave out\)", out), out
    assert out.rstrip().endswith(f"train on it with --data '{tmp_path / 'full cache'}'"), out  # was: unquoted, broken by its space
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_sd, teacher)
    shutil.rmtree(teacher / "text_encoder")
    shutil.copytree(other_sd / "text_encoder", teacher / "text_encoder")
    distill = ["distill", "--preset", "tiny", "--teacher", str(teacher), "--data", str(tmp_path / "captions"), "--steps", "1"]
    code, out, err = run([*distill, "--out", str(tmp_path / "run")], capsys)
    assert code == 0 and (tmp_path / "run" / "lcm" / "model_index.json").is_file(), err
    shutil.rmtree(teacher / "vae")
    shutil.copytree(other_sd / "vae", teacher / "vae")
    code, out, err = run([*distill, "--out", str(tmp_path / "refused")], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "was written with another VAE than" in err, err
    assert err.endswith(f"lcm cache --model {teacher} --data IMAGES --out CACHE --captions-only"), err


RESUMES = {  # (the partial's kind, the rerun's): the rerun's note; None: an earlier version's record, which wrote full caches
    "full, then captions-only": (False, True, f"note: {{partial}} is started again: {AGAIN}"),
    "captions-only, then full": (True, False, f"note: {{partial}} is started again: {AGAIN}"),
    "captions-only, then captions-only": (True, True, "resuming {partial} at sample 8 of 10 (2 shards written)"),
    "an earlier version's, then full": (None, False, "resuming {partial} at sample 8 of 10 (2 shards written)"),
    "an earlier version's, then captions-only": (None, True, f"note: {{partial}} is started again: {AGAIN}"),
}


@pytest.mark.parametrize("case", list(RESUMES))
def test_a_stopped_cache_resumes_a_partial_of_its_own_kind_only(sd, tmp_path, monkeypatch, encoded, case):
    """A rerun of a stopped `lcm cache` goes on from the last whole shard of a partial of the same kind, and starts one of
    the other kind again, saying why: either way the cache an uninterrupted run writes. A record written before
    --captions-only (no such part in its job) is a full cache's."""
    first, then, note = RESUMES[case]
    data = images(tmp_path / "images")
    write(sd, data, tmp_path / "whole", captions_only=then)
    partial = killed(sd, data, tmp_path / "cache", monkeypatch, captions_only=bool(first))
    if first is None:
        record = json.loads((partial / latent_cache.PROGRESS).read_text())
        del record["job"][latent_cache.CAPTIONS_ONLY]
        (partial / latent_cache.PROGRESS).write_text(json.dumps(record))
    encoded[0], notes = 0, []
    write(sd, data, tmp_path / "cache", notes, captions_only=then)
    assert notes == [note.format(partial=partial)] and encoded[0] == (2 if note.startswith("resuming") else 10)
    assert snapshot(tmp_path / "cache") == snapshot(tmp_path / "whole")


@pytest.mark.parametrize("data", ["", "  "])
def test_lcm_cache_of_no_data_is_one_line_before_the_model_loads(tiny_sd, tmp_path, capsys, monkeypatch, data):
    """Was: --data "" named the current folder, scanned as the data (here a folder of captioned images, cached without a
    word), and only after the model loaded. Now one line, before the model loads; nothing written."""
    write_captioned_images(tmp_path, 3)
    monkeypatch.chdir(tmp_path)

    def no_loading(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr("latent_consistency.models.load_diffusion_model", no_loading)
    code, out, err = run(["cache", "--model", str(tiny_sd), "--data", data, "--out", "cache"], capsys)
    assert code == 2 and err == f"lcm cache: error: --data {data!r} names no data; give captioned images: an image folder, " \
        "webdataset .tar shards or a registered dataset such as world:shapes", err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "cache.partial").exists()


def test_lcm_cache_under_a_launcher_is_one_line(tiny_sd, tmp_path, capsys, monkeypatch):
    """Was: under `accelerate launch` every process encoded the data into one OUT.partial, and all but one ended in a
    FileNotFoundError traceback."""
    write_captioned_images(tmp_path / "data", 3)
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, out, err = run(["cache", "--model", str(tiny_sd), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "cache")], capsys)
    assert code == 2 and err.startswith("lcm cache: error: lcm cache runs in one process: run it without accelerate launch"), err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "cache.partial").exists()


def test_lcm_cache_help_says_what_captions_only_saves(capsys):
    code, out, _ = run(["cache", "--help"], capsys)
    text = " ".join(out.split())
    assert code == 0 and "--captions-only store the caption strings instead of their text embeddings" in text
    assert "a distinct caption's text embedding 231 KiB" in text and "the cache is a fifth of the size" in text
    assert "The summary line gives the cache's size" in text
