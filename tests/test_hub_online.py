"""Hub ids (org/name, org/name@rev) online, as most users give them: every command downloads what its loader reads into
the local cache and reads it there as it reads a local folder (`hub.hub_snapshot`), so the files beside a hub model's
weights (its guidance record, a LoRA's scheduler config) count as they do locally, a pinned revision loads that commit
and a run records it, and what was downloaded still loads offline. The hub is `fake_hub`'s, serving the tiny models."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fake_hub import FakeHub, serving
from test_hub_cache import generated

# The LCM's guidance record: its default g is not diffusers' 8, so a record left unread shows
RECORD = {"guidance_scale_min": 1.5, "guidance_scale_max": 3.0, "guidance_scale": 2.0}
# Files of a real pipeline repo that no loader reads: a single-file checkpoint at its top, a variant's weights
UNREAD = {"checkpoint.safetensors": b"x" * 64, "unet/diffusion_pytorch_model.fp16.safetensors": b"y" * 64}


@pytest.fixture(scope="module")
def models(tiny_sd, tiny_lcm, tmp_path_factory):
    """Local folders: the tiny SD and LCM (with a guidance record), a LoRA of the SD with the LCMScheduler config `lcm distill
    --adapter lora` saves beside it (3 original inference steps, not diffusers' default 50), and a TAESD."""
    from diffusers import LCMScheduler

    from test_preview_decoder import save_tiny_autoencoder
    from tiny_models import save_tiny_lora, write_captioned_images

    root = tmp_path_factory.mktemp("hub-online")
    lcm = shutil.copytree(tiny_lcm, root / "lcm")
    (lcm / "guidance.json").write_text(json.dumps(RECORD))
    lora = save_tiny_lora(root / "lora", tiny_sd)
    LCMScheduler(original_inference_steps=3).save_config(lora)
    taesd = save_tiny_autoencoder(root / "taesd")
    return SimpleNamespace(sd=tiny_sd, lcm=lcm, lora=lora, taesd=taesd, images=write_captioned_images(root / "images", 4))


@pytest.fixture(scope="module")
def fake_hub(models):
    hub = FakeHub()
    hub.push("org/sd", models.sd)
    hub.push("org/lcm", models.lcm, extra=UNREAD)
    hub.push("org/lora", models.lora)
    hub.push("org/taesd", models.taesd)
    hub.start()
    yield hub
    hub.stop()


@pytest.fixture
def hub(fake_hub, monkeypatch, tmp_path):
    """huggingface_hub online on the fake hub, with an empty cache of this test's own."""
    serving(fake_hub, monkeypatch, tmp_path / "hf")
    monkeypatch.chdir(tmp_path)
    fake_hub.requests.clear()
    return fake_hub


def test_an_lcm_hub_id_samples_at_its_recorded_guidance_as_its_folder_does(hub, models, run_error, tmp_path):
    """Its guidance.json is downloaded with it (before: diffusers fetched the weights only, and g was 8), and of the repo
    only what is loaded comes down: no single-file checkpoint, no variant weights."""
    pixels, record = generated(run_error, tmp_path / "hub", "--model", "org/lcm")
    local_pixels, local_record = generated(run_error, tmp_path / "local", "--model", str(models.lcm))
    assert record["guidance_scale"] == local_record["guidance_scale"] == RECORD["guidance_scale"]
    assert np.array_equal(pixels, local_pixels) and record["model"] == "org/lcm"
    assert not [r for r in hub.requests if any(name in r for name in UNREAD)]


def test_an_lcm_lora_hub_id_on_a_hub_base_samples_under_its_scheduler_config(hub, models, run_error, tmp_path):
    """The LCMScheduler config beside the LoRA's weights on the hub is read (before: diffusers' default 50 original steps)."""
    pixels, record = generated(run_error, tmp_path / "hub", "--model", "org/sd", "--lora", "org/lora")
    local_pixels, local_record = generated(run_error, tmp_path / "local", "--model", str(models.sd), "--lora", str(models.lora))
    assert record["timesteps"] == local_record["timesteps"] == [998, 665]  # T/k = 3 original steps: k = 333
    assert np.array_equal(pixels, local_pixels) and (record["model"], record["lora"]) == ("org/sd", "org/lora")


def test_a_preview_decoder_hub_id_decodes_as_its_folder_does(hub, models, run_error, tmp_path):
    pixels, record = generated(run_error, tmp_path / "hub", "--model", "org/lcm", "--preview-decoder", "org/taesd")
    local_pixels, _ = generated(run_error, tmp_path / "local", "--model", str(models.lcm), "--preview-decoder", str(models.taesd))
    assert np.array_equal(pixels, local_pixels) and record["preview_decoder"] == "org/taesd"


def test_what_was_downloaded_loads_offline(hub, models, run_error, tmp_path, monkeypatch):
    """Online, then offline on the same cache: from the snapshot as downloaded here, and from one diffusers downloaded
    (`DiffusionPipeline.download`, which leaves the repo's files it does not load out: before, the offline lookup took
    such a snapshot for none and said the model was not in the cache)."""
    from diffusers import DiffusionPipeline
    from huggingface_hub import constants

    generated(run_error, tmp_path / "online", "--model", "org/lcm")
    DiffusionPipeline.download("org/sd")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _, record = generated(run_error, tmp_path / "offline", "--model", "org/lcm")
    assert record["guidance_scale"] == RECORD["guidance_scale"]
    generated(run_error, tmp_path / "sd", "--model", "org/sd", "--lora", str(models.lora))


def test_a_pinned_revision_loads_that_commit_online_and_offline(hub, models, tiny_lcm, run_error, tmp_path, monkeypatch):
    """org/name@rev (a commit or a branch) loads that revision while main has moved on (before: refused), and stays in the
    cache for offline use under the same name."""
    from huggingface_hub import constants

    first = hub.push("org/moving", tiny_lcm)  # no guidance record: sampled at diffusers' g 8
    hub.push("org/moving", models.lcm)
    hub.push("org/moving", models.sd, branch="sd")
    _, at_first = generated(run_error, tmp_path / "first", "--model", f"org/moving@{first}")
    _, latest = generated(run_error, tmp_path / "latest", "--model", "org/moving")
    assert (at_first["guidance_scale"], latest["guidance_scale"]) == (8.0, RECORD["guidance_scale"])
    code, err = run_error(["generate", "a", "--model", "org/moving@sd", "--out", str(tmp_path / "sd")])
    assert code == 2 and "without the guidance input of an LCM" in err, err  # the branch's SD, not main's LCM
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _, offline = generated(run_error, tmp_path / "offline", "--model", f"org/moving@{first}")
    assert offline["guidance_scale"] == 8.0


def test_a_distillation_from_a_hub_teacher_records_and_resumes_from_its_commit(hub, models, run_error, tmp_path):
    """sources.json holds the commit the teacher loaded; after the repo moved on, a resume is refused, and resumes with the
    teacher pinned to the commit the run started from."""
    first = hub.push("org/teacher", models.sd)
    out = tmp_path / "run"
    argv = ["distill", "--preset", "tiny", "--data", str(models.images), "--out", str(out), "--checkpoint-every", "1"]
    code, err = run_error([*argv, "--teacher", "org/teacher", "--steps", "1"])
    assert code == 0, err
    assert json.loads((out / "sources.json").read_text()) == {"teacher": f"commit {first}"}
    hub.push("org/teacher", models.lcm)
    code, err = run_error([*argv, "--teacher", "org/teacher", "--steps", "2", "--resume"])
    assert code == 2 and len(err.splitlines()) == 1 and "not the model this run started with" in err, err
    code, err = run_error([*argv, "--teacher", f"org/teacher@{first}", "--steps", "2", "--resume"])
    assert code == 0, err
    assert json.loads((out / "sources.json").read_text()) == {"teacher": f"commit {first}"}


def test_an_evaluation_of_hub_ids_scores_the_lcm_at_its_recorded_guidance(hub, models, run_error, tmp_path):
    from tiny_models import save_tiny_clip

    clip = save_tiny_clip(tmp_path / "clip")
    out = tmp_path / "eval"
    code, err = run_error(["evaluate", "--lcm", "org/lcm", "--teacher", "org/sd", "--prompts", str(models.images), "--out", str(out),
                           "--steps", "1", "--samples", "2", "--clip", str(clip), "--device", "cpu"])
    assert code == 0, err
    rows = json.loads((out / "results.json").read_text())["rows"].values()
    assert {r["guidance_scale"] for r in rows if r["sampler"] == "lcm"} == {RECORD["guidance_scale"]}


# A hub id that cannot be had, and a word its one-line message must hold
UNUSABLE = {
    "no such repo": ("org/nothing-here", "the hub has no repo org/nothing-here"),
    "no such revision": ("org/lcm@v9", "has no revision v9"),
    "an empty revision": ("org/lcm@", "nothing follows its @"),
    "a LoRA as the model": ("org/lora", "org/lora is not a diffusers pipeline hub repo"),
    "no unet weights": ("org/no-unet-weights", "cannot load the unet of"),
}


@pytest.mark.parametrize("case", UNUSABLE)
def test_a_hub_id_that_cannot_be_had_is_one_line_before_any_output(case, hub, models, run_error, tmp_path):
    name, word = UNUSABLE[case]
    if name == "org/no-unet-weights":
        folder = shutil.copytree(models.lcm, tmp_path / "no-unet-weights")
        (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
        hub.push(name, folder)
    out = tmp_path / "out"
    code, err = run_error(["generate", "a", "--model", name, "--out", str(out)])
    assert code == 2 and len(err.splitlines()) == 1 and word in err, err
    assert not out.exists(), "an output was written before the error"


def test_an_unreachable_hub_is_one_line(hub, fake_hub, run_error, tmp_path, monkeypatch):
    """A hub id not in the cache with the hub down (here: no server at the address) says so."""
    from huggingface_hub import constants

    from test_hub_cache import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", dead + "/{repo_id}/resolve/{revision}/{filename}")
    code, err = run_error(["generate", "a", "--model", "org/lcm", "--out", str(tmp_path / "out")])
    assert code == 2 and len(err.splitlines()) == 1 and "the hub cannot be reached" in err, err


@pytest.mark.parametrize("flags, read", [((), ("vae/", "text_encoder/")), (("--captions-only",), ("vae/",))])
def test_a_cache_from_a_hub_id_downloads_only_the_weights_it_reads(hub, models, run_error, tmp_path, flags, read):
    """`lcm cache` reads the VAE and text encoder(s) (with --captions-only the VAE alone): a hub id's UNet weights, SD 1.5's
    3.4 GB, are not downloaded either (before: the whole pipeline came down, to be left unread), and the cache is the
    local folder's."""
    from latent_consistency.data.latent_cache import LatentCache

    for model, out in (("org/sd", tmp_path / "hub"), (str(models.sd), tmp_path / "local")):
        code, err = run_error(["cache", "--model", model, "--data", str(models.images), "--out", str(out), *flags])
        assert code == 0, err
    weights = [r for r in hub.requests if r.endswith(".safetensors")]
    assert sorted(part for part in ("vae/", "text_encoder/", "unet/") if any(part in r for r in weights)) == sorted(read), weights
    hub_cache, local_cache = LatentCache(tmp_path / "hub"), LatentCache(tmp_path / "local")
    assert len(hub_cache) == len(local_cache) == 4
    assert all(torch.equal(hub_cache[i]["latents"], local_cache[i]["latents"]) for i in range(4))
