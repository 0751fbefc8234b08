"""The review of `lcm finetune` (LCF, Algorithm 4): a latent cache's held-out split holds out whole images, the ones its
data's own split holds out; the validation grid's start row is the starting LCM as it samples, at the run's resolution;
a cache of the training data is no held-out data; the held-out cache's size message; shard conversions counted per
sample; the model card's k and size and a loaded LCM-LoRA's rank; --resume of a run that wrote nothing yet."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from latent_consistency.cli import main
from latent_consistency.data.holdout import Holdout
from latent_consistency.data.imagefolder import ImageFolderDataset
from latent_consistency.data.latent_cache import MANIFEST, LatentCache
from latent_consistency.data.shards import ShardStream
from latent_consistency.models import inference_timesteps
from tiny_models import save_tiny_lora, write_captioned_images

FRACTION = 0.3


def finetune_args(model, data, out, *extra):
    return ["finetune", "--preset", "tiny", "--model", str(model), "--data", str(data), "--out", str(out), *extra]


def _coco(folder, pictures: int = 12, lines: int = 3):
    """An image folder in COCO's layout: `pictures` images of `lines` captions each, a metadata line per caption
    ("picture NN caption j")."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(folder / "metadata.jsonl", "w") as f:
        for n in range(pictures):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"im{n:02d}.png")
            for j in range(lines):
                f.write(json.dumps({"file_name": f"im{n:02d}.png", "text": f"picture {n:02d} caption {j}"}) + "\n")
    return folder


def _pictures(captions) -> set[str]:
    return {caption.split()[1] for caption in captions}


def _cache_pictures(cache, part: str) -> set[str]:
    side = LatentCache(cache, Holdout(FRACTION, part))
    return _pictures(side.captions_of(torch.arange(len(side))))


@pytest.fixture(scope="module")
def coco(tmp_path_factory, tiny_lcm):
    """A COCO-layout folder and its latent cache (`lcm cache`)."""
    folder = _coco(tmp_path_factory.mktemp("coco") / "images")
    cache = folder.parent / "cache"
    assert main(["cache", "--model", str(tiny_lcm), "--data", str(folder), "--out", str(cache)]) == 0
    return folder, cache


def test_a_caches_held_out_split_holds_out_the_images_its_folder_holds_out(coco):
    """was: the cache was split by sample index, so each held-out picture was trained on through its other captions, and
    other pictures than the folder's split were held out."""
    folder, cache = coco
    held, trained = _cache_pictures(cache, "eval"), _cache_pictures(cache, "train")
    assert held and not held & trained
    assert held == _pictures(ImageFolderDataset(folder, 16, Holdout(FRACTION, "eval")).samples.captions)
    assert trained == _pictures(ImageFolderDataset(folder, 16, Holdout(FRACTION, "train")).samples.captions)


def test_a_cache_of_shards_holds_out_the_shards_the_shards_hold_out(tmp_path, tiny_lcm):
    """Each sample of a cache of webdataset shards is keyed by its .tar shard's name, which the shards' own split hashes."""
    from latent_consistency.data.spec import open_dataset

    for s in range(6):
        _tar(tmp_path / f"{s:05d}.tar", {f"s{s}k{k}": (_png("RGB"), f"shard {s} sample {k}") for k in range(2)})
    cache = tmp_path / "cache"
    pattern = str(tmp_path / "{00000..00005}.tar")
    assert main(["cache", "--model", str(tiny_lcm), "--data", pattern, "--out", str(cache)]) == 0
    for part in ("eval", "train"):
        side = LatentCache(cache, Holdout(0.5, part))
        shards = {os.path.basename(s) for s in open_dataset(pattern, 16, holdout=Holdout(0.5, part)).shards}
        assert {c.split()[1] for c in side.captions_of(torch.arange(len(side)))} == {str(int(s[:5])) for s in shards}


def test_a_cache_written_before_the_keys_is_split_by_sample_with_a_note(coco, tmp_path, tiny_lcm, capsys):
    """An earlier version's cache (no source keys in its manifest) is still read, split by sample index as before, and a
    run on it says so in one line."""
    import shutil

    _, cache = coco
    old = shutil.copytree(cache, tmp_path / "old")
    manifest = json.loads((old / MANIFEST).read_text())
    del manifest["source_keys"]
    (old / MANIFEST).write_text(json.dumps(manifest))
    held = LatentCache(old, Holdout(FRACTION, "eval"))
    assert held.rows.tolist() == [i for i in range(manifest["num_samples"]) if Holdout(FRACTION, "eval").keeps(str(i))]
    assert "held-out split is by sample" in held.holdout_note
    capsys.readouterr()
    assert main(finetune_args(tiny_lcm, old, tmp_path / "run", "--steps", "1", "--eval-fraction", str(FRACTION))) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "held-out split is by sample" in line]
    assert len(notes) == 1 and notes[0].startswith("lcm finetune: note: "), notes


def test_the_start_row_samples_the_starting_lcm_on_its_own_grid(tiny_lcm, tmp_path, monkeypatch):
    """With --skip 100 the student samples on T/k = 10 points; the start row is the starting LCM on its own 50 (was: on the
    student's, not the image `lcm generate --model START --steps 4` makes)."""
    from latent_consistency.training import run_folder

    grids, sample_lcm = [], run_folder.sample_lcm
    monkeypatch.setattr(run_folder, "sample_lcm", lambda f, z, ts, *a: grids.append(ts.tolist()) or sample_lcm(f, z, ts, *a))
    data = write_captioned_images(tmp_path / "images", 4)
    assert main(finetune_args(tiny_lcm, data, tmp_path / "run", "--steps", "1", "--skip", "100")) == 0
    own = json.loads((tiny_lcm / "scheduler" / "scheduler_config.json").read_text())
    assert grids[0] == inference_timesteps(own, 4).tolist() == [999, 759, 499, 259]
    assert grids[-1] == [999, 799, 499, 299]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_captioned_images(tmp_path_factory.mktemp("data") / "images", 8)


@pytest.mark.parametrize("which", ["eval data is the cache", "data is the cache"])
def test_a_cache_of_the_training_data_is_no_held_out_data(which, images, tiny_lcm, tmp_path, run_error):
    """was: exit 0, the cache's eval_loss logged as held out."""
    cache = tmp_path / "cache"
    assert main(["cache", "--model", str(tiny_lcm), "--data", str(images), "--out", str(cache)]) == 0
    data, held = (images, cache) if which == "eval data is the cache" else (cache, images)
    code, err = run_error(finetune_args(tiny_lcm, data, tmp_path / "run", "--eval-data", str(held)))
    assert code == 2 and len(err.splitlines()) == 1 and f"is a latent cache of {images}" in err and "not be held out" in err, err


def test_a_cache_records_its_data_resolved_and_an_older_relative_record_is_read_as_it_is(images, tiny_lcm, tmp_path, monkeypatch,
                                                                                         run_error):
    monkeypatch.chdir(images.parent)
    assert main(["cache", "--model", str(tiny_lcm), "--data", images.name, "--out", str(tmp_path / "cache")]) == 0
    assert json.loads((tmp_path / "cache" / MANIFEST).read_text())["source"]["data"] == str(images.resolve())
    manifest = json.loads((tmp_path / "cache" / MANIFEST).read_text())
    manifest["source"]["data"] = images.name  # as lcm cache recorded it before: as typed, relative
    (tmp_path / "cache" / MANIFEST).write_text(json.dumps(manifest))
    code, err = run_error(finetune_args(tiny_lcm, images, tmp_path / "run", "--eval-data", str(tmp_path / "cache")))
    assert code == 2 and f"is a latent cache of {images.name}," in err, err


def test_a_held_out_cache_of_another_size_says_it_must_be_at_the_training_datas_size(images, tiny_lcm, tmp_path, run_error):
    """was: the training data's message and advice (--resolution 32), which the 16 px --data then refused."""
    cache = tmp_path / "cache32"
    assert main(["cache", "--model", str(tiny_lcm), "--data", str(images), "--out", str(cache), "--resolution", "32"]) == 0
    other = write_captioned_images(tmp_path / "other", 4)
    code, err = run_error(finetune_args(tiny_lcm, other, tmp_path / "run", "--eval-data", str(cache)))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"latent cache {cache} (--eval-data) holds the latents of 32 px images, and the run trains at 16 px" in err
    assert "held-out data must be at the training data's size" in err and "lcm cache --resolution 16" in err


def _png(mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (16, 16), (200, 10, 10, 128) if mode == "RGBA" else 100).save(buffer, "PNG")
    return buffer.getvalue()


def _tar(path, samples: dict[str, tuple[bytes, str]]) -> str:
    with tarfile.open(path, "w") as tar:
        for key, (image, caption) in samples.items():
            for name, data in ((f"{key}.png", image), (f"{key}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_a_shard_samples_conversion_counts_once_however_often_it_is_drawn(tmp_path):
    """As an image folder counts a file once: was alpha=N per read, 179 for 27 RGBA images over a run."""
    shard = _tar(tmp_path / "00000.tar", {"a": (_png("RGBA"), "a"), "b": (_png("RGBA"), "b"), "c": (_png("RGB"), "c")})
    stream = ShardStream([shard], 16, seed=0, shuffle_buffer=1, decode_threads=1)
    drawn = iter(stream)
    for _ in range(12):  # four passes
        next(drawn)
    assert stream.skipped.counts["converted_alpha"] == 2
    once = ShardStream([shard], 16)
    list(once.samples_once()), list(once.samples_once())
    assert once.skipped.counts["converted_alpha"] == 2


def test_a_run_at_another_resolution_draws_its_grid_and_card_at_it(images, tiny_lcm, tmp_path, monkeypatch, capsys):
    """At --resolution 32 on a 16 px model: the grid samples 32 px images (16 x 16 latents; was 8 x 8), the card says the
    size and samples at it, the export notes it; the exported UNet keeps its sample_size (`off_native_size_note`)."""
    from latent_consistency.training import run_folder

    sizes, sample_lcm = [], run_folder.sample_lcm
    monkeypatch.setattr(run_folder, "sample_lcm", lambda f, z, *a: sizes.append(tuple(z.shape[-2:])) or sample_lcm(f, z, *a))
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(finetune_args(tiny_lcm, images, out, "--steps", "1", "--resolution", "32")) == 0
    assert sizes and set(sizes) == {(16, 16)}, sizes
    card = (out / "lcm" / "README.md").read_text()
    assert "Trained on 32 px images; its default size is still its model's native 16 px" in card
    assert "height=32, width=32)" in card and "--height 32 --width 32" in card
    notes = [line for line in capsys.readouterr().err.splitlines() if "trained on 32 px images" in line]
    assert len(notes) == 1 and "--height 32 --width 32" in notes[0], notes
    assert json.loads((out / "lcm" / "unet" / "config.json").read_text())["sample_size"] == 8


def test_the_lcf_card_states_k_and_the_lcms_own(images, tiny_lcm, tmp_path):
    out = tmp_path / "run"
    assert main(finetune_args(tiny_lcm, images, out, "--steps", "1", "--skip", "100")) == 0
    card = (out / "lcm" / "README.md").read_text()
    assert "- Skipping step k = 100 (the LCM's own was 20): sampled on the grid of 10 timesteps" in card
    assert "- Trained on 16 px images, its native size" in card


def test_lcf_of_a_loaded_lcm_lora_records_its_rank_and_resumes(images, tiny_sd, tmp_path, capsys):
    """was: config.json said lora_rank 64 (the default) of a rank-4 LoRA. A resume, also from the run's own config.json,
    is not refused for it."""
    lora = save_tiny_lora(tmp_path / "lcm-lora", tiny_sd, rank=4)
    out = tmp_path / "run"
    args = finetune_args(tiny_sd, images, out, "--lora", str(lora), "--adapter", "lora", "--steps", "2")
    assert main(args) == 0
    assert json.loads((out / "config.json").read_text())["lora_rank"] == 4
    assert _adapter_metadata(out / "lora" / "pytorch_lora_weights.safetensors")["unet.r"] == 4  # what the export holds
    assert main([*args[:-1], "3", "--resume"]) == 0
    assert main(["finetune", "--config", str(out / "config.json"), "--out", str(out), "--steps", "4", "--resume"]) == 0
    assert json.loads((out / "config.json").read_text())["lora_rank"] == 4


def _adapter_metadata(path) -> dict:
    """diffusers' LoRA adapter metadata in a safetensors file's header."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return json.loads(header["__metadata__"]["lora_adapter_metadata"])


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_resume_where_a_run_wrote_nothing_starts_it_from_step_0(folder, images, tiny_lcm, tmp_path, capsys):
    """A run stopped before its config.json (Ctrl-C while its model loads), or none yet: --resume starts it with one note
    (was: refused, which a requeue script that always passes --resume could not get past)."""
    out = tmp_path / "run"
    if folder == "empty":
        out.mkdir()
    capsys.readouterr()
    assert main(finetune_args(tiny_lcm, images, out, "--steps", "2", "--resume")) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "has no checkpoint" in line]
    assert notes == [f"lcm finetune: note: {out} has no checkpoint to resume from: starting the run from step 0 of 2"], notes
    assert (out / "lcm" / "unet").is_dir() and json.loads((out / "config.json").read_text())["steps"] == 2


def test_distill_resumes_a_run_that_wrote_nothing_alike_and_a_folder_of_other_files_is_refused(images, tiny_sd, tiny_lcm, tmp_path,
                                                                                                capsys, run_error):
    out = tmp_path / "run"
    assert main(["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(images), "--out", str(out), "--steps", "1",
                 "--resume"]) == 0
    assert "starting the run from step 0 of 1" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("someone else's")
    code, err = run_error(finetune_args(tiny_lcm, images, other, "--resume"))
    assert code == 2 and len(err.splitlines()) == 1 and "nothing to resume in" in err and "no run's config.json" in err, err
    assert (other / "notes.txt").read_text() == "someone else's"
